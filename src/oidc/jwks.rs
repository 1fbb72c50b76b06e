//! CIS2's signing keys, fetched from discovery's `jwks_uri` and cached by `kid`.
//!
//! A token naming an unknown `kid` (CIS2 rotated its key) triggers a re-fetch, at most one per
//! `jwks_min_refresh_interval`, so that junk tokens cannot turn the broker into a JWKS hammer.
//! Known keys keep working while the JWKS endpoint is down.

use super::fetch;
use super::{OidcError, time_after};
use crate::clock::Clock;
use jsonwebtoken::jwk::Jwk;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};
use url::Url;

/// Reads a JWK set into a map by `kid`. Keys this client cannot read, or without a `kid`, are
/// skipped (an ID token must name its key); the first of two keys with one `kid` wins.
pub fn parse_jwks(body: &[u8]) -> Result<HashMap<String, Jwk>, OidcError> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet = serde_json::from_slice(body)
        .map_err(|e| OidcError::Unavailable(format!("CIS2 JWKS is not a JSON key set: {e}")))?;
    let mut keys = HashMap::new();
    let mut skipped = 0usize;
    for value in raw.keys {
        match serde_json::from_value::<Jwk>(value) {
            Ok(jwk) => match jwk.common.key_id.clone() {
                Some(kid) if !kid.is_empty() && !keys.contains_key(&kid) => {
                    keys.insert(kid, jwk);
                }
                _ => skipped += 1,
            },
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        tracing::warn!(
            upstream = "cis2",
            skipped,
            kept = keys.len(),
            "ignored unusable keys in CIS2's JWKS"
        );
    }
    Ok(keys)
}

pub(crate) struct KeyCache {
    min_refresh: Duration,
    max_age: Duration,
    state: RwLock<State>,
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default, Clone)]
struct State {
    set: Option<KeySet>,
    last_attempt: Option<SystemTime>,
}

#[derive(Clone)]
struct KeySet {
    uri: Url,
    keys: Arc<HashMap<String, Jwk>>,
    fetched_at: SystemTime,
}

/// What to do for a `kid`, given what is cached.
#[derive(Debug, PartialEq)]
enum Plan {
    Use(Box<Jwk>),
    Fetch,
    /// Unknown and a re-fetch happened too recently.
    Unknown,
}

impl State {
    fn cached(&self, uri: &Url, kid: &str) -> Option<&Jwk> {
        self.set
            .as_ref()
            .filter(|s| &s.uri == uri)
            .and_then(|s| s.keys.get(kid))
    }

    fn plan(
        &self,
        uri: &Url,
        kid: &str,
        now: SystemTime,
        min_refresh: Duration,
        max_age: Duration,
    ) -> Plan {
        let Some(set) = self.set.as_ref().filter(|s| &s.uri == uri) else {
            return Plan::Fetch;
        };
        let may_refetch = self
            .last_attempt
            .is_none_or(|t| now >= time_after(t, min_refresh));
        match set.keys.get(kid) {
            Some(jwk) if now < time_after(set.fetched_at, max_age) || !may_refetch => {
                Plan::Use(Box::new(jwk.clone()))
            }
            // Known but old: refresh so that keys CIS2 withdrew stop being trusted.
            Some(_) => Plan::Fetch,
            None if may_refetch => Plan::Fetch,
            None => Plan::Unknown,
        }
    }
}

impl KeyCache {
    /// `max_age`: how long a fetched set is trusted before a lazy refresh.
    pub(crate) fn new(min_refresh: Duration, max_age: Duration) -> Self {
        Self {
            min_refresh,
            max_age,
            state: RwLock::new(State::default()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// CIS2's key for `kid` from the set at `jwks_uri`; `Ok(None)` when CIS2 does not publish it.
    pub(crate) async fn key(
        &self,
        http: &reqwest::Client,
        clock: &dyn Clock,
        jwks_uri: &Url,
        kid: &str,
    ) -> Result<Option<Jwk>, OidcError> {
        if let Plan::Use(jwk) = self.plan(jwks_uri, kid, clock.now()) {
            return Ok(Some(*jwk));
        }
        let _single_flight = self.fetching.lock().await;
        match self.plan(jwks_uri, kid, clock.now()) {
            Plan::Use(jwk) => return Ok(Some(*jwk)),
            Plan::Unknown => return Ok(None),
            Plan::Fetch => {}
        }
        self.write().last_attempt = Some(clock.now());
        match fetch_jwks(http, jwks_uri).await {
            Ok(keys) => {
                let found = keys.get(kid).cloned();
                self.write().set = Some(KeySet {
                    uri: jwks_uri.clone(),
                    keys: Arc::new(keys),
                    fetched_at: clock.now(),
                });
                Ok(found)
            }
            Err(error) => match self.read().cached(jwks_uri, kid) {
                Some(jwk) => {
                    tracing::warn!(upstream = "cis2", %error, "JWKS refresh failed: using the cached key");
                    Ok(Some(jwk.clone()))
                }
                None => Err(error),
            },
        }
    }

    fn plan(&self, uri: &Url, kid: &str, now: SystemTime) -> Plan {
        self.read()
            .plan(uri, kid, now, self.min_refresh, self.max_age)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn fetch_jwks(http: &reqwest::Client, uri: &Url) -> Result<HashMap<String, Jwk>, OidcError> {
    let request = http
        .get(uri.clone())
        .header(reqwest::header::ACCEPT, "application/json");
    let answer = fetch::exchange("JWKS", request).await?;
    if !answer.status.is_success() {
        return Err(fetch::unexpected_status("JWKS", answer.status));
    }
    parse_jwks(&answer.body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rsa_jwk(kid: &str) -> serde_json::Value {
        json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"})
    }

    #[test]
    fn keeps_usable_keys_by_kid() {
        let body = json!({"keys": [
            rsa_jwk("a"),
            rsa_jwk("b"),
            {"kty": "RSA", "n": "abc", "e": "AQAB"},
            {"kty": "weird"},
            "not a key",
            {"kty": "RSA", "kid": "a", "n": "second", "e": "AQAB"},
        ]});
        let keys = parse_jwks(body.to_string().as_bytes()).expect("parses");
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["a", "b"]);
        assert_ne!(
            serde_json::to_value(&keys["a"]).expect("serialises")["n"],
            "second",
            "first key with a kid wins"
        );
    }

    #[test]
    fn non_key_sets_are_unavailable() {
        for body in ["", "{}", "[]", r#"{"keys": {}}"#] {
            assert!(
                matches!(parse_jwks(body.as_bytes()), Err(OidcError::Unavailable(_))),
                "{body}"
            );
        }
    }

    #[test]
    fn plans_fetches_only_when_needed_and_allowed() {
        let uri = Url::parse("https://idp.test/jwks").expect("url");
        let other = Url::parse("https://idp.test/jwks2").expect("url");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let jwk: Jwk = serde_json::from_value(rsa_jwk("a")).expect("jwk");
        let state = State {
            set: Some(KeySet {
                uri: uri.clone(),
                keys: Arc::new(HashMap::from([("a".to_owned(), jwk.clone())])),
                fetched_at: t0,
            }),
            last_attempt: Some(t0),
        };
        let (min, max) = (Duration::from_secs(30), Duration::from_secs(3600));
        let secs = |s| t0 + Duration::from_secs(s);
        let used = Plan::Use(Box::new(jwk));
        assert_eq!(State::default().plan(&uri, "a", t0, min, max), Plan::Fetch);
        assert_eq!(
            state.plan(&other, "a", t0, min, max),
            Plan::Fetch,
            "jwks_uri changed"
        );
        assert_eq!(state.plan(&uri, "a", secs(10), min, max), used);
        assert_eq!(state.plan(&uri, "zz", secs(10), min, max), Plan::Unknown);
        assert_eq!(state.plan(&uri, "zz", secs(30), min, max), Plan::Fetch);
        assert_eq!(
            state.plan(&uri, "a", secs(3600), min, max),
            Plan::Fetch,
            "old set"
        );
        let failing = State {
            last_attempt: Some(secs(3600)),
            ..state.clone()
        };
        assert_eq!(
            failing.plan(&uri, "a", secs(3601), min, max),
            used,
            "old set, refresh just failed: keep using it"
        );
    }
}
