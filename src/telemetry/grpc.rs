//! One server span and one metrics sample per gRPC call, as a tower layer around every service
//! the gRPC server hosts (`Server::builder().layer(GrpcTelemetryLayer)`).
//!
//! The span follows the OpenTelemetry RPC conventions (`rpc.system`, `rpc.service`,
//! `rpc.method`, `rpc.grpc.status_code`) and continues the caller's trace when the call carries
//! `traceparent` metadata. It records nothing from the request or its metadata beyond the method
//! name, so no token can reach an attribute.

use super::extract_context;
use crate::metrics;
use opentelemetry::context::FutureExt as _;
use opentelemetry::trace::TraceContextExt as _;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Instant;
use tonic::codegen::http;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of each call's server span; the log layer leaves these spans out (`install`).
pub const SPAN_TARGET: &str = "cis2_session_broker::rpc";

/// Wraps the gRPC server's services; see the module documentation.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTelemetryLayer;

impl<S> Layer<S> for GrpcTelemetryLayer {
    type Service = GrpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTelemetry { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcTelemetry<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, RB> Service<http::Request<B>> for GrpcTelemetry<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let (service, method) = rpc_name(request.uri().path());
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "grpc",
            otel.name = %format_args!("{service}/{method}"),
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            // Filled in by the caller check and the broker: one span per call carries them, so
            // the hot path pays for one span, not one per layer.
            caller = Empty,
            session_id = Empty,
            api = Empty,
        );
        // A malformed or missing traceparent yields an empty context: the call starts a trace.
        let caller_trace = request
            .headers()
            .contains_key(TRACEPARENT)
            .then(|| extract_context(request.headers()))
            .filter(|cx| cx.span().span_context().is_valid());
        if let Some(cx) = &caller_trace {
            let _ = span.set_parent(cx.clone());
        }
        // The clone that poll_ready did not prepare stays behind; the ready one serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = async move {
            // Entered while the inner layers build their futures, so the caller check can
            // record the caller on this span.
            let call = span.in_scope(|| inner.call(request));
            let result = call.instrument(span.clone()).await;
            let code = match &result {
                Ok(response) => status_of(response.headers()),
                Err(_) => UNKNOWN,
            };
            span.record("rpc.grpc.status_code", code);
            if is_server_fault(code) {
                span.record("otel.status_code", "ERROR");
            }
            metrics::rpc(service, method, code_name(code), started.elapsed());
            result
        };
        // When spans are not exported the span above is no OpenTelemetry span: the caller's
        // context is made current while the call runs, so upstream requests and log lines
        // still carry the caller's trace (`telemetry::propagation`, `telemetry::json`).
        match caller_trace {
            Some(cx) => Box::pin(call.with_context(cx)),
            None => Box::pin(call),
        }
    }
}

const TRACEPARENT: &str = "traceparent";

const UNKNOWN: i32 = 2;

/// The call's gRPC status. A failed unary call is answered "trailers-only": the status is in
/// the response headers. A successful one carries `grpc-status: 0` in the trailers, so no
/// status in the headers means OK.
fn status_of(headers: &http::HeaderMap) -> i32 {
    match headers.get("grpc-status") {
        None => 0,
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|v| v.parse::<i32>().ok())
            .filter(|code| (0..=16).contains(code))
            .unwrap_or(UNKNOWN),
    }
}

/// The codes the OpenTelemetry conventions count as a server span error; the rest are the
/// caller's problem and leave the span status unset.
fn is_server_fault(code: i32) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// The canonical name of a gRPC status code, as Prometheus labels conventionally spell it.
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// The method a request path names, when the server hosts it, else `"unknown"`: a name that
/// lives as long as the process, for the log context of a call (`telemetry::call`).
pub fn method_of(path: &str) -> &'static str {
    rpc_name(path).1
}

/// `(service, method)` for a request path, when it names a method the server hosts; any other
/// path is `("unknown", "unknown")`, so a caller cannot mint new metric series or span names.
fn rpc_name(path: &str) -> (&'static str, &'static str) {
    KNOWN_METHODS
        .get(path)
        .map(|(service, method)| (service.as_str(), method.as_str()))
        .unwrap_or(("unknown", "unknown"))
}

/// Every `/package.Service/Method` the gRPC server hosts, read from the same descriptor sets
/// that reflection serves, so a new RPC is known without a list to keep in step.
static KNOWN_METHODS: LazyLock<HashMap<String, (String, String)>> = LazyLock::new(|| {
    let sets: [&[u8]; 3] = [
        crate::grpc::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    ];
    let mut known = HashMap::new();
    for bytes in sets {
        for (service, method) in methods_in(bytes) {
            known.insert(format!("/{service}/{method}"), (service, method));
        }
    }
    known
});

/// `(package.Service, Method)` for every method in an encoded `FileDescriptorSet`.
fn methods_in(bytes: &[u8]) -> Vec<(String, String)> {
    use prost::Message as _;
    let Ok(set) = prost_types::FileDescriptorSet::decode(bytes) else {
        tracing::error!("a compiled-in descriptor set does not decode; its RPCs count as unknown");
        return Vec::new();
    };
    let mut out = Vec::new();
    for file in set.file {
        let package = file.package.unwrap_or_default();
        for service in file.service {
            let name = service.name.unwrap_or_default();
            let full = if package.is_empty() {
                name
            } else {
                format!("{package}.{name}")
            };
            for method in service.method {
                out.push((full.clone(), method.name.unwrap_or_default()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_hosted_methods_only() {
        let cases = [
            (
                "/session_broker.v1.SessionBroker/StartLogin",
                ("session_broker.v1.SessionBroker", "StartLogin"),
            ),
            (
                "/session_broker.v1.SessionBroker/GetCurrentAal",
                ("session_broker.v1.SessionBroker", "GetCurrentAal"),
            ),
            (
                "/grpc.health.v1.Health/Check",
                ("grpc.health.v1.Health", "Check"),
            ),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                (
                    "grpc.reflection.v1.ServerReflection",
                    "ServerReflectionInfo",
                ),
            ),
            (
                "/session_broker.v1.SessionBroker/Nope",
                ("unknown", "unknown"),
            ),
            ("/session_broker.v1.SessionBroker/", ("unknown", "unknown")),
            ("/x/StartLogin", ("unknown", "unknown")),
            ("/", ("unknown", "unknown")),
            ("", ("unknown", "unknown")),
        ];
        for (path, want) in cases {
            assert_eq!(rpc_name(path), want, "path {path:?}");
        }
    }

    #[test]
    fn statuses_come_from_the_headers_or_mean_ok() {
        let cases = [
            (None, 0),
            (Some("0"), 0),
            (Some("5"), 5),
            (Some("16"), 16),
            (Some("17"), UNKNOWN),
            (Some("-1"), UNKNOWN),
            (Some("x"), UNKNOWN),
            (Some(""), UNKNOWN),
        ];
        for (value, want) in cases {
            let mut headers = http::HeaderMap::new();
            if let Some(v) = value {
                headers.insert(
                    "grpc-status",
                    http::HeaderValue::from_str(v).expect("test values are valid headers"),
                );
            }
            assert_eq!(status_of(&headers), want, "grpc-status {value:?}");
        }
    }

    #[test]
    fn codes_have_names_and_only_server_faults_are_errors() {
        let cases = [
            (0, "OK", false),
            (3, "INVALID_ARGUMENT", false),
            (5, "NOT_FOUND", false),
            (7, "PERMISSION_DENIED", false),
            (9, "FAILED_PRECONDITION", false),
            (16, "UNAUTHENTICATED", false),
            (2, "UNKNOWN", true),
            (4, "DEADLINE_EXCEEDED", true),
            (12, "UNIMPLEMENTED", true),
            (13, "INTERNAL", true),
            (14, "UNAVAILABLE", true),
            (15, "DATA_LOSS", true),
            (99, "UNKNOWN", false),
        ];
        for (code, name, fault) in cases {
            assert_eq!(code_name(code), name, "code {code}");
            assert_eq!(is_server_fault(code), fault, "code {code}");
        }
    }
}
