//! The broker's own RS512 signing keys: client assertions (RFC 7523, OIDC `private_key_jwt`) for
//! CIS2 and APIM, and the public JWKS that CIS2 and APIM fetch to check them.
//!
//! Keys are listed newest first. The newest signs; every key stays in the JWKS, so a key can be
//! published before it signs and kept published until assertions signed with it have expired.

use crate::clock::unix_seconds;
use crate::secret::Secret;
use crate::session::token::random_urlsafe;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::PrivateKey as RsaPrivateKey;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
use rsa::traits::PublicKeyParts;
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// APIM refuses assertions whose `exp` is more than 5 minutes ahead.
pub const MAX_ASSERTION_LIFETIME: Duration = Duration::from_secs(300);

/// Smaller RSA keys are refused: NHS APIM and NIST both ask for at least 2048 bits.
const MIN_KEY_BITS: usize = 2048;
const GENERATED_KEY_BITS: usize = 2048;
/// 24 random bytes = 192 bits, above the 128 that a never-reused `jti` needs.
const JTI_BYTES: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("key id {0:?} is not valid: use 1 to 64 characters from A-Z a-z 0-9 . _ -")]
    InvalidKid(String),
    #[error("no signing key configured")]
    NoKeys,
    #[error("key id {0:?} is listed more than once")]
    DuplicateKid(String),
    #[error("cannot read signing key {kid:?} from {}: {source}", path.display())]
    Read {
        kid: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "signing key {kid:?} is not an unencrypted RSA private key in PKCS#8 (\"BEGIN PRIVATE KEY\") or PKCS#1 (\"BEGIN RSA PRIVATE KEY\") PEM form"
    )]
    BadPem { kid: String },
    #[error("signing key {kid:?} has {bits} bits: at least {MIN_KEY_BITS} are required")]
    WeakKey { kid: String, bits: usize },
    #[error("cannot generate an RSA key: {0}")]
    Generate(String),
    #[error("cannot sign a client assertion: {0}")]
    Sign(String),
    #[error("{} already exists: refusing to overwrite a key", .0.display())]
    Exists(PathBuf),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The broker's RS512 keys, newest first. `Debug` shows only the key ids.
#[derive(Clone)]
pub struct SigningKeys {
    keys: Vec<SigningKey>,
}

#[derive(Clone)]
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    public: Jwk,
}

impl fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeys")
            .field("kids", &self.kids())
            .finish()
    }
}

impl SigningKeys {
    /// Reads each `(kid, path)`; the first entry is the newest key and signs.
    pub fn from_pem_files(keys: &[(String, PathBuf)]) -> Result<Self, SigningError> {
        let pems = keys
            .iter()
            .map(|(kid, path)| {
                validate_kid(kid)?;
                let pem = std::fs::read_to_string(path).map_err(|source| SigningError::Read {
                    kid: kid.clone(),
                    path: path.clone(),
                    source,
                })?;
                Ok((kid.clone(), Secret::new(pem)))
            })
            .collect::<Result<Vec<_>, SigningError>>()?;
        Self::from_pems(&pems)
    }

    /// Parses each `(kid, PEM)`; the first entry is the newest key and signs.
    pub fn from_pems(keys: &[(String, Secret<String>)]) -> Result<Self, SigningError> {
        if keys.is_empty() {
            return Err(SigningError::NoKeys);
        }
        let mut parsed: Vec<SigningKey> = Vec::with_capacity(keys.len());
        for (kid, pem) in keys {
            validate_kid(kid)?;
            if parsed.iter().any(|k| &k.kid == kid) {
                return Err(SigningError::DuplicateKid(kid.clone()));
            }
            let private = parse_private_pem(kid, pem.expose())?;
            parsed.push(SigningKey::new(kid, &private)?);
        }
        Ok(Self { keys: parsed })
    }

    /// A fresh RSA 2048 key: for dev mode and tests, where nobody has registered a key.
    pub fn generate(kid: &str) -> Result<Self, SigningError> {
        validate_kid(kid)?;
        Self::from_private(kid, &generate_private_key()?)
    }

    fn from_private(kid: &str, private: &RsaPrivateKey) -> Result<Self, SigningError> {
        Ok(Self {
            keys: vec![SigningKey::new(kid, private)?],
        })
    }

    /// The key ids, newest first.
    pub fn kids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.kid.as_str()).collect()
    }

    /// Every public key (kty RSA, use sig, alg RS512, kid, n, e), newest first.
    pub fn public_jwks(&self) -> JwkSet {
        JwkSet {
            keys: self.keys.iter().map(|k| k.public.clone()).collect(),
        }
    }

    pub fn public_jwks_json(&self) -> serde_json::Value {
        serde_json::to_value(self.public_jwks())
            .expect("a JWK set of RSA public keys always serialises to JSON")
    }

    /// A client assertion as NHS APIM and CIS2 check it: RS512, `typ` JWT, the newest key's
    /// `kid`; `iss = sub = client_id`, `aud` the exact token URL, a fresh random `jti`, and an
    /// `exp` at most five minutes after `iat` whatever `lifetime` asks for.
    pub fn client_assertion(
        &self,
        client_id: &str,
        audience: &str,
        now: SystemTime,
        lifetime: Duration,
    ) -> Result<Secret<String>, SigningError> {
        let key = self.keys.first().ok_or(SigningError::NoKeys)?;
        let iat = unix_seconds(now);
        let lifetime = i64::try_from(lifetime.min(MAX_ASSERTION_LIFETIME).as_secs())
            .expect("at most 300 seconds fits in an i64");
        let claims = AssertionClaims {
            iss: client_id,
            sub: client_id,
            aud: audience,
            iat,
            exp: iat.saturating_add(lifetime),
            jti: random_urlsafe(JTI_BYTES),
        };
        let mut header = Header::new(Algorithm::RS512);
        header.typ = Some("JWT".to_owned());
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, &claims, &key.encoding)
            .map(Secret::new)
            .map_err(|e| SigningError::Sign(e.to_string()))
    }
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
    jti: String,
}

impl SigningKey {
    fn new(kid: &str, private: &RsaPrivateKey) -> Result<Self, SigningError> {
        let bits = private.n().bit_width_vartime() as usize;
        if bits < MIN_KEY_BITS {
            return Err(SigningError::WeakKey {
                kid: kid.to_owned(),
                bits,
            });
        }
        // jsonwebtoken's RustCrypto backend signs with a PKCS#1 DER private key.
        let der = private.to_pkcs1_der().map_err(|_| SigningError::BadPem {
            kid: kid.to_owned(),
        })?;
        let encoding = EncodingKey::from_rsa_der(der.as_bytes());
        let mut public = Jwk::from_encoding_key(&encoding, Algorithm::RS512).map_err(|_| {
            SigningError::BadPem {
                kid: kid.to_owned(),
            }
        })?;
        public.common.key_id = Some(kid.to_owned());
        public.common.public_key_use = Some(PublicKeyUse::Signature);
        public.common.key_algorithm = Some(KeyAlgorithm::RS512);
        Ok(Self {
            kid: kid.to_owned(),
            encoding,
            public,
        })
    }
}

/// Kids end up in file names and JWT headers: keep them to a safe, short alphabet.
pub fn validate_kid(kid: &str) -> Result<(), SigningError> {
    let ok = (1..=64).contains(&kid.len())
        && kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SigningError::InvalidKid(kid.to_owned()))
    }
}

fn parse_private_pem(kid: &str, pem: &str) -> Result<RsaPrivateKey, SigningError> {
    let bad = || SigningError::BadPem {
        kid: kid.to_owned(),
    };
    let pem = pem.trim();
    if pem.starts_with("-----BEGIN RSA PRIVATE KEY-----") {
        RsaPrivateKey::from_pkcs1_pem(pem).map_err(|_| bad())
    } else if pem.starts_with("-----BEGIN PRIVATE KEY-----") {
        RsaPrivateKey::from_pkcs8_pem(pem).map_err(|_| bad())
    } else {
        Err(bad())
    }
}

/// A fresh RSA 2048 private key as PKCS#8 PEM, for when one key must be shared (dev mode hands
/// the same key to the broker and to the simulator's client registration).
pub fn generate_private_pem() -> Result<Secret<String>, SigningError> {
    let private = generate_private_key()?;
    private_pkcs8_pem(&private)
}

fn private_pkcs8_pem(private: &RsaPrivateKey) -> Result<Secret<String>, SigningError> {
    private
        .to_pkcs8_pem(LineEnding::LF)
        .map(|pem| Secret::new(pem.to_string()))
        .map_err(|e| SigningError::Generate(e.to_string()))
}

fn generate_private_key() -> Result<RsaPrivateKey, SigningError> {
    RsaPrivateKey::new(&mut rand::rng(), GENERATED_KEY_BITS)
        .map_err(|e| SigningError::Generate(e.to_string()))
}

/// `session-broker keys generate`: writes `<dir>/<kid>.pem` (PKCS#8, mode 0600) and
/// `<dir>/<kid>.jwks.json` (the public key to register with NHS). Refuses to overwrite either.
pub fn generate_key_files(dir: &Path, kid: &str) -> Result<(PathBuf, PathBuf), SigningError> {
    validate_kid(kid)?;
    let pem_path = dir.join(format!("{kid}.pem"));
    let jwks_path = dir.join(format!("{kid}.jwks.json"));
    for path in [&pem_path, &jwks_path] {
        if path.exists() {
            return Err(SigningError::Exists(path.clone()));
        }
    }
    let private = generate_private_key()?;
    let keys = SigningKeys::from_private(kid, &private)?;
    let pem = private_pkcs8_pem(&private)?;
    let jwks = serde_json::to_string_pretty(&keys.public_jwks_json())
        .expect("a JSON value always serialises");
    write_new_file(&pem_path, pem.expose().as_bytes(), 0o600)?;
    write_new_file(&jwks_path, format!("{jwks}\n").as_bytes(), 0o644)?;
    Ok((pem_path, jwks_path))
}

/// `create_new` makes the no-overwrite promise hold even against a race with another writer.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), SigningError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let write_err = |source| SigningError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            SigningError::Exists(path.to_owned())
        } else {
            write_err(source)
        }
    })?;
    file.write_all(contents).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use std::collections::BTreeSet;

    const TOKEN_URL: &str = "https://int.api.service.nhs.uk/oauth2/token";

    fn pkcs8_pem(private: &RsaPrivateKey) -> Secret<String> {
        Secret::new(
            private
                .to_pkcs8_pem(LineEnding::LF)
                .expect("a generated key encodes")
                .to_string(),
        )
    }

    fn pkcs1_pem(private: &RsaPrivateKey) -> Secret<String> {
        Secret::new(
            private
                .to_pkcs1_pem(LineEnding::LF)
                .expect("a generated key encodes")
                .to_string(),
        )
    }

    fn key() -> RsaPrivateKey {
        generate_private_key().expect("key generation works")
    }

    /// Verifies `assertion` with the JWK of `kid` from `keys`' own JWKS, checking nothing else.
    fn verify(keys: &SigningKeys, assertion: &str) -> (Header, serde_json::Value) {
        let header = jsonwebtoken::decode_header(assertion).expect("header parses");
        let kid = header.kid.clone().expect("kid present");
        let jwks = keys.public_jwks();
        let jwk = jwks.find(&kid).expect("kid is in the JWKS");
        let mut validation = Validation::new(Algorithm::RS512);
        validation.validate_aud = false;
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let decoded = jsonwebtoken::decode::<serde_json::Value>(
            assertion,
            &DecodingKey::from_jwk(jwk).expect("JWK is usable"),
            &validation,
        )
        .expect("assertion verifies with the published key");
        (header, decoded.claims)
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("signing-{name}-{}", random_urlsafe(8)));
        std::fs::create_dir_all(&dir).expect("temp dir can be made");
        dir
    }

    #[test]
    fn assertion_verifies_and_has_exactly_the_required_claims() {
        let keys = SigningKeys::generate("k1").expect("generate");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let assertion = keys
            .client_assertion("api-key", TOKEN_URL, now, Duration::from_secs(300))
            .expect("signs");
        let (header, claims) = verify(&keys, assertion.expose());
        assert_eq!(header.alg, Algorithm::RS512);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert_eq!(header.kid.as_deref(), Some("k1"));
        let names: BTreeSet<&str> = claims
            .as_object()
            .expect("claims are an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            names,
            BTreeSet::from(["iss", "sub", "aud", "iat", "exp", "jti"])
        );
        assert_eq!(claims["iss"], "api-key");
        assert_eq!(claims["sub"], "api-key");
        assert_eq!(claims["aud"], TOKEN_URL);
        assert_eq!(claims["iat"], 1_700_000_000);
        assert_eq!(claims["exp"], 1_700_000_300);
        assert!(claims["jti"].as_str().expect("jti is a string").len() >= 22);
    }

    #[test]
    fn jti_is_fresh_and_lifetime_is_clamped_to_five_minutes() {
        let keys = SigningKeys::generate("k1").expect("generate");
        let now = SystemTime::now();
        let mut jtis = BTreeSet::new();
        for lifetime in [60, 300, 301, 3600, u64::MAX] {
            let assertion = keys
                .client_assertion("c", TOKEN_URL, now, Duration::from_secs(lifetime))
                .expect("signs");
            let (_, claims) = verify(&keys, assertion.expose());
            let iat = claims["iat"].as_i64().expect("iat");
            let exp = claims["exp"].as_i64().expect("exp");
            assert!(exp - iat <= 300, "lifetime {lifetime} gave {}", exp - iat);
            assert_eq!(exp - iat, lifetime.min(300) as i64);
            assert!(jtis.insert(claims["jti"].as_str().expect("jti").to_owned()));
        }
    }

    #[test]
    fn newest_key_signs_and_the_jwks_lists_every_key() {
        let (new, old) = (key(), key());
        let keys = SigningKeys::from_pems(&[
            ("new-2025".to_owned(), pkcs8_pem(&new)),
            ("old-2024".to_owned(), pkcs1_pem(&old)),
        ])
        .expect("both PEM forms load");
        assert_eq!(keys.kids(), vec!["new-2025", "old-2024"]);
        let assertion = keys
            .client_assertion("c", TOKEN_URL, SystemTime::now(), MAX_ASSERTION_LIFETIME)
            .expect("signs");
        let (header, _) = verify(&keys, assertion.expose());
        assert_eq!(header.kid.as_deref(), Some("new-2025"));

        let jwks = keys.public_jwks_json();
        let listed = jwks["keys"].as_array().expect("keys array");
        assert_eq!(listed.len(), 2);
        for (jwk, kid) in listed.iter().zip(["new-2025", "old-2024"]) {
            assert_eq!(jwk["kid"], kid);
            assert_eq!(jwk["kty"], "RSA");
            assert_eq!(jwk["use"], "sig");
            assert_eq!(jwk["alg"], "RS512");
            assert_eq!(jwk["e"], "AQAB");
            assert!(jwk["n"].as_str().expect("n").len() > 300);
            assert!(jwk.get("d").is_none() && jwk.get("p").is_none());
        }
    }

    type Case = (Vec<(String, Secret<String>)>, &'static str);

    #[test]
    fn bad_input_is_refused() {
        let good = pkcs8_pem(&key());
        let weak = pkcs8_pem(&RsaPrivateKey::new(&mut rand::rng(), 1024).expect("1024-bit key"));
        let public_only = Secret::new(
            "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----\n"
                .to_owned(),
        );
        let truncated = Secret::new(good.expose()[..200].to_owned());
        let cases: Vec<Case> = vec![
            (vec![], "NoKeys"),
            (vec![("k".into(), Secret::new("junk".into()))], "BadPem"),
            (vec![("k".into(), public_only)], "BadPem"),
            (vec![("k".into(), truncated)], "BadPem"),
            (vec![("k".into(), weak)], "WeakKey"),
            (vec![("".into(), good.clone())], "InvalidKid"),
            (vec![("a/b".into(), good.clone())], "InvalidKid"),
            (vec![("k".repeat(65), good.clone())], "InvalidKid"),
            (
                vec![("k".into(), good.clone()), ("k".into(), good.clone())],
                "DuplicateKid",
            ),
        ];
        for (input, want) in cases {
            let err = SigningKeys::from_pems(&input).expect_err(want);
            assert!(format!("{err:?}").starts_with(want), "{want}: got {err:?}");
            assert!(!err.to_string().contains("MII"), "no key material in {err}");
        }
        assert!(matches!(
            SigningKeys::generate("no spaces"),
            Err(SigningError::InvalidKid(_))
        ));
    }

    #[test]
    fn a_generated_pem_loads_as_a_signing_key() {
        let pem = generate_private_pem().expect("generates");
        assert!(pem.expose().starts_with("-----BEGIN PRIVATE KEY-----"));
        let keys = SigningKeys::from_pems(&[("dev".to_owned(), pem)]).expect("loads");
        assert_eq!(keys.kids(), vec!["dev"]);
    }

    #[test]
    fn debug_shows_kids_but_no_key_material() {
        let keys = SigningKeys::generate("dev-1").expect("generate");
        let debug = format!("{keys:?}");
        assert_eq!(debug, r#"SigningKeys { kids: ["dev-1"] }"#);
    }

    #[test]
    fn key_files_are_written_loadable_private_and_never_overwritten() {
        let dir = temp_dir("files");
        let (pem, jwks) = generate_key_files(&dir, "broker-2025-01").expect("writes");
        assert_eq!(pem, dir.join("broker-2025-01.pem"));
        assert_eq!(jwks, dir.join("broker-2025-01.jwks.json"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&pem)
                .expect("pem exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let pem_text = std::fs::read_to_string(&pem).expect("pem readable");
        assert!(pem_text.starts_with("-----BEGIN PRIVATE KEY-----"));

        let keys = SigningKeys::from_pem_files(&[("broker-2025-01".to_owned(), pem.clone())])
            .expect("written key loads");
        let published: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&jwks).expect("jwks readable"))
                .expect("jwks is JSON");
        assert_eq!(published, keys.public_jwks_json());

        let before = std::fs::read(&pem).expect("pem readable");
        assert!(matches!(
            generate_key_files(&dir, "broker-2025-01"),
            Err(SigningError::Exists(_))
        ));
        assert_eq!(std::fs::read(&pem).expect("pem readable"), before);

        std::fs::remove_file(&pem).expect("remove pem");
        assert!(
            matches!(generate_key_files(&dir, "broker-2025-01"), Err(SigningError::Exists(p)) if p == jwks),
            "an existing JWKS alone also blocks"
        );
        assert!(!pem.exists(), "nothing written when refusing");
        assert!(matches!(
            generate_key_files(&dir, "../escape"),
            Err(SigningError::InvalidKid(_))
        ));
        assert!(matches!(
            SigningKeys::from_pem_files(&[("k".to_owned(), dir.join("missing.pem"))]),
            Err(SigningError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
