//! The APIM token cache against a small APIM stand-in (an axum server on 127.0.0.1:0 written
//! here, independent of the simulator) and real session stores: Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`, under a random key prefix; fails rather than skips when Redis is
//! down) and, where one replica is enough, the in-memory store.
//!
//! The stand-in checks what APIM checks (the form, the client assertion's signature, header and
//! claims, a never-reused `jti`, the client secret on refresh, single-use refresh tokens),
//! answers with string-typed numbers as APIM does, counts calls, and has fault knobs.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use cis2_session_broker::aal::Aal;
use cis2_session_broker::apim::{
    ApimClient, ApimError, IssuedToken, TokenGrant, TokenService, TokenSubject, token_field,
};
use cis2_session_broker::clock::{Clock, SystemClock, unix_seconds};
use cis2_session_broker::config::{ApimConfig, Pattern};
use cis2_session_broker::error::BrokerError;
use cis2_session_broker::secret::Secret;
use cis2_session_broker::session::codec::IdToken;
use cis2_session_broker::session::memory::MemoryStore;
use cis2_session_broker::session::redis::{RedisSettings, RedisStore};
use cis2_session_broker::session::token::random_urlsafe;
use cis2_session_broker::session::{
    KeyRing, LoginKey, SessionId, SessionStore, SessionToken, StoreError, StoredSession,
};
use cis2_session_broker::signing::SigningKeys;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;

const API_KEY: &str = "test-api-key-7c1e";
const CLIENT_SECRET: &str = "test-client-secret-9f3b2a71";
const KID: &str = "broker-test-1";
const MIN_VALIDITY: Duration = Duration::from_secs(60);
/// The stand-in's access tokens live 599 s: a `min_validity` above that forces a new token.
const FORCE_NEW: Duration = Duration::from_secs(600);
const SESSION_TTL: Duration = Duration::from_secs(120);
const CALLBACK: &str = "https://app.example.test/callback";
/// Far above anything a passing test needs: a call that hits it hung.
const HANG: Duration = Duration::from_secs(30);

// ---- the APIM stand-in -----------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    ServerError,
    UnauthorizedClient,
}

#[derive(Default)]
struct Ledger {
    jtis: HashSet<String>,
    live_refresh: HashSet<String>,
    used_refresh: HashSet<String>,
    /// A refresh token redeemed a second time: what the token cache must never do.
    reused_refresh: usize,
    /// Anything in a request that APIM would refuse: a correct client sends none.
    problems: Vec<String>,
    issued: u64,
}

struct StandIn {
    token_url: OnceLock<String>,
    signing: Arc<SigningKeys>,
    exchanges: AtomicUsize,
    refreshes: AtomicUsize,
    codes: AtomicUsize,
    delay_ms: AtomicU64,
    /// Faults to answer with, first in first out; each answers one call.
    faults: Mutex<Vec<Fault>>,
    ledger: Mutex<Ledger>,
}

impl StandIn {
    async fn start(signing: Arc<SigningKeys>) -> Arc<StandIn> {
        let standin = Arc::new(StandIn {
            token_url: OnceLock::new(),
            signing,
            exchanges: AtomicUsize::new(0),
            refreshes: AtomicUsize::new(0),
            codes: AtomicUsize::new(0),
            delay_ms: AtomicU64::new(0),
            faults: Mutex::new(Vec::new()),
            ledger: Mutex::new(Ledger::default()),
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding an ephemeral port succeeds");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        standin
            .token_url
            .set(format!("http://{addr}/oauth2/token"))
            .expect("set once, here");
        let app = Router::new()
            .route("/oauth2/token", post(token_endpoint))
            .with_state(standin.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        standin
    }

    fn token_url(&self) -> &str {
        self.token_url.get().expect("set by start")
    }

    fn slow(&self, delay: Duration) {
        self.delay_ms.store(
            u64::try_from(delay.as_millis()).expect("test delays are small"),
            Ordering::SeqCst,
        );
    }

    fn fail_next(&self, fault: Fault) {
        self.faults
            .lock()
            .expect("no panics under the lock")
            .push(fault);
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().expect("no panics under the lock")
    }

    /// Makes every refresh token issued so far unknown, as when APIM revokes them.
    fn revoke_refresh_tokens(&self) {
        self.ledger().live_refresh.clear();
    }

    fn calls(&self) -> (usize, usize) {
        (
            self.exchanges.load(Ordering::SeqCst),
            self.refreshes.load(Ordering::SeqCst),
        )
    }

    fn assert_clean(&self) {
        let ledger = self.ledger();
        assert!(
            ledger.problems.is_empty(),
            "APIM would refuse: {:?}",
            ledger.problems
        );
        assert_eq!(
            ledger.reused_refresh, 0,
            "a refresh token was redeemed twice"
        );
    }

    /// A new access and refresh token, as APIM writes them: every number a string.
    fn issue(&self) -> Response {
        let mut ledger = self.ledger();
        ledger.issued += 1;
        let n = ledger.issued;
        let refresh = format!("rt-{n}-{}", random_urlsafe(8));
        ledger.live_refresh.insert(refresh.clone());
        Json(json!({
            "access_token": format!("at-{n}-{}", random_urlsafe(8)),
            "expires_in": "599",
            "token_type": "Bearer",
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "refresh_token": refresh,
            "refresh_token_expires_in": "43199",
            "refresh_count": "0"
        }))
        .into_response()
    }

    /// Records a problem and answers as APIM does.
    fn refuse(&self, status: StatusCode, error: &str, problem: String) -> Response {
        self.ledger().problems.push(problem.clone());
        oauth_error(status, error, &problem)
    }

    fn check_assertion(&self, assertion: &str) -> Result<(), String> {
        let header = jsonwebtoken::decode_header(assertion).map_err(|e| format!("header: {e}"))?;
        if header.alg != Algorithm::RS512 {
            return Err(format!("alg {:?}", header.alg));
        }
        if header.typ.as_deref() != Some("JWT") {
            return Err(format!("typ {:?}", header.typ));
        }
        let jwks = self.signing.public_jwks();
        let jwk = header
            .kid
            .as_deref()
            .and_then(|kid| jwks.find(kid))
            .ok_or("no kid of the app's JWKS")?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("jwk: {e}"))?;
        let mut validation = Validation::new(Algorithm::RS512);
        validation.set_audience(&[self.token_url()]);
        validation.set_issuer(&[API_KEY]);
        validation.sub = Some(API_KEY.to_owned());
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<Value>(assertion, &key, &validation)
            .map_err(|e| format!("assertion: {e}"))?
            .claims;
        let exp = claims["exp"].as_i64().ok_or("exp is not an integer")?;
        if exp > unix_seconds(SystemClock.now()) + 300 {
            return Err("exp more than 5 minutes ahead".into());
        }
        let jti = claims["jti"].as_str().ok_or("no jti")?.to_owned();
        if !self.ledger().jtis.insert(jti) {
            return Err("Non-unique 'jti' claim in client_assertion JWT".into());
        }
        Ok(())
    }
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let body = json!({"error": error, "error_description": description, "message_id": "rrt-test"});
    (status, Json(body)).into_response()
}

async fn token_endpoint(
    State(s): State<Arc<StandIn>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
    let grant = form.get("grant_type").cloned().unwrap_or_default();
    match grant.as_str() {
        "urn:ietf:params:oauth:grant-type:token-exchange" => &s.exchanges,
        "refresh_token" => &s.refreshes,
        _ => &s.codes,
    }
    .fetch_add(1, Ordering::SeqCst);
    let delay = s.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let fault = {
        let mut faults = s.faults.lock().expect("no panics under the lock");
        (!faults.is_empty()).then(|| faults.remove(0))
    };
    match fault {
        Some(Fault::ServerError) => {
            return (StatusCode::SERVICE_UNAVAILABLE, "upstream down").into_response();
        }
        Some(Fault::UnauthorizedClient) => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized_client",
                "you have tried to request authorization but your application is not configured to use this authorization grant type",
            );
        }
        None => {}
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if content_type != "application/x-www-form-urlencoded" {
        return s.refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
            format!("content type {content_type:?}"),
        );
    }
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or_default();
    match grant.as_str() {
        "urn:ietf:params:oauth:grant-type:token-exchange" => {
            let mut wrong = Vec::new();
            if field("subject_token_type") != "urn:ietf:params:oauth:token-type:id_token" {
                wrong.push("subject_token_type".to_owned());
            }
            if !field("subject_token").starts_with("id-token-") {
                wrong.push("subject_token".to_owned());
            }
            if field("client_assertion_type")
                != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            {
                wrong.push("client_assertion_type".to_owned());
            }
            if form.contains_key("client_secret") || form.contains_key("client_id") {
                wrong.push("a token exchange authenticates with the assertion only".to_owned());
            }
            if let Err(e) = s.check_assertion(field("client_assertion")) {
                wrong.push(e);
            }
            if !wrong.is_empty() {
                return s.refuse(StatusCode::BAD_REQUEST, "invalid_request", wrong.join("; "));
            }
            s.issue()
        }
        "refresh_token" => {
            if field("client_id") != API_KEY || field("client_secret") != CLIENT_SECRET {
                return s.refuse(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "client_id or client_secret is invalid".into(),
                );
            }
            let token = field("refresh_token").to_owned();
            let redeemed = {
                let mut ledger = s.ledger();
                if ledger.live_refresh.remove(&token) {
                    ledger.used_refresh.insert(token);
                    true
                } else {
                    if ledger.used_refresh.contains(&token) {
                        ledger.reused_refresh += 1;
                    }
                    false
                }
            };
            if !redeemed {
                return oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_grant",
                    "refresh_token is invalid",
                );
            }
            s.issue()
        }
        "authorization_code" => {
            if field("client_id") != API_KEY
                || field("client_secret") != CLIENT_SECRET
                || field("redirect_uri") != CALLBACK
                || field("code") != "code-1"
            {
                return s.refuse(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "bad authorization_code form".into(),
                );
            }
            s.issue()
        }
        other => s.refuse(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            format!("grant_type {other:?}"),
        ),
    }
}

// ---- stores ----------------------------------------------------------------------------------

const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

/// A fresh key prefix on the test Redis: every store made from it shares the data, like broker
/// replicas sharing one Redis.
struct RedisSpace {
    prefix: String,
}

impl RedisSpace {
    async fn new() -> RedisSpace {
        let space = RedisSpace {
            prefix: format!("cis2sb-apim-test:{}:", random_urlsafe(12)),
        };
        let probe = space.store();
        match tokio::time::timeout(Duration::from_secs(10), probe.ping()).await {
            Ok(Ok(())) => space,
            _ => panic!(
                "Redis is not reachable at REDIS_URL (default {DEFAULT_REDIS_URL}). These tests \
                 need a running Redis: start one or set REDIS_URL. They fail rather than skip."
            ),
        }
    }

    fn store(&self) -> Arc<RedisStore> {
        Arc::new(
            RedisStore::new(RedisSettings {
                url: redis_url(),
                key_prefix: self.prefix.clone(),
                connect_timeout: Duration::from_secs(5),
                command_timeout: Duration::from_secs(5),
            })
            .expect("REDIS_URL is a valid Redis URL"),
        )
    }
}

/// Counts store calls, to show what a cache hit costs.
struct Counting {
    inner: Arc<dyn SessionStore>,
    calls: AtomicUsize,
}

impl Counting {
    fn count(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl SessionStore for Counting {
    async fn put_pending_login(
        &self,
        key: &LoginKey,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.count();
        self.inner.put_pending_login(key, sealed, ttl).await
    }
    async fn take_pending_login(&self, key: &LoginKey) -> Result<Option<Vec<u8>>, StoreError> {
        self.count();
        self.inner.take_pending_login(key).await
    }
    async fn create_session(
        &self,
        id: &SessionId,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.count();
        self.inner.create_session(id, sealed, ttl).await
    }
    async fn replace_session(
        &self,
        id: &SessionId,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.count();
        self.inner.replace_session(id, sealed, ttl).await
    }
    async fn get_session(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        self.count();
        self.inner.get_session(id).await
    }
    async fn touch_session(&self, id: &SessionId, ttl: Duration) -> Result<bool, StoreError> {
        self.count();
        self.inner.touch_session(id, ttl).await
    }
    async fn delete_session(&self, id: &SessionId) -> Result<bool, StoreError> {
        self.count();
        self.inner.delete_session(id).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.count();
        self.inner.ping().await
    }
    async fn get_session_with_tokens(
        &self,
        id: &SessionId,
    ) -> Result<Option<(StoredSession, Vec<(String, Vec<u8>)>)>, StoreError> {
        self.count();
        self.inner.get_session_with_tokens(id).await
    }
    async fn put_token(
        &self,
        id: &SessionId,
        field: &str,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.count();
        self.inner.put_token(id, field, sealed, ttl).await
    }
    async fn get_token(&self, id: &SessionId, field: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.count();
        self.inner.get_token(id, field).await
    }
    async fn delete_tokens(&self, id: &SessionId) -> Result<(), StoreError> {
        self.count();
        self.inner.delete_tokens(id).await
    }
    async fn acquire_lock(
        &self,
        id: &SessionId,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.count();
        self.inner.acquire_lock(id, name, owner, lease).await
    }
    async fn renew_lock(
        &self,
        id: &SessionId,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        self.count();
        self.inner.renew_lock(id, name, owner, lease).await
    }
    async fn release_lock(
        &self,
        id: &SessionId,
        name: &str,
        owner: &str,
    ) -> Result<bool, StoreError> {
        self.count();
        self.inner.release_lock(id, name, owner).await
    }
    async fn lock_held(&self, id: &SessionId, name: &str) -> Result<bool, StoreError> {
        self.count();
        self.inner.lock_held(id, name).await
    }
}

// ---- replicas and sessions -------------------------------------------------------------------

/// Material every replica shares: the broker's signing key and the encryption key ring's keys.
struct Shared {
    signing: Arc<SigningKeys>,
    ring_keys: Vec<(String, Secret<String>)>,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            signing: Arc::new(SigningKeys::generate(KID).expect("a test key generates")),
            ring_keys: vec![("k1".to_owned(), KeyRing::generate_key())],
        }
    }
}

struct Options {
    http_timeout: Duration,
    lock_lease: Duration,
    client_secret: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            http_timeout: Duration::from_secs(5),
            lock_lease: Duration::from_secs(3),
            client_secret: true,
        }
    }
}

fn apim_config(token_url: &str, options: &Options) -> ApimConfig {
    ApimConfig {
        pattern: Pattern::Separate,
        token_url: token_url.parse().expect("the stand-in's URL parses"),
        authorize_url: Some(
            "https://apim.example.test/oauth2/authorize"
                .parse()
                .expect("a valid URL"),
        ),
        api_key: API_KEY.to_owned(),
        client_secret: options
            .client_secret
            .then(|| Secret::new(CLIENT_SECRET.to_owned())),
        http_timeout: options.http_timeout,
        min_validity: MIN_VALIDITY,
        lock_lease: options.lock_lease,
        end_user_organisation_header: false,
    }
}

/// One broker replica's token machinery: its own APIM client over its own store connection.
struct Replica {
    store: Arc<dyn SessionStore>,
    tokens: TokenService,
}

impl Replica {
    fn new(
        shared: &Shared,
        store: Arc<dyn SessionStore>,
        standin: &StandIn,
        options: &Options,
    ) -> Replica {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let client = ApimClient::new(
            &apim_config(standin.token_url(), options),
            Some(shared.signing.clone()),
            clock.clone(),
        )
        .expect("the test APIM settings are valid");
        let keys = Arc::new(KeyRing::new(&shared.ring_keys).expect("generated keys are valid"));
        let tokens = TokenService::new(store.clone(), keys, client, clock, options.lock_lease);
        Replica { store, tokens }
    }

    /// What `GetPdsToken` does: read the session with its token cache, then ask for a token.
    async fn token(&self, s: &Session, min_validity: Duration) -> Result<IssuedToken, BrokerError> {
        self.token_at(s, Aal::Aal2, s.generation, min_validity)
            .await
    }

    async fn token_at(
        &self,
        s: &Session,
        aal: Aal,
        generation: u32,
        min_validity: Duration,
    ) -> Result<IssuedToken, BrokerError> {
        let (stored, cached) = self
            .store
            .get_session_with_tokens(&s.id)
            .await?
            .ok_or(BrokerError::SessionInvalid)?;
        let subject = TokenSubject {
            session_id: &s.id,
            aal,
            generation,
            id_token: s.id_token.as_ref(),
            id_token_expires_at: s.id_token_expires_at,
            ttl: stored.ttl,
        };
        self.tokens
            .access_token(&subject, &cached, min_validity)
            .await
    }
}

/// A signed-in session as the token cache sees it.
struct Session {
    id: SessionId,
    id_token: Option<IdToken>,
    id_token_expires_at: Option<i64>,
    generation: u32,
}

impl Session {
    /// Creates a session record (its content does not matter to the token cache) with an ID
    /// token valid for `id_token_life` seconds (negative: already expired).
    async fn create(store: &dyn SessionStore, id_token_life: i64) -> Session {
        let id = SessionToken::generate().id();
        assert!(
            store
                .create_session(&id, b"sealed record", SESSION_TTL)
                .await
                .expect("the store answers")
        );
        Session {
            id,
            id_token: Some(IdToken::new(&format!("id-token-{}", random_urlsafe(24)))),
            id_token_expires_at: Some(unix_seconds(SystemClock.now()) + id_token_life),
            generation: 0,
        }
    }

    fn subject(&self, ttl: Duration) -> TokenSubject<'_> {
        TokenSubject {
            session_id: &self.id,
            aal: Aal::Aal2,
            generation: self.generation,
            id_token: self.id_token.as_ref(),
            id_token_expires_at: self.id_token_expires_at,
            ttl,
        }
    }
}

/// A store kind for the tests that need only one replica.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Memory,
    Redis,
}

async fn single_store(kind: Kind) -> Arc<dyn SessionStore> {
    match kind {
        Kind::Memory => Arc::new(MemoryStore::new(Arc::new(SystemClock))),
        Kind::Redis => RedisSpace::new().await.store(),
    }
}

/// One replica over a store of `kind`, with its own stand-in.
async fn setup(kind: Kind, options: Options) -> (Arc<StandIn>, Replica) {
    let shared = Shared::new();
    let standin = StandIn::start(shared.signing.clone()).await;
    let replica = Replica::new(&shared, single_store(kind).await, &standin, &options);
    (standin, replica)
}

fn secret_free(text: &str, s: &Session) {
    let id_token = s.id_token.as_ref().map(IdToken::text);
    for secret in [id_token.as_deref().unwrap_or("id-token-"), CLIENT_SECRET] {
        assert!(!text.contains(secret), "a secret leaked: {text}");
    }
}

// ---- the tests -------------------------------------------------------------------------------

async fn a_cached_token_costs_no_apim_call_and_no_store_call(kind: Kind) {
    let shared = Shared::new();
    let standin = StandIn::start(shared.signing.clone()).await;
    let counting = Arc::new(Counting {
        inner: single_store(kind).await,
        calls: AtomicUsize::new(0),
    });
    let replica = Replica::new(&shared, counting.clone(), &standin, &Options::default());
    let s = Session::create(replica.store.as_ref(), 3600).await;

    let first = replica.token(&s, MIN_VALIDITY).await.expect("a token");
    assert_eq!(standin.calls(), (1, 0));
    assert_eq!(first.token_type, "Bearer");
    let left = first
        .expires_at
        .duration_since(SystemClock.now())
        .expect("in the future");
    assert!(
        left > Duration::from_secs(590) && left <= Duration::from_secs(599),
        "{left:?}"
    );

    let (stored, cached) = replica
        .store
        .get_session_with_tokens(&s.id)
        .await
        .expect("the store answers")
        .expect("the session exists");
    let before = counting.calls.load(Ordering::SeqCst);
    let again = replica
        .tokens
        .access_token(&s.subject(stored.ttl), &cached, MIN_VALIDITY)
        .await
        .expect("a cached token");
    assert_eq!(
        counting.calls.load(Ordering::SeqCst),
        before,
        "a cache hit costs no store call beyond reading the session"
    );
    assert_eq!(standin.calls(), (1, 0), "and no APIM call");
    assert_eq!(again.access_token.expose(), first.access_token.expose());
    assert_eq!(again.expires_at, first.expires_at);
    standin.assert_clean();
}

async fn a_token_within_min_validity_is_refreshed(kind: Kind) {
    let (standin, replica) = setup(kind, Options::default()).await;
    let s = Session::create(replica.store.as_ref(), 3600).await;
    let first = replica.token(&s, MIN_VALIDITY).await.expect("a token");

    let refreshed = replica
        .token(&s, FORCE_NEW)
        .await
        .expect("a refreshed token");
    assert_eq!(standin.calls(), (1, 1), "one exchange, then one refresh");
    assert_ne!(refreshed.access_token.expose(), first.access_token.expose());

    let cached = replica
        .token(&s, MIN_VALIDITY)
        .await
        .expect("the refreshed token");
    assert_eq!(
        cached.access_token.expose(),
        refreshed.access_token.expose()
    );
    assert_eq!(standin.calls(), (1, 1));

    // The refresh token used was the newest one: a second refresh works too.
    replica.token(&s, FORCE_NEW).await.expect("refreshed again");
    assert_eq!(standin.calls(), (1, 2));
    standin.assert_clean();
}

async fn the_lock_is_released_after_a_server_error(kind: Kind) {
    let (standin, replica) = setup(kind, Options::default()).await;
    let s = Session::create(replica.store.as_ref(), 3600).await;
    standin.fail_next(Fault::ServerError);
    match replica.token(&s, MIN_VALIDITY).await {
        Err(BrokerError::ApimUnavailable(cause)) => {
            assert!(cause.contains("503"), "{cause}");
            secret_free(&cause, &s);
        }
        other => panic!("expected ApimUnavailable, got {other:?}"),
    }
    let field = token_field(Aal::Aal2, 0);
    assert!(
        !replica.store.lock_held(&s.id, &field).await.unwrap(),
        "released"
    );
    assert_eq!(
        replica.store.get_token(&s.id, &field).await.unwrap(),
        None,
        "nothing cached"
    );

    replica
        .token(&s, MIN_VALIDITY)
        .await
        .expect("the next call retries and succeeds");
    assert_eq!(standin.calls(), (2, 0));
    standin.assert_clean();
}

async fn the_lock_is_released_after_a_timeout(kind: Kind) {
    let options = Options {
        http_timeout: Duration::from_millis(400),
        ..Options::default()
    };
    let (standin, replica) = setup(kind, options).await;
    let s = Session::create(replica.store.as_ref(), 3600).await;
    standin.slow(Duration::from_secs(3));
    let outcome = tokio::time::timeout(HANG, replica.token(&s, MIN_VALIDITY))
        .await
        .expect("the call gives up at the HTTP timeout instead of hanging");
    match outcome {
        Err(BrokerError::ApimUnavailable(cause)) => assert!(cause.contains("timed out"), "{cause}"),
        other => panic!("expected ApimUnavailable, got {other:?}"),
    }
    let field = token_field(Aal::Aal2, 0);
    assert!(
        !replica.store.lock_held(&s.id, &field).await.unwrap(),
        "released"
    );

    standin.slow(Duration::ZERO);
    replica
        .token(&s, MIN_VALIDITY)
        .await
        .expect("the next call succeeds");
    standin.assert_clean();
}

async fn unauthorized_client_is_upstream_rejected(kind: Kind) {
    let (standin, replica) = setup(kind, Options::default()).await;
    let s = Session::create(replica.store.as_ref(), 3600).await;
    standin.fail_next(Fault::UnauthorizedClient);
    let err = replica
        .token(&s, MIN_VALIDITY)
        .await
        .expect_err("APIM refuses");
    secret_free(&format!("{err} {err:?}"), &s);
    match err {
        BrokerError::UpstreamRejected {
            upstream,
            error,
            description,
        } => {
            assert_eq!(upstream, "apim");
            assert_eq!(error, "unauthorized_client");
            assert!(description.contains("not configured"), "{description}");
        }
        other => panic!("expected UpstreamRejected, got {other:?}"),
    }
    let field = token_field(Aal::Aal2, 0);
    assert!(
        !replica.store.lock_held(&s.id, &field).await.unwrap(),
        "released"
    );
    replica
        .token(&s, MIN_VALIDITY)
        .await
        .expect("the next call succeeds");
    standin.assert_clean();
}

async fn an_expired_id_token_without_a_refresh_token_means_sign_in_again(kind: Kind) {
    let (standin, replica) = setup(kind, Options::default()).await;
    let s = Session::create(replica.store.as_ref(), -10).await;
    match replica.token(&s, MIN_VALIDITY).await {
        Err(BrokerError::SessionInvalid) => {}
        other => panic!("expected SessionInvalid, got {other:?}"),
    }
    assert_eq!(standin.calls(), (0, 0), "APIM would refuse it anyway");
    let field = token_field(Aal::Aal2, 0);
    assert!(!replica.store.lock_held(&s.id, &field).await.unwrap());
}

async fn a_refused_refresh_token_falls_back_to_the_id_token(kind: Kind) {
    let (standin, replica) = setup(kind, Options::default()).await;
    let s = Session::create(replica.store.as_ref(), 3600).await;
    replica.token(&s, MIN_VALIDITY).await.expect("a token");
    standin.revoke_refresh_tokens();
    replica
        .token(&s, FORCE_NEW)
        .await
        .expect("a new token by exchange");
    assert_eq!(standin.calls(), (2, 1));
    standin.assert_clean();
}

async fn without_an_id_token_a_refused_refresh_means_sign_in_again(kind: Kind) {
    let (standin, replica) = setup(kind, Options::default()).await;
    let mut s = Session::create(replica.store.as_ref(), 3600).await;
    replica.token(&s, MIN_VALIDITY).await.expect("a token");
    s.id_token = None;
    s.id_token_expires_at = None;
    standin.revoke_refresh_tokens();
    match replica.token(&s, FORCE_NEW).await {
        Err(BrokerError::SessionInvalid) => {}
        other => panic!("expected SessionInvalid, got {other:?}"),
    }
    assert_eq!(standin.calls(), (1, 1));
    // The refused refresh token is not offered again.
    match replica.token(&s, FORCE_NEW).await {
        Err(BrokerError::SessionInvalid) => {}
        other => panic!("expected SessionInvalid, got {other:?}"),
    }
    assert_eq!(standin.calls(), (1, 1));
    replica
        .token(&s, MIN_VALIDITY)
        .await
        .expect("the access token itself is still good while it lasts");
}

async fn without_a_client_secret_the_id_token_is_exchanged_again(kind: Kind) {
    let options = Options {
        client_secret: false,
        ..Options::default()
    };
    let (standin, replica) = setup(kind, options).await;
    let s = Session::create(replica.store.as_ref(), 3600).await;
    replica.token(&s, MIN_VALIDITY).await.expect("a token");
    replica.token(&s, FORCE_NEW).await.expect("a token");
    assert_eq!(
        standin.calls(),
        (2, 0),
        "APIM redeems refresh tokens only with the secret"
    );
    standin.assert_clean();
}

async fn a_revoked_session_never_gets_a_token_stored(kind: Kind) {
    let (standin, replica) = setup(kind, Options::default()).await;
    let s = Session::create(replica.store.as_ref(), 3600).await;
    standin.slow(Duration::from_millis(500));
    let (stored, cached) = replica
        .store
        .get_session_with_tokens(&s.id)
        .await
        .unwrap()
        .expect("exists");
    let subject = s.subject(stored.ttl);
    let call = replica.tokens.access_token(&subject, &cached, MIN_VALIDITY);
    let revoke = async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(replica.store.delete_session(&s.id).await.unwrap());
    };
    let (outcome, ()) = tokio::join!(call, revoke);
    match outcome {
        Err(BrokerError::SessionInvalid) => {}
        other => panic!("expected SessionInvalid, got {other:?}"),
    }
    assert_eq!(
        standin.calls(),
        (1, 0),
        "APIM was called while the session lived"
    );
    assert_eq!(
        replica
            .store
            .get_token(&s.id, &token_field(Aal::Aal2, 0))
            .await
            .unwrap(),
        None
    );
    let stored = replica
        .tokens
        .store_grant(&subject, grant_for_tests())
        .await;
    assert!(
        matches!(stored, Err(BrokerError::SessionInvalid)),
        "{stored:?}"
    );
    assert_eq!(
        replica.store.get_session_with_tokens(&s.id).await.unwrap(),
        None
    );
}

async fn generations_and_levels_keep_their_own_tokens(kind: Kind) {
    let (standin, replica) = setup(kind, Options::default()).await;
    let s = Session::create(replica.store.as_ref(), 3600).await;
    let g0 = replica
        .token_at(&s, Aal::Aal2, 0, MIN_VALIDITY)
        .await
        .expect("g0");
    let g1 = replica
        .token_at(&s, Aal::Aal2, 1, MIN_VALIDITY)
        .await
        .expect("g1");
    let aal3 = replica
        .token_at(&s, Aal::Aal3, 1, MIN_VALIDITY)
        .await
        .expect("aal3");
    assert_eq!(
        standin.calls(),
        (3, 0),
        "a step-up never reuses a lower-level token"
    );
    let tokens: HashSet<&str> = [&g0, &g1, &aal3]
        .iter()
        .map(|t| t.access_token.expose().as_str())
        .collect();
    assert_eq!(tokens.len(), 3);
    let again = replica
        .token_at(&s, Aal::Aal3, 1, MIN_VALIDITY)
        .await
        .expect("cached");
    assert_eq!(again.access_token.expose(), aal3.access_token.expose());
    assert_eq!(standin.calls(), (3, 0));
    standin.assert_clean();
}

async fn dropped_tokens_are_fetched_again(kind: Kind) {
    let (standin, replica) = setup(kind, Options::default()).await;
    let s = Session::create(replica.store.as_ref(), 3600).await;
    replica.token(&s, MIN_VALIDITY).await.expect("a token");
    replica.tokens.drop_tokens(&s.id).await.expect("dropped");
    let (_, cached) = replica
        .store
        .get_session_with_tokens(&s.id)
        .await
        .unwrap()
        .expect("the session stays");
    assert!(cached.is_empty());
    replica.token(&s, MIN_VALIDITY).await.expect("a new token");
    assert_eq!(standin.calls(), (2, 0));
}

async fn every_client_assertion_has_a_fresh_jti(kind: Kind) {
    let (standin, replica) = setup(kind, Options::default()).await;
    let s = Session::create(replica.store.as_ref(), 3600).await;
    for generation in 0..5 {
        replica
            .token_at(&s, Aal::Aal2, generation, MIN_VALIDITY)
            .await
            .expect("a token");
    }
    // Failures do not reuse one either: a retry after a 5xx signs a new assertion.
    standin.fail_next(Fault::ServerError);
    assert!(
        replica
            .token_at(&s, Aal::Aal2, 9, MIN_VALIDITY)
            .await
            .is_err()
    );
    replica
        .token_at(&s, Aal::Aal2, 9, MIN_VALIDITY)
        .await
        .expect("a token");
    assert_eq!(standin.calls(), (7, 0));
    assert_eq!(
        standin.ledger().jtis.len(),
        6,
        "each checked assertion had its own jti"
    );
    standin.assert_clean();
}

async fn the_combined_pattern_caches_and_refreshes_its_grant(kind: Kind) {
    let (standin, replica) = setup(kind, Options::default()).await;
    let client = replica.tokens.client();
    let url = client
        .authorization_url(CALLBACK, "state-123", "AAL2_OR_AAL3_ANY")
        .expect("an authorize URL is configured");
    let query: std::collections::HashMap<String, String> = url.query_pairs().into_owned().collect();
    assert_eq!(url.path(), "/oauth2/authorize");
    assert_eq!(query.get("response_type").map(String::as_str), Some("code"));
    assert_eq!(query.get("client_id").map(String::as_str), Some(API_KEY));
    assert_eq!(
        query.get("redirect_uri").map(String::as_str),
        Some(CALLBACK)
    );
    assert_eq!(query.get("state").map(String::as_str), Some("state-123"));
    assert_eq!(
        query.get("acr_values").map(String::as_str),
        Some("AAL2_OR_AAL3_ANY")
    );
    assert_eq!(query.len(), 5, "{query:?}");

    let grant = client
        .redeem_code("code-1", CALLBACK)
        .await
        .expect("redeemed");
    assert!(grant.refresh_token.is_some());
    let mut s = Session::create(replica.store.as_ref(), 0).await;
    s.id_token = None;
    s.id_token_expires_at = None;
    let issued = grant.access_token.clone();
    replica
        .tokens
        .store_grant(&s.subject(SESSION_TTL), grant)
        .await
        .expect("stored");
    let cached = replica
        .token(&s, MIN_VALIDITY)
        .await
        .expect("the stored grant");
    assert_eq!(cached.access_token.expose(), issued.expose());
    let refreshed = replica.token(&s, FORCE_NEW).await.expect("refreshed");
    assert_ne!(refreshed.access_token.expose(), issued.expose());
    assert_eq!(standin.calls(), (0, 1));
    assert_eq!(standin.codes.load(Ordering::SeqCst), 1);

    match client.redeem_code("code-2", CALLBACK).await {
        Err(ApimError::Rejected {
            status: 400, error, ..
        }) => assert_eq!(error, "invalid_request"),
        other => panic!("expected Rejected, got {other:?}"),
    }
    standin.ledger().problems.clear();
    standin.assert_clean();
}

fn grant_for_tests() -> TokenGrant {
    TokenGrant {
        access_token: Secret::new("at-test".into()),
        token_type: "Bearer".into(),
        expires_at: SystemClock.now() + Duration::from_secs(599),
        refresh_token: Some(Secret::new("rt-test".into())),
        refresh_expires_at: None,
        scope: None,
    }
}

/// Runs each listed case on the in-memory store and on Redis.
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::Kind::Memory).await;
                }
            )*
        }
        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::Kind::Redis).await;
                }
            )*
        }
    };
}

on_both_stores!(
    a_cached_token_costs_no_apim_call_and_no_store_call,
    a_token_within_min_validity_is_refreshed,
    the_lock_is_released_after_a_server_error,
    the_lock_is_released_after_a_timeout,
    unauthorized_client_is_upstream_rejected,
    an_expired_id_token_without_a_refresh_token_means_sign_in_again,
    a_refused_refresh_token_falls_back_to_the_id_token,
    without_an_id_token_a_refused_refresh_means_sign_in_again,
    without_a_client_secret_the_id_token_is_exchanged_again,
    a_revoked_session_never_gets_a_token_stored,
    generations_and_levels_keep_their_own_tokens,
    dropped_tokens_are_fetched_again,
    every_client_assertion_has_a_fresh_jti,
    the_combined_pattern_caches_and_refreshes_its_grant,
);

// ---- several replicas on one Redis -----------------------------------------------------------

/// Two replicas, each with its own store connection and APIM client, on one Redis and one APIM.
async fn two_replicas(options: &Options) -> (Arc<StandIn>, [Arc<Replica>; 2]) {
    let shared = Shared::new();
    let standin = StandIn::start(shared.signing.clone()).await;
    let space = RedisSpace::new().await;
    let replicas = [
        Arc::new(Replica::new(&shared, space.store(), &standin, options)),
        Arc::new(Replica::new(&shared, space.store(), &standin, options)),
    ];
    (standin, replicas)
}

/// `n` concurrent calls spread over the replicas, all released at once.
async fn burst(
    replicas: &[Arc<Replica>; 2],
    s: &Arc<Session>,
    n: usize,
    min_validity: Duration,
) -> Vec<Result<IssuedToken, BrokerError>> {
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let (replica, s, start) = (replicas[i % 2].clone(), s.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                replica.token(&s, min_validity).await
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(n);
    for call in calls {
        outcomes.push(call.await.expect("a call task does not panic"));
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn two_replicas_and_200_concurrent_calls_make_one_apim_call() {
    let (standin, replicas) = two_replicas(&Options::default()).await;
    let s = Arc::new(Session::create(replicas[0].store.as_ref(), 3600).await);
    // Slow enough that every call arrives while the first is still at APIM.
    standin.slow(Duration::from_millis(300));

    let outcomes = tokio::time::timeout(HANG, burst(&replicas, &s, 200, MIN_VALIDITY))
        .await
        .expect("the burst finishes");

    let tokens: HashSet<String> = outcomes
        .into_iter()
        .map(|o| {
            o.expect("every call gets a token")
                .access_token
                .expose()
                .clone()
        })
        .collect();
    assert_eq!(tokens.len(), 1, "everyone got the one token fetched");
    assert_eq!(standin.calls(), (1, 0), "exactly one APIM call");
    standin.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_refreshes_never_redeem_one_refresh_token_twice() {
    let (standin, replicas) = two_replicas(&Options::default()).await;
    let s = Arc::new(Session::create(replicas[0].store.as_ref(), 3600).await);
    replicas[0]
        .token(&s, MIN_VALIDITY)
        .await
        .expect("a first token");
    standin.slow(Duration::from_millis(100));

    for round in 0..5 {
        // Every call wants more than any token offers, so each round must refresh.
        let outcomes = tokio::time::timeout(HANG, burst(&replicas, &s, 60, FORCE_NEW))
            .await
            .expect("the burst finishes");
        for outcome in outcomes {
            outcome.unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        }
    }
    let (exchanges, refreshes) = standin.calls();
    assert_eq!(
        exchanges, 1,
        "never fell back to an exchange: no refresh was refused"
    );
    assert!(refreshes >= 5, "each round refreshed: {refreshes}");
    standin.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn the_lease_is_renewed_while_apim_answers() {
    let options = Options {
        lock_lease: Duration::from_millis(300),
        ..Options::default()
    };
    let (standin, replicas) = two_replicas(&options).await;
    let s = Arc::new(Session::create(replicas[0].store.as_ref(), 3600).await);
    // Four leases long: without renewal a waiter would take over and call APIM again.
    standin.slow(Duration::from_millis(1200));
    let outcomes = tokio::time::timeout(HANG, burst(&replicas, &s, 20, MIN_VALIDITY))
        .await
        .expect("the burst finishes");
    for outcome in outcomes {
        outcome.expect("every call gets a token");
    }
    assert_eq!(standin.calls(), (1, 0));
    standin.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_takes_over_when_the_holder_fails() {
    let shared = Shared::new();
    let failing = StandIn::start(shared.signing.clone()).await;
    let working = StandIn::start(shared.signing.clone()).await;
    let space = RedisSpace::new().await;
    let options = Options::default();
    let a = Replica::new(&shared, space.store(), &failing, &options);
    let b = Replica::new(&shared, space.store(), &working, &options);
    let s = Session::create(a.store.as_ref(), 3600).await;
    failing.slow(Duration::from_millis(400));
    failing.fail_next(Fault::ServerError);

    let holder = a.token(&s, MIN_VALIDITY);
    let waiter = async {
        // Arrives while the holder is at APIM.
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.token(&s, MIN_VALIDITY).await
    };
    let (held, waited) = tokio::time::timeout(HANG, async { tokio::join!(holder, waiter) })
        .await
        .expect("both finish");
    assert!(
        matches!(held, Err(BrokerError::ApimUnavailable(_))),
        "{held:?}"
    );
    waited.expect("the waiter took over and got a token");
    assert_eq!(failing.calls(), (1, 0));
    assert_eq!(working.calls(), (1, 0));
    working.assert_clean();
}

#[tokio::test]
async fn a_store_that_is_down_is_store_unavailable() {
    let shared = Shared::new();
    let standin = StandIn::start(shared.signing.clone()).await;
    let dead: Arc<dyn SessionStore> = Arc::new(
        RedisStore::new(RedisSettings {
            url: "redis://127.0.0.1:1".into(),
            key_prefix: "never-used:".into(),
            connect_timeout: Duration::from_millis(300),
            command_timeout: Duration::from_millis(300),
        })
        .expect("a well-formed URL"),
    );
    let replica = Replica::new(&shared, dead, &standin, &Options::default());
    let s = Session {
        id: SessionToken::generate().id(),
        id_token: Some(IdToken::new("id-token-x")),
        id_token_expires_at: Some(unix_seconds(SystemClock.now()) + 3600),
        generation: 0,
    };
    let outcome = replica
        .tokens
        .access_token(&s.subject(SESSION_TTL), &[], MIN_VALIDITY)
        .await;
    assert!(
        matches!(outcome, Err(BrokerError::StoreUnavailable(_))),
        "{outcome:?}"
    );
    assert_eq!(standin.calls(), (0, 0));
}

#[tokio::test]
async fn a_cached_token_that_does_not_open_is_replaced() {
    let (standin, replica) = setup(Kind::Memory, Options::default()).await;
    let s = Session::create(replica.store.as_ref(), 3600).await;
    let field = token_field(Aal::Aal2, 0);
    assert!(
        replica
            .store
            .put_token(&s.id, &field, b"not sealed by us", SESSION_TTL)
            .await
            .unwrap()
    );
    replica
        .token(&s, MIN_VALIDITY)
        .await
        .expect("a fresh token");
    assert_eq!(standin.calls(), (1, 0));
}

/// What replica `r` reads with the session before it asks for a token.
async fn read_cache(r: &Replica, s: &Session) -> (Duration, Vec<(String, Vec<u8>)>) {
    let (stored, cached) = r
        .store
        .get_session_with_tokens(&s.id)
        .await
        .expect("the store answers")
        .expect("the session exists");
    (stored.ttl, cached)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_read_takes_the_token_another_replica_just_stored() {
    let (standin, [a, b]) = two_replicas(&Options::default()).await;
    let s = Session::create(a.store.as_ref(), 3600).await;
    let (ttl, stale) = read_cache(&a, &s).await;
    assert!(stale.is_empty());
    let fetched = b.token(&s, MIN_VALIDITY).await.expect("b fetches");

    let got = a
        .tokens
        .access_token(&s.subject(ttl), &stale, MIN_VALIDITY)
        .await
        .expect("a token");
    assert_eq!(got.access_token.expose(), fetched.access_token.expose());
    assert_eq!(
        standin.calls(),
        (1, 0),
        "the re-read under the lock found b's token"
    );
    standin.assert_clean();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_read_never_refreshes_again_after_another_replica_did() {
    let (standin, [a, b]) = two_replicas(&Options::default()).await;
    let s = Session::create(a.store.as_ref(), 3600).await;
    a.token(&s, MIN_VALIDITY).await.expect("a first token");
    let (ttl, stale) = read_cache(&a, &s).await;
    let refreshed = b.token(&s, FORCE_NEW).await.expect("b refreshes");
    assert_eq!(standin.calls(), (1, 1));

    let got = a
        .tokens
        .access_token(&s.subject(ttl), &stale, FORCE_NEW)
        .await
        .expect("a token");
    assert_eq!(
        got.access_token.expose(),
        refreshed.access_token.expose(),
        "the token b stored since a read the cache answers a's call"
    );
    assert_eq!(standin.calls(), (1, 1), "no second refresh");
    standin.assert_clean();
}
