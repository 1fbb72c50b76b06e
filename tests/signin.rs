//! End to end: sign-in over real gRPC, against the CIS2 simulator over real HTTP, with sessions
//! in a real Redis.

mod common;

use cis2_session_broker::grpc::pb;
use cis2_session_broker::sim::Fault;
use common::*;
use std::time::Duration;
use tonic::Code;

#[tokio::test]
async fn aal2_sign_in_with_a_passkey_reports_aal2() {
    let h = Harness::start().await;
    let ex = h
        .sign_in(pb::Aal::Aal2, PASSKEY_ONLY, None)
        .await
        .expect("sign-in succeeds");
    assert!(ex.session_token.starts_with("cis2sb_"));
    assert!(!ex.stepped_up);
    let aal = h
        .current_aal(&ex.session_token)
        .await
        .expect("session is live");
    assert_eq!(aal.aal(), pb::Aal::Aal2);
    assert_eq!(aal.aal_source(), pb::AalSource::IdToken);
    assert_eq!(aal.acr, "AAL2_OR_AAL3_ANY");
    assert_eq!(aal.authenticator, "Passkey");
    let idle = aal.idle_expires_at.expect("idle expiry").seconds
        - aal.auth_time.expect("auth_time").seconds;
    assert!(
        (29 * 60..=31 * 60).contains(&idle),
        "AAL2 idle timeout is 30 min, got {idle}s"
    );

    let s = h.session(&ex.session_token).await.expect("session");
    let user = s.user.expect("user");
    assert_eq!(user.uid, PASSKEY_ONLY);
    assert!(!user.name.is_empty());
    let role = s.selected_role.expect("a selected role");
    assert!(!role.role_id.is_empty() && !role.org_code.is_empty());
    assert!(s.roles.iter().any(|r| r.role_id == role.role_id));
    assert_eq!(s.session_id.len(), 32);
    assert!(!ex.session_token.contains(&s.session_id));
    h.stop().await;
}

#[tokio::test]
async fn aal3_sign_in_with_a_smartcard_reports_aal3_with_private_key_jwt() {
    let h = Harness::start_with(Options {
        auth: Auth::PrivateKeyJwt,
        ..Options::default()
    })
    .await;
    let started = h
        .start_login(Harness::login_request(pb::Aal::Aal3))
        .await
        .expect("started");
    assert_eq!(started.acr_values, "AAL3_ANY");
    let url = url::Url::parse(&started.authorization_url).expect("url");
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q.get("acr_values").map(String::as_str), Some("AAL3_ANY"));
    assert_eq!(q.get("prompt").map(String::as_str), Some("login"));
    assert_eq!(
        q.get("code_challenge_method").map(String::as_str),
        Some("S256")
    );
    assert_eq!(
        q.get("scope").map(String::as_str),
        Some("openid profile nationalrbacaccess associatedorgs selectedrole")
    );
    assert!(
        q.get("state").is_some_and(|s| s.len() >= 22)
            && q.get("nonce").is_some_and(|n| n.len() >= 22)
    );
    assert_eq!(q.get("state"), Some(&started.state));

    let cb = h
        .authorize(&started.authorization_url, SMARTCARD_ONLY, None)
        .await;
    let ex = h.exchange(&cb).await.expect("sign-in succeeds");
    let aal = h.current_aal(&ex.session_token).await.expect("live");
    assert_eq!(aal.aal(), pb::Aal::Aal3);
    assert_eq!(aal.authenticator, "Smartcard");
    assert_eq!(aal.amr, ["N3_SMARTCARD"]);
    let idle =
        aal.idle_expires_at.expect("idle").seconds - aal.auth_time.expect("auth_time").seconds;
    assert!(
        (14 * 60..=16 * 60).contains(&idle),
        "AAL3 idle timeout is 15 min, got {idle}s"
    );
    h.stop().await;
}

#[tokio::test]
async fn every_id_token_fault_is_rejected_and_creates_no_session() {
    let h = Harness::start().await;
    let faults = [
        Fault::BadSignature,
        Fault::WrongIssuer,
        Fault::WrongAudience,
        Fault::WrongNonce,
        Fault::Expired,
        Fault::AlgNone,
        Fault::UnknownKid,
        Fault::AalMissing,
        Fault::AalTooLow,
        Fault::StaleAuthTime,
        Fault::UserinfoWrongSub,
    ];
    for fault in faults {
        h.sim.clear_faults();
        h.sim.set_fault(fault);
        let err = h
            .sign_in(pb::Aal::Aal2, SMARTCARD_AND_PASSKEY, None)
            .await
            .expect_err("must be refused");
        assert_eq!(err.code(), Code::PermissionDenied, "{fault:?}: {err:?}");
        assert_eq!(reason(&err), "LOGIN_REJECTED", "{fault:?}");
    }
    h.sim.clear_faults();
    assert_eq!(
        h.redis_session_count().await,
        0,
        "a refused sign-in left a session behind"
    );
    // The integer form of the level is not a fault: NHS fixtures use it.
    h.sim.set_fault(Fault::AalAsInteger);
    let ex = h
        .sign_in(pb::Aal::Aal2, SMARTCARD_ONLY, None)
        .await
        .expect("integer AAL accepted");
    assert_eq!(
        h.current_aal(&ex.session_token).await.expect("live").aal(),
        pb::Aal::Aal3
    );
    h.stop().await;
}

#[tokio::test]
async fn upstream_outages_are_unavailable_not_rejections() {
    let h = Harness::start().await;
    h.sim.set_fault(Fault::TokenServerError);
    let err = h
        .sign_in(pb::Aal::Aal2, SMARTCARD_ONLY, None)
        .await
        .expect_err("5xx");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Unavailable, "IDP_UNAVAILABLE")
    );
    h.sim.clear_faults();
    h.sim.set_fault(Fault::Slow(Duration::from_secs(5)));
    let err = h
        .sign_in(pb::Aal::Aal2, SMARTCARD_ONLY, None)
        .await
        .expect_err("timeout");
    assert_eq!(reason(&err), "IDP_UNAVAILABLE");
    h.stop().await;
}

#[tokio::test]
async fn a_state_is_good_for_exactly_one_exchange() {
    let h = Harness::start().await;
    let started = h
        .start_login(Harness::login_request(pb::Aal::Aal2))
        .await
        .expect("started");
    let cb = h
        .authorize(&started.authorization_url, SMARTCARD_ONLY, None)
        .await;
    let (a, b) = tokio::join!(h.exchange(&cb), h.exchange(&cb));
    let outcomes = [a, b];
    assert_eq!(
        outcomes.iter().filter(|r| r.is_ok()).count(),
        1,
        "exactly one exchange wins"
    );
    let loser = outcomes
        .into_iter()
        .find_map(Result::err)
        .expect("one lost");
    assert_eq!(
        (loser.code(), reason(&loser).as_str()),
        (Code::FailedPrecondition, "LOGIN_STATE_INVALID")
    );
    let replay = h.exchange(&cb).await.expect_err("replay");
    assert_eq!(reason(&replay), "LOGIN_STATE_INVALID");
    let unknown = h
        .exchange(&Callback {
            state: "never-issued".into(),
            code: "x".into(),
            ..Callback::default()
        })
        .await
        .expect_err("unknown state");
    assert_eq!(reason(&unknown), "LOGIN_STATE_INVALID");
    assert_eq!(h.redis_session_count().await, 1);
    h.stop().await;
}

#[tokio::test]
async fn an_expired_state_is_refused() {
    let h = Harness::start_with(Options {
        extra_toml: "[sessions]\npending_login_ttl = \"300ms\"".into(),
        ..Options::default()
    })
    .await;
    let started = h
        .start_login(Harness::login_request(pb::Aal::Aal2))
        .await
        .expect("started");
    let cb = h
        .authorize(&started.authorization_url, SMARTCARD_ONLY, None)
        .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let err = h.exchange(&cb).await.expect_err("expired");
    assert_eq!(reason(&err), "LOGIN_STATE_INVALID");
    h.stop().await;
}

#[tokio::test]
async fn idp_errors_and_refused_users_are_login_rejected_with_the_idp_code() {
    let h = Harness::start().await;
    // A user holding only AAL2 authenticators cannot satisfy AAL3_ANY: CIS2 refuses.
    let started = h
        .start_login(Harness::login_request(pb::Aal::Aal3))
        .await
        .expect("started");
    let cb = h
        .authorize(&started.authorization_url, PASSKEY_ONLY, None)
        .await;
    assert_eq!(cb.error, "access_denied");
    let err = h.exchange(&cb).await.expect_err("refused");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::PermissionDenied, "LOGIN_REJECTED")
    );
    assert_eq!(
        error_metadata(&err, "idp_error").as_deref(),
        Some("access_denied")
    );
    // The state was consumed by the error callback too.
    assert_eq!(
        reason(&h.exchange(&cb).await.expect_err("consumed")),
        "LOGIN_STATE_INVALID"
    );

    // A callback whose `iss` names another issuer is a mix-up attack (RFC 9207).
    let started = h
        .start_login(Harness::login_request(pb::Aal::Aal2))
        .await
        .expect("started");
    let mut cb = h
        .authorize(&started.authorization_url, SMARTCARD_ONLY, None)
        .await;
    cb.iss = "https://evil.example/".into();
    assert_eq!(
        reason(&h.exchange(&cb).await.expect_err("mix-up")),
        "LOGIN_REJECTED"
    );
    h.stop().await;
}

#[tokio::test]
async fn bad_input_is_invalid_argument_and_nothing_is_stored() {
    let h = Harness::start().await;
    let cases = [
        pb::StartLoginRequest {
            redirect_uri: "https://evil.example/cb".into(),
            ..Default::default()
        },
        pb::StartLoginRequest {
            redirect_uri: format!("{CALLBACK}/"),
            ..Default::default()
        },
        pb::StartLoginRequest {
            redirect_uri: CALLBACK.into(),
            api: "no-such-api".into(),
            ..Default::default()
        },
        pb::StartLoginRequest {
            redirect_uri: CALLBACK.into(),
            app_state: "x".repeat(1025),
            ..Default::default()
        },
        pb::StartLoginRequest {
            redirect_uri: "h".repeat(5000),
            ..Default::default()
        },
        pb::StartLoginRequest {
            redirect_uri: CALLBACK.into(),
            required_aal: 7,
            ..Default::default()
        },
        pb::StartLoginRequest {
            redirect_uri: CALLBACK.into(),
            required_aal: pb::Aal::Aal1.into(),
            ..Default::default()
        },
    ];
    for req in cases {
        let err = h.start_login(req.clone()).await.expect_err("invalid");
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::InvalidArgument, "INVALID_ARGUMENT"),
            "{req:?}"
        );
        use tonic_types::StatusExt;
        assert!(
            err.get_details_bad_request()
                .is_some_and(|b| !b.field_violations.is_empty())
        );
    }
    let bad_exchanges = [
        Callback::default(),
        Callback {
            state: "s".repeat(600),
            code: "c".into(),
            ..Callback::default()
        },
        Callback {
            state: "s".into(),
            code: "c".repeat(5000),
            ..Callback::default()
        },
        Callback {
            state: "s".into(),
            ..Callback::default()
        },
    ];
    for cb in bad_exchanges {
        let err = h.exchange(&cb).await.expect_err("invalid");
        assert_eq!(reason(&err), "INVALID_ARGUMENT");
    }
    assert!(
        h.redis_dump().await.is_empty(),
        "bad input left something in Redis"
    );
    // A message over the size limit never reaches the broker.
    let huge = pb::StartLoginRequest {
        redirect_uri: CALLBACK.into(),
        app_state: "x".repeat(200_000),
        ..Default::default()
    };
    assert_eq!(
        h.start_login(huge).await.expect_err("too big").code(),
        Code::OutOfRange
    );
    h.stop().await;
}

#[tokio::test]
async fn unknown_malformed_and_idle_sessions_are_session_invalid() {
    let h = Harness::start_with(Options {
        extra_toml: "[sessions]\nidle_timeout_aal2 = \"1s\"\nidle_timeout_aal3 = \"1s\"\ntouch_interval = \"100ms\"".into(),
        ..Options::default()
    })
    .await;
    let well_formed_unknown = format!("cis2sb_{}", "A".repeat(43));
    for token in [
        "",
        "nonsense",
        well_formed_unknown.as_str(),
        &"x".repeat(10_000),
    ] {
        let err = h.current_aal(token).await.expect_err("invalid");
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::Unauthenticated, "SESSION_INVALID")
        );
        assert!(!err.message().contains(token) || token.is_empty());
    }
    let ex = h
        .sign_in(pb::Aal::Aal2, SMARTCARD_ONLY, None)
        .await
        .expect("signed in");
    // Activity slides the idle timer: keep it alive past one idle period...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        h.current_aal(&ex.session_token)
            .await
            .expect("kept alive by use");
    }
    // ...and idleness ends it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = h.current_aal(&ex.session_token).await.expect_err("idle");
    assert_eq!(reason(&err), "SESSION_INVALID");
    h.stop().await;
}

#[tokio::test]
async fn the_absolute_lifetime_ends_a_busy_session() {
    let h = Harness::start_with(Options {
        extra_toml: "[sessions]\nabsolute_lifetime = \"2s\"\ntouch_interval = \"100ms\"".into(),
        ..Options::default()
    })
    .await;
    let ex = h
        .sign_in(pb::Aal::Aal2, SMARTCARD_ONLY, None)
        .await
        .expect("signed in");
    let first = h.current_aal(&ex.session_token).await.expect("live");
    assert!(
        first.expires_at.expect("expiry").seconds - first.auth_time.expect("auth").seconds <= 3
    );
    let mut ended = false;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Err(e) = h.current_aal(&ex.session_token).await {
            assert_eq!(reason(&e), "SESSION_INVALID");
            ended = true;
            break;
        }
    }
    assert!(ended, "the session outlived its absolute lifetime");
    h.stop().await;
}

#[tokio::test]
async fn an_issuer_with_an_explicit_default_port_is_compared_verbatim() {
    const ISSUER: &str =
        "https://cis2.sim.test:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare";
    let h = Harness::start_with(Options {
        sim_issuer: Some(ISSUER.into()),
        ..Options::default()
    })
    .await;
    let ex = h
        .sign_in(pb::Aal::Aal2, SMARTCARD_ONLY, None)
        .await
        .expect("verbatim issuer works");
    assert_eq!(
        h.current_aal(&ex.session_token).await.expect("live").aal(),
        pb::Aal::Aal3
    );
    h.stop().await;

    // Configured without the port, discovery does not match: the broker says so, it does not
    // guess.
    let h = Harness::start_with(Options {
        sim_issuer: Some(ISSUER.into()),
        broker_issuer: Some(ISSUER.replace(":443", "")),
        ..Options::default()
    })
    .await;
    let err = h
        .start_login(Harness::login_request(pb::Aal::Aal2))
        .await
        .expect_err("mismatch");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Unavailable, "IDP_UNAVAILABLE")
    );
    h.stop().await;
}

#[tokio::test]
async fn several_roles_resolve_the_selected_one() {
    let h = Harness::start().await;
    let ex = h
        .sign_in(pb::Aal::Aal2, SEVERAL_ROLES, None)
        .await
        .expect("signed in");
    let s = h.session(&ex.session_token).await.expect("live");
    assert!(s.roles.len() > 1, "this user has several roles");
    let selected = s.selected_role.expect("selected");
    assert!(
        s.roles.iter().any(|r| r == &selected),
        "the selected role is one of the user's roles"
    );
    h.stop().await;
}

#[tokio::test]
async fn works_with_the_in_memory_store_too() {
    let h = Harness::start_with(Options {
        store: Store::Memory,
        ..Options::default()
    })
    .await;
    let ex = h
        .sign_in(pb::Aal::Aal2, PASSKEY_ONLY, None)
        .await
        .expect("signed in");
    assert_eq!(
        h.current_aal(&ex.session_token).await.expect("live").aal(),
        pb::Aal::Aal2
    );
    h.stop().await;
}

#[tokio::test]
async fn redis_down_is_store_unavailable_never_internal() {
    let h = Harness::start_with(Options {
        redis_url: Some("redis://127.0.0.1:1".into()),
        ..Options::default()
    })
    .await;
    let err = h
        .start_login(Harness::login_request(pb::Aal::Aal2))
        .await
        .expect_err("no store");
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::Unavailable, "STORE_UNAVAILABLE")
    );
    let token = format!("cis2sb_{}", "A".repeat(43));
    let err = h.current_aal(&token).await.expect_err("no store");
    assert_eq!(reason(&err), "STORE_UNAVAILABLE");
    let err = h
        .exchange(&Callback {
            state: "s".into(),
            code: "c".into(),
            ..Callback::default()
        })
        .await
        .expect_err("no store");
    assert_eq!(reason(&err), "STORE_UNAVAILABLE");
    assert!(
        !err.message().contains("127.0.0.1"),
        "server faults keep their cause out of the message"
    );
    h.stop().await;
}

#[tokio::test]
async fn reflection_and_health_are_served() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let h = Harness::start().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", h.grpc_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream_once(req))
        .await
        .expect("reflection")
        .into_inner();
    let resp = stream
        .message()
        .await
        .expect("answer")
        .expect("one message");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("not a list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"session_broker.v1.SessionBroker".to_owned()),
        "{names:?}"
    );

    let mut health = HealthClient::new(channel);
    let mut serving = false;
    for _ in 0..50 {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "session_broker.v1.SessionBroker".into(),
            })
            .await;
        if r.is_ok_and(|r| {
            r.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        }) {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(serving, "health never reported SERVING");
    h.stop().await;
}

fn tokio_stream_once<T: Send + 'static>(
    item: T,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> {
    tonic::codegen::tokio_stream::iter(vec![item])
}
