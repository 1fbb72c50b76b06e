//! CIS2's provider metadata: fetched from the configured discovery URL, accepted only when it
//! states exactly the configured issuer, cached, and re-fetched lazily when old.

use super::fetch::{self, Answer};
use super::{OidcError, time_after};
use crate::clock::Clock;
use reqwest::StatusCode;
use serde::Deserialize;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};
use url::Url;

/// After a failed refresh, the cached document is used this long before the next attempt, so
/// that a CIS2 outage does not add a timeout to every sign-in.
const FAILED_REFRESH_BACKOFF: Duration = Duration::from_secs(30);

/// An endpoint as CIS2 wrote it (client assertions need the exact string as `aud`) and parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    raw: String,
    url: Url,
}

impl Endpoint {
    fn parse(field: &'static str, raw: String) -> Result<Self, OidcError> {
        match Url::parse(&raw) {
            Ok(url) if matches!(url.scheme(), "https" | "http") && url.has_host() => {
                Ok(Self { raw, url })
            }
            _ => Err(OidcError::Unavailable(format!(
                "CIS2 discovery document: {field} is not an absolute http(s) URL"
            ))),
        }
    }

    /// Exactly as the discovery document states it.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn url(&self) -> &Url {
        &self.url
    }
}

/// The parts of CIS2's discovery document the broker uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderMetadata {
    pub issuer: String,
    pub authorization_endpoint: Endpoint,
    pub token_endpoint: Endpoint,
    pub jwks_uri: Endpoint,
    pub userinfo_endpoint: Option<Endpoint>,
    pub end_session_endpoint: Option<Endpoint>,
}

#[derive(Deserialize)]
struct RawMetadata {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    userinfo_endpoint: Option<String>,
    #[serde(default)]
    end_session_endpoint: Option<String>,
}

/// Reads a discovery document. The issuer must be the configured string byte for byte: CIS2
/// states `https://host:443/...`, and the configuration must say the same.
pub fn parse_discovery(
    body: &[u8],
    configured_issuer: &str,
) -> Result<ProviderMetadata, OidcError> {
    let raw: RawMetadata = serde_json::from_slice(body).map_err(|e| {
        OidcError::Unavailable(format!(
            "CIS2 discovery document is not valid provider metadata: {e}"
        ))
    })?;
    if raw.issuer != configured_issuer {
        return Err(OidcError::Misconfigured(format!(
            "CIS2 discovery states issuer \"{theirs}\" but the configuration says \"{configured_issuer}\": set cis2.issuer to exactly \"{theirs}\"",
            theirs = raw.issuer
        )));
    }
    Ok(ProviderMetadata {
        issuer: raw.issuer,
        authorization_endpoint: Endpoint::parse(
            "authorization_endpoint",
            raw.authorization_endpoint,
        )?,
        token_endpoint: Endpoint::parse("token_endpoint", raw.token_endpoint)?,
        jwks_uri: Endpoint::parse("jwks_uri", raw.jwks_uri)?,
        userinfo_endpoint: raw
            .userinfo_endpoint
            .map(|u| Endpoint::parse("userinfo_endpoint", u))
            .transpose()?,
        end_session_endpoint: raw
            .end_session_endpoint
            .map(|u| Endpoint::parse("end_session_endpoint", u))
            .transpose()?,
    })
}

/// The cached document. Readers never wait for a fetch unless nothing is cached or it is stale;
/// concurrent callers that do need a fetch share one.
pub(crate) struct DiscoveryCache {
    url: Url,
    issuer: String,
    max_age: Duration,
    current: RwLock<Option<Cached>>,
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Cached {
    doc: Arc<ProviderMetadata>,
    /// When to try fetching again.
    refresh_at: SystemTime,
}

impl DiscoveryCache {
    pub(crate) fn new(url: Url, issuer: String, max_age: Duration) -> Self {
        Self {
            url,
            issuer,
            max_age,
            current: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    pub(crate) fn cached(&self) -> Option<Arc<ProviderMetadata>> {
        self.read().map(|c| c.doc)
    }

    /// The document, fetched if none is cached or the cached one is due for a refresh. A failed
    /// refresh keeps the cached document.
    pub(crate) async fn get(
        &self,
        http: &reqwest::Client,
        clock: &dyn Clock,
    ) -> Result<Arc<ProviderMetadata>, OidcError> {
        if let Some(fresh) = self.fresh(clock.now()) {
            return Ok(fresh);
        }
        let _single_flight = self.fetching.lock().await;
        if let Some(fresh) = self.fresh(clock.now()) {
            return Ok(fresh);
        }
        match self.fetch(http).await {
            Ok(doc) => {
                let doc = Arc::new(doc);
                self.store(Cached {
                    doc: doc.clone(),
                    refresh_at: time_after(clock.now(), self.max_age),
                });
                Ok(doc)
            }
            Err(error) => match self.read() {
                Some(stale) => {
                    tracing::warn!(upstream = "cis2", %error, "discovery refresh failed: keeping the cached document");
                    self.store(Cached {
                        doc: stale.doc.clone(),
                        refresh_at: time_after(
                            clock.now(),
                            self.max_age.min(FAILED_REFRESH_BACKOFF),
                        ),
                    });
                    Ok(stale.doc)
                }
                None => Err(error),
            },
        }
    }

    fn fresh(&self, now: SystemTime) -> Option<Arc<ProviderMetadata>> {
        self.read().filter(|c| now < c.refresh_at).map(|c| c.doc)
    }

    fn read(&self) -> Option<Cached> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn store(&self, cached: Cached) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(cached);
    }

    async fn fetch(&self, http: &reqwest::Client) -> Result<ProviderMetadata, OidcError> {
        let request = http
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json");
        let answer = fetch::exchange("discovery", request).await?;
        self.interpret(&answer)
    }

    fn interpret(&self, answer: &Answer) -> Result<ProviderMetadata, OidcError> {
        let status = answer.status;
        if status.is_success() {
            return parse_discovery(&answer.body, &self.issuer);
        }
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            return Err(fetch::unexpected_status("discovery", status));
        }
        let hint = if status.is_redirection() {
            " (redirects are not followed)"
        } else {
            ""
        };
        Err(OidcError::Misconfigured(format!(
            "CIS2 discovery at {} answered HTTP {}{hint}: set cis2.discovery_url to CIS2's /.well-known/openid-configuration URL",
            self.url,
            status.as_u16()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ISS: &str = "https://am.example.test:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare";

    fn doc(issuer: &str) -> Vec<u8> {
        json!({
            "issuer": issuer,
            "authorization_endpoint": "https://am.example.test:443/openam/authorize",
            "token_endpoint": "https://am.example.test:443/openam/access_token",
            "jwks_uri": "https://am.example.test/openam/connect/jwk_uri",
            "userinfo_endpoint": "https://am.example.test/openam/userinfo",
            "response_types_supported": ["code"]
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn accepts_the_verbatim_issuer_and_keeps_endpoints_as_written() {
        let meta = parse_discovery(&doc(ISS), ISS).expect("parses");
        assert_eq!(meta.issuer, ISS);
        assert_eq!(
            meta.token_endpoint.as_str(),
            "https://am.example.test:443/openam/access_token"
        );
        assert_eq!(meta.token_endpoint.url().port(), None);
        assert!(meta.end_session_endpoint.is_none());
    }

    #[test]
    fn an_issuer_differing_only_by_port_is_a_misconfiguration_with_the_fix() {
        let ours = ISS.replace(":443", "");
        match parse_discovery(&doc(ISS), &ours) {
            Err(OidcError::Misconfigured(text)) => assert_eq!(
                text,
                format!(
                    "CIS2 discovery states issuer \"{ISS}\" but the configuration says \"{ours}\": set cis2.issuer to exactly \"{ISS}\""
                )
            ),
            other => panic!("expected Misconfigured, got {other:?}"),
        }
        assert!(matches!(
            parse_discovery(&doc(&format!("{ISS}/")), ISS),
            Err(OidcError::Misconfigured(_))
        ));
    }

    #[test]
    fn broken_documents_are_unavailable() {
        let mut missing = serde_json::from_slice::<serde_json::Value>(&doc(ISS)).expect("json");
        missing.as_object_mut().expect("object").remove("jwks_uri");
        let mut relative = serde_json::from_slice::<serde_json::Value>(&doc(ISS)).expect("json");
        relative["token_endpoint"] = json!("/access_token");
        let mut ftp = serde_json::from_slice::<serde_json::Value>(&doc(ISS)).expect("json");
        ftp["userinfo_endpoint"] = json!("ftp://am.example.test/userinfo");
        for body in [
            b"not json".to_vec(),
            b"[]".to_vec(),
            missing.to_string().into_bytes(),
            relative.to_string().into_bytes(),
            ftp.to_string().into_bytes(),
        ] {
            assert!(
                matches!(parse_discovery(&body, ISS), Err(OidcError::Unavailable(_))),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }
}
