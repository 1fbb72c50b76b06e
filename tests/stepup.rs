//! Step-up: an AAL2 session becomes AAL3 in place when the same user signs in again with a
//! stronger authenticator; anything else leaves it exactly as it was.

mod common;

use cis2_session_broker::grpc::pb;
use common::*;
use tonic::Code;

async fn start_step_up(h: &Harness, token: &str) -> pb::StartLoginResponse {
    h.start_login(pb::StartLoginRequest {
        redirect_uri: CALLBACK.into(),
        api: "eps".into(),
        session_token: token.into(),
        app_state: "back-to-prescribing".into(),
        ..Default::default()
    })
    .await
    .expect("step-up starts")
}

#[tokio::test]
async fn the_same_user_with_a_smartcard_steps_the_same_session_up() {
    let h = Harness::start().await;
    let ex = h
        .sign_in(pb::Aal::Aal2, SMARTCARD_AND_PASSKEY, Some("PASSKEY"))
        .await
        .expect("AAL2 sign-in");
    let token = ex.session_token;
    assert_eq!(
        h.current_aal(&token).await.expect("live").aal(),
        pb::Aal::Aal2
    );
    let check = h
        .client
        .clone()
        .check_access(pb::CheckAccessRequest {
            session_token: token.clone(),
            api: "eps".into(),
        })
        .await
        .expect("check")
        .into_inner();
    assert!(!check.allowed);
    assert_eq!(
        (check.required_aal(), check.current_aal()),
        (pb::Aal::Aal3, pb::Aal::Aal2)
    );
    assert!(
        check.message.contains("smartcard") && !check.message.contains("AAL"),
        "{}",
        check.message
    );

    let started = start_step_up(&h, &token).await;
    assert!(started.step_up);
    assert_eq!(started.acr_values, "AAL3_ANY");
    let cb = h
        .authorize(
            &started.authorization_url,
            SMARTCARD_AND_PASSKEY,
            Some("N3_SMARTCARD"),
        )
        .await;
    let up = h.exchange(&cb).await.expect("step-up succeeds");
    assert!(up.stepped_up);
    assert!(
        up.session_token.is_empty(),
        "the caller keeps the token it has"
    );
    assert_eq!(up.app_state, "back-to-prescribing");

    let aal = h.current_aal(&token).await.expect("same token still works");
    assert_eq!(aal.aal(), pb::Aal::Aal3);
    assert_eq!(aal.authenticator, "Smartcard");
    let idle = aal.idle_expires_at.expect("idle").seconds - aal.auth_time.expect("auth").seconds;
    assert!(
        idle <= 16 * 60,
        "AAL3 idle rules apply after step-up, got {idle}s"
    );
    let check = h
        .client
        .clone()
        .check_access(pb::CheckAccessRequest {
            session_token: token.clone(),
            api: "eps".into(),
        })
        .await
        .expect("check")
        .into_inner();
    assert!(check.allowed);
    assert_eq!(
        h.redis_session_count().await,
        1,
        "step-up upgrades in place, it makes no new session"
    );
    h.stop().await;
}

#[tokio::test]
async fn another_user_or_a_weak_authenticator_cannot_step_up_and_the_session_is_unchanged() {
    let h = Harness::start().await;
    let ex = h
        .sign_in(pb::Aal::Aal2, SMARTCARD_AND_PASSKEY, Some("PASSKEY"))
        .await
        .expect("AAL2 sign-in");
    let token = ex.session_token;
    let before = h.session(&token).await.expect("live");

    // Someone else at the keyboard.
    let started = start_step_up(&h, &token).await;
    let cb = h
        .authorize(&started.authorization_url, SMARTCARD_ONLY, None)
        .await;
    let err = h.exchange(&cb).await.expect_err("other user");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::PermissionDenied, "LOGIN_REJECTED")
    );

    // A user with only AAL2 authenticators: CIS2 offers nothing for AAL3_ANY.
    let started = start_step_up(&h, &token).await;
    let cb = h
        .authorize(
            &started.authorization_url,
            SMARTCARD_AND_PASSKEY,
            Some("PASSKEY"),
        )
        .await;
    assert_eq!(cb.error, "access_denied");
    assert_eq!(
        reason(&h.exchange(&cb).await.expect_err("refused")),
        "LOGIN_REJECTED"
    );

    // CIS2 claims AAL3 was asked for but reports AAL2: the broker trusts the claim, not the URL.
    h.sim.set_fault(cis2_session_broker::sim::Fault::AalTooLow);
    let started = start_step_up(&h, &token).await;
    let cb = h
        .authorize(
            &started.authorization_url,
            SMARTCARD_AND_PASSKEY,
            Some("N3_SMARTCARD"),
        )
        .await;
    assert_eq!(
        reason(&h.exchange(&cb).await.expect_err("too low")),
        "LOGIN_REJECTED"
    );
    h.sim.clear_faults();

    let after = h.session(&token).await.expect("still live");
    assert_eq!(after.aal(), pb::Aal::Aal2);
    assert_eq!(after.amr, before.amr);
    assert_eq!(after.auth_time, before.auth_time);
    assert_eq!(after.session_id, before.session_id);
    h.stop().await;
}

#[tokio::test]
async fn a_step_up_of_an_unknown_session_is_refused_up_front() {
    let h = Harness::start().await;
    let err = h
        .start_login(pb::StartLoginRequest {
            redirect_uri: CALLBACK.into(),
            required_aal: pb::Aal::Aal3.into(),
            session_token: format!("cis2sb_{}", "A".repeat(43)),
            ..Default::default()
        })
        .await
        .expect_err("unknown session");
    assert_eq!(reason(&err), "SESSION_INVALID");
    assert!(h.redis_dump().await.is_empty());
    h.stop().await;
}
