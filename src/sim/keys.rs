//! The simulator's RSA keys: the provider key whose public half is published at
//! `/connect/jwk_uri`, and a "rogue" key that signs tokens which must fail verification.
//!
//! RSA generation takes a noticeable fraction of a second, and tests start many simulators, so
//! both keys are made once per process ([`provider_key`], [`rogue_key`]). [`SimKey::generate`]
//! is public so that tests can make client keys for `private_key_jwt` too.

use crate::secret::Secret;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
    RSAKeyParameters, RSAKeyType,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use rsa::pkcs1::{EncodeRsaPrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use std::sync::OnceLock;

const RSA_BITS: usize = 2048;

/// The kid under which the simulator publishes its signing key.
pub const PROVIDER_KID: &str = "cis2-sim-rs256-1";
/// A kid that is never published: the `UnknownKid` fault signs under it.
pub const UNKNOWN_KID: &str = "cis2-sim-not-published";

/// An RSA key pair with its kid and the algorithm its JWK advertises.
pub struct SimKey {
    kid: String,
    alg: Algorithm,
    private_pem: Secret<String>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    n: String,
    e: String,
}

impl std::fmt::Debug for SimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl SimKey {
    /// A fresh 2048-bit key. Slow (RSA prime search): call it off the async runtime, or once.
    pub fn generate(kid: impl Into<String>, alg: Algorithm) -> Self {
        let private = rsa::PrivateKey::new(&mut rand::rng(), RSA_BITS)
            .expect("2048-bit RSA generation only fails if the OS random source fails");
        let pem = private
            .to_pkcs1_pem(LineEnding::LF)
            .expect("PKCS#1 encoding of a freshly generated key cannot fail")
            .to_string();
        let public = private.to_public_key();
        let n = URL_SAFE_NO_PAD.encode(public.n_bytes());
        let e = URL_SAFE_NO_PAD.encode(public.e_bytes());
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes())
            .expect("jsonwebtoken reads the PKCS#1 PEM that rsa just wrote");
        let decoding = DecodingKey::from_rsa_components(&n, &e)
            .expect("base64url modulus and exponent of a valid key always decode");
        SimKey {
            kid: kid.into(),
            alg,
            private_pem: Secret::new(pem),
            encoding,
            decoding,
            n,
            e,
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn alg(&self) -> Algorithm {
        self.alg
    }

    /// PKCS#1 PEM of the private key, as `jsonwebtoken::EncodingKey::from_rsa_pem` reads it.
    pub fn private_pem(&self) -> &str {
        self.private_pem.expose()
    }

    pub fn encoding_key(&self) -> &EncodingKey {
        &self.encoding
    }

    pub fn decoding_key(&self) -> &DecodingKey {
        &self.decoding
    }

    /// The public half as a JWK: `kty`, `kid`, `use: sig`, `alg`, `n`, `e`.
    pub fn public_jwk(&self) -> Jwk {
        Jwk {
            common: CommonParameters {
                public_key_use: Some(PublicKeyUse::Signature),
                key_algorithm: Some(key_algorithm(self.alg)),
                key_id: Some(self.kid.clone()),
                ..Default::default()
            },
            algorithm: AlgorithmParameters::RSA(RSAKeyParameters {
                key_type: RSAKeyType::RSA,
                n: self.n.clone(),
                e: self.e.clone(),
            }),
        }
    }

    /// A JWKS holding just this key's public half.
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: vec![self.public_jwk()],
        }
    }
}

fn key_algorithm(alg: Algorithm) -> KeyAlgorithm {
    match alg {
        Algorithm::RS384 => KeyAlgorithm::RS384,
        Algorithm::RS512 => KeyAlgorithm::RS512,
        Algorithm::PS256 => KeyAlgorithm::PS256,
        Algorithm::PS384 => KeyAlgorithm::PS384,
        Algorithm::PS512 => KeyAlgorithm::PS512,
        // The simulator only makes RSA keys; RS256 is CIS2's ID token algorithm.
        _ => KeyAlgorithm::RS256,
    }
}

/// The key that signs every good ID token, published in the JWKS. Made once per process.
pub fn provider_key() -> &'static SimKey {
    static KEY: OnceLock<SimKey> = OnceLock::new();
    KEY.get_or_init(|| SimKey::generate(PROVIDER_KID, Algorithm::RS256))
}

/// A key never published: `BadSignature` and `UnknownKid` tokens are signed with it, so no
/// client can verify them whatever key-selection shortcut it takes. Made once per process.
pub fn rogue_key() -> &'static SimKey {
    static KEY: OnceLock<SimKey> = OnceLock::new();
    KEY.get_or_init(|| SimKey::generate(PROVIDER_KID, Algorithm::RS256))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Header, Validation, decode, encode};
    use serde_json::{Value, json};

    #[test]
    fn provider_and_rogue_keys_are_distinct_and_made_once() {
        assert!(std::ptr::eq(provider_key(), provider_key()));
        assert_ne!(provider_key().n, rogue_key().n);
        assert_eq!(provider_key().kid(), PROVIDER_KID);
    }

    #[test]
    fn the_published_jwk_verifies_what_the_pem_signs() {
        let key = provider_key();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(key.kid().to_string());
        let token = encode(
            &header,
            &json!({"exp": 4_000_000_000u64}),
            key.encoding_key(),
        )
        .expect("signing with the provider key works");

        let jwk = key.public_jwk();
        assert_eq!(jwk.common.key_id.as_deref(), Some(PROVIDER_KID));
        let from_jwk = DecodingKey::from_jwk(&jwk).expect("the JWK is a valid RSA key");
        let validation = Validation::new(Algorithm::RS256);
        assert!(decode::<Value>(&token, &from_jwk, &validation).is_ok());

        let rogue = DecodingKey::from_jwk(&rogue_key().public_jwk()).expect("valid RSA key");
        assert!(decode::<Value>(&token, &rogue, &validation).is_err());
    }

    #[test]
    fn pem_reloads_and_debug_hides_the_private_key() {
        let key = provider_key();
        assert!(EncodingKey::from_rsa_pem(key.private_pem().as_bytes()).is_ok());
        let debug = format!("{key:?}");
        assert!(!debug.contains("PRIVATE"));
        let jwks = serde_json::to_value(key.jwks()).expect("a JWKS serialises");
        assert_eq!(jwks["keys"][0]["kty"], "RSA");
        assert_eq!(jwks["keys"][0]["alg"], "RS256");
        assert_eq!(jwks["keys"][0]["use"], "sig");
        assert_eq!(jwks["keys"][0]["e"], "AQAB");
    }
}
