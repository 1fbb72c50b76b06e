//! Session tokens and the keys derived from them.
//!
//! A session token is `cis2sb_` + 43 base64url characters (256 random bits). The prefix lets
//! secret scanners spot a leaked token. The store only ever sees `SessionId`, the first 128 bits
//! of SHA-256(token) in hex: enough to be unique, useless for signing in.

use crate::secret::Secret;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng;
use sha2::{Digest, Sha256};
use std::fmt;

const PREFIX: &str = "cis2sb_";
const RANDOM_BYTES: usize = 32;
const ENCODED_LEN: usize = 43;

/// The secret bearer handle a caller holds. Not `Clone`: it is made once and handed out once.
#[derive(Debug)]
pub struct SessionToken(Secret<String>);

impl SessionToken {
    pub fn generate() -> Self {
        SessionToken(Secret::new(format!(
            "{PREFIX}{}",
            random_urlsafe(RANDOM_BYTES)
        )))
    }

    /// Accepts only the exact shape `generate` makes, so junk never reaches the store.
    pub fn parse(raw: &str) -> Option<Self> {
        let body = raw.strip_prefix(PREFIX)?;
        if body.len() != ENCODED_LEN {
            return None;
        }
        let bytes = URL_SAFE_NO_PAD.decode(body).ok()?;
        (bytes.len() == RANDOM_BYTES).then(|| SessionToken(Secret::new(raw.to_owned())))
    }

    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    pub fn id(&self) -> SessionId {
        SessionId(short_hash(self.0.expose()))
    }
}

/// A non-secret session id: for store keys, logs, spans and admin views.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionId(String);

impl SessionId {
    /// Accepts the 32-hex-digit form (admin input, records); anything else is `None`.
    pub fn parse(raw: &str) -> Option<Self> {
        (raw.len() == 32
            && raw
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| SessionId(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The store key of a pending sign-in: a hash of its `state`, so a copy of the store cannot be
/// used to complete someone's sign-in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoginKey(String);

impl LoginKey {
    pub fn from_state(state: &str) -> Self {
        LoginKey(short_hash(state))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `n` random bytes as unpadded base64url: state, nonce, PKCE verifier, token ids.
pub fn random_urlsafe(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

fn short_hash(value: &str) -> String {
    let digest = Sha256::digest(value.as_bytes());
    crate::hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_are_unique() {
        let a = SessionToken::generate();
        let b = SessionToken::generate();
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with(PREFIX));
        let parsed = SessionToken::parse(a.expose()).expect("a generated token parses");
        assert_eq!(parsed.id(), a.id());
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = SessionToken::generate();
        let body = &good.expose()[PREFIX.len()..];
        for bad in [
            String::new(),
            body.to_string(),
            format!("{PREFIX}{}", &body[1..]),
            format!("{PREFIX}{body}A"),
            format!("{PREFIX}{}!", &body[1..]),
            format!("xxxxxx_{body}"),
            format!("{PREFIX}{}", "=".repeat(43)),
        ] {
            assert!(
                SessionToken::parse(&bad).is_none(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn ids_never_contain_the_token() {
        let t = SessionToken::generate();
        let id = t.id();
        assert_eq!(id.as_str().len(), 32);
        assert!(!t.expose().contains(id.as_str()));
        assert!(SessionId::parse(id.as_str()).is_some());
        assert!(SessionId::parse("not-an-id").is_none());
        assert!(format!("{t:?}").contains("redacted"));
    }

    #[test]
    fn login_keys_hash_the_state() {
        let k = LoginKey::from_state("some-state");
        assert_eq!(k, LoginKey::from_state("some-state"));
        assert_ne!(k, LoginKey::from_state("other-state"));
        assert!(!k.as_str().contains("some-state"));
    }
}
