//! An APIM grant as it sits, sealed, in a session's token cache.
//!
//! Every cached GetPdsToken call opens one, so it is stored the way the session record is
//! (`session::codec`): a format byte and a Protocol Buffers message, a few bytes to decode.
//! Grants that earlier versions cached as JSON still open. Those versions cannot read this form:
//! to them the entry does not open, and they fetch a new token as if none were cached.

use super::client::TokenGrant;
use super::tokens::IssuedToken;
use crate::secret::Secret;
use crate::session::KeyRing;
use crate::session::codec::{Decoded, decode_message, encode_message};
use crate::session::crypto::SealError;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An ID token or refresh token with less than this left is treated as expired: it could expire
/// in flight, and APIM would refuse it.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(5);

/// What is sealed in a cache field. Field numbers are the format: add, never renumber or reuse.
/// Its fields are secrets, so `Debug` prints none of them.
#[derive(Clone, PartialEq, prost::Message, serde::Deserialize)]
#[prost(skip_debug)]
pub struct CachedGrant {
    #[prost(string, tag = "1")]
    access_token: String,
    #[prost(string, tag = "2")]
    token_type: String,
    #[prost(uint64, tag = "3")]
    expires_at_ms: u64,
    #[prost(string, optional, tag = "4")]
    refresh_token: Option<String>,
    #[prost(uint64, optional, tag = "5")]
    refresh_expires_at_ms: Option<u64>,
    #[prost(string, optional, tag = "6")]
    scope: Option<String>,
}

impl std::fmt::Debug for CachedGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CachedGrant([redacted])")
    }
}

impl CachedGrant {
    pub fn from_grant(grant: &TokenGrant) -> Self {
        CachedGrant {
            access_token: grant.access_token.expose().clone(),
            token_type: grant.token_type.clone(),
            expires_at_ms: to_ms(grant.expires_at),
            refresh_token: grant.refresh_token.as_ref().map(|t| t.expose().clone()),
            refresh_expires_at_ms: grant.refresh_expires_at.map(to_ms),
            scope: grant.scope.clone(),
        }
    }

    /// Sealed under the ring's newest key, bound to `aad`.
    pub fn seal(&self, keys: &KeyRing, aad: &[u8]) -> Result<Vec<u8>, SealError> {
        keys.seal(&encode_message(self), aad)
    }

    /// Opens what [`CachedGrant::seal`] sealed, or an earlier version's JSON.
    pub fn open(keys: &KeyRing, sealed: &[u8], aad: &[u8]) -> Result<Self, SealError> {
        match decode_message::<CachedGrant, CachedGrant>(&keys.open(sealed, aad)?)? {
            Decoded::Current(grant) | Decoded::Legacy(grant) => Ok(grant),
        }
    }

    pub fn access_token(&self) -> &str {
        &self.access_token
    }

    pub fn expires_at(&self) -> SystemTime {
        from_ms(self.expires_at_ms)
    }

    pub fn valid_for(&self, now: SystemTime) -> Duration {
        self.expires_at()
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }

    /// The refresh token, if it is not known to have expired.
    pub fn usable_refresh_token(&self, now: SystemTime) -> Option<&str> {
        let alive = self
            .refresh_expires_at_ms
            .is_none_or(|at| usable_until(from_ms(at), now));
        self.refresh_token.as_deref().filter(|_| alive)
    }

    /// The same grant without its refresh token (APIM refused it).
    pub fn without_refresh_token(self) -> Self {
        CachedGrant {
            refresh_token: None,
            refresh_expires_at_ms: None,
            ..self
        }
    }

    /// The token to hand out; the grant is done with, so its strings move, uncopied.
    pub fn into_issued(self) -> IssuedToken {
        IssuedToken {
            expires_at: self.expires_at(),
            access_token: Secret::new(self.access_token),
            token_type: self.token_type,
        }
    }
}

/// Whether something expiring at `expires_at` is still good to send, with the margin.
pub fn usable_until(expires_at: SystemTime, now: SystemTime) -> bool {
    now.checked_add(EXPIRY_MARGIN)
        .is_some_and(|t| t < expires_at)
}

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::Engine;

    pub fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    /// A grant of `access` with `valid_for` left at [`t0`], and a refresh token "rt".
    pub fn grant(access: &str, valid_for: Duration) -> CachedGrant {
        CachedGrant::from_grant(&TokenGrant {
            access_token: Secret::new(access.into()),
            token_type: "Bearer".into(),
            expires_at: t0() + valid_for,
            refresh_token: Some(Secret::new("rt".into())),
            refresh_expires_at: None,
            scope: None,
        })
    }

    fn ring(key_byte: u8) -> KeyRing {
        let key = base64::engine::general_purpose::STANDARD.encode([key_byte; 32]);
        KeyRing::new(&[("k1".to_owned(), Secret::new(key))]).expect("valid key")
    }

    fn full() -> CachedGrant {
        CachedGrant::from_grant(&TokenGrant {
            access_token: Secret::new("Sr5PGv19wTEHJdDr2wx2f7IGd0cw".into()),
            token_type: "Bearer".into(),
            expires_at: t0() + Duration::from_secs(599),
            refresh_token: Some(Secret::new("mRbLt6rPYdFrmSS7bpcBOn4IxnUi".into())),
            refresh_expires_at: Some(t0() + Duration::from_secs(43_199)),
            scope: Some("nhs-cis2".into()),
        })
    }

    #[test]
    fn round_trips_sealed_and_bound_to_its_field() {
        let keys = ring(7);
        for g in [full(), grant("a", Duration::ZERO).without_refresh_token()] {
            let sealed = g.seal(&keys, b"s|aal2:g0").expect("seals");
            assert_eq!(CachedGrant::open(&keys, &sealed, b"s|aal2:g0"), Ok(g));
            assert_eq!(
                CachedGrant::open(&keys, &sealed, b"s|aal3:g1"),
                Err(SealError::Corrupt)
            );
            assert_eq!(
                CachedGrant::open(&ring(8), &sealed, b"s|aal2:g0"),
                Err(SealError::Corrupt)
            );
        }
    }

    #[test]
    fn grants_cached_as_json_by_earlier_versions_still_open() {
        let keys = ring(7);
        // What versions up to 14e23c1 sealed (`KeyRing::seal_json` of the grant).
        let json = serde_json::json!({
            "access_token": "Sr5PGv19wTEHJdDr2wx2f7IGd0cw",
            "token_type": "Bearer",
            "expires_at_ms": to_ms(t0() + Duration::from_secs(599)),
            "refresh_token": "mRbLt6rPYdFrmSS7bpcBOn4IxnUi",
            "refresh_expires_at_ms": to_ms(t0() + Duration::from_secs(43_199)),
            "scope": "nhs-cis2",
        });
        let sealed = keys.seal_json(&json, b"aad").expect("seals");
        assert_eq!(CachedGrant::open(&keys, &sealed, b"aad"), Ok(full()));
        let json = serde_json::json!({
            "access_token": "a", "token_type": "Bearer", "expires_at_ms": 5,
            "refresh_token": null, "refresh_expires_at_ms": null, "scope": null,
        });
        let sealed = keys.seal_json(&json, b"aad").expect("seals");
        let opened = CachedGrant::open(&keys, &sealed, b"aad").expect("opens");
        assert_eq!(opened.access_token(), "a");
        assert_eq!(opened.usable_refresh_token(UNIX_EPOCH), None);
    }

    #[test]
    fn malformed_values_do_not_open() {
        let keys = ring(7);
        for plain in [
            &b""[..],
            b"\x02\xff\xff",
            b"{\"access_token\":1}",
            b"\x09abc",
        ] {
            let sealed = keys.seal(plain, b"aad").expect("seals");
            assert_eq!(
                CachedGrant::open(&keys, &sealed, b"aad"),
                Err(SealError::Corrupt),
                "{plain:?}"
            );
        }
    }

    #[test]
    fn the_binary_form_is_pinned() {
        // Changing these bytes breaks grants cached by running replicas: add fields instead.
        let hex = crate::hex::encode(&encode_message(&full()));
        assert_eq!(
            hex,
            "020a1c5372355047763139775445484a644472327778326637494764306377120642656172657218\
             d8e795c3b134221c6d52624c74367250596446726d535337627063424f6e3449786e55692898f4bd\
             d7b13432086e68732d63697332"
        );
    }

    #[test]
    fn debug_shows_no_token() {
        let shown = format!("{:?}", full());
        assert_eq!(shown, "CachedGrant([redacted])");
    }

    #[test]
    fn expiring_refresh_tokens_are_not_offered() {
        let mut g = grant("a", Duration::from_secs(60));
        assert_eq!(g.usable_refresh_token(t0()), Some("rt"));
        g.refresh_expires_at_ms = Some(to_ms(t0() + Duration::from_secs(60)));
        assert_eq!(g.usable_refresh_token(t0()), Some("rt"));
        g.refresh_expires_at_ms = Some(to_ms(t0() + EXPIRY_MARGIN));
        assert_eq!(g.usable_refresh_token(t0()), None);
        assert_eq!(g.without_refresh_token().usable_refresh_token(t0()), None);
    }

    #[test]
    fn milliseconds_round_trip_and_clamp() {
        let t = t0() + Duration::from_millis(123);
        assert_eq!(from_ms(to_ms(t)), t);
        assert_eq!(to_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
