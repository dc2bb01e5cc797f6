//! schemas/ must not drift from the code: the committed JSON Schemas are exactly what
//! the Rust types generate (regenerate with `UPDATE_SCHEMAS=1 cargo test --test integration schemas`),
//! and the contract's own example messages validate against them.

use profile_worker::contract::schema;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schemas")
}

#[test]
fn committed_schemas_match_the_types() {
    let update = std::env::var("UPDATE_SCHEMAS").is_ok();
    let mut stale = Vec::new();
    for (name, s) in schema::all() {
        let path = dir().join(name);
        let want = schema::render(&s);
        if update {
            std::fs::write(&path, &want).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(want.as_str()) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "schemas/ is stale for {stale:?}: run UPDATE_SCHEMAS=1 cargo test --test schemas"
    );
}

fn validate(schema_file: &str, example: serde_json::Value) -> Result<(), String> {
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join(schema_file)).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&schema).map_err(|e| e.to_string())?;
    let errors: Vec<String> = validator
        .iter_errors(&example)
        .map(|e| e.to_string())
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

#[test]
fn contract_examples_validate() {
    use serde_json::json;
    let cases = [
        (
            "create-ticket.command.json",
            json!({ "accessTokenId": "e8f5170c-877b-416f-b70f-4b09772f8e2d", "profileId": "5925a68def86951f895cf497" }),
        ),
        (
            "create-verification-token.command.json",
            json!({ "accessTokenId": "e8f5170c-877b-416f-b70f-4b09772f8e2d", "id": "592715d4d4c650e226b03b62", "purpose": "verify-account", "verificationUrl": "https://example.com/verify" }),
        ),
        (
            "create-ticket.reply.json",
            json!({ "tenant": "default", "profileId": "5925a68def86951f895cf497", "lastRequestTime": 1495660441508i64, "id": "7f036af3-1ab9-4791-b615-ecaece3f0010" }),
        ),
        (
            "create-verification-token.reply.json",
            json!({ "tenant": "sample-tenant", "profileId": "592715d4d4c650e226b03b62", "timestamp": 1495746285875i64, "id": "055d58c4-fabb-44da-96eb-261e24e1d0c9" }),
        ),
        (
            "error.reply.json",
            json!({ "errorCode": "NO_SUCH_ACCESS_TOKEN_ID", "message": "No access token found for ID \"...\"" }),
        ),
        (
            "ticket.created.event.json",
            json!({ "tenant": "default", "profileId": "5925a68def86951f895cf497", "lastRequestTime": 1495660441508i64,
                    "idSha256": "3198614c36cbeb7f819204b251b466c19b7230547acd8a6c37b9afd358718d07" }),
        ),
        (
            "verification-token.created.event.json",
            json!({ "tenant": "sample-tenant", "profileId": "592715d4d4c650e226b03b62", "timestamp": 1495746285875i64,
                    "idSha256": "3198614c36cbeb7f819204b251b466c19b7230547acd8a6c37b9afd358718d07" }),
        ),
        (
            "internal-error.reply.json",
            json!({ "message": "Internal server error" }),
        ),
        (
            "email.requested.event.json",
            json!({ "id": "0b7e1e4c-3c1a-4c55-9a0e-3f7f2f6d1a11", "tenant": "sample-tenant", "profileId": "592715d4d4c650e226b03b62",
            "to": "john.doe@example.com", "template": "verify-account", "tokenId": "055d58c4-fabb-44da-96eb-261e24e1d0c9",
            "verificationLink": "https://example.com/verify?tokenId=055d58c4-fabb-44da-96eb-261e24e1d0c9", "timestamp": 1495746285875i64 }),
        ),
    ];
    for (file, example) in cases {
        validate(file, example).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    // And the schemas do reject what the contract forbids.
    assert!(validate(
        "create-ticket.command.json",
        json!({ "accessTokenId": "t", "profileId": "p", "extra": 1 })
    )
    .is_err());
    assert!(validate(
        "create-ticket.command.json",
        json!({ "accessTokenId": "t" })
    )
    .is_err());
    assert!(validate(
        "create-verification-token.command.json",
        json!({ "accessTokenId": "t", "id": "p", "purpose": "other" })
    )
    .is_err());
    // Events on the events exchange never carry the ID itself (CONTRACT §5).
    for (file, time) in [
        ("ticket.created.event.json", "lastRequestTime"),
        ("verification-token.created.event.json", "timestamp"),
    ] {
        assert!(
            validate(
                file,
                json!({ "tenant": "t", "profileId": "p", time: 1, "id": "7f036af3-1ab9-4791-b615-ecaece3f0010" })
            )
            .is_err(),
            "{file} accepts an id"
        );
        assert!(
            validate(
                file,
                json!({ "tenant": "t", "profileId": "p", time: 1, "idSha256": "7f036af3-1ab9-4791-b615-ecaece3f0010" })
            )
            .is_err(),
            "{file} accepts an idSha256 that is no SHA-256"
        );
    }
    assert!(validate(
        "error.reply.json",
        json!({ "errorCode": "NOPE", "message": "x" })
    )
    .is_err());
}

#[test]
fn asyncapi_names_every_schema_file() {
    let doc = std::fs::read_to_string(dir().join("asyncapi.yaml")).unwrap();
    for (name, _) in schema::all() {
        assert!(
            doc.contains(&format!("./{name}")),
            "asyncapi.yaml does not reference {name}"
        );
    }
}
