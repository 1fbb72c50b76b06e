//! APIM tokens end to end: GetPdsToken / GetApiToken over real gRPC, the APIM simulator over real
//! HTTP, sessions and the token cache in real Redis; step-up; single flight across replicas; the
//! combined pattern.

mod common;

use cis2_session_broker::config::Pattern;
use cis2_session_broker::grpc::pb;
use cis2_session_broker::sim::ApimFault;
use common::*;
use std::time::Duration;
use tonic::Code;
use tonic_types::StatusExt;

async fn pds(h: &Harness, token: &str) -> Result<pb::ApiToken, tonic::Status> {
    h.client
        .clone()
        .get_pds_token(pb::GetPdsTokenRequest {
            session_token: token.into(),
            min_validity: None,
        })
        .await
        .map(|r| r.into_inner())
}

async fn api(h: &Harness, token: &str, api: &str) -> Result<pb::ApiToken, tonic::Status> {
    h.client
        .clone()
        .get_api_token(pb::GetApiTokenRequest {
            session_token: token.into(),
            api: api.into(),
            min_validity: None,
        })
        .await
        .map(|r| r.into_inner())
}

fn apim_opts() -> Options {
    Options {
        apim: Some(Pattern::Separate),
        ..Options::default()
    }
}

#[tokio::test]
async fn aal2_gets_pds_eps_asks_for_step_up_and_the_same_token_then_gets_eps() {
    let h = Harness::start_with(apim_opts()).await;
    let apim = h.apim.clone().expect("APIM simulator");
    let ex = h
        .sign_in(pb::Aal::Aal2, SMARTCARD_AND_PASSKEY, Some("PASSKEY"))
        .await
        .expect("AAL2");
    let token = ex.session_token;
    let role_id = ex
        .session
        .expect("session")
        .selected_role
        .expect("role")
        .role_id;

    let t = pds(&h, &token).await.expect("PDS works at AAL2");
    assert_eq!(t.aal(), pb::Aal::Aal2);
    assert_eq!(t.token_type, "Bearer");
    assert_eq!(t.api, "pds");
    assert_eq!(t.headers.get("NHSD-Session-URID"), Some(&role_id));
    let info = apim.introspect(&t.access_token).expect("an APIM token");
    assert!(
        info.scopes
            .iter()
            .any(|s| s == "urn:nhsd:apim:user-nhs-cis2:aal2:personal-demographics-service"),
        "{:?}",
        info.scopes
    );
    assert!(
        !info
            .scopes
            .iter()
            .any(|s| s.contains("electronic-prescription")),
        "{:?}",
        info.scopes
    );
    let expires = t.expires_at.expect("expiry").seconds;
    assert!(expires > cis2_session_broker::clock::unix_seconds(std::time::SystemTime::now()) + 500);

    // Served from the cache: no second exchange.
    let again = pds(&h, &token).await.expect("cached");
    assert_eq!(again.access_token, t.access_token);
    assert_eq!(apim.exchange_calls(), 1);

    let err = api(&h, &token, "eps").await.expect_err("EPS needs AAL3");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "STEP_UP_REQUIRED")
    );
    assert_eq!(error_metadata(&err, "api").as_deref(), Some("eps"));
    assert_eq!(
        error_metadata(&err, "required_aal").as_deref(),
        Some("AAL_3")
    );
    assert_eq!(
        error_metadata(&err, "current_aal").as_deref(),
        Some("AAL_2")
    );
    let msg = err
        .get_details_localized_message()
        .expect("a message for the clinician")
        .message;
    assert!(msg.contains("smartcard") && !msg.contains("AAL"), "{msg}");
    assert_eq!(
        apim.exchange_calls(),
        1,
        "a refused request never reaches APIM"
    );

    let started = h
        .start_login(pb::StartLoginRequest {
            redirect_uri: CALLBACK.into(),
            api: "eps".into(),
            session_token: token.clone(),
            ..Default::default()
        })
        .await
        .expect("step-up");
    let cb = h
        .authorize(
            &started.authorization_url,
            SMARTCARD_AND_PASSKEY,
            Some("N3_SMARTCARD"),
        )
        .await;
    assert!(h.exchange(&cb).await.expect("stepped up").stepped_up);

    let eps = api(&h, &token, "eps")
        .await
        .expect("the same session token now gets EPS");
    assert_eq!(eps.aal(), pb::Aal::Aal3);
    let info = apim.introspect(&eps.access_token).expect("an APIM token");
    assert!(
        info.scopes
            .iter()
            .any(|s| s.contains("aal3:electronic-prescription")),
        "{:?}",
        info.scopes
    );
    let pds3 = pds(&h, &token).await.expect("PDS at AAL3");
    assert_ne!(
        pds3.access_token, t.access_token,
        "the AAL2 token is not served after step-up"
    );
    assert_eq!(pds3.aal(), pb::Aal::Aal3);
    h.stop().await;
}

#[tokio::test]
async fn two_replicas_and_200_concurrent_calls_make_one_apim_call() {
    let h = Harness::start_with(apim_opts()).await;
    let replica = h.replica().await;
    let apim = h.apim.clone().expect("APIM simulator");
    let ex = h
        .sign_in(pb::Aal::Aal2, PASSKEY_ONLY, None)
        .await
        .expect("signed in");
    apim.set_fault(ApimFault::Slow(Duration::from_millis(300)));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..200 {
        let client = if i % 2 == 0 {
            h.client.clone()
        } else {
            replica.client.clone()
        };
        let token = ex.session_token.clone();
        calls.spawn(async move {
            client
                .clone()
                .get_pds_token(pb::GetPdsTokenRequest {
                    session_token: token,
                    min_validity: None,
                })
                .await
                .map(|r| r.into_inner().access_token)
        });
    }
    let mut tokens = std::collections::HashSet::new();
    while let Some(r) = calls.join_next().await {
        tokens.insert(r.expect("task").expect("every call gets a token"));
    }
    assert_eq!(tokens.len(), 1, "every caller got the one token");
    assert_eq!(apim.token_calls(), 1, "exactly one call reached APIM");
    replica.stop().await;
    h.stop().await;
}

#[tokio::test]
async fn concurrent_refreshes_never_redeem_one_refresh_token_twice() {
    // Tokens that live less than min_validity must be refreshed on every round.
    let h = Harness::start_with(Options {
        apim_access_token_ttl: Some(Duration::from_secs(30)),
        ..apim_opts()
    })
    .await;
    let replica = h.replica().await;
    let apim = h.apim.clone().expect("APIM simulator");
    let ex = h
        .sign_in(pb::Aal::Aal2, PASSKEY_ONLY, None)
        .await
        .expect("signed in");
    pds(&h, &ex.session_token).await.expect("first token");
    for _round in 0..3 {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..40 {
            let client = if i % 2 == 0 {
                h.client.clone()
            } else {
                replica.client.clone()
            };
            let token = ex.session_token.clone();
            calls.spawn(async move {
                client
                    .clone()
                    .get_pds_token(pb::GetPdsTokenRequest {
                        session_token: token,
                        min_validity: None,
                    })
                    .await
            });
        }
        while let Some(r) = calls.join_next().await {
            r.expect("task").expect("every call gets a token");
        }
    }
    assert!(apim.refresh_calls() >= 1, "tokens were refreshed");
    // A reused refresh token makes APIM revoke the whole family, which would force a new
    // exchange: one exchange in all proves no refresh token was redeemed twice.
    assert_eq!(apim.exchange_calls(), 1);
    replica.stop().await;
    h.stop().await;
}

#[tokio::test]
async fn apim_failures_cache_nothing_and_map_to_documented_reasons() {
    let h = Harness::start_with(apim_opts()).await;
    let apim = h.apim.clone().expect("APIM simulator");
    let ex = h
        .sign_in(pb::Aal::Aal2, PASSKEY_ONLY, None)
        .await
        .expect("signed in");
    apim.set_fault(ApimFault::ServerError);
    let err = pds(&h, &ex.session_token).await.expect_err("5xx");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Unavailable, "APIM_UNAVAILABLE")
    );
    apim.clear_faults();
    apim.set_fault(ApimFault::UnauthorizedClient);
    let err = pds(&h, &ex.session_token).await.expect_err("401");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "UPSTREAM_REJECTED")
    );
    assert_eq!(
        error_metadata(&err, "error").as_deref(),
        Some("unauthorized_client")
    );
    apim.clear_faults();
    let t = pds(&h, &ex.session_token)
        .await
        .expect("retry succeeds: nothing bad was cached");
    assert!(!t.access_token.is_empty());
    // Bad input.
    let err = api(&h, &ex.session_token, "no-such-api")
        .await
        .expect_err("unknown api");
    assert_eq!(reason(&err), "INVALID_ARGUMENT");
    let err = h
        .client
        .clone()
        .get_pds_token(pb::GetPdsTokenRequest {
            session_token: ex.session_token.clone(),
            min_validity: Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
        })
        .await
        .expect_err("negative");
    assert_eq!(reason(&err), "INVALID_ARGUMENT");
    let err = pds(&h, "cis2sb_nonsense").await.expect_err("bad session");
    assert_eq!(reason(&err), "SESSION_INVALID");
    h.stop().await;
}

#[tokio::test]
async fn the_combined_pattern_signs_in_through_apim_and_reports_the_requested_level() {
    let h = Harness::start_with(Options {
        apim: Some(Pattern::Combined),
        ..Options::default()
    })
    .await;
    let apim = h.apim.clone().expect("APIM simulator");
    let started = h
        .start_login(Harness::login_request(pb::Aal::Aal2))
        .await
        .expect("started");
    assert!(
        started.authorization_url.starts_with(&apim.authorize_url()),
        "{}",
        started.authorization_url
    );
    let cb = h
        .follow_to_callback(&started.authorization_url, SMARTCARD_ONLY, None)
        .await;
    let ex = h.exchange(&cb).await.expect("signed in through APIM");
    let aal = h.current_aal(&ex.session_token).await.expect("live");
    assert_eq!(
        aal.aal(),
        pb::Aal::Aal2,
        "the requested lower bound, not the smartcard's AAL3"
    );
    assert_eq!(aal.aal_source(), pb::AalSource::Requested);
    let t = pds(&h, &ex.session_token)
        .await
        .expect("PDS token from the sign-in");
    assert!(apim.introspect(&t.access_token).is_some());
    assert_eq!(
        apim.exchange_calls(),
        0,
        "no token exchange in the combined pattern"
    );

    let err = h
        .start_login(pb::StartLoginRequest {
            redirect_uri: CALLBACK.into(),
            api: "eps".into(),
            session_token: ex.session_token.clone(),
            ..Default::default()
        })
        .await
        .expect_err("no step-up without an ID token");
    assert_eq!(reason(&err), "INVALID_ARGUMENT");
    h.stop().await;
}
