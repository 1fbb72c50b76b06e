//! Logs and OpenTelemetry traces.
//!
//! - Logs: level from `RUST_LOG` (default `info`); JSON lines in production, each carrying the
//!   `caller`, `rpc`, `trace_id` and `span_id` of the call it belongs to; text in dev mode. Log
//!   lines carry fields, never secrets: secrets are `Secret`s and print `[redacted]`.
//! - Traces: the `tracing` spans of this crate become OpenTelemetry spans when they are exported
//!   over OTLP/gRPC, that is when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set;
//!   the other standard variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//!   `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, `OTEL_EXPORTER_OTLP_HEADERS`,
//!   `..._TIMEOUT`, `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER=none`) apply as the specification
//!   says. Without an exporter no OpenTelemetry span is made (building them cost a third of the
//!   hot path's CPU, docs/benchmarks.md), and the broker passes a caller's trace context through
//!   as the specification's no-op tracer does: CIS2 and APIM receive the caller's `traceparent`,
//!   and log lines carry the caller's trace and span ids.
//! - [`grpc`]: the tower layer giving each RPC its server span and its metrics.
//! - [`call`]: the caller and RPC of the call being served, for log lines.
//! - [`inject_context`] / [`extract_context`]: W3C `traceparent`/`tracestate` on HTTP headers.

pub mod call;
pub mod grpc;
mod json;
mod propagation;
mod text;

pub use propagation::{extract_context, inject_context, inject_span_context};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::io::IsTerminal as _;
use tracing::{Level, Subscriber};
use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// The git revision the binary was built from ("unknown" when built without git).
pub const GIT_REVISION: &str = env!("SESSION_BROKER_GIT_REVISION");

/// What `session-broker --version` prints after the name.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("SESSION_BROKER_GIT_REVISION"),
    ")"
);

/// The service name in traces unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` says
/// otherwise.
pub const DEFAULT_SERVICE_NAME: &str = "session-broker";

/// The name this crate's tracer reports as its instrumentation scope.
const SCOPE: &str = "cis2-session-broker";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// The installed trace pipeline. Call [`Telemetry::shutdown`] once the servers have stopped, so
/// the last spans are exported before the process exits.
#[must_use = "dropping it without shutdown() may lose the last spans"]
pub struct Telemetry {
    /// `None` when nothing is exported.
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports every buffered span and stops the exporter. It blocks on the exporter, so it runs
    /// on a blocking thread.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        let flushed = tokio::task::spawn_blocking(move || {
            let _ = provider.force_flush();
            provider.shutdown()
        })
        .await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "trace exporter did not shut down cleanly"),
            Err(error) => tracing::warn!(%error, "trace exporter shutdown panicked"),
        }
    }
}

/// Logging and tracing from the environment. Must run inside the Tokio runtime: the OTLP
/// exporter's gRPC channel belongs to it.
pub fn init(format: LogFormat) -> Telemetry {
    let env = |name: &str| std::env::var(name).ok();
    let (provider, problem) = provider_from_env(exporter_wanted(env));
    let telemetry = install(format, provider);
    if let Some(problem) = problem {
        tracing::warn!(error = %problem, "traces are not exported");
    }
    telemetry
}

/// Installs logging and tracing with a tracer provider of the caller's: [`init`] passes one
/// built from the environment when spans are exported, none otherwise; tests pass one with an
/// in-memory exporter. When a global subscriber is already installed (a second call in one test
/// binary), that one stays.
pub fn install(format: LogFormat, provider: Option<SdkTracerProvider>) -> Telemetry {
    let _ = dispatch(format, provider.as_ref()).try_init();
    Telemetry { provider }
}

/// The logs, and the traces when `provider` exports them.
fn dispatch(format: LogFormat, provider: Option<&SdkTracerProvider>) -> tracing::Dispatch {
    // Spans are traced at `info` from this crate whatever RUST_LOG says: RUST_LOG picks which
    // lines are logged, not which calls can be followed across services. Source locations,
    // thread names and busy/idle times would be attributes on every span, read by nobody.
    let traces = provider.map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(SCOPE))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target("cis2_session_broker", Level::INFO))
    });
    // Not `.with(Option<layer>)`: a `None` layer enables every span at the log level, and the
    // registry would then build each call's server span although no layer wants it.
    let registry = tracing_subscriber::registry();
    match traces {
        Some(traces) => registry.with(traces).with(stdout_logs(format)).into(),
        None => registry.with(stdout_logs(format)).into(),
    }
}

/// Log lines on standard output, at the level `RUST_LOG` names (default `info`).
fn stdout_logs<S>(format: LogFormat) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let level = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The log layer leaves out each call's server span: it would format that span's fields into
    // a string on every call (the hot path's single largest cost after the sockets) for the few
    // calls that log anything. Lines logged in a call still carry its trace and span ids.
    let hint = level.max_level_hint();
    let filter = level.and(
        filter_fn(|meta| !(meta.is_span() && meta.target() == grpc::SPAN_TARGET))
            // Without a hint the pair would have none, and every `trace!` and `trace_span!` of
            // every dependency would be asked about at run time instead of compiled out.
            .with_max_level_hint(hint.unwrap_or(LevelFilter::TRACE)),
    );
    let colours = format == LogFormat::Text && std::io::stdout().is_terminal();
    log_layer(format, std::io::stdout, colours).with_filter(filter)
}

/// The log layer [`install`] uses, unfiltered, writing to `writer` (tests read its lines).
/// `colours`: ANSI colours in text lines.
pub fn log_layer<S, W>(
    format: LogFormat,
    writer: W,
    colours: bool,
) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .event_format(json::JsonWithTraceIds::new())
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .event_format(text::TextWithCall::new())
            .with_ansi(colours)
            .with_writer(writer)
            .boxed(),
    }
}

/// The provider [`init`] uses (none when nothing is to be exported), and why it exports
/// nothing when it was asked to.
fn provider_from_env(export: bool) -> (Option<SdkTracerProvider>, Option<String>) {
    if !export {
        return (None, None);
    }
    match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(exporter) => {
            let provider = SdkTracerProvider::builder()
                .with_resource(resource())
                .with_batch_exporter(exporter)
                .build();
            (Some(provider), None)
        }
        Err(error) => (None, Some(error.to_string())),
    }
}

/// Whether to export spans, from the standard variables: an OTLP endpoint is set, the SDK is not
/// disabled, and `OTEL_TRACES_EXPORTER` (if set) asks for `otlp`.
fn exporter_wanted(env: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| env(name).is_some_and(|v| !v.trim().is_empty());
    let endpoint = set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let exporter_ok = env("OTEL_TRACES_EXPORTER")
        .is_none_or(|v| v.split(',').any(|e| e.trim().eq_ignore_ascii_case("otlp")));
    endpoint && !disabled && exporter_ok
}

/// `service.name` (from the environment, else [`DEFAULT_SERVICE_NAME`]), `service.version`,
/// the git revision, and whatever `OTEL_RESOURCE_ATTRIBUTES` adds.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::new("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let mut builder = Resource::builder().with_attributes([
        opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        opentelemetry::KeyValue::new("vcs.ref.head.revision", GIT_REVISION),
    ]);
    if !named {
        builder = builder.with_service_name(DEFAULT_SERVICE_NAME);
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn a_calls_server_span_is_built_only_when_traces_are_exported() {
        let server_span = || tracing::info_span!(target: grpc::SPAN_TARGET, "grpc");
        let exported = SdkTracerProvider::builder().build();
        for format in [LogFormat::Json, LogFormat::Text] {
            tracing::dispatcher::with_default(&dispatch(format, None), || {
                assert!(server_span().is_disabled(), "{format:?}, no exporter");
                // Spans of this crate that log lines show are still made.
                assert!(!tracing::info_span!("start_login").is_disabled());
            });
            tracing::dispatcher::with_default(&dispatch(format, Some(&exported)), || {
                assert!(!server_span().is_disabled(), "{format:?}, exported");
            });
        }
    }

    #[test]
    fn exports_only_when_an_endpoint_is_set_and_nothing_turns_it_off() {
        let cases: [(&[(&str, &str)], bool); 10] = [
            (&[], false),
            (
                &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")],
                true,
            ),
            (
                &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:4317")],
                true,
            ),
            (&[("OTEL_EXPORTER_OTLP_ENDPOINT", "  ")], false),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_SDK_DISABLED", "TRUE"),
                ],
                false,
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_SDK_DISABLED", "false"),
                ],
                true,
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_TRACES_EXPORTER", "none"),
                ],
                false,
            ),
            (
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                    ("OTEL_TRACES_EXPORTER", "console, otlp"),
                ],
                true,
            ),
            (&[("OTEL_TRACES_EXPORTER", "otlp")], false),
            (&[("OTEL_SERVICE_NAME", "x")], false),
        ];
        for (vars, want) in cases {
            let map: HashMap<&str, &str> = vars.iter().copied().collect();
            let got = exporter_wanted(|name| map.get(name).map(|v| (*v).to_owned()));
            assert_eq!(got, want, "{vars:?}");
        }
    }

    #[test]
    fn the_version_names_the_package_and_the_revision() {
        assert!(VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(VERSION.contains(GIT_REVISION));
        assert!(!GIT_REVISION.is_empty());
    }

    #[test]
    fn the_resource_names_the_service_and_its_version() {
        let resource = resource();
        let get = |key: &'static str| {
            resource
                .get(&opentelemetry::Key::new(key))
                .map(|v| v.as_str().into_owned())
        };
        // The test environment sets no OTEL_SERVICE_NAME: the default applies.
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            assert_eq!(get("service.name").as_deref(), Some(DEFAULT_SERVICE_NAME));
        }
        assert_eq!(
            get("service.version").as_deref(),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(get("vcs.ref.head.revision").as_deref(), Some(GIT_REVISION));
    }
}
