//! Authenticator Assurance Levels: what CIS2 reports, and words for the people who hold them.

use serde::{Deserialize, Serialize};
use std::fmt;

/// NIST SP 800-63B Authenticator Assurance Level. Ordered: `Aal1 < Aal2 < Aal3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Aal {
    #[serde(rename = "1")]
    Aal1,
    #[serde(rename = "2")]
    Aal2,
    #[serde(rename = "3")]
    Aal3,
}

impl Aal {
    pub fn level(self) -> u8 {
        match self {
            Aal::Aal1 => 1,
            Aal::Aal2 => 2,
            Aal::Aal3 => 3,
        }
    }

    pub fn from_level(level: i64) -> Option<Self> {
        match level {
            1 => Some(Aal::Aal1),
            2 => Some(Aal::Aal2),
            3 => Some(Aal::Aal3),
            _ => None,
        }
    }

    /// Reads CIS2's `authentication_assurance_level` claim: a string (`"3"`) in real tokens, an
    /// integer in some NHS fixtures. Anything else is `None`, and the caller fails closed.
    pub fn from_claim(value: &serde_json::Value) -> Option<Self> {
        match value {
            serde_json::Value::String(s) => s.trim().parse::<i64>().ok().and_then(Self::from_level),
            serde_json::Value::Number(n) => n.as_i64().and_then(Self::from_level),
            _ => None,
        }
    }
}

impl fmt::Display for Aal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AAL{}", self.level())
    }
}

/// Where a session's AAL comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AalSource {
    /// The ID token's `authentication_assurance_level`: the level actually achieved.
    IdToken,
    /// Combined pattern: no ID token reaches the broker, so this is the requested lower bound.
    Requested,
}

/// A label a clinician recognises for the `amr` values of a sign-in. CIS2's full `amr` list is
/// unconfirmed, so unknown values are shown as they are; this is for display and audit only.
pub fn authenticator_label(amr: &[String]) -> String {
    // Every call that reads a session shows its label: no allocation beyond the answer.
    const LABELS: &[(&[&str], &str)] = &[
        (&["N3_SMARTCARD", "SMARTCARD", "SC"], "Smartcard"),
        (&["FIDO2", "SECURITY_KEY"], "Security key"),
        (&["IOS"], "iPad app"),
        (&["WINDOWS_HELLO", "WHFB"], "Windows Hello"),
        (&["PASSKEY"], "Passkey"),
        (&["NHSMAIL", "NHS_NET_CONNECT"], "NHS.net Connect"),
        (
            &["TOTP", "MS_AUTHENTICATOR", "AUTHENTICATOR"],
            "Microsoft Authenticator",
        ),
    ];
    fn label(m: &str) -> &str {
        LABELS
            .iter()
            .find(|(names, _)| names.iter().any(|n| n.eq_ignore_ascii_case(m)))
            .map_or(m, |(_, label)| *label)
    }
    let mut out = String::new();
    for (i, m) in amr.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(label(m));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_level_as_string_or_integer_and_nothing_else() {
        let cases = [
            (json!("3"), Some(Aal::Aal3)),
            (json!("2"), Some(Aal::Aal2)),
            (json!(" 1 "), Some(Aal::Aal1)),
            (json!(3), Some(Aal::Aal3)),
            (json!(2), Some(Aal::Aal2)),
            (json!("4"), None),
            (json!(0), None),
            (json!("AAL3"), None),
            (json!(3.5), None),
            (json!(null), None),
            (json!(["3"]), None),
            (json!(true), None),
        ];
        for (claim, want) in cases {
            assert_eq!(Aal::from_claim(&claim), want, "claim {claim}");
        }
    }

    #[test]
    fn levels_are_ordered() {
        assert!(Aal::Aal1 < Aal::Aal2 && Aal::Aal2 < Aal::Aal3);
    }

    #[test]
    fn labels_authenticators_for_people() {
        assert_eq!(authenticator_label(&["N3_SMARTCARD".into()]), "Smartcard");
        assert_eq!(authenticator_label(&["FIDO2".into()]), "Security key");
        assert_eq!(
            authenticator_label(&["SOMETHING_NEW".into()]),
            "SOMETHING_NEW"
        );
        assert_eq!(authenticator_label(&[]), "");
    }
}
