//! PKCE (RFC 7636) with S256. CIS2 does not require it, but it binds the code to this sign-in.

use crate::secret::Secret;
use crate::session::token::random_urlsafe;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// 32 random bytes give a 43-character verifier: the RFC's minimum length, 256 bits of entropy.
const VERIFIER_BYTES: usize = 32;

pub fn new_verifier() -> Secret<String> {
    Secret::new(random_urlsafe(VERIFIER_BYTES))
}

/// `BASE64URL(SHA256(verifier))`, unpadded.
pub fn challenge_s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_rfc_7636_example() {
        assert_eq!(
            challenge_s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn verifiers_are_long_unreserved_and_fresh() {
        let a = new_verifier();
        let b = new_verifier();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose().len(), 43);
        assert!(
            a.expose()
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        assert_eq!(format!("{a:?}"), "[redacted]");
    }
}
