//! The JOSE layer of an ID token: header, key choice and signature. Claims are checked in
//! [`super::claims`] once the signature holds.

use super::claims::Rejection;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde_json::Value;

/// CIS2 ID tokens are a few kilobytes; anything this large is not one.
const MAX_TOKEN_BYTES: usize = 64 * 1024;

/// What the header says, once it passed the allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoseHeader {
    pub alg: Algorithm,
    pub kid: String,
}

/// Reads the header of a compact JWS. Only RS256 and RS512 pass: `none`, HMAC (where a public key
/// could be misused as the secret) and everything else are refused before any key is touched.
pub fn parse_header(token: &str) -> Result<JoseHeader, Rejection> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Rejection::MalformedJwt);
    }
    let parts: Vec<&str> = token.split('.').collect();
    let [header, payload, signature] = parts.as_slice() else {
        return Err(Rejection::MalformedJwt);
    };
    if [header, payload, signature].iter().any(|p| p.is_empty()) {
        // An empty signature is what `alg: none` looks like; say so when the header agrees.
        return match header_json(header)?.get("alg").and_then(Value::as_str) {
            Some(alg) if !matches!(alg, "RS256" | "RS512") => Err(not_allowed(alg)),
            _ => Err(Rejection::MalformedJwt),
        };
    }
    let json = header_json(header)?;
    let alg = match json.get("alg") {
        Some(Value::String(alg)) if alg == "RS256" => Algorithm::RS256,
        Some(Value::String(alg)) if alg == "RS512" => Algorithm::RS512,
        Some(Value::String(alg)) => return Err(not_allowed(alg)),
        _ => return Err(Rejection::MalformedJwt),
    };
    // RFC 7515 §4.1.11: a recipient that does not understand a critical extension must refuse.
    if json.contains_key("crit") {
        return Err(Rejection::CriticalHeader);
    }
    match json.get("kid") {
        Some(Value::String(kid)) if !kid.is_empty() => Ok(JoseHeader {
            alg,
            kid: kid.clone(),
        }),
        _ => Err(Rejection::MissingKid),
    }
}

/// The header's `typ`, which a logout token must set to `logout+jwt` when it sets one (Back-Channel
/// Logout 1.0 §2.4); `JWT` is accepted too, as providers that predate the rule send it. Compared
/// case-insensitively, with the optional `application/` prefix (RFC 7515 §4.1.9).
pub fn check_logout_typ(token: &str) -> Result<(), Rejection> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Rejection::MalformedJwt);
    }
    let header = token.split('.').next().unwrap_or_default();
    match header_json(header)?.get("typ") {
        None => Ok(()),
        Some(Value::String(typ)) => {
            let lower = typ.to_ascii_lowercase();
            let bare = lower.strip_prefix("application/").unwrap_or(&lower);
            if bare == "logout+jwt" || bare == "jwt" {
                Ok(())
            } else {
                Err(Rejection::WrongType)
            }
        }
        Some(_) => Err(Rejection::WrongType),
    }
}

fn header_json(encoded: &str) -> Result<serde_json::Map<String, Value>, Rejection> {
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| Rejection::MalformedJwt)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(Rejection::MalformedJwt),
    }
}

/// The algorithm name as shown in a rejection: short and plain, since the sender chose it.
fn not_allowed(alg: &str) -> Rejection {
    Rejection::AlgNotAllowed(
        alg.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(16)
            .collect(),
    )
}

/// The verification key from CIS2's JWK, if that JWK may verify this `alg`: an RSA key, for
/// signatures, whose own `alg` (when it states one) is the token's.
pub fn decoding_key(jwk: &Jwk, alg: Algorithm) -> Result<DecodingKey, Rejection> {
    let AlgorithmParameters::RSA(rsa) = &jwk.algorithm else {
        return Err(Rejection::KeyNotUsable);
    };
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return Err(Rejection::KeyNotUsable);
    }
    if jwk
        .common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return Err(Rejection::KeyNotUsable);
    }
    match (&jwk.common.key_algorithm, alg) {
        (None, _)
        | (Some(KeyAlgorithm::RS256), Algorithm::RS256)
        | (Some(KeyAlgorithm::RS512), Algorithm::RS512) => {}
        _ => return Err(Rejection::KeyAlgMismatch),
    }
    DecodingKey::from_rsa_components(&rsa.n, &rsa.e).map_err(|_| Rejection::KeyNotUsable)
}

/// Verifies the signature and returns the claims, unchecked: every claim rule is in
/// [`super::claims::check_id_token_claims`], so jsonwebtoken's own claim checks are switched off.
pub fn verify_signature(
    token: &str,
    key: &DecodingKey,
    alg: Algorithm,
) -> Result<Value, Rejection> {
    let mut validation = Validation::new(alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    match jsonwebtoken::decode::<Value>(token, key, &validation) {
        Ok(data) => Ok(data.claims),
        Err(e) => Err(match e.kind() {
            ErrorKind::InvalidToken
            | ErrorKind::Base64(_)
            | ErrorKind::Json(_)
            | ErrorKind::Utf8(_) => Rejection::MalformedJwt,
            _ => Rejection::BadSignature,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn token(header: Value) -> String {
        format!("{}.{}.c2ln", b64(&header), b64(&json!({"sub": "1"})))
    }

    #[test]
    fn header_allow_list() {
        let cases: Vec<(String, Result<JoseHeader, Rejection>)> = vec![
            (
                token(json!({"alg": "RS256", "kid": "k1", "typ": "JWT"})),
                Ok(JoseHeader {
                    alg: Algorithm::RS256,
                    kid: "k1".into(),
                }),
            ),
            (
                token(json!({"alg": "RS512", "kid": "k2"})),
                Ok(JoseHeader {
                    alg: Algorithm::RS512,
                    kid: "k2".into(),
                }),
            ),
            (
                token(json!({"alg": "HS256", "kid": "k1"})),
                Err(Rejection::AlgNotAllowed("HS256".into())),
            ),
            (
                token(json!({"alg": "HS512", "kid": "k1"})),
                Err(Rejection::AlgNotAllowed("HS512".into())),
            ),
            (
                token(json!({"alg": "ES256", "kid": "k1"})),
                Err(Rejection::AlgNotAllowed("ES256".into())),
            ),
            (
                token(json!({"alg": "PS256", "kid": "k1"})),
                Err(Rejection::AlgNotAllowed("PS256".into())),
            ),
            (
                token(json!({"alg": "none", "kid": "k1"})),
                Err(Rejection::AlgNotAllowed("none".into())),
            ),
            (
                token(json!({"alg": "rs256", "kid": "k1"})),
                Err(Rejection::AlgNotAllowed("rs256".into())),
            ),
            (
                format!(
                    "{}.{}.",
                    b64(&json!({"alg": "none", "kid": "k1"})),
                    b64(&json!({}))
                ),
                Err(Rejection::AlgNotAllowed("none".into())),
            ),
            (
                format!(
                    "{}.{}.",
                    b64(&json!({"alg": "RS256", "kid": "k1"})),
                    b64(&json!({}))
                ),
                Err(Rejection::MalformedJwt),
            ),
            (token(json!({"alg": "RS256"})), Err(Rejection::MissingKid)),
            (
                token(json!({"alg": "RS256", "kid": ""})),
                Err(Rejection::MissingKid),
            ),
            (
                token(json!({"alg": "RS256", "kid": 7})),
                Err(Rejection::MissingKid),
            ),
            (token(json!({"kid": "k1"})), Err(Rejection::MalformedJwt)),
            (
                token(json!({"alg": 256, "kid": "k1"})),
                Err(Rejection::MalformedJwt),
            ),
            (
                token(json!({"alg": "RS256", "kid": "k1", "crit": ["exp"]})),
                Err(Rejection::CriticalHeader),
            ),
            (token(json!(["RS256"])), Err(Rejection::MalformedJwt)),
            ("a.b".into(), Err(Rejection::MalformedJwt)),
            ("a.b.c.d.e".into(), Err(Rejection::MalformedJwt)),
            ("!!!.e30.c2ln".into(), Err(Rejection::MalformedJwt)),
            (String::new(), Err(Rejection::MalformedJwt)),
            (
                "x".repeat(MAX_TOKEN_BYTES + 1),
                Err(Rejection::MalformedJwt),
            ),
        ];
        for (token, want) in cases {
            assert_eq!(
                parse_header(&token),
                want,
                "{}",
                &token[..token.len().min(80)]
            );
        }
    }

    #[test]
    fn a_hostile_alg_is_shown_short_and_plain() {
        let alg = format!("<script>{}", "A".repeat(100));
        match parse_header(&token(json!({"alg": alg, "kid": "k"}))) {
            Err(Rejection::AlgNotAllowed(shown)) => assert_eq!(shown, "scriptAAAAAAAAAA"),
            other => panic!("expected AlgNotAllowed, got {other:?}"),
        }
    }

    fn jwk(extra: Value) -> Jwk {
        let mut v = json!({"kty": "RSA", "kid": "k", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"});
        for (k, val) in extra.as_object().expect("object") {
            v[k] = val.clone();
        }
        serde_json::from_value(v).expect("valid JWK")
    }

    #[test]
    fn key_choice_follows_the_jwk() {
        let cases = [
            (json!({}), Algorithm::RS256, None),
            (
                json!({"alg": "RS256", "use": "sig"}),
                Algorithm::RS256,
                None,
            ),
            (json!({"alg": "RS512"}), Algorithm::RS512, None),
            (
                json!({"alg": "RS256"}),
                Algorithm::RS512,
                Some(Rejection::KeyAlgMismatch),
            ),
            (
                json!({"alg": "RS512"}),
                Algorithm::RS256,
                Some(Rejection::KeyAlgMismatch),
            ),
            (
                json!({"alg": "PS256"}),
                Algorithm::RS256,
                Some(Rejection::KeyAlgMismatch),
            ),
            (
                json!({"use": "enc"}),
                Algorithm::RS256,
                Some(Rejection::KeyNotUsable),
            ),
            (
                json!({"key_ops": ["encrypt"]}),
                Algorithm::RS256,
                Some(Rejection::KeyNotUsable),
            ),
            (json!({"key_ops": ["verify"]}), Algorithm::RS256, None),
        ];
        for (extra, alg, want) in cases {
            let got = decoding_key(&jwk(extra.clone()), alg).err();
            assert_eq!(got, want, "{extra} with {alg:?}");
        }
        let ec: Jwk = serde_json::from_value(json!({
            "kty": "EC", "crv": "P-256", "kid": "e",
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"
        }))
        .expect("valid EC JWK");
        assert_eq!(
            decoding_key(&ec, Algorithm::RS256).err(),
            Some(Rejection::KeyNotUsable)
        );
    }

    #[test]
    fn logout_typ_is_logout_jwt_or_jwt_when_present() {
        let with = |h: Value| format!("{}.e30.c2ln", b64(&h));
        let cases = [
            (with(json!({"alg": "RS256"})), Ok(())),
            (with(json!({"typ": "logout+jwt"})), Ok(())),
            (with(json!({"typ": "application/logout+jwt"})), Ok(())),
            (with(json!({"typ": "Logout+JWT"})), Ok(())),
            (with(json!({"typ": "JWT"})), Ok(())),
            (with(json!({"typ": "at+jwt"})), Err(Rejection::WrongType)),
            (with(json!({"typ": ""})), Err(Rejection::WrongType)),
            (with(json!({"typ": 1})), Err(Rejection::WrongType)),
            ("%%%.e30.c2ln".to_owned(), Err(Rejection::MalformedJwt)),
            (String::new(), Err(Rejection::MalformedJwt)),
        ];
        for (token, want) in cases {
            assert_eq!(check_logout_typ(&token), want, "{token}");
        }
    }
}
