//! The CIS2 Authentication simulator's routes: discovery, authorization (with a sign-in page,
//! or `login_hint` to skip it), the token endpoint, UserInfo, JWKS and end-session.
//!
//! Everything a client sends is checked as a strict provider would (OpenID Connect Core,
//! RFC 6749, RFC 7636, RFC 7523, RFC 9207), so a client that works here has not been let off
//! anything. Errors before the redirect URI is trusted are pages, never redirects.

use super::faults::{Fault, Faults};
use super::keys::{self, PROVIDER_KID, UNKNOWN_KID};
use super::page::{self, SignInView};
use super::users::{self, AcrClass, Authenticator, SimRole, SimUser};
use crate::clock::{Clock, SystemClock, unix_seconds};
use crate::secret::Secret;
use crate::session::token::random_urlsafe;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tracing::debug;

/// CIS2's Healthcare realm: every endpoint lives under it.
pub const REALM: &str = "/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare";

/// Authorization codes live 60 s, as short as real providers make them.
pub(crate) const CODE_TTL_SECS: i64 = 60;
/// A client assertion may be valid for at most 5 minutes (NHS rule: `exp = iat + 300`).
pub(crate) const ASSERTION_MAX_AHEAD_SECS: i64 = 300;
pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How far in the past `Expired` tokens expire: beyond any sane clock-skew leeway.
const EXPIRED_BY_SECS: i64 = 600;
/// How old `StaleAuthTime` makes `auth_time`.
const STALE_AUTH_SECS: i64 = 3600;

/// How to run a simulator.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Issuer string to put in discovery and in `iss`. None => "http://127.0.0.1:{port}{REALM}".
    /// Lets tests use e.g. "https://cis2.sim.test:443/openam/...": explicit default port, exactly
    /// like real CIS2, while endpoints are still served at the bound http address.
    pub issuer: Option<String>,
    pub clients: Vec<SimClient>,
    pub id_token_ttl: Duration,
    pub access_token_ttl: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            issuer: None,
            clients: Vec::new(),
            id_token_ttl: Duration::from_secs(5 * 60),
            access_token_ttl: Duration::from_secs(60 * 60),
        }
    }
}

/// A registered relying party.
#[derive(Clone)]
pub struct SimClient {
    pub client_id: String,
    /// `client_secret_post` is accepted when Some.
    pub client_secret: Option<String>,
    /// `private_key_jwt` is accepted when Some (RS512 or RS256 assertions, key chosen by `kid`).
    pub jwks: Option<jsonwebtoken::jwk::JwkSet>,
    /// Compared as exact strings.
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
}

impl std::fmt::Debug for SimClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimClient")
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("jwks", &self.jwks.as_ref().map(|j| j.keys.len()))
            .field("redirect_uris", &self.redirect_uris)
            .field("post_logout_redirect_uris", &self.post_logout_redirect_uris)
            .finish()
    }
}

/// A running simulator. Cheap to clone: clones share one provider.
#[derive(Clone)]
pub struct Cis2Simulator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cis2Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cis2Simulator")
            .field("base_url", &self.inner.base_url)
            .field("issuer", &self.inner.issuer)
            .finish_non_exhaustive()
    }
}

impl Cis2Simulator {
    /// Serves the simulator on `listener` from a spawned task until [`Cis2Simulator::shutdown`].
    pub async fn start(
        listener: tokio::net::TcpListener,
        options: SimOptions,
    ) -> std::io::Result<Self> {
        Self::start_with_clock(listener, options, Arc::new(SystemClock)).await
    }

    /// [`Cis2Simulator::start`] with a clock of the caller's (e.g. `clock::ManualClock`), so a
    /// test can expire codes, tokens and client assertions without waiting.
    pub async fn start_with_clock(
        listener: tokio::net::TcpListener,
        options: SimOptions,
        clock: Arc<dyn Clock>,
    ) -> std::io::Result<Self> {
        // Key generation is slow CPU work: do it (once per process) off the async threads.
        tokio::task::spawn_blocking(|| {
            keys::provider_key();
            keys::rogue_key();
        })
        .await
        .map_err(std::io::Error::other)?;
        let addr = listener.local_addr()?;
        let (shutdown, mut stop) = watch::channel(false);
        let sim = Cis2Simulator {
            inner: Arc::new(Inner::new(base_url_of(addr), options, clock, shutdown)),
        };
        let app = sim.router();
        tokio::spawn(async move {
            let stopped = async move {
                // An Err means every sender is gone: nobody can ask any more, so stop as well.
                let _ = stop.wait_for(|stop| *stop).await;
            };
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::warn!(%error, "cis2 simulator server stopped");
            }
        });
        debug!(base_url = %sim.inner.base_url, "cis2 simulator started");
        Ok(sim)
    }

    /// The routes, all under [`REALM`], with this simulator's state.
    pub fn router(&self) -> Router {
        let inner = self.inner.clone();
        let at = |path: &str| format!("{REALM}{path}");
        Router::new()
            .route(&at("/.well-known/openid-configuration"), get(discovery))
            .route(&at("/authorize"), get(authorize).post(authorize_form))
            .route(&at("/authorize/select"), post(authorize_select))
            .route(&at("/access_token"), post(token))
            .route(&at("/userinfo"), get(userinfo).post(userinfo))
            .route(&at("/connect/jwk_uri"), get(jwks))
            .route(&at("/connect/endSession"), get(end_session))
            .layer(middleware::from_fn_with_state(inner.clone(), slow))
            .with_state(inner)
    }

    /// `http://127.0.0.1:PORT`: where the endpoints are served.
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    pub fn discovery_url(&self) -> String {
        format!(
            "{}{REALM}/.well-known/openid-configuration",
            self.inner.base_url
        )
    }

    /// Sticky until [`Cis2Simulator::clear_faults`]; several may be set at once.
    pub fn set_fault(&self, fault: Fault) {
        debug!(?fault, "cis2 simulator fault set");
        self.inner.faults.set(fault);
    }

    pub fn clear_faults(&self) {
        self.inner.faults.clear();
    }

    /// Every ID token and access token this simulator has issued (tests scan for leaks).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.inner.grants().issued.clone()
    }

    pub fn token_calls(&self) -> u64 {
        self.inner.calls.token.load(Ordering::Relaxed)
    }

    pub fn userinfo_calls(&self) -> u64 {
        self.inner.calls.userinfo.load(Ordering::Relaxed)
    }

    pub fn jwks_calls(&self) -> u64 {
        self.inner.calls.jwks.load(Ordering::Relaxed)
    }

    pub fn discovery_calls(&self) -> u64 {
        self.inner.calls.discovery.load(Ordering::Relaxed)
    }

    /// The path and `traceparent` header (if any) of each request received, oldest first (the
    /// latest 1000), recorded as it arrives.
    pub fn received_traceparents(&self) -> Vec<(String, Option<String>)> {
        self.inner
            .calls
            .traceparents
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn users(&self) -> &'static [SimUser] {
        users::USERS
    }

    /// Registers one more relying party while running: the APIM simulator signs users in
    /// through CIS2 as a client of its own, with a callback only known once it is listening.
    pub fn register_client(&self, client: SimClient) {
        let mut clients = self
            .inner
            .clients
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut updated = Vec::clone(&clients);
        updated.push(client);
        *clients = Arc::new(updated);
    }

    /// Registers `client_id`'s `backchannel_logout_uri`: where [`Cis2Simulator::backchannel_logout_sid`]
    /// and [`Cis2Simulator::backchannel_logout_user`] POST logout tokens.
    pub fn set_backchannel_logout_uri(&self, client_id: &str, uri: &str) {
        self.inner
            .backchannel_uris
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(client_id.to_owned(), uri.to_owned());
    }

    /// The CIS2 session ids (`sid`) the simulator holds for `uid`, in no set order.
    pub fn sids_of(&self, uid: &str) -> Vec<String> {
        self.inner
            .grants()
            .sessions
            .iter()
            .filter(|(_, s)| s.uid == uid)
            .map(|(sid, _)| sid.clone())
            .collect()
    }

    /// The claims of a logout token for `client_id` as CIS2 sends them: `iss`, `aud`, `iat`,
    /// `exp`, a fresh `jti`, the event, and `sid`/`sub` as given. Tests edit them to make bad ones.
    pub fn logout_token_claims(
        &self,
        client_id: &str,
        sid: Option<&str>,
        sub: Option<&str>,
    ) -> Value {
        let now = self.inner.now();
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(self.inner.issuer));
        claims.insert("aud".into(), json!(client_id));
        claims.insert("iat".into(), json!(now));
        claims.insert("exp".into(), json!(now + 120));
        claims.insert("jti".into(), json!(random_urlsafe(16)));
        claims.insert(
            "events".into(),
            json!({ "http://schemas.openid.net/event/backchannel-logout": {} }),
        );
        if let Some(sid) = sid {
            claims.insert("sid".into(), json!(sid));
        }
        if let Some(sub) = sub {
            claims.insert("sub".into(), json!(sub));
        }
        Value::Object(claims)
    }

    /// Signs `claims` as a logout token (`typ: logout+jwt`) with the provider's key, or with a
    /// key it does not publish under the provider's `kid` when `forged`.
    pub fn sign_logout_token(&self, claims: &Value, forged: bool) -> String {
        let key = if forged {
            keys::rogue_key()
        } else {
            keys::provider_key()
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(PROVIDER_KID.to_string());
        header.typ = Some("logout+jwt".to_string());
        jsonwebtoken::encode(&header, claims, key.encoding_key())
            .unwrap_or_else(|e| format!("unsigned:{e}"))
    }

    /// POSTs `logout_token` to `client_id`'s back-channel logout URI; returns the HTTP status
    /// and body, or why it could not be sent.
    pub async fn post_logout_token(
        &self,
        client_id: &str,
        logout_token: &str,
    ) -> Result<(u16, String), String> {
        let uri = self
            .inner
            .backchannel_uris
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(client_id)
            .cloned()
            .ok_or_else(|| format!("no backchannel_logout_uri for {client_id}"))?;
        let resp = reqwest::Client::new()
            .post(&uri)
            .form(&[("logout_token", logout_token)])
            .send()
            .await
            .map_err(|e| format!("back-channel logout not delivered: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        Ok((status, body))
    }

    /// Ends the CIS2 session `sid` and tells its client by back-channel logout (`sid` and
    /// `sub`), as CIS2 does when the user signs out elsewhere.
    pub async fn backchannel_logout_sid(&self, sid: &str) -> Result<(u16, String), String> {
        let session = self.inner.grants().sessions.remove(sid);
        let Some(SimSession { uid, client_id }) = session else {
            return Err("no such CIS2 session".into());
        };
        let claims = self.logout_token_claims(&client_id, Some(sid), Some(uid));
        let token = self.sign_logout_token(&claims, false);
        self.post_logout_token(&client_id, &token).await
    }

    /// Ends every CIS2 session of `uid` and tells each client once with a `sub`-only logout
    /// token. Returns the answers, one per client.
    pub async fn backchannel_logout_user(&self, uid: &str) -> Vec<Result<(u16, String), String>> {
        let clients: std::collections::BTreeSet<String> = {
            let mut grants = self.inner.grants();
            let clients = grants
                .sessions
                .values()
                .filter(|s| s.uid == uid)
                .map(|s| s.client_id.clone())
                .collect();
            grants.sessions.retain(|_, s| s.uid != uid);
            clients
        };
        let mut answers = Vec::new();
        for client_id in clients {
            let claims = self.logout_token_claims(&client_id, None, Some(uid));
            let token = self.sign_logout_token(&claims, false);
            answers.push(self.post_logout_token(&client_id, &token).await);
        }
        answers
    }

    /// Stops accepting connections; requests in flight finish.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }
}

pub(crate) fn base_url_of(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

struct Inner {
    base_url: String,
    issuer: String,
    /// Behind a lock only so that [`Cis2Simulator::register_client`] can add one after start.
    clients: RwLock<Arc<Vec<SimClient>>>,
    id_token_ttl: i64,
    access_token_ttl: i64,
    clock: Arc<dyn Clock>,
    faults: Faults,
    calls: Calls,
    grants: Mutex<Grants>,
    /// Each client's `backchannel_logout_uri`, registered apart from [`SimClient`] so that
    /// existing client literals need not change.
    backchannel_uris: RwLock<HashMap<String, String>>,
    shutdown: watch::Sender<bool>,
}

#[derive(Default)]
struct Calls {
    token: AtomicU64,
    userinfo: AtomicU64,
    jwks: AtomicU64,
    discovery: AtomicU64,
    /// `(path, traceparent)` of the latest requests, oldest first, so tests can follow a trace.
    traceparents: Mutex<std::collections::VecDeque<(String, Option<String>)>>,
}

/// How many requests [`Cis2Simulator::received_traceparents`] remembers.
const TRACEPARENTS_KEPT: usize = 1000;

/// Everything the provider remembers. Codes and tokens are map keys here and nowhere else.
#[derive(Default)]
struct Grants {
    codes: HashMap<String, CodeGrant>,
    /// Redeemed codes, until they would have expired, with the access token each one bought:
    /// a replayed code revokes it (RFC 6749 §4.1.2).
    redeemed: HashMap<String, Redeemed>,
    access_tokens: HashMap<String, AccessGrant>,
    /// `(client_id, jti)` of accepted client assertions, until their `exp`.
    jtis: HashMap<(String, String), i64>,
    /// CIS2 sessions by `sid`, for end-session (and, later, back-channel logout).
    sessions: HashMap<String, SimSession>,
    /// Every ID and access token issued, so tests can prove none leaks into a store or a log.
    issued: Vec<String>,
}

struct Redeemed {
    until: i64,
    access_token: Option<String>,
}

impl Grants {
    fn prune(&mut self, now: i64) {
        self.codes.retain(|_, g| g.expires_at > now);
        self.redeemed.retain(|_, r| r.until > now);
        self.access_tokens.retain(|_, g| g.expires_at > now);
        self.jtis.retain(|_, exp| *exp > now);
    }
}

/// What an authorization code stands for.
struct CodeGrant {
    client_id: String,
    redirect_uri: String,
    nonce: Secret<String>,
    code_challenge: String,
    scope: String,
    acr: AcrClass,
    user: &'static SimUser,
    authenticator: &'static Authenticator,
    selected_role: Option<&'static SimRole>,
    auth_time: i64,
    sid: String,
    expires_at: i64,
}

struct AccessGrant {
    user: &'static SimUser,
    scope: String,
    expires_at: i64,
}

struct SimSession {
    uid: &'static str,
    client_id: String,
}

impl Inner {
    fn new(
        base_url: String,
        options: SimOptions,
        clock: Arc<dyn Clock>,
        shutdown: watch::Sender<bool>,
    ) -> Self {
        let issuer = options
            .issuer
            .unwrap_or_else(|| format!("{base_url}{REALM}"));
        Inner {
            issuer,
            clients: RwLock::new(Arc::new(options.clients)),
            id_token_ttl: secs(options.id_token_ttl),
            access_token_ttl: secs(options.access_token_ttl),
            clock,
            faults: Faults::default(),
            calls: Calls::default(),
            grants: Mutex::new(Grants::default()),
            backchannel_uris: RwLock::new(HashMap::new()),
            shutdown,
            base_url,
        }
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{REALM}{path}", self.base_url)
    }

    fn token_endpoint(&self) -> String {
        self.endpoint("/access_token")
    }

    fn now(&self) -> i64 {
        unix_seconds(self.clock.now())
    }

    fn client(&self, client_id: &str) -> Option<SimClient> {
        find_client(&self.clients(), client_id).cloned()
    }

    /// A snapshot of the registered clients.
    fn clients(&self) -> Arc<Vec<SimClient>> {
        // A poisoned lock still holds a whole Arc: swapping it is the only write.
        self.clients
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn grants(&self) -> MutexGuard<'_, Grants> {
        // Poisoning means a panic mid-update elsewhere; the maps are still coherent enough
        // for a simulator, and refusing every later request would hide the first failure.
        self.grants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn find_client<'c>(clients: &'c [SimClient], client_id: &str) -> Option<&'c SimClient> {
    clients.iter().find(|c| c.client_id == client_id)
}

// ---------------------------------------------------------------------------------------------
// Request parameters

/// Form or query parameters, in order, duplicates kept so they can be refused.
pub(crate) struct Params(Vec<(String, String)>);

impl Params {
    pub(crate) fn parse(raw: &[u8]) -> Self {
        Params(url::form_urlencoded::parse(raw).into_owned().collect())
    }

    /// The value of a parameter. An empty value counts as absent (RFC 6749 §3.1).
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, v)| n == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    fn repeated(&self, name: &str) -> bool {
        self.0.iter().filter(|(n, _)| n == name).count() > 1
    }

    /// The first parameter given more than once (RFC 6749 §3.1 forbids it).
    pub(crate) fn first_repeated(&self) -> Option<&str> {
        self.0
            .iter()
            .map(|(n, _)| n.as_str())
            .find(|n| self.repeated(n))
    }
}

fn has_scope(scope: &str, wanted: &str) -> bool {
    scope.split_ascii_whitespace().any(|s| s == wanted)
}

// ---------------------------------------------------------------------------------------------
// Slow fault

async fn slow(State(inner): State<Arc<Inner>>, request: Request, next: Next) -> Response {
    // Recorded on arrival, before any delay: a test can see a slowed request is in flight.
    {
        let traceparent = request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // A poisoned lock only means a panic mid-push elsewhere: the queue is still usable.
        let mut seen = inner
            .calls
            .traceparents
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.len() == TRACEPARENTS_KEPT {
            seen.pop_front();
        }
        seen.push_back((request.uri().path().to_owned(), traceparent));
    }
    if let Some(delay) = inner.faults.delay() {
        tokio::time::sleep(delay).await;
    }
    next.run(request).await
}

// ---------------------------------------------------------------------------------------------
// Discovery and JWKS

async fn discovery(State(inner): State<Arc<Inner>>) -> Response {
    inner.calls.discovery.fetch_add(1, Ordering::Relaxed);
    if inner.faults.has(Fault::DiscoveryDown) {
        return unavailable();
    }
    axum::Json(discovery_document(&inner)).into_response()
}

fn discovery_document(inner: &Inner) -> Value {
    json!({
        "issuer": inner.issuer,
        "authorization_endpoint": inner.endpoint("/authorize"),
        "token_endpoint": inner.token_endpoint(),
        "userinfo_endpoint": inner.endpoint("/userinfo"),
        "jwks_uri": inner.endpoint("/connect/jwk_uri"),
        "end_session_endpoint": inner.endpoint("/connect/endSession"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256", "RS512"],
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS512", "RS256"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": [
            "openid", "profile", "nhsperson", "nationalrbacaccess", "associatedorgs",
            "selectedrole"
        ],
        "claims_supported": [
            "iss", "sub", "aud", "azp", "exp", "iat", "auth_time", "nonce", "acr", "amr",
            "at_hash", "sid", "authentication_assurance_level", "id_assurance_level",
            "selected_roleid", "name", "family_name", "given_name", "uid", "nhsid_useruid",
            "title", "initials", "display_name", "nhsid_nrbac_roles", "nhsid_user_orgs"
        ],
        "acr_values_supported": ["AAL3_ANY", "AAL2_OR_AAL3_ANY"],
        "prompt_values_supported": ["none", "login", "consent", "select_account"],
        "claims_parameter_supported": false,
        "request_parameter_supported": false,
        "request_uri_parameter_supported": false,
        "authorization_response_iss_parameter_supported": true,
        "backchannel_logout_supported": true,
        "backchannel_logout_session_supported": true,
    })
}

async fn jwks(State(inner): State<Arc<Inner>>) -> Response {
    inner.calls.jwks.fetch_add(1, Ordering::Relaxed);
    if inner.faults.has(Fault::JwksDown) {
        return unavailable();
    }
    axum::Json(keys::provider_key().jwks()).into_response()
}

fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::RETRY_AFTER, "5")],
        "CIS2 simulator: service unavailable (fault injected)",
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Authorization endpoint

/// A checked authorization request.
#[derive(Debug)]
struct AuthRequest {
    client_id: String,
    redirect_uri: String,
    state: String,
    nonce: Secret<String>,
    code_challenge: String,
    scope: String,
    acr: AcrClass,
    prompt_none: bool,
    login_hint: Option<String>,
    sim_authenticator: Option<String>,
    sim_role: Option<String>,
}

/// Why an authorization request cannot go on.
#[derive(Debug, PartialEq, Eq)]
enum AuthorizeError {
    /// The client or redirect URI cannot be trusted: say so on a page, never redirect.
    Page(String),
    /// Send the user back to the (registered) redirect URI with an error.
    Redirect {
        redirect_uri: String,
        state: Option<String>,
        error: &'static str,
        description: String,
    },
}

/// Checks an authorization request. Pure: the client table is the only context.
fn parse_authorize(params: &Params, clients: &[SimClient]) -> Result<AuthRequest, AuthorizeError> {
    let page = |message: &str| Err(AuthorizeError::Page(message.to_string()));
    if params.repeated("client_id") {
        return page("client_id is given more than once.");
    }
    let Some(client_id) = params.get("client_id") else {
        return page("The request has no client_id.");
    };
    let Some(client) = find_client(clients, client_id) else {
        return page("The client_id is not registered with CIS2.");
    };
    if params.repeated("redirect_uri") {
        return page("redirect_uri is given more than once.");
    }
    let Some(redirect_uri) = params.get("redirect_uri") else {
        return page("The request has no redirect_uri.");
    };
    if !client.redirect_uris.iter().any(|r| r == redirect_uri) {
        return page("The redirect_uri is not registered for this client.");
    }

    // From here on the redirect URI is trusted, so errors go back to the client.
    let state = (!params.repeated("state"))
        .then(|| params.get("state").map(str::to_string))
        .flatten();
    let fail = |error: &'static str, description: &str| {
        Err(AuthorizeError::Redirect {
            redirect_uri: redirect_uri.to_string(),
            state: state.clone(),
            error,
            description: description.to_string(),
        })
    };
    if let Some(name) = params.first_repeated() {
        return fail(
            "invalid_request",
            &format!("{name} is given more than once"),
        );
    }
    if params.get("request").is_some() {
        return fail("request_not_supported", "request objects are not supported");
    }
    if params.get("request_uri").is_some() {
        return fail("request_uri_not_supported", "request_uri is not supported");
    }
    match params.get("response_type") {
        None => return fail("invalid_request", "response_type is required"),
        Some("code") => {}
        Some(_) => {
            return fail(
                "unsupported_response_type",
                "only response_type=code is supported",
            );
        }
    }
    if params.get("response_mode").is_some_and(|m| m != "query") {
        return fail("invalid_request", "only response_mode=query is supported");
    }
    let scope = params.get("scope").unwrap_or_default();
    if !has_scope(scope, "openid") {
        return fail("invalid_scope", "scope must include openid");
    }
    let Some(state) = state.clone() else {
        return fail("invalid_request", "state is required");
    };
    let Some(nonce) = params.get("nonce") else {
        return fail("invalid_request", "nonce is required");
    };
    let Some(code_challenge) = params.get("code_challenge") else {
        return fail("invalid_request", "code_challenge is required (PKCE, S256)");
    };
    match params.get("code_challenge_method") {
        Some("S256") => {}
        Some("plain") => {
            return fail(
                "invalid_request",
                "code_challenge_method plain is not allowed: use S256",
            );
        }
        _ => return fail("invalid_request", "code_challenge_method must be S256"),
    }
    if !is_s256_challenge(code_challenge) {
        return fail(
            "invalid_request",
            "code_challenge must be 43 base64url characters (S256)",
        );
    }
    let prompt: Vec<&str> = params
        .get("prompt")
        .unwrap_or_default()
        .split_ascii_whitespace()
        .collect();
    if prompt.contains(&"none") && prompt.len() > 1 {
        return fail(
            "invalid_request",
            "prompt=none cannot be combined with other values",
        );
    }
    if params
        .get("max_age")
        .is_some_and(|m| m.parse::<u64>().is_err())
    {
        return fail(
            "invalid_request",
            "max_age must be a whole number of seconds",
        );
    }
    Ok(AuthRequest {
        client_id: client_id.to_string(),
        redirect_uri: redirect_uri.to_string(),
        state,
        nonce: Secret::new(nonce.to_string()),
        code_challenge: code_challenge.to_string(),
        scope: scope.to_string(),
        acr: AcrClass::from_acr_values(params.get("acr_values")),
        prompt_none: prompt.contains(&"none"),
        login_hint: params.get("login_hint").map(str::to_string),
        sim_authenticator: params.get("sim_authenticator").map(str::to_string),
        sim_role: params.get("sim_role").map(str::to_string),
    })
}

/// An S256 challenge is the base64url of a SHA-256 digest: exactly 43 characters.
fn is_s256_challenge(challenge: &str) -> bool {
    challenge.len() == 43
        && challenge
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// RFC 7636 §4.1: 43 to 128 unreserved characters.
fn is_code_verifier(verifier: &str) -> bool {
    (43..=128).contains(&verifier.len())
        && verifier
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// RFC 7636 §4.6, compared in constant time.
fn pkce_matches(verifier: &str, challenge: &str) -> bool {
    let computed = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
    is_code_verifier(verifier) && bool::from(computed.as_bytes().ct_eq(challenge.as_bytes()))
}

/// Who signs in, with what, in which role.
#[derive(Debug)]
struct SignIn {
    user: &'static SimUser,
    authenticator: &'static Authenticator,
    selected_role: Option<&'static SimRole>,
}

/// Picks the user, authenticator and role for a request that names its user. Pure. Errors are
/// `(error, description)` for the redirect.
fn choose_sign_in(request: &AuthRequest) -> Result<SignIn, (&'static str, String)> {
    let uid = request.login_hint.as_deref().unwrap_or_default();
    let user = users::find_user(uid).ok_or((
        "invalid_request",
        "login_hint names no test user".to_string(),
    ))?;
    let acr = request.acr;
    let authenticator = match request.sim_authenticator.as_deref() {
        Some(amr) => {
            let chosen = user.authenticator(amr).ok_or((
                "invalid_request",
                "sim_authenticator is not one of the user's authenticators".to_string(),
            ))?;
            if !acr.allows(chosen) {
                return Err((
                    "access_denied",
                    format!(
                        "{} does not meet the requested authentication class {}",
                        chosen.label,
                        acr.as_str()
                    ),
                ));
            }
            chosen
        }
        None => acr.first_allowed(user).ok_or((
            "access_denied",
            format!(
                "the user has no authenticator that meets the requested authentication class {}",
                acr.as_str()
            ),
        ))?,
    };
    let role = match request.sim_role.as_deref() {
        Some(id) => Some(user.role(id).ok_or((
            "invalid_request",
            "sim_role is not one of the user's roles".to_string(),
        ))?),
        None => user.roles.first(),
    };
    Ok(SignIn {
        user,
        authenticator,
        selected_role: role.filter(|_| has_scope(&request.scope, "selectedrole")),
    })
}

async fn authorize(State(inner): State<Arc<Inner>>, RawQuery(query): RawQuery) -> Response {
    authorize_params(&inner, Params::parse(query.unwrap_or_default().as_bytes()))
}

/// OpenID Connect Core §3.1.2.1: the authorization endpoint takes POST as well as GET.
async fn authorize_form(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_form(&headers) {
        return page_response(
            StatusCode::BAD_REQUEST,
            page::error(
                "Sign-in cannot start",
                "The request was not sent as a form.",
            ),
        );
    }
    authorize_params(&inner, Params::parse(&body))
}

fn authorize_params(inner: &Inner, params: Params) -> Response {
    let request = match parse_authorize(&params, &inner.clients()) {
        Ok(request) => request,
        Err(error) => return authorize_error(inner, error),
    };
    if request.login_hint.is_none() && !request.prompt_none {
        return sign_in_page(&params, &request);
    }
    complete_sign_in(inner, request)
}

/// The sign-in page's buttons post here: the original request plus the user's choice.
async fn authorize_select(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_form(&headers) {
        return page_response(
            StatusCode::BAD_REQUEST,
            page::error("Sign-in failed", "The sign-in form was not sent as a form."),
        );
    }
    let params = Params::parse(&body);
    let request = match parse_authorize(&params, &inner.clients()) {
        Ok(request) => request,
        Err(error) => return authorize_error(&inner, error),
    };
    if request.login_hint.is_none() {
        return authorize_error(
            &inner,
            AuthorizeError::Redirect {
                redirect_uri: request.redirect_uri,
                state: Some(request.state),
                error: "invalid_request",
                description: "no user was chosen".to_string(),
            },
        );
    }
    complete_sign_in(&inner, request)
}

fn sign_in_page(params: &Params, request: &AuthRequest) -> Response {
    // The buttons and the role picker supply these; carrying them too would repeat them.
    let carried: Vec<(String, String)> = params
        .0
        .iter()
        .filter(|(n, _)| !matches!(n.as_str(), "sim_authenticator" | "sim_role" | "login_hint"))
        .cloned()
        .collect();
    let action = format!("{REALM}/authorize/select");
    let view = SignInView {
        action: &action,
        request: &carried,
        client_id: &request.client_id,
        acr: request.acr,
        select_role: has_scope(&request.scope, "selectedrole"),
    };
    page_response(StatusCode::OK, page::sign_in(&view))
}

fn complete_sign_in(inner: &Inner, request: AuthRequest) -> Response {
    let back = |error: &'static str, description: String| {
        authorize_error(
            inner,
            AuthorizeError::Redirect {
                redirect_uri: request.redirect_uri.clone(),
                state: Some(request.state.clone()),
                error,
                description,
            },
        )
    };
    if request.prompt_none {
        // The simulator keeps no browser session, so there is never one to reuse silently.
        return back("login_required", "the user must sign in".to_string());
    }
    let sign_in = match choose_sign_in(&request) {
        Ok(sign_in) => sign_in,
        Err((error, description)) => {
            debug!(client_id = %request.client_id, error, "cis2 simulator refused sign-in");
            return back(error, description);
        }
    };
    let now = inner.now();
    let code = random_urlsafe(32);
    let sid = random_urlsafe(24);
    debug!(
        client_id = %request.client_id,
        uid = sign_in.user.uid,
        amr = sign_in.authenticator.amr,
        acr = request.acr.as_str(),
        "cis2 simulator sign-in complete, code issued"
    );
    {
        let mut grants = inner.grants();
        grants.prune(now);
        grants.sessions.insert(
            sid.clone(),
            SimSession {
                uid: sign_in.user.uid,
                client_id: request.client_id.clone(),
            },
        );
        grants.codes.insert(
            code.clone(),
            CodeGrant {
                client_id: request.client_id.clone(),
                redirect_uri: request.redirect_uri.clone(),
                nonce: request.nonce,
                code_challenge: request.code_challenge,
                scope: request.scope,
                acr: request.acr,
                user: sign_in.user,
                authenticator: sign_in.authenticator,
                selected_role: sign_in.selected_role,
                auth_time: now,
                sid,
                expires_at: now + CODE_TTL_SECS,
            },
        );
    }
    redirect_to(
        &request.redirect_uri,
        &[
            ("code", code.as_str()),
            ("state", request.state.as_str()),
            ("iss", inner.issuer.as_str()),
        ],
    )
}

fn authorize_error(inner: &Inner, error: AuthorizeError) -> Response {
    match error {
        AuthorizeError::Page(message) => {
            debug!(%message, "cis2 simulator refused an authorization request");
            page_response(
                StatusCode::BAD_REQUEST,
                page::error("Sign-in cannot start", &message),
            )
        }
        AuthorizeError::Redirect {
            redirect_uri,
            state,
            error,
            description,
        } => {
            let mut params = vec![
                ("error", error),
                ("error_description", description.as_str()),
            ];
            if let Some(state) = state.as_deref() {
                params.push(("state", state));
            }
            params.push(("iss", inner.issuer.as_str()));
            redirect_to(&redirect_uri, &params)
        }
    }
}

/// A 302 to `uri` with `params` added to its query.
pub(crate) fn redirect_to(uri: &str, params: &[(&str, &str)]) -> Response {
    let Ok(mut url) = url::Url::parse(uri) else {
        return page_response(
            StatusCode::BAD_REQUEST,
            page::error(
                "Sign-in cannot continue",
                "The registered redirect URI is not a valid URL.",
            ),
        );
    };
    url.query_pairs_mut().extend_pairs(params);
    let Ok(location) = HeaderValue::from_str(url.as_str()) else {
        return page_response(
            StatusCode::BAD_REQUEST,
            page::error(
                "Sign-in cannot continue",
                "The redirect URI cannot be sent.",
            ),
        );
    };
    (
        StatusCode::FOUND,
        [
            (header::LOCATION, location),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
    )
        .into_response()
}

pub(crate) fn page_response(status: StatusCode, html: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
            ),
        ],
        html,
    )
        .into_response()
}

pub(crate) fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

// ---------------------------------------------------------------------------------------------
// Token endpoint

/// An RFC 6749 §5.2 error answer.
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl OAuthError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        OAuthError {
            status,
            error,
            description: description.into(),
        }
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn invalid_client(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_client", description)
    }

    fn invalid_grant(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", description)
    }

    fn server_error(description: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            description,
        )
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        (
            self.status,
            no_store(),
            axum::Json(json!({"error": self.error, "error_description": self.description})),
        )
            .into_response()
    }
}

pub(crate) fn no_store() -> [(header::HeaderName, &'static str); 2] {
    [
        (header::CACHE_CONTROL, "no-store"),
        (header::PRAGMA, "no-cache"),
    ]
}

async fn token(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    inner.calls.token.fetch_add(1, Ordering::Relaxed);
    if inner.faults.has(Fault::TokenServerError) {
        return OAuthError::server_error("simulated CIS2 failure").into_response();
    }
    match redeem(&inner, &headers, &body) {
        Ok(answer) => (StatusCode::OK, no_store(), axum::Json(answer)).into_response(),
        Err(error) => {
            debug!(
                error = error.error,
                description = %error.description,
                "cis2 simulator refused a token request"
            );
            error.into_response()
        }
    }
}

fn redeem(inner: &Inner, headers: &HeaderMap, body: &[u8]) -> Result<Value, OAuthError> {
    if !is_form(headers) {
        return Err(OAuthError::invalid_request(
            "the body must be application/x-www-form-urlencoded",
        ));
    }
    let params = Params::parse(body);
    if let Some(name) = params.first_repeated() {
        return Err(OAuthError::invalid_request(format!(
            "{name} is given more than once"
        )));
    }
    if headers.contains_key(header::AUTHORIZATION) {
        return Err(OAuthError::invalid_client(
            "HTTP authentication is not supported: use client_secret_post or private_key_jwt",
        ));
    }
    let now = inner.now();
    let client = authenticate_client(inner, &params, now)?;
    match params.get("grant_type") {
        None => return Err(OAuthError::invalid_request("grant_type is required")),
        Some("authorization_code") => {}
        Some(_) => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only grant_type=authorization_code is supported",
            ));
        }
    }
    let Some(code) = params.get("code") else {
        return Err(OAuthError::invalid_request("code is required"));
    };
    let grant = take_code(inner, code, now)?;
    check_grant(&grant, &client.client_id, &params)?;

    let access_token = random_urlsafe(32);
    let claims = id_token_claims(inner, &grant, now, &access_token);
    let id_token = sign_id_token(&claims, &inner.faults)
        .map_err(|_| OAuthError::server_error("the ID token could not be signed"))?;
    {
        let mut grants = inner.grants();
        grants.access_tokens.insert(
            access_token.clone(),
            AccessGrant {
                user: grant.user,
                scope: grant.scope.clone(),
                expires_at: now + inner.access_token_ttl,
            },
        );
        if let Some(redeemed) = grants.redeemed.get_mut(code) {
            redeemed.access_token = Some(access_token.clone());
        }
        grants
            .issued
            .extend([access_token.clone(), id_token.clone()]);
    }
    debug!(client_id = %client.client_id, uid = grant.user.uid, "cis2 simulator issued tokens");
    Ok(json!({
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": inner.access_token_ttl,
        "scope": grant.scope,
        "id_token": id_token,
    }))
}

/// Takes a code out of circulation: whatever happens next, it cannot be used again. A second
/// use also revokes the access token the first one bought.
fn take_code(inner: &Inner, code: &str, now: i64) -> Result<CodeGrant, OAuthError> {
    let mut grants = inner.grants();
    grants.prune(now);
    if let Some(redeemed) = grants.redeemed.remove(code) {
        if let Some(token) = redeemed.access_token {
            grants.access_tokens.remove(&token);
        }
        return Err(OAuthError::invalid_grant(
            "the authorization code has already been used",
        ));
    }
    let grant = grants
        .codes
        .remove(code)
        .ok_or_else(|| OAuthError::invalid_grant("the authorization code is unknown or expired"))?;
    grants.redeemed.insert(
        code.to_string(),
        Redeemed {
            until: grant.expires_at,
            access_token: None,
        },
    );
    Ok(grant)
}

/// The redemption must come from the client the code was issued to, with the same redirect
/// URI and the PKCE verifier of the challenge. Pure.
fn check_grant(grant: &CodeGrant, client_id: &str, params: &Params) -> Result<(), OAuthError> {
    if grant.client_id != client_id {
        return Err(OAuthError::invalid_grant(
            "the authorization code was issued to another client",
        ));
    }
    if params.get("redirect_uri") != Some(grant.redirect_uri.as_str()) {
        return Err(OAuthError::invalid_grant(
            "redirect_uri does not match the authorization request",
        ));
    }
    let Some(verifier) = params.get("code_verifier") else {
        return Err(OAuthError::invalid_request("code_verifier is required"));
    };
    if !pkce_matches(verifier, &grant.code_challenge) {
        return Err(OAuthError::invalid_grant(
            "code_verifier does not match the code_challenge",
        ));
    }
    Ok(())
}

fn authenticate_client(inner: &Inner, params: &Params, now: i64) -> Result<SimClient, OAuthError> {
    match (
        params.get("client_assertion_type"),
        params.get("client_assertion"),
    ) {
        (Some(assertion_type), Some(assertion)) => {
            if params.get("client_secret").is_some() {
                return Err(OAuthError::invalid_request(
                    "use one client authentication method, not two",
                ));
            }
            if assertion_type != JWT_BEARER {
                return Err(OAuthError::invalid_client(
                    "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ));
            }
            let clients = inner.clients();
            let (client, claims) = verify_client_assertion(
                assertion,
                params.get("client_id"),
                &clients,
                &inner.token_endpoint(),
                now,
            )?;
            let mut grants = inner.grants();
            grants.prune(now);
            let key = (client.client_id.clone(), claims.jti);
            if grants.jtis.contains_key(&key) {
                return Err(OAuthError::invalid_client(
                    "client_assertion jti has been used before",
                ));
            }
            grants.jtis.insert(key, claims.exp);
            Ok(client.clone())
        }
        (None, None) => authenticate_secret(inner, params),
        _ => Err(OAuthError::invalid_request(
            "client_assertion and client_assertion_type go together",
        )),
    }
}

fn authenticate_secret(inner: &Inner, params: &Params) -> Result<SimClient, OAuthError> {
    let Some(client_id) = params.get("client_id") else {
        return Err(OAuthError::invalid_client("no client authentication"));
    };
    let Some(client) = inner.client(client_id) else {
        return Err(OAuthError::invalid_client("unknown client"));
    };
    let Some(registered) = client.client_secret.as_deref() else {
        return Err(OAuthError::invalid_client(
            "this client is not registered for client_secret_post",
        ));
    };
    let Some(given) = params.get("client_secret") else {
        return Err(OAuthError::invalid_client("no client authentication"));
    };
    if !secrets_match(given, registered) {
        return Err(OAuthError::invalid_client("client authentication failed"));
    }
    Ok(client)
}

/// Constant time, length included: both sides are hashed to equal-length digests first.
pub(crate) fn secrets_match(given: &str, registered: &str) -> bool {
    let given = Sha256::digest(given.as_bytes());
    let registered = Sha256::digest(registered.as_bytes());
    bool::from(given.as_slice().ct_eq(registered.as_slice()))
}

#[derive(Debug, Deserialize)]
struct AssertionClaims {
    sub: String,
    exp: i64,
    #[serde(default)]
    jti: String,
}

/// RFC 7523 client authentication, as CIS2 and APIM apply it: RS512 (or RS256) signature by the
/// client's key named by `kid`; `iss = sub = client_id`; `aud` the token endpoint; `exp` in the
/// future and at most 5 minutes ahead; a `jti`. Pure: jti replay is the caller's check.
fn verify_client_assertion<'c>(
    assertion: &str,
    client_id_param: Option<&str>,
    clients: &'c [SimClient],
    token_endpoint: &str,
    now: i64,
) -> Result<(&'c SimClient, AssertionClaims), OAuthError> {
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| OAuthError::invalid_client("client_assertion is not a JWT"))?;
    if !matches!(header.alg, Algorithm::RS512 | Algorithm::RS256) {
        return Err(OAuthError::invalid_client(
            "client_assertion must be signed with RS512 or RS256",
        ));
    }
    let Some(kid) = header.kid.as_deref() else {
        return Err(OAuthError::invalid_client("client_assertion has no kid"));
    };
    // Only to find whose keys to verify with; nothing is trusted until the signature is.
    let unverified = jsonwebtoken::dangerous::insecure_decode::<AssertionClaims>(assertion)
        .map_err(|_| OAuthError::invalid_client("client_assertion claims are malformed"))?
        .claims;
    let client_id = unverified.sub.as_str();
    if client_id_param.is_some_and(|id| id != client_id) {
        return Err(OAuthError::invalid_client(
            "client_id does not match the client_assertion",
        ));
    }
    let client = find_client(clients, client_id)
        .ok_or_else(|| OAuthError::invalid_client("unknown client"))?;
    let jwk = client
        .jwks
        .as_ref()
        .ok_or_else(|| {
            OAuthError::invalid_client("this client is not registered for private_key_jwt")
        })?
        .find(kid)
        .ok_or_else(|| {
            OAuthError::invalid_client("client_assertion kid is not in the client's JWKS")
        })?;
    if jwk
        .common
        .key_algorithm
        .is_some_and(|ka| ka != jsonwebtoken::jwk::KeyAlgorithm::from(header.alg))
    {
        return Err(OAuthError::invalid_client(
            "client_assertion alg does not match the key's alg",
        ));
    }
    let key = DecodingKey::from_jwk(jwk)
        .map_err(|_| OAuthError::invalid_client("the client's key is not usable"))?;
    let mut validation = Validation::new(header.alg);
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    validation.set_issuer(&[client_id]);
    validation.set_audience(&[token_endpoint]);
    validation.sub = Some(client_id.to_string());
    // Expiry is checked below against the simulator's clock, with no leeway.
    validation.validate_exp = false;
    let claims = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &validation)
        .map_err(|e| {
            OAuthError::invalid_client(format!("client_assertion is not valid: {}", e.kind_name()))
        })?
        .claims;
    if claims.exp <= now {
        return Err(OAuthError::invalid_client("client_assertion has expired"));
    }
    if claims.exp > now + ASSERTION_MAX_AHEAD_SECS {
        return Err(OAuthError::invalid_client(
            "client_assertion exp is more than 5 minutes in the future",
        ));
    }
    if claims.jti.is_empty() {
        return Err(OAuthError::invalid_client("client_assertion has no jti"));
    }
    Ok((client, claims))
}

/// Names a jsonwebtoken failure without echoing any part of the token.
trait KindName {
    fn kind_name(&self) -> &'static str;
}

impl KindName for jsonwebtoken::errors::Error {
    fn kind_name(&self) -> &'static str {
        use jsonwebtoken::errors::ErrorKind;
        match self.kind() {
            ErrorKind::InvalidSignature => "bad signature",
            ErrorKind::InvalidIssuer => "iss must be the client_id",
            ErrorKind::InvalidAudience => "aud must be the token endpoint URL",
            ErrorKind::InvalidSubject => "sub must be the client_id",
            ErrorKind::MissingRequiredClaim(_) => {
                "a required claim (exp, iss, sub, aud) is missing"
            }
            ErrorKind::InvalidAlgorithm => "algorithm not allowed",
            _ => "malformed",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ID tokens

fn id_token_claims(inner: &Inner, grant: &CodeGrant, now: i64, access_token: &str) -> Value {
    let faults = &inner.faults;
    let (iat, exp) = if faults.has(Fault::Expired) {
        let exp = now - EXPIRED_BY_SECS;
        (exp - inner.id_token_ttl, exp)
    } else {
        (now, now + inner.id_token_ttl)
    };
    let iss = if faults.has(Fault::WrongIssuer) {
        format!("{}/not-this-issuer", inner.issuer)
    } else {
        inner.issuer.clone()
    };
    let aud = if faults.has(Fault::WrongAudience) {
        "another-client".to_string()
    } else {
        grant.client_id.clone()
    };
    let nonce = if faults.has(Fault::WrongNonce) {
        random_urlsafe(16)
    } else {
        grant.nonce.expose().clone()
    };
    let auth_time = if faults.has(Fault::StaleAuthTime) {
        grant.auth_time - STALE_AUTH_SECS
    } else {
        grant.auth_time
    };
    let mut claims = Map::new();
    claims.insert("iss".into(), json!(iss));
    claims.insert("sub".into(), json!(grant.user.uid));
    claims.insert("aud".into(), json!(aud));
    claims.insert("azp".into(), json!(aud));
    claims.insert("exp".into(), json!(exp));
    claims.insert("iat".into(), json!(iat));
    claims.insert("auth_time".into(), json!(auth_time));
    claims.insert("nonce".into(), json!(nonce));
    claims.insert("acr".into(), json!(grant.acr.as_str()));
    claims.insert("amr".into(), json!([grant.authenticator.amr]));
    if let Some(level) = aal_claim(faults, grant.authenticator) {
        claims.insert("authentication_assurance_level".into(), level);
    }
    claims.insert("id_assurance_level".into(), json!("3"));
    claims.insert("sid".into(), json!(grant.sid));
    claims.insert("at_hash".into(), json!(at_hash(access_token)));
    if let Some(role) = grant.selected_role {
        claims.insert("selected_roleid".into(), json!(role.person_roleid));
    }
    Value::Object(claims)
}

/// The achieved level: a string, as real CIS2 tokens carry it, unless a fault says otherwise.
fn aal_claim(faults: &Faults, authenticator: &Authenticator) -> Option<Value> {
    if faults.has(Fault::AalMissing) {
        None
    } else if faults.has(Fault::AalTooLow) {
        Some(json!("1"))
    } else if faults.has(Fault::AalAsInteger) {
        Some(json!(authenticator.aal.level()))
    } else {
        Some(json!(authenticator.aal.level().to_string()))
    }
}

/// OIDC Core §3.1.3.6: the left half of SHA-256 of the access token, base64url.
fn at_hash(access_token: &str) -> String {
    let digest = Sha256::digest(access_token.as_bytes());
    URL_SAFE_NO_PAD.encode(&digest[..16])
}

fn sign_id_token(claims: &Value, faults: &Faults) -> jsonwebtoken::errors::Result<String> {
    if faults.has(Fault::AlgNone) {
        let header = serde_json::to_vec(&json!({"alg": "none", "typ": "JWT"}))?;
        let payload = serde_json::to_vec(claims)?;
        return Ok(format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        ));
    }
    let unknown_kid = faults.has(Fault::UnknownKid);
    let key = if unknown_kid || faults.has(Fault::BadSignature) {
        keys::rogue_key()
    } else {
        keys::provider_key()
    };
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(
        if unknown_kid {
            UNKNOWN_KID
        } else {
            PROVIDER_KID
        }
        .to_string(),
    );
    jsonwebtoken::encode(&header, claims, key.encoding_key())
}

// ---------------------------------------------------------------------------------------------
// UserInfo

async fn userinfo(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    inner.calls.userinfo.fetch_add(1, Ordering::Relaxed);
    let Some(token) = bearer_token(&headers) else {
        return unauthorized("Bearer realm=\"cis2-sim\"");
    };
    let now = inner.now();
    let grant = {
        let mut grants = inner.grants();
        grants.prune(now);
        grants
            .access_tokens
            .get(token)
            .map(|g| (g.user, g.scope.clone()))
    };
    let Some((user, scope)) = grant else {
        return unauthorized(
            "Bearer realm=\"cis2-sim\", error=\"invalid_token\", \
             error_description=\"the access token is unknown or expired\"",
        );
    };
    let mut claims = userinfo_claims(user, &scope);
    if inner.faults.has(Fault::UserinfoWrongSub) {
        let other = users::USERS
            .iter()
            .find(|u| u.uid != user.uid)
            .map_or("000000000000", |u| u.uid);
        claims.insert("sub".into(), json!(other));
    }
    debug!(uid = user.uid, "cis2 simulator answered userinfo");
    (
        StatusCode::OK,
        no_store(),
        axum::Json(Value::Object(claims)),
    )
        .into_response()
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthorized(challenge: &'static str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, challenge)],
    )
        .into_response()
}

/// UserInfo claims by scope (NHS-CIS2-REFERENCE.md §1). Pure.
fn userinfo_claims(user: &SimUser, scope: &str) -> Map<String, Value> {
    let mut claims = Map::new();
    claims.insert("sub".into(), json!(user.uid));
    if has_scope(scope, "profile") {
        claims.insert("name".into(), json!(user.name()));
        claims.insert("family_name".into(), json!(user.family_name));
        claims.insert("given_name".into(), json!(user.given_name));
        claims.insert("uid".into(), json!(user.uid));
    }
    if has_scope(scope, "nhsperson") {
        claims.insert("nhsid_useruid".into(), json!(user.uid));
        claims.insert("title".into(), json!(user.title));
        claims.insert("initials".into(), json!(user.initials));
        claims.insert("display_name".into(), json!(user.display_name()));
    }
    if has_scope(scope, "nationalrbacaccess") {
        let roles: Vec<Value> = user
            .roles
            .iter()
            .map(|r| {
                json!({
                    "person_roleid": r.person_roleid,
                    "org_code": r.org_code,
                    "role_code": r.role_code,
                    "role_name": r.role_name,
                    "person_orgid": r.person_orgid,
                })
            })
            .collect();
        claims.insert("nhsid_nrbac_roles".into(), Value::Array(roles));
    }
    if has_scope(scope, "associatedorgs") {
        let orgs: Vec<Value> = user
            .orgs()
            .into_iter()
            .map(|(code, name)| json!({"org_code": code, "org_name": name}))
            .collect();
        claims.insert("nhsid_user_orgs".into(), Value::Array(orgs));
    }
    claims
}

// ---------------------------------------------------------------------------------------------
// End session (RP-initiated logout)

#[derive(Debug, Deserialize)]
struct HintClaims {
    aud: Value,
    #[serde(default)]
    sid: Option<String>,
    #[serde(default)]
    sub: Option<String>,
}

impl HintClaims {
    fn client_id(&self) -> Option<&str> {
        match &self.aud {
            Value::String(aud) => Some(aud),
            Value::Array(auds) => auds.first().and_then(Value::as_str),
            _ => None,
        }
    }
}

/// An ID token this provider signed; expiry does not matter for a logout hint (RP-Initiated
/// Logout 1.0 §2).
fn verify_id_token_hint(hint: &str) -> Option<HintClaims> {
    let mut validation = Validation::new(Algorithm::RS256);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    jsonwebtoken::decode::<HintClaims>(hint, keys::provider_key().decoding_key(), &validation)
        .ok()
        .map(|data| data.claims)
}

async fn end_session(State(inner): State<Arc<Inner>>, RawQuery(query): RawQuery) -> Response {
    let params = Params::parse(query.unwrap_or_default().as_bytes());
    let refuse = |message: &str| {
        debug!(message, "cis2 simulator refused an end-session request");
        page_response(
            StatusCode::BAD_REQUEST,
            page::error("Sign-out failed", message),
        )
    };
    if let Some(name) = params.first_repeated() {
        return refuse(&format!("{name} is given more than once."));
    }
    let hint = match params.get("id_token_hint") {
        None => None,
        Some(raw) => match verify_id_token_hint(raw) {
            Some(claims) => Some(claims),
            None => return refuse("The id_token_hint was not issued by this provider."),
        },
    };
    let client_id = match (
        hint.as_ref().and_then(HintClaims::client_id),
        params.get("client_id"),
    ) {
        (Some(a), Some(b)) if a != b => {
            return refuse("client_id does not match the id_token_hint.");
        }
        (Some(id), _) | (None, Some(id)) => Some(id),
        (None, None) => None,
    };
    let redirect = match params.get("post_logout_redirect_uri") {
        None => None,
        Some(uri) => {
            let registered = client_id
                .and_then(|id| inner.client(id))
                .is_some_and(|c| c.post_logout_redirect_uris.iter().any(|r| r == uri));
            if !registered {
                return refuse("The post_logout_redirect_uri is not registered for this client.");
            }
            Some(uri)
        }
    };
    if let Some(sid) = hint.as_ref().and_then(|h| h.sid.as_deref()) {
        inner.grants().sessions.remove(sid);
    }
    debug!(
        uid = hint.as_ref().and_then(|h| h.sub.as_deref()).unwrap_or("-"),
        "cis2 simulator signed a user out"
    );
    match redirect {
        Some(uri) => {
            let state: Vec<(&str, &str)> = params
                .get("state")
                .map(|s| ("state", s))
                .into_iter()
                .collect();
            redirect_to(uri, &state)
        }
        None => page_response(StatusCode::OK, page::signed_out()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aal::Aal;
    use crate::clock::ManualClock;
    use crate::sim::keys::SimKey;
    use jsonwebtoken::{EncodingKey, TokenData};
    use std::sync::OnceLock;
    use std::time::SystemTime;

    const CLIENT: &str = "broker-client";
    const SECRET: &str = "correct-horse-battery-staple";
    const JWT_CLIENT: &str = "jwt-client";
    const REDIRECT: &str = "https://broker.test/callback";
    const LOGOUT_REDIRECT: &str = "https://broker.test/signed-out";
    const STATE: &str = "state-123";
    const NONCE: &str = "nonce-456";
    const STEP_UP_USER: &str = "656005750107";
    const PASSKEY_ONLY: &str = "656005750111";
    const SEVERAL_ROLES: &str = "656005750104";
    const EXPLICIT_PORT_ISSUER: &str =
        "https://cis2.sim.test:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare";

    fn client_key() -> &'static SimKey {
        static KEY: OnceLock<SimKey> = OnceLock::new();
        KEY.get_or_init(|| SimKey::generate("client-key-1", Algorithm::RS512))
    }

    fn other_client_key() -> &'static SimKey {
        static KEY: OnceLock<SimKey> = OnceLock::new();
        KEY.get_or_init(|| SimKey::generate("client-key-1", Algorithm::RS512))
    }

    fn options() -> SimOptions {
        SimOptions {
            clients: vec![
                SimClient {
                    client_id: CLIENT.into(),
                    client_secret: Some(SECRET.into()),
                    jwks: None,
                    redirect_uris: vec![REDIRECT.into()],
                    post_logout_redirect_uris: vec![LOGOUT_REDIRECT.into()],
                },
                SimClient {
                    client_id: JWT_CLIENT.into(),
                    client_secret: None,
                    jwks: Some(client_key().jwks()),
                    redirect_uris: vec![REDIRECT.into()],
                    post_logout_redirect_uris: vec![],
                },
            ],
            ..SimOptions::default()
        }
    }

    async fn start(options: SimOptions) -> Cis2Simulator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("port 0 on loopback is always bindable");
        Cis2Simulator::start(listener, options)
            .await
            .expect("the simulator starts")
    }

    async fn start_manual(clock: Arc<ManualClock>) -> Cis2Simulator {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("port 0 on loopback is always bindable");
        Cis2Simulator::start_with_clock(listener, options(), clock)
            .await
            .expect("the simulator starts")
    }

    fn http() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a plain client builds")
    }

    struct Pkce {
        verifier: String,
        challenge: String,
    }

    fn pkce() -> Pkce {
        let verifier = random_urlsafe(32);
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        Pkce {
            verifier,
            challenge,
        }
    }

    /// An authorization URL with the usual parameters; `changes` replace or add parameters,
    /// and an empty value removes one.
    fn authorize_url(sim: &Cis2Simulator, challenge: &str, changes: &[(&str, &str)]) -> String {
        let mut params: Vec<(&str, &str)> = vec![
            ("response_type", "code"),
            ("client_id", CLIENT),
            ("redirect_uri", REDIRECT),
            ("scope", "openid profile nationalrbacaccess"),
            ("state", STATE),
            ("nonce", NONCE),
            ("code_challenge", challenge),
            ("code_challenge_method", "S256"),
            ("acr_values", "AAL2_OR_AAL3_ANY"),
            ("prompt", "login"),
        ];
        for (name, value) in changes {
            params.retain(|(n, _)| n != name);
            if !value.is_empty() {
                params.push((name, value));
            }
        }
        let mut url = url::Url::parse(&format!("{}{REALM}/authorize", sim.base_url()))
            .expect("the base URL is a URL");
        url.query_pairs_mut().extend_pairs(params);
        url.to_string()
    }

    fn location(response: &reqwest::Response) -> Option<url::Url> {
        let value = response.headers().get(header::LOCATION)?.to_str().ok()?;
        url::Url::parse(value).ok()
    }

    fn query_of(url: &url::Url) -> HashMap<String, String> {
        url.query_pairs().into_owned().collect()
    }

    /// Follows an authorization request that should come straight back; the redirect's query.
    async fn authorize_redirect(url: &str) -> HashMap<String, String> {
        let response = http().get(url).send().await.expect("the simulator answers");
        assert_eq!(response.status(), StatusCode::FOUND);
        let location = location(&response).expect("a redirect has a Location");
        assert!(
            location.as_str().starts_with(REDIRECT),
            "redirected to the registered URI"
        );
        query_of(&location)
    }

    async fn sign_in(sim: &Cis2Simulator, pkce: &Pkce, changes: &[(&str, &str)]) -> String {
        let mut changes = changes.to_vec();
        if !changes.iter().any(|(n, _)| *n == "login_hint") {
            changes.push(("login_hint", STEP_UP_USER));
        }
        let query = authorize_redirect(&authorize_url(sim, &pkce.challenge, &changes)).await;
        assert_eq!(query.get("error"), None, "{query:?}");
        query.get("code").cloned().expect("a code comes back")
    }

    async fn post_token(sim: &Cis2Simulator, form: &[(&str, &str)]) -> (StatusCode, Value) {
        let response = http()
            .post(format!("{}{REALM}/access_token", sim.base_url()))
            .form(form)
            .send()
            .await
            .expect("the simulator answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn redeem(sim: &Cis2Simulator, code: &str, verifier: &str) -> (StatusCode, Value) {
        post_token(
            sim,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", verifier),
                ("client_id", CLIENT),
                ("client_secret", SECRET),
            ],
        )
        .await
    }

    /// Signs in the step-up user and redeems the code: the token response.
    async fn tokens(sim: &Cis2Simulator, changes: &[(&str, &str)]) -> Value {
        let pkce = pkce();
        let code = sign_in(sim, &pkce, changes).await;
        let (status, body) = redeem(sim, &code, &pkce.verifier).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    fn part(token: &str, index: usize) -> Value {
        let raw = token.split('.').nth(index).expect("a JWT has three parts");
        let bytes = URL_SAFE_NO_PAD
            .decode(raw)
            .expect("JWT parts are base64url");
        serde_json::from_slice(&bytes).expect("JWT parts are JSON")
    }

    async fn fetch_jwks(sim: &Cis2Simulator) -> jsonwebtoken::jwk::JwkSet {
        http()
            .get(format!("{}{REALM}/connect/jwk_uri", sim.base_url()))
            .send()
            .await
            .expect("the simulator answers")
            .json()
            .await
            .expect("the JWKS is JSON")
    }

    /// Verifies an ID token the way a relying party does: key from the JWKS by kid, RS256,
    /// issuer and audience.
    async fn verify(sim: &Cis2Simulator, id_token: &str) -> Result<TokenData<Value>, String> {
        let header = jsonwebtoken::decode_header(id_token).map_err(|e| e.to_string())?;
        let kid = header.kid.ok_or("no kid")?;
        let jwks = fetch_jwks(sim).await;
        let jwk = jwks.find(&kid).ok_or("kid not in JWKS")?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_issuer(&[sim.issuer()]);
        validation.set_audience(&[CLIENT]);
        validation.leeway = 0;
        jsonwebtoken::decode(id_token, &key, &validation).map_err(|e| e.to_string())
    }

    fn now() -> i64 {
        unix_seconds(SystemTime::now())
    }

    fn assertion(sim: &Cis2Simulator, key: &SimKey, changes: &[(&str, Value)]) -> String {
        let now = now();
        let mut claims = json!({
            "iss": JWT_CLIENT,
            "sub": JWT_CLIENT,
            "aud": format!("{}{REALM}/access_token", sim.base_url()),
            "iat": now,
            "exp": now + 300,
            "jti": random_urlsafe(16),
        });
        for (name, value) in changes {
            if value.is_null() {
                claims.as_object_mut().map(|c| c.remove(*name));
            } else {
                claims[*name] = value.clone();
            }
        }
        let mut header = Header::new(key.alg());
        header.kid = Some(key.kid().to_string());
        jsonwebtoken::encode(&header, &claims, key.encoding_key()).expect("test key signs")
    }

    async fn redeem_with_assertion(
        sim: &Cis2Simulator,
        code: &str,
        verifier: &str,
        assertion: &str,
    ) -> (StatusCode, Value) {
        post_token(
            sim,
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", verifier),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", assertion),
            ],
        )
        .await
    }

    #[tokio::test]
    async fn discovery_document_lists_the_cis2_endpoints() {
        let sim = start(options()).await;
        assert!(
            sim.discovery_url()
                .ends_with("/.well-known/openid-configuration")
        );
        let doc: Value = http()
            .get(sim.discovery_url())
            .send()
            .await
            .expect("the simulator answers")
            .json()
            .await
            .expect("discovery is JSON");
        let base = format!("{}{REALM}", sim.base_url());
        assert_eq!(doc["issuer"], base);
        assert_eq!(sim.issuer(), base);
        assert_eq!(doc["authorization_endpoint"], format!("{base}/authorize"));
        assert_eq!(doc["token_endpoint"], format!("{base}/access_token"));
        assert_eq!(doc["userinfo_endpoint"], format!("{base}/userinfo"));
        assert_eq!(doc["jwks_uri"], format!("{base}/connect/jwk_uri"));
        assert_eq!(
            doc["end_session_endpoint"],
            format!("{base}/connect/endSession")
        );
        assert_eq!(doc["response_types_supported"], json!(["code"]));
        assert_eq!(
            doc["id_token_signing_alg_values_supported"],
            json!(["RS256", "RS512"])
        );
        assert_eq!(
            doc["token_endpoint_auth_methods_supported"],
            json!(["client_secret_post", "private_key_jwt"])
        );
        assert_eq!(doc["code_challenge_methods_supported"], json!(["S256"]));
        assert_eq!(doc["backchannel_logout_supported"], true);
        assert_eq!(doc["backchannel_logout_session_supported"], true);
        for field in [
            "subject_types_supported",
            "scopes_supported",
            "claims_supported",
        ] {
            assert!(doc[field].is_array(), "{field}");
        }
        assert!(
            doc["acr_values_supported"]
                .as_array()
                .is_some_and(|a| a.contains(&json!("AAL2_OR_AAL3_ANY")))
        );
        assert_eq!(sim.discovery_calls(), 1);
        assert_eq!(sim.users().len(), 6);
    }

    #[tokio::test]
    async fn an_explicit_port_issuer_is_used_verbatim() {
        let sim = start(SimOptions {
            issuer: Some(EXPLICIT_PORT_ISSUER.into()),
            ..options()
        })
        .await;
        assert_eq!(sim.issuer(), EXPLICIT_PORT_ISSUER);
        let doc: Value = http()
            .get(sim.discovery_url())
            .send()
            .await
            .expect("the simulator answers")
            .json()
            .await
            .expect("discovery is JSON");
        assert_eq!(doc["issuer"], EXPLICIT_PORT_ISSUER);
        assert!(
            doc["token_endpoint"]
                .as_str()
                .is_some_and(|t| t.starts_with(&sim.base_url()))
        );

        let pkce = pkce();
        let url = authorize_url(&sim, &pkce.challenge, &[("login_hint", STEP_UP_USER)]);
        let query = authorize_redirect(&url).await;
        assert_eq!(
            query.get("iss").map(String::as_str),
            Some(EXPLICIT_PORT_ISSUER)
        );
        let code = query.get("code").expect("a code comes back");
        let (_, body) = redeem(&sim, code, &pkce.verifier).await;
        let id_token = body["id_token"].as_str().expect("an ID token");
        let claims = verify(&sim, id_token)
            .await
            .expect("the ID token verifies")
            .claims;
        assert_eq!(claims["iss"], EXPLICIT_PORT_ISSUER);
    }

    #[tokio::test]
    async fn login_hint_skips_the_page_and_returns_code_state_and_iss() {
        let sim = start(options()).await;
        let pkce = pkce();
        let url = authorize_url(&sim, &pkce.challenge, &[("login_hint", STEP_UP_USER)]);
        let query = authorize_redirect(&url).await;
        assert_eq!(query.get("state").map(String::as_str), Some(STATE));
        assert_eq!(query.get("iss").map(String::as_str), Some(sim.issuer()));
        let code = query.get("code").expect("a code comes back");
        assert!(code.len() >= 43, "codes carry at least 256 bits");
        let again = sign_in(&sim, &pkce, &[]).await;
        assert_ne!(&again, code);

        // The same request as a form POST (OIDC Core §3.1.2.1).
        let (endpoint, query) = url.split_once('?').expect("the URL has a query");
        let response = http()
            .post(endpoint)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(query.to_string())
            .send()
            .await
            .expect("the simulator answers");
        assert_eq!(response.status(), StatusCode::FOUND);
        let query = query_of(&location(&response).expect("a redirect"));
        assert!(query.contains_key("code"));
    }

    #[tokio::test]
    async fn a_code_redeems_once_and_a_replay_revokes_its_access_token() {
        let sim = start(options()).await;
        let pkce = pkce();
        let code = sign_in(&sim, &pkce, &[]).await;
        let (status, body) = redeem(&sim, &code, &pkce.verifier).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["token_type"], "Bearer");
        assert!(body["expires_in"].as_i64().is_some_and(|s| s > 0));
        assert_eq!(body["scope"], "openid profile nationalrbacaccess");
        let access_token = body["access_token"].as_str().expect("an access token");

        let (status, body) = redeem(&sim, &code, &pkce.verifier).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_grant");
        let response = http()
            .get(format!("{}{REALM}/userinfo", sim.base_url()))
            .bearer_auth(access_token)
            .send()
            .await
            .expect("the simulator answers");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(sim.token_calls(), 2);
    }

    #[tokio::test]
    async fn token_requests_with_wrong_details_are_refused() {
        let sim = start(options()).await;
        type Case = (
            &'static str,
            fn(&mut Vec<(&'static str, String)>),
            StatusCode,
            &'static str,
        );
        let cases: Vec<Case> = vec![
            (
                "wrong verifier",
                |f| set(f, "code_verifier", &random_urlsafe(32)),
                StatusCode::BAD_REQUEST,
                "invalid_grant",
            ),
            (
                "short verifier",
                |f| set(f, "code_verifier", "abc"),
                StatusCode::BAD_REQUEST,
                "invalid_grant",
            ),
            (
                "no verifier",
                |f| unset(f, "code_verifier"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "wrong redirect_uri",
                |f| set(f, "redirect_uri", "https://broker.test/other"),
                StatusCode::BAD_REQUEST,
                "invalid_grant",
            ),
            (
                "no redirect_uri",
                |f| unset(f, "redirect_uri"),
                StatusCode::BAD_REQUEST,
                "invalid_grant",
            ),
            (
                "wrong secret",
                |f| set(f, "client_secret", "wrong"),
                StatusCode::UNAUTHORIZED,
                "invalid_client",
            ),
            (
                "secret prefix",
                |f| set(f, "client_secret", "correct-horse"),
                StatusCode::UNAUTHORIZED,
                "invalid_client",
            ),
            (
                "no secret",
                |f| unset(f, "client_secret"),
                StatusCode::UNAUTHORIZED,
                "invalid_client",
            ),
            (
                "unknown client",
                |f| set(f, "client_id", "nobody"),
                StatusCode::UNAUTHORIZED,
                "invalid_client",
            ),
            (
                "no client",
                |f| {
                    unset(f, "client_id");
                    unset(f, "client_secret")
                },
                StatusCode::UNAUTHORIZED,
                "invalid_client",
            ),
            (
                "other grant type",
                |f| set(f, "grant_type", "refresh_token"),
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
            ),
            (
                "no grant type",
                |f| unset(f, "grant_type"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "unknown code",
                |f| set(f, "code", "not-a-code"),
                StatusCode::BAD_REQUEST,
                "invalid_grant",
            ),
            (
                "no code",
                |f| unset(f, "code"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "repeated parameter",
                |f| f.push(("code_verifier", "x".repeat(43))),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
            (
                "half an assertion",
                |f| f.push(("client_assertion_type", JWT_BEARER.into())),
                StatusCode::BAD_REQUEST,
                "invalid_request",
            ),
        ];
        fn set(form: &mut Vec<(&'static str, String)>, name: &'static str, value: &str) {
            unset(form, name);
            form.push((name, value.to_string()));
        }
        fn unset(form: &mut Vec<(&'static str, String)>, name: &str) {
            form.retain(|(n, _)| *n != name);
        }
        for (name, change, status, error) in cases {
            let pkce = pkce();
            let code = sign_in(&sim, &pkce, &[]).await;
            let mut form: Vec<(&'static str, String)> = vec![
                ("grant_type", "authorization_code".into()),
                ("code", code.clone()),
                ("redirect_uri", REDIRECT.into()),
                ("code_verifier", pkce.verifier.clone()),
                ("client_id", CLIENT.into()),
                ("client_secret", SECRET.into()),
            ];
            change(&mut form);
            let form: Vec<(&str, &str)> = form.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let (got_status, body) = post_token(&sim, &form).await;
            assert_eq!(got_status, status, "{name}: {body}");
            assert_eq!(body["error"], error, "{name}: {body}");
            let description = body["error_description"].as_str().unwrap_or_default();
            assert!(!description.is_empty(), "{name}");
            assert!(
                !description.contains(&code) && !description.contains(SECRET),
                "{name}"
            );
        }

        // Not a form, and HTTP Basic: refused before anything else.
        let pkce = pkce();
        let code = sign_in(&sim, &pkce, &[]).await;
        let url = format!("{}{REALM}/access_token", sim.base_url());
        let response = http()
            .post(&url)
            .json(&json!({"grant_type": "authorization_code", "code": code}))
            .send()
            .await
            .expect("the simulator answers");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let response = http()
            .post(&url)
            .basic_auth(CLIENT, Some(SECRET))
            .form(&[("grant_type", "authorization_code"), ("code", &code)])
            .send()
            .await
            .expect("the simulator answers");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        // The code survived both (neither came from an authenticated client).
        let (status, body) = redeem(&sim, &code, &pkce.verifier).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    #[tokio::test]
    async fn another_clients_code_is_refused() {
        let sim = start(options()).await;
        let pkce = pkce();
        let code = sign_in(&sim, &pkce, &[]).await;
        let assertion = assertion(&sim, client_key(), &[]);
        let (status, body) = redeem_with_assertion(&sim, &code, &pkce.verifier, &assertion).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_grant");
    }

    #[tokio::test]
    async fn private_key_jwt_client_assertions_are_checked() {
        let sim = start(options()).await;
        let good = |sim: &Cis2Simulator| assertion(sim, client_key(), &[]);
        let token_url = format!("{}{REALM}/access_token", sim.base_url());
        let now = now();
        let cases: Vec<(&str, String)> = vec![
            (
                "wrong aud",
                assertion(&sim, client_key(), &[("aud", json!(sim.issuer()))]),
            ),
            (
                "wrong iss",
                assertion(&sim, client_key(), &[("iss", json!(CLIENT))]),
            ),
            (
                "no jti",
                assertion(&sim, client_key(), &[("jti", Value::Null)]),
            ),
            (
                "no exp",
                assertion(&sim, client_key(), &[("exp", Value::Null)]),
            ),
            (
                "expired",
                assertion(&sim, client_key(), &[("exp", json!(now - 5))]),
            ),
            (
                "exp too far ahead",
                assertion(&sim, client_key(), &[("exp", json!(now + 3600))]),
            ),
            (
                "float exp",
                assertion(&sim, client_key(), &[("exp", json!(now as f64 + 60.5))]),
            ),
            (
                "signed by another key",
                assertion(&sim, other_client_key(), &[]),
            ),
            (
                "unknown client",
                assertion(
                    &sim,
                    client_key(),
                    &[("iss", json!("x")), ("sub", json!("x"))],
                ),
            ),
            (
                "secret client",
                assertion(
                    &sim,
                    client_key(),
                    &[("iss", json!(CLIENT)), ("sub", json!(CLIENT))],
                ),
            ),
            ("not a JWT", "not.a.jwt".to_string()),
            ("HS256", {
                let mut header = Header::new(Algorithm::HS256);
                header.kid = Some(client_key().kid().into());
                let claims = json!({"iss": JWT_CLIENT, "sub": JWT_CLIENT, "aud": token_url,
                    "exp": now + 60, "jti": "j"});
                let key = EncodingKey::from_secret(b"client key as a secret")
                    .expect("any bytes are an HMAC key");
                jsonwebtoken::encode(&header, &claims, &key).expect("HMAC signs")
            }),
            ("unknown kid", {
                let mut header = Header::new(Algorithm::RS512);
                header.kid = Some("not-registered".into());
                let claims = json!({"iss": JWT_CLIENT, "sub": JWT_CLIENT, "aud": token_url,
                    "exp": now + 60, "jti": "j2"});
                jsonwebtoken::encode(&header, &claims, client_key().encoding_key())
                    .expect("test key signs")
            }),
            ("alg differs from the key's", {
                let mut header = Header::new(Algorithm::RS256);
                header.kid = Some(client_key().kid().into());
                let claims = json!({"iss": JWT_CLIENT, "sub": JWT_CLIENT, "aud": token_url,
                    "exp": now + 60, "jti": "j3"});
                jsonwebtoken::encode(&header, &claims, client_key().encoding_key())
                    .expect("test key signs")
            }),
        ];
        for (name, assertion) in cases {
            let pkce = pkce();
            let code = sign_in(&sim, &pkce, &[("client_id", JWT_CLIENT)]).await;
            let (status, body) =
                redeem_with_assertion(&sim, &code, &pkce.verifier, &assertion).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {body}");
            assert_eq!(body["error"], "invalid_client", "{name}: {body}");
        }

        // A good assertion works once; its jti cannot be replayed.
        let assertion = good(&sim);
        let pkce1 = pkce();
        let code = sign_in(&sim, &pkce1, &[("client_id", JWT_CLIENT)]).await;
        let (status, body) = redeem_with_assertion(&sim, &code, &pkce1.verifier, &assertion).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let id_token = body["id_token"].as_str().expect("an ID token");
        assert_eq!(part(id_token, 1)["aud"], JWT_CLIENT);
        let pkce2 = pkce();
        let code = sign_in(&sim, &pkce2, &[("client_id", JWT_CLIENT)]).await;
        let (status, body) = redeem_with_assertion(&sim, &code, &pkce2.verifier, &assertion).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "invalid_client");
        assert!(
            body["error_description"]
                .as_str()
                .is_some_and(|d| d.contains("jti"))
        );

        // client_id, when sent, must agree; a secret alongside is a second method.
        for extra in [("client_id", CLIENT), ("client_secret", SECRET)] {
            let pkce = pkce();
            let code = sign_in(&sim, &pkce, &[("client_id", JWT_CLIENT)]).await;
            let assertion = good(&sim);
            let (status, _) = post_token(
                &sim,
                &[
                    ("grant_type", "authorization_code"),
                    ("code", &code),
                    ("redirect_uri", REDIRECT),
                    ("code_verifier", &pkce.verifier),
                    ("client_assertion_type", JWT_BEARER),
                    ("client_assertion", &assertion),
                    extra,
                ],
            )
            .await;
            assert!(status.is_client_error(), "{extra:?}");
        }
    }

    #[tokio::test]
    async fn the_id_token_verifies_against_the_jwks_and_carries_cis2_claims() {
        let sim = start(options()).await;
        let before = now();
        let body = tokens(
            &sim,
            &[
                ("scope", "openid profile selectedrole"),
                ("acr_values", "AAL2_OR_AAL3_ANY"),
            ],
        )
        .await;
        let id_token = body["id_token"].as_str().expect("an ID token");
        let header = part(id_token, 0);
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], PROVIDER_KID);
        let claims = verify(&sim, id_token)
            .await
            .expect("the ID token verifies")
            .claims;
        assert_eq!(claims["iss"], sim.issuer());
        assert_eq!(claims["sub"], STEP_UP_USER);
        assert_eq!(claims["aud"], CLIENT);
        assert_eq!(claims["azp"], CLIENT);
        assert_eq!(claims["nonce"], NONCE);
        assert_eq!(claims["acr"], "AAL2_OR_AAL3_ANY");
        assert_eq!(claims["amr"], json!(["N3_SMARTCARD"]));
        assert_eq!(claims["authentication_assurance_level"], "3");
        assert_eq!(claims["id_assurance_level"], "3");
        assert_eq!(claims["selected_roleid"], "555021935107");
        let access_token = body["access_token"].as_str().expect("an access token");
        assert_eq!(claims["at_hash"], at_hash(access_token));
        assert!(claims["sid"].as_str().is_some_and(|s| s.len() >= 22));
        let iat = claims["iat"].as_i64().expect("iat is a number");
        let exp = claims["exp"].as_i64().expect("exp is a number");
        let auth_time = claims["auth_time"].as_i64().expect("auth_time is a number");
        assert!(iat >= before && exp == iat + 300);
        assert!(auth_time >= before && auth_time <= iat);

        // The same user with a passkey: AAL2, and a fresh sid.
        let body = tokens(&sim, &[("sim_authenticator", "PASSKEY")]).await;
        let id_token = body["id_token"].as_str().expect("an ID token");
        let again = verify(&sim, id_token)
            .await
            .expect("the ID token verifies")
            .claims;
        assert_eq!(again["amr"], json!(["PASSKEY"]));
        assert_eq!(again["authentication_assurance_level"], "2");
        assert_ne!(again["sid"], claims["sid"]);
        assert!(
            again.get("selected_roleid").is_none(),
            "no selectedrole scope"
        );
    }

    #[tokio::test]
    async fn selected_role_follows_sim_role_and_defaults_to_the_first() {
        let sim = start(options()).await;
        let scope = ("scope", "openid selectedrole");
        let body = tokens(
            &sim,
            &[
                scope,
                ("login_hint", SEVERAL_ROLES),
                ("sim_role", "555021935114"),
            ],
        )
        .await;
        let id_token = body["id_token"].as_str().expect("an ID token");
        assert_eq!(part(id_token, 1)["selected_roleid"], "555021935114");
        let body = tokens(&sim, &[scope, ("login_hint", SEVERAL_ROLES)]).await;
        let id_token = body["id_token"].as_str().expect("an ID token");
        assert_eq!(part(id_token, 1)["selected_roleid"], "555021935104");

        let pkce = pkce();
        let url = authorize_url(
            &sim,
            &pkce.challenge,
            &[
                scope,
                ("login_hint", SEVERAL_ROLES),
                ("sim_role", "555021935107"),
            ],
        );
        let query = authorize_redirect(&url).await;
        assert_eq!(
            query.get("error").map(String::as_str),
            Some("invalid_request")
        );
    }

    #[tokio::test]
    async fn users_without_an_allowed_authenticator_are_denied() {
        let sim = start(options()).await;
        let pkce = pkce();
        let cases = [
            (PASSKEY_ONLY, "AAL3_ANY", None),
            (PASSKEY_ONLY, "", None), // absent acr_values means AAL3_ANY
            (PASSKEY_ONLY, "AAL2_TOTP", None), // unknown means AAL3_ANY
            ("656005750110", "AAL2_OR_AAL3_ANY", None),
            (STEP_UP_USER, "AAL3_ANY", Some("PASSKEY")),
        ];
        for (uid, acr, authenticator) in cases {
            let mut changes = vec![("login_hint", uid), ("acr_values", acr)];
            if let Some(amr) = authenticator {
                changes.push(("sim_authenticator", amr));
            }
            let query = authorize_redirect(&authorize_url(&sim, &pkce.challenge, &changes)).await;
            assert_eq!(
                query.get("error").map(String::as_str),
                Some("access_denied"),
                "{uid} {acr}"
            );
            assert!(
                query
                    .get("error_description")
                    .is_some_and(|d| !d.is_empty())
            );
            assert_eq!(query.get("state").map(String::as_str), Some(STATE));
            assert!(!query.contains_key("code"));
        }
        // The same passkey user is fine when AAL2 is acceptable.
        let query = authorize_redirect(&authorize_url(
            &sim,
            &pkce.challenge,
            &[
                ("login_hint", PASSKEY_ONLY),
                ("acr_values", "AAL2_OR_AAL3_ANY"),
            ],
        ))
        .await;
        assert!(query.contains_key("code"));
    }

    #[tokio::test]
    async fn a_bad_client_or_redirect_uri_gets_a_page_never_a_redirect() {
        let sim = start(options()).await;
        let pkce = pkce();
        let cases: &[&[(&str, &str)]] = &[
            &[("redirect_uri", "https://evil.test/callback")],
            &[("redirect_uri", "https://broker.test/callback/")],
            &[("redirect_uri", "")],
            &[("client_id", "unknown-client")],
            &[("client_id", "")],
        ];
        for changes in cases {
            let url = authorize_url(&sim, &pkce.challenge, changes);
            let response = http()
                .get(&url)
                .send()
                .await
                .expect("the simulator answers");
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{changes:?}");
            assert!(response.headers().get(header::LOCATION).is_none());
            let html = response.text().await.expect("a page");
            assert!(html.contains("id=\"error-message\""));
        }
        // A repeated redirect_uri cannot be trusted either.
        let url = format!(
            "{}&redirect_uri={}",
            authorize_url(&sim, &pkce.challenge, &[]),
            "https%3A%2F%2Fevil.test%2F"
        );
        let response = http()
            .get(&url)
            .send()
            .await
            .expect("the simulator answers");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert!(response.headers().get(header::LOCATION).is_none());
    }

    #[tokio::test]
    async fn other_bad_requests_go_back_with_an_error_and_the_state() {
        let sim = start(options()).await;
        let pkce = pkce();
        let challenge = pkce.challenge.as_str();
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("response_type", "token")], "unsupported_response_type"),
            (&[("response_type", "")], "invalid_request"),
            (&[("scope", "profile")], "invalid_scope"),
            (&[("nonce", "")], "invalid_request"),
            (&[("code_challenge", "")], "invalid_request"),
            (&[("code_challenge_method", "plain")], "invalid_request"),
            (&[("code_challenge_method", "")], "invalid_request"),
            (&[("code_challenge", "too-short")], "invalid_request"),
            (&[("max_age", "soon")], "invalid_request"),
            (&[("prompt", "none login")], "invalid_request"),
            (&[("prompt", "none")], "login_required"),
            (&[("response_mode", "fragment")], "invalid_request"),
            (&[("request", "eyJ.x.y")], "request_not_supported"),
            (&[("login_hint", "000000000000")], "invalid_request"),
            (
                &[("login_hint", STEP_UP_USER), ("sim_authenticator", "PWD")],
                "invalid_request",
            ),
        ];
        for (changes, error) in cases {
            let query = authorize_redirect(&authorize_url(&sim, challenge, changes)).await;
            assert_eq!(
                query.get("error").map(String::as_str),
                Some(*error),
                "{changes:?}"
            );
            assert_eq!(
                query.get("state").map(String::as_str),
                Some(STATE),
                "{changes:?}"
            );
            assert_eq!(query.get("iss").map(String::as_str), Some(sim.issuer()));
            assert!(
                query
                    .get("error_description")
                    .is_some_and(|d| !d.is_empty())
            );
            assert!(!query.contains_key("code"));
        }
        // Without a state there is none to send back.
        let query = authorize_redirect(&authorize_url(&sim, challenge, &[("state", "")])).await;
        assert_eq!(
            query.get("error").map(String::as_str),
            Some("invalid_request")
        );
        assert!(!query.contains_key("state"));
        // A repeated parameter.
        let url = format!("{}&nonce=again", authorize_url(&sim, challenge, &[]));
        let query = authorize_redirect(&url).await;
        assert_eq!(
            query.get("error").map(String::as_str),
            Some("invalid_request")
        );
    }

    #[tokio::test]
    async fn userinfo_claims_follow_the_scope() {
        let sim = start(options()).await;
        let userinfo = |token: String| {
            let url = format!("{}{REALM}/userinfo", sim.base_url());
            async move {
                let response = http()
                    .get(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("the simulator answers");
                assert_eq!(response.status(), StatusCode::OK);
                response.json::<Value>().await.expect("userinfo is JSON")
            }
        };
        let body = tokens(&sim, &[("scope", "openid")]).await;
        let claims = userinfo(body["access_token"].as_str().unwrap_or_default().into()).await;
        assert_eq!(claims, json!({"sub": STEP_UP_USER}));

        let scope = "openid profile nhsperson nationalrbacaccess associatedorgs";
        let body = tokens(&sim, &[("scope", scope), ("login_hint", SEVERAL_ROLES)]).await;
        let claims = userinfo(body["access_token"].as_str().unwrap_or_default().into()).await;
        assert_eq!(claims["sub"], SEVERAL_ROLES);
        assert_eq!(claims["uid"], SEVERAL_ROLES);
        assert_eq!(claims["name"], "Liam O'Neill");
        assert_eq!(claims["given_name"], "Liam");
        assert_eq!(claims["family_name"], "O'Neill");
        assert_eq!(claims["nhsid_useruid"], SEVERAL_ROLES);
        assert_eq!(claims["title"], "Mr");
        assert_eq!(claims["initials"], "LO");
        assert_eq!(claims["display_name"], "Mr Liam O'Neill");
        let roles = claims["nhsid_nrbac_roles"].as_array().expect("roles");
        assert_eq!(roles.len(), 3);
        assert_eq!(
            roles[0],
            json!({"person_roleid": "555021935104", "org_code": "RR8",
                   "role_code": "S8000:G8001:R8008",
                   "role_name": "Admin/Clinical Support Access Role",
                   "person_orgid": "555021930104"})
        );
        let orgs = claims["nhsid_user_orgs"].as_array().expect("orgs");
        assert_eq!(
            orgs[0],
            json!({"org_code": "RR8", "org_name": "Leeds Teaching Hospitals NHS Trust"})
        );
        assert_eq!(orgs.len(), 3);
        assert_eq!(sim.userinfo_calls(), 2);

        // Missing, malformed and unknown tokens.
        let url = format!("{}{REALM}/userinfo", sim.base_url());
        let response = http()
            .get(&url)
            .send()
            .await
            .expect("the simulator answers");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let challenge = response.headers().get(header::WWW_AUTHENTICATE).cloned();
        assert!(challenge.is_some_and(|c| c.to_str().is_ok_and(|c| c.starts_with("Bearer"))));
        for auth in ["Bearer not-a-token", "Basic abc", "Bearer "] {
            let response = http()
                .get(&url)
                .header(header::AUTHORIZATION, auth)
                .send()
                .await
                .expect("the simulator answers");
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{auth}");
            assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
        }
    }

    #[tokio::test]
    async fn the_sign_in_page_lists_users_escapes_the_request_and_posts_back() {
        let sim = start(options()).await;
        let pkce = pkce();
        let evil = "\"><script>alert(1)</script>";
        let url = authorize_url(
            &sim,
            &pkce.challenge,
            &[
                ("state", evil),
                ("scope", "openid selectedrole"),
                ("acr_values", "AAL3_ANY"),
            ],
        );
        let response = http()
            .get(&url)
            .send()
            .await
            .expect("the simulator answers");
        assert_eq!(response.status(), StatusCode::OK);
        let csp = response
            .headers()
            .get(header::CONTENT_SECURITY_POLICY)
            .cloned();
        assert!(csp.is_some_and(|c| c.to_str().is_ok_and(|c| c.contains("default-src 'none'"))));
        let html = response.text().await.expect("a page");
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        for user in sim.users() {
            assert!(html.contains(&format!("data-uid=\"{}\"", user.uid)));
            assert!(html.contains(&page::escape(&user.display_name())));
            for role in user.roles {
                assert!(html.contains(&page::escape(role.role_name)));
            }
            for a in user.authenticators {
                assert!(html.contains(&format!("id=\"signin-{}-{}\"", user.uid, a.amr)));
            }
        }
        assert!(html.contains("disabled id=\"signin-656005750111-PASSKEY\""));
        assert!(html.contains("id=\"role-656005750104\""));
        assert!(html.contains(&format!("action=\"{REALM}/authorize/select\"")));

        // What the browser posts when the several-roles user's security key button is clicked.
        let mut form: Vec<(String, String)> = url::Url::parse(&url)
            .expect("the URL parses")
            .query_pairs()
            .into_owned()
            .collect();
        form.push(("login_hint".into(), SEVERAL_ROLES.into()));
        form.push(("sim_role".into(), "555021935124".into()));
        form.push(("sim_authenticator".into(), "FIDO2".into()));
        let response = http()
            .post(format!("{}{REALM}/authorize/select", sim.base_url()))
            .form(&form)
            .send()
            .await
            .expect("the simulator answers");
        assert_eq!(response.status(), StatusCode::FOUND);
        let query = query_of(&location(&response).expect("a redirect"));
        assert_eq!(query.get("state").map(String::as_str), Some(evil));
        let code = query.get("code").expect("a code");
        let (status, body) = redeem(&sim, code, &pkce.verifier).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let claims = part(body["id_token"].as_str().expect("an ID token"), 1);
        assert_eq!(claims["sub"], SEVERAL_ROLES);
        assert_eq!(claims["amr"], json!(["FIDO2"]));
        assert_eq!(claims["selected_roleid"], "555021935124");

        // A crafted post for a disallowed authenticator is still refused.
        form.retain(|(n, _)| n != "sim_authenticator" && n != "login_hint" && n != "sim_role");
        form.push(("login_hint".into(), PASSKEY_ONLY.into()));
        let response = http()
            .post(format!("{}{REALM}/authorize/select", sim.base_url()))
            .form(&form)
            .send()
            .await
            .expect("the simulator answers");
        let query = query_of(&location(&response).expect("a redirect"));
        assert_eq!(
            query.get("error").map(String::as_str),
            Some("access_denied")
        );
    }

    #[tokio::test]
    async fn id_token_faults_change_the_token() {
        let sim = start(options()).await;
        type Expect = fn(&Value, &Value, &str);
        let check: Vec<(Fault, Expect)> = vec![
            (Fault::BadSignature, |h, _, _| {
                assert_eq!(h["kid"], PROVIDER_KID)
            }),
            (Fault::UnknownKid, |h, _, _| {
                assert_eq!(h["kid"], UNKNOWN_KID)
            }),
            (Fault::AlgNone, |h, _, token| {
                assert_eq!(h["alg"], "none");
                assert!(token.ends_with('.'));
            }),
            (Fault::WrongIssuer, |_, c, _| {
                assert!(
                    c["iss"]
                        .as_str()
                        .is_some_and(|i| i.contains("not-this-issuer"))
                )
            }),
            (Fault::WrongAudience, |_, c, _| {
                assert_eq!(c["aud"], "another-client")
            }),
            (Fault::WrongNonce, |_, c, _| {
                assert!(c["nonce"] != NONCE && c["nonce"].is_string())
            }),
            (Fault::Expired, |_, c, _| {
                assert!(c["exp"].as_i64().is_some_and(|e| e < now() - 300))
            }),
            (Fault::AalMissing, |_, c, _| {
                assert!(c.get("authentication_assurance_level").is_none())
            }),
            (Fault::AalTooLow, |_, c, _| {
                assert_eq!(c["authentication_assurance_level"], "1")
            }),
            (Fault::StaleAuthTime, |_, c, _| {
                assert!(c["auth_time"].as_i64().is_some_and(|t| t <= now() - 3600))
            }),
        ];
        for (fault, expect) in check {
            sim.clear_faults();
            sim.set_fault(fault);
            let body = tokens(&sim, &[]).await;
            let token = body["id_token"].as_str().expect("an ID token");
            expect(&part(token, 0), &part(token, 1), token);
            // Signature, iss, aud and exp faults fail standard JWT checks; the rest are well
            // signed and only a CIS2-aware client (nonce, AAL, auth_time) refuses them.
            let jwt_fault = matches!(
                fault,
                Fault::BadSignature
                    | Fault::UnknownKid
                    | Fault::AlgNone
                    | Fault::WrongIssuer
                    | Fault::WrongAudience
                    | Fault::Expired
            );
            assert_eq!(verify(&sim, token).await.is_err(), jwt_fault, "{fault:?}");
        }

        // Not a fault: the integer form verifies and reads as the same level.
        sim.clear_faults();
        sim.set_fault(Fault::AalAsInteger);
        let body = tokens(&sim, &[]).await;
        let token = body["id_token"].as_str().expect("an ID token");
        let claims = verify(&sim, token)
            .await
            .expect("the integer form verifies")
            .claims;
        assert_eq!(claims["authentication_assurance_level"], 3);
        assert_eq!(
            Aal::from_claim(&claims["authentication_assurance_level"]),
            Some(Aal::Aal3)
        );

        // Faults combine, and clearing them restores good tokens.
        sim.set_fault(Fault::WrongNonce);
        sim.set_fault(Fault::AalTooLow);
        let body = tokens(&sim, &[]).await;
        let claims = part(body["id_token"].as_str().expect("an ID token"), 1);
        assert_eq!(claims["authentication_assurance_level"], "1");
        assert_ne!(claims["nonce"], NONCE);
        sim.clear_faults();
        let body = tokens(&sim, &[]).await;
        assert!(
            verify(&sim, body["id_token"].as_str().expect("an ID token"))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn endpoint_faults_break_the_endpoints() {
        let sim = start(options()).await;
        let base = format!("{}{REALM}", sim.base_url());

        sim.set_fault(Fault::DiscoveryDown);
        sim.set_fault(Fault::JwksDown);
        for path in ["/.well-known/openid-configuration", "/connect/jwk_uri"] {
            let response = http()
                .get(format!("{base}{path}"))
                .send()
                .await
                .expect("answers");
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        }
        assert_eq!((sim.discovery_calls(), sim.jwks_calls()), (1, 1));
        sim.clear_faults();
        assert_eq!(fetch_jwks(&sim).await.keys.len(), 1);
        assert_eq!(sim.jwks_calls(), 2);

        let pkce = pkce();
        let code = sign_in(&sim, &pkce, &[]).await;
        sim.set_fault(Fault::TokenServerError);
        let (status, body) = redeem(&sim, &code, &pkce.verifier).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"], "server_error");
        sim.clear_faults();

        sim.set_fault(Fault::UserinfoWrongSub);
        let body = tokens(&sim, &[]).await;
        let claims: Value = http()
            .get(format!("{base}/userinfo"))
            .bearer_auth(body["access_token"].as_str().unwrap_or_default())
            .send()
            .await
            .expect("answers")
            .json()
            .await
            .expect("userinfo is JSON");
        assert!(claims["sub"].is_string());
        assert_ne!(claims["sub"], STEP_UP_USER);
        sim.clear_faults();

        // Slow: a client with a short timeout gives up; without the fault it does not.
        sim.set_fault(Fault::Slow(Duration::from_secs(60)));
        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .expect("a client builds");
        let error = impatient
            .get(sim.discovery_url())
            .send()
            .await
            .expect_err("the response is held back past the timeout");
        assert!(error.is_timeout());
        sim.clear_faults();
        let response = http()
            .get(sim.discovery_url())
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn codes_access_tokens_and_assertions_expire_on_the_providers_clock() {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let sim = start_manual(clock.clone()).await;

        let pkce1 = pkce();
        let code = sign_in(&sim, &pkce1, &[]).await;
        clock.advance(Duration::from_secs(61));
        let (status, body) = redeem(&sim, &code, &pkce1.verifier).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_grant"))
        );

        let body = tokens(&sim, &[]).await;
        let access_token = body["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let userinfo = |token: String| {
            let url = format!("{}{REALM}/userinfo", sim.base_url());
            async move {
                http()
                    .get(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .expect("answers")
                    .status()
            }
        };
        assert_eq!(userinfo(access_token.clone()).await, StatusCode::OK);
        clock.advance(Duration::from_secs(3601));
        assert_eq!(userinfo(access_token).await, StatusCode::UNAUTHORIZED);

        let pkce2 = pkce();
        let assertion = assertion(
            &sim,
            client_key(),
            &[("exp", json!(unix_seconds(clock.now()) + 30))],
        );
        let code = sign_in(&sim, &pkce2, &[("client_id", JWT_CLIENT)]).await;
        clock.advance(Duration::from_secs(31));
        let (status, body) = redeem_with_assertion(&sim, &code, &pkce2.verifier, &assertion).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }

    #[tokio::test]
    async fn end_session_redirects_only_to_registered_uris() {
        let sim = start(options()).await;
        let body = tokens(&sim, &[]).await;
        let id_token = body["id_token"].as_str().expect("an ID token").to_string();
        let end = |params: Vec<(&'static str, String)>| {
            let mut url = url::Url::parse(&format!("{}{REALM}/connect/endSession", sim.base_url()))
                .expect("a URL");
            url.query_pairs_mut().extend_pairs(params);
            async move { http().get(url).send().await.expect("answers") }
        };

        let response = end(vec![
            ("id_token_hint", id_token.clone()),
            ("post_logout_redirect_uri", LOGOUT_REDIRECT.into()),
            ("state", "bye".into()),
        ])
        .await;
        assert_eq!(response.status(), StatusCode::FOUND);
        let location = location(&response).expect("a redirect");
        assert!(location.as_str().starts_with(LOGOUT_REDIRECT));
        assert_eq!(
            query_of(&location).get("state").map(String::as_str),
            Some("bye")
        );

        let refused = [
            vec![
                ("id_token_hint", id_token.clone()),
                ("post_logout_redirect_uri", "https://evil.test/".into()),
            ],
            vec![
                ("id_token_hint", id_token.clone()),
                ("post_logout_redirect_uri", REDIRECT.into()),
            ],
            vec![("post_logout_redirect_uri", LOGOUT_REDIRECT.into())],
            vec![("id_token_hint", "not-a-token".into())],
            vec![
                ("id_token_hint", id_token.clone()),
                ("client_id", JWT_CLIENT.into()),
            ],
        ];
        for params in refused {
            let response = end(params.clone()).await;
            assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{params:?}");
            assert!(response.headers().get(header::LOCATION).is_none());
        }
        // With client_id instead of a hint, a registered URI is fine.
        let response = end(vec![
            ("client_id", CLIENT.into()),
            ("post_logout_redirect_uri", LOGOUT_REDIRECT.into()),
        ])
        .await;
        assert_eq!(response.status(), StatusCode::FOUND);

        let response = end(vec![("id_token_hint", id_token)]).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(
            response
                .text()
                .await
                .expect("a page")
                .contains("id=\"signed-out\"")
        );
    }

    #[tokio::test]
    async fn shutdown_stops_the_server() {
        let sim = start(options()).await;
        let url = sim.discovery_url();
        assert!(reqwest::get(&url).await.is_ok());
        sim.shutdown();
        let mut stopped = false;
        for _ in 0..500 {
            // A fresh client each time, so no pooled connection hides the closed listener.
            if reqwest::Client::new().get(&url).send().await.is_err() {
                stopped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(stopped);
    }

    #[test]
    fn pkce_verifiers_must_match_the_s256_challenge() {
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        // RFC 7636 Appendix B.
        let challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";
        assert!(is_s256_challenge(challenge));
        assert!(pkce_matches(verifier, challenge));
        let cases = [
            ("", challenge),
            ("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXK", challenge),
            (challenge, challenge),
            (verifier, verifier),
            ("short", challenge),
            ("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk!", challenge),
        ];
        for (verifier, challenge) in cases {
            assert!(!pkce_matches(verifier, challenge), "{verifier}");
        }
        for bad in [
            "",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-c",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-c=",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw+cM",
        ] {
            assert!(!is_s256_challenge(bad), "{bad}");
        }
        assert!(is_code_verifier(&"a~.-_".repeat(26)[..128]));
        assert!(!is_code_verifier(&"a".repeat(129)));
    }

    #[test]
    fn secrets_compare_exactly() {
        assert!(secrets_match("s3cret", "s3cret"));
        for given in ["", "s3cre", "s3cret ", "S3cret", "s3cret\0"] {
            assert!(!secrets_match(given, "s3cret"), "{given:?}");
        }
    }

    #[test]
    fn base_urls_name_a_reachable_address() {
        let cases = [
            ("127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("0.0.0.0:9", "http://127.0.0.1:9"),
            ("[::]:9", "http://[::1]:9"),
            ("[::1]:9", "http://[::1]:9"),
        ];
        for (addr, want) in cases {
            let addr: SocketAddr = addr.parse().expect("test addresses parse");
            assert_eq!(base_url_of(addr), want);
        }
    }

    #[test]
    fn parameters_treat_empty_as_absent_and_spot_repeats() {
        let params = Params::parse(b"a=1&b=&c=3&a=2&d=%20x");
        assert_eq!(params.get("a"), Some("1"));
        assert_eq!(params.get("b"), None);
        assert_eq!(params.get("d"), Some(" x"));
        assert_eq!(params.first_repeated(), Some("a"));
        assert!(Params::parse(b"a=1&b=2").first_repeated().is_none());
        assert!(has_scope("openid  profile", "profile"));
        assert!(!has_scope("openidprofile", "openid"));
    }

    #[test]
    fn the_client_debug_hides_the_secret() {
        let debug = format!("{:?}", options().clients);
        assert!(!debug.contains(SECRET));
        assert!(debug.contains("[redacted]"));
    }
}
