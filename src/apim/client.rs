//! The APIM authorisation server's token endpoint, as `NHSDigital/identity-service-api` (the
//! APIM proxy itself) implements it:
//!
//! - token exchange (RFC 8693, separate pattern): the CIS2 ID token plus a fresh RS512 client
//!   assertion (`private_key_jwt`);
//! - refresh: `client_id` + `client_secret` form fields (APIM's `Flow.PostRefreshToken` checks
//!   the secret, with no client-assertion alternative, also for exchanged tokens); refresh tokens
//!   are single-use;
//! - authorization code (combined pattern): `client_id` + `client_secret`.
//!
//! Every call is one request: nothing is retried here (a retried token exchange would need a new
//! assertion anyway, and a retried refresh could redeem a refresh token twice). APIM writes its
//! numbers as JSON strings (`"expires_in": "599"`); both forms are read.

use crate::clock::Clock;
use crate::config::ApimConfig;
use crate::error::BrokerError;
use crate::metrics::{self, Outcome, Upstream};
use crate::secret::Secret;
use crate::signing::{MAX_ASSERTION_LIFETIME, SigningKeys};
use reqwest::RequestBuilder;
use serde::Deserialize;
use serde_json::Value;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tracing::Instrument;
use url::Url;

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// APIM's token answers are well under a kilobyte; anything this big is not one.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest piece of APIM's own text carried into an error.
const MAX_APIM_TEXT: usize = 300;
/// Shorter values cannot be told apart from ordinary words, so they are not scrubbed from text.
const MIN_SCRUBBED_LEN: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ApimError {
    /// Network failure, timeout, 5xx, 429, or an answer that cannot be read: safe to retry.
    #[error("APIM is unavailable: {0}")]
    Unavailable(String),
    /// A 4xx with APIM's OAuth error (`error`, `error_description`): the configuration or the
    /// user must change something. `description` is APIM's, cleaned and free of our secrets.
    #[error("APIM refused the request (HTTP {status}): {error}")]
    Rejected {
        status: u16,
        error: String,
        description: String,
    },
    /// The refresh token is no longer valid (used, expired or revoked).
    #[error("APIM refused the refresh token: it is no longer valid")]
    InvalidGrant,
    /// The client cannot make this call as configured (no client secret, no authorize URL).
    #[error("the APIM client is misconfigured: {0}")]
    Misconfigured(String),
}

impl From<ApimError> for BrokerError {
    fn from(e: ApimError) -> Self {
        match e {
            ApimError::Unavailable(cause) => BrokerError::ApimUnavailable(cause),
            ApimError::Rejected {
                error, description, ..
            } => BrokerError::UpstreamRejected {
                upstream: "apim",
                error,
                description,
            },
            // Without a valid refresh token (and nothing else to exchange) the user must sign in.
            ApimError::InvalidGrant => BrokerError::SessionInvalid,
            ApimError::Misconfigured(cause) => BrokerError::Internal(cause),
        }
    }
}

/// What APIM issued. `Debug` shows no token.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub access_token: Secret<String>,
    pub token_type: String,
    pub expires_at: SystemTime,
    pub refresh_token: Option<Secret<String>>,
    pub refresh_expires_at: Option<SystemTime>,
    pub scope: Option<String>,
}

/// The client of APIM's `/oauth2/token` (and the combined pattern's `/oauth2/authorize` URL).
/// Cheap to clone.
#[derive(Clone)]
pub struct ApimClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    token_url: Url,
    authorize_url: Option<Url>,
    api_key: String,
    client_secret: Option<Secret<String>>,
    http_timeout: Duration,
    /// Signs client assertions; only the separate pattern's token exchange needs them.
    keys: Option<Arc<SigningKeys>>,
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for ApimClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApimClient")
            .field("token_url", &self.inner.token_url.as_str())
            .field("api_key", &self.inner.api_key)
            .field("client_secret", &self.inner.client_secret.is_some())
            .finish_non_exhaustive()
    }
}

/// Which grant a call uses: decides the form and how a refusal is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    TokenExchange,
    RefreshToken,
    AuthorizationCode,
}

impl Grant {
    fn name(self) -> &'static str {
        match self {
            Grant::TokenExchange => "token_exchange",
            Grant::RefreshToken => "refresh_token",
            Grant::AuthorizationCode => "authorization_code",
        }
    }
}

impl ApimClient {
    /// Builds the HTTP client (no redirects, `http_timeout` per request); no network I/O.
    pub fn new(
        config: &ApimConfig,
        keys: Option<Arc<SigningKeys>>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, ApimError> {
        if config.api_key.trim().is_empty() {
            return Err(ApimError::Misconfigured("apim.api_key is empty".into()));
        }
        if config.http_timeout.is_zero() {
            return Err(ApimError::Misconfigured(
                "apim.http_timeout is zero: give it 15 to 30 seconds".into(),
            ));
        }
        let http = reqwest::Client::builder()
            // APIM's token endpoint never redirects; following one would send an ID token or a
            // client secret somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.http_timeout)
            .connect_timeout(config.http_timeout)
            .user_agent(concat!("cis2-session-broker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApimError::Misconfigured(format!("cannot build the HTTP client: {e}")))?;
        Ok(ApimClient {
            inner: Arc::new(Inner {
                http,
                token_url: config.token_url.clone(),
                authorize_url: config.authorize_url.clone(),
                api_key: config.api_key.clone(),
                client_secret: config.client_secret.clone(),
                http_timeout: config.http_timeout,
                keys,
                clock,
            }),
        })
    }

    pub fn token_url(&self) -> &Url {
        &self.inner.token_url
    }

    pub fn http_timeout(&self) -> Duration {
        self.inner.http_timeout
    }

    /// Whether refresh tokens can be redeemed: APIM wants the client secret for that.
    pub fn can_refresh(&self) -> bool {
        self.inner.client_secret.is_some()
    }

    /// RFC 8693: exchanges a CIS2 ID token for an APIM access token (separate pattern).
    pub async fn exchange_id_token(&self, id_token: &str) -> Result<TokenGrant, ApimError> {
        let inner = &self.inner;
        let keys = inner.keys.as_ref().ok_or_else(|| {
            ApimError::Misconfigured(
                "token exchange signs a client assertion: add [[signing.keys]]".into(),
            )
        })?;
        let assertion = keys
            .client_assertion(
                &inner.api_key,
                inner.token_url.as_str(),
                inner.clock.now(),
                MAX_ASSERTION_LIFETIME,
            )
            .map_err(|e| ApimError::Misconfigured(format!("client assertion: {e}")))?;
        let form = [
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token_type", ID_TOKEN_TYPE),
            ("subject_token", id_token),
            ("client_assertion_type", JWT_BEARER),
            ("client_assertion", assertion.expose().as_str()),
        ];
        self.send(Grant::TokenExchange, &form, &[id_token, assertion.expose()])
            .await
    }

    /// Redeems a (single-use) refresh token.
    pub async fn refresh(&self, refresh_token: &str) -> Result<TokenGrant, ApimError> {
        let secret = self.client_secret("refreshing a token")?;
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", self.inner.api_key.as_str()),
            ("client_secret", secret),
        ];
        self.send(Grant::RefreshToken, &form, &[refresh_token, secret])
            .await
    }

    /// Combined pattern: where to send the user's browser. APIM runs CIS2 itself.
    pub fn authorization_url(
        &self,
        redirect_uri: &str,
        state: &str,
        acr_values: &str,
    ) -> Result<Url, ApimError> {
        let mut url = self.inner.authorize_url.clone().ok_or_else(|| {
            ApimError::Misconfigured("apim.authorize_url is needed by the combined pattern".into())
        })?;
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &self.inner.api_key)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("state", state)
            .append_pair("acr_values", acr_values);
        Ok(url)
    }

    /// Combined pattern: redeems the authorization code from APIM's callback.
    pub async fn redeem_code(
        &self,
        code: &str,
        redirect_uri: &str,
    ) -> Result<TokenGrant, ApimError> {
        let secret = self.client_secret("redeeming an authorization code")?;
        let form = [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("client_id", self.inner.api_key.as_str()),
            ("client_secret", secret),
        ];
        self.send(Grant::AuthorizationCode, &form, &[code, secret])
            .await
    }

    fn client_secret(&self, purpose: &str) -> Result<&str, ApimError> {
        self.inner
            .client_secret
            .as_ref()
            .map(|s| s.expose().as_str())
            .ok_or_else(|| ApimError::Misconfigured(format!("{purpose} needs apim.client_secret")))
    }

    /// The one place a request leaves for APIM: every outbound call goes through here, so
    /// tracing headers and logging are added once. `secrets` are the values sent that must never
    /// come back inside an error.
    async fn send(
        &self,
        grant: Grant,
        form: &[(&str, &str)],
        secrets: &[&str],
    ) -> Result<TokenGrant, ApimError> {
        // Lifetimes count from before the request, so the time in flight is not credited.
        let issued_at = self.inner.clock.now();
        let started = Instant::now();
        let span = tracing::info_span!("apim.token", upstream = "apim", grant = grant.name());
        let request = self
            .inner
            .http
            .post(self.inner.token_url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(form);
        let request = with_trace_context(request, &span);
        let elapsed_ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let answer = match read_answer(request).instrument(span).await {
            Ok(answer) => answer,
            Err(cause) => {
                tracing::warn!(upstream = "apim", grant = grant.name(), elapsed_ms = elapsed_ms(), error = %cause, "APIM request failed");
                metrics::upstream(Upstream::Apim, TOKEN_ENDPOINT, None, started.elapsed());
                let outcome = Err(ApimError::Unavailable(cause));
                count(grant, &outcome);
                return outcome;
            }
        };
        metrics::upstream(
            Upstream::Apim,
            TOKEN_ENDPOINT,
            Some(answer.status),
            started.elapsed(),
        );
        let outcome = interpret(grant, answer.status, &answer.body, issued_at, secrets);
        count(grant, &outcome);
        match &outcome {
            Ok(_) => tracing::info!(
                upstream = "apim",
                grant = grant.name(),
                status = answer.status,
                elapsed_ms = elapsed_ms(),
                "APIM issued a token"
            ),
            Err(error) => tracing::warn!(
                upstream = "apim",
                grant = grant.name(),
                status = answer.status,
                elapsed_ms = elapsed_ms(),
                message_id = message_id(&answer.body).as_deref(),
                %error,
                "APIM refused or failed"
            ),
        }
        outcome
    }
}

/// The endpoint label of APIM's `/oauth2/token` in the upstream metrics.
const TOKEN_ENDPOINT: &str = "token endpoint";

/// Counts a token exchange or a refresh by how it ended (`metrics` module table); the combined
/// pattern's code exchange is counted as a sign-in instead.
fn count(grant: Grant, outcome: &Result<TokenGrant, ApimError>) {
    let outcome = match outcome {
        Ok(_) => Outcome::Success,
        Err(ApimError::Unavailable(_)) => Outcome::Unavailable,
        Err(ApimError::Rejected { .. } | ApimError::InvalidGrant | ApimError::Misconfigured(_)) => {
            Outcome::Rejected
        }
    };
    match grant {
        Grant::TokenExchange => metrics::token_exchange(outcome),
        Grant::RefreshToken => metrics::token_refresh(outcome),
        Grant::AuthorizationCode => {}
    }
}

/// Adds `traceparent` (and `tracestate`) so APIM's side joins the caller's trace.
fn with_trace_context(request: RequestBuilder, span: &tracing::Span) -> RequestBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    crate::telemetry::inject_span_context(span, &mut headers);
    request.headers(headers)
}

struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// Sends and reads a body of at most [`MAX_BODY_BYTES`]. The error is a cause safe to log.
async fn read_answer(request: RequestBuilder) -> Result<Answer, String> {
    let mut response = request.send().await.map_err(|e| describe(&e))?;
    let status = response.status().as_u16();
    let too_large = || format!("APIM's answer is larger than {MAX_BODY_BYTES} bytes");
    if response
        .content_length()
        .is_some_and(|len| len > MAX_BODY_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| describe(&e))? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Answer { status, body })
}

/// reqwest's error with its causes, timeouts named plainly. It may name the token URL, which is
/// configuration, never a secret: the form travels in the body.
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out".to_owned();
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// APIM's token answer. Numbers may be JSON strings, and APIM's templates leave an unset value
/// as `""`, so everything but the token is read loosely and checked after.
#[derive(Deserialize)]
struct TokenBody {
    access_token: Option<Secret<String>>,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<Value>,
    #[serde(default)]
    refresh_token: Option<Secret<String>>,
    #[serde(default)]
    refresh_token_expires_in: Option<Value>,
    #[serde(default)]
    scope: Option<String>,
}

/// APIM's error body: `{error, error_description, message_id}`; its expired-refresh-token answer
/// says `error_message` instead of `error_description`.
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    error_message: Option<String>,
}

/// Turns APIM's answer into a grant or an error: the pure half of a call.
fn interpret(
    grant: Grant,
    status: u16,
    body: &[u8],
    issued_at: SystemTime,
    secrets: &[&str],
) -> Result<TokenGrant, ApimError> {
    match status {
        200..=299 => read_grant(body, issued_at),
        // APIM's rate limit: retrying later works, so it is an outage, not a refusal.
        429 => Err(ApimError::Unavailable(
            "APIM rate-limited the request (HTTP 429)".into(),
        )),
        400..=499 => Err(refusal(grant, status, body, secrets)),
        _ => Err(ApimError::Unavailable(format!(
            "APIM answered HTTP {status}"
        ))),
    }
}

fn read_grant(body: &[u8], issued_at: SystemTime) -> Result<TokenGrant, ApimError> {
    // serde's message could quote the body, and the body holds tokens: say only what failed.
    let unreadable = |what: &str| ApimError::Unavailable(format!("APIM's token answer {what}"));
    let parsed: TokenBody =
        serde_json::from_slice(body).map_err(|_| unreadable("is not the expected JSON"))?;
    let access_token = parsed
        .access_token
        .filter(|t| is_token_text(t.expose()))
        .ok_or_else(|| unreadable("has no usable access_token"))?;
    let token_type = match parsed.token_type.as_deref().map(str::trim) {
        None | Some("") => "Bearer".to_owned(),
        Some(t) if t.eq_ignore_ascii_case("bearer") => "Bearer".to_owned(),
        Some(_) => return Err(unreadable("names a token type other than Bearer")),
    };
    let expires_in = seconds(parsed.expires_in.as_ref())
        .map_err(|()| unreadable("has an unreadable expires_in"))?
        .ok_or_else(|| unreadable("has no expires_in"))?;
    let refresh_token = parsed.refresh_token.filter(|t| !t.expose().is_empty());
    if refresh_token
        .as_ref()
        .is_some_and(|t| !is_token_text(t.expose()))
    {
        return Err(unreadable("has an unusable refresh_token"));
    }
    let refresh_expires_in = seconds(parsed.refresh_token_expires_in.as_ref())
        .map_err(|()| unreadable("has an unreadable refresh_token_expires_in"))?;
    Ok(TokenGrant {
        access_token,
        token_type,
        expires_at: after(issued_at, expires_in),
        refresh_expires_at: refresh_token
            .as_ref()
            .and(refresh_expires_in)
            .map(|s| after(issued_at, s)),
        refresh_token,
        scope: parsed.scope.filter(|s| !s.trim().is_empty()),
    })
}

/// A 4xx: APIM's OAuth error, or `InvalidGrant` for a refresh token it no longer honours.
fn refusal(grant: Grant, status: u16, body: &[u8], secrets: &[&str]) -> ApimError {
    let parsed = serde_json::from_slice::<ErrorBody>(body).ok();
    let error = parsed
        .as_ref()
        .and_then(|b| b.error.as_deref())
        .map(|e| clean(e, secrets))
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| format!("http_{status}"));
    let description = parsed
        .as_ref()
        .and_then(|b| {
            b.error_description
                .as_deref()
                .or(b.error_message.as_deref())
        })
        .map(|d| clean(d, secrets))
        .unwrap_or_default();
    if grant == Grant::RefreshToken && refresh_token_dead(&error, &description) {
        return ApimError::InvalidGrant;
    }
    ApimError::Rejected {
        status,
        error,
        description,
    }
}

/// APIM answers a used, unknown or revoked refresh token with `invalid_grant` ("refresh_token is
/// invalid", "refresh token refresh period has expired"), and an expired one with
/// `invalid_request` + "Refresh Token expired".
fn refresh_token_dead(error: &str, description: &str) -> bool {
    error == "invalid_grant"
        || (error == "invalid_request"
            && description
                .to_ascii_lowercase()
                .contains("refresh token expired"))
}

/// APIM's `message_id` (its correlation id, not a secret) for the log, when the body has one.
fn message_id(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct WithId {
        message_id: Option<String>,
    }
    serde_json::from_slice::<WithId>(body)
        .ok()
        .and_then(|b| b.message_id)
        .map(|id| clean(&id, &[]))
}

/// Seconds as APIM writes them: a JSON string or number of whole seconds. Absent, null and `""`
/// are `None`; anything else (negative, fractional, text) is an error.
fn seconds(value: Option<&Value>) -> Result<Option<u64>, ()> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or(()),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => s.trim().parse::<u64>().map(Some).map_err(|_| ()),
        Some(_) => Err(()),
    }
}

fn after(t: SystemTime, secs: u64) -> SystemTime {
    t.checked_add(Duration::from_secs(secs)).unwrap_or(t)
}

/// A token goes into an `Authorization` header: visible ASCII only.
fn is_token_text(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

/// APIM's text made safe for a message: our secrets replaced, control characters dropped,
/// trimmed and cut short.
fn clean(text: &str, secrets: &[&str]) -> String {
    let mut text = text.to_owned();
    for secret in secrets.iter().filter(|s| s.len() >= MIN_SCRUBBED_LEN) {
        text = text.replace(secret, "[redacted]");
    }
    let printable: String = text.chars().filter(|c| !c.is_control()).collect();
    printable.trim().chars().take(MAX_APIM_TEXT).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::UNIX_EPOCH;

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    #[test]
    fn seconds_are_read_as_strings_or_numbers() {
        let cases = [
            (None, Ok(None)),
            (Some(json!(null)), Ok(None)),
            (Some(json!("")), Ok(None)),
            (Some(json!("  ")), Ok(None)),
            (Some(json!("599")), Ok(Some(599))),
            (Some(json!(" 599 ")), Ok(Some(599))),
            (Some(json!(599)), Ok(Some(599))),
            (Some(json!(0)), Ok(Some(0))),
            (Some(json!("0")), Ok(Some(0))),
            (Some(json!(-1)), Err(())),
            (Some(json!("-1")), Err(())),
            (Some(json!(1.5)), Err(())),
            (Some(json!("1.5")), Err(())),
            (Some(json!("ten")), Err(())),
            (Some(json!(true)), Err(())),
            (Some(json!(["599"])), Err(())),
            (Some(json!({"s": 1})), Err(())),
        ];
        for (value, want) in cases {
            assert_eq!(seconds(value.as_ref()), want, "{value:?}");
        }
    }

    fn body(v: Value) -> Vec<u8> {
        serde_json::to_vec(&v).expect("JSON values serialise")
    }

    #[test]
    fn apims_string_typed_answer_is_read() {
        let answer = body(json!({
            "access_token": "at-123",
            "expires_in": "599",
            "token_type": "Bearer",
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "refresh_token": "rt-456",
            "refresh_token_expires_in": "43199",
            "refresh_count": "0"
        }));
        let grant = interpret(Grant::TokenExchange, 200, &answer, t0(), &[]).expect("a grant");
        assert_eq!(grant.access_token.expose(), "at-123");
        assert_eq!(grant.token_type, "Bearer");
        assert_eq!(grant.expires_at, t0() + Duration::from_secs(599));
        assert_eq!(
            grant.refresh_token.as_ref().map(|t| t.expose().as_str()),
            Some("rt-456")
        );
        assert_eq!(
            grant.refresh_expires_at,
            Some(t0() + Duration::from_secs(43_199))
        );
        assert_eq!(grant.scope, None);
        let shown = format!("{grant:?}");
        assert!(
            !shown.contains("at-123") && !shown.contains("rt-456"),
            "{shown}"
        );
    }

    #[test]
    fn numbers_and_optional_fields_are_read_too() {
        let answer = body(json!({
            "access_token": "at", "expires_in": 600, "token_type": "bearer",
            "refresh_token": "", "refresh_token_expires_in": "", "scope": "a b"
        }));
        let grant = interpret(Grant::RefreshToken, 200, &answer, t0(), &[]).expect("a grant");
        assert_eq!(grant.expires_at, t0() + Duration::from_secs(600));
        assert_eq!(grant.token_type, "Bearer");
        assert!(
            grant.refresh_token.is_none(),
            "an empty refresh token is none"
        );
        assert_eq!(grant.refresh_expires_at, None);
        assert_eq!(grant.scope.as_deref(), Some("a b"));

        let no_type = body(json!({"access_token": "at", "expires_in": "1"}));
        let grant = interpret(Grant::TokenExchange, 200, &no_type, t0(), &[]).expect("a grant");
        assert_eq!(grant.token_type, "Bearer");
    }

    #[test]
    fn unusable_success_answers_are_unavailable_and_quote_nothing() {
        let cases = [
            body(json!({"expires_in": "599"})),
            body(json!({"access_token": "", "expires_in": "599"})),
            body(json!({"access_token": "has space", "expires_in": "599"})),
            body(json!({"access_token": "secret-at"})),
            body(json!({"access_token": "secret-at", "expires_in": "soon"})),
            body(json!({"access_token": "secret-at", "expires_in": "599", "token_type": "MAC"})),
            body(
                json!({"access_token": "secret-at", "expires_in": "599", "refresh_token": "a\nb"}),
            ),
            body(
                json!({"access_token": "secret-at", "expires_in": "599", "refresh_token_expires_in": "x"}),
            ),
            body(json!({"access_token": 7, "expires_in": "599"})),
            b"<html>secret-at</html>".to_vec(),
            Vec::new(),
        ];
        for answer in cases {
            match interpret(Grant::TokenExchange, 200, &answer, t0(), &[]) {
                Err(ApimError::Unavailable(cause)) => {
                    assert!(!cause.contains("secret-at"), "{cause}");
                }
                other => panic!(
                    "{}: expected Unavailable, got {other:?}",
                    String::from_utf8_lossy(&answer)
                ),
            }
        }
    }

    #[test]
    fn failures_are_classified_by_status_and_grant() {
        let invalid_grant = body(
            json!({"error": "invalid_grant", "error_description": "refresh_token is invalid", "message_id": "m1"}),
        );
        let expired = body(
            json!({"error": "invalid_request", "error_message": "Refresh Token expired", "message_id": "m2"}),
        );
        let unauthorized = body(
            json!({"error": "unauthorized_client", "error_description": "you have tried to request authorization but your application is not configured to use this authorization grant type", "message_id": "m3"}),
        );
        type Check = fn(&ApimError) -> bool;
        let cases: [(Grant, u16, &[u8], Check); 10] = [
            (Grant::RefreshToken, 401, &invalid_grant, |e| {
                matches!(e, ApimError::InvalidGrant)
            }),
            (Grant::RefreshToken, 400, &invalid_grant, |e| {
                matches!(e, ApimError::InvalidGrant)
            }),
            (Grant::RefreshToken, 401, &expired, |e| {
                matches!(e, ApimError::InvalidGrant)
            }),
            // Only a refresh reads invalid_grant as a dead refresh token.
            (
                Grant::AuthorizationCode,
                400,
                &invalid_grant,
                |e| matches!(e, ApimError::Rejected { status: 400, error, .. } if error == "invalid_grant"),
            ),
            (Grant::TokenExchange, 401, &unauthorized, |e| {
                matches!(e, ApimError::Rejected { status: 401, error, description }
                    if error == "unauthorized_client" && description.starts_with("you have tried"))
            }),
            (
                Grant::RefreshToken,
                401,
                &unauthorized,
                |e| matches!(e, ApimError::Rejected { error, .. } if error == "unauthorized_client"),
            ),
            (Grant::TokenExchange, 415, b"", |e| {
                matches!(e, ApimError::Rejected { status: 415, error, description }
                    if error == "http_415" && description.is_empty())
            }),
            (Grant::TokenExchange, 429, &unauthorized, |e| {
                matches!(e, ApimError::Unavailable(_))
            }),
            (
                Grant::TokenExchange,
                503,
                &invalid_grant,
                |e| matches!(e, ApimError::Unavailable(c) if c == "APIM answered HTTP 503"),
            ),
            (Grant::RefreshToken, 302, b"", |e| {
                matches!(e, ApimError::Unavailable(_))
            }),
        ];
        for (grant, status, answer, check) in cases {
            let err = interpret(grant, status, answer, t0(), &[])
                .expect_err("a failure status is an error");
            assert!(check(&err), "{grant:?} {status}: {err:?}");
        }
    }

    #[test]
    fn apim_text_is_cleaned_and_our_secrets_removed() {
        let secret = "eyJhbGciOiJSUzUxMiJ9.secret-id-token";
        let answer = body(json!({
            "error": "invalid\u{7}_request ",
            "error_description": format!("  bad subject_token {secret}\nsee docs {}", "x".repeat(1000)),
        }));
        match interpret(Grant::TokenExchange, 400, &answer, t0(), &[secret, "short"]) {
            Err(ApimError::Rejected {
                error, description, ..
            }) => {
                assert_eq!(error, "invalid_request");
                assert!(!description.contains("secret-id-token"), "{description}");
                assert!(
                    description.starts_with("bad subject_token [redacted]see docs"),
                    "{description}"
                );
                assert_eq!(description.chars().count(), MAX_APIM_TEXT);
            }
            other => panic!("expected Rejected, got {other:?}"),
        }
        assert_eq!(clean("a short word", &["short"]), "a short word");
    }

    #[test]
    fn message_ids_are_read_for_the_log() {
        assert_eq!(
            message_id(br#"{"error":"x","message_id":"rrt-1"}"#).as_deref(),
            Some("rrt-1")
        );
        assert_eq!(message_id(b"nope"), None);
    }

    #[test]
    fn errors_map_to_the_broker_table() {
        let cases = [
            (ApimError::Unavailable("x".into()), "ApimUnavailable"),
            (
                ApimError::Rejected {
                    status: 401,
                    error: "unauthorized_client".into(),
                    description: "d".into(),
                },
                "UpstreamRejected",
            ),
            (ApimError::InvalidGrant, "SessionInvalid"),
            (ApimError::Misconfigured("x".into()), "Internal"),
        ];
        for (apim, want) in cases {
            let broker = BrokerError::from(apim);
            assert!(format!("{broker:?}").starts_with(want), "{broker:?}");
        }
        match BrokerError::from(ApimError::Rejected {
            status: 401,
            error: "unauthorized_client".into(),
            description: "d".into(),
        }) {
            BrokerError::UpstreamRejected {
                upstream,
                error,
                description,
            } => {
                assert_eq!(
                    (upstream, error.as_str(), description.as_str()),
                    ("apim", "unauthorized_client", "d")
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
