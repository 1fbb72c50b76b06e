//! Logout, back-channel logout and the admin RPCs end to end: the real broker over gRPC and HTTP,
//! the CIS2 and APIM simulators over HTTP, sessions in real Redis, two replicas.

mod common;

use cis2_session_broker::config::Pattern;
use cis2_session_broker::grpc::pb;
use common::*;
use serde_json::Value;
use std::collections::HashSet;
use tonic::Code;
use url::Url;

const SIGNED_OUT: &str = "https://app.example.test/signed-out";

fn opts() -> Options {
    Options {
        extra_toml: format!("\npost_logout_redirect_uris = [{SIGNED_OUT:?}]"),
        ..Options::default()
    }
}

fn apim_opts() -> Options {
    Options {
        apim: Some(Pattern::Separate),
        ..opts()
    }
}

/// Signs `uid` in at AAL2 and returns its session token and the CIS2 sid it got.
async fn sign_in(h: &Harness, uid: &str) -> (String, String) {
    let before: HashSet<String> = h.sim.sids_of(uid).into_iter().collect();
    let ex = h
        .sign_in(
            pb::Aal::Aal2,
            uid,
            (uid == SMARTCARD_AND_PASSKEY).then_some("PASSKEY"),
        )
        .await
        .expect("sign-in");
    let sid = h
        .sim
        .sids_of(uid)
        .into_iter()
        .find(|s| !before.contains(s))
        .expect("the simulator recorded the new CIS2 session");
    (ex.session_token, sid)
}

async fn logout(
    client: &Client,
    token: &str,
    redirect: &str,
) -> Result<pb::LogoutResponse, tonic::Status> {
    client
        .clone()
        .logout(pb::LogoutRequest {
            session_token: token.into(),
            post_logout_redirect_uri: redirect.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Every session RPC on `token` through `client`: each must say SESSION_INVALID.
async fn assert_signed_out(client: &Client, token: &str) {
    let mut c = client.clone();
    let t = || token.to_owned();
    let answers = [
        c.get_session(pb::GetSessionRequest { session_token: t() })
            .await
            .map(|_| ()),
        c.get_current_aal(pb::GetCurrentAalRequest { session_token: t() })
            .await
            .map(|_| ()),
        c.check_access(pb::CheckAccessRequest {
            session_token: t(),
            api: "pds".into(),
        })
        .await
        .map(|_| ()),
        c.get_pds_token(pb::GetPdsTokenRequest {
            session_token: t(),
            min_validity: None,
        })
        .await
        .map(|_| ()),
        c.start_login(pb::StartLoginRequest {
            redirect_uri: CALLBACK.into(),
            required_aal: pb::Aal::Aal3.into(),
            session_token: t(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        logout(client, token, "").await.map(|_| ()),
    ];
    for (i, answer) in answers.into_iter().enumerate() {
        let status = answer.expect_err("a signed-out session answers nothing");
        // GetPdsToken without [apim] says so before looking at the session.
        if i == 3 && reason(&status) != "SESSION_INVALID" {
            continue;
        }
        assert_eq!(status.code(), Code::Unauthenticated, "call {i}: {status:?}");
        assert_eq!(reason(&status), "SESSION_INVALID", "call {i}");
    }
}

async fn assert_signed_in(h: &Harness, token: &str) {
    h.session(token).await.expect("the session is still valid");
}

fn backchannel_uri(h: &Harness) -> String {
    format!("http://{}/backchannel-logout", h.http_addr)
}

#[tokio::test]
async fn logout_ends_the_session_at_once_on_every_replica() {
    let h = Harness::start_with(opts()).await;
    let replica = h.replica().await;
    let (token, _) = sign_in(&h, SMARTCARD_AND_PASSKEY).await;
    replica
        .client
        .clone()
        .get_session(pb::GetSessionRequest {
            session_token: token.clone(),
        })
        .await
        .expect("the replica sees the session");

    let out = logout(&h.client, &token, SIGNED_OUT).await.expect("logout");
    let url = Url::parse(&out.end_session_url).expect("a URL");
    assert!(
        out.end_session_url
            .starts_with(&format!("{}/connect/endSession?", h.sim.issuer())),
        "{}",
        out.end_session_url
    );
    let params: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let hint = params
        .iter()
        .find(|(k, _)| k == "id_token_hint")
        .map(|(_, v)| v.clone())
        .expect("id_token_hint");
    assert!(
        h.sim.issued_tokens().contains(&hint),
        "the session's ID token"
    );
    assert!(params.contains(&("post_logout_redirect_uri".into(), SIGNED_OUT.into())));

    assert_signed_out(&h.client, &token).await;
    assert_signed_out(&replica.client, &token).await;
    let dump = h.redis_dump().await;
    assert!(dump.is_empty(), "nothing is left: {:?}", keys(&dump));
    replica.stop().await;
    h.stop().await;
}

fn keys(dump: &[(String, Vec<u8>)]) -> Vec<&str> {
    dump.iter().map(|(k, _)| k.as_str()).collect()
}

#[tokio::test]
async fn logout_without_a_redirect_has_only_the_hint() {
    let h = Harness::start_with(opts()).await;
    let (token, _) = sign_in(&h, SMARTCARD_AND_PASSKEY).await;
    let out = logout(&h.client, &token, "").await.expect("logout");
    let url = Url::parse(&out.end_session_url).expect("a URL");
    let names: Vec<String> = url.query_pairs().map(|(k, _)| k.into_owned()).collect();
    assert_eq!(names, ["id_token_hint"]);
    // The simulator accepts the URL as CIS2 would.
    let resp = reqwest::get(url).await.expect("simulator answers");
    assert_eq!(resp.status(), 200);
    h.stop().await;
}

#[tokio::test]
async fn logout_refuses_an_unlisted_redirect_and_keeps_the_session() {
    let h = Harness::start_with(opts()).await;
    let (token, _) = sign_in(&h, SMARTCARD_AND_PASSKEY).await;
    for bad in [
        "https://evil.example/",
        "https://app.example.test/signed-out/x",
    ] {
        let status = logout(&h.client, &token, bad).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{bad}");
    }
    let long = format!("https://app.example.test/{}", "a".repeat(3000));
    let status = logout(&h.client, &token, &long).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_signed_in(&h, &token).await;
    h.stop().await;
}

#[tokio::test]
async fn logout_of_an_unknown_session_is_session_invalid() {
    let h = Harness::start_with(opts()).await;
    let unknown = cis2_session_broker::session::SessionToken::generate();
    for token in [
        unknown.expose().to_owned(),
        String::new(),
        "garbage".into(),
        "x".repeat(10_000),
    ] {
        let status = logout(&h.client, &token, "").await.expect_err("refused");
        assert_eq!(reason(&status), "SESSION_INVALID");
    }
    h.stop().await;
}

#[tokio::test]
async fn backchannel_logout_signs_out_on_another_replica_and_drops_apim_tokens() {
    let h = Harness::start_with(apim_opts()).await;
    h.sim
        .set_backchannel_logout_uri(CLIENT_ID, &backchannel_uri(&h));
    let replica = h.replica().await;
    let (token, sid) = sign_in(&h, SMARTCARD_AND_PASSKEY).await;
    let (other, _) = sign_in(&h, SEVERAL_ROLES).await;
    replica
        .client
        .clone()
        .get_pds_token(pb::GetPdsTokenRequest {
            session_token: token.clone(),
            min_validity: None,
        })
        .await
        .expect("a PDS token on the replica");
    assert!(
        h.redis_dump()
            .await
            .iter()
            .any(|(k, _)| k.ends_with(":tokens")),
        "the APIM token is cached"
    );

    let (status, _) = h.sim.backchannel_logout_sid(&sid).await.expect("delivered");
    assert_eq!(status, 200);

    assert_signed_out(&replica.client, &token).await;
    assert_signed_out(&h.client, &token).await;
    assert!(
        !h.redis_dump()
            .await
            .iter()
            .any(|(k, _)| k.ends_with(":tokens")),
        "the APIM tokens went with the session"
    );
    assert_signed_in(&h, &other).await;
    replica.stop().await;
    h.stop().await;
}

async fn post(h: &Harness, token: &str) -> (u16, Value, Option<String>) {
    let resp = reqwest::Client::new()
        .post(backchannel_uri(h))
        .form(&[("logout_token", token)])
        .send()
        .await
        .expect("broker answers");
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get("cache-control")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = resp.text().await.unwrap_or_default();
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    (status, json, cache)
}

#[tokio::test]
async fn a_replayed_logout_token_is_refused() {
    let h = Harness::start_with(opts()).await;
    let (_, sid) = sign_in(&h, SMARTCARD_AND_PASSKEY).await;
    let claims = h.sim.logout_token_claims(CLIENT_ID, Some(&sid), None);
    let token = h.sim.sign_logout_token(&claims, false);
    let (status, _, cache) = post(&h, &token).await;
    assert_eq!(status, 200);
    assert_eq!(cache.as_deref(), Some("no-store"));

    // The user signs in again; a replay must not end the new session.
    let (fresh, _) = sign_in(&h, SMARTCARD_AND_PASSKEY).await;
    let (status, body, cache) = post(&h, &token).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], "invalid_request");
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| d.contains("jti")),
        "{body}"
    );
    assert_eq!(cache.as_deref(), Some("no-store"));
    assert_signed_in(&h, &fresh).await;
    h.stop().await;
}

#[tokio::test]
async fn invalid_logout_tokens_are_refused_and_sessions_kept() {
    let h = Harness::start_with(opts()).await;
    let (token, sid) = sign_in(&h, SMARTCARD_AND_PASSKEY).await;
    let good = || h.sim.logout_token_claims(CLIENT_ID, Some(&sid), None);
    let with = |name: &str, value: Value| {
        let mut c = good();
        c[name] = value;
        c
    };
    let without = |name: &str| {
        let mut c = good();
        c.as_object_mut().expect("object").remove(name);
        c
    };
    let now = cis2_session_broker::clock::unix_seconds(std::time::SystemTime::now());
    let cases: Vec<(&str, String)> = vec![
        (
            "nonce",
            h.sim.sign_logout_token(&with("nonce", "n-1".into()), false),
        ),
        ("no events", h.sim.sign_logout_token(&without("events"), false)),
        (
            "events without the logout member",
            h.sim.sign_logout_token(&with("events", serde_json::json!({"x": {}})), false),
        ),
        (
            "logout member not an object",
            h.sim.sign_logout_token(
                &with(
                    "events",
                    serde_json::json!({"http://schemas.openid.net/event/backchannel-logout": "yes"}),
                ),
                false,
            ),
        ),
        (
            "wrong iss",
            h.sim
                .sign_logout_token(&with("iss", "https://other.example/".into()), false),
        ),
        (
            "wrong aud",
            h.sim
                .sign_logout_token(&with("aud", "another-client".into()), false),
        ),
        ("no jti", h.sim.sign_logout_token(&without("jti"), false)),
        ("no iat", h.sim.sign_logout_token(&without("iat"), false)),
        (
            "iat in the future",
            h.sim.sign_logout_token(&with("iat", (now + 3600).into()), false),
        ),
        (
            "expired",
            h.sim.sign_logout_token(&with("exp", (now - 3600).into()), false),
        ),
        (
            "neither sid nor sub",
            h.sim.sign_logout_token(&without("sid"), false),
        ),
        ("bad signature", h.sim.sign_logout_token(&good(), true)),
        ("not a JWT", "not-a-jwt".into()),
        ("an ID token", h.sim.issued_tokens()[0].clone()),
    ];
    for (name, bad) in cases {
        let (status, body, cache) = post(&h, &bad).await;
        assert_eq!(status, 400, "{name}: {body}");
        assert_eq!(body["error"], "invalid_request", "{name}");
        assert_eq!(cache.as_deref(), Some("no-store"), "{name}");
        assert!(
            !body.to_string().contains(&bad),
            "{name}: the token is echoed"
        );
        assert_signed_in(&h, &token).await;
    }
    // Without the form field, or not a form at all.
    let resp = reqwest::Client::new()
        .post(backchannel_uri(&h))
        .json(&serde_json::json!({"logout_token": "a.b.c"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(resp.status(), 400);
    assert_signed_in(&h, &token).await;
    h.stop().await;
}

#[tokio::test]
async fn a_sub_only_logout_signs_out_all_of_the_users_sessions() {
    let h = Harness::start_with(opts()).await;
    h.sim
        .set_backchannel_logout_uri(CLIENT_ID, &backchannel_uri(&h));
    let (a, _) = sign_in(&h, SMARTCARD_AND_PASSKEY).await;
    let (b, _) = sign_in(&h, SMARTCARD_AND_PASSKEY).await;
    let (other, _) = sign_in(&h, SEVERAL_ROLES).await;
    let answers = h.sim.backchannel_logout_user(SMARTCARD_AND_PASSKEY).await;
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].as_ref().map(|(s, _)| *s), Ok(200));
    assert_signed_out(&h.client, &a).await;
    assert_signed_out(&h.client, &b).await;
    assert_signed_in(&h, &other).await;
    h.stop().await;
}

async fn list(h: &Harness, uid: &str) -> Result<Vec<pb::Session>, tonic::Status> {
    h.client
        .clone()
        .list_user_sessions(pb::ListUserSessionsRequest { uid: uid.into() })
        .await
        .map(|r| r.into_inner().sessions)
}

async fn revoke(client: &Client, uid: &str) -> Result<u32, tonic::Status> {
    client
        .clone()
        .revoke_user_sessions(pb::RevokeUserSessionsRequest { uid: uid.into() })
        .await
        .map(|r| r.into_inner().revoked)
}

#[tokio::test]
async fn admins_list_and_revoke_a_users_sessions() {
    let h = Harness::start_with(opts()).await;
    let replica = h.replica().await;
    let (a, _) = sign_in(&h, SMARTCARD_AND_PASSKEY).await;
    let (b, _) = sign_in(&h, SMARTCARD_AND_PASSKEY).await;
    let (other, _) = sign_in(&h, SEVERAL_ROLES).await;

    let sessions = list(&h, SMARTCARD_AND_PASSKEY).await.expect("list");
    assert_eq!(sessions.len(), 2);
    for s in &sessions {
        assert_eq!(
            s.user.as_ref().map(|u| u.uid.as_str()),
            Some(SMARTCARD_AND_PASSKEY)
        );
        let shown = format!("{s:?}");
        assert!(
            !shown.contains(&a) && !shown.contains(&b),
            "no session token"
        );
    }
    assert!(list(&h, "nobody").await.expect("list").is_empty());

    assert_eq!(
        revoke(&replica.client, SMARTCARD_AND_PASSKEY)
            .await
            .expect("revoke"),
        2
    );
    assert_signed_out(&h.client, &a).await;
    assert_signed_out(&h.client, &b).await;
    assert!(
        list(&h, SMARTCARD_AND_PASSKEY)
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(
        revoke(&h.client, SMARTCARD_AND_PASSKEY)
            .await
            .expect("revoke"),
        0
    );
    assert_signed_in(&h, &other).await;

    for bad in [String::new(), "u".repeat(65)] {
        let status = list(&h, &bad).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
        let status = revoke(&h.client, &bad).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    replica.stop().await;
    h.stop().await;
}

#[tokio::test]
async fn logout_works_with_the_memory_store_too() {
    let h = Harness::start_with(Options {
        store: Store::Memory,
        ..opts()
    })
    .await;
    h.sim
        .set_backchannel_logout_uri(CLIENT_ID, &backchannel_uri(&h));
    let (a, sid) = sign_in(&h, SMARTCARD_AND_PASSKEY).await;
    let (b, _) = sign_in(&h, SMARTCARD_AND_PASSKEY).await;
    let (status, _) = h.sim.backchannel_logout_sid(&sid).await.expect("delivered");
    assert_eq!(status, 200);
    assert_signed_out(&h.client, &a).await;
    assert_signed_in(&h, &b).await;
    logout(&h.client, &b, "").await.expect("logout");
    assert_signed_out(&h.client, &b).await;
    h.stop().await;
}
