//! Prometheus metrics, served as text at `GET /metrics` on the HTTP port.
//!
//! One process-wide registry: the code that sees an event calls a free function here
//! (`metrics::sign_in(..)`, `metrics::token_cache(hit)`, ...), so nothing has to thread a handle
//! through the use cases. Every label value comes from a closed set chosen in this file or from
//! a `&'static str` in the code: nothing a caller or an upstream sends can grow the number of
//! series, and no label ever carries a user, a session or a token.
//!
//! | metric | labels |
//! |---|---|
//! | `session_broker_grpc_requests_total` | `service`, `method`, `code` |
//! | `session_broker_grpc_request_duration_seconds` | `service`, `method`, `code` |
//! | `session_broker_sign_ins_total` | `aal`, `authenticator` |
//! | `session_broker_step_ups_total` | `stage` (`started`, `succeeded`, `failed`) |
//! | `session_broker_token_exchanges_total` | `outcome` |
//! | `session_broker_token_refreshes_total` | `outcome` |
//! | `session_broker_token_cache_total` | `result` (`hit`, `miss`) |
//! | `session_broker_single_flight_waits_total` | |
//! | `session_broker_backchannel_logouts_total` | `outcome` |
//! | `session_broker_redis_errors_total` | |
//! | `session_broker_redis_command_duration_seconds` | `op` |
//! | `session_broker_upstream_requests_total` | `upstream`, `endpoint`, `status` (`2xx`..`5xx`, `error`) |
//! | `session_broker_upstream_request_duration_seconds` | `upstream`, `endpoint` |

use crate::aal::Aal;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::LazyLock;
use std::time::Duration;

/// The `Content-Type` of [`render`]'s text (OpenMetrics, which Prometheus scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How a step-up went: counted when it starts and again when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepUp {
    Started,
    Succeeded,
    Failed,
}

/// How an exchange with a dependency, or a request to the broker, ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The other side said no (an invalid token, `invalid_grant`, a 4xx): retrying will not help.
    Rejected,
    /// A dependency was down, slow or broken: a retry may work.
    Unavailable,
}

/// The services the broker calls over HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    Cis2,
    Apim,
}

/// Counts one gRPC call and its latency. Called by the gRPC layer in `telemetry::grpc`.
pub fn rpc(service: &'static str, method: &'static str, code: &'static str, latency: Duration) {
    let labels = RpcLabels {
        service,
        method,
        code,
    };
    let m = &*METRICS;
    m.rpc_requests.get_or_create(&labels).inc();
    m.rpc_duration
        .get_or_create(&labels)
        .observe(latency.as_secs_f64());
}

/// A completed sign-in (a new session, or a step-up that raised one), by the AAL achieved and
/// the authenticator's display label (`aal::authenticator_label`). Labels outside the known set
/// count as `other`.
pub fn sign_in(aal: Aal, authenticator: &str) {
    let labels = SignInLabels {
        aal: aal_label(aal),
        authenticator: authenticator_bucket(authenticator),
    };
    METRICS.sign_ins.get_or_create(&labels).inc();
}

pub fn step_up(stage: StepUp) {
    let stage = match stage {
        StepUp::Started => "started",
        StepUp::Succeeded => "succeeded",
        StepUp::Failed => "failed",
    };
    METRICS.step_ups.get_or_create(&[("stage", stage)]).inc();
}

/// An APIM token exchange (RFC 8693) and how it ended.
pub fn token_exchange(outcome: Outcome) {
    outcome_counter(&METRICS.token_exchanges, outcome);
}

/// An APIM refresh-token grant and how it ended.
pub fn token_refresh(outcome: Outcome) {
    outcome_counter(&METRICS.token_refreshes, outcome);
}

/// A token request answered from the cache (`hit`) or needing APIM (`miss`).
pub fn token_cache(hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    METRICS
        .token_cache
        .get_or_create(&[("result", result)])
        .inc();
}

/// A caller that waited for another replica's or task's refresh instead of starting its own.
pub fn single_flight_wait() {
    METRICS.single_flight_waits.inc();
}

/// A back-channel logout POST from CIS2 and how it ended.
pub fn backchannel_logout(outcome: Outcome) {
    outcome_counter(&METRICS.backchannel_logouts, outcome);
}

/// A session store operation that failed (Redis down, timed out, or answered nonsense).
pub fn redis_error() {
    METRICS.redis_errors.inc();
}

/// The latency of one session store operation; `op` is a fixed name such as `"get_session"`.
pub fn redis_call(op: &'static str, latency: Duration) {
    METRICS
        .redis_duration
        .get_or_create(&[("op", op)])
        .observe(latency.as_secs_f64());
}

/// One outbound HTTP exchange: `status` is the HTTP status, or `None` when no answer came
/// (connection refused, timeout, oversized body). `endpoint` is a fixed name such as
/// `"token endpoint"`.
pub fn upstream(
    upstream: Upstream,
    endpoint: &'static str,
    status: Option<u16>,
    latency: Duration,
) {
    let upstream = match upstream {
        Upstream::Cis2 => "cis2",
        Upstream::Apim => "apim",
    };
    let m = &*METRICS;
    m.upstream_requests
        .get_or_create(&UpstreamLabels {
            upstream,
            endpoint,
            status: status_class(status),
        })
        .inc();
    m.upstream_duration
        .get_or_create(&[("upstream", upstream), ("endpoint", endpoint)])
        .observe(latency.as_secs_f64());
}

/// Every metric in the text exposition format.
pub fn render() -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an Err could only come from a broken metric encoder.
    if let Err(error) = prometheus_client::encoding::text::encode(&mut out, &METRICS.registry) {
        tracing::error!(%error, "metrics could not be encoded");
    }
    out
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    service: &'static str,
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignInLabels {
    aal: &'static str,
    authenticator: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: &'static str,
    endpoint: &'static str,
    status: &'static str,
}

type Labels1 = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: HistogramFamily<RpcLabels>,
    sign_ins: Family<SignInLabels, Counter>,
    step_ups: Family<Labels1, Counter>,
    token_exchanges: Family<Labels1, Counter>,
    token_refreshes: Family<Labels1, Counter>,
    token_cache: Family<Labels1, Counter>,
    single_flight_waits: Counter,
    backchannel_logouts: Family<Labels1, Counter>,
    redis_errors: Counter,
    redis_duration: HistogramFamily<Labels1>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_duration: HistogramFamily<Labels2>,
}

/// 5 ms to about 10 s: gRPC calls and HTTP calls to CIS2 and APIM.
fn call_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 12))
}

/// 0.5 ms to about 1 s: Redis commands.
fn redis_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 12))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("session_broker");
    let m = Metrics {
        rpc_requests: Family::default(),
        rpc_duration: Family::new_with_constructor(call_buckets),
        sign_ins: Family::default(),
        step_ups: Family::default(),
        token_exchanges: Family::default(),
        token_refreshes: Family::default(),
        token_cache: Family::default(),
        single_flight_waits: Counter::default(),
        backchannel_logouts: Family::default(),
        redis_errors: Counter::default(),
        redis_duration: Family::new_with_constructor(redis_buckets),
        upstream_requests: Family::default(),
        upstream_duration: Family::new_with_constructor(call_buckets),
        registry: Registry::default(),
    };
    registry.register(
        "grpc_requests",
        "gRPC calls handled, by service, method and status code",
        m.rpc_requests.clone(),
    );
    registry.register(
        "grpc_request_duration_seconds",
        "Time to answer a gRPC call, by service, method and status code",
        m.rpc_duration.clone(),
    );
    registry.register(
        "sign_ins",
        "Completed sign-ins, by the AAL achieved and the authenticator used",
        m.sign_ins.clone(),
    );
    registry.register(
        "step_ups",
        "Step-ups to a higher AAL: started, succeeded, failed",
        m.step_ups.clone(),
    );
    registry.register(
        "token_exchanges",
        "APIM token exchanges, by outcome",
        m.token_exchanges.clone(),
    );
    registry.register(
        "token_refreshes",
        "APIM token refreshes, by outcome",
        m.token_refreshes.clone(),
    );
    registry.register(
        "token_cache",
        "API token requests answered from the cache (hit) or needing APIM (miss)",
        m.token_cache.clone(),
    );
    registry.register(
        "single_flight_waits",
        "Token requests that waited for a refresh already under way",
        m.single_flight_waits.clone(),
    );
    registry.register(
        "backchannel_logouts",
        "Back-channel logout requests from CIS2, by outcome",
        m.backchannel_logouts.clone(),
    );
    registry.register(
        "redis_errors",
        "Session store operations that failed",
        m.redis_errors.clone(),
    );
    registry.register(
        "redis_command_duration_seconds",
        "Time taken by session store operations, by operation",
        m.redis_duration.clone(),
    );
    registry.register(
        "upstream_requests",
        "HTTP requests to CIS2 and APIM, by endpoint and status class (error: no answer)",
        m.upstream_requests.clone(),
    );
    registry.register(
        "upstream_request_duration_seconds",
        "Time taken by HTTP requests to CIS2 and APIM, by endpoint",
        m.upstream_duration.clone(),
    );
    Metrics { registry, ..m }
});

fn outcome_counter(family: &Family<Labels1, Counter>, outcome: Outcome) {
    family
        .get_or_create(&[("outcome", outcome_label(outcome))])
        .inc();
}

fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Success => "success",
        Outcome::Rejected => "rejected",
        Outcome::Unavailable => "unavailable",
    }
}

fn aal_label(aal: Aal) -> &'static str {
    match aal {
        Aal::Aal1 => "AAL1",
        Aal::Aal2 => "AAL2",
        Aal::Aal3 => "AAL3",
    }
}

/// The authenticator labels `aal::authenticator_label` knows. CIS2's `amr` list is unconfirmed
/// and a label may name several methods, so anything else is `other` and the series stay few.
fn authenticator_bucket(label: &str) -> &'static str {
    const KNOWN: [&str; 7] = [
        "Smartcard",
        "Security key",
        "iPad app",
        "Windows Hello",
        "Passkey",
        "NHS.net Connect",
        "Microsoft Authenticator",
    ];
    if label.is_empty() {
        return "unknown";
    }
    KNOWN
        .iter()
        .find(|known| **known == label)
        .copied()
        .unwrap_or("other")
}

fn status_class(status: Option<u16>) -> &'static str {
    match status {
        None => "error",
        Some(100..=199) => "1xx",
        Some(200..=299) => "2xx",
        Some(300..=399) => "3xx",
        Some(400..=499) => "4xx",
        Some(500..=599) => "5xx",
        Some(_) => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the first sample line starting with `prefix`, from a fresh render.
    fn sample(prefix: &str) -> f64 {
        render()
            .lines()
            .find(|line| line.starts_with(prefix))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0)
    }

    #[test]
    fn authenticator_labels_fall_into_a_closed_set() {
        let cases = [
            ("Smartcard", "Smartcard"),
            ("Passkey", "Passkey"),
            ("NHS.net Connect", "NHS.net Connect"),
            ("Microsoft Authenticator", "Microsoft Authenticator"),
            ("", "unknown"),
            ("Smartcard, Passkey", "other"),
            ("SOMETHING_NEW", "other"),
            ("smartcard", "other"),
            ("x\"} 1\n", "other"),
        ];
        for (label, want) in cases {
            assert_eq!(authenticator_bucket(label), want, "label {label:?}");
        }
    }

    #[test]
    fn statuses_are_counted_by_class() {
        let cases = [
            (None, "error"),
            (Some(200), "2xx"),
            (Some(204), "2xx"),
            (Some(302), "3xx"),
            (Some(400), "4xx"),
            (Some(401), "4xx"),
            (Some(503), "5xx"),
            (Some(101), "1xx"),
            (Some(99), "other"),
            (Some(600), "other"),
        ];
        for (status, want) in cases {
            assert_eq!(status_class(status), want, "status {status:?}");
        }
    }

    #[test]
    fn every_event_shows_up_in_the_text() {
        sign_in(Aal::Aal3, "Smartcard");
        sign_in(Aal::Aal2, "Quantum token");
        step_up(StepUp::Started);
        step_up(StepUp::Succeeded);
        step_up(StepUp::Failed);
        token_exchange(Outcome::Success);
        token_refresh(Outcome::Rejected);
        token_cache(true);
        token_cache(false);
        single_flight_wait();
        backchannel_logout(Outcome::Unavailable);
        redis_error();
        redis_call("get_session", Duration::from_millis(2));
        upstream(
            Upstream::Apim,
            "token endpoint",
            Some(401),
            Duration::from_millis(40),
        );
        upstream(Upstream::Cis2, "JWKS", None, Duration::from_secs(3));
        rpc(
            "session_broker.v1.SessionBroker",
            "StartLogin",
            "OK",
            Duration::from_millis(7),
        );

        let text = render();
        for line in [
            "# TYPE session_broker_sign_ins counter",
            r#"session_broker_sign_ins_total{aal="AAL3",authenticator="Smartcard"} "#,
            r#"session_broker_sign_ins_total{aal="AAL2",authenticator="other"} "#,
            r#"session_broker_step_ups_total{stage="started"} "#,
            r#"session_broker_step_ups_total{stage="succeeded"} "#,
            r#"session_broker_step_ups_total{stage="failed"} "#,
            r#"session_broker_token_exchanges_total{outcome="success"} "#,
            r#"session_broker_token_refreshes_total{outcome="rejected"} "#,
            r#"session_broker_token_cache_total{result="hit"} "#,
            r#"session_broker_token_cache_total{result="miss"} "#,
            "session_broker_single_flight_waits_total ",
            r#"session_broker_backchannel_logouts_total{outcome="unavailable"} "#,
            "session_broker_redis_errors_total ",
            r#"session_broker_redis_command_duration_seconds_bucket{le="0.001",op="get_session"} "#,
            r#"session_broker_upstream_requests_total{upstream="apim",endpoint="token endpoint",status="4xx"} "#,
            r#"session_broker_upstream_requests_total{upstream="cis2",endpoint="JWKS",status="error"} "#,
            r#"session_broker_upstream_request_duration_seconds_count{upstream="cis2",endpoint="JWKS"} "#,
            r#"session_broker_grpc_requests_total{service="session_broker.v1.SessionBroker",method="StartLogin",code="OK"} "#,
            r#"session_broker_grpc_request_duration_seconds_bucket{le="0.01",service="session_broker.v1.SessionBroker",method="StartLogin",code="OK"} "#,
            "# EOF",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn counters_count_and_histograms_bucket() {
        let prefix = r#"session_broker_upstream_requests_total{upstream="apim",endpoint="counting test",status="5xx"}"#;
        let before = sample(prefix);
        for _ in 0..3 {
            upstream(
                Upstream::Apim,
                "counting test",
                Some(502),
                Duration::from_millis(30),
            );
        }
        assert_eq!(sample(prefix) - before, 3.0);
        let bucket = |le: &str| {
            sample(&format!(
                r#"session_broker_upstream_request_duration_seconds_bucket{{le="{le}",upstream="apim",endpoint="counting test"}}"#
            ))
        };
        assert_eq!(bucket("0.02"), 0.0);
        assert_eq!(bucket("0.04"), 3.0);
        assert_eq!(bucket("+Inf"), 3.0);
    }
}
