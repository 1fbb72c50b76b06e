//! An in-process NHS API Management (APIM) authorisation server simulator, for dev mode and
//! end-to-end tests. Never started in production.
//!
//! It answers at `/oauth2/authorize`, `/oauth2/callback` and `/oauth2/token` the way APIM does
//! for CIS2 users (NHS-CIS2-REFERENCE.md §2, checked against APIM's own proxy and tests in
//! `NHSDigital/identity-service-api`):
//!
//! - the separate pattern: RFC 8693 token exchange of a CIS2 ID token, the client authenticated
//!   by an RFC 7523 RS512 client assertion (`iss = sub = API key`, `aud` the exact token URL,
//!   a never-seen `jti`, `exp` at most 5 minutes ahead);
//! - the combined pattern: `/oauth2/authorize` signs the user in at the CIS2 simulator as
//!   APIM's own CIS2 client, and the app redeems APIM's code with its API key and secret;
//! - refresh with the API key and secret (APIM asks for them whichever pattern issued the
//!   token), single-use refresh tokens, and a reused one revoking its whole token family.
//!
//! Scopes follow the achieved AAL: each API an app lists grants
//! `urn:nhsd:apim:user-nhs-cis2:aal{2|3}:{api}` (`"name@aal3"`: the AAL3 scope only), and a token
//! carries only the scopes of the level in the ID token's `authentication_assurance_level`.
//! Every success value is a JSON string, every refusal is `{error, error_description,
//! message_id}` with APIM's status and words.

use super::cis2::{
    ASSERTION_MAX_AHEAD_SECS, CODE_TTL_SECS, Cis2Simulator, JWT_BEARER, Params, REALM, SimClient,
    base_url_of, is_form, no_store, page_response, redirect_to, secrets_match,
};
use super::keys;
use super::page;
use super::users::AcrClass;
use crate::aal::Aal;
use crate::clock::{Clock, SystemClock, from_unix_seconds, unix_seconds};
use crate::secret::Secret;
use crate::session::token::random_urlsafe;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tracing::debug;

/// RFC 8693 §2.1 grant type.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// The only `subject_token_type` APIM exchanges.
pub const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";
/// RFC 8693 `issued_token_type` of every exchange.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Every user-restricted CIS2 scope starts so; the level and the API name follow.
pub const SCOPE_PREFIX: &str = "urn:nhsd:apim:user-nhs-cis2:";
/// An API listed as `"name@aal3"` grants only its AAL3 scope (EPS, the prescription tracker).
pub const AAL3_ONLY_SUFFIX: &str = "@aal3";

const AAL_CLAIM: &str = "authentication_assurance_level";
/// How long APIM waits for a user to come back from CIS2.
const LOGIN_TTL_SECS: i64 = 600;
/// What APIM asks CIS2 for in the combined pattern: the role comes along for the API proxies.
const CIS2_SCOPE: &str = "openid profile nationalrbacaccess selectedrole";
const CIS2_TIMEOUT: Duration = Duration::from_secs(10);

/// How to run an APIM simulator.
#[derive(Debug, Clone)]
pub struct ApimOptions {
    /// Subject tokens must carry exactly this `iss`. Empty: every subject token is refused.
    pub cis2_issuer: String,
    /// The keys that sign CIS2 ID tokens (the CIS2 simulator's: `keys::provider_key().jwks()`).
    pub cis2_jwks: JwkSet,
    /// The combined pattern signs users in through this simulator; None switches it off.
    pub cis2: Option<Cis2Simulator>,
    pub apps: Vec<ApimApp>,
    pub access_token_ttl: Duration,
    /// How long a token family may be refreshed, counted from the sign-in (refreshes do not
    /// extend it).
    pub refresh_token_ttl: Duration,
}

impl Default for ApimOptions {
    fn default() -> Self {
        ApimOptions {
            cis2_issuer: String::new(),
            cis2_jwks: JwkSet { keys: Vec::new() },
            cis2: None,
            apps: Vec::new(),
            access_token_ttl: Duration::from_secs(599),
            refresh_token_ttl: Duration::from_secs(12 * 60 * 60),
        }
    }
}

impl ApimOptions {
    /// Trusts `cis2`'s issuer and signing key, and runs the combined pattern through it.
    pub fn for_cis2(cis2: &Cis2Simulator) -> Self {
        ApimOptions {
            cis2_issuer: cis2.issuer().to_string(),
            cis2_jwks: keys::provider_key().jwks(),
            cis2: Some(cis2.clone()),
            ..ApimOptions::default()
        }
    }
}

/// A registered application.
#[derive(Clone, Default)]
pub struct ApimApp {
    /// The API key: `client_id`, and `iss`/`sub` of its client assertions.
    pub api_key: String,
    /// Authenticates the combined pattern's code redemption and every refresh.
    pub client_secret: Option<String>,
    /// The public keys of its client assertions (APIM fetches them from the app's JWKS URL).
    pub jwks: Option<JwkSet>,
    /// Combined pattern; compared as exact strings.
    pub redirect_uris: Vec<String>,
    /// The APIs it is subscribed to: `"name"` grants the AAL2 and AAL3 scopes, `"name@aal3"`
    /// the AAL3 scope only.
    pub apis: Vec<String>,
}

impl std::fmt::Debug for ApimApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApimApp")
            .field("api_key", &self.api_key)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("jwks", &self.jwks.as_ref().map(|j| j.keys.len()))
            .field("redirect_uris", &self.redirect_uris)
            .field("apis", &self.apis)
            .finish()
    }
}

/// Ways to make the token endpoint misbehave. Sticky until cleared; they combine, and setting
/// `Slow` replaces an earlier `Slow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApimFault {
    /// `/oauth2/token` answers 500 `server_error`.
    ServerError,
    /// Every response is delayed by this long.
    Slow(Duration),
    /// `/oauth2/token` answers 401 `unauthorized_client`, whatever it was sent.
    UnauthorizedClient,
}

/// What an access token stands for, for tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub scopes: Vec<String>,
    pub aal: u8,
    pub uid: String,
    pub api_key: String,
    pub expires_at: SystemTime,
}

/// A running APIM simulator. Cheap to clone: clones share one server.
#[derive(Clone)]
pub struct ApimSimulator {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ApimSimulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApimSimulator")
            .field("base_url", &self.inner.base_url)
            .finish_non_exhaustive()
    }
}

impl ApimSimulator {
    /// Serves on `listener` from a spawned task until [`ApimSimulator::shutdown`]. Refuses
    /// options whose API lists it cannot turn into scopes.
    pub async fn start(
        listener: tokio::net::TcpListener,
        options: ApimOptions,
    ) -> std::io::Result<Self> {
        Self::start_with_clock(listener, options, Arc::new(SystemClock)).await
    }

    /// [`ApimSimulator::start`] with the caller's clock, so a test can expire tokens.
    pub async fn start_with_clock(
        listener: tokio::net::TcpListener,
        options: ApimOptions,
        clock: Arc<dyn Clock>,
    ) -> std::io::Result<Self> {
        let apps = register_apps(&options.apps)
            .map_err(|m| std::io::Error::new(std::io::ErrorKind::InvalidInput, m))?;
        let base_url = base_url_of(listener.local_addr()?);
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(CIS2_TIMEOUT)
            .build()
            .map_err(std::io::Error::other)?;
        let (shutdown, mut stop) = watch::channel(false);
        let inner = Arc::new(Inner {
            cis2: options.cis2.map(|sim| Cis2Link::register(sim, &base_url)),
            cis2_issuer: options.cis2_issuer,
            cis2_jwks: options.cis2_jwks,
            apps,
            access_ttl: secs(options.access_token_ttl),
            refresh_ttl: secs(options.refresh_token_ttl),
            clock,
            faults: FaultSet::default(),
            calls: Calls::default(),
            grants: Mutex::new(Grants::default()),
            http,
            shutdown,
            base_url,
        });
        let app = router(inner.clone());
        tokio::spawn(async move {
            let stopped = async move {
                // An Err means every sender is gone: nobody can ask any more, so stop as well.
                let _ = stop.wait_for(|stop| *stop).await;
            };
            if let Err(error) = axum::serve(listener, app)
                .with_graceful_shutdown(stopped)
                .await
            {
                tracing::warn!(%error, "apim simulator server stopped");
            }
        });
        debug!(base_url = %inner.base_url, "apim simulator started");
        Ok(ApimSimulator { inner })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// The exact string client assertions must carry as `aud`.
    pub fn token_url(&self) -> String {
        self.inner.token_url()
    }

    pub fn authorize_url(&self) -> String {
        format!("{}/oauth2/authorize", self.inner.base_url)
    }

    pub fn set_fault(&self, fault: ApimFault) {
        debug!(?fault, "apim simulator fault set");
        self.inner.faults.set(fault);
    }

    pub fn clear_faults(&self) {
        self.inner.faults.clear();
    }

    /// Every POST to `/oauth2/token`, refused or not.
    pub fn token_calls(&self) -> u64 {
        self.inner.calls.token.load(Ordering::Relaxed)
    }

    /// Token requests with the token-exchange grant type, refused or not.
    pub fn exchange_calls(&self) -> u64 {
        self.inner.calls.exchange.load(Ordering::Relaxed)
    }

    /// Token requests with the refresh grant type, refused or not.
    pub fn refresh_calls(&self) -> u64 {
        self.inner.calls.refresh.load(Ordering::Relaxed)
    }

    /// Client assertion `jti`s remembered (until their `exp`, after which they cannot be
    /// replayed anyway).
    pub fn seen_jtis(&self) -> usize {
        let now = self.inner.now();
        let mut grants = self.inner.grants();
        grants.prune(now);
        grants.jtis.len()
    }

    /// What an unexpired, unrevoked access token stands for.
    pub fn introspect(&self, access_token: &str) -> Option<TokenInfo> {
        let now = self.inner.now();
        let grants = self.inner.grants();
        let access = grants
            .access
            .get(access_token)
            .filter(|a| a.expires_at > now)?;
        Some(TokenInfo {
            scopes: access.grant.scopes.clone(),
            aal: access.grant.aal.level(),
            uid: access.grant.uid.clone(),
            api_key: access.grant.api_key.clone(),
            expires_at: from_unix_seconds(access.expires_at),
        })
    }

    /// Drops every refresh token issued for the user.
    pub fn revoke_for_uid(&self, uid: &str) {
        self.inner
            .grants()
            .refresh
            .retain(|_, r| r.grant.uid != uid);
        debug!(uid, "apim simulator revoked a user's refresh tokens");
    }

    /// Stops accepting connections; requests in flight finish.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }
}

fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/oauth2/authorize", get(authorize))
        .route("/oauth2/callback", get(callback))
        .route("/oauth2/token", post(token))
        .layer(middleware::from_fn_with_state(inner.clone(), slow))
        .with_state(inner)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

// ---------------------------------------------------------------------------------------------
// State

struct Inner {
    base_url: String,
    cis2_issuer: String,
    cis2_jwks: JwkSet,
    cis2: Option<Cis2Link>,
    apps: Vec<App>,
    access_ttl: i64,
    refresh_ttl: i64,
    clock: Arc<dyn Clock>,
    faults: FaultSet,
    calls: Calls,
    grants: Mutex<Grants>,
    http: reqwest::Client,
    shutdown: watch::Sender<bool>,
}

impl Inner {
    fn now(&self) -> i64 {
        unix_seconds(self.clock.now())
    }

    fn token_url(&self) -> String {
        format!("{}/oauth2/token", self.base_url)
    }

    fn app(&self, api_key: &str) -> Option<&App> {
        find_app(&self.apps, api_key)
    }

    fn grants(&self) -> MutexGuard<'_, Grants> {
        // Poisoning means a panic mid-update elsewhere; the maps are still coherent enough
        // for a simulator, and refusing every later request would hide the first failure.
        self.grants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new access token and refresh token for `grant`, remembered.
    fn issue(
        &self,
        grants: &mut Grants,
        grant: Grant,
        refresh_count: u32,
        refresh_expires_at: i64,
        now: i64,
    ) -> Issued {
        let access_token = random_urlsafe(32);
        let refresh_token = random_urlsafe(32);
        grants.access.insert(
            access_token.clone(),
            AccessGrant {
                grant: grant.clone(),
                expires_at: now + self.access_ttl,
            },
        );
        grants.refresh.insert(
            refresh_token.clone(),
            RefreshGrant {
                grant,
                count: refresh_count,
                expires_at: refresh_expires_at,
                used: false,
            },
        );
        Issued {
            access_token,
            refresh_token,
            expires_in: self.access_ttl,
            refresh_expires_in: refresh_expires_at - now,
            refresh_count,
        }
    }
}

/// An app with the scopes its API list grants, worked out once at start.
struct App {
    app: ApimApp,
    scopes: Vec<String>,
}

fn find_app<'a>(apps: &'a [App], api_key: &str) -> Option<&'a App> {
    apps.iter().find(|a| a.app.api_key == api_key)
}

fn register_apps(apps: &[ApimApp]) -> Result<Vec<App>, String> {
    apps.iter()
        .map(|app| {
            Ok(App {
                scopes: app_scopes(&app.apis)?,
                app: app.clone(),
            })
        })
        .collect()
}

/// Every scope an app's API list grants, at both levels. Pure.
fn app_scopes(apis: &[String]) -> Result<Vec<String>, String> {
    let mut scopes = Vec::new();
    for api in apis {
        let (name, levels): (&str, &[u8]) = match api.strip_suffix(AAL3_ONLY_SUFFIX) {
            Some(name) => (name, &[3]),
            None => (api, &[2, 3]),
        };
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(format!(
                "APIM app API {api:?}: expected a name, optionally ending {AAL3_ONLY_SUFFIX}"
            ));
        }
        scopes.extend(
            levels
                .iter()
                .map(|level| format!("{SCOPE_PREFIX}aal{level}:{name}")),
        );
    }
    Ok(scopes)
}

/// The scopes a sign-in at `aal` gets: APIM keeps those naming exactly that level, so an AAL3
/// sign-in has no AAL2 scope and the other way round. No level, no scope. Pure.
fn scopes_at(all: &[String], aal: Option<Aal>) -> Vec<String> {
    let Some(aal) = aal else {
        return Vec::new();
    };
    let marker = format!(":aal{}:", aal.level());
    all.iter()
        .filter(|s| s.contains(&marker))
        .cloned()
        .collect()
}

/// APIM as a client of the CIS2 simulator, for the combined pattern.
struct Cis2Link {
    sim: Cis2Simulator,
    client_id: String,
    client_secret: Secret<String>,
    callback: String,
}

impl Cis2Link {
    fn register(sim: Cis2Simulator, base_url: &str) -> Self {
        // Unique per APIM simulator: several may share one CIS2 simulator.
        let client_id = format!("apim-simulator-{}", random_urlsafe(9));
        let client_secret = random_urlsafe(32);
        let callback = format!("{base_url}/oauth2/callback");
        sim.register_client(SimClient {
            client_id: client_id.clone(),
            client_secret: Some(client_secret.clone()),
            jwks: None,
            redirect_uris: vec![callback.clone()],
            post_logout_redirect_uris: Vec::new(),
        });
        Cis2Link {
            sim,
            client_id,
            client_secret: Secret::new(client_secret),
            callback,
        }
    }

    fn endpoint(&self, path: &str) -> String {
        format!("{}{REALM}{path}", self.sim.base_url())
    }
}

#[derive(Default)]
struct Calls {
    token: AtomicU64,
    exchange: AtomicU64,
    refresh: AtomicU64,
}

impl Calls {
    fn count_grant(&self, grant_type: Option<&str>) {
        match grant_type {
            Some(TOKEN_EXCHANGE_GRANT) => self.exchange.fetch_add(1, Ordering::Relaxed),
            Some("refresh_token") => self.refresh.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }
}

#[derive(Debug, Default)]
struct FaultSet(Mutex<Vec<ApimFault>>);

impl FaultSet {
    fn set(&self, fault: ApimFault) {
        let mut faults = self.lock();
        faults.retain(|f| std::mem::discriminant(f) != std::mem::discriminant(&fault));
        faults.push(fault);
    }

    fn clear(&self) {
        self.lock().clear();
    }

    fn has(&self, fault: ApimFault) -> bool {
        self.lock().contains(&fault)
    }

    fn delay(&self) -> Option<Duration> {
        self.lock().iter().find_map(|f| match f {
            ApimFault::Slow(d) => Some(*d),
            _ => None,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Vec<ApimFault>> {
        // A poisoned lock only means a panic elsewhere mid-update of a plain Vec: still usable.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Everything APIM remembers. Tokens and codes are map keys here and nowhere else.
#[derive(Default)]
struct Grants {
    /// `(api_key, jti)` of accepted client assertions, until their `exp`.
    jtis: HashMap<(String, String), i64>,
    /// Combined pattern sign-ins under way at CIS2, by the `state` APIM sent there.
    logins: HashMap<String, PendingLogin>,
    codes: HashMap<String, CodeGrant>,
    access: HashMap<String, AccessGrant>,
    /// Spent ones stay until the family expires, so that a replay is recognised.
    refresh: HashMap<String, RefreshGrant>,
}

impl Grants {
    fn prune(&mut self, now: i64) {
        self.jtis.retain(|_, exp| *exp > now);
        self.logins.retain(|_, l| l.expires_at > now);
        self.codes.retain(|_, c| c.expires_at > now);
        self.access.retain(|_, a| a.expires_at > now);
        self.refresh.retain(|_, r| r.expires_at > now);
    }

    fn revoke_family(&mut self, family: &str) {
        self.access.retain(|_, a| a.grant.family != family);
        self.refresh.retain(|_, r| r.grant.family != family);
    }
}

/// What a token stands for. Refreshes carry it over unchanged: same user, level and scopes.
#[derive(Clone)]
struct Grant {
    api_key: String,
    uid: String,
    aal: Aal,
    scopes: Vec<String>,
    /// Every token descended from one sign-in shares it.
    family: String,
}

struct AccessGrant {
    grant: Grant,
    expires_at: i64,
}

struct RefreshGrant {
    grant: Grant,
    count: u32,
    expires_at: i64,
    used: bool,
}

struct PendingLogin {
    api_key: String,
    redirect_uri: String,
    state: String,
    nonce: Secret<String>,
    code_verifier: Secret<String>,
    expires_at: i64,
}

struct CodeGrant {
    api_key: String,
    redirect_uri: String,
    uid: String,
    aal: Aal,
    expires_at: i64,
}

/// A token pair just issued.
struct Issued {
    access_token: String,
    refresh_token: String,
    expires_in: i64,
    refresh_expires_in: i64,
    refresh_count: u32,
}

impl Issued {
    /// RFC 6749 §5.1 as APIM writes it: every value a string, no `scope`, no ID token.
    fn body(&self) -> Map<String, Value> {
        let mut body = Map::new();
        body.insert("access_token".into(), json!(self.access_token));
        body.insert("expires_in".into(), json!(self.expires_in.to_string()));
        body.insert("token_type".into(), json!("Bearer"));
        body.insert("refresh_token".into(), json!(self.refresh_token));
        body.insert(
            "refresh_token_expires_in".into(),
            json!(self.refresh_expires_in.to_string()),
        );
        body.insert(
            "refresh_count".into(),
            json!(self.refresh_count.to_string()),
        );
        body
    }

    /// RFC 8693 §2.2.1 adds the type of the token issued.
    fn exchange_body(&self) -> Map<String, Value> {
        let mut body = self.body();
        body.insert("issued_token_type".into(), json!(ACCESS_TOKEN_TYPE));
        body
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An APIM refusal: RFC 6749 §5.2 fields plus APIM's `message_id`.
#[derive(Debug, PartialEq, Eq)]
struct ApimError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

impl ApimError {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        ApimError {
            status,
            error,
            description: description.into(),
        }
    }

    fn bad_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    fn unauthorized(description: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request", description)
    }

    fn unauthorized_client() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized_client",
            "you have tried to request authorization but your application is not configured \
             to use this authorization grant type",
        )
    }

    fn invalid_refresh_token() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_grant",
            "refresh_token is invalid",
        )
    }

    fn public_key(status: StatusCode, description: &str) -> Self {
        Self::new(status, "public_key error", description)
    }
}

impl IntoResponse for ApimError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": self.error,
            "error_description": self.description,
            "message_id": random_urlsafe(12),
        });
        (self.status, no_store(), axum::Json(body)).into_response()
    }
}

// ---------------------------------------------------------------------------------------------
// JWT checks (pure)

/// A JWT's header and claims, read before anything is trusted.
struct Jwt {
    header: Map<String, Value>,
    claims: Map<String, Value>,
}

/// Three dot-separated parts, the first two base64url JSON objects; nothing verified.
fn parse_jwt(token: &str) -> Option<Jwt> {
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    Some(Jwt {
        header: json_object(header)?,
        claims: json_object(claims)?,
    })
}

fn json_object(part: &str) -> Option<Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(map) => Some(map),
        _ => None,
    }
}

/// A non-empty string member.
fn str_of<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    map.get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn is_jwt_typ(header: &Map<String, Value>) -> bool {
    str_of(header, "typ").is_some_and(|t| t.eq_ignore_ascii_case("JWT"))
}

/// `aud` names `wanted`, as the whole string or as an array member, compared exactly.
fn audience_contains(claims: &Map<String, Value>, wanted: &str) -> bool {
    match claims.get("aud") {
        Some(Value::String(aud)) => aud == wanted,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(wanted)),
        _ => false,
    }
}

fn audience_present(claims: &Map<String, Value>) -> bool {
    match claims.get("aud") {
        Some(Value::String(aud)) => !aud.is_empty(),
        Some(Value::Array(auds)) => auds
            .iter()
            .any(|a| a.as_str().is_some_and(|a| !a.is_empty())),
        _ => false,
    }
}

/// `exp` as APIM reads it: present, an integer, in the future. The message names the token.
fn check_exp(claims: &Map<String, Value>, token: &str, now: i64) -> Result<i64, ApimError> {
    let exp = claims
        .get("exp")
        .filter(|v| !v.is_null())
        .ok_or_else(|| ApimError::bad_request(format!("Missing 'exp' claim in {token} JWT")))?
        .as_i64()
        .ok_or_else(|| {
            ApimError::bad_request(format!(
                "Invalid 'exp' claim in {token} JWT - must be an integer"
            ))
        })?;
    if exp <= now {
        return Err(ApimError::bad_request(format!(
            "Invalid 'exp' claim in {token} JWT - JWT has expired"
        )));
    }
    Ok(exp)
}

/// Whether `jwk` verifies `token`'s signature under `alg`. Claims are the caller's to check.
fn signature_valid(token: &str, jwk: &Jwk, alg: Algorithm) -> bool {
    let Ok(key) = DecodingKey::from_jwk(jwk) else {
        return false;
    };
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    jsonwebtoken::decode::<Value>(token, &key, &validation).is_ok()
}

/// A client assertion that passed every check but `jti` replay.
struct Assertion<'a> {
    app: &'a App,
    jti: String,
    exp: i64,
}

/// RFC 7523 client authentication with APIM's rules and words, in APIM's order: header, claims,
/// the app, its key, the signature, the audience.
fn check_client_assertion<'a>(
    assertion: &str,
    apps: &'a [App],
    token_url: &str,
    now: i64,
) -> Result<Assertion<'a>, ApimError> {
    let jwt = parse_jwt(assertion)
        .ok_or_else(|| ApimError::bad_request("Malformed JWT in client_assertion"))?;
    let kid = str_of(&jwt.header, "kid")
        .ok_or_else(|| ApimError::bad_request("Missing 'kid' header in client_assertion JWT"))?;
    if !is_jwt_typ(&jwt.header) {
        return Err(ApimError::bad_request(
            "Invalid 'typ' header in client_assertion JWT - must be 'JWT'",
        ));
    }
    match str_of(&jwt.header, "alg") {
        Some("RS512") => {}
        None => {
            return Err(ApimError::bad_request(
                "Missing 'alg' header in client_assertion JWT",
            ));
        }
        Some(_) => {
            return Err(ApimError::bad_request(
                "Invalid 'alg' header in client_assertion JWT - unsupported JWT algorithm - \
                 must be 'RS512'",
            ));
        }
    }
    let claims = &jwt.claims;
    let api_key = match (str_of(claims, "iss"), str_of(claims, "sub")) {
        (Some(iss), Some(sub)) if iss == sub => iss,
        _ => {
            return Err(ApimError::bad_request(
                "Missing or non-matching 'iss'/'sub' claims in client_assertion JWT",
            ));
        }
    };
    let jti = match claims.get("jti") {
        None | Some(Value::Null) => {
            return Err(ApimError::bad_request(
                "Missing 'jti' claim in client_assertion JWT",
            ));
        }
        Some(Value::String(jti)) if !jti.is_empty() => jti.clone(),
        Some(_) => {
            return Err(ApimError::bad_request(
                "Invalid 'jti' claim in client_assertion JWT - must be a unique string value \
                 such as a GUID",
            ));
        }
    };
    let exp = check_exp(claims, "client_assertion", now)?;
    if exp > now + ASSERTION_MAX_AHEAD_SECS {
        return Err(ApimError::bad_request(
            "Invalid 'exp' claim in client_assertion JWT - more than 5 minutes in future",
        ));
    }
    let app = find_app(apps, api_key).ok_or_else(|| {
        ApimError::unauthorized("Invalid 'iss'/'sub' claims in client_assertion JWT")
    })?;
    let jwks = app.app.jwks.as_ref().ok_or_else(|| {
        ApimError::public_key(
            StatusCode::FORBIDDEN,
            "You need to register a public key to use this authentication method - please \
             contact support to configure",
        )
    })?;
    let jwk = jwks.find(kid).ok_or_else(|| {
        ApimError::unauthorized(
            "Invalid 'kid' header in client_assertion JWT - no matching public key",
        )
    })?;
    if !signature_valid(assertion, jwk, Algorithm::RS512) {
        return Err(ApimError::public_key(
            StatusCode::UNAUTHORIZED,
            "JWT signature verification failed",
        ));
    }
    if !audience_contains(claims, token_url) {
        return Err(ApimError::unauthorized(
            "Missing or invalid 'aud' claim in client_assertion JWT",
        ));
    }
    Ok(Assertion { app, jti, exp })
}

/// A CIS2 ID token as APIM checks a subject token: `kid`, `typ`, RS256 or RS512, unexpired
/// integer `exp`, `iss` exactly the CIS2 issuer, `aud` present, signature by a CIS2 key. The
/// claims once all of that holds.
fn check_subject_token(
    token: &str,
    issuer: &str,
    jwks: &JwkSet,
    now: i64,
) -> Result<Map<String, Value>, ApimError> {
    let jwt =
        parse_jwt(token).ok_or_else(|| ApimError::bad_request("Malformed JWT in subject_token"))?;
    let kid = str_of(&jwt.header, "kid")
        .ok_or_else(|| ApimError::bad_request("Missing 'kid' header in subject_token JWT"))?;
    if !is_jwt_typ(&jwt.header) {
        return Err(ApimError::bad_request(
            "Invalid 'typ' header in subject_token JWT - must be 'JWT'",
        ));
    }
    let alg = match str_of(&jwt.header, "alg") {
        Some("RS256") => Algorithm::RS256,
        Some("RS512") => Algorithm::RS512,
        None => {
            return Err(ApimError::bad_request(
                "Missing 'alg' header in subject_token JWT",
            ));
        }
        Some(_) => return Err(ApimError::bad_request("Unsupported JWT Algorithm")),
    };
    let claims = jwt.claims;
    check_exp(&claims, "subject_token", now)?;
    let iss = str_of(&claims, "iss")
        .ok_or_else(|| ApimError::bad_request("Missing 'iss' claim in subject_token JWT"))?;
    if !audience_present(&claims) {
        return Err(ApimError::unauthorized(
            "Missing 'aud' claim in subject_token JWT",
        ));
    }
    // An empty configured issuer matches nothing: fail closed.
    if iss != issuer {
        return Err(ApimError::bad_request(
            "Missing or non-matching iss/sub claims in JWT",
        ));
    }
    let jwk = jwks.find(kid).ok_or_else(|| {
        ApimError::unauthorized(
            "Invalid 'kid' header in subject_token JWT - no matching public key",
        )
    })?;
    if !signature_valid(token, jwk, alg) {
        return Err(ApimError::unauthorized(
            "JWT signature verification failed due to invalid token",
        ));
    }
    Ok(claims)
}

/// Who a checked subject token names, and at what level.
#[derive(Debug, PartialEq, Eq)]
struct Subject {
    uid: String,
    aal: Option<Aal>,
}

/// The separate pattern also needs the role the user chose (scope `selectedrole`). Pure.
fn exchanged_subject(claims: &Map<String, Value>) -> Result<Subject, ApimError> {
    let uid = str_of(claims, "sub")
        .ok_or_else(|| ApimError::bad_request("Missing 'sub' claim in subject_token JWT"))?;
    if str_of(claims, "selected_roleid").is_none() {
        return Err(ApimError::unauthorized(
            "selected_roleid is missing in your token",
        ));
    }
    Ok(Subject {
        uid: uid.to_string(),
        aal: claims.get(AAL_CLAIM).and_then(Aal::from_claim),
    })
}

/// Client authentication for the code and refresh grants: the API key and its secret as form
/// parameters, as APIM's proxy verifies them.
fn authenticate_secret<'a>(apps: &'a [App], params: &Params) -> Result<&'a App, ApimError> {
    let app = params
        .get("client_id")
        .and_then(|id| find_app(apps, id))
        .ok_or_else(|| ApimError::unauthorized("client_id or client_secret is invalid"))?;
    let given = params
        .get("client_secret")
        .ok_or_else(|| ApimError::unauthorized("client_secret is missing"))?;
    let registered = app.app.client_secret.as_deref();
    if !registered.is_some_and(|r| secrets_match(given, r)) {
        return Err(ApimError::unauthorized("client_secret is invalid"));
    }
    Ok(app)
}

// ---------------------------------------------------------------------------------------------
// Token endpoint

async fn slow(State(inner): State<Arc<Inner>>, request: Request, next: Next) -> Response {
    if let Some(delay) = inner.faults.delay() {
        tokio::time::sleep(delay).await;
    }
    next.run(request).await
}

async fn token(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    inner.calls.token.fetch_add(1, Ordering::Relaxed);
    let params = is_form(&headers).then(|| Params::parse(&body));
    if let Some(params) = &params {
        inner.calls.count_grant(params.get("grant_type"));
    }
    let answer = match (fault_refusal(&inner.faults), params) {
        (Some(refusal), _) => Err(refusal),
        (None, None) => Err(ApimError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
            "Content-Type must be application/x-www-form-urlencoded",
        )),
        (None, Some(params)) => grant(&inner, &params),
    };
    match answer {
        Ok(body) => (StatusCode::OK, no_store(), axum::Json(Value::Object(body))).into_response(),
        Err(error) => {
            debug!(
                status = %error.status,
                error = error.error,
                description = %error.description,
                "apim simulator refused a token request"
            );
            error.into_response()
        }
    }
}

fn fault_refusal(faults: &FaultSet) -> Option<ApimError> {
    if faults.has(ApimFault::ServerError) {
        Some(ApimError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "simulated APIM failure",
        ))
    } else if faults.has(ApimFault::UnauthorizedClient) {
        Some(ApimError::unauthorized_client())
    } else {
        None
    }
}

fn grant(inner: &Inner, params: &Params) -> Result<Map<String, Value>, ApimError> {
    if let Some(name) = params.first_repeated() {
        return Err(ApimError::bad_request(format!(
            "{name} is given more than once"
        )));
    }
    match params.get("grant_type") {
        Some(TOKEN_EXCHANGE_GRANT) => exchange(inner, params),
        Some("refresh_token") => refresh(inner, params),
        Some("authorization_code") => redeem_code(inner, params),
        None => Err(ApimError::bad_request("grant_type is invalid")),
        Some(_) => Err(ApimError::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type is invalid",
        )),
    }
}

/// RFC 8693 token exchange of a CIS2 ID token (the separate pattern).
fn exchange(inner: &Inner, params: &Params) -> Result<Map<String, Value>, ApimError> {
    if params.get("client_assertion_type") != Some(JWT_BEARER) {
        return Err(ApimError::bad_request(format!(
            "Missing or invalid client_assertion_type - must be '{JWT_BEARER}'"
        )));
    }
    if params.get("subject_token_type") != Some(ID_TOKEN_TYPE) {
        return Err(ApimError::bad_request(format!(
            "missing or invalid subject_token_type - must be '{ID_TOKEN_TYPE}'"
        )));
    }
    let assertion = params
        .get("client_assertion")
        .ok_or_else(|| ApimError::bad_request("Missing client_assertion"))?;
    let subject_token = params
        .get("subject_token")
        .ok_or_else(|| ApimError::bad_request("Missing subject_token"))?;
    let now = inner.now();
    let assertion = check_client_assertion(assertion, &inner.apps, &inner.token_url(), now)?;
    // Spent before the subject token is looked at, as APIM does: one assertion, one attempt.
    remember_jti(inner, &assertion, now)?;
    let claims = check_subject_token(subject_token, &inner.cis2_issuer, &inner.cis2_jwks, now)?;
    let subject = exchanged_subject(&claims)?;
    let scopes = scopes_at(&assertion.app.scopes, subject.aal);
    let Some(aal) = subject.aal.filter(|_| !scopes.is_empty()) else {
        return Err(ApimError::unauthorized_client());
    };
    let api_key = assertion.app.app.api_key.clone();
    debug!(%api_key, uid = %subject.uid, %aal, "apim simulator exchanged an ID token");
    let grant = Grant {
        api_key,
        uid: subject.uid,
        aal,
        scopes,
        family: random_urlsafe(12),
    };
    let mut grants = inner.grants();
    let issued = inner.issue(&mut grants, grant, 0, now + inner.refresh_ttl, now);
    Ok(issued.exchange_body())
}

fn remember_jti(inner: &Inner, assertion: &Assertion<'_>, now: i64) -> Result<(), ApimError> {
    let mut grants = inner.grants();
    grants.prune(now);
    let key = (assertion.app.app.api_key.clone(), assertion.jti.clone());
    if grants.jtis.contains_key(&key) {
        return Err(ApimError::bad_request(
            "Non-unique 'jti' claim in client_assertion JWT",
        ));
    }
    grants.jtis.insert(key, assertion.exp);
    Ok(())
}

/// A new pair for a refresh token, which is spent by it. Same user, level and scopes; the
/// family's deadline does not move.
fn refresh(inner: &Inner, params: &Params) -> Result<Map<String, Value>, ApimError> {
    let app = authenticate_secret(&inner.apps, params)?;
    let refresh_token = params
        .get("refresh_token")
        .ok_or_else(|| ApimError::bad_request("refresh_token is missing"))?;
    let now = inner.now();
    let mut grants = inner.grants();
    grants.prune(now);
    let (grant, count, expires_at) = spend_refresh_token(&mut grants, refresh_token, app)?;
    debug!(
        api_key = %grant.api_key,
        uid = %grant.uid,
        count = count + 1,
        "apim simulator refreshed a token pair"
    );
    let issued = inner.issue(&mut grants, grant, count + 1, expires_at, now);
    Ok(issued.body())
}

/// Single use: the first presentation spends the token. A second means two holders, or a
/// thief, so the whole family goes (what makes two concurrent refreshes log the user out).
fn spend_refresh_token(
    grants: &mut Grants,
    refresh_token: &str,
    app: &App,
) -> Result<(Grant, u32, i64), ApimError> {
    let Some(entry) = grants.refresh.get_mut(refresh_token) else {
        return Err(ApimError::invalid_refresh_token());
    };
    if entry.grant.api_key != app.app.api_key {
        return Err(ApimError::invalid_refresh_token());
    }
    if entry.used {
        let family = entry.grant.family.clone();
        grants.revoke_family(&family);
        debug!("apim simulator saw a spent refresh token again: token family revoked");
        return Err(ApimError::invalid_refresh_token());
    }
    entry.used = true;
    Ok((entry.grant.clone(), entry.count, entry.expires_at))
}

/// The combined pattern's code, redeemed with the API key and secret.
fn redeem_code(inner: &Inner, params: &Params) -> Result<Map<String, Value>, ApimError> {
    let app = authenticate_secret(&inner.apps, params)?;
    let redirect_uri = params
        .get("redirect_uri")
        .ok_or_else(|| ApimError::bad_request("redirect_uri is missing"))?;
    if !app.app.redirect_uris.iter().any(|r| r == redirect_uri) {
        return Err(ApimError::bad_request("redirect_uri is invalid"));
    }
    let code = params
        .get("code")
        .ok_or_else(|| ApimError::bad_request("authorization_code is missing"))?;
    let now = inner.now();
    let mut grants = inner.grants();
    grants.prune(now);
    let invalid = || ApimError::new(StatusCode::BAD_REQUEST, "invalid_grant", "code is invalid");
    // Out of circulation whatever happens next.
    let code_grant = grants.codes.remove(code).ok_or_else(invalid)?;
    if code_grant.api_key != app.app.api_key || code_grant.redirect_uri != redirect_uri {
        return Err(invalid());
    }
    let scopes = scopes_at(&app.scopes, Some(code_grant.aal));
    if scopes.is_empty() {
        return Err(ApimError::unauthorized_client());
    }
    let grant = Grant {
        api_key: code_grant.api_key,
        uid: code_grant.uid,
        aal: code_grant.aal,
        scopes,
        family: random_urlsafe(12),
    };
    let issued = inner.issue(&mut grants, grant, 0, now + inner.refresh_ttl, now);
    Ok(issued.body())
}

// ---------------------------------------------------------------------------------------------
// Combined pattern: authorize and callback

fn refuse_page(status: StatusCode, message: &str) -> Response {
    debug!(message, "apim simulator refused an authorization request");
    page_response(status, page::error("Sign-in cannot start", message))
}

async fn authorize(State(inner): State<Arc<Inner>>, RawQuery(query): RawQuery) -> Response {
    begin_login(&inner, &Params::parse(query.unwrap_or_default().as_bytes()))
}

/// Checks the app's request, then sends the browser to CIS2 as APIM's own client. Problems
/// before the redirect URI is trusted are pages, never redirects.
fn begin_login(inner: &Inner, params: &Params) -> Response {
    let Some(cis2) = &inner.cis2 else {
        return refuse_page(
            StatusCode::NOT_IMPLEMENTED,
            "This APIM simulator runs without a CIS2 simulator: the combined pattern is off.",
        );
    };
    if let Some(name) = params.first_repeated() {
        return refuse_page(
            StatusCode::BAD_REQUEST,
            &format!("{name} is given more than once."),
        );
    }
    let Some(app) = params.get("client_id").and_then(|id| inner.app(id)) else {
        return refuse_page(
            StatusCode::UNAUTHORIZED,
            "The client_id is not a registered API key.",
        );
    };
    let Some(redirect_uri) = params.get("redirect_uri") else {
        return refuse_page(StatusCode::BAD_REQUEST, "The request has no redirect_uri.");
    };
    if !app.app.redirect_uris.iter().any(|r| r == redirect_uri) {
        return refuse_page(
            StatusCode::BAD_REQUEST,
            "The redirect_uri is not registered for this application.",
        );
    }
    let Some(state) = params.get("state") else {
        return refuse_page(StatusCode::BAD_REQUEST, "The request has no state.");
    };
    let back = |error: &str, description: &str| {
        redirect_to(
            redirect_uri,
            &[
                ("error", error),
                ("error_description", description),
                ("state", state),
            ],
        )
    };
    match params.get("response_type") {
        Some("code") => {}
        None => return back("invalid_request", "response_type is required"),
        Some(_) => return back("unsupported_response_type", "response_type must be code"),
    }
    if app.scopes.is_empty() {
        return back(
            "unauthorized_client",
            "the application is subscribed to no user-restricted API",
        );
    }
    let acr = AcrClass::from_acr_values(params.get("acr_values"));
    let login_state = random_urlsafe(24);
    let nonce = random_urlsafe(24);
    let code_verifier = random_urlsafe(32);
    let code_challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(code_verifier.as_bytes()));
    {
        let now = inner.now();
        let mut grants = inner.grants();
        grants.prune(now);
        grants.logins.insert(
            login_state.clone(),
            PendingLogin {
                api_key: app.app.api_key.clone(),
                redirect_uri: redirect_uri.to_string(),
                state: state.to_string(),
                nonce: Secret::new(nonce.clone()),
                code_verifier: Secret::new(code_verifier),
                expires_at: now + LOGIN_TTL_SECS,
            },
        );
    }
    let mut query: Vec<(&str, &str)> = vec![
        ("response_type", "code"),
        ("client_id", &cis2.client_id),
        ("redirect_uri", &cis2.callback),
        ("scope", CIS2_SCOPE),
        ("state", &login_state),
        ("nonce", &nonce),
        ("code_challenge", &code_challenge),
        ("code_challenge_method", "S256"),
        ("acr_values", acr.as_str()),
        ("prompt", "login"),
    ];
    // The simulator's own shortcuts, so that tests and demos can skip the sign-in page.
    for name in ["login_hint", "sim_authenticator", "sim_role"] {
        if let Some(value) = params.get(name) {
            query.push((name, value));
        }
    }
    debug!(api_key = %app.app.api_key, acr = acr.as_str(), "apim simulator sent a user to CIS2");
    redirect_to(&cis2.endpoint("/authorize"), &query)
}

/// CIS2 comes back here: redeem its code, check the ID token, and send the app an APIM code.
async fn callback(State(inner): State<Arc<Inner>>, RawQuery(query): RawQuery) -> Response {
    let params = Params::parse(query.unwrap_or_default().as_bytes());
    let Some(cis2) = &inner.cis2 else {
        return refuse_page(
            StatusCode::NOT_IMPLEMENTED,
            "This APIM simulator runs without a CIS2 simulator: the combined pattern is off.",
        );
    };
    let login = params.get("state").and_then(|state| {
        let now = inner.now();
        let mut grants = inner.grants();
        grants.prune(now);
        grants.logins.remove(state)
    });
    let Some(login) = login else {
        return refuse_page(
            StatusCode::BAD_REQUEST,
            "This sign-in is unknown or has expired: start again from the application.",
        );
    };
    let back = |error: &str, description: &str| {
        redirect_to(
            &login.redirect_uri,
            &[
                ("error", error),
                ("error_description", description),
                ("state", login.state.as_str()),
            ],
        )
    };
    if let Some(error) = params.get("error") {
        debug!(error, "CIS2 refused an APIM sign-in");
        let description = params
            .get("error_description")
            .unwrap_or("CIS2 sign-in failed");
        return back(error, description);
    }
    let Some(code) = params.get("code") else {
        return back("server_error", "CIS2 sent no authorization code");
    };
    let Some(id_token) = redeem_at_cis2(&inner.http, cis2, code, &login.code_verifier).await else {
        return back("server_error", "CIS2 did not issue tokens");
    };
    let now = inner.now();
    let (uid, aal) = match check_cis2_id_token(&inner, cis2, &id_token, &login.nonce, now) {
        Ok(user) => user,
        Err(reason) => {
            debug!(reason, "apim simulator refused a CIS2 ID token");
            return back("access_denied", "the CIS2 ID token is not valid");
        }
    };
    let apim_code = random_urlsafe(32);
    debug!(api_key = %login.api_key, %uid, %aal, "apim simulator signed a user in, code issued");
    inner.grants().codes.insert(
        apim_code.clone(),
        CodeGrant {
            api_key: login.api_key.clone(),
            redirect_uri: login.redirect_uri.clone(),
            uid,
            aal,
            expires_at: now + CODE_TTL_SECS,
        },
    );
    redirect_to(
        &login.redirect_uri,
        &[
            ("code", apim_code.as_str()),
            ("state", login.state.as_str()),
        ],
    )
}

/// The ID token from CIS2's token endpoint, or None whatever went wrong.
async fn redeem_at_cis2(
    http: &reqwest::Client,
    cis2: &Cis2Link,
    code: &str,
    code_verifier: &Secret<String>,
) -> Option<String> {
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code),
        ("redirect_uri", cis2.callback.as_str()),
        ("code_verifier", code_verifier.expose().as_str()),
        ("client_id", cis2.client_id.as_str()),
        ("client_secret", cis2.client_secret.expose().as_str()),
    ];
    let response = match http
        .post(cis2.endpoint("/access_token"))
        .form(&form)
        .send()
        .await
    {
        Ok(response) => response,
        Err(_) => {
            debug!("apim simulator could not reach CIS2's token endpoint");
            return None;
        }
    };
    if !response.status().is_success() {
        debug!(status = %response.status(), "CIS2 refused APIM's code redemption");
        return None;
    }
    let body: Value = response.json().await.ok()?;
    body.get("id_token")
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The subject token checks, plus what APIM's own sign-in adds: issued to APIM, with its nonce,
/// naming a user and an achieved level.
fn check_cis2_id_token(
    inner: &Inner,
    cis2: &Cis2Link,
    id_token: &str,
    nonce: &Secret<String>,
    now: i64,
) -> Result<(String, Aal), &'static str> {
    let claims = check_subject_token(id_token, &inner.cis2_issuer, &inner.cis2_jwks, now)
        .map_err(|_| "the ID token fails the subject token checks")?;
    if !audience_contains(&claims, &cis2.client_id) {
        return Err("the ID token was issued to another client");
    }
    if !str_of(&claims, "nonce").is_some_and(|n| secrets_match(n, nonce.expose())) {
        return Err("the ID token's nonce is not APIM's");
    }
    let uid = str_of(&claims, "sub").ok_or("the ID token has no sub")?;
    let aal = claims
        .get(AAL_CLAIM)
        .and_then(Aal::from_claim)
        .ok_or("the ID token has no usable authentication_assurance_level")?;
    Ok((uid.to_string(), aal))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::sim::SimOptions;
    use crate::sim::keys::{PROVIDER_KID, SimKey, UNKNOWN_KID};
    use axum::http::header;
    use jsonwebtoken::{EncodingKey, Header};
    use std::collections::{BTreeSet, HashSet};
    use std::sync::OnceLock;

    const ISSUER: &str =
        "https://cis2.sim.test:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare";
    const APP: &str = "app-api-key";
    const EPS_ONLY: &str = "eps-only-api-key";
    const NO_KEYS: &str = "no-keys-api-key";
    const SECRET: &str = "app-secret-8d1f2c";
    const REDIRECT: &str = "https://app.example.test/callback";
    const PDS: &str = "personal-demographics-service";
    const EPS: &str = "electronic-prescription-service";
    const STEP_UP_USER: &str = "656005750107";
    const PASSKEY_ONLY: &str = "656005750111";
    const ROLE: &str = "555021935107";
    const APP_STATE: &str = "app-state-42";

    fn scope(level: u8, api: &str) -> String {
        format!("{SCOPE_PREFIX}aal{level}:{api}")
    }

    fn app_key() -> &'static SimKey {
        static KEY: OnceLock<SimKey> = OnceLock::new();
        KEY.get_or_init(|| SimKey::generate("app-key-1", Algorithm::RS512))
    }

    /// Same kid as the app's key, another key pair: its signatures must not verify.
    fn impostor_key() -> &'static SimKey {
        static KEY: OnceLock<SimKey> = OnceLock::new();
        KEY.get_or_init(|| SimKey::generate("app-key-1", Algorithm::RS512))
    }

    fn apps() -> Vec<ApimApp> {
        let app = |api_key: &str, apis: Vec<String>| ApimApp {
            api_key: api_key.into(),
            client_secret: Some(SECRET.into()),
            jwks: Some(app_key().jwks()),
            redirect_uris: vec![REDIRECT.into()],
            apis,
        };
        vec![
            app(APP, vec![PDS.into(), format!("{EPS}{AAL3_ONLY_SUFFIX}")]),
            app(EPS_ONLY, vec![format!("{EPS}{AAL3_ONLY_SUFFIX}")]),
            ApimApp {
                api_key: NO_KEYS.into(),
                apis: vec![PDS.into()],
                ..ApimApp::default()
            },
        ]
    }

    fn options() -> ApimOptions {
        ApimOptions {
            cis2_issuer: ISSUER.into(),
            cis2_jwks: keys::provider_key().jwks(),
            apps: apps(),
            ..ApimOptions::default()
        }
    }

    async fn listener() -> tokio::net::TcpListener {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("port 0 on loopback is always bindable")
    }

    async fn start(options: ApimOptions) -> ApimSimulator {
        ApimSimulator::start(listener().await, options)
            .await
            .expect("the simulator starts")
    }

    async fn start_cis2() -> Cis2Simulator {
        Cis2Simulator::start(listener().await, SimOptions::default())
            .await
            .expect("the CIS2 simulator starts")
    }

    fn http() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a plain client builds")
    }

    fn now() -> i64 {
        unix_seconds(SystemTime::now())
    }

    /// `base` with `changes` applied: a null value removes the member.
    fn changed(mut base: Value, changes: &[(&str, Value)]) -> Value {
        for (name, value) in changes {
            if let Some(object) = base.as_object_mut() {
                if value.is_null() {
                    object.remove(*name);
                } else {
                    object.insert((*name).to_string(), value.clone());
                }
            }
        }
        base
    }

    fn hmac_key(secret: &[u8]) -> EncodingKey {
        EncodingKey::from_secret(secret).expect("any bytes make an HMAC key")
    }

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    fn rsa_header(alg: Algorithm, kid: &str) -> Header {
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_string());
        header
    }

    fn sign(header: &Header, claims: &Value, key: &EncodingKey) -> String {
        jsonwebtoken::encode(header, claims, key).expect("test keys sign")
    }

    /// A token with `alg: none` and no signature, which no check may accept.
    fn unsigned(header: Value, claims: &Value) -> String {
        let encode = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!("{}.{}.", encode(&header), encode(claims))
    }

    fn id_claims(changes: &[(&str, Value)]) -> Value {
        let now = now();
        changed(
            json!({
                "iss": ISSUER,
                "sub": STEP_UP_USER,
                "aud": "broker-client",
                "azp": "broker-client",
                "iat": now,
                "exp": now + 300,
                "auth_time": now,
                "acr": "AAL3_ANY",
                "amr": ["N3_SMARTCARD"],
                "authentication_assurance_level": "3",
                "id_assurance_level": "3",
                "selected_roleid": ROLE,
                "sid": "cis2-session-1",
            }),
            changes,
        )
    }

    /// A CIS2 ID token signed by the CIS2 simulator's key.
    fn id_token(changes: &[(&str, Value)]) -> String {
        sign(
            &rsa_header(Algorithm::RS256, PROVIDER_KID),
            &id_claims(changes),
            keys::provider_key().encoding_key(),
        )
    }

    fn assertion_claims(sim: &ApimSimulator, changes: &[(&str, Value)]) -> Value {
        let now = now();
        changed(
            json!({
                "iss": APP,
                "sub": APP,
                "aud": sim.token_url(),
                "iat": now,
                "exp": now + 300,
                "jti": random_urlsafe(16),
            }),
            changes,
        )
    }

    /// A good client assertion of the app's, with `changes` to its claims.
    fn assertion(sim: &ApimSimulator, changes: &[(&str, Value)]) -> String {
        sign(
            &rsa_header(Algorithm::RS512, app_key().kid()),
            &assertion_claims(sim, changes),
            app_key().encoding_key(),
        )
    }

    type Form = Vec<(&'static str, String)>;

    fn exchange_form(assertion: &str, subject_token: &str) -> Form {
        vec![
            ("grant_type", TOKEN_EXCHANGE_GRANT.into()),
            ("subject_token_type", ID_TOKEN_TYPE.into()),
            ("subject_token", subject_token.into()),
            ("client_assertion_type", JWT_BEARER.into()),
            ("client_assertion", assertion.into()),
        ]
    }

    async fn post(sim: &ApimSimulator, form: &[(&str, String)]) -> (StatusCode, Value) {
        let response = http()
            .post(sim.token_url())
            .form(form)
            .send()
            .await
            .expect("the simulator answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn exchange(sim: &ApimSimulator, assertion: &str, subject: &str) -> (StatusCode, Value) {
        post(sim, &exchange_form(assertion, subject)).await
    }

    /// A successful exchange of a fresh ID token with `changes`: the token response.
    async fn exchanged(sim: &ApimSimulator, changes: &[(&str, Value)]) -> Value {
        let (status, body) = exchange(sim, &assertion(sim, &[]), &id_token(changes)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn refresh(
        sim: &ApimSimulator,
        refresh_token: &str,
        client_id: &str,
        secret: &str,
    ) -> (StatusCode, Value) {
        post(
            sim,
            &[
                ("grant_type", "refresh_token".into()),
                ("refresh_token", refresh_token.into()),
                ("client_id", client_id.into()),
                ("client_secret", secret.into()),
            ],
        )
        .await
    }

    fn field<'a>(body: &'a Value, name: &str) -> &'a str {
        body[name].as_str().unwrap_or_default()
    }

    fn keys_of(body: &Value) -> BTreeSet<String> {
        body.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn names(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const PAIR_FIELDS: &[&str] = &[
        "access_token",
        "expires_in",
        "token_type",
        "refresh_token",
        "refresh_token_expires_in",
        "refresh_count",
    ];

    fn assert_all_strings(body: &Value) {
        let object = body.as_object().expect("a JSON object");
        for (name, value) in object {
            assert!(value.is_string(), "{name} is not a string: {value}");
        }
    }

    /// An APIM refusal: the status, the error, the exact description and a message_id.
    fn assert_refused(
        (status, body): &(StatusCode, Value),
        want_status: StatusCode,
        error: &str,
        description: &str,
    ) {
        assert_eq!(*status, want_status, "{body}");
        assert_eq!(body["error"], error, "{body}");
        assert_eq!(body["error_description"], description, "{body}");
        assert!(!field(body, "message_id").is_empty(), "{body}");
        assert_eq!(
            keys_of(body),
            names(&["error", "error_description", "message_id"])
        );
    }

    #[tokio::test]
    async fn a_token_exchange_answers_with_strings_and_aal3_scopes() {
        let sim = start(options()).await;
        let response = http()
            .post(sim.token_url())
            .form(&exchange_form(&assertion(&sim, &[]), &id_token(&[])))
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response
                .headers()
                .get(header::CACHE_CONTROL)
                .map(|v| v.as_bytes()),
            Some(&b"no-store"[..])
        );
        let body: Value = response.json().await.expect("JSON");
        assert_all_strings(&body);
        let mut want = names(PAIR_FIELDS);
        want.insert("issued_token_type".into());
        assert_eq!(keys_of(&body), want);
        assert_eq!(body["expires_in"], "599");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["issued_token_type"], ACCESS_TOKEN_TYPE);
        assert_eq!(body["refresh_count"], "0");
        assert_eq!(body["refresh_token_expires_in"], "43200");
        assert_ne!(body["access_token"], body["refresh_token"]);

        let info = sim
            .introspect(field(&body, "access_token"))
            .expect("the access token is live");
        assert_eq!(info.scopes, vec![scope(3, PDS), scope(3, EPS)]);
        assert_eq!((info.aal, info.uid.as_str()), (3, STEP_UP_USER));
        assert_eq!(info.api_key, APP);
        assert!(info.expires_at > SystemTime::now());
        assert_eq!(sim.introspect(field(&body, "refresh_token")), None);
        assert_eq!(sim.introspect("made-up"), None);
        assert_eq!(
            (sim.token_calls(), sim.exchange_calls(), sim.refresh_calls()),
            (1, 1, 0)
        );
        assert_eq!(sim.seen_jtis(), 1);
    }

    #[tokio::test]
    async fn scopes_follow_the_achieved_aal() {
        let sim = start(options()).await;
        let aal = |v: Value| [(AAL_CLAIM, v)];

        let body = exchanged(&sim, &aal(json!("2"))).await;
        let info = sim.introspect(field(&body, "access_token")).expect("live");
        assert_eq!((info.aal, info.scopes), (2, vec![scope(2, PDS)]));

        // Some NHS fixtures carry the level as an integer.
        let body = exchanged(&sim, &aal(json!(2))).await;
        let info = sim.introspect(field(&body, "access_token")).expect("live");
        assert_eq!(info.scopes, vec![scope(2, PDS)]);

        let body = exchanged(&sim, &aal(json!(3))).await;
        let info = sim.introspect(field(&body, "access_token")).expect("live");
        assert_eq!(info.scopes, vec![scope(3, PDS), scope(3, EPS)]);

        for level in [json!("1"), json!(1), json!("AAL3"), json!(4), Value::Null] {
            let result =
                exchange(&sim, &assertion(&sim, &[]), &id_token(&aal(level.clone()))).await;
            assert_refused(
                &result,
                StatusCode::UNAUTHORIZED,
                "unauthorized_client",
                "you have tried to request authorization but your application is not \
                 configured to use this authorization grant type",
            );
        }
    }

    #[tokio::test]
    async fn an_app_with_only_aal3_apis_gets_nothing_at_aal2() {
        let sim = start(options()).await;
        let eps_assertion = |sim: &ApimSimulator| {
            assertion(sim, &[("iss", json!(EPS_ONLY)), ("sub", json!(EPS_ONLY))])
        };
        let (status, body) = exchange(&sim, &eps_assertion(&sim), &id_token(&[])).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let info = sim.introspect(field(&body, "access_token")).expect("live");
        assert_eq!(
            (info.api_key.as_str(), info.scopes),
            (EPS_ONLY, vec![scope(3, EPS)])
        );

        let result = exchange(
            &sim,
            &eps_assertion(&sim),
            &id_token(&[(AAL_CLAIM, json!("2"))]),
        )
        .await;
        assert_eq!(result.0, StatusCode::UNAUTHORIZED);
        assert_eq!(result.1["error"], "unauthorized_client");
    }

    #[tokio::test]
    async fn a_reused_jti_is_refused() {
        let sim = start(options()).await;
        let assertion = assertion(&sim, &[]);
        let (status, _) = exchange(&sim, &assertion, &id_token(&[])).await;
        assert_eq!(status, StatusCode::OK);
        let result = exchange(&sim, &assertion, &id_token(&[])).await;
        assert_refused(
            &result,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Non-unique 'jti' claim in client_assertion JWT",
        );
        assert_eq!(sim.seen_jtis(), 1);
        assert_eq!(sim.exchange_calls(), 2);
    }

    #[tokio::test]
    async fn client_assertions_are_checked_as_apim_checks_them() {
        let sim = start(options()).await;
        let now = now();
        let key = app_key();
        let rs512 = rsa_header(Algorithm::RS512, key.kid());
        let with_header =
            |header: Header| sign(&header, &assertion_claims(&sim, &[]), key.encoding_key());
        let claims = |changes: &[(&str, Value)]| assertion(&sim, changes);
        let no_typ = Header {
            typ: None,
            ..rs512.clone()
        };
        let jose_typ = Header {
            typ: Some("JOSE+JSON".into()),
            ..rs512.clone()
        };
        let no_kid = Header {
            kid: None,
            ..rs512.clone()
        };
        let cases: Vec<(&str, String, StatusCode, &str, &str)> = vec![
            (
                "exp more than 5 minutes ahead",
                claims(&[("exp", json!(now + 600))]),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid 'exp' claim in client_assertion JWT - more than 5 minutes in future",
            ),
            (
                "exp in the past",
                claims(&[("exp", json!(now - 20))]),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid 'exp' claim in client_assertion JWT - JWT has expired",
            ),
            (
                "exp a string",
                claims(&[("exp", json!((now + 300).to_string()))]),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid 'exp' claim in client_assertion JWT - must be an integer",
            ),
            (
                "exp missing",
                claims(&[("exp", Value::Null)]),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing 'exp' claim in client_assertion JWT",
            ),
            (
                "aud with a trailing slash",
                claims(&[("aud", json!(format!("{}/", sim.token_url())))]),
                StatusCode::UNAUTHORIZED,
                "invalid_request",
                "Missing or invalid 'aud' claim in client_assertion JWT",
            ),
            (
                "aud of another server",
                claims(&[("aud", json!("https://api.service.nhs.uk/oauth2/token"))]),
                StatusCode::UNAUTHORIZED,
                "invalid_request",
                "Missing or invalid 'aud' claim in client_assertion JWT",
            ),
            (
                "aud missing",
                claims(&[("aud", Value::Null)]),
                StatusCode::UNAUTHORIZED,
                "invalid_request",
                "Missing or invalid 'aud' claim in client_assertion JWT",
            ),
            (
                "iss differs from sub",
                claims(&[("iss", json!(EPS_ONLY))]),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing or non-matching 'iss'/'sub' claims in client_assertion JWT",
            ),
            (
                "sub missing",
                claims(&[("sub", Value::Null)]),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing or non-matching 'iss'/'sub' claims in client_assertion JWT",
            ),
            (
                "iss and sub an unknown API key",
                claims(&[("iss", json!("unknown")), ("sub", json!("unknown"))]),
                StatusCode::UNAUTHORIZED,
                "invalid_request",
                "Invalid 'iss'/'sub' claims in client_assertion JWT",
            ),
            (
                "jti missing",
                claims(&[("jti", Value::Null)]),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing 'jti' claim in client_assertion JWT",
            ),
            (
                "jti a number",
                claims(&[("jti", json!(1_234_567_890))]),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid 'jti' claim in client_assertion JWT - must be a unique string value \
                 such as a GUID",
            ),
            (
                "RS256",
                with_header(rsa_header(Algorithm::RS256, key.kid())),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid 'alg' header in client_assertion JWT - unsupported JWT algorithm - \
                 must be 'RS512'",
            ),
            (
                "HS256 with a shared secret",
                sign(
                    &rsa_header(Algorithm::HS256, key.kid()),
                    &assertion_claims(&sim, &[]),
                    &hmac_key(SECRET.as_bytes()),
                ),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid 'alg' header in client_assertion JWT - unsupported JWT algorithm - \
                 must be 'RS512'",
            ),
            (
                "alg none",
                unsigned(
                    json!({"alg": "none", "typ": "JWT", "kid": key.kid()}),
                    &assertion_claims(&sim, &[]),
                ),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid 'alg' header in client_assertion JWT - unsupported JWT algorithm - \
                 must be 'RS512'",
            ),
            (
                "alg missing",
                unsigned(
                    json!({"typ": "JWT", "kid": key.kid()}),
                    &assertion_claims(&sim, &[]),
                ),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing 'alg' header in client_assertion JWT",
            ),
            (
                "kid not in the app's JWKS",
                with_header(rsa_header(Algorithm::RS512, "not-registered")),
                StatusCode::UNAUTHORIZED,
                "invalid_request",
                "Invalid 'kid' header in client_assertion JWT - no matching public key",
            ),
            (
                "kid missing",
                with_header(no_kid),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing 'kid' header in client_assertion JWT",
            ),
            (
                "typ missing",
                with_header(no_typ),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid 'typ' header in client_assertion JWT - must be 'JWT'",
            ),
            (
                "typ not JWT",
                with_header(jose_typ),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Invalid 'typ' header in client_assertion JWT - must be 'JWT'",
            ),
            (
                "signed by another key under the app's kid",
                sign(
                    &rs512,
                    &assertion_claims(&sim, &[]),
                    impostor_key().encoding_key(),
                ),
                StatusCode::UNAUTHORIZED,
                "public_key error",
                "JWT signature verification failed",
            ),
            (
                "an app with no registered keys",
                claims(&[("iss", json!(NO_KEYS)), ("sub", json!(NO_KEYS))]),
                StatusCode::FORBIDDEN,
                "public_key error",
                "You need to register a public key to use this authentication method - please \
                 contact support to configure",
            ),
            (
                "not a JWT",
                "not-a-jwt".into(),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Malformed JWT in client_assertion",
            ),
        ];
        for (case, assertion, status, error, description) in cases {
            let result = exchange(&sim, &assertion, &id_token(&[])).await;
            assert_eq!(result.0, status, "{case}: {}", result.1);
            assert_refused(&result, status, error, description);
        }
        assert_eq!(sim.seen_jtis(), 0, "no refused assertion spends its jti");
    }

    #[tokio::test]
    async fn subject_tokens_are_checked_as_apim_checks_them() {
        let sim = start(options()).await;
        let now = now();
        let id_header = rsa_header(Algorithm::RS256, PROVIDER_KID);
        let provider = keys::provider_key().encoding_key();
        let cases: Vec<(&str, String, StatusCode, &str)> = vec![
            (
                "expired",
                id_token(&[("exp", json!(now - 60)), ("iat", json!(now - 360))]),
                StatusCode::BAD_REQUEST,
                "Invalid 'exp' claim in subject_token JWT - JWT has expired",
            ),
            (
                "exp a string",
                id_token(&[("exp", json!((now + 300).to_string()))]),
                StatusCode::BAD_REQUEST,
                "Invalid 'exp' claim in subject_token JWT - must be an integer",
            ),
            (
                "exp missing",
                id_token(&[("exp", Value::Null)]),
                StatusCode::BAD_REQUEST,
                "Missing 'exp' claim in subject_token JWT",
            ),
            (
                "a foreign issuer",
                id_token(&[("iss", json!("https://login.example.test/realms/other"))]),
                StatusCode::BAD_REQUEST,
                "Missing or non-matching iss/sub claims in JWT",
            ),
            (
                "the issuer without its explicit :443",
                id_token(&[("iss", json!(ISSUER.replace(":443", "")))]),
                StatusCode::BAD_REQUEST,
                "Missing or non-matching iss/sub claims in JWT",
            ),
            (
                "iss missing",
                id_token(&[("iss", Value::Null)]),
                StatusCode::BAD_REQUEST,
                "Missing 'iss' claim in subject_token JWT",
            ),
            (
                "aud missing",
                id_token(&[("aud", Value::Null)]),
                StatusCode::UNAUTHORIZED,
                "Missing 'aud' claim in subject_token JWT",
            ),
            (
                "selected_roleid missing",
                id_token(&[("selected_roleid", Value::Null)]),
                StatusCode::UNAUTHORIZED,
                "selected_roleid is missing in your token",
            ),
            (
                "sub missing",
                id_token(&[("sub", Value::Null)]),
                StatusCode::BAD_REQUEST,
                "Missing 'sub' claim in subject_token JWT",
            ),
            (
                "signed by a key CIS2 never published, under its kid",
                sign(
                    &id_header,
                    &id_claims(&[]),
                    keys::rogue_key().encoding_key(),
                ),
                StatusCode::UNAUTHORIZED,
                "JWT signature verification failed due to invalid token",
            ),
            (
                "a kid CIS2 does not publish",
                sign(
                    &rsa_header(Algorithm::RS256, UNKNOWN_KID),
                    &id_claims(&[]),
                    keys::rogue_key().encoding_key(),
                ),
                StatusCode::UNAUTHORIZED,
                "Invalid 'kid' header in subject_token JWT - no matching public key",
            ),
            (
                "kid missing",
                sign(&Header::new(Algorithm::RS256), &id_claims(&[]), provider),
                StatusCode::BAD_REQUEST,
                "Missing 'kid' header in subject_token JWT",
            ),
            (
                "typ missing",
                sign(
                    &Header {
                        typ: None,
                        ..id_header.clone()
                    },
                    &id_claims(&[]),
                    provider,
                ),
                StatusCode::BAD_REQUEST,
                "Invalid 'typ' header in subject_token JWT - must be 'JWT'",
            ),
            (
                "HMAC",
                sign(
                    &rsa_header(Algorithm::HS256, PROVIDER_KID),
                    &id_claims(&[]),
                    &hmac_key(b"guessable"),
                ),
                StatusCode::BAD_REQUEST,
                "Unsupported JWT Algorithm",
            ),
            (
                "alg none",
                unsigned(
                    json!({"alg": "none", "typ": "JWT", "kid": PROVIDER_KID}),
                    &id_claims(&[]),
                ),
                StatusCode::BAD_REQUEST,
                "Unsupported JWT Algorithm",
            ),
            (
                "not a JWT",
                "a.b".into(),
                StatusCode::BAD_REQUEST,
                "Malformed JWT in subject_token",
            ),
        ];
        for (case, subject, status, description) in cases {
            let result = exchange(&sim, &assertion(&sim, &[]), &subject).await;
            assert_eq!(result.0, status, "{case}: {}", result.1);
            assert_refused(&result, status, "invalid_request", description);
        }

        // RS512 ID tokens verify too: APIM accepts both algorithms from CIS2.
        let rs512 = sign(
            &rsa_header(Algorithm::RS512, PROVIDER_KID),
            &id_claims(&[]),
            provider,
        );
        assert_eq!(
            exchange(&sim, &assertion(&sim, &[]), &rs512).await.0,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn the_form_itself_is_checked() {
        let sim = start(options()).await;
        let form = || exchange_form(&assertion(&sim, &[]), &id_token(&[]));
        let without = |name: &str| {
            let mut form = form();
            form.retain(|(n, _)| *n != name);
            form
        };
        let with = |name: &'static str, value: &str| {
            let mut form = without(name);
            form.push((name, value.into()));
            form
        };
        let assertion_type =
            format!("Missing or invalid client_assertion_type - must be '{JWT_BEARER}'");
        let subject_type =
            format!("missing or invalid subject_token_type - must be '{ID_TOKEN_TYPE}'");
        let cases: Vec<(Form, StatusCode, &str, &str)> = vec![
            (
                with("client_assertion_type", "invalid"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &assertion_type,
            ),
            (
                without("client_assertion_type"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &assertion_type,
            ),
            (
                with("subject_token_type", ACCESS_TOKEN_TYPE),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &subject_type,
            ),
            (
                without("subject_token_type"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &subject_type,
            ),
            (
                without("client_assertion"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing client_assertion",
            ),
            (
                without("subject_token"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Missing subject_token",
            ),
            (
                without("grant_type"),
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "grant_type is invalid",
            ),
            (
                with("grant_type", "password"),
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type is invalid",
            ),
            (
                with("grant_type", "client_credentials"),
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "grant_type is invalid",
            ),
        ];
        for (form, status, error, description) in cases {
            assert_refused(&post(&sim, &form).await, status, error, description);
        }
        let mut twice = form();
        twice.push(("subject_token", id_token(&[])));
        assert_refused(
            &post(&sim, &twice).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "subject_token is given more than once",
        );
    }

    #[tokio::test]
    async fn anything_but_a_form_is_415() {
        let sim = start(options()).await;
        let form = exchange_form(&assertion(&sim, &[]), &id_token(&[]));
        let as_json: Map<String, Value> = form
            .iter()
            .map(|(n, v)| ((*n).to_string(), json!(v)))
            .collect();
        let response = http()
            .post(sim.token_url())
            .json(&as_json)
            .send()
            .await
            .expect("answers");
        let status = response.status();
        let body: Value = response.json().await.expect("JSON");
        assert_refused(
            &(status, body),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
            "Content-Type must be application/x-www-form-urlencoded",
        );

        let encoded = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter().map(|(n, v)| (*n, v.as_str())))
            .finish();
        for content_type in [None, Some("text/plain")] {
            let mut request = http().post(sim.token_url()).body(encoded.clone());
            if let Some(content_type) = content_type {
                request = request.header(header::CONTENT_TYPE, content_type);
            }
            let response = request.send().await.expect("answers");
            assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        }
        // A charset parameter is still a form.
        let response = http()
            .post(sim.token_url())
            .header(
                header::CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=UTF-8",
            )
            .body(encoded)
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!((sim.token_calls(), sim.exchange_calls()), (4, 1));
        assert_eq!(sim.seen_jtis(), 1);
    }

    #[tokio::test]
    async fn refresh_tokens_are_single_use_and_a_reuse_revokes_the_family() {
        let sim = start(options()).await;
        let first = exchanged(&sim, &[(AAL_CLAIM, json!("2"))]).await;

        let (status, second) = refresh(&sim, field(&first, "refresh_token"), APP, SECRET).await;
        assert_eq!(status, StatusCode::OK, "{second}");
        assert_all_strings(&second);
        assert_eq!(keys_of(&second), names(PAIR_FIELDS));
        assert_eq!(second["refresh_count"], "1");
        assert_eq!(second["expires_in"], "599");
        assert_ne!(second["access_token"], first["access_token"]);
        assert_ne!(second["refresh_token"], first["refresh_token"]);
        let info = sim
            .introspect(field(&second, "access_token"))
            .expect("live");
        assert_eq!(
            (info.aal, info.scopes),
            (2, vec![scope(2, PDS)]),
            "a refresh keeps the level"
        );

        let (status, third) = refresh(&sim, field(&second, "refresh_token"), APP, SECRET).await;
        assert_eq!(status, StatusCode::OK, "{third}");
        assert_eq!(third["refresh_count"], "2");

        // The first refresh token again: someone else holds the family, so all of it goes.
        let reuse = refresh(&sim, field(&first, "refresh_token"), APP, SECRET).await;
        assert_refused(
            &reuse,
            StatusCode::UNAUTHORIZED,
            "invalid_grant",
            "refresh_token is invalid",
        );
        let latest = refresh(&sim, field(&third, "refresh_token"), APP, SECRET).await;
        assert_refused(
            &latest,
            StatusCode::UNAUTHORIZED,
            "invalid_grant",
            "refresh_token is invalid",
        );
        for body in [&first, &second, &third] {
            assert_eq!(sim.introspect(field(body, "access_token")), None);
        }
        assert_eq!(
            (sim.token_calls(), sim.exchange_calls(), sim.refresh_calls()),
            (5, 1, 4)
        );
    }

    #[tokio::test]
    async fn two_concurrent_refreshes_log_the_user_out() {
        let sim = start(options()).await;
        let first = exchanged(&sim, &[]).await;
        let token = field(&first, "refresh_token");
        let (a, b) = tokio::join!(
            refresh(&sim, token, APP, SECRET),
            refresh(&sim, token, APP, SECRET)
        );
        let (winner, loser) = if a.0 == StatusCode::OK {
            (a, b)
        } else {
            (b, a)
        };
        assert_eq!(winner.0, StatusCode::OK, "{}", winner.1);
        assert_eq!(loser.0, StatusCode::UNAUTHORIZED, "{}", loser.1);
        assert_eq!(loser.1["error"], "invalid_grant");
        let after = refresh(&sim, field(&winner.1, "refresh_token"), APP, SECRET).await;
        assert_eq!(after.0, StatusCode::UNAUTHORIZED);
        assert_eq!(sim.introspect(field(&winner.1, "access_token")), None);
    }

    #[tokio::test]
    async fn refresh_needs_the_api_key_and_its_secret() {
        let sim = start(options()).await;
        let pair = exchanged(&sim, &[]).await;
        let token = field(&pair, "refresh_token");
        let unauthorized =
            |description: &'static str| (StatusCode::UNAUTHORIZED, "invalid_request", description);
        let cases = [
            (
                APP,
                "wrong-secret",
                unauthorized("client_secret is invalid"),
            ),
            (APP, "", unauthorized("client_secret is missing")),
            (
                "unknown",
                SECRET,
                unauthorized("client_id or client_secret is invalid"),
            ),
            (
                "",
                SECRET,
                unauthorized("client_id or client_secret is invalid"),
            ),
            (
                NO_KEYS,
                "anything",
                unauthorized("client_secret is invalid"),
            ),
            // Another app's token: refused, but not spent.
            (
                EPS_ONLY,
                SECRET,
                (
                    StatusCode::UNAUTHORIZED,
                    "invalid_grant",
                    "refresh_token is invalid",
                ),
            ),
        ];
        for (client_id, secret, (status, error, description)) in cases {
            let result = refresh(&sim, token, client_id, secret).await;
            assert_refused(&result, status, error, description);
        }
        assert_refused(
            &refresh(&sim, "", APP, SECRET).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "refresh_token is missing",
        );
        assert_refused(
            &refresh(&sim, "made-up", APP, SECRET).await,
            StatusCode::UNAUTHORIZED,
            "invalid_grant",
            "refresh_token is invalid",
        );
        let (status, body) = refresh(&sim, token, APP, SECRET).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["refresh_count"], "1");
    }

    #[tokio::test]
    async fn token_families_expire_on_apims_clock_and_refreshes_do_not_extend_them() {
        let clock = Arc::new(ManualClock::new(SystemTime::now()));
        let sim = ApimSimulator::start_with_clock(listener().await, options(), clock.clone())
            .await
            .expect("starts");
        // APIM's clock starts a moment behind the wall clock the assertion is dated by.
        let early = assertion(&sim, &[("exp", json!(now() + 240))]);
        let (status, first) = exchange(&sim, &early, &id_token(&[])).await;
        assert_eq!(status, StatusCode::OK, "{first}");
        let access = field(&first, "access_token");
        clock.advance(Duration::from_secs(598));
        assert!(sim.introspect(access).is_some());
        clock.advance(Duration::from_secs(2));
        assert_eq!(sim.introspect(access), None, "access tokens live 599 s");

        clock.advance(Duration::from_secs(3600 - 600));
        let (status, second) = refresh(&sim, field(&first, "refresh_token"), APP, SECRET).await;
        assert_eq!(status, StatusCode::OK, "{second}");
        assert_eq!(second["refresh_token_expires_in"], "39600");

        clock.advance(Duration::from_secs(11 * 3600));
        let result = refresh(&sim, field(&second, "refresh_token"), APP, SECRET).await;
        assert_refused(
            &result,
            StatusCode::UNAUTHORIZED,
            "invalid_grant",
            "refresh_token is invalid",
        );
    }

    #[tokio::test]
    async fn revoking_a_user_drops_only_their_refresh_tokens() {
        let sim = start(options()).await;
        let mine = exchanged(&sim, &[]).await;
        let theirs = exchanged(&sim, &[("sub", json!("656005750108"))]).await;
        sim.revoke_for_uid(STEP_UP_USER);
        let result = refresh(&sim, field(&mine, "refresh_token"), APP, SECRET).await;
        assert_refused(
            &result,
            StatusCode::UNAUTHORIZED,
            "invalid_grant",
            "refresh_token is invalid",
        );
        let (status, _) = refresh(&sim, field(&theirs, "refresh_token"), APP, SECRET).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn faults_break_the_token_endpoint_and_count_calls() {
        let sim = start(options()).await;
        sim.set_fault(ApimFault::ServerError);
        let result = exchange(&sim, &assertion(&sim, &[]), &id_token(&[])).await;
        assert_refused(
            &result,
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "simulated APIM failure",
        );
        sim.clear_faults();

        sim.set_fault(ApimFault::UnauthorizedClient);
        let result = exchange(&sim, &assertion(&sim, &[]), &id_token(&[])).await;
        assert_eq!(result.0, StatusCode::UNAUTHORIZED);
        assert_eq!(result.1["error"], "unauthorized_client");
        sim.clear_faults();
        assert_eq!(sim.seen_jtis(), 0, "a faulted call checks nothing");
        assert_eq!(
            exchange(&sim, &assertion(&sim, &[]), &id_token(&[]))
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!((sim.token_calls(), sim.exchange_calls()), (3, 3));

        // Slow: a client with a short timeout gives up; without the fault it does not.
        sim.set_fault(ApimFault::Slow(Duration::from_secs(60)));
        sim.set_fault(ApimFault::Slow(Duration::from_secs(30)));
        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(200))
            .build()
            .expect("a client builds");
        let error = impatient
            .post(sim.token_url())
            .form(&exchange_form(&assertion(&sim, &[]), &id_token(&[])))
            .send()
            .await
            .expect_err("the response is held back past the timeout");
        assert!(error.is_timeout());
        sim.clear_faults();
        assert_eq!(
            exchange(&sim, &assertion(&sim, &[]), &id_token(&[]))
                .await
                .0,
            StatusCode::OK
        );
    }

    // -----------------------------------------------------------------------------------------
    // Combined pattern

    async fn start_combined(cis2: &Cis2Simulator) -> ApimSimulator {
        start(ApimOptions {
            apps: apps(),
            ..ApimOptions::for_cis2(cis2)
        })
        .await
    }

    fn location(response: &reqwest::Response) -> Option<url::Url> {
        let value = response.headers().get(header::LOCATION)?.to_str().ok()?;
        url::Url::parse(value).ok()
    }

    fn query_of(url: &url::Url) -> HashMap<String, String> {
        url.query_pairs().into_owned().collect()
    }

    fn combined_authorize_url(apim: &ApimSimulator, changes: &[(&str, &str)]) -> String {
        let mut params: Vec<(&str, &str)> = vec![
            ("response_type", "code"),
            ("client_id", APP),
            ("redirect_uri", REDIRECT),
            ("state", APP_STATE),
        ];
        for (name, value) in changes {
            params.retain(|(n, _)| n != name);
            if !value.is_empty() {
                params.push((name, value));
            }
        }
        let mut url = url::Url::parse(&apim.authorize_url()).expect("a URL");
        url.query_pairs_mut().extend_pairs(params);
        url.to_string()
    }

    async fn follow(url: &str) -> reqwest::Response {
        http().get(url).send().await.expect("answers")
    }

    /// Browser hops from APIM's authorize to the app's redirect URI: its query.
    async fn sign_in_combined(
        apim: &ApimSimulator,
        cis2: &Cis2Simulator,
        changes: &[(&str, &str)],
    ) -> HashMap<String, String> {
        let to_cis2 = follow(&combined_authorize_url(apim, changes)).await;
        assert_eq!(to_cis2.status(), StatusCode::FOUND);
        let cis2_url = location(&to_cis2).expect("a Location");
        assert!(
            cis2_url
                .as_str()
                .starts_with(&format!("{}{REALM}/authorize?", cis2.base_url())),
            "{cis2_url}"
        );
        let cis2_query = query_of(&cis2_url);
        assert_ne!(cis2_query.get("client_id").map(String::as_str), Some(APP));
        assert_ne!(cis2_query.get("state").map(String::as_str), Some(APP_STATE));
        assert_eq!(cis2_query.get("prompt").map(String::as_str), Some("login"));

        let to_apim = follow(cis2_url.as_str()).await;
        assert_eq!(to_apim.status(), StatusCode::FOUND);
        let callback = location(&to_apim).expect("a Location");
        assert!(
            callback
                .as_str()
                .starts_with(&format!("{}/oauth2/callback?", apim.base_url())),
            "{callback}"
        );
        let to_app = follow(callback.as_str()).await;
        assert_eq!(to_app.status(), StatusCode::FOUND);
        let back = location(&to_app).expect("a Location");
        assert!(back.as_str().starts_with(REDIRECT), "{back}");
        let query = query_of(&back);
        assert_eq!(query.get("state").map(String::as_str), Some(APP_STATE));
        query
    }

    async fn redeem(
        apim: &ApimSimulator,
        code: &str,
        client_id: &str,
        secret: &str,
        redirect_uri: &str,
    ) -> (StatusCode, Value) {
        post(
            apim,
            &[
                ("grant_type", "authorization_code".into()),
                ("code", code.into()),
                ("redirect_uri", redirect_uri.into()),
                ("client_id", client_id.into()),
                ("client_secret", secret.into()),
            ],
        )
        .await
    }

    #[tokio::test]
    async fn the_combined_pattern_signs_in_through_cis2_and_scopes_follow_the_aal() {
        let cis2 = start_cis2().await;
        let apim = start_combined(&cis2).await;

        let query = sign_in_combined(
            &apim,
            &cis2,
            &[
                ("acr_values", "AAL2_OR_AAL3_ANY"),
                ("login_hint", STEP_UP_USER),
                ("sim_authenticator", "PASSKEY"),
            ],
        )
        .await;
        let code = query.get("code").expect("an APIM code");
        let (status, body) = redeem(&apim, code, APP, SECRET, REDIRECT).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_all_strings(&body);
        assert_eq!(
            keys_of(&body),
            names(PAIR_FIELDS),
            "no ID token, no identity"
        );
        assert_eq!(
            (body["expires_in"].as_str(), body["refresh_count"].as_str()),
            (Some("599"), Some("0"))
        );
        let info = apim.introspect(field(&body, "access_token")).expect("live");
        assert_eq!((info.aal, info.scopes), (2, vec![scope(2, PDS)]));
        assert_eq!(info.uid, STEP_UP_USER);

        let replay = redeem(&apim, code, APP, SECRET, REDIRECT).await;
        assert_refused(
            &replay,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "code is invalid",
        );

        let (status, refreshed) = refresh(&apim, field(&body, "refresh_token"), APP, SECRET).await;
        assert_eq!(status, StatusCode::OK, "{refreshed}");
        assert_eq!(refreshed["refresh_count"], "1");

        // No acr_values: AAL3_ANY, so the smartcard, and the EPS scope.
        let query = sign_in_combined(&apim, &cis2, &[("login_hint", STEP_UP_USER)]).await;
        let (status, body) = redeem(
            &apim,
            query.get("code").expect("a code"),
            APP,
            SECRET,
            REDIRECT,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let info = apim.introspect(field(&body, "access_token")).expect("live");
        assert_eq!(
            (info.aal, info.scopes),
            (3, vec![scope(3, PDS), scope(3, EPS)])
        );
        assert_eq!(apim.exchange_calls(), 0);
    }

    #[tokio::test]
    async fn combined_codes_are_redeemed_only_as_issued() {
        let cis2 = start_cis2().await;
        let apim = start_combined(&cis2).await;
        let sign_in = |changes: Vec<(&'static str, &'static str)>| {
            let (apim, cis2) = (apim.clone(), cis2.clone());
            async move {
                let mut changes = changes;
                changes.push(("login_hint", STEP_UP_USER));
                sign_in_combined(&apim, &cis2, &changes)
                    .await
                    .remove("code")
                    .expect("a code")
            }
        };
        let code = sign_in(vec![]).await;
        let refusals = [
            (
                APP,
                "wrong",
                REDIRECT,
                StatusCode::UNAUTHORIZED,
                "invalid_request",
                "client_secret is invalid",
            ),
            (
                APP,
                SECRET,
                "https://elsewhere.test/cb",
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "redirect_uri is invalid",
            ),
            (
                APP,
                SECRET,
                "",
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "redirect_uri is missing",
            ),
        ];
        for (client_id, secret, redirect_uri, status, error, description) in refusals {
            let result = redeem(&apim, &code, client_id, secret, redirect_uri).await;
            assert_refused(&result, status, error, description);
        }
        // Those never reached the code; another app's redemption spends it.
        let other = redeem(&apim, &code, EPS_ONLY, SECRET, REDIRECT).await;
        assert_refused(
            &other,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "code is invalid",
        );
        let late = redeem(&apim, &code, APP, SECRET, REDIRECT).await;
        assert_refused(
            &late,
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "code is invalid",
        );
        assert_refused(
            &redeem(&apim, "", APP, SECRET, REDIRECT).await,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "authorization_code is missing",
        );

        // An AAL3-only app and an AAL2 sign-in: a code, but no token.
        let query = {
            let url = combined_authorize_url(
                &apim,
                &[
                    ("client_id", EPS_ONLY),
                    ("acr_values", "AAL2_OR_AAL3_ANY"),
                    ("login_hint", STEP_UP_USER),
                    ("sim_authenticator", "PASSKEY"),
                ],
            );
            let mut next = follow(&url).await;
            while let Some(to) = location(&next).filter(|u| !u.as_str().starts_with(REDIRECT)) {
                next = follow(to.as_str()).await;
            }
            query_of(&location(&next).expect("back at the app"))
        };
        let result = redeem(
            &apim,
            query.get("code").expect("a code"),
            EPS_ONLY,
            SECRET,
            REDIRECT,
        )
        .await;
        assert_eq!(result.0, StatusCode::UNAUTHORIZED, "{}", result.1);
        assert_eq!(result.1["error"], "unauthorized_client");
    }

    #[tokio::test]
    async fn bad_authorization_requests_get_a_page_never_a_redirect() {
        let cis2 = start_cis2().await;
        let apim = start_combined(&cis2).await;
        let cases = [
            (vec![("client_id", "unknown")], StatusCode::UNAUTHORIZED),
            (vec![("client_id", "")], StatusCode::UNAUTHORIZED),
            (
                vec![("redirect_uri", "https://evil.test/cb")],
                StatusCode::BAD_REQUEST,
            ),
            (vec![("redirect_uri", "")], StatusCode::BAD_REQUEST),
            (vec![("state", "")], StatusCode::BAD_REQUEST),
        ];
        for (changes, status) in cases {
            let response = follow(&combined_authorize_url(&apim, &changes)).await;
            assert_eq!(response.status(), status, "{changes:?}");
            assert!(response.headers().get(header::LOCATION).is_none());
            let html = response.text().await.expect("a page");
            assert!(html.contains("id=\"error-message\""), "{changes:?}");
        }

        let response = follow(&combined_authorize_url(
            &apim,
            &[("response_type", "token")],
        ))
        .await;
        assert_eq!(response.status(), StatusCode::FOUND);
        let query = query_of(&location(&response).expect("back at the app"));
        assert_eq!(
            query.get("error").map(String::as_str),
            Some("unsupported_response_type")
        );
        assert_eq!(query.get("state").map(String::as_str), Some(APP_STATE));

        let response = follow(&format!(
            "{}/oauth2/callback?state=made-up&code=x",
            apim.base_url()
        ))
        .await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert!(response.headers().get(header::LOCATION).is_none());

        let standalone = start(options()).await;
        let response = follow(&combined_authorize_url(&standalone, &[])).await;
        assert_eq!(response.status(), StatusCode::NOT_IMPLEMENTED);
    }

    #[tokio::test]
    async fn cis2_refusals_and_bad_id_tokens_go_back_to_the_app_as_errors() {
        let cis2 = start_cis2().await;
        let apim = start_combined(&cis2).await;
        let ends_with_error = |changes: Vec<(&'static str, &'static str)>| {
            let apim = apim.clone();
            async move {
                let mut next = follow(&combined_authorize_url(&apim, &changes)).await;
                while let Some(to) = location(&next).filter(|u| !u.as_str().starts_with(REDIRECT)) {
                    next = follow(to.as_str()).await;
                }
                let query = query_of(&location(&next).expect("back at the app"));
                assert_eq!(query.get("state").map(String::as_str), Some(APP_STATE));
                assert_eq!(query.get("code"), None, "{query:?}");
                query.get("error").cloned().unwrap_or_default()
            }
        };
        // A passkey-only user cannot meet AAL3_ANY: CIS2 says access_denied, APIM passes it on.
        assert_eq!(
            ends_with_error(vec![("login_hint", PASSKEY_ONLY)]).await,
            "access_denied"
        );

        cis2.set_fault(crate::sim::Fault::Expired);
        assert_eq!(
            ends_with_error(vec![("login_hint", STEP_UP_USER)]).await,
            "access_denied"
        );
        cis2.clear_faults();
        cis2.set_fault(crate::sim::Fault::BadSignature);
        assert_eq!(
            ends_with_error(vec![("login_hint", STEP_UP_USER)]).await,
            "access_denied"
        );
        cis2.clear_faults();
        cis2.set_fault(crate::sim::Fault::AalMissing);
        assert_eq!(
            ends_with_error(vec![("login_hint", STEP_UP_USER)]).await,
            "access_denied"
        );
        cis2.clear_faults();
        cis2.set_fault(crate::sim::Fault::TokenServerError);
        assert_eq!(
            ends_with_error(vec![("login_hint", STEP_UP_USER)]).await,
            "server_error"
        );
        cis2.clear_faults();

        // Two APIM simulators on one CIS2: each signs in as its own client.
        let other = start_combined(&cis2).await;
        let query = sign_in_combined(&other, &cis2, &[("login_hint", STEP_UP_USER)]).await;
        assert!(query.contains_key("code"));
    }

    #[tokio::test]
    async fn shutdown_stops_the_server() {
        let sim = start(options()).await;
        let url = sim.token_url();
        assert!(http().post(&url).send().await.is_ok());
        sim.shutdown();
        let mut stopped = false;
        for _ in 0..500 {
            // A fresh client each time, so no pooled connection hides the closed listener.
            if reqwest::Client::new().post(&url).send().await.is_err() {
                stopped = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(stopped);
    }

    #[tokio::test]
    async fn start_refuses_api_lists_it_cannot_scope() {
        for apis in [
            vec!["".to_string()],
            vec!["pds@aal2".into()],
            vec!["a b".into()],
            vec![AAL3_ONLY_SUFFIX.into()],
        ] {
            let options = ApimOptions {
                apps: vec![ApimApp {
                    api_key: APP.into(),
                    apis: apis.clone(),
                    ..ApimApp::default()
                }],
                ..ApimOptions::default()
            };
            let error = ApimSimulator::start(listener().await, options)
                .await
                .expect_err("refused");
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{apis:?}");
        }
    }

    // -----------------------------------------------------------------------------------------
    // Pure functions

    #[test]
    fn api_lists_become_scopes_at_both_levels_or_aal3_only() {
        let apis = vec![
            PDS.to_string(),
            format!("{EPS}@aal3"),
            "summary-care-record".into(),
        ];
        let all = app_scopes(&apis).expect("valid");
        assert_eq!(
            all,
            vec![
                scope(2, PDS),
                scope(3, PDS),
                scope(3, EPS),
                scope(2, "summary-care-record"),
                scope(3, "summary-care-record"),
            ]
        );
        let cases = [
            (
                Some(Aal::Aal3),
                vec![
                    scope(3, PDS),
                    scope(3, EPS),
                    scope(3, "summary-care-record"),
                ],
            ),
            (
                Some(Aal::Aal2),
                vec![scope(2, PDS), scope(2, "summary-care-record")],
            ),
            (Some(Aal::Aal1), vec![]),
            (None, vec![]),
        ];
        for (aal, want) in cases {
            assert_eq!(scopes_at(&all, aal), want, "{aal:?}");
        }
        assert_eq!(app_scopes(&[]), Ok(vec![]));
        for bad in ["", "@aal3", "pds@aal2", "p d s", "pds:aal3"] {
            assert!(app_scopes(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn jwts_parse_only_with_three_parts_and_json_objects() {
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let good = format!(
            "{}.{}.sig",
            b64("{\"alg\":\"RS512\"}"),
            b64("{\"sub\":\"x\"}")
        );
        let jwt = parse_jwt(&good).expect("parses");
        assert_eq!(str_of(&jwt.header, "alg"), Some("RS512"));
        assert_eq!(str_of(&jwt.claims, "sub"), Some("x"));
        let bad = [
            String::new(),
            "a.b".into(),
            format!("{good}.extra"),
            format!("{}.{}.s", b64("[1]"), b64("{}")),
            format!("{}.{}.s", b64("{}"), b64("\"text\"")),
            format!("!!.{}.s", b64("{}")),
        ];
        for token in bad {
            assert!(parse_jwt(&token).is_none(), "{token}");
        }
    }

    #[test]
    fn audiences_match_exactly() {
        let claims = |aud: Value| object(changed(json!({}), &[("aud", aud)]));
        let url = "http://127.0.0.1:1/oauth2/token";
        let cases = [
            (json!(url), true),
            (json!([url]), true),
            (json!(["other", url]), true),
            (json!(format!("{url}/")), false),
            (json!(url.to_uppercase()), false),
            (json!([]), false),
            (json!(7), false),
            (Value::Null, false),
        ];
        for (aud, want) in cases {
            assert_eq!(audience_contains(&claims(aud.clone()), url), want, "{aud}");
        }
        assert!(!audience_present(&claims(json!(""))));
        assert!(!audience_present(&claims(json!([""]))));
        assert!(audience_present(&claims(json!(["x"]))));
    }

    #[test]
    fn exp_must_be_an_integer_in_the_future() {
        let at = |exp: Value| object(changed(json!({}), &[("exp", exp)]));
        let now = 1_000_000;
        let cases = [
            (json!(now + 1), Ok(now + 1)),
            (
                json!(now),
                Err("Invalid 'exp' claim in t JWT - JWT has expired"),
            ),
            (
                json!(now as f64 + 10.5),
                Err("Invalid 'exp' claim in t JWT - must be an integer"),
            ),
            (
                json!("1000010"),
                Err("Invalid 'exp' claim in t JWT - must be an integer"),
            ),
            (Value::Null, Err("Missing 'exp' claim in t JWT")),
        ];
        for (exp, want) in cases {
            let got = check_exp(&at(exp.clone()), "t", now).map_err(|e| e.description);
            assert_eq!(got, want.map_err(str::to_string), "{exp}");
        }
    }

    #[test]
    fn exchanged_subjects_need_a_user_and_a_role() {
        let claims = |changes: &[(&str, Value)]| {
            changed(
                json!({"sub": STEP_UP_USER, "selected_roleid": ROLE, (AAL_CLAIM): "2"}),
                changes,
            )
            .as_object()
            .cloned()
            .unwrap_or_default()
        };
        assert_eq!(
            exchanged_subject(&claims(&[])),
            Ok(Subject {
                uid: STEP_UP_USER.into(),
                aal: Some(Aal::Aal2)
            })
        );
        assert_eq!(
            exchanged_subject(&claims(&[(AAL_CLAIM, json!("two"))])).map(|s| s.aal),
            Ok(None)
        );
        let no_role = exchanged_subject(&claims(&[("selected_roleid", json!(""))]));
        assert_eq!(
            no_role.map_err(|e| (e.status, e.description)),
            Err((
                StatusCode::UNAUTHORIZED,
                "selected_roleid is missing in your token".to_string()
            ))
        );
        assert!(exchanged_subject(&claims(&[("sub", Value::Null)])).is_err());
    }

    #[test]
    fn apps_and_options_debug_hide_the_secret() {
        let debug = format!("{:?}", options());
        assert!(!debug.contains(SECRET));
        assert!(debug.contains("[redacted]"));
        let set: HashSet<_> = [ApimFault::ServerError, ApimFault::ServerError].into();
        assert_eq!(set.len(), 1);
    }
}
