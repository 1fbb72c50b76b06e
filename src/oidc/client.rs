//! [`Cis2Client`]: the CIS2 endpoints, as the broker uses them.

use super::claims::{
    self, ClaimRules, IdTokenClaims, IdTokenExpectations, LogoutTokenClaims, Rejection, UserInfo,
};
use super::discovery::{DiscoveryCache, Endpoint, ProviderMetadata};
use super::fetch::{self, Answer};
use super::id_token;
use super::jwks::KeyCache;
use super::{ClientAuth, OidcError, OidcSettings};
use crate::clock::Clock;
use crate::secret::Secret;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tracing::instrument;
use url::Url;

/// CIS2 and APIM accept client assertions that live at most five minutes.
const CLIENT_ASSERTION_LIFETIME: Duration = Duration::from_secs(300);
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The parameters of one authentication request; the client adds `response_type`, `client_id`
/// and `code_challenge_method`.
#[derive(Debug, Clone, Copy)]
pub struct AuthorizationRequest<'a> {
    pub redirect_uri: &'a str,
    /// Space-separated; must include `openid`.
    pub scopes: &'a str,
    pub state: &'a str,
    pub nonce: &'a str,
    pub pkce_challenge: &'a str,
    /// Omitted from the URL when empty (CIS2 then applies `AAL3_ANY`).
    pub acr_values: &'a str,
    pub max_age: Option<u64>,
    pub prompt: Option<&'a str>,
}

/// What the token endpoint returned. `Debug` shows no token.
#[derive(Debug)]
pub struct TokenSet {
    pub id_token: Secret<String>,
    pub access_token: Option<Secret<String>>,
    pub expires_in: Option<u64>,
}

/// The CIS2 client. Cheap to clone; clones share the discovery and JWKS caches.
#[derive(Clone)]
pub struct Cis2Client {
    inner: Arc<Inner>,
}

struct Inner {
    settings: OidcSettings,
    clock: Arc<dyn Clock>,
    http: reqwest::Client,
    discovery: DiscoveryCache,
    keys: KeyCache,
}

impl std::fmt::Debug for Cis2Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cis2Client")
            .field("issuer", &self.inner.settings.issuer)
            .field("client_id", &self.inner.settings.client_id)
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl Cis2Client {
    /// Checks the settings and builds the HTTP client; no network I/O.
    pub fn new(settings: OidcSettings, clock: Arc<dyn Clock>) -> Result<Self, OidcError> {
        let mut problems = Vec::new();
        if settings.issuer.trim().is_empty() {
            problems.push(
                "cis2.issuer is empty: set it to the issuer CIS2's discovery document states",
            );
        }
        if settings.client_id.trim().is_empty() {
            problems.push("cis2.client_id is empty: set it to the client id CIS2 registered");
        }
        if settings.http_timeout.is_zero() {
            problems.push("the CIS2 HTTP timeout is zero: give it a few seconds");
        }
        if !problems.is_empty() {
            return Err(OidcError::Misconfigured(problems.join("; ")));
        }
        let http = reqwest::Client::builder()
            // A redirect from an OIDC endpoint is never expected; following one could send a
            // code or a client secret somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.http_timeout)
            .user_agent(concat!("cis2-session-broker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OidcError::Misconfigured(format!("cannot build the HTTP client: {e}")))?;
        let discovery = DiscoveryCache::new(
            settings.discovery_url.clone(),
            settings.issuer.clone(),
            settings.discovery_refresh,
        );
        let keys = KeyCache::new(
            settings.jwks_min_refresh_interval,
            settings.discovery_refresh,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                clock,
                http,
                discovery,
                keys,
            }),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.inner.settings.issuer
    }

    pub fn client_id(&self) -> &str {
        &self.inner.settings.client_id
    }

    pub fn settings(&self) -> &OidcSettings {
        &self.inner.settings
    }

    /// Loads discovery if it is not cached yet: the readiness check.
    pub async fn ensure_ready(&self) -> Result<(), OidcError> {
        self.discovery().await.map(|_| ())
    }

    /// Whether a discovery document is cached.
    pub fn is_ready(&self) -> bool {
        self.inner.discovery.cached().is_some()
    }

    /// The provider metadata in use (fetched if needed).
    pub async fn discovery(&self) -> Result<Arc<ProviderMetadata>, OidcError> {
        self.inner
            .discovery
            .get(&self.inner.http, self.inner.clock.as_ref())
            .await
    }

    /// The authentication request URL on discovery's `authorization_endpoint`.
    pub async fn authorization_url(
        &self,
        req: &AuthorizationRequest<'_>,
    ) -> Result<Url, OidcError> {
        check_request(req)?;
        let meta = self.discovery().await?;
        let mut url = meta.authorization_endpoint.url().clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("response_type", "code")
                .append_pair("client_id", self.client_id())
                .append_pair("redirect_uri", req.redirect_uri)
                .append_pair("scope", req.scopes)
                .append_pair("state", req.state)
                .append_pair("nonce", req.nonce)
                .append_pair("code_challenge", req.pkce_challenge)
                .append_pair("code_challenge_method", "S256");
            if !req.acr_values.is_empty() {
                q.append_pair("acr_values", req.acr_values);
            }
            if let Some(prompt) = req.prompt {
                q.append_pair("prompt", prompt);
            }
            if let Some(max_age) = req.max_age {
                q.append_pair("max_age", &max_age.to_string());
            }
        }
        Ok(url)
    }

    /// Redeems an authorization code at discovery's `token_endpoint`.
    #[instrument(skip_all, fields(upstream = "cis2"))]
    pub async fn redeem_code(
        &self,
        code: &str,
        redirect_uri: &str,
        pkce_verifier: &str,
    ) -> Result<TokenSet, OidcError> {
        let meta = self.discovery().await?;
        let mut form: Vec<(&str, String)> = vec![
            ("grant_type", "authorization_code".to_owned()),
            ("code", code.to_owned()),
            ("redirect_uri", redirect_uri.to_owned()),
            ("code_verifier", pkce_verifier.to_owned()),
            ("client_id", self.client_id().to_owned()),
        ];
        self.authenticate(&mut form, &meta.token_endpoint)?;
        let request = self
            .inner
            .http
            .post(meta.token_endpoint.url().clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form);
        let answer = fetch::exchange("token endpoint", request).await?;
        token_set(&answer)
    }

    /// Adds the client authentication the settings ask for.
    fn authenticate(
        &self,
        form: &mut Vec<(&str, String)>,
        token_endpoint: &Endpoint,
    ) -> Result<(), OidcError> {
        match &self.inner.settings.client_auth {
            ClientAuth::SecretPost(secret) => {
                form.push(("client_secret", secret.expose().clone()));
            }
            ClientAuth::PrivateKeyJwt(keys) => {
                let assertion = keys
                    .client_assertion(
                        self.client_id(),
                        // The exact string CIS2 published: `aud` is compared as written.
                        token_endpoint.as_str(),
                        self.inner.clock.now(),
                        CLIENT_ASSERTION_LIFETIME,
                    )
                    .map_err(|e| {
                        OidcError::Misconfigured(format!(
                            "cannot sign the CIS2 client assertion: {e}"
                        ))
                    })?;
                form.push(("client_assertion_type", JWT_BEARER.to_owned()));
                form.push(("client_assertion", assertion.into_inner()));
            }
        }
        Ok(())
    }

    /// Checks an ID token: header allow-list, CIS2's key, signature, then every claim rule.
    #[instrument(skip_all, fields(upstream = "cis2"))]
    pub async fn validate_id_token(
        &self,
        id_token: &str,
        expect: &IdTokenExpectations<'_>,
    ) -> Result<IdTokenClaims, OidcError> {
        let claims = self
            .verified_claims(id_token)
            .await
            .map_err(|e| e.into_oidc(refused_id_token))?;
        claims::check_id_token_claims(&claims, expect, &self.rules(), self.inner.clock.now())
            .map_err(refused_id_token)
    }

    /// Checks a back-channel logout token exactly as an ID token is checked (header allow-list,
    /// CIS2's key, signature), then by the logout token's own claim rules. Replay (`jti`) is the
    /// caller's to check: it needs the shared store.
    #[instrument(skip_all, fields(upstream = "cis2"))]
    pub async fn validate_logout_token(
        &self,
        logout_token: &str,
    ) -> Result<LogoutTokenClaims, OidcError> {
        id_token::check_logout_typ(logout_token).map_err(refused_logout_token)?;
        let claims = self
            .verified_claims(logout_token)
            .await
            .map_err(|e| e.into_oidc(refused_logout_token))?;
        claims::check_logout_token_claims(&claims, &self.rules(), self.inner.clock.now())
            .map_err(refused_logout_token)
    }

    fn rules(&self) -> ClaimRules<'_> {
        ClaimRules {
            issuer: self.issuer(),
            client_id: self.client_id(),
            clock_skew: self.inner.settings.clock_skew,
        }
    }

    /// The JOSE checks every CIS2-signed token passes: the header allow-list, a key CIS2
    /// publishes, and the signature. Returns the claims, not yet checked.
    async fn verified_claims(&self, token: &str) -> Result<serde_json::Value, Unverified> {
        let header = id_token::parse_header(token).map_err(Unverified::Refused)?;
        let meta = self.discovery().await.map_err(Unverified::Oidc)?;
        let jwk = self
            .inner
            .keys
            .key(
                &self.inner.http,
                self.inner.clock.as_ref(),
                meta.jwks_uri.url(),
                &header.kid,
            )
            .await
            .map_err(Unverified::Oidc)?
            .ok_or(Unverified::Refused(Rejection::UnknownKid))?;
        let key = id_token::decoding_key(&jwk, header.alg).map_err(Unverified::Refused)?;
        id_token::verify_signature(token, &key, header.alg).map_err(Unverified::Refused)
    }

    /// Reads UserInfo with the access token; its `sub` must be the ID token's.
    #[instrument(skip_all, fields(upstream = "cis2"))]
    pub async fn userinfo(
        &self,
        access_token: &str,
        expected_sub: &str,
    ) -> Result<UserInfo, OidcError> {
        let meta = self.discovery().await?;
        let endpoint = meta.userinfo_endpoint.as_ref().ok_or_else(|| {
            OidcError::Misconfigured(
                "CIS2 discovery has no userinfo_endpoint: turn cis2.userinfo off".to_owned(),
            )
        })?;
        let request = self
            .inner
            .http
            .get(endpoint.url().clone())
            .bearer_auth(access_token)
            .header(reqwest::header::ACCEPT, "application/json");
        let answer = fetch::exchange("userinfo", request).await?;
        if answer.status.is_client_error() {
            return Err(fetch::rejected_by_idp("userinfo", &answer));
        }
        if !answer.status.is_success() {
            return Err(fetch::unexpected_status("userinfo", answer.status));
        }
        let json: serde_json::Value = serde_json::from_slice(&answer.body)
            .map_err(|_| OidcError::Unavailable("CIS2 userinfo answer is not JSON".to_owned()))?;
        claims::userinfo_from_claims(&json, expected_sub).map_err(|r| {
            tracing::warn!(upstream = "cis2", reason = %r, "UserInfo refused");
            OidcError::rejected(format!("CIS2 UserInfo refused: {r}"))
        })
    }

    /// Discovery's `end_session_endpoint`, with `id_token_hint` and `post_logout_redirect_uri`
    /// when given.
    pub async fn end_session_url(
        &self,
        id_token_hint: Option<&str>,
        post_logout_redirect_uri: Option<&str>,
    ) -> Result<Url, OidcError> {
        let meta = self.discovery().await?;
        let endpoint = meta.end_session_endpoint.as_ref().ok_or_else(|| {
            OidcError::Misconfigured("CIS2 discovery has no end_session_endpoint".to_owned())
        })?;
        let mut url = endpoint.url().clone();
        if id_token_hint.is_some() || post_logout_redirect_uri.is_some() {
            let mut q = url.query_pairs_mut();
            if let Some(hint) = id_token_hint {
                q.append_pair("id_token_hint", hint);
            }
            if let Some(uri) = post_logout_redirect_uri {
                q.append_pair("post_logout_redirect_uri", uri);
            }
        }
        Ok(url)
    }
}

/// Why a token's JOSE layer did not verify: a rejection of the token, or CIS2 unreachable.
enum Unverified {
    Refused(Rejection),
    Oidc(OidcError),
}

impl Unverified {
    fn into_oidc(self, refused: fn(Rejection) -> OidcError) -> OidcError {
        match self {
            Unverified::Refused(r) => refused(r),
            Unverified::Oidc(e) => e,
        }
    }
}

fn refused_logout_token(r: Rejection) -> OidcError {
    tracing::warn!(upstream = "cis2", reason = %r, "logout token refused");
    OidcError::rejected(format!("CIS2 logout token refused: {r}"))
}

fn refused_id_token(r: Rejection) -> OidcError {
    tracing::warn!(upstream = "cis2", reason = %r, "ID token refused");
    OidcError::rejected(format!("CIS2 ID token refused: {r}"))
}

/// The request parts without which the sign-in would be unsafe: a bug in the caller, refused.
fn check_request(req: &AuthorizationRequest<'_>) -> Result<(), OidcError> {
    let mut missing = Vec::new();
    if !req.scopes.split_ascii_whitespace().any(|s| s == "openid") {
        missing.push("the scope openid");
    }
    for (name, value) in [
        ("redirect_uri", req.redirect_uri),
        ("state", req.state),
        ("nonce", req.nonce),
        ("a PKCE challenge", req.pkce_challenge),
    ] {
        if value.is_empty() {
            missing.push(name);
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(OidcError::Misconfigured(format!(
            "the CIS2 authentication request lacks {}",
            missing.join(", ")
        )))
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    id_token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

/// The token endpoint's answer: tokens, CIS2's refusal, or unavailability.
fn token_set(answer: &Answer) -> Result<TokenSet, OidcError> {
    if answer.status.is_client_error() {
        let error = fetch::rejected_by_idp("token endpoint", answer);
        tracing::warn!(upstream = "cis2", status = answer.status.as_u16(), %error, "code redemption refused");
        return Err(error);
    }
    if !answer.status.is_success() {
        return Err(fetch::unexpected_status("token endpoint", answer.status));
    }
    let body: TokenResponse = serde_json::from_slice(&answer.body).map_err(|_| {
        OidcError::Unavailable("CIS2 token endpoint answer is not a JSON token response".to_owned())
    })?;
    let id_token = body
        .id_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| OidcError::rejected("CIS2 token response has no id_token"))?;
    Ok(TokenSet {
        id_token: Secret::new(id_token),
        access_token: body.access_token.filter(|t| !t.is_empty()).map(Secret::new),
        expires_in: body.expires_in.as_ref().and_then(seconds),
    })
}

/// `expires_in` as a number or, as some NHS services send it, a string of digits.
fn seconds(value: &serde_json::Value) -> Option<u64> {
    match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}
