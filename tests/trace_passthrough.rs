//! Without a trace exporter the broker makes no OpenTelemetry spans (they cost the hot path a
//! third of its CPU), yet a caller's trace context still reaches CIS2, as the OpenTelemetry
//! specification's no-op tracer passes it on. This binary installs telemetry as `serve` does
//! when no OTLP endpoint is set.

mod common;

use cis2_session_broker::grpc::pb;
use cis2_session_broker::telemetry::{self, LogFormat};
use common::*;

fn with_traceparent<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "traceparent",
        traceparent
            .parse()
            .expect("a traceparent is valid metadata"),
    );
    request
}

/// A sign-in started and completed at the simulator, up to the code its callback carries.
async fn callback(h: &Harness) -> Callback {
    let started = h
        .start_login(Harness::login_request(pb::Aal::Aal2))
        .await
        .expect("StartLogin");
    h.authorize(&started.authorization_url, PASSKEY_ONLY, None)
        .await
}

#[tokio::test]
async fn the_callers_traceparent_reaches_cis2_when_nothing_is_exported() {
    let telemetry = telemetry::install(LogFormat::Json, None);
    let h = Harness::start_with(Options {
        store: Store::Memory,
        ..Options::default()
    })
    .await;
    let trace = format!("{:032x}", rand::random::<u128>() | 1);
    let parent = format!("{:016x}", rand::random::<u64>() | 1);
    let sent = format!("00-{trace}-{parent}-01");

    let cb = callback(&h).await;
    h.client
        .clone()
        .exchange_code(with_traceparent(cb.request(), &sent))
        .await
        .expect("ExchangeCode");

    // No span of the broker's own sits in between: CIS2 sees the caller's context unchanged.
    let seen = h.sim.received_traceparents();
    let token_calls: Vec<_> = seen
        .iter()
        .filter(|(path, _)| path.ends_with("/access_token"))
        .collect();
    assert!(
        token_calls
            .iter()
            .any(|(_, tp)| tp.as_deref() == Some(sent.as_str())),
        "the token endpoint did not receive {sent}: {seen:?}"
    );

    // A call without a traceparent sends none: nothing is made up.
    let cb = callback(&h).await;
    let before = h.sim.received_traceparents().len();
    h.exchange(&cb).await.expect("ExchangeCode");
    let seen = h.sim.received_traceparents();
    let new: Vec<_> = seen.iter().skip(before).collect();
    assert!(
        new.iter()
            .filter(|(path, _)| path.ends_with("/access_token"))
            .all(|(_, tp)| tp.is_none()),
        "a call without a traceparent sent one upstream: {new:?}"
    );
    h.stop().await;
    telemetry.shutdown().await;
}
