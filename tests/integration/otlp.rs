//! Spans exported over OTLP, configured by the standard `OTEL_*` variables as
//! every OpenTelemetry SDK is, and received by real OTLP receivers: one over
//! HTTP (protobuf and JSON, axum) and one over gRPC (the OTLP trace service
//! from opentelemetry-proto, served by tonic). A command's span is in its
//! publisher's trace, the publisher's span its parent, and its reply names it;
//! the batch's commit and publish are exported too. The per-signal endpoint,
//! headers, sampler and resource attributes are the SDK's to read, and the
//! worker's own flags fill in only what they leave unset. Without any of them
//! nothing is exported (the other tests run that way, and a test here checks
//! that no span reaches a listening receiver).

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use profile_worker_testkit::*;
use prost::Message;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a receiver was sent: each span with its resource's string
/// attributes, and every request's headers (gRPC metadata, HTTP headers).
#[derive(Default)]
struct Received {
    spans: Vec<(BTreeMap<String, String>, Span)>,
    headers: Vec<BTreeMap<String, String>>,
}

type Shared = Arc<Mutex<Received>>;

fn keep(into: &Shared, req: ExportTraceServiceRequest, headers: BTreeMap<String, String>) {
    let mut got = into.lock().unwrap();
    got.headers.push(headers);
    for rs in req.resource_spans {
        let resource: BTreeMap<String, String> = rs
            .resource
            .map(|r| r.attributes)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|kv| match kv.value?.value? {
                AnyValue::StringValue(s) => Some((kv.key, s)),
                _ => None,
            })
            .collect();
        for ss in rs.scope_spans {
            for span in ss.spans {
                got.spans.push((resource.clone(), span));
            }
        }
    }
}

/// An OTLP/HTTP receiver on a free port, taking protobuf or JSON at `path`.
async fn http_receiver(path: &str) -> (String, Shared) {
    let got: Shared = Default::default();
    let kept = got.clone();
    let app = axum::Router::new().route(
        path,
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let kept = kept.clone();
                async move {
                    let json = headers
                        .get("content-type")
                        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
                    let req = if json {
                        serde_json::from_slice::<ExportTraceServiceRequest>(&body)
                            .expect("OTLP JSON")
                    } else {
                        ExportTraceServiceRequest::decode(body).expect("OTLP protobuf")
                    };
                    let headers = headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                        .collect();
                    keep(&kept, req, headers);
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), got)
}

struct GrpcReceiver(Shared);

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.to_string(), v.to_str().ok()?.to_string()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        keep(&self.0, request.into_inner(), headers);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on a free port.
async fn grpc_receiver() -> (String, Shared) {
    let got: Shared = Default::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = TraceServiceServer::new(GrpcReceiver(got.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    (format!("http://{addr}"), got)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The worker's command with no OTEL_* variable from the machine running the
/// tests, so each test says exactly what it sets, and the batches sent soon.
fn clean_worker(env: &Env) -> tokio::process::Command {
    let mut cmd = worker_process(env);
    for (name, _) in std::env::vars() {
        if name.starts_with("OTEL_") {
            cmd.env_remove(&name);
        }
    }
    cmd.env("OTEL_BSP_SCHEDULE_DELAY", "100");
    cmd
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PUBLISHER_SPAN: &str = "00f067aa0ba902b7";

/// One create-verification-token in the publisher's trace, answered, then the
/// worker stopped with SIGTERM (which sends what is still buffered); the span
/// ID the reply names.
async fn one_traced_command(env: &Env, cmd: tokio::process::Command) -> String {
    let mut worker = WorkerProcess::start(cmd, None).await;
    let send = Send {
        kind: Some("create-verification-token".into()),
        message_id: Some(uuid::Uuid::new_v4().to_string()),
        traceparent: Some(format!("00-{TRACE_ID}-{PUBLISHER_SPAN}-01")),
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
    signal(&worker, SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(30), worker.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "{}", worker.log_text());
    reply_span
}

/// The command's span, waited for (at most 5 s), with its resource.
async fn command_span(got: &Shared) -> (BTreeMap<String, String>, Span) {
    for _ in 0..50 {
        if let Some(found) = got
            .lock()
            .unwrap()
            .spans
            .iter()
            .find(|(_, s)| hex(&s.trace_id) == TRACE_ID)
            .cloned()
        {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let names: Vec<String> = got
        .lock()
        .unwrap()
        .spans
        .iter()
        .map(|(_, s)| s.name.clone())
        .collect();
    panic!("no span in the publisher's trace: {names:?}")
}

fn span_names(got: &Shared) -> Vec<String> {
    got.lock()
        .unwrap()
        .spans
        .iter()
        .map(|(_, s)| s.name.clone())
        .collect()
}

#[tokio::test]
async fn a_commands_spans_are_exported_in_its_publishers_trace() {
    let (endpoint, got) = http_receiver("/v1/traces").await;
    let env = Env::prepare().await;
    let mut cmd = clean_worker(&env);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
    let reply_span = one_traced_command(&env, cmd).await;

    let (resource, command) = command_span(&got).await;
    assert_eq!(command.name, "create-verification-token process");
    assert_eq!(
        hex(&command.parent_span_id),
        PUBLISHER_SPAN,
        "the publisher's span is its parent"
    );
    assert_eq!(
        hex(&command.span_id),
        reply_span,
        "the reply names the exported span"
    );
    assert_eq!(command.trace_state, "congo=t61rcWkgMzE");
    assert_eq!(
        resource.get("service.name").map(String::as_str),
        Some("profile-worker"),
        "the worker's name fills in an unset OTEL_SERVICE_NAME"
    );
    let names = span_names(&got);
    for stage in ["batch", "commit", "publish"] {
        assert!(
            names.iter().any(|n| n == stage),
            "a {stage} span: {names:?}"
        );
    }
    env.teardown().await;
}

/// `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` with the per-signal endpoint, headers
/// and resource attributes: every one reaches a gRPC receiver. Before issue
/// 33 the worker spoke OTLP/HTTP only and read neither the protocol nor the
/// per-signal endpoint, so this receiver got nothing.
#[tokio::test]
async fn grpc_is_chosen_and_configured_by_the_standard_variables() {
    let (endpoint, got) = grpc_receiver().await;
    // A receiver at the general endpoint, which the per-signal one overrides.
    let (general, ignored) = http_receiver("/v1/traces").await;
    let env = Env::prepare().await;
    let mut cmd = clean_worker(&env);
    cmd.env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &general)
        .env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint)
        .env(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-tenant=auth-team,authorization=Bearer%20collector-key",
        )
        .env(
            "OTEL_RESOURCE_ATTRIBUTES",
            "service.name=profile-worker-eu,deployment.environment=ci",
        );
    let reply_span = one_traced_command(&env, cmd).await;

    let (resource, command) = command_span(&got).await;
    assert_eq!(command.name, "create-verification-token process");
    assert_eq!(hex(&command.span_id), reply_span);
    assert_eq!(hex(&command.parent_span_id), PUBLISHER_SPAN);
    assert_eq!(
        resource.get("service.name").map(String::as_str),
        Some("profile-worker-eu"),
        "OTEL_RESOURCE_ATTRIBUTES names the service; the worker's default does not override it"
    );
    assert_eq!(
        resource.get("deployment.environment").map(String::as_str),
        Some("ci")
    );
    let headers = got.lock().unwrap().headers.clone();
    assert!(
        headers.iter().all(|h| {
            h.get("x-tenant").map(String::as_str) == Some("auth-team")
                && h.get("authorization").map(String::as_str) == Some("Bearer collector-key")
        }),
        "{headers:?}"
    );
    let names = span_names(&got);
    for stage in ["batch", "commit", "publish"] {
        assert!(
            names.iter().any(|n| n == stage),
            "a {stage} span: {names:?}"
        );
    }
    assert!(
        ignored.lock().unwrap().spans.is_empty(),
        "the per-signal endpoint wins over OTEL_EXPORTER_OTLP_ENDPOINT"
    );
    env.teardown().await;
}

/// HTTP with JSON at a per-signal endpoint used as given (no path appended),
/// OTEL_SERVICE_NAME, per-signal headers; the worker's `--otlp-endpoint` flag
/// points elsewhere and is only a fallback, so it receives nothing.
#[tokio::test]
async fn http_json_at_a_per_signal_endpoint_with_its_headers() {
    let (base, got) = http_receiver("/collector/spans").await;
    let (flagged, ignored) = http_receiver("/v1/traces").await;
    let env = Env::prepare().await;
    let mut cmd = clean_worker(&env);
    cmd.arg("--otlp-endpoint")
        .arg(&flagged)
        .env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
        .env(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            format!("{base}/collector/spans"),
        )
        .env("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-api-key=k1")
        .env("OTEL_SERVICE_NAME", "profile-worker-json");
    one_traced_command(&env, cmd).await;

    let (resource, command) = command_span(&got).await;
    assert_eq!(command.name, "create-verification-token process");
    assert_eq!(
        resource.get("service.name").map(String::as_str),
        Some("profile-worker-json")
    );
    let headers = got.lock().unwrap().headers.clone();
    assert!(
        headers.iter().all(|h| {
            h.get("x-api-key").map(String::as_str) == Some("k1")
                && h.get("content-type")
                    .is_some_and(|c| c.starts_with("application/json"))
        }),
        "{headers:?}"
    );
    assert!(ignored.lock().unwrap().spans.is_empty());
    env.teardown().await;
}

/// The sampler is the SDK's, from OTEL_TRACES_SAMPLER: always_off exports no
/// span, while the trace context still travels on the reply.
#[tokio::test]
async fn the_standard_sampler_is_honoured() {
    let (endpoint, got) = http_receiver("/v1/traces").await;
    let env = Env::prepare().await;
    let mut cmd = clean_worker(&env);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_TRACES_SAMPLER", "always_off");
    one_traced_command(&env, cmd).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        got.lock().unwrap().spans.is_empty(),
        "sampled out: {:?}",
        span_names(&got)
    );
    env.teardown().await;
}

#[tokio::test]
async fn an_unknown_protocol_stops_the_worker_with_its_name() {
    let env = Env::prepare().await;
    let mut cmd = clean_worker(&env);
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "thrift")
        .stderr(std::process::Stdio::piped());
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("exits")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=thrift")
            && stderr.contains("grpc, http/protobuf or http/json"),
        "{stderr}"
    );
    env.teardown().await;
}

#[tokio::test]
async fn without_the_endpoint_nothing_is_exported() {
    let (endpoint, got) = http_receiver("/v1/traces").await;
    let (grpc, got_grpc) = grpc_receiver().await;
    let env = Env::prepare().await;
    // The receivers listen, but the worker is not told about them.
    let cmd = clean_worker(&env);
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
        got.lock().unwrap().spans.is_empty(),
        "nothing reached {endpoint}"
    );
    assert!(
        got_grpc.lock().unwrap().spans.is_empty(),
        "nothing reached {grpc}"
    );
    env.teardown().await;
}
