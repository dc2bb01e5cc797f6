//! docs/CONTRACT.md, the project's own contract, against the code: every error
//! code, setting, command, reply type, routing key and broker object it names
//! exists in the code, and every one of those the code has (error codes,
//! commands, reply types, routing keys, the settings that name broker objects)
//! is in it. A renamed code or key fails here, not at a subscriber.

use profile_worker::config::Settings;
use profile_worker::contract::message::EventKind;
use profile_worker::contract::{CommandName, ErrorCode};
use std::collections::BTreeSet;
use strum::IntoEnumIterator;

fn contract() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONTRACT.md"))
        .expect("docs/CONTRACT.md")
}

/// Every `code span` of the document.
fn spans(doc: &str) -> BTreeSet<String> {
    doc.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn error_codes() -> BTreeSet<String> {
    let mut codes: BTreeSet<String> = ErrorCode::iter().map(|c| c.as_str().to_string()).collect();
    // The codes of dead letters the worker writes without a reply of that code.
    codes.insert(profile_worker::pipeline::POISON_CODE.to_string());
    codes.insert(profile_worker::pipeline::REPLY_TO_NOT_ALLOWED.to_string());
    codes
}

fn routing_keys() -> BTreeSet<String> {
    // Every event there is: a new `EventKind` is not done until CONTRACT names it.
    let mut keys: BTreeSet<String> = EventKind::iter()
        .map(|k| k.routing_key().to_string())
        .collect();
    keys.extend(CommandName::ALL.iter().map(|c| c.as_str().to_string()));
    keys.extend(CommandName::ALL.iter().map(|c| c.reply_type().to_string()));
    keys.insert("error.reply".into());
    keys
}

/// The broker objects' default names, and the settings that name them.
fn broker_objects() -> (BTreeSet<String>, BTreeSet<&'static str>) {
    let b = Settings::from_env().broker;
    let names = [
        b.command_exchange.clone(),
        b.command_queue.clone(),
        b.unrouted_exchange(),
        b.bulk_exchange.clone(),
        b.bulk_queue.clone(),
        b.bulk_unrouted_exchange(),
        b.dead_letter_exchange.clone(),
        b.dead_letter_queue.clone(),
        b.events_exchange.clone(),
        b.email_exchange.clone(),
        b.email_queue.clone(),
        b.email_dead_letter_exchange(),
        b.email_dead_letter_queue(),
    ]
    .into();
    let settings = [
        "COMMAND_EXCHANGE",
        "COMMAND_QUEUE",
        "BULK_EXCHANGE",
        "BULK_QUEUE",
        "DEAD_LETTER_EXCHANGE",
        "DEAD_LETTER_QUEUE",
        "EVENTS_EXCHANGE",
        "EMAIL_EXCHANGE",
        "EMAIL_QUEUE",
    ]
    .into();
    (names, settings)
}

#[test]
fn what_the_code_has_the_contract_names() {
    let doc = spans(&contract());
    let (objects, object_settings) = broker_objects();
    let missing: Vec<String> = error_codes()
        .into_iter()
        .chain(routing_keys())
        .chain(objects)
        .chain(object_settings.iter().map(|s| s.to_string()))
        .filter(|name| !doc.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/CONTRACT.md does not name {missing:?}"
    );
}

#[test]
fn what_the_contract_names_the_code_has() {
    let doc = spans(&contract());
    let codes = error_codes();
    let settings: BTreeSet<String> = Settings::env_names().into_iter().collect();
    let keys = routing_keys();
    let (objects, _) = broker_objects();
    // Words of the domain and of SQL the contract quotes, which are neither.
    let words = [
        "MANAGE_PROFILES",
        "MANAGE_TICKETS",
        "INSERT",
        "UPDATE",
        "DELETE",
        "errors.properties",
        "example.com",
    ];
    let mut unknown = Vec::new();
    for span in &doc {
        let upper = span.len() > 2
            && span
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
        if upper
            && !codes.contains(span)
            && !settings.contains(span)
            && !words.contains(&span.as_str())
        {
            unknown.push(span.clone());
        }
        // A dotted lower-case name: a routing key, a reply type or a broker object.
        let dotted = span.contains('.')
            && !span.contains(' ')
            && !span.contains('/')
            && span
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '.' || c == '-');
        let reply_queue_prefix = span.starts_with("amq.");
        if dotted
            && !reply_queue_prefix
            && !keys.contains(span)
            && !objects.contains(span)
            && !words.contains(&span.as_str())
        {
            unknown.push(span.clone());
        }
    }
    assert!(
        unknown.is_empty(),
        "docs/CONTRACT.md names what the code does not have: {unknown:?}"
    );
}

#[test]
fn every_reference_points_at_the_projects_own_contract() {
    // The repository stands alone: nothing points outside it for the contract.
    let root = env!("CARGO_MANIFEST_DIR");
    let mut outside = Vec::new();
    for dir in [
        "src", "docs", "schemas", "tests", "scripts", "testkit", "loadgen",
    ] {
        let mut stack = vec![std::path::PathBuf::from(root).join(dir)];
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                for e in std::fs::read_dir(&p).unwrap() {
                    stack.push(e.unwrap().path());
                }
            } else if let Ok(text) = std::fs::read_to_string(&p) {
                if text.contains(concat!("../", "shared/CONTRACT.md")) {
                    outside.push(p.display().to_string());
                }
            }
        }
    }
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    if readme.contains(concat!("../", "shared/CONTRACT.md")) {
        outside.push("README.md".into());
    }
    assert!(
        outside.is_empty(),
        "these point outside the repository for the contract: {outside:?}"
    );
}
