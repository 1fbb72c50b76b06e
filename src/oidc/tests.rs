//! End-to-end tests of [`Cis2Client`] against a small CIS2 stand-in served by axum on
//! 127.0.0.1:0, with ID tokens really signed (RS256 and RS512) in the test.

use super::*;
use crate::aal::Aal;
use crate::clock::{Clock, ManualClock, unix_seconds};
use axum::extract::{Form, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jsonwebtoken::jwk::{Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rsa::PrivateKey as RsaPrivateKey;
use rsa::pkcs1::EncodeRsaPrivateKey;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

const CLIENT: &str = "broker-client";
const SECRET: &str = "client-secret-value";
const REDIRECT: &str = "https://app.example.test/callback";
const CODE: &str = "the-authorization-code";
const VERIFIER: &str = "the-pkce-verifier-0123456789-0123456789-abc";
const NONCE: &str = "the-nonce";
const ACCESS: &str = "the-access-token";
const KID: &str = "cis2-k1";
const KID_512: &str = "cis2-k512";
const SUB: &str = "656005750108";
/// CIS2's issuer style: explicit ":443", on a host the tests never contact.
const ISS: &str =
    "https://am.example.test:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare";

// ---------------------------------------------------------------------------------------------
// Keys and tokens

struct TestKey {
    encoding: EncodingKey,
    jwk: Jwk,
}

fn make_key(seed_kid: &str) -> TestKey {
    let private = RsaPrivateKey::new(&mut rand::rng(), 2048).expect("RSA key generation works");
    let der = private.to_pkcs1_der().expect("a generated key encodes");
    let encoding = EncodingKey::from_rsa_der(der.as_bytes());
    let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).expect("RSA JWK");
    jwk.common.key_id = Some(seed_kid.to_owned());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    TestKey { encoding, jwk }
}

/// CIS2's signing key: generated once, shared by the tests (RSA generation is slow).
fn cis2_key() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| make_key(KID))
}

/// A key nobody published.
fn rogue_key() -> &'static TestKey {
    static KEY: OnceLock<TestKey> = OnceLock::new();
    KEY.get_or_init(|| make_key(KID))
}

fn published(kid: &str, alg: KeyAlgorithm) -> Value {
    let mut jwk = cis2_key().jwk.clone();
    jwk.common.key_id = Some(kid.to_owned());
    jwk.common.key_algorithm = Some(alg);
    serde_json::to_value(jwk).expect("JWK serialises")
}

fn default_jwks() -> Value {
    json!({"keys": [published(KID, KeyAlgorithm::RS256), published(KID_512, KeyAlgorithm::RS512)]})
}

fn claims_at(now: SystemTime) -> Value {
    let now = unix_seconds(now);
    json!({
        "iss": ISS, "sub": SUB, "aud": CLIENT, "azp": CLIENT,
        "iat": now, "exp": now + 300, "auth_time": now - 5, "nonce": NONCE,
        "acr": "AAL2_OR_AAL3_ANY", "amr": ["N3_SMARTCARD"],
        "authentication_assurance_level": "3", "id_assurance_level": "3",
        "sid": "cis2-sid-1", "selected_roleid": "555254242106"
    })
}

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, key).expect("test token signs")
}

fn good_token(clock: &ManualClock) -> String {
    sign(
        Algorithm::RS256,
        KID,
        &cis2_key().encoding,
        &claims_at(clock.now()),
    )
}

fn expectations(clock: &ManualClock) -> IdTokenExpectations<'static> {
    IdTokenExpectations {
        nonce: NONCE,
        min_aal: Aal::Aal2,
        not_before_auth: clock.now() - Duration::from_secs(30),
        max_age: None,
    }
}

// ---------------------------------------------------------------------------------------------
// The CIS2 stand-in

#[derive(Clone, Copy, PartialEq, Debug)]
enum TokenMode {
    Ok,
    InvalidGrant,
    ServerError,
    Slow,
    NoIdToken,
    NotJson,
}

enum ExpectAuth {
    Secret,
    Jwt(Value),
}

struct IdpState {
    base: String,
    issuer: String,
    discovery_hits: AtomicUsize,
    jwks_hits: AtomicUsize,
    discovery_down: AtomicBool,
    discovery_delay: Mutex<Duration>,
    discovery_redirect: AtomicBool,
    jwks_down: AtomicBool,
    jwks: Mutex<Value>,
    token_mode: Mutex<TokenMode>,
    expect_auth: Mutex<ExpectAuth>,
    id_token: Mutex<String>,
    userinfo: Mutex<Value>,
    userinfo_huge: AtomicBool,
}

struct Idp {
    state: Arc<IdpState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const REALM: &str = "/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare";

impl Idp {
    async fn start(issuer: &str) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free port");
        let addr = listener.local_addr().expect("bound address");
        let state = Arc::new(IdpState {
            base: format!("http://{addr}{REALM}"),
            issuer: issuer.to_owned(),
            discovery_hits: AtomicUsize::new(0),
            jwks_hits: AtomicUsize::new(0),
            discovery_down: AtomicBool::new(false),
            discovery_delay: Mutex::new(Duration::ZERO),
            discovery_redirect: AtomicBool::new(false),
            jwks_down: AtomicBool::new(false),
            jwks: Mutex::new(default_jwks()),
            token_mode: Mutex::new(TokenMode::Ok),
            expect_auth: Mutex::new(ExpectAuth::Secret),
            id_token: Mutex::new(String::new()),
            userinfo: Mutex::new(json!({"sub": SUB, "name": "Ann Example"})),
            userinfo_huge: AtomicBool::new(false),
        });
        let router = Router::new()
            .route(
                &format!("{REALM}/.well-known/openid-configuration"),
                get(discovery),
            )
            .route(&format!("{REALM}/connect/jwk_uri"), get(jwks))
            .route(&format!("{REALM}/access_token"), post(token))
            .route(&format!("{REALM}/userinfo"), get(userinfo))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .await
                .expect("test server runs");
        });
        Idp { state, task }
    }

    fn discovery_url(&self) -> Url {
        Url::parse(&format!(
            "{}/.well-known/openid-configuration",
            self.state.base
        ))
        .expect("url")
    }

    fn token_url(&self) -> String {
        format!("{}/access_token", self.state.base)
    }

    fn discovery_hits(&self) -> usize {
        self.state.discovery_hits.load(Ordering::SeqCst)
    }

    fn jwks_hits(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }

    fn set_token_mode(&self, mode: TokenMode) {
        *self.state.token_mode.lock().expect("lock") = mode;
    }
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

async fn discovery(State(s): State<Arc<IdpState>>) -> Response {
    s.discovery_hits.fetch_add(1, Ordering::SeqCst);
    let delay = *s.discovery_delay.lock().expect("lock");
    tokio::time::sleep(delay).await;
    if s.discovery_down.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if s.discovery_redirect.load(Ordering::SeqCst) {
        return (
            StatusCode::FOUND,
            [("location", "https://elsewhere.example.test/")],
        )
            .into_response();
    }
    Json(json!({
        "issuer": s.issuer,
        "authorization_endpoint": format!("{}/authorize?realm=Healthcare", s.base),
        "token_endpoint": format!("{}/access_token", s.base),
        "jwks_uri": format!("{}/connect/jwk_uri", s.base),
        "userinfo_endpoint": format!("{}/userinfo", s.base),
        "end_session_endpoint": format!("{}/connect/endSession", s.base),
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
    .into_response()
}

async fn jwks(State(s): State<Arc<IdpState>>) -> Response {
    s.jwks_hits.fetch_add(1, Ordering::SeqCst);
    if s.jwks_down.load(Ordering::SeqCst) {
        return StatusCode::BAD_GATEWAY.into_response();
    }
    Json(s.jwks.lock().expect("lock").clone()).into_response()
}

async fn token(
    State(s): State<Arc<IdpState>>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mode = *s.token_mode.lock().expect("lock");
    match mode {
        TokenMode::InvalidGrant => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "grant is invalid or expired",
            );
        }
        TokenMode::ServerError => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        TokenMode::Slow => tokio::time::sleep(Duration::from_secs(10)).await,
        TokenMode::NotJson => return (StatusCode::OK, "<html>hello</html>").into_response(),
        TokenMode::Ok | TokenMode::NoIdToken => {}
    }
    let field = |k: &str| form.get(k).map(String::as_str);
    for (k, want) in [
        ("grant_type", "authorization_code"),
        ("code", CODE),
        ("redirect_uri", REDIRECT),
        ("code_verifier", VERIFIER),
        ("client_id", CLIENT),
    ] {
        if field(k) != Some(want) {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!("bad {k}"),
            );
        }
    }
    let token_url = format!("{}/access_token", s.base);
    if let Err(why) = check_client_auth(&s.expect_auth.lock().expect("lock"), &form, &token_url) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", &why);
    }
    let mut body = json!({"access_token": ACCESS, "token_type": "Bearer", "expires_in": 3599});
    if mode == TokenMode::Ok {
        body["id_token"] = json!(s.id_token.lock().expect("lock").clone());
    }
    Json(body).into_response()
}

/// Checks the client authentication as CIS2 would, including the assertion's signature.
fn check_client_auth(
    expect: &ExpectAuth,
    form: &HashMap<String, String>,
    token_url: &str,
) -> Result<(), String> {
    match expect {
        ExpectAuth::Secret => {
            if form.get("client_secret").map(String::as_str) != Some(SECRET) {
                return Err("client_secret".into());
            }
            if form.contains_key("client_assertion") {
                return Err("unexpected client_assertion".into());
            }
        }
        ExpectAuth::Jwt(broker_jwks) => {
            if form.contains_key("client_secret") {
                return Err("unexpected client_secret".into());
            }
            if form.get("client_assertion_type").map(String::as_str)
                != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            {
                return Err("client_assertion_type".into());
            }
            let assertion = form.get("client_assertion").ok_or("no client_assertion")?;
            let header = jsonwebtoken::decode_header(assertion).map_err(|e| e.to_string())?;
            if header.alg != Algorithm::RS512 || header.typ.as_deref() != Some("JWT") {
                return Err("assertion header".into());
            }
            let kid = header.kid.ok_or("assertion kid")?;
            let set: jsonwebtoken::jwk::JwkSet =
                serde_json::from_value(broker_jwks.clone()).map_err(|e| e.to_string())?;
            let jwk = set.find(&kid).ok_or("assertion kid unknown")?;
            let mut validation = Validation::new(Algorithm::RS512);
            validation.set_audience(&[token_url]);
            validation.set_issuer(&[CLIENT]);
            validation.sub = Some(CLIENT.to_owned());
            validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
            let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
            let claims = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
                .map_err(|e| format!("assertion: {e}"))?
                .claims;
            let lifetime =
                claims["exp"].as_i64().unwrap_or(0) - claims["iat"].as_i64().unwrap_or(0);
            if !(1..=300).contains(&lifetime) || claims["jti"].as_str().is_none_or(str::is_empty) {
                return Err("assertion iat/exp/jti".into());
            }
        }
    }
    Ok(())
}

async fn userinfo(State(s): State<Arc<IdpState>>, headers: HeaderMap) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if bearer != Some(ACCESS) {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "access token not valid",
        );
    }
    if s.userinfo_huge.load(Ordering::SeqCst) {
        let filler = "x".repeat(fetch::MAX_BODY_BYTES + 10);
        return Json(json!({"sub": SUB, "filler": filler})).into_response();
    }
    Json(s.userinfo.lock().expect("lock").clone()).into_response()
}

// ---------------------------------------------------------------------------------------------
// Client set-up

fn settings(idp: &Idp, issuer: &str, client_auth: ClientAuth) -> OidcSettings {
    OidcSettings {
        issuer: issuer.to_owned(),
        discovery_url: idp.discovery_url(),
        client_id: CLIENT.to_owned(),
        client_auth,
        http_timeout: Duration::from_secs(5),
        clock_skew: Duration::from_secs(60),
        discovery_refresh: Duration::from_secs(3600),
        jwks_min_refresh_interval: Duration::from_secs(30),
        userinfo: true,
    }
}

fn secret_post() -> ClientAuth {
    ClientAuth::SecretPost(Secret::new(SECRET.to_owned()))
}

fn client_with(settings: OidcSettings) -> (Cis2Client, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(SystemTime::now()));
    let client = Cis2Client::new(settings, clock.clone()).expect("valid settings");
    (client, clock)
}

async fn setup() -> (Idp, Cis2Client, Arc<ManualClock>) {
    let idp = Idp::start(ISS).await;
    let (client, clock) = client_with(settings(&idp, ISS, secret_post()));
    (idp, client, clock)
}

fn rejected_detail(result: Result<impl std::fmt::Debug, OidcError>) -> String {
    match result {
        Err(OidcError::Rejected {
            idp_error: None,
            detail,
        }) => detail,
        other => panic!("expected Rejected without an IdP error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// ID tokens

#[tokio::test]
async fn good_rs256_and_rs512_tokens_are_accepted() {
    let (idp, client, clock) = setup().await;
    assert!(!client.is_ready(), "new() does no network I/O");
    assert_eq!(idp.discovery_hits(), 0);

    let claims = client
        .validate_id_token(&good_token(&clock), &expectations(&clock))
        .await
        .expect("a good RS256 token passes");
    assert_eq!(claims.sub, SUB);
    assert_eq!(claims.aal, Aal::Aal3);
    assert_eq!(claims.sid.as_deref(), Some("cis2-sid-1"));
    assert_eq!(claims.selected_roleid.as_deref(), Some("555254242106"));

    let rs512 = sign(
        Algorithm::RS512,
        KID_512,
        &cis2_key().encoding,
        &claims_at(clock.now()),
    );
    client
        .validate_id_token(&rs512, &expectations(&clock))
        .await
        .expect("a good RS512 token passes");
    assert!(client.is_ready());
    assert_eq!(
        (idp.discovery_hits(), idp.jwks_hits()),
        (1, 1),
        "both cached"
    );
}

#[tokio::test]
async fn forged_and_foreign_tokens_are_refused() {
    let (idp, client, clock) = setup().await;
    let expect = expectations(&clock);
    client
        .validate_id_token(&good_token(&clock), &expect)
        .await
        .expect("warm the caches");
    let claims = claims_at(clock.now());
    let b64 = |v: &Value| {
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            v.to_string(),
        )
    };
    let with_iss = |iss: &str| {
        let mut c = claims.clone();
        c["iss"] = json!(iss);
        sign(Algorithm::RS256, KID, &cis2_key().encoding, &c)
    };
    let cases = [
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "kid": KID})),
                b64(&claims)
            ),
            "signing algorithm none is not allowed",
        ),
        (
            "HS256 with a shared secret",
            sign(
                Algorithm::HS256,
                KID,
                &EncodingKey::from_secret(b"guessable").expect("an HMAC key"),
                &claims,
            ),
            "signing algorithm HS256 is not allowed",
        ),
        (
            "signed by another key under CIS2's kid",
            sign(Algorithm::RS256, KID, &rogue_key().encoding, &claims),
            "the signature does not verify",
        ),
        (
            "RS512 token under an RS256-only key",
            sign(Algorithm::RS512, KID, &cis2_key().encoding, &claims),
            "alg differs from the alg of CIS2's key",
        ),
        (
            "wrong issuer",
            with_iss("https://evil.example.test"),
            "is not the configured CIS2 issuer",
        ),
        (
            "issuer differing only by :443",
            with_iss(&ISS.replace(":443", "")),
            "is not the configured CIS2 issuer",
        ),
        (
            "garbage",
            "not.a.jwt".to_owned(),
            "not a well-formed signed JWT",
        ),
    ];
    for (name, token, why) in cases {
        let detail = rejected_detail(client.validate_id_token(&token, &expect).await);
        assert!(detail.contains(why), "{name}: {detail}");
        assert!(
            !detail.contains(&token),
            "{name}: the token is never echoed"
        );
    }
    assert_eq!(idp.jwks_hits(), 1, "known kids never trigger a JWKS fetch");
}

#[tokio::test]
async fn an_unknown_kid_refetches_the_jwks_once_then_refuses() {
    let (idp, client, clock) = setup().await;
    client
        .validate_id_token(&good_token(&clock), &expectations(&clock))
        .await
        .expect("warm the caches");
    assert_eq!(idp.jwks_hits(), 1);

    clock.advance(Duration::from_secs(31));
    let unknown = sign(
        Algorithm::RS256,
        "rotated-k2",
        &cis2_key().encoding,
        &claims_at(clock.now()),
    );
    for _ in 0..3 {
        let detail = rejected_detail(
            client
                .validate_id_token(&unknown, &expectations(&clock))
                .await,
        );
        assert!(
            detail.contains("key (kid) that CIS2 does not publish"),
            "{detail}"
        );
    }
    assert_eq!(
        idp.jwks_hits(),
        2,
        "one re-fetch per interval, however many tokens"
    );

    // CIS2 rotates: after the interval the new key is fetched and trusted.
    idp.state
        .jwks
        .lock()
        .expect("lock")
        .as_object_mut()
        .expect("object")["keys"]
        .as_array_mut()
        .expect("keys")
        .push(published("rotated-k2", KeyAlgorithm::RS256));
    clock.advance(Duration::from_secs(31));
    let rotated = sign(
        Algorithm::RS256,
        "rotated-k2",
        &cis2_key().encoding,
        &claims_at(clock.now()),
    );
    client
        .validate_id_token(&rotated, &expectations(&clock))
        .await
        .expect("the rotated key is fetched");
    assert_eq!(idp.jwks_hits(), 3);
}

#[tokio::test]
async fn cached_keys_and_discovery_keep_working_while_cis2_is_down() {
    let (idp, client, clock) = setup().await;
    client
        .validate_id_token(&good_token(&clock), &expectations(&clock))
        .await
        .expect("warm the caches");
    idp.state.jwks_down.store(true, Ordering::SeqCst);
    idp.state.discovery_down.store(true, Ordering::SeqCst);

    client
        .validate_id_token(&good_token(&clock), &expectations(&clock))
        .await
        .expect("cached key, endpoint not even asked");
    assert_eq!(idp.jwks_hits(), 1);

    // Both caches are due for a refresh; both refreshes fail; the cached copies still serve.
    clock.advance(Duration::from_secs(3601));
    client
        .validate_id_token(&good_token(&clock), &expectations(&clock))
        .await
        .expect("stale caches are used when refreshes fail");
    assert_eq!((idp.discovery_hits(), idp.jwks_hits()), (2, 2));
    assert!(client.is_ready());

    // An unknown kid cannot be resolved while the JWKS is down: retryable, not a rejection.
    clock.advance(Duration::from_secs(31));
    let unknown = sign(
        Algorithm::RS256,
        "other",
        &cis2_key().encoding,
        &claims_at(clock.now()),
    );
    assert!(matches!(
        client
            .validate_id_token(&unknown, &expectations(&clock))
            .await,
        Err(OidcError::Unavailable(_))
    ));
}

#[tokio::test]
async fn a_cold_client_with_cis2_down_is_unavailable() {
    let (idp, client, clock) = setup().await;
    idp.state.discovery_down.store(true, Ordering::SeqCst);
    assert!(matches!(
        client.ensure_ready().await,
        Err(OidcError::Unavailable(_))
    ));
    assert!(!client.is_ready());
    idp.state.discovery_down.store(false, Ordering::SeqCst);
    idp.state.jwks_down.store(true, Ordering::SeqCst);
    assert!(matches!(
        client
            .validate_id_token(&good_token(&clock), &expectations(&clock))
            .await,
        Err(OidcError::Unavailable(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// Discovery

#[tokio::test]
async fn the_issuer_must_be_configured_exactly_as_discovery_states_it() {
    let idp = Idp::start(ISS).await;
    let (verbatim, _) = client_with(settings(&idp, ISS, secret_post()));
    verbatim
        .ensure_ready()
        .await
        .expect("verbatim issuer with :443 is accepted");
    assert!(verbatim.is_ready());

    let without_port = ISS.replace(":443", "");
    let (normalised, _) = client_with(settings(&idp, &without_port, secret_post()));
    match normalised.ensure_ready().await {
        Err(OidcError::Misconfigured(text)) => assert_eq!(
            text,
            format!(
                "CIS2 discovery states issuer \"{ISS}\" but the configuration says \"{without_port}\": set cis2.issuer to exactly \"{ISS}\""
            )
        ),
        other => panic!("expected Misconfigured, got {other:?}"),
    }
    assert!(!normalised.is_ready());
}

#[tokio::test]
async fn concurrent_first_callers_share_one_discovery_fetch() {
    let (idp, client, _) = setup().await;
    *idp.state.discovery_delay.lock().expect("lock") = Duration::from_millis(200);
    let calls = (0..8).map(|_| {
        let client = client.clone();
        tokio::spawn(async move { client.ensure_ready().await })
    });
    for call in calls {
        call.await.expect("task runs").expect("ready");
    }
    assert_eq!(idp.discovery_hits(), 1);
}

#[tokio::test]
async fn discovery_is_refetched_when_old_and_redirects_are_not_followed() {
    let (idp, client, clock) = setup().await;
    client.ensure_ready().await.expect("ready");
    clock.advance(Duration::from_secs(3599));
    client.ensure_ready().await.expect("ready");
    assert_eq!(idp.discovery_hits(), 1);
    clock.advance(Duration::from_secs(2));
    client.ensure_ready().await.expect("ready");
    assert_eq!(idp.discovery_hits(), 2);

    let (redirected, _) = client_with(settings(&idp, ISS, secret_post()));
    idp.state.discovery_redirect.store(true, Ordering::SeqCst);
    match redirected.ensure_ready().await {
        Err(OidcError::Misconfigured(text)) => {
            assert!(
                text.contains("HTTP 302 (redirects are not followed)"),
                "{text}"
            )
        }
        other => panic!("expected Misconfigured, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Code redemption

fn with_id_token(idp: &Idp, token: &str) {
    *idp.state.id_token.lock().expect("lock") = token.to_owned();
}

#[tokio::test]
async fn redeems_a_code_with_client_secret_post() {
    let (idp, client, clock) = setup().await;
    with_id_token(&idp, &good_token(&clock));
    let tokens = client
        .redeem_code(CODE, REDIRECT, VERIFIER)
        .await
        .expect("redeemed");
    assert_eq!(tokens.id_token.expose(), &good_token(&clock));
    assert_eq!(
        tokens.access_token.as_ref().map(|t| t.expose().as_str()),
        Some(ACCESS)
    );
    assert_eq!(tokens.expires_in, Some(3599));
    let debug = format!("{tokens:?}");
    assert!(!debug.contains(ACCESS) && !debug.contains("eyJ"), "{debug}");
}

#[tokio::test]
async fn redeems_a_code_with_private_key_jwt() {
    let idp = Idp::start(ISS).await;
    let keys = Arc::new(crate::signing::SigningKeys::generate("broker-k1").expect("key"));
    *idp.state.expect_auth.lock().expect("lock") = ExpectAuth::Jwt(keys.public_jwks_json());
    let (client, clock) = client_with(settings(&idp, ISS, ClientAuth::PrivateKeyJwt(keys)));
    with_id_token(&idp, &good_token(&clock));
    let tokens = client
        .redeem_code(CODE, REDIRECT, VERIFIER)
        .await
        .expect("the stand-in verified the assertion against the broker's JWKS");
    assert!(!tokens.id_token.expose().is_empty());

    // A different broker key than the one registered is refused by the IdP.
    let other = Arc::new(crate::signing::SigningKeys::generate("broker-k1").expect("key"));
    let (client, _) = client_with(settings(&idp, ISS, ClientAuth::PrivateKeyJwt(other)));
    match client.redeem_code(CODE, REDIRECT, VERIFIER).await {
        Err(OidcError::Rejected { idp_error, .. }) => {
            assert_eq!(idp_error.as_deref(), Some("invalid_client"))
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert!(idp.token_url().ends_with("/access_token"));
}

#[tokio::test]
async fn code_redemption_failures_are_classified() {
    let (idp, client, _) = setup().await;

    idp.set_token_mode(TokenMode::InvalidGrant);
    match client.redeem_code(CODE, REDIRECT, VERIFIER).await {
        Err(OidcError::Rejected { idp_error, detail }) => {
            assert_eq!(idp_error.as_deref(), Some("invalid_grant"));
            assert!(
                !detail.contains(CODE) && !detail.contains(VERIFIER),
                "{detail}"
            );
        }
        other => panic!("expected Rejected, got {other:?}"),
    }

    idp.set_token_mode(TokenMode::Ok);
    match client.redeem_code("another-code", REDIRECT, VERIFIER).await {
        Err(OidcError::Rejected { idp_error, .. }) => {
            assert_eq!(idp_error.as_deref(), Some("invalid_request"))
        }
        other => panic!("expected Rejected, got {other:?}"),
    }

    idp.set_token_mode(TokenMode::NoIdToken);
    let detail = rejected_detail(client.redeem_code(CODE, REDIRECT, VERIFIER).await);
    assert!(detail.contains("no id_token"), "{detail}");

    idp.set_token_mode(TokenMode::ServerError);
    assert!(matches!(
        client.redeem_code(CODE, REDIRECT, VERIFIER).await,
        Err(OidcError::Unavailable(_))
    ));

    idp.set_token_mode(TokenMode::NotJson);
    assert!(matches!(
        client.redeem_code(CODE, REDIRECT, VERIFIER).await,
        Err(OidcError::Unavailable(_))
    ));
}

#[tokio::test]
async fn a_slow_token_endpoint_or_no_server_is_unavailable() {
    let idp = Idp::start(ISS).await;
    let mut s = settings(&idp, ISS, secret_post());
    s.http_timeout = Duration::from_millis(300);
    let (client, _) = client_with(s);
    client.ensure_ready().await.expect("ready");
    idp.set_token_mode(TokenMode::Slow);
    match client.redeem_code(CODE, REDIRECT, VERIFIER).await {
        Err(OidcError::Unavailable(text)) => assert!(text.contains("timed out"), "{text}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }

    // Nothing listening at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let mut s = settings(&idp, ISS, secret_post());
    s.discovery_url = Url::parse(&format!(
        "http://127.0.0.1:{port}/.well-known/openid-configuration"
    ))
    .expect("url");
    let (nowhere, _) = client_with(s);
    assert!(matches!(
        nowhere.ensure_ready().await,
        Err(OidcError::Unavailable(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// UserInfo

#[tokio::test]
async fn userinfo_maps_the_profile_and_checks_the_subject() {
    let (idp, client, _) = setup().await;
    *idp.state.userinfo.lock().expect("lock") = json!({
        "sub": SUB, "name": "Ann Example", "given_name": "Ann", "family_name": "Example",
        "nhsid_nrbac_roles": [{"person_roleid": "555254242106", "role_code": "S8000:G8000:R8000", "role_name": "Clinical", "org_code": "RX1"}],
        "nhsid_user_orgs": [{"org_code": "RX1", "org_name": "Example Trust"}]
    });
    let info = client.userinfo(ACCESS, SUB).await.expect("userinfo");
    assert_eq!(info.user.uid, SUB);
    assert_eq!(info.user.given_name, "Ann");
    assert_eq!(info.roles.len(), 1);
    assert_eq!(info.roles[0].org_name, "Example Trust");
    assert_eq!(info.organisations.len(), 1);

    let detail = rejected_detail(client.userinfo(ACCESS, "someone-else").await);
    assert!(detail.contains("subject differs"), "{detail}");

    match client.userinfo("stale-access-token", SUB).await {
        Err(OidcError::Rejected { idp_error, detail }) => {
            assert_eq!(idp_error.as_deref(), Some("invalid_token"));
            assert!(!detail.contains("stale-access-token"));
        }
        other => panic!("expected Rejected, got {other:?}"),
    }

    idp.state.userinfo_huge.store(true, Ordering::SeqCst);
    assert!(matches!(
        client.userinfo(ACCESS, SUB).await,
        Err(OidcError::Unavailable(_))
    ));
}

// ---------------------------------------------------------------------------------------------
// URLs

#[tokio::test]
async fn the_authorization_url_carries_every_parameter_on_discoverys_endpoint() {
    let (idp, client, _) = setup().await;
    let url = client
        .authorization_url(&AuthorizationRequest {
            redirect_uri: REDIRECT,
            scopes: "openid profile nationalrbacaccess selectedrole",
            state: "st&te=1",
            nonce: NONCE,
            pkce_challenge: "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
            acr_values: "AAL2_OR_AAL3_ANY",
            max_age: Some(300),
            prompt: Some("login"),
        })
        .await
        .expect("url");
    assert!(
        url.as_str()
            .starts_with(&format!("{}/authorize?", idp.state.base))
    );
    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let want: Vec<(String, String)> = [
        ("realm", "Healthcare"),
        ("response_type", "code"),
        ("client_id", CLIENT),
        ("redirect_uri", REDIRECT),
        ("scope", "openid profile nationalrbacaccess selectedrole"),
        ("state", "st&te=1"),
        ("nonce", NONCE),
        (
            "code_challenge",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        ),
        ("code_challenge_method", "S256"),
        ("acr_values", "AAL2_OR_AAL3_ANY"),
        ("prompt", "login"),
        ("max_age", "300"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    assert_eq!(pairs, want);
    assert!(
        url.as_str().contains("state=st%26te%3D1"),
        "form-encoded: {url}"
    );

    let minimal = client
        .authorization_url(&AuthorizationRequest {
            redirect_uri: REDIRECT,
            scopes: "openid",
            state: "s",
            nonce: "n",
            pkce_challenge: "c",
            acr_values: "",
            max_age: None,
            prompt: None,
        })
        .await
        .expect("url");
    let keys: Vec<String> = minimal.query_pairs().map(|(k, _)| k.into_owned()).collect();
    assert!(
        !keys
            .iter()
            .any(|k| k == "acr_values" || k == "prompt" || k == "max_age")
    );

    for (scopes, state) in [("profile", "s"), ("openid", "")] {
        let bad = AuthorizationRequest {
            redirect_uri: REDIRECT,
            scopes,
            state,
            nonce: "n",
            pkce_challenge: "c",
            acr_values: "",
            max_age: None,
            prompt: None,
        };
        assert!(matches!(
            client.authorization_url(&bad).await,
            Err(OidcError::Misconfigured(_))
        ));
    }
}

#[tokio::test]
async fn the_end_session_url_comes_from_discovery() {
    let (idp, client, _) = setup().await;
    let bare = client.end_session_url(None, None).await.expect("url");
    assert_eq!(
        bare.as_str(),
        format!("{}/connect/endSession", idp.state.base)
    );
    let full = client
        .end_session_url(Some("id.token.hint"), Some("https://app.example.test/bye"))
        .await
        .expect("url");
    let pairs: HashMap<String, String> = full.query_pairs().into_owned().collect();
    assert_eq!(pairs["id_token_hint"], "id.token.hint");
    assert_eq!(
        pairs["post_logout_redirect_uri"],
        "https://app.example.test/bye"
    );
}

#[test]
fn settings_are_checked_without_network_io() {
    let mut s = OidcSettings::with_defaults(ISS, CLIENT, secret_post()).expect("defaults");
    assert_eq!(
        s.discovery_url.as_str(),
        "https://am.example.test/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare/.well-known/openid-configuration",
        "the default discovery URL drops :443, as CIS2 serves it"
    );
    assert_eq!(s.issuer, ISS, "the issuer stays verbatim");
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::new(SystemTime::now()));
    assert!(Cis2Client::new(s.clone(), clock.clone()).is_ok());
    s.client_id = String::new();
    assert!(matches!(
        Cis2Client::new(s, clock),
        Err(OidcError::Misconfigured(_))
    ));
    assert!(matches!(
        OidcSettings::with_defaults("not a url", CLIENT, secret_post()),
        Err(OidcError::Misconfigured(_))
    ));
    let debug = format!("{:?}", secret_post());
    assert!(!debug.contains(SECRET), "{debug}");
}
