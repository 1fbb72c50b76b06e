//! Property tests: malformed and random JWTs, logout tokens, claims, session tokens, form bodies
//! and configuration values thrown at the parsers. Each must answer with an error (or a value),
//! never panic, and never accept what it must refuse.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cis2_session_broker::aal::Aal;
use cis2_session_broker::config::Config;
use cis2_session_broker::http::backchannel::logout_token;
use cis2_session_broker::oidc::claims::{
    BACKCHANNEL_LOGOUT_EVENT, check_id_token_claims, check_logout_token_claims,
};
use cis2_session_broker::oidc::id_token::{check_logout_typ, parse_header};
use cis2_session_broker::oidc::{ClaimRules, IdTokenExpectations};
use cis2_session_broker::session::{SessionId, SessionToken};
use proptest::prelude::*;
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ISSUER: &str = "https://cis2.test:443/openam/oauth2/realms/root/realms/oidc";
const CLIENT: &str = "client-1";

fn rules() -> ClaimRules<'static> {
    ClaimRules {
        issuer: ISSUER,
        client_id: CLIENT,
        clock_skew: Duration::from_secs(60),
    }
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// Any JSON value, a few levels deep, with the claim names that matter among its keys.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::from),
        Just(Value::from(ISSUER)),
        Just(Value::from(CLIENT)),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((claim_name(), inner), 0..10)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn claim_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("iss".to_owned()),
        Just("aud".to_owned()),
        Just("sub".to_owned()),
        Just("sid".to_owned()),
        Just("iat".to_owned()),
        Just("exp".to_owned()),
        Just("jti".to_owned()),
        Just("nonce".to_owned()),
        Just("events".to_owned()),
        Just("auth_time".to_owned()),
        Just("azp".to_owned()),
        Just("amr".to_owned()),
        Just("authentication_assurance_level".to_owned()),
        Just(BACKCHANNEL_LOGOUT_EVENT.to_owned()),
        "[a-z_]{1,12}",
    ]
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Strings shaped like a compact JWS, with random or JSON parts.
fn jwt_like() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,300}",
        "[A-Za-z0-9_.-]{0,300}",
        (any_json(), any_json(), "[A-Za-z0-9_-]{0,40}").prop_map(|(h, c, sig)| format!(
            "{}.{}.{sig}",
            b64(h.to_string().as_bytes()),
            b64(c.to_string().as_bytes())
        )),
        (prop::collection::vec(any::<u8>(), 0..200), 0usize..6).prop_map(|(bytes, dots)| {
            let part = b64(&bytes);
            vec![part; dots + 1].join(".")
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn header_parsing_never_panics_and_allows_only_rs256_rs512(token in jwt_like()) {
        if let Ok(header) = parse_header(&token) {
            prop_assert!(matches!(
                header.alg,
                jsonwebtoken::Algorithm::RS256 | jsonwebtoken::Algorithm::RS512
            ));
            prop_assert!(!header.kid.is_empty());
        }
        let _ = check_logout_typ(&token);
    }

    #[test]
    fn id_token_claims_checks_never_panic(claims in any_json(), nonce in ".{0,20}") {
        let expect = IdTokenExpectations {
            nonce: &nonce,
            min_aal: Aal::Aal2,
            not_before_auth: now() - Duration::from_secs(60),
            max_age: Some(300),
        };
        if let Ok(c) = check_id_token_claims(&claims, &expect, &rules(), now()) {
            prop_assert!(!nonce.is_empty());
            prop_assert!(c.aal >= Aal::Aal2);
        }
    }

    #[test]
    fn logout_claims_checks_never_panic_and_never_accept_a_nonce(claims in any_json()) {
        if let Ok(c) = check_logout_token_claims(&claims, &rules(), now()) {
            prop_assert!(claims.get("nonce").is_none());
            prop_assert!(c.sid.is_some() || c.sub.is_some());
            prop_assert!(!c.jti.is_empty());
            prop_assert_eq!(claims["iss"].as_str(), Some(ISSUER));
        }
    }

    #[test]
    fn a_valid_logout_token_with_any_extra_claim_named_nonce_is_refused(value in any_json()) {
        let t = 1_800_000_000i64;
        let mut claims = json!({
            "iss": ISSUER, "aud": CLIENT, "iat": t, "exp": t + 60, "jti": "j",
            "sid": "s", "events": { BACKCHANNEL_LOGOUT_EVENT: {} },
        });
        prop_assert!(check_logout_token_claims(&claims, &rules(), now()).is_ok());
        claims["nonce"] = value;
        prop_assert!(check_logout_token_claims(&claims, &rules(), now()).is_err());
    }

    #[test]
    fn session_tokens_and_ids_parse_strictly(raw in ".{0,200}") {
        if let Some(token) = SessionToken::parse(&raw) {
            prop_assert_eq!(token.expose(), raw.as_str());
        }
        if let Some(id) = SessionId::parse(&raw) {
            prop_assert_eq!(id.as_str().len(), 32);
        }
    }

    #[test]
    fn the_logout_form_never_panics(body in prop::collection::vec(any::<u8>(), 0..2000)) {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        if let Ok(token) = logout_token(&headers, &body) {
            prop_assert!(!token.is_empty());
        }
    }

    #[test]
    fn config_env_values_never_panic(
        name in prop_oneof![
            Just("BROKER__ENCRYPTION__KEYS"),
            Just("BROKER__SIGNING__KEYS"),
            Just("BROKER__CIS2__ISSUER"),
            Just("BROKER__SESSIONS__IDLE_TIMEOUT_AAL2"),
            Just("BROKER__STORE__KEY_PREFIX"),
            Just("BROKER__SERVER__GRPC_ADDR"),
            Just("BROKER__X__Y__Z"),
            Just("BROKER__"),
        ],
        value in ".{0,200}",
    ) {
        let text = format!(
            "[store]\nkind = \"memory\"\n[cis2]\nissuer = {ISSUER:?}\nclient_id = {CLIENT:?}\nclient_secret = \"s\"\nredirect_uris = [\"https://a.test/cb\"]\n"
        );
        let _ = Config::from_toml_with_env(&text, vec![(name.to_owned(), value)]);
    }
}

#[test]
fn oversized_inputs_are_refused_without_panicking() {
    let huge = "a".repeat(1 << 20);
    let huge_jwt = format!("{huge}.{huge}.{huge}");
    assert!(parse_header(&huge_jwt).is_err());
    assert!(check_logout_typ(&huge_jwt).is_err());
    assert!(SessionToken::parse(&huge).is_none());
    let deep = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let header = format!("{}.e30.c2ln", b64(deep.as_bytes()));
    assert!(parse_header(&header).is_err());
    let mut body = b"logout_token=".to_vec();
    body.extend_from_slice(huge.as_bytes());
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    // The route's body limit refuses this before parsing; the parser alone still copes.
    assert!(logout_token(&headers, &body).is_ok());
}
