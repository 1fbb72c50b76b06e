//! Traces and metrics end to end: a calling client's trace continues through the broker's RPC
//! spans to its CIS2 and APIM calls and into the CIS2 simulator, and `/metrics` counts what
//! happened.

mod common;

use cis2_session_broker::config::Pattern;
use cis2_session_broker::grpc::pb;
use cis2_session_broker::telemetry::{self, LogFormat, Telemetry};
use common::*;
use opentelemetry::trace::{SpanId, SpanKind, TraceId};
use opentelemetry::{Key, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use std::sync::OnceLock;
use std::time::Duration;
use tonic::Code;

/// Every span this test binary ends, exported in memory as it ends.
fn exporter() -> &'static InMemorySpanExporter {
    static TRACES: OnceLock<(InMemorySpanExporter, Telemetry)> = OnceLock::new();
    &TRACES
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            (
                exporter.clone(),
                telemetry::install(LogFormat::Text, Some(provider)),
            )
        })
        .0
}

fn random_trace() -> (TraceId, SpanId) {
    // Never zero: an all-zero id is invalid and would start a new trace.
    (
        TraceId::from(rand::random::<u128>() | 1),
        SpanId::from(rand::random::<u64>() | 1),
    )
}

fn traceparent(trace: TraceId, parent: SpanId) -> String {
    format!("00-{trace}-{parent}-01")
}

fn with_traceparent<T>(message: T, trace: TraceId, parent: SpanId) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        traceparent(trace, parent)
            .parse()
            .expect("a traceparent is valid metadata"),
    );
    request
}

fn spans_of(trace: TraceId) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .expect("the in-memory exporter answers")
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect()
}

/// Waits (bounded) until a span named `name` of `trace` has ended, and returns it.
async fn ended_span(trace: TraceId, name: &str) -> SpanData {
    for _ in 0..200 {
        if let Some(span) = spans_of(trace).into_iter().find(|s| s.name == name) {
            return span;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no span {name:?} in trace {trace}");
}

fn attr(span: &SpanData, key: &'static str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == Key::from_static_str(key))
        .map(|kv| kv.value.clone())
}

fn attr_str(span: &SpanData, key: &'static str) -> Option<String> {
    attr(span, key).map(|v| v.as_str().into_owned())
}

/// Whether `span`'s chain of parents within `spans` reaches `ancestor`.
fn descends_from(span: &SpanData, ancestor: SpanId, spans: &[SpanData]) -> bool {
    let mut parent = span.parent_span_id;
    for _ in 0..spans.len() {
        if parent == ancestor {
            return true;
        }
        match spans.iter().find(|s| s.span_context.span_id() == parent) {
            Some(next) => parent = next.parent_span_id,
            None => return false,
        }
    }
    false
}

#[tokio::test]
async fn a_callers_trace_continues_through_the_broker_into_cis2_and_apim() {
    exporter();
    let h = Harness::start_with(Options {
        store: Store::Memory,
        apim: Some(Pattern::Separate),
        ..Options::default()
    })
    .await;
    let (trace, start_parent) = random_trace();
    let (_, exchange_parent) = random_trace();
    let (_, token_parent) = random_trace();

    let started = h
        .client
        .clone()
        .start_login(with_traceparent(
            Harness::login_request(pb::Aal::Aal2),
            trace,
            start_parent,
        ))
        .await
        .expect("StartLogin")
        .into_inner();
    let cb = h
        .authorize(&started.authorization_url, PASSKEY_ONLY, None)
        .await;
    let exchanged = h
        .client
        .clone()
        .exchange_code(with_traceparent(cb.request(), trace, exchange_parent))
        .await
        .expect("ExchangeCode")
        .into_inner();

    let start = ended_span(trace, "session_broker.v1.SessionBroker/StartLogin").await;
    assert_eq!(start.parent_span_id, start_parent);
    let server = ended_span(trace, "session_broker.v1.SessionBroker/ExchangeCode").await;
    assert_eq!(server.parent_span_id, exchange_parent);
    assert!(server.parent_span_is_remote);
    assert_eq!(server.span_kind, SpanKind::Server);
    assert_eq!(attr_str(&server, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(
        attr_str(&server, "rpc.service").as_deref(),
        Some("session_broker.v1.SessionBroker")
    );
    assert_eq!(
        attr_str(&server, "rpc.method").as_deref(),
        Some("ExchangeCode")
    );
    assert_eq!(attr(&server, "rpc.grpc.status_code"), Some(Value::I64(0)));

    // The code redemption is a client span under the RPC, and CIS2 got its traceparent.
    let token_call = ended_span(trace, "POST CIS2 token endpoint").await;
    let spans = spans_of(trace);
    assert_eq!(token_call.span_kind, SpanKind::Client);
    assert!(descends_from(
        &token_call,
        server.span_context.span_id(),
        &spans
    ));
    assert_eq!(
        attr(&token_call, "http.response.status_code"),
        Some(Value::I64(200))
    );
    assert_eq!(attr_str(&token_call, "upstream").as_deref(), Some("cis2"));
    let seen = h.sim.received_traceparents();
    let sent = traceparent(trace, token_call.span_context.span_id());
    assert!(
        seen.iter()
            .any(|(path, tp)| path.ends_with("/access_token") && tp.as_deref() == Some(&sent)),
        "the simulator's token endpoint did not receive {sent}: {seen:?}"
    );

    // The PDS token: the APIM exchange is part of the same trace, under one of the RPCs.
    let pds = h
        .client
        .clone()
        .get_pds_token(with_traceparent(
            pb::GetPdsTokenRequest {
                session_token: exchanged.session_token.clone(),
                ..Default::default()
            },
            trace,
            token_parent,
        ))
        .await
        .expect("GetPdsToken")
        .into_inner();
    let token_rpc = ended_span(trace, "session_broker.v1.SessionBroker/GetPdsToken").await;
    assert_eq!(token_rpc.parent_span_id, token_parent);
    let rpcs = [
        start.span_context.span_id(),
        server.span_context.span_id(),
        token_rpc.span_context.span_id(),
    ];
    let mut apim_calls = 0;
    for _ in 0..200 {
        apim_calls = spans_of(trace)
            .iter()
            .filter(|s| attr_str(s, "upstream").as_deref() == Some("apim"))
            .count();
        if apim_calls > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(apim_calls > 0, "no APIM span in the trace");
    let spans = spans_of(trace);

    // Every outbound call in the trace sits under one of the RPCs.
    for span in spans.iter().filter(|s| attr(s, "upstream").is_some()) {
        assert!(
            rpcs.iter().any(|rpc| descends_from(span, *rpc, &spans)),
            "upstream span {:?} is outside the RPCs",
            span.name
        );
    }

    // No attribute or event of the trace carries a secret.
    let secrets = [
        exchanged.session_token.as_str(),
        pds.access_token.as_str(),
        cb.code.as_str(),
        cb.state.as_str(),
        CLIENT_SECRET,
        APIM_SECRET,
    ];
    for span in &spans {
        let mut text = format!("{}", span.name);
        for kv in &span.attributes {
            text.push_str(&format!(" {}={}", kv.key, kv.value));
        }
        for event in span.events.iter() {
            text.push_str(&format!(" {}", event.name));
            for kv in &event.attributes {
                text.push_str(&format!(" {}={}", kv.key, kv.value));
            }
        }
        for secret in secrets {
            assert!(
                !text.contains(secret),
                "span {:?} carries a secret",
                span.name
            );
        }
    }
    h.stop().await;
}

#[tokio::test]
async fn a_call_without_traceparent_starts_its_own_trace_and_failures_are_recorded() {
    exporter();
    let h = Harness::start_with(Options {
        store: Store::Memory,
        ..Options::default()
    })
    .await;
    let before: Vec<SpanId> = exporter()
        .get_finished_spans()
        .expect("exporter answers")
        .iter()
        .map(|s| s.span_context.span_id())
        .collect();
    // Only this test calls CheckAccess: its span is the new one with that name.
    let err = h
        .client
        .clone()
        .check_access(pb::CheckAccessRequest {
            session_token: "cis2sb_not-a-session".into(),
            api: "pds".into(),
        })
        .await
        .expect_err("an unknown session is refused");
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut found = None;
    for _ in 0..200 {
        found = exporter()
            .get_finished_spans()
            .expect("exporter answers")
            .into_iter()
            .find(|s| {
                s.name == "session_broker.v1.SessionBroker/CheckAccess"
                    && !before.contains(&s.span_context.span_id())
            });
        if found.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let span = found.expect("a CheckAccess span ended");
    assert_eq!(span.parent_span_id, SpanId::INVALID);
    assert!(span.span_context.trace_id() != TraceId::INVALID);
    assert_eq!(attr(&span, "rpc.grpc.status_code"), Some(Value::I64(16)));
    // UNAUTHENTICATED is the caller's problem: the server span is not an error.
    assert_eq!(span.status, opentelemetry::trace::Status::Unset);
    h.stop().await;
}

async fn scrape(h: &Harness) -> (String, String) {
    let resp = reqwest::get(format!("http://{}/metrics", h.http_addr))
        .await
        .expect("metrics answer");
    assert_eq!(resp.status(), 200);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (content_type, resp.text().await.expect("metrics text"))
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(series) && line[series.len()..].starts_with(' '))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_calls_codes_and_upstream_requests() {
    exporter();
    let h = Harness::start_with(Options {
        store: Store::Memory,
        ..Options::default()
    })
    .await;
    let ok = r#"session_broker_grpc_requests_total{service="session_broker.v1.SessionBroker",method="ExchangeCode",code="OK"}"#;
    let stale = r#"session_broker_grpc_requests_total{service="session_broker.v1.SessionBroker",method="ExchangeCode",code="FAILED_PRECONDITION"}"#;
    let token = r#"session_broker_upstream_requests_total{upstream="cis2",endpoint="token endpoint",status="2xx"}"#;
    let (_, before) = scrape(&h).await;

    let started = h
        .start_login(Harness::login_request(pb::Aal::Aal3))
        .await
        .expect("started");
    let cb = h
        .authorize(&started.authorization_url, SMARTCARD_ONLY, None)
        .await;
    h.exchange(&cb).await.expect("signed in");
    let replay = h.exchange(&cb).await.expect_err("a state works once");
    assert_eq!(replay.code(), Code::FailedPrecondition);

    let (content_type, after) = scrape(&h).await;
    assert!(content_type.starts_with("application/openmetrics-text"));
    assert!(value(&after, ok) - value(&before, ok) >= 1.0, "{after}");
    assert!(
        value(&after, stale) - value(&before, stale) >= 1.0,
        "{after}"
    );
    assert!(
        value(&after, token) - value(&before, token) >= 1.0,
        "{after}"
    );
    let latency = r#"session_broker_grpc_request_duration_seconds_count{service="session_broker.v1.SessionBroker",method="ExchangeCode",code="OK"}"#;
    assert!(value(&after, latency) >= 1.0, "{after}");
    assert!(after.trim_end().ends_with("# EOF"));
    // Nothing about the user or the session is in a label.
    assert!(!after.contains(SMARTCARD_ONLY));
    h.stop().await;
}

#[tokio::test]
async fn metrics_count_apim_exchanges_and_their_requests() {
    exporter();
    let h = Harness::start_with(Options {
        store: Store::Memory,
        apim: Some(Pattern::Separate),
        ..Options::default()
    })
    .await;
    let exchanged = r#"session_broker_token_exchanges_total{outcome="success"}"#;
    let request = r#"session_broker_upstream_requests_total{upstream="apim",endpoint="token endpoint",status="2xx"}"#;
    let latency = r#"session_broker_upstream_request_duration_seconds_count{upstream="apim",endpoint="token endpoint"}"#;
    let (_, before) = scrape(&h).await;

    let signed_in = h
        .sign_in(pb::Aal::Aal2, PASSKEY_ONLY, None)
        .await
        .expect("signed in");
    for _ in 0..2 {
        h.client
            .clone()
            .get_pds_token(pb::GetPdsTokenRequest {
                session_token: signed_in.session_token.clone(),
                ..Default::default()
            })
            .await
            .expect("GetPdsToken");
    }

    // Tests in this binary run concurrently: at least this test's one exchange is counted.
    let (_, after) = scrape(&h).await;
    for series in [exchanged, request, latency] {
        assert!(
            value(&after, series) - value(&before, series) >= 1.0,
            "{series} did not count: {after}"
        );
    }
    h.stop().await;
}
