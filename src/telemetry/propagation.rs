//! W3C Trace Context (`traceparent`, `tracestate`) on HTTP headers and gRPC metadata (which
//! travels as HTTP/2 headers). The propagator is fixed rather than global, so propagation works
//! the same in every binary and test whatever else was installed.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Adds the current span's `traceparent` (and `tracestate`) to an outbound request, so the
/// upstream's work joins the caller's trace. Every HTTP client of the broker calls this (or
/// [`inject_span_context`]) before sending. Nothing is added outside a traced span.
pub fn inject_context(headers: &mut HeaderMap) {
    inject_span_context(&tracing::Span::current(), headers);
}

/// [`inject_context`] for a given span, e.g. the client span of the request being sent. When
/// spans are not exported the span has no OpenTelemetry context, and the caller's context that
/// `telemetry::grpc` attached to the call is passed on instead.
pub fn inject_span_context(span: &tracing::Span, headers: &mut HeaderMap) {
    let cx = span.context();
    let cx = if cx.span().span_context().is_valid() {
        cx
    } else {
        opentelemetry::Context::current()
    };
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// The remote parent named by incoming `traceparent`/`tracestate` headers; an empty context
/// (a new trace) when they are missing or malformed.
pub fn extract_context(headers: &HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator only writes its own well-formed names and values; skip anything else.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn extracts_a_valid_traceparent_and_ignores_bad_ones() {
        const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        type Pairs = &'static [(&'static str, &'static str)];
        let cases: [(Pairs, Option<&str>); 6] = [
            (
                &[("traceparent", GOOD)],
                Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            ),
            (
                &[("traceparent", GOOD), ("tracestate", "vendor=x")],
                Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            ),
            (&[], None),
            (&[("traceparent", "garbage")], None),
            (
                &[(
                    "traceparent",
                    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                )],
                None,
            ),
            (
                &[(
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                )],
                None,
            ),
        ];
        for (pairs, want) in cases {
            let cx = extract_context(&headers(pairs));
            let sc = cx.span().span_context().clone();
            let got = sc.is_valid().then(|| sc.trace_id().to_string());
            assert_eq!(got.as_deref(), want, "{pairs:?}");
            if want.is_some() {
                assert!(sc.is_remote());
            }
        }
    }

    #[test]
    fn an_extracted_context_injects_back_unchanged() {
        let incoming = headers(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("tracestate", "vendor=opaque"),
        ]);
        let cx = extract_context(&incoming);
        let mut outgoing = HeaderMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut outgoing));
        assert_eq!(outgoing.get("traceparent"), incoming.get("traceparent"));
        assert_eq!(outgoing.get("tracestate"), incoming.get("tracestate"));
    }

    #[test]
    fn nothing_is_injected_outside_a_trace() {
        let mut outgoing = HeaderMap::new();
        inject_context(&mut outgoing);
        assert!(outgoing.is_empty());
    }
}
