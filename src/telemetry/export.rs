//! Spans exported over OTLP when the standard `OTEL_*` variables ask for it,
//! and the spans that exist only for that export.
//!
//! The OpenTelemetry SDK reads the endpoints, headers, timeouts, sampler and
//! resource attributes from the environment itself. What it leaves to the
//! program is deciding whether to export at all and over which protocol;
//! [`plan`] decides that, purely, from the variables and the worker's own
//! flags, which only fill in what the variables leave unset.

use std::sync::atomic::{AtomicBool, Ordering};

pub(super) static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an exporter was installed at [`super::init`]).
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// `make()` when spans are exported, else a disabled span: the spans that
/// exist only for the trace cost nothing when there is none.
pub fn exported_span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if exporting() {
        make()
    } else {
        tracing::Span::none()
    }
}

/// The OTLP transports of the specification (`OTEL_EXPORTER_OTLP_PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
    HttpJson,
}

/// How spans are exported, as far as the program decides it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportPlan {
    pub protocol: OtlpProtocol,
    /// The worker's `--otlp-endpoint`, completed as the SDK completes
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` leaves the endpoint to the SDK
    /// (the variables, else the specification's default for the protocol).
    pub endpoint: Option<String>,
    /// Whether the endpoint the exporter will use is https (gRPC then needs
    /// its TLS configured; HTTP's client does it by itself).
    pub tls: bool,
    /// `service.name`, when neither `OTEL_SERVICE_NAME` nor
    /// `OTEL_RESOURCE_ATTRIBUTES` names the service.
    pub service_name: Option<String>,
}

/// The worker's own export settings (flags of `run`).
#[derive(Debug, Default, Clone, Copy)]
pub struct Fallbacks<'a> {
    pub endpoint: Option<&'a str>,
    pub service_name: Option<&'a str>,
}

/// The name spans carry when nothing else names the service.
pub const DEFAULT_SERVICE_NAME: &str = "profile-worker";

/// Variables of the specification this SDK cannot honour: refused at start
/// rather than ignored, since ignoring a CA or a client certificate would
/// send spans somewhere the operator did not mean, or nowhere.
const UNSUPPORTED: [&str; 6] = [
    "OTEL_EXPORTER_OTLP_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
    "OTEL_EXPORTER_OTLP_CLIENT_KEY",
    "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
];

/// Decides the export from the environment (`var`: a variable's value, with
/// an empty one counting as unset, as the specification says) and the
/// worker's flags. `Ok(None)`: nothing is exported. Export is opt-in: an
/// endpoint (standard or the flag) or `OTEL_TRACES_EXPORTER=otlp` turns it on;
/// `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` keeps it off.
pub fn plan(
    var: impl Fn(&str) -> Option<String>,
    fallbacks: Fallbacks<'_>,
) -> Result<Option<ExportPlan>, OtlpError> {
    let get = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if get("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    let explicit = match get("OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase()) {
        None => false,
        Some(v) if v == "none" => return Ok(None),
        Some(v) if v == "otlp" => true,
        Some(v) => {
            return Err(OtlpError::Setting {
                name: "OTEL_TRACES_EXPORTER",
                value: v,
                problem: "this worker exports spans over OTLP only (otlp or none)",
            })
        }
    };
    let signal = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let general = get("OTEL_EXPORTER_OTLP_ENDPOINT");
    let flag = fallbacks.endpoint.filter(|e| !e.trim().is_empty());
    if !explicit && signal.is_none() && general.is_none() && flag.is_none() {
        return Ok(None);
    }
    for name in UNSUPPORTED {
        if get(name).is_some() {
            return Err(OtlpError::Setting {
                name,
                value: "…".into(),
                problem: "not supported by this worker's OTLP exporter: add the CA to the \
                          system's store (client certificates are not supported)",
            });
        }
    }
    let (name, value) = match get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
        Some(v) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", v),
        None => (
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            get("OTEL_EXPORTER_OTLP_PROTOCOL").unwrap_or_else(|| "http/protobuf".into()),
        ),
    };
    let protocol = match value.trim() {
        "grpc" => OtlpProtocol::Grpc,
        "http/protobuf" => OtlpProtocol::HttpProtobuf,
        "http/json" => OtlpProtocol::HttpJson,
        _ => {
            return Err(OtlpError::Setting {
                name,
                value,
                problem: "expected grpc, http/protobuf or http/json",
            })
        }
    };
    let endpoint = match (&signal, &general, flag) {
        (None, None, Some(flag)) => Some(match protocol {
            OtlpProtocol::Grpc => flag.to_string(),
            _ => traces_url(flag),
        }),
        _ => None,
    };
    let used = signal.as_deref().or(general.as_deref()).or(flag);
    let tls = used.is_some_and(|e| e.trim().to_ascii_lowercase().starts_with("https://"));
    let named = get("OTEL_SERVICE_NAME").is_some()
        || get("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
            attrs
                .split(',')
                .any(|pair| pair.split('=').next().map(str::trim) == Some("service.name"))
        });
    let service_name = (!named).then(|| {
        fallbacks
            .service_name
            .filter(|n| !n.trim().is_empty())
            .unwrap_or(DEFAULT_SERVICE_NAME)
            .to_string()
    });
    Ok(Some(ExportPlan {
        protocol,
        endpoint,
        tls,
        service_name,
    }))
}

/// The span export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("{name}={value}: {problem}")]
    Setting {
        name: &'static str,
        value: String,
        problem: &'static str,
    },
    #[error("cannot build the OTLP span exporter ({protocol:?})")]
    Build {
        protocol: OtlpProtocol,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("cannot start the OTLP exporter's thread")]
    Runtime(#[source] std::io::Error),
}

/// Keeps the span exporter running; dropped at exit, it sends what is buffered.
pub struct TraceExport {
    pub(super) provider: opentelemetry_sdk::trace::SdkTracerProvider,
    /// gRPC's connection lives on a runtime of its own: the SDK's batch
    /// thread drives exports without one, and the worker's runtime may be
    /// shutting down when the last spans are sent.
    pub(super) runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for TraceExport {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "spans not exported at exit");
        }
        if let Some(rt) = self.runtime.take() {
            // Dropping a runtime may not block inside another one.
            rt.shutdown_background();
        }
    }
}

/// Where OTLP/HTTP wants the spans: the base endpoint (as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is specified) plus `/v1/traces`.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn plan_with(
        vars: &[(&str, &str)],
        fallbacks: Fallbacks,
    ) -> Result<Option<ExportPlan>, OtlpError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        plan(|name| vars.get(name).cloned(), fallbacks)
    }

    fn on(vars: &[(&str, &str)]) -> ExportPlan {
        plan_with(vars, Fallbacks::default())
            .unwrap()
            .expect("exports")
    }

    #[test]
    fn nothing_is_exported_unless_asked() {
        assert_eq!(plan_with(&[], Fallbacks::default()).unwrap(), None);
        // Set but empty counts as unset.
        assert_eq!(
            plan_with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")], Fallbacks::default()).unwrap(),
            None
        );
        // A sampler or headers alone do not turn export on.
        assert_eq!(
            plan_with(
                &[
                    ("OTEL_TRACES_SAMPLER", "always_on"),
                    ("OTEL_EXPORTER_OTLP_HEADERS", "a=b")
                ],
                Fallbacks::default()
            )
            .unwrap(),
            None
        );
    }

    #[test]
    fn the_standard_switches_turn_export_off_whatever_else_is_set() {
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_SDK_DISABLED", "TRUE"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let got = plan_with(
                &[off, ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")],
                Fallbacks {
                    endpoint: Some("http://flag:4318"),
                    service_name: None,
                },
            )
            .unwrap();
            assert_eq!(got, None, "{off:?}");
        }
        // "false" is not a switch.
        assert!(on(&[
            ("OTEL_SDK_DISABLED", "false"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")
        ])
        .endpoint
        .is_none());
    }

    #[test]
    fn an_explicit_otlp_exporter_exports_to_the_protocols_default_endpoint() {
        let p = on(&[("OTEL_TRACES_EXPORTER", "otlp")]);
        assert_eq!(p.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(p.endpoint, None, "the SDK's default (localhost:4318)");
    }

    #[test]
    fn the_protocol_is_read_per_signal_first() {
        let p = on(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
        ]);
        assert_eq!(p.protocol, OtlpProtocol::Grpc);
        let p = on(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ]);
        assert_eq!(p.protocol, OtlpProtocol::HttpJson);
    }

    #[test]
    fn unknown_or_unsupported_values_are_refused_by_name() {
        let err = |vars: &[(&str, &str)]| match plan_with(vars, Fallbacks::default()) {
            Err(e) => e.to_string(),
            Ok(p) => panic!("accepted {vars:?}: {p:?}"),
        };
        let e = err(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/thrift"),
        ]);
        assert!(
            e.starts_with("OTEL_EXPORTER_OTLP_PROTOCOL=http/thrift"),
            "{e}"
        );
        let e = err(&[("OTEL_TRACES_EXPORTER", "zipkin")]);
        assert!(e.starts_with("OTEL_TRACES_EXPORTER=zipkin"), "{e}");
        let e = err(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/ca.pem"),
        ]);
        assert!(e.starts_with("OTEL_EXPORTER_OTLP_CERTIFICATE"), "{e}");
        assert!(!e.contains("/etc/ca.pem"));
    }

    #[test]
    fn the_flags_fill_in_only_what_the_variables_leave_unset() {
        let flags = Fallbacks {
            endpoint: Some("http://flag:4318/"),
            service_name: Some("worker-eu"),
        };
        // Nothing set: the flags are used, completed as the SDK would.
        let p = plan_with(&[], flags).unwrap().unwrap();
        assert_eq!(p.endpoint.as_deref(), Some("http://flag:4318/v1/traces"));
        assert_eq!(p.service_name.as_deref(), Some("worker-eu"));
        let p = plan_with(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")], flags)
            .unwrap()
            .unwrap();
        assert_eq!(
            p.endpoint.as_deref(),
            Some("http://flag:4318/"),
            "gRPC takes no path"
        );
        // Either standard endpoint wins over the flag: the SDK reads it.
        for var in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ] {
            let p = plan_with(&[(var, "https://c:4318")], flags)
                .unwrap()
                .unwrap();
            assert_eq!(p.endpoint, None, "{var}");
            assert!(p.tls, "{var}");
        }
        // The service's name from the variables wins over the flag.
        let p = plan_with(&[("OTEL_SERVICE_NAME", "svc")], flags)
            .unwrap()
            .unwrap();
        assert_eq!(p.service_name, None);
        let p = plan_with(
            &[(
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=prod, service.name=svc",
            )],
            flags,
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.service_name, None);
        // Other resource attributes leave the name to the flag, or the default.
        let p = plan_with(
            &[
                ("OTEL_RESOURCE_ATTRIBUTES", "service.namespace=auth"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ],
            Fallbacks::default(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.service_name.as_deref(), Some(DEFAULT_SERVICE_NAME));
        assert!(!p.tls);
    }

    #[test]
    fn traces_url_appends_the_signal_path_once() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }
}
