//! The CIS2 OpenID Connect client: discovery, JWKS, the authorization URL, code redemption,
//! ID token checks and UserInfo.
//!
//! Written on jsonwebtoken + reqwest rather than an OIDC crate because CIS2 needs things those
//! lack: a discovery URL that differs from the issuer string (CIS2's `iss` carries `:443`),
//! `private_key_jwt` with RS512, and (elsewhere) logout tokens and RFC 8693.
//!
//! - [`discovery`]: the provider metadata, its exact-issuer check and its lazily refreshed cache.
//! - [`jwks`]: CIS2's signing keys, cached, re-fetched (rate-limited) for an unknown `kid`.
//! - [`id_token`]: the JOSE header and signature checks.
//! - [`claims`]: the claim checks and the UserInfo mapping: pure functions.
//! - [`client`]: [`Cis2Client`], which ties them to HTTP.
//! - [`pkce`]: RFC 7636 verifier and S256 challenge.

pub mod claims;
pub mod client;
pub mod discovery;
mod fetch;
pub mod id_token;
pub mod jwks;
pub mod pkce;

#[cfg(test)]
mod tests;

pub use claims::{
    ClaimRules, IdTokenClaims, IdTokenExpectations, LogoutTokenClaims, Rejection, UserInfo,
};
pub use client::{AuthorizationRequest, Cis2Client, TokenSet};

use crate::secret::Secret;
use crate::signing::SigningKeys;
use std::sync::Arc;
use std::time::Duration;
use url::Url;

/// How the broker proves itself to CIS2's token endpoint.
#[derive(Clone, Debug)]
pub enum ClientAuth {
    /// `client_secret_post`.
    SecretPost(Secret<String>),
    /// `private_key_jwt`: an RS512 client assertion signed with the broker's newest key.
    PrivateKeyJwt(Arc<SigningKeys>),
}

#[derive(Clone, Debug)]
pub struct OidcSettings {
    /// CIS2's issuer exactly as CIS2 states it (with `:443`): compared as a string, never rebuilt.
    pub issuer: String,
    pub discovery_url: Url,
    pub client_id: String,
    pub client_auth: ClientAuth,
    /// Per outbound request.
    pub http_timeout: Duration,
    /// Leeway for `exp`, `iat` and `auth_time`.
    pub clock_skew: Duration,
    /// Discovery older than this is re-fetched, lazily, on use.
    pub discovery_refresh: Duration,
    /// An unknown `kid` triggers at most one JWKS re-fetch per interval.
    pub jwks_min_refresh_interval: Duration,
    /// Fetch UserInfo after the code exchange.
    pub userinfo: bool,
}

impl OidcSettings {
    /// Settings with the documented defaults and discovery at `issuer` +
    /// `/.well-known/openid-configuration`.
    pub fn with_defaults(
        issuer: impl Into<String>,
        client_id: impl Into<String>,
        client_auth: ClientAuth,
    ) -> Result<Self, OidcError> {
        let issuer = issuer.into();
        Ok(Self {
            discovery_url: default_discovery_url(&issuer)?,
            issuer,
            client_id: client_id.into(),
            client_auth,
            http_timeout: Duration::from_secs(15),
            clock_skew: Duration::from_secs(60),
            discovery_refresh: Duration::from_secs(3600),
            jwks_min_refresh_interval: Duration::from_secs(30),
            userinfo: true,
        })
    }
}

/// `issuer` + `/.well-known/openid-configuration`. Parsing drops a default `:443`, which is what
/// CIS2 serves its discovery document on; the issuer string itself is kept verbatim elsewhere.
pub fn default_discovery_url(issuer: &str) -> Result<Url, OidcError> {
    let joined = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    Url::parse(&joined).map_err(|e| {
        OidcError::Misconfigured(format!(
            "cis2.issuer \"{issuer}\" is not an absolute URL ({e}): set it to the issuer CIS2's discovery document states"
        ))
    })
}

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// Network error, timeout, 5xx or an unreadable answer: safe to retry (IDP_UNAVAILABLE).
    #[error("CIS2 is unavailable: {0}")]
    Unavailable(String),
    /// CIS2 said no, or its answer failed a check (LOGIN_REJECTED). `idp_error` is CIS2's own
    /// OAuth `error` code when it sent one; `detail` is safe to show and never holds a token.
    #[error("{detail}")]
    Rejected {
        idp_error: Option<String>,
        detail: String,
    },
    /// The configuration does not match CIS2; the message says how to fix it.
    #[error("{0}")]
    Misconfigured(String),
}

impl OidcError {
    pub(crate) fn rejected(detail: impl Into<String>) -> Self {
        OidcError::Rejected {
            idp_error: None,
            detail: detail.into(),
        }
    }
}

/// `now + d`, saturating far in the future instead of panicking on an absurd configured duration.
pub(crate) fn time_after(now: std::time::SystemTime, d: Duration) -> std::time::SystemTime {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(u64::from(u32::MAX))))
        .unwrap_or(now)
}
