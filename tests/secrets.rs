//! After full flows, no secret is to be found in Redis (keys or values) or in any log line.

mod common;

use cis2_session_broker::grpc::pb;
use common::*;

#[tokio::test]
async fn no_secret_reaches_redis_or_the_logs() {
    // What `serve` (JSON) and `dev` (text) would print, at every level.
    let (json_logs, text_logs) = capture_logs();

    let h = Harness::start_with(Options {
        apim: Some(cis2_session_broker::config::Pattern::Separate),
        ..Options::default()
    })
    .await;
    h.sim.set_backchannel_logout_uri(
        CLIENT_ID,
        &format!("http://{}/backchannel-logout", h.http_addr),
    );
    let mut secrets: Vec<(String, String)> = vec![("client secret".into(), CLIENT_SECRET.into())];

    // A sign-in at AAL2 ...
    let started = h
        .start_login(Harness::login_request(pb::Aal::Aal2))
        .await
        .expect("started");
    let nonce = url::Url::parse(&started.authorization_url)
        .expect("url")
        .query_pairs()
        .find(|(k, _)| k == "nonce")
        .map(|(_, v)| v.into_owned())
        .expect("nonce");
    let cb = h
        .authorize(
            &started.authorization_url,
            SMARTCARD_AND_PASSKEY,
            Some("PASSKEY"),
        )
        .await;
    let ex = h.exchange(&cb).await.expect("signed in");
    secrets.extend([
        ("state".into(), cb.state.clone()),
        ("code".into(), cb.code.clone()),
        ("nonce".into(), nonce),
        ("session token".into(), ex.session_token.clone()),
    ]);
    h.current_aal(&ex.session_token).await.expect("live");
    h.session(&ex.session_token).await.expect("live");

    // ... a step-up to AAL3 ...
    let started = h
        .start_login(pb::StartLoginRequest {
            redirect_uri: CALLBACK.into(),
            api: "eps".into(),
            session_token: ex.session_token.clone(),
            ..Default::default()
        })
        .await
        .expect("step-up started");
    let cb = h
        .authorize(
            &started.authorization_url,
            SMARTCARD_AND_PASSKEY,
            Some("N3_SMARTCARD"),
        )
        .await;
    h.exchange(&cb).await.expect("stepped up");
    secrets.extend([
        ("step-up state".into(), cb.state.clone()),
        ("step-up code".into(), cb.code.clone()),
    ]);

    // ... and failures, whose error paths log too.
    h.exchange(&cb).await.expect_err("replay");
    h.current_aal(&format!("{}x", ex.session_token))
        .await
        .expect_err("malformed");

    // ... an APIM token for PDS ...
    let pds = h
        .client
        .clone()
        .get_pds_token(pb::GetPdsTokenRequest {
            session_token: ex.session_token.clone(),
            min_validity: None,
        })
        .await
        .expect("a PDS token")
        .into_inner();
    secrets.push(("APIM access token".into(), pds.access_token));

    // ... a second session ended by back-channel logout, whose token is then replayed ...
    let before: Vec<String> = h.sim.sids_of(SMARTCARD_ONLY);
    let other = h
        .sign_in(pb::Aal::Aal3, SMARTCARD_ONLY, None)
        .await
        .expect("second session");
    let sid = h
        .sim
        .sids_of(SMARTCARD_ONLY)
        .into_iter()
        .find(|s| !before.contains(s))
        .expect("its CIS2 sid");
    let claims = h
        .sim
        .logout_token_claims(CLIENT_ID, Some(&sid), Some(SMARTCARD_ONLY));
    let logout_token = h.sim.sign_logout_token(&claims, false);
    for expected in [200, 400] {
        let (status, _) = h
            .sim
            .post_logout_token(CLIENT_ID, &logout_token)
            .await
            .expect("delivered");
        assert_eq!(status, expected);
    }
    h.session(&other.session_token)
        .await
        .expect_err("signed out by CIS2");
    secrets.extend([
        ("logout token".into(), logout_token),
        ("second session token".into(), other.session_token),
    ]);

    // ... and a logout, whose end-session URL carries the ID token.
    let out = h
        .client
        .clone()
        .logout(pb::LogoutRequest {
            session_token: ex.session_token.clone(),
            post_logout_redirect_uri: String::new(),
        })
        .await
        .expect("logout")
        .into_inner();
    secrets.push(("end-session URL".into(), out.end_session_url));
    h.session(&ex.session_token).await.expect_err("signed out");

    // A live session (with its cached PDS token) for the scan to look through.
    let live = h
        .sign_in(pb::Aal::Aal2, SMARTCARD_AND_PASSKEY, Some("PASSKEY"))
        .await
        .expect("a live session to look for");
    let live_pds = h
        .client
        .clone()
        .get_pds_token(pb::GetPdsTokenRequest {
            session_token: live.session_token.clone(),
            min_validity: None,
        })
        .await
        .expect("a PDS token for the live session")
        .into_inner();
    secrets.extend([
        ("live APIM access token".into(), live_pds.access_token),
        ("live session token".into(), live.session_token.clone()),
    ]);
    for (i, t) in h.sim.issued_tokens().into_iter().enumerate() {
        secrets.push((format!("issued token {i}"), t));
    }
    assert!(secrets.len() >= 10, "the scan must have tokens to look for");

    let dump = h.redis_dump().await;
    assert!(!dump.is_empty(), "the flow must have written to Redis");
    let logs = format!("{}{}", json_logs.text(), text_logs.text());
    assert!(logs.contains("session created"), "logs were not captured");
    for (what, secret) in &secrets {
        assert!(
            secret.len() >= 16,
            "{what} is too short to scan for meaningfully"
        );
        for (key, value) in &dump {
            assert!(
                !key.contains(secret.as_str()),
                "{what} appears in Redis key {key}"
            );
            assert!(
                !contains(value, secret.as_bytes()),
                "{what} appears in the Redis value at {key}"
            );
        }
        assert!(
            !logs.contains(secret.as_str()),
            "{what} appears in the logs"
        );
    }
    // Personal details are sealed too: the user's name is not readable from Redis.
    assert!(
        dump.iter().all(|(k, _)| !k.contains(SMARTCARD_AND_PASSKEY)),
        "a key names the user"
    );
    let name = live
        .session
        .expect("session")
        .user
        .expect("user")
        .family_name;
    assert!(!name.is_empty());
    assert!(
        dump.iter().all(|(_, v)| !contains(v, name.as_bytes())),
        "names are stored in clear"
    );
    h.stop().await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
