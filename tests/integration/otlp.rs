//! Spans exported over OTLP/HTTP, received by a collector stand-in: a
//! command's span is in its publisher's trace, the publisher's span its
//! parent, and its reply names it; the batch's commit and publish are
//! exported too. Without the endpoint nothing is exported (the other tests run
//! that way, and a test here checks that no span reaches a listening collector).

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use profile_worker_testkit::*;
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// An OTLP/HTTP receiver on a free port: every span POSTed to /v1/traces.
async fn collector() -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans: Arc<Mutex<Vec<Span>>> = Default::default();
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut all = kept.lock().unwrap();
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        all.extend(ss.spans);
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), spans)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn a_commands_spans_are_exported_in_its_publishers_trace() {
    let (endpoint, spans) = collector().await;
    let env = Env::prepare().await;
    let mut cmd = worker_process(&env);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    let mut worker = WorkerProcess::start(cmd, None).await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let publisher_span = "00f067aa0ba902b7";
    let send = Send {
        kind: Some("create-verification-token".into()),
        message_id: Some(uuid::Uuid::new_v4().to_string()),
        traceparent: Some(format!("00-{trace_id}-{publisher_span}-01")),
        tracestate: Some("congo=t61rcWkgMzE".into()),
        ..Default::default()
    };
    let body = verification(ADMIN_TOKEN, ENABLED_PROFILE).to_string();
    let reply = env.call_raw(body.as_bytes(), send).await;
    assert_eq!(reply.status, 200, "{}", reply.raw);
    let reply_span = reply
        .traceparent
        .as_deref()
        .and_then(|h| h.split('-').nth(2))
        .expect("a traceparent on the reply")
        .to_string();
    // SIGTERM: what is still buffered is sent on the way out.
    signal(&worker, SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success());

    let mut found = None;
    for _ in 0..50 {
        found = spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| hex(&s.trace_id) == trace_id)
            .cloned();
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = spans.lock().unwrap().clone();
    let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    let command = found.unwrap_or_else(|| panic!("no span in the publisher's trace: {names:?}"));
    assert_eq!(command.name, "create-verification-token process");
    assert_eq!(
        hex(&command.parent_span_id),
        publisher_span,
        "the publisher's span is its parent"
    );
    assert_eq!(
        hex(&command.span_id),
        reply_span,
        "the reply names the exported span"
    );
    assert_eq!(command.trace_state, "congo=t61rcWkgMzE");
    for stage in ["batch", "commit", "publish"] {
        assert!(names.contains(&stage), "a {stage} span: {names:?}");
    }
    env.teardown().await;
}

#[tokio::test]
async fn without_the_endpoint_nothing_is_exported() {
    let (endpoint, spans) = collector().await;
    let env = Env::prepare().await;
    // The collector listens, but the worker is not told about it; the
    // standard variable is cleared in case the machine sets one.
    let mut cmd = worker_process(&env);
    cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
    let mut worker = WorkerProcess::start(cmd, None).await;
    let reply = env
        .call("create-ticket", ticket(ADMIN_TOKEN, ENABLED_PROFILE))
        .await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.traceparent.is_some(),
        "trace context still propagated"
    );
    signal(&worker, SIGTERM);
    let _ = worker.wait().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        spans.lock().unwrap().is_empty(),
        "nothing reached {endpoint}"
    );
    env.teardown().await;
}
