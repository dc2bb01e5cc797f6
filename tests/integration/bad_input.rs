//! Malformed commands: a 400 reply naming the problem, a dead letter saying why,
//! no crash, and the worker keeps serving.

use profile_worker_testkit::*;

async fn assert_malformed(env: &Env, body: &[u8], opts: Send, code: &str, mentions: &str) {
    let r = env.call_raw(body, opts).await;
    assert_eq!(r.status, 400, "{}", r.raw);
    assert_eq!(r.body["errorCode"], code, "{}", r.raw);
    let message = r.body["message"].as_str().unwrap();
    assert!(
        message.contains(mentions),
        "message {message:?} should mention {mentions:?}"
    );
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead.len(), 1, "exactly one dead letter");
    // The original message; a body over the limit cut to it, with its size in a header.
    let kept = body
        .len()
        .min(profile_worker::contract::command::MAX_BODY_BYTES);
    assert_eq!(
        dead[0].body,
        &body[..kept],
        "the dead letter is the original message"
    );
    assert_eq!(
        dead[0].header("x-original-body-size"),
        (kept < body.len()).then(|| body.len().to_string())
    );
    assert_eq!(dead[0].header("x-error-code").as_deref(), Some(code));
    assert_eq!(dead[0].header("x-error-reason").as_deref(), Some(message));
}

#[tokio::test]
async fn each_bad_input_is_answered_and_dead_lettered() {
    let env = Env::start().await;
    let ok = ticket(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    let d = Send::default;
    let vt = || Send {
        kind: Some("create-verification-token".into()),
        ..Default::default()
    };
    let p = "PARAM_DESERIALIZATION_ERROR";
    assert_malformed(&env, b"not json", d(), p, "not valid JSON").await;
    assert_malformed(&env, b"[1,2,3]", d(), p, "JSON object").await;
    assert_malformed(&env, b"null", d(), p, "JSON object").await;
    assert_malformed(
        &env,
        br#"{"accessTokenId":"t","profileId":7}"#,
        d(),
        p,
        "profileId",
    )
    .await;
    assert_malformed(&env, br#"{"accessTokenId":"t"}"#, d(), p, "profileId").await;
    assert_malformed(
        &env,
        br#"{"accessTokenId":"t","profileId":"p","extra":true}"#,
        d(),
        p,
        "extra",
    )
    .await;
    assert_malformed(
        &env,
        br#"{"accessTokenId":"","profileId":"p"}"#,
        d(),
        p,
        "accessTokenId",
    )
    .await;
    let long = format!(
        r#"{{"accessTokenId":"t","profileId":"{}"}}"#,
        "x".repeat(129)
    );
    assert_malformed(&env, long.as_bytes(), d(), p, "profileId").await;
    let big = format!(
        r#"{{"accessTokenId":"{}","profileId":"p"}}"#,
        "x".repeat(70 * 1024)
    );
    assert_malformed(&env, big.as_bytes(), d(), p, "65536").await;
    assert_malformed(
        &env,
        b"{\"accessTokenId\":\"\xff\xfe\",\"profileId\":\"p\"}",
        d(),
        p,
        "UTF-8",
    )
    .await;
    assert_malformed(
        &env,
        ok.as_bytes(),
        Send {
            content_type: Some("text/plain".into()),
            ..d()
        },
        p,
        "content_type",
    )
    .await;
    assert_malformed(
        &env,
        br#"{"accessTokenId":"t","id":"p","purpose":"shout"}"#,
        vt(),
        p,
        "purpose",
    )
    .await;
    assert_malformed(
        &env,
        br#"{"accessTokenId":"t","id":"p","verificationUrl":"javascript:alert(1)"}"#,
        vt(),
        p,
        "verificationUrl",
    )
    .await;
    assert_malformed(
        &env,
        br#"{"accessTokenId":"t","profileId":"p"}"#,
        vt(),
        p,
        "id",
    )
    .await;
    // Unknown command in `type` (routed by a valid key) and in the routing key alone.
    let unknown = Send {
        kind: Some("delete-profile".into()),
        routing_key: Some("create-ticket".into()),
        ..d()
    };
    assert_malformed(
        &env,
        ok.as_bytes(),
        unknown,
        "UNKNOWN_COMMAND",
        "delete-profile",
    )
    .await;
    let unrouted = Send {
        kind: Some("".into()),
        routing_key: Some("drop-tables".into()),
        ..d()
    };
    assert_malformed(
        &env,
        ok.as_bytes(),
        unrouted,
        "UNKNOWN_COMMAND",
        "drop-tables",
    )
    .await;

    // Nothing was written, and the worker still serves.
    assert_eq!(
        env.count("tickets").await + env.count("verification_tokens").await,
        0
    );
    assert_eq!(env.count("processed_commands").await, 0);
    assert_eq!(
        env.call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
            .await
            .status,
        200
    );
    env.teardown().await;
}

#[tokio::test]
async fn malformed_without_reply_to_is_still_dead_lettered() {
    let env = Env::start().await;
    env.publish(
        b"{oops",
        Send {
            reply_to: Some(String::new()),
            ..Default::default()
        },
    )
    .await;
    let dead = env.wait_dead_letters(1).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].header("x-error-code").as_deref(),
        Some("PARAM_DESERIALIZATION_ERROR")
    );
    env.teardown().await;
}

#[tokio::test]
async fn malformed_and_valid_mixed_in_one_batch() {
    let mut env = Env::prepare().await;
    // Queue everything first so the worker takes it as one batch.
    let mut calls = Vec::new();
    for i in 0..50 {
        let body = if i % 5 == 0 {
            b"garbage".to_vec()
        } else {
            ticket(ADMIN_TOKEN, ENABLED_PROFILE)
                .to_string()
                .into_bytes()
        };
        calls.push((
            i % 5 == 0,
            env.publish(
                &body,
                Send {
                    message_id: Some(format!("mixed-{i}")),
                    ..Default::default()
                },
            )
            .await,
        ));
    }
    env.start_worker().await;
    for (bad, c) in calls {
        let r = env.reply_for(&c).await;
        assert_eq!(r.status, if bad { 400 } else { 200 }, "{}", r.raw);
    }
    assert_eq!(env.wait_dead_letters(10).await.len(), 10);
    assert_eq!(env.count("tickets").await, 40);
    env.teardown().await;
}
