//! The checks an ID token's claims must pass, and the UserInfo mapping: pure functions of the
//! decoded JSON, what this sign-in expects, and the time. Every rule fails closed with its own
//! [`Rejection`], whose text is safe to show: it never repeats a token, nonce or code.

use crate::aal::Aal;
use crate::clock::unix_seconds;
use crate::session::{Organisation, Role, User};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::{Duration, SystemTime};
use subtle::ConstantTimeEq;

/// What this sign-in expects of its ID token.
#[derive(Debug, Clone, Copy)]
pub struct IdTokenExpectations<'a> {
    pub nonce: &'a str,
    /// The lowest acceptable `authentication_assurance_level`, whatever the request URL said.
    pub min_aal: Aal,
    /// When the sign-in started: the user must have authenticated after it (`prompt=login`).
    pub not_before_auth: SystemTime,
    /// `max_age` sent with the request, if any.
    pub max_age: Option<u64>,
}

/// What the client is configured with.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRules<'a> {
    pub issuer: &'a str,
    pub client_id: &'a str,
    pub clock_skew: Duration,
}

/// The claims of an ID token that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdTokenClaims {
    pub sub: String,
    pub sid: Option<String>,
    /// The class that was satisfied (display only: the AAL comes from `aal`).
    pub acr: String,
    pub amr: Vec<String>,
    /// From `authentication_assurance_level`, never from `acr`.
    pub aal: Aal,
    pub ial: Option<u8>,
    pub auth_time: i64,
    pub iat: i64,
    pub exp: i64,
    pub selected_roleid: Option<String>,
    pub name: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
}

/// The user as UserInfo describes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    pub sub: String,
    pub user: User,
    pub roles: Vec<Role>,
    pub organisations: Vec<Organisation>,
}

/// Why a token or a UserInfo answer was refused. Issuer strings are public and shown; claim values
/// chosen by the sender otherwise are not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("not a well-formed signed JWT")]
    MalformedJwt,
    #[error("the JOSE header has no kid")]
    MissingKid,
    #[error("the JOSE header has a crit parameter this client does not understand")]
    CriticalHeader,
    #[error("signing algorithm {0} is not allowed (RS256 or RS512 only)")]
    AlgNotAllowed(String),
    #[error("signed with a key (kid) that CIS2 does not publish")]
    UnknownKid,
    #[error("CIS2's key for this kid is not an RSA signing key")]
    KeyNotUsable,
    #[error("the token's alg differs from the alg of CIS2's key for this kid")]
    KeyAlgMismatch,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the claims are not a JSON object")]
    NotAnObject,
    #[error("no {0} claim")]
    Missing(&'static str),
    #[error("the {0} claim is empty")]
    Empty(&'static str),
    #[error("the {0} claim is not in the expected form")]
    Malformed(&'static str),
    #[error("issuer \"{got}\" is not the configured CIS2 issuer \"{want}\"")]
    WrongIssuer { got: String, want: String },
    #[error("the audience does not include this client")]
    WrongAudience,
    #[error("azp is required when there are several audiences")]
    AzpRequired,
    #[error("azp is not this client")]
    WrongAzp,
    #[error("expired")]
    Expired,
    #[error("issued in the future (iat)")]
    IssuedInFuture,
    #[error("the nonce does not match this sign-in")]
    NonceMismatch,
    #[error("auth_time is in the future")]
    AuthTimeInFuture,
    #[error("the user authenticated before this sign-in started (auth_time)")]
    AuthTimeBeforeLogin,
    #[error("the authentication is older than max_age (auth_time)")]
    AuthTooOld,
    #[error("achieved assurance {achieved} is below the required {required}")]
    AalTooLow { achieved: Aal, required: Aal },
    #[error("the subject differs from the ID token's")]
    SubjectMismatch,
    #[error("a logout token must not carry a nonce")]
    NonceInLogoutToken,
    #[error("the events claim lacks the back-channel logout event")]
    MissingLogoutEvent,
    #[error("a logout token needs a sid or a sub")]
    NoSessionOrSubject,
    #[error("the JOSE header typ is not logout+jwt")]
    WrongType,
    #[error("issued too long ago (iat) for a logout token without exp")]
    TooOld,
}

/// The member of `events` that makes a JWT a back-channel logout token.
pub const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";

/// A logout token without `exp` is refused once its `iat` is older than this, so a replay
/// window is bounded even though the `jti`s seen are only remembered for a while.
pub const LOGOUT_TOKEN_MAX_AGE: Duration = Duration::from_secs(10 * 60);

/// The claims of a logout token that passed every check. At least one of `sid` and `sub` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutTokenClaims {
    pub sub: Option<String>,
    pub sid: Option<String>,
    pub jti: String,
    pub iat: i64,
    /// When the token stops being acceptable (Unix seconds): `exp`, or `iat` plus
    /// [`LOGOUT_TOKEN_MAX_AGE`] when it has none. Its `jti` must be remembered until then.
    pub acceptable_until: i64,
}

/// Checks a logout token's claims (OpenID Connect Back-Channel Logout 1.0 §2.6), as strictly as
/// an ID token's where the two share a rule.
pub fn check_logout_token_claims(
    claims: &Value,
    rules: &ClaimRules<'_>,
    now: SystemTime,
) -> Result<LogoutTokenClaims, Rejection> {
    let c = claims.as_object().ok_or(Rejection::NotAnObject)?;
    let now = unix_seconds(now);
    let skew = i64::try_from(rules.clock_skew.as_secs()).unwrap_or(i64::MAX);

    check_issuer(c, rules.issuer)?;
    if !audiences(c)?.contains(&rules.client_id) {
        return Err(Rejection::WrongAudience);
    }
    let iat = numeric_date(c, "iat")?;
    if iat > now.saturating_add(skew) {
        return Err(Rejection::IssuedInFuture);
    }
    let acceptable_until = match c.get("exp") {
        None | Some(Value::Null) => {
            let max_age = i64::try_from(LOGOUT_TOKEN_MAX_AGE.as_secs()).unwrap_or(i64::MAX);
            let until = iat.saturating_add(max_age);
            if now >= until.saturating_add(skew) {
                return Err(Rejection::TooOld);
            }
            until
        }
        Some(_) => {
            let exp = numeric_date(c, "exp")?;
            if now >= exp.saturating_add(skew) {
                return Err(Rejection::Expired);
            }
            exp
        }
    };
    // §2.4: a nonce is prohibited, so that an ID token can never pass as a logout token.
    if c.contains_key("nonce") {
        return Err(Rejection::NonceInLogoutToken);
    }
    check_logout_event(c)?;
    let sub = optional_str(c, "sub")?.filter(|s| !s.is_empty());
    let sid = optional_str(c, "sid")?.filter(|s| !s.is_empty());
    if sub.is_none() && sid.is_none() {
        return Err(Rejection::NoSessionOrSubject);
    }
    let jti = required_str(c, "jti")?.to_owned();
    Ok(LogoutTokenClaims {
        sub,
        sid,
        jti,
        iat,
        acceptable_until,
    })
}

/// `events` must be an object whose back-channel logout member is itself an object.
fn check_logout_event(c: &Map<String, Value>) -> Result<(), Rejection> {
    match c.get("events") {
        None | Some(Value::Null) => Err(Rejection::Missing("events")),
        Some(Value::Object(events)) => match events.get(BACKCHANNEL_LOGOUT_EVENT) {
            Some(Value::Object(_)) => Ok(()),
            _ => Err(Rejection::MissingLogoutEvent),
        },
        Some(_) => Err(Rejection::Malformed("events")),
    }
}

/// Longest issuer echoed in a [`Rejection`]: a signed token could still carry an absurd one.
const MAX_SHOWN_ISSUER: usize = 200;

/// Checks every claim rule and returns the claims the broker uses.
pub fn check_id_token_claims(
    claims: &Value,
    expect: &IdTokenExpectations<'_>,
    rules: &ClaimRules<'_>,
    now: SystemTime,
) -> Result<IdTokenClaims, Rejection> {
    let c = claims.as_object().ok_or(Rejection::NotAnObject)?;
    let now = unix_seconds(now);
    let skew = i64::try_from(rules.clock_skew.as_secs()).unwrap_or(i64::MAX);

    check_issuer(c, rules.issuer)?;
    check_audience(c, rules.client_id)?;
    let exp = numeric_date(c, "exp")?;
    if now >= exp.saturating_add(skew) {
        return Err(Rejection::Expired);
    }
    let iat = numeric_date(c, "iat")?;
    if iat > now.saturating_add(skew) {
        return Err(Rejection::IssuedInFuture);
    }
    check_nonce(c, expect.nonce)?;
    let auth_time = check_auth_time(c, expect, now, skew)?;
    let aal = check_aal(c, expect.min_aal)?;

    let sub = required_str(c, "sub")?;
    Ok(IdTokenClaims {
        sub: sub.to_owned(),
        sid: optional_str(c, "sid")?,
        acr: optional_str(c, "acr")?.unwrap_or_default(),
        amr: string_or_strings(c, "amr")?,
        aal,
        ial: optional_level(c, "id_assurance_level")?,
        auth_time,
        iat,
        exp,
        selected_roleid: optional_str(c, "selected_roleid")?,
        name: optional_str(c, "name")?,
        given_name: optional_str(c, "given_name")?,
        family_name: optional_str(c, "family_name")?,
    })
}

fn check_issuer(c: &Map<String, Value>, want: &str) -> Result<(), Rejection> {
    let got = required_str(c, "iss")?;
    // Exact string comparison: CIS2's issuer carries ":443", and normalising it away would
    // accept tokens for an issuer string nobody configured.
    if got == want {
        Ok(())
    } else {
        Err(Rejection::WrongIssuer {
            got: got.chars().take(MAX_SHOWN_ISSUER).collect(),
            want: want.to_owned(),
        })
    }
}

/// `aud` as a list: a lone string is a one-element list.
fn audiences(c: &Map<String, Value>) -> Result<Vec<&str>, Rejection> {
    match c.get("aud") {
        None | Some(Value::Null) => Err(Rejection::Missing("aud")),
        Some(Value::String(s)) => Ok(vec![s.as_str()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().ok_or(Rejection::Malformed("aud")))
            .collect(),
        Some(_) => Err(Rejection::Malformed("aud")),
    }
}

fn check_audience(c: &Map<String, Value>, client_id: &str) -> Result<(), Rejection> {
    let audiences = audiences(c)?;
    if !audiences.contains(&client_id) {
        return Err(Rejection::WrongAudience);
    }
    match optional_str(c, "azp")? {
        Some(azp) if azp != client_id => Err(Rejection::WrongAzp),
        None if audiences.len() > 1 => Err(Rejection::AzpRequired),
        _ => Ok(()),
    }
}

fn check_nonce(c: &Map<String, Value>, expected: &str) -> Result<(), Rejection> {
    let got = required_str(c, "nonce")?;
    // An empty expected nonce would be a bug upstream; matching it would disable replay defence.
    let equal: bool = got.as_bytes().ct_eq(expected.as_bytes()).into();
    if expected.is_empty() || !equal {
        return Err(Rejection::NonceMismatch);
    }
    Ok(())
}

fn check_auth_time(
    c: &Map<String, Value>,
    expect: &IdTokenExpectations<'_>,
    now: i64,
    skew: i64,
) -> Result<i64, Rejection> {
    let auth_time = numeric_date(c, "auth_time")?;
    if auth_time > now.saturating_add(skew) {
        return Err(Rejection::AuthTimeInFuture);
    }
    // With prompt=login the user authenticates during this sign-in; an older auth_time means the
    // request was tampered with or a stale token was replayed.
    if auth_time < unix_seconds(expect.not_before_auth).saturating_sub(skew) {
        return Err(Rejection::AuthTimeBeforeLogin);
    }
    if let Some(max_age) = expect.max_age {
        let max_age = i64::try_from(max_age).unwrap_or(i64::MAX);
        if now.saturating_sub(auth_time) > max_age.saturating_add(skew) {
            return Err(Rejection::AuthTooOld);
        }
    }
    Ok(auth_time)
}

fn check_aal(c: &Map<String, Value>, required: Aal) -> Result<Aal, Rejection> {
    const CLAIM: &str = "authentication_assurance_level";
    // The achieved level, never `acr`: acr names the class requested, not what the user did.
    let achieved = match c.get(CLAIM) {
        None | Some(Value::Null) => return Err(Rejection::Missing(CLAIM)),
        Some(v) => Aal::from_claim(v).ok_or(Rejection::Malformed(CLAIM))?,
    };
    if achieved < required {
        return Err(Rejection::AalTooLow { achieved, required });
    }
    Ok(achieved)
}

fn required_str<'a>(c: &'a Map<String, Value>, name: &'static str) -> Result<&'a str, Rejection> {
    match c.get(name) {
        None | Some(Value::Null) => Err(Rejection::Missing(name)),
        Some(Value::String(s)) if s.is_empty() => Err(Rejection::Empty(name)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Rejection::Malformed(name)),
    }
}

fn optional_str(c: &Map<String, Value>, name: &'static str) -> Result<Option<String>, Rejection> {
    match c.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Rejection::Malformed(name)),
    }
}

/// JWT NumericDate: an integer, or a JSON number with a fraction (RFC 7519 allows it).
fn numeric_date(c: &Map<String, Value>, name: &'static str) -> Result<i64, Rejection> {
    match c.get(name) {
        None | Some(Value::Null) => Err(Rejection::Missing(name)),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite() && f.abs() < 1e15)
                    .map(|f| f.floor() as i64)
            })
            .ok_or(Rejection::Malformed(name)),
        Some(_) => Err(Rejection::Malformed(name)),
    }
}

/// `amr` is an array of strings; a lone string is read as a one-element array.
fn string_or_strings(c: &Map<String, Value>, name: &'static str) -> Result<Vec<String>, Rejection> {
    match c.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or(Rejection::Malformed(name))
            })
            .collect(),
        Some(_) => Err(Rejection::Malformed(name)),
    }
}

/// An assurance level 1 to 3, as a string (`"3"`, as CIS2 sends it) or an integer.
fn optional_level(c: &Map<String, Value>, name: &'static str) -> Result<Option<u8>, Rejection> {
    match c.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => Aal::from_claim(v)
            .map(|level| Some(level.level()))
            .ok_or(Rejection::Malformed(name)),
    }
}

/// Maps a UserInfo answer. Its `sub` must be the ID token's; everything else is optional and
/// tolerated when missing or odd, since it is for display and role selection only.
pub fn userinfo_from_claims(claims: &Value, expected_sub: &str) -> Result<UserInfo, Rejection> {
    let c = claims.as_object().ok_or(Rejection::NotAnObject)?;
    let sub = required_str(c, "sub")?;
    if sub != expected_sub {
        return Err(Rejection::SubjectMismatch);
    }
    let text = |name: &str| lenient_str(c.get(name));
    let user = User {
        uid: sub.to_owned(),
        name: text("name"),
        given_name: text("given_name"),
        family_name: text("family_name"),
        display_name: text("display_name"),
        title: text("title"),
        ial: c
            .get("id_assurance_level")
            .and_then(Aal::from_claim)
            .map(Aal::level),
    };
    let organisations = organisations(c.get("nhsid_user_orgs"));
    let roles = roles(c.get("nhsid_nrbac_roles"), &organisations);
    Ok(UserInfo {
        sub: sub.to_owned(),
        user,
        roles,
        organisations,
    })
}

fn organisations(value: Option<&Value>) -> Vec<Organisation> {
    objects(value)
        .filter_map(|o| {
            let org_code = lenient_str(o.get("org_code"));
            (!org_code.is_empty()).then(|| Organisation {
                org_code,
                org_name: lenient_str(o.get("org_name")),
            })
        })
        .collect()
}

fn roles(value: Option<&Value>, organisations: &[Organisation]) -> Vec<Role> {
    let org_names: HashMap<&str, &str> = organisations
        .iter()
        .map(|o| (o.org_code.as_str(), o.org_name.as_str()))
        .collect();
    objects(value)
        .filter_map(|r| {
            // Without its person_roleid a role can be neither selected nor sent to PDS.
            let role_id = lenient_str(r.get("person_roleid"));
            if role_id.is_empty() {
                return None;
            }
            let org_code = lenient_str(r.get("org_code"));
            Some(Role {
                role_id,
                role_code: lenient_str(r.get("role_code")),
                role_name: lenient_str(r.get("role_name")),
                org_name: org_names
                    .get(org_code.as_str())
                    .map(|n| (*n).to_owned())
                    .unwrap_or_default(),
                org_code,
            })
        })
        .collect()
}

fn objects(value: Option<&Value>) -> impl Iterator<Item = &Map<String, Value>> {
    value
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
}

/// A string, or a number written as one (ids sometimes arrive as numbers); anything else is "".
fn lenient_str(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::UNIX_EPOCH;

    const ISS: &str = "https://am.nhsint.auth-ptl.cis2.spineservices.nhs.uk:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare";
    const CLIENT: &str = "broker-client";
    const NONCE: &str = "nonce-abc-123";
    const NOW: i64 = 1_700_000_000;
    const STARTED: i64 = NOW - 100;

    fn good() -> Value {
        json!({
            "iss": ISS, "sub": "656005750108", "aud": CLIENT, "azp": CLIENT,
            "exp": NOW + 600, "iat": NOW - 10, "auth_time": NOW - 50, "nonce": NONCE,
            "acr": "AAL2_OR_AAL3_ANY", "amr": ["N3_SMARTCARD"],
            "authentication_assurance_level": "3", "id_assurance_level": "3",
            "sid": "cis2-session-1", "selected_roleid": "555254242106",
            "name": "Ann Example", "given_name": "Ann", "family_name": "Example"
        })
    }

    enum Edit {
        Set(&'static str, Value),
        Remove(&'static str),
    }
    use Edit::{Remove, Set};

    struct Case {
        name: &'static str,
        edits: Vec<Edit>,
        min_aal: Aal,
        max_age: Option<u64>,
        want: Result<Aal, Rejection>,
    }

    fn ok(name: &'static str, edits: Vec<Edit>, aal: Aal) -> Case {
        Case {
            name,
            edits,
            min_aal: Aal::Aal2,
            max_age: None,
            want: Ok(aal),
        }
    }

    fn bad(name: &'static str, edits: Vec<Edit>, why: Rejection) -> Case {
        Case {
            name,
            edits,
            min_aal: Aal::Aal2,
            max_age: None,
            want: Err(why),
        }
    }

    fn at(secs: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).expect("test times are positive"))
    }

    fn check(
        claims: &Value,
        min_aal: Aal,
        max_age: Option<u64>,
    ) -> Result<IdTokenClaims, Rejection> {
        let expect = IdTokenExpectations {
            nonce: NONCE,
            min_aal,
            not_before_auth: at(STARTED),
            max_age,
        };
        let rules = ClaimRules {
            issuer: ISS,
            client_id: CLIENT,
            clock_skew: Duration::from_secs(60),
        };
        check_id_token_claims(claims, &expect, &rules, at(NOW))
    }

    #[test]
    fn every_claim_rule() {
        use Rejection::*;
        let cases = vec![
            ok("a good token", vec![], Aal::Aal3),
            // authentication_assurance_level: both forms, and never from acr
            ok(
                "AAL as integer",
                vec![Set("authentication_assurance_level", json!(3))],
                Aal::Aal3,
            ),
            ok(
                "AAL2 string meets AAL2",
                vec![Set("authentication_assurance_level", json!("2"))],
                Aal::Aal2,
            ),
            ok(
                "AAL2 integer meets AAL2",
                vec![Set("authentication_assurance_level", json!(2))],
                Aal::Aal2,
            ),
            bad(
                "AAL missing",
                vec![Remove("authentication_assurance_level")],
                Missing("authentication_assurance_level"),
            ),
            bad(
                "AAL null",
                vec![Set("authentication_assurance_level", Value::Null)],
                Missing("authentication_assurance_level"),
            ),
            bad(
                "AAL1 below AAL2",
                vec![Set("authentication_assurance_level", json!("1"))],
                AalTooLow {
                    achieved: Aal::Aal1,
                    required: Aal::Aal2,
                },
            ),
            bad(
                "AAL as 'AAL3'",
                vec![Set("authentication_assurance_level", json!("AAL3"))],
                Malformed("authentication_assurance_level"),
            ),
            bad(
                "AAL 4",
                vec![Set("authentication_assurance_level", json!(4))],
                Malformed("authentication_assurance_level"),
            ),
            bad(
                "AAL as array",
                vec![Set("authentication_assurance_level", json!(["3"]))],
                Malformed("authentication_assurance_level"),
            ),
            bad(
                "acr says AAL3 but achieved 1",
                vec![
                    Set("acr", json!("AAL3_ANY")),
                    Set("authentication_assurance_level", json!("1")),
                ],
                AalTooLow {
                    achieved: Aal::Aal1,
                    required: Aal::Aal2,
                },
            ),
            bad(
                "acr alone is not an AAL",
                vec![
                    Set("acr", json!("AAL3_ANY")),
                    Remove("authentication_assurance_level"),
                ],
                Missing("authentication_assurance_level"),
            ),
            Case {
                name: "AAL2 when AAL3 required",
                edits: vec![Set("authentication_assurance_level", json!("2"))],
                min_aal: Aal::Aal3,
                max_age: None,
                want: Err(AalTooLow {
                    achieved: Aal::Aal2,
                    required: Aal::Aal3,
                }),
            },
            Case {
                name: "AAL3 integer when AAL3 required",
                edits: vec![Set("authentication_assurance_level", json!(3))],
                min_aal: Aal::Aal3,
                max_age: None,
                want: Ok(Aal::Aal3),
            },
            // iss
            bad("iss missing", vec![Remove("iss")], Missing("iss")),
            bad(
                "iss without :443",
                vec![Set("iss", json!(ISS.replace(":443", "")))],
                WrongIssuer {
                    got: ISS.replace(":443", ""),
                    want: ISS.into(),
                },
            ),
            bad(
                "iss with trailing slash",
                vec![Set("iss", json!(format!("{ISS}/")))],
                WrongIssuer {
                    got: format!("{ISS}/"),
                    want: ISS.into(),
                },
            ),
            bad("iss a number", vec![Set("iss", json!(1))], Malformed("iss")),
            bad("iss empty", vec![Set("iss", json!(""))], Empty("iss")),
            // aud / azp
            bad("aud missing", vec![Remove("aud")], Missing("aud")),
            bad(
                "aud other client",
                vec![Set("aud", json!("someone-else"))],
                WrongAudience,
            ),
            bad(
                "aud empty array",
                vec![Set("aud", json!([]))],
                WrongAudience,
            ),
            bad("aud a number", vec![Set("aud", json!(7))], Malformed("aud")),
            bad(
                "aud array with a number",
                vec![Set("aud", json!([CLIENT, 7]))],
                Malformed("aud"),
            ),
            ok(
                "aud array of one, no azp",
                vec![Set("aud", json!([CLIENT])), Remove("azp")],
                Aal::Aal3,
            ),
            ok("aud string, no azp", vec![Remove("azp")], Aal::Aal3),
            ok(
                "several aud with our azp",
                vec![Set("aud", json!([CLIENT, "other"]))],
                Aal::Aal3,
            ),
            bad(
                "several aud without azp",
                vec![Set("aud", json!([CLIENT, "other"])), Remove("azp")],
                AzpRequired,
            ),
            bad(
                "several aud, azp other",
                vec![
                    Set("aud", json!([CLIENT, "other"])),
                    Set("azp", json!("other")),
                ],
                WrongAzp,
            ),
            bad(
                "single aud, azp other",
                vec![Set("azp", json!("other"))],
                WrongAzp,
            ),
            bad("azp a number", vec![Set("azp", json!(1))], Malformed("azp")),
            // exp
            bad("exp missing", vec![Remove("exp")], Missing("exp")),
            bad(
                "exp a string",
                vec![Set("exp", json!("1700000600"))],
                Malformed("exp"),
            ),
            bad(
                "exp beyond skew",
                vec![Set("exp", json!(NOW - 61))],
                Expired,
            ),
            bad(
                "exp exactly at skew edge",
                vec![Set("exp", json!(NOW - 60))],
                Expired,
            ),
            ok(
                "exp just past, within skew",
                vec![Set("exp", json!(NOW - 59))],
                Aal::Aal3,
            ),
            ok(
                "exp fractional",
                vec![Set("exp", json!(NOW as f64 + 600.5))],
                Aal::Aal3,
            ),
            // iat
            bad("iat missing", vec![Remove("iat")], Missing("iat")),
            bad(
                "iat a string",
                vec![Set("iat", json!("x"))],
                Malformed("iat"),
            ),
            bad(
                "iat in the future beyond skew",
                vec![Set("iat", json!(NOW + 61))],
                IssuedInFuture,
            ),
            ok(
                "iat in the future within skew",
                vec![Set("iat", json!(NOW + 60))],
                Aal::Aal3,
            ),
            // nonce
            bad("nonce missing", vec![Remove("nonce")], Missing("nonce")),
            bad(
                "nonce other",
                vec![Set("nonce", json!("nonce-abc-124"))],
                NonceMismatch,
            ),
            bad(
                "nonce prefix",
                vec![Set("nonce", json!("nonce-abc-12"))],
                NonceMismatch,
            ),
            bad("nonce empty", vec![Set("nonce", json!(""))], Empty("nonce")),
            bad(
                "nonce a number",
                vec![Set("nonce", json!(123))],
                Malformed("nonce"),
            ),
            // auth_time
            bad(
                "auth_time missing",
                vec![Remove("auth_time")],
                Missing("auth_time"),
            ),
            bad(
                "auth_time a string",
                vec![Set("auth_time", json!("1699999950"))],
                Malformed("auth_time"),
            ),
            bad(
                "auth_time before login beyond skew",
                vec![Set("auth_time", json!(STARTED - 61))],
                AuthTimeBeforeLogin,
            ),
            ok(
                "auth_time before login within skew",
                vec![Set("auth_time", json!(STARTED - 60))],
                Aal::Aal3,
            ),
            bad(
                "auth_time in the future",
                vec![Set("auth_time", json!(NOW + 61))],
                AuthTimeInFuture,
            ),
            Case {
                name: "max_age 0, auth_time within skew",
                edits: vec![],
                min_aal: Aal::Aal2,
                max_age: Some(0),
                want: Ok(Aal::Aal3),
            },
            Case {
                name: "max_age exceeded beyond skew",
                edits: vec![Set("auth_time", json!(NOW - 80))],
                min_aal: Aal::Aal2,
                max_age: Some(10),
                want: Err(AuthTooOld),
            },
            Case {
                name: "max_age within skew",
                edits: vec![Set("auth_time", json!(NOW - 70))],
                min_aal: Aal::Aal2,
                max_age: Some(10),
                want: Ok(Aal::Aal3),
            },
            // sub and optional claims
            bad("sub missing", vec![Remove("sub")], Missing("sub")),
            bad("sub empty", vec![Set("sub", json!(""))], Empty("sub")),
            bad(
                "sub a number",
                vec![Set("sub", json!(656005750108_i64))],
                Malformed("sub"),
            ),
            ok(
                "optional claims absent",
                vec![
                    Remove("sid"),
                    Remove("acr"),
                    Remove("amr"),
                    Remove("id_assurance_level"),
                    Remove("selected_roleid"),
                    Remove("name"),
                    Remove("given_name"),
                    Remove("family_name"),
                ],
                Aal::Aal3,
            ),
            bad("sid a number", vec![Set("sid", json!(1))], Malformed("sid")),
            bad(
                "acr an array",
                vec![Set("acr", json!(["AAL3_ANY"]))],
                Malformed("acr"),
            ),
            bad(
                "amr an object",
                vec![Set("amr", json!({"a": 1}))],
                Malformed("amr"),
            ),
            bad(
                "amr with a number",
                vec![Set("amr", json!(["FIDO2", 1]))],
                Malformed("amr"),
            ),
            ok(
                "amr a lone string",
                vec![Set("amr", json!("FIDO2"))],
                Aal::Aal3,
            ),
            bad(
                "ial unreadable",
                vec![Set("id_assurance_level", json!("high"))],
                Malformed("id_assurance_level"),
            ),
            bad(
                "selected_roleid a number",
                vec![Set("selected_roleid", json!(5))],
                Malformed("selected_roleid"),
            ),
            bad(
                "name an object",
                vec![Set("name", json!({}))],
                Malformed("name"),
            ),
        ];
        for case in cases {
            let mut claims = good();
            let obj = claims.as_object_mut().expect("good() is an object");
            for edit in &case.edits {
                match edit {
                    Set(k, v) => {
                        obj.insert((*k).to_owned(), v.clone());
                    }
                    Remove(k) => {
                        obj.remove(*k);
                    }
                }
            }
            let got = check(&claims, case.min_aal, case.max_age).map(|c| c.aal);
            assert_eq!(got, case.want, "case: {}", case.name);
        }
    }

    #[test]
    fn a_good_token_yields_its_claims() {
        let claims = check(&good(), Aal::Aal2, Some(300)).expect("good token passes");
        assert_eq!(
            claims,
            IdTokenClaims {
                sub: "656005750108".into(),
                sid: Some("cis2-session-1".into()),
                acr: "AAL2_OR_AAL3_ANY".into(),
                amr: vec!["N3_SMARTCARD".into()],
                aal: Aal::Aal3,
                ial: Some(3),
                auth_time: NOW - 50,
                iat: NOW - 10,
                exp: NOW + 600,
                selected_roleid: Some("555254242106".into()),
                name: Some("Ann Example".into()),
                given_name: Some("Ann".into()),
                family_name: Some("Example".into()),
            }
        );
    }

    #[test]
    fn non_objects_and_empty_expected_nonce_are_refused() {
        for v in [json!(null), json!([]), json!("x"), json!(1)] {
            assert_eq!(check(&v, Aal::Aal1, None), Err(Rejection::NotAnObject));
        }
        let mut claims = good();
        let expect = IdTokenExpectations {
            nonce: "",
            min_aal: Aal::Aal1,
            not_before_auth: at(STARTED),
            max_age: None,
        };
        let rules = ClaimRules {
            issuer: ISS,
            client_id: CLIENT,
            clock_skew: Duration::from_secs(60),
        };
        claims["nonce"] = json!("anything");
        assert_eq!(
            check_id_token_claims(&claims, &expect, &rules, at(NOW)),
            Err(Rejection::NonceMismatch)
        );
    }

    #[test]
    fn rejections_never_repeat_the_nonce() {
        let mut claims = good();
        claims["nonce"] = json!("attacker-nonce-value");
        let err = check(&claims, Aal::Aal2, None).expect_err("wrong nonce");
        assert!(!err.to_string().contains("attacker-nonce-value"));
        assert!(!err.to_string().contains(NONCE));
    }

    fn userinfo_doc() -> Value {
        json!({
            "sub": "656005750104",
            "name": "Dr Bob Example", "given_name": "Bob", "family_name": "Example",
            "display_name": "Example B", "title": "Dr", "uid": "656005750104",
            "nhsid_useruid": "656005750104",
            "nhsid_nrbac_roles": [
                {"person_roleid": "555254242106", "role_code": "S8000:G8000:R8000", "role_name": "\"Clinical\":\"Clinical Provision\":\"Clinical Practitioner Access Role\"", "org_code": "RX1", "person_orgid": "1"},
                {"person_roleid": "555254242107", "role_code": "S8000:G8000:R8008", "org_code": "ZZZ"},
                {"role_code": "no-id", "org_code": "RX1"},
                {"person_roleid": 555254242108_i64},
                "not-an-object"
            ],
            "nhsid_user_orgs": [
                {"org_code": "RX1", "org_name": "Example Hospital NHS Trust"},
                {"org_name": "no code"},
                {"org_code": "Y123"}
            ]
        })
    }

    #[test]
    fn userinfo_maps_user_roles_and_organisations() {
        let info = userinfo_from_claims(&userinfo_doc(), "656005750104").expect("maps");
        assert_eq!(info.sub, "656005750104");
        assert_eq!(
            info.user,
            User {
                uid: "656005750104".into(),
                name: "Dr Bob Example".into(),
                given_name: "Bob".into(),
                family_name: "Example".into(),
                display_name: "Example B".into(),
                title: "Dr".into(),
                ial: None,
            }
        );
        assert_eq!(
            info.organisations,
            vec![
                Organisation {
                    org_code: "RX1".into(),
                    org_name: "Example Hospital NHS Trust".into()
                },
                Organisation {
                    org_code: "Y123".into(),
                    org_name: String::new()
                },
            ]
        );
        assert_eq!(
            info.roles.len(),
            3,
            "roles without person_roleid are dropped"
        );
        assert_eq!(info.roles[0].role_id, "555254242106");
        assert_eq!(info.roles[0].role_code, "S8000:G8000:R8000");
        assert_eq!(info.roles[0].org_code, "RX1");
        assert_eq!(info.roles[0].org_name, "Example Hospital NHS Trust");
        assert_eq!(info.roles[1].org_name, "", "org not in nhsid_user_orgs");
        assert_eq!(info.roles[1].role_name, "");
        assert_eq!(info.roles[2].role_id, "555254242108");
    }

    #[test]
    fn userinfo_tolerates_missing_optional_fields_but_not_a_wrong_sub() {
        let minimal = userinfo_from_claims(&json!({"sub": "1", "nhsid_nrbac_roles": "junk"}), "1")
            .expect("minimal userinfo maps");
        assert_eq!(minimal.user.uid, "1");
        assert!(minimal.roles.is_empty() && minimal.organisations.is_empty());

        let cases = [
            (json!({"sub": "2"}), Rejection::SubjectMismatch),
            (json!({"sub": ""}), Rejection::Empty("sub")),
            (json!({"name": "x"}), Rejection::Missing("sub")),
            (json!({"sub": 1}), Rejection::Malformed("sub")),
            (json!([]), Rejection::NotAnObject),
        ];
        for (doc, want) in cases {
            assert_eq!(userinfo_from_claims(&doc, "1"), Err(want), "{doc}");
        }
    }

    fn logout_good() -> Value {
        json!({
            "iss": ISS, "aud": CLIENT, "iat": NOW - 5, "exp": NOW + 120, "jti": "jti-1",
            "sid": "cis2-session-1", "sub": "656005750108",
            "events": { BACKCHANNEL_LOGOUT_EVENT: {} },
        })
    }

    #[test]
    fn logout_token_claim_rules() {
        let event = |v: Value| json!({ BACKCHANNEL_LOGOUT_EVENT: v });
        let cases: Vec<(&str, Vec<Edit>, Result<(), Rejection>)> = vec![
            ("good", vec![], Ok(())),
            ("sid only", vec![Remove("sub")], Ok(())),
            ("sub only", vec![Remove("sid")], Ok(())),
            ("aud list", vec![Set("aud", json!(["x", CLIENT]))], Ok(())),
            ("no exp, recent iat", vec![Remove("exp")], Ok(())),
            ("JWT extra claims", vec![Set("x", json!(1))], Ok(())),
            (
                "nonce",
                vec![Set("nonce", json!("n"))],
                Err(Rejection::NonceInLogoutToken),
            ),
            (
                "null nonce",
                vec![Set("nonce", Value::Null)],
                Err(Rejection::NonceInLogoutToken),
            ),
            (
                "no events",
                vec![Remove("events")],
                Err(Rejection::Missing("events")),
            ),
            (
                "events a string",
                vec![Set("events", json!("x"))],
                Err(Rejection::Malformed("events")),
            ),
            (
                "other event",
                vec![Set("events", json!({"x": {}}))],
                Err(Rejection::MissingLogoutEvent),
            ),
            (
                "event not an object",
                vec![Set("events", event(json!(true)))],
                Err(Rejection::MissingLogoutEvent),
            ),
            (
                "neither sid nor sub",
                vec![Remove("sid"), Remove("sub")],
                Err(Rejection::NoSessionOrSubject),
            ),
            (
                "empty sid and sub",
                vec![Set("sid", json!("")), Set("sub", json!(""))],
                Err(Rejection::NoSessionOrSubject),
            ),
            (
                "sid a number",
                vec![Set("sid", json!(1))],
                Err(Rejection::Malformed("sid")),
            ),
            (
                "no jti",
                vec![Remove("jti")],
                Err(Rejection::Missing("jti")),
            ),
            (
                "empty jti",
                vec![Set("jti", json!(""))],
                Err(Rejection::Empty("jti")),
            ),
            (
                "wrong iss",
                vec![Set("iss", json!("https://x"))],
                Err(Rejection::WrongIssuer {
                    got: "https://x".into(),
                    want: ISS.into(),
                }),
            ),
            (
                "wrong aud",
                vec![Set("aud", json!("other"))],
                Err(Rejection::WrongAudience),
            ),
            (
                "no aud",
                vec![Remove("aud")],
                Err(Rejection::Missing("aud")),
            ),
            (
                "no iat",
                vec![Remove("iat")],
                Err(Rejection::Missing("iat")),
            ),
            (
                "iat in the future",
                vec![Set("iat", json!(NOW + 3600))],
                Err(Rejection::IssuedInFuture),
            ),
            (
                "expired",
                vec![Set("exp", json!(NOW - 3600))],
                Err(Rejection::Expired),
            ),
            (
                "exp a string",
                vec![Set("exp", json!("soon"))],
                Err(Rejection::Malformed("exp")),
            ),
            (
                "old without exp",
                vec![Remove("exp"), Set("iat", json!(NOW - 3600))],
                Err(Rejection::TooOld),
            ),
        ];
        for (name, edits, want) in cases {
            let mut claims = logout_good();
            for edit in edits {
                match edit {
                    Set(k, v) => claims[k] = v,
                    Remove(k) => {
                        claims.as_object_mut().expect("object").remove(k);
                    }
                }
            }
            let rules = ClaimRules {
                issuer: ISS,
                client_id: CLIENT,
                clock_skew: Duration::from_secs(60),
            };
            let got = check_logout_token_claims(&claims, &rules, at(NOW)).map(|_| ());
            assert_eq!(got, want, "{name}");
        }
        assert_eq!(
            check_logout_token_claims(
                &json!([1]),
                &ClaimRules {
                    issuer: ISS,
                    client_id: CLIENT,
                    clock_skew: Duration::ZERO
                },
                at(NOW)
            ),
            Err(Rejection::NotAnObject)
        );
    }

    #[test]
    fn a_logout_token_is_acceptable_until_exp_or_iat_plus_the_max_age() {
        let rules = ClaimRules {
            issuer: ISS,
            client_id: CLIENT,
            clock_skew: Duration::ZERO,
        };
        let c = check_logout_token_claims(&logout_good(), &rules, at(NOW)).expect("good");
        assert_eq!(c.acceptable_until, NOW + 120);
        assert_eq!(c.jti, "jti-1");
        let mut no_exp = logout_good();
        no_exp.as_object_mut().expect("object").remove("exp");
        let c = check_logout_token_claims(&no_exp, &rules, at(NOW)).expect("good");
        assert_eq!(c.acceptable_until, NOW - 5 + 600);
    }
}
