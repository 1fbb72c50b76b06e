//! Sealing records at rest: AES-256-GCM under a key ring. The newest key seals; any listed key
//! opens, so keys rotate without signing anyone out. Removing a key makes what it sealed
//! unreadable, which callers treat as "no such session".
//!
//! Sealed form: `v1 | key-id length | key id | 96-bit nonce | ciphertext+tag`. The associated data
//! binds a record to its store key, so a record copied under another key does not open.
//!
//! Every hot call opens one or two sealed values, so the AEAD is ring's, whose AES-GCM hashes
//! several blocks at a time. Against the `aes-gcm` crate used before, that took 4.9k of 123k
//! instructions off a GetCurrentAal call and 5.6k off a cached GetPdsToken
//! (scripts/instructions.sh). The sealed form is standard AES-256-GCM either way; a test pins a
//! value sealed by another implementation.

use crate::secret::Secret;
use rand::Rng;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::Serialize;
use serde::de::DeserializeOwned;

const VERSION: u8 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("sealed with a key that is no longer in the key ring ({0})")]
    UnknownKey(String),
    #[error("sealed data is malformed, tampered with, or bound to another key")]
    Corrupt,
    #[error("record could not be encoded: {0}")]
    Encode(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyRingError {
    #[error("the key ring is empty: at least one encryption key is required")]
    Empty,
    #[error("key {0:?}: a key id must be 1 to 64 characters of A-Z a-z 0-9 . _ -")]
    BadId(String),
    #[error("key {0:?}: the key must be 32 bytes, base64-encoded")]
    BadKey(String),
    #[error("key id {0:?} is listed twice")]
    Duplicate(String),
}

pub struct KeyRing {
    /// Newest first: `keys[0]` seals.
    keys: Vec<(String, LessSafeKey)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("KeyRing").field("key_ids", &ids).finish()
    }
}

impl KeyRing {
    /// `keys` as `(id, base64 of 32 bytes)`, newest first.
    pub fn new(keys: &[(String, Secret<String>)]) -> Result<Self, KeyRingError> {
        use base64::Engine;
        if keys.is_empty() {
            return Err(KeyRingError::Empty);
        }
        let mut ring = Vec::with_capacity(keys.len());
        for (id, key) in keys {
            let id_ok = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !id_ok {
                return Err(KeyRingError::BadId(id.clone()));
            }
            if ring.iter().any(|(seen, _)| seen == id) {
                return Err(KeyRingError::Duplicate(id.clone()));
            }
            let raw = base64::engine::general_purpose::STANDARD
                .decode(key.expose().trim())
                .map_err(|_| KeyRingError::BadKey(id.clone()))?;
            let key = UnboundKey::new(&AES_256_GCM, &raw)
                .map_err(|_| KeyRingError::BadKey(id.clone()))?;
            ring.push((id.clone(), LessSafeKey::new(key)));
        }
        Ok(KeyRing { keys: ring })
    }

    /// A fresh random key, base64-encoded (for `dev` mode and for operators making keys).
    pub fn generate_key() -> Secret<String> {
        use base64::Engine;
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Secret::new(base64::engine::general_purpose::STANDARD.encode(key))
    }

    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
        let (id, key) = &self.keys[0];
        // A random 96-bit nonce per value. NIST SP 800-38D allows 2^32 seals per key so; see
        // docs/key-rotation.md for how far a deployment stays below that.
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let id_len =
            u8::try_from(id.len()).map_err(|_| SealError::Encode("key id too long".into()))?;
        let tag_len = AES_256_GCM.tag_len();
        let mut out = Vec::with_capacity(2 + id.len() + NONCE_LEN + plaintext.len() + tag_len);
        out.push(VERSION);
        out.push(id_len);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&nonce);
        let header = out.len();
        out.extend_from_slice(plaintext);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[header..],
            )
            .map_err(|_| SealError::Encode("encryption failed".into()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, SealError> {
        let (&version, rest) = sealed.split_first().ok_or(SealError::Corrupt)?;
        if version != VERSION {
            return Err(SealError::Corrupt);
        }
        let (&id_len, rest) = rest.split_first().ok_or(SealError::Corrupt)?;
        let id_len = usize::from(id_len);
        if rest.len() < id_len + NONCE_LEN {
            return Err(SealError::Corrupt);
        }
        let (id, rest) = rest.split_at(id_len);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let id = std::str::from_utf8(id).map_err(|_| SealError::Corrupt)?;
        let (_, key) = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .ok_or_else(|| SealError::UnknownKey(id.to_owned()))?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Corrupt)?;
        let mut plain = ciphertext.to_vec();
        let len = key
            .open_in_place(nonce, Aad::from(aad), &mut plain)
            .map_err(|_| SealError::Corrupt)?
            .len();
        plain.truncate(len);
        Ok(plain)
    }

    pub fn seal_json<T: Serialize>(&self, value: &T, aad: &[u8]) -> Result<Vec<u8>, SealError> {
        let plain = serde_json::to_vec(value).map_err(|e| SealError::Encode(e.to_string()))?;
        self.seal(&plain, aad)
    }

    pub fn open_json<T: DeserializeOwned>(
        &self,
        sealed: &[u8],
        aad: &[u8],
    ) -> Result<T, SealError> {
        let plain = self.open(sealed, aad)?;
        serde_json::from_slice(&plain).map_err(|_| SealError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(ids: &[&str]) -> (KeyRing, Vec<(String, Secret<String>)>) {
        let keys: Vec<_> = ids
            .iter()
            .map(|id| (id.to_string(), KeyRing::generate_key()))
            .collect();
        (KeyRing::new(&keys).expect("generated keys are valid"), keys)
    }

    #[test]
    fn round_trips_and_hides_the_plaintext() {
        let (ring, _) = ring(&["k1"]);
        let sealed = ring
            .seal(b"eyJhbGciOi.secret.token", b"sess:1")
            .expect("seals");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            ring.open(&sealed, b"sess:1").expect("opens"),
            b"eyJhbGciOi.secret.token"
        );
    }

    #[test]
    fn a_record_bound_to_one_key_does_not_open_under_another() {
        let (ring, _) = ring(&["k1"]);
        let sealed = ring.seal(b"x", b"sess:1").expect("seals");
        assert_eq!(ring.open(&sealed, b"sess:2"), Err(SealError::Corrupt));
    }

    #[test]
    fn tampering_is_detected() {
        let (ring, _) = ring(&["k1"]);
        let sealed = ring.seal(b"hello", b"a").expect("seals");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(ring.open(&bad, b"a").is_err(), "flip at {i} went unnoticed");
        }
        assert_eq!(ring.open(&[], b"a"), Err(SealError::Corrupt));
        assert_eq!(ring.open(&sealed[..10], b"a"), Err(SealError::Corrupt));
    }

    #[test]
    fn rotation_keeps_old_records_and_removal_drops_them() {
        let (old, old_keys) = ring(&["old"]);
        let sealed = old.seal(b"kept", b"k").expect("seals");
        let mut rotated_keys = vec![("new".to_string(), KeyRing::generate_key())];
        rotated_keys.extend(old_keys.iter().cloned());
        let rotated = KeyRing::new(&rotated_keys).expect("valid");
        assert_eq!(
            rotated.open(&sealed, b"k").expect("old key still opens"),
            b"kept"
        );
        let resealed = rotated.seal(b"kept", b"k").expect("seals");
        assert_eq!(resealed[2..5], *b"new");
        let only_new = KeyRing::new(&rotated_keys[..1]).expect("valid");
        assert_eq!(
            only_new.open(&sealed, b"k"),
            Err(SealError::UnknownKey("old".into()))
        );
    }

    #[test]
    fn opens_a_value_sealed_by_another_aes_256_gcm() {
        // Sealed by an independent AES-256-GCM (Python's `cryptography`) in this format: records
        // and grants sealed by earlier versions must keep opening, whatever implements the AEAD.
        use base64::Engine;
        let key = Secret::new("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_string());
        let ring = KeyRing::new(&[("k2026".into(), key)]).expect("a valid key");
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(
                "AQVrMjAyNmRlZmdoaWprbG1ubyk7rQMKmj/xUEItjbkKGJlisWNr5wmXUsWojCmV\
                 g8Ap5oUppT4y7WGPgBFQk/DxKpPqwUTyCqrzcfqlvGc=",
            )
            .expect("valid base64");
        let aad = b"session|0123456789abcdef0123456789abcdef";
        assert_eq!(
            ring.open(&sealed, aad).expect("opens"),
            b"a session record sealed by an earlier version"
        );
        assert_eq!(
            ring.open(&sealed, b"session|other"),
            Err(SealError::Corrupt)
        );
    }

    #[test]
    fn bad_rings_are_refused() {
        assert_eq!(KeyRing::new(&[]).unwrap_err(), KeyRingError::Empty);
        let short = Secret::new("c2hvcnQ=".to_string());
        assert!(matches!(
            KeyRing::new(&[("k".into(), short)]),
            Err(KeyRingError::BadKey(_))
        ));
        let k = KeyRing::generate_key();
        assert!(matches!(
            KeyRing::new(&[("bad id".into(), k.clone())]),
            Err(KeyRingError::BadId(_))
        ));
        assert!(matches!(
            KeyRing::new(&[("a".into(), k.clone()), ("a".into(), k)]),
            Err(KeyRingError::Duplicate(_))
        ));
    }
}
