//! Key rotation as the runbook (docs/key-rotation.md) does it, against real Redis: brokers with
//! different key configurations share one store, as replicas do during a rolling restart.

mod common;

use cis2_session_broker::grpc::pb;
use cis2_session_broker::session::KeyRing;
use common::*;
use tonic::Code;

/// A broker on the store under `prefix` with these `encryption.keys`.
async fn broker_on(prefix: &str, keys: String) -> Harness {
    Harness::start_with(Options {
        env: vec![
            ("BROKER__ENCRYPTION__KEYS".into(), keys),
            ("BROKER__STORE__KEY_PREFIX".into(), prefix.to_owned()),
        ],
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn a_new_encryption_key_keeps_sessions_and_removing_the_old_one_ends_them_cleanly() {
    let old = format!("old:{}", KeyRing::generate_key().expose());
    let new = format!("new:{}", KeyRing::generate_key().expose());
    let prefix = format!(
        "e2e-rot-{}:",
        cis2_session_broker::session::token::random_urlsafe(6).replace(['-', '_'], "x")
    );
    let before = broker_on(&prefix, old.clone()).await;
    let ex = before
        .sign_in(pb::Aal::Aal2, SMARTCARD_AND_PASSKEY, Some("PASSKEY"))
        .await
        .expect("sign-in under the old key");
    let token = ex.session_token;

    // Step 1: the new key first, the old one kept: old sessions read, new ones use the new key.
    let both = broker_on(&prefix, format!("{new},{old}")).await;
    let s = both.session(&token).await.expect("still readable");
    assert_eq!(s.user.expect("user").uid, SMARTCARD_AND_PASSKEY);
    let fresh = both
        .sign_in(pb::Aal::Aal2, SMARTCARD_AND_PASSKEY, Some("PASSKEY"))
        .await
        .expect("sign-in under the new key")
        .session_token;

    // Step 2, once the old sessions have expired: only the new key. A session sealed with the
    // removed key is a clean SESSION_INVALID, never INTERNAL.
    let after = broker_on(&prefix, new).await;
    after
        .session(&fresh)
        .await
        .expect("new-key session readable");
    let status = after
        .session(&token)
        .await
        .expect_err("old-key session ends");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "SESSION_INVALID");
    let status = after
        .client
        .clone()
        .logout(pb::LogoutRequest {
            session_token: token.clone(),
            post_logout_redirect_uri: String::new(),
        })
        .await
        .map(|_| ());
    // Logout still removes what it cannot read: nothing is left behind.
    assert!(status.is_ok() || status.is_err_and(|s| reason(&s) == "SESSION_INVALID"));
    assert!(after.session(&token).await.is_err());
    for h in [before, both, after] {
        h.stop().await;
    }
}

async fn jwks_kids(h: &Harness) -> Vec<String> {
    let body: serde_json::Value =
        reqwest::get(format!("http://{}/.well-known/jwks.json", h.http_addr))
            .await
            .expect("JWKS answers")
            .json()
            .await
            .expect("JSON");
    body["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["kid"].as_str().map(str::to_owned))
        .collect()
}

fn signing_keys(kids: &[&str]) -> String {
    let entries: Vec<String> = kids
        .iter()
        .map(|kid| {
            let pem = if *kid == "e2e-1" {
                shared_pem()
            } else {
                second_pem()
            };
            format!("{{ kid = {kid:?}, private_key_pem = {:?} }}", pem.expose())
        })
        .collect();
    format!("[{}]", entries.join(", "))
}

fn second_pem() -> cis2_session_broker::secret::Secret<String> {
    static PEM: std::sync::OnceLock<cis2_session_broker::secret::Secret<String>> =
        std::sync::OnceLock::new();
    PEM.get_or_init(|| {
        cis2_session_broker::signing::generate_private_pem().expect("key generation works")
    })
    .clone()
}

#[tokio::test]
async fn the_jwks_lists_every_signing_key_and_the_newest_signs() {
    // The simulator's client registration knows only e2e-1 (the harness key).
    let rotated = Harness::start_with(Options {
        auth: Auth::PrivateKeyJwt,
        env: vec![(
            "BROKER__SIGNING__KEYS".into(),
            signing_keys(&["e2e-2", "e2e-1"]),
        )],
        ..Options::default()
    })
    .await;
    assert_eq!(jwks_kids(&rotated).await, ["e2e-2", "e2e-1"]);
    // The newest key signs: until CIS2 has it registered, CIS2 refuses the client assertion.
    // Hence the runbook's order: publish and register first, then make it the newest.
    let status = rotated
        .sign_in(pb::Aal::Aal2, SMARTCARD_AND_PASSKEY, Some("PASSKEY"))
        .await
        .expect_err("an unregistered newest key is refused");
    assert_eq!(reason(&status), "LOGIN_REJECTED", "{status:?}");
    rotated.stop().await;

    // With the registered key newest, sign-in works, and the extra key is harmless.
    let published = Harness::start_with(Options {
        auth: Auth::PrivateKeyJwt,
        env: vec![(
            "BROKER__SIGNING__KEYS".into(),
            signing_keys(&["e2e-1", "e2e-2"]),
        )],
        ..Options::default()
    })
    .await;
    assert_eq!(jwks_kids(&published).await, ["e2e-1", "e2e-2"]);
    let token = published
        .sign_in(pb::Aal::Aal2, SMARTCARD_AND_PASSKEY, Some("PASSKEY"))
        .await
        .expect("signed with the registered key")
        .session_token;

    // Sessions do not depend on signing keys: a broker that dropped e2e-2 still reads them.
    let dropped = Harness::start_with(Options {
        auth: Auth::PrivateKeyJwt,
        env: vec![
            ("BROKER__SIGNING__KEYS".into(), signing_keys(&["e2e-1"])),
            (
                "BROKER__STORE__KEY_PREFIX".into(),
                published.key_prefix.clone(),
            ),
        ],
        ..Options::default()
    })
    .await;
    assert_eq!(jwks_kids(&dropped).await, ["e2e-1"]);
    let status = dropped.session(&token).await.map(|_| ());
    // Different encryption keys per harness: this broker cannot read it, and says so cleanly.
    assert!(status.is_err_and(|s| reason(&s) == "SESSION_INVALID"));
    published.stop().await;
    dropped.stop().await;
}
