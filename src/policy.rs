//! Which Authenticator Assurance Level each national API needs, and what to tell a clinician
//! when their sign-in is not strong enough. Pure functions over data: the table is configuration,
//! with the defaults of NHS-CIS2-REFERENCE.md §4.
//!
//! Clinicians never see "AAL": messages name the sign-in methods that work.

use crate::aal::Aal;
use std::collections::BTreeMap;

/// What one API needs from a user's sign-in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiPolicy {
    /// The name callers use, e.g. `pds`.
    pub api: String,
    pub required_aal: Aal,
    /// Identity assurance (IAL) the user's identity must have been checked to, if any.
    pub required_ial: Option<u8>,
    /// What the API is, for people: "Personal Demographics Service".
    pub description: String,
    /// What the clinician is trying to do, finishing "To ...": "prescribe medicines".
    pub task: String,
}

/// The API name to policy table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyTable {
    apis: BTreeMap<String, ApiPolicy>,
}

/// The API that `GetPdsToken` asks for.
pub const PDS: &str = "pds";

impl PolicyTable {
    /// The levels NHS England publishes (reference §4). NRL and Immunisation are
    /// application-restricted today, so they have no user AAL and are not listed.
    pub fn defaults() -> Self {
        let entry = |api: &str, aal, ial, description: &str, task: &str| ApiPolicy {
            api: api.into(),
            required_aal: aal,
            required_ial: ial,
            description: description.into(),
            task: task.into(),
        };
        Self::from_policies([
            entry(
                PDS,
                Aal::Aal2,
                None,
                "Personal Demographics Service (PDS FHIR API)",
                "find and update patient details",
            ),
            entry(
                "scr",
                Aal::Aal2,
                None,
                "Summary Care Record (SCR FHIR API)",
                "view a patient's Summary Care Record",
            ),
            entry(
                "ers",
                Aal::Aal2,
                Some(3),
                "e-Referral Service (e-RS)",
                "manage referrals",
            ),
            entry(
                "eps",
                Aal::Aal3,
                None,
                "Electronic Prescription Service (EPS)",
                "prescribe or dispense medicines",
            ),
            entry(
                "prescription-tracker",
                Aal::Aal3,
                None,
                "Clinical Prescription Tracker",
                "track prescriptions",
            ),
        ])
    }

    pub fn from_policies(policies: impl IntoIterator<Item = ApiPolicy>) -> Self {
        PolicyTable {
            apis: policies.into_iter().map(|p| (p.api.clone(), p)).collect(),
        }
    }

    /// Adds or replaces entries by API name.
    pub fn merged(mut self, overrides: impl IntoIterator<Item = ApiPolicy>) -> Self {
        for p in overrides {
            self.apis.insert(p.api.clone(), p);
        }
        self
    }

    pub fn get(&self, api: &str) -> Option<&ApiPolicy> {
        self.apis.get(api)
    }

    /// Every policy, ordered by API name.
    pub fn iter(&self) -> impl Iterator<Item = &ApiPolicy> {
        self.apis.values()
    }
}

/// Whether a session may use an API now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Allowed,
    /// A stronger sign-in (step-up) would allow it.
    StepUpRequired {
        required: Aal,
        current: Aal,
        message: String,
    },
    /// No sign-in can fix this: the user's identity was not checked to the level the API needs.
    IdentityTooWeak {
        required_ial: u8,
        message: String,
    },
}

/// Decides access from the session's levels. `ial` is `None` when CIS2 did not say, which fails
/// closed for APIs that need an identity level.
pub fn decide(policy: &ApiPolicy, aal: Aal, ial: Option<u8>) -> Access {
    if let Some(required_ial) = policy.required_ial
        && ial.is_none_or(|have| have < required_ial)
    {
        return Access::IdentityTooWeak {
            required_ial,
            message: identity_message(policy),
        };
    }
    if aal < policy.required_aal {
        return Access::StepUpRequired {
            required: policy.required_aal,
            current: aal,
            message: step_up_message(policy, aal),
        };
    }
    Access::Allowed
}

/// The sign-in methods that reach a level, as clinicians know them (reference §1).
pub fn methods_for(aal: Aal) -> &'static str {
    match aal {
        Aal::Aal3 => "a smartcard, Windows Hello, a security key or the Care Identity iPad app",
        Aal::Aal2 | Aal::Aal1 => {
            "a smartcard, Windows Hello, a security key, the iPad app, a passkey, \
             NHS.net Connect or Microsoft Authenticator"
        }
    }
}

/// Words for a clinician whose sign-in is too weak for a task.
pub fn step_up_message(policy: &ApiPolicy, current: Aal) -> String {
    let how_now = match current {
        Aal::Aal3 => "",
        Aal::Aal2 => {
            " The way you signed in (such as a passkey, NHS.net Connect or Microsoft \
             Authenticator) is not enough for this."
        }
        Aal::Aal1 => " The way you signed in is not enough for this.",
    };
    format!(
        "To {task} you need to sign in again with {methods}.{how_now} If you do not have any of \
         these, ask your organisation's Registration Authority or IT service desk.",
        task = policy.task,
        methods = methods_for(policy.required_aal),
    )
}

fn identity_message(policy: &ApiPolicy) -> String {
    format!(
        "To {task} your identity needs a higher level of checks than your NHS account has. \
         Signing in again will not change this: ask your organisation's Registration Authority.",
        task = policy.task
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_reference() {
        let t = PolicyTable::defaults();
        let want = [
            ("pds", Aal::Aal2, None),
            ("scr", Aal::Aal2, None),
            ("ers", Aal::Aal2, Some(3)),
            ("eps", Aal::Aal3, None),
            ("prescription-tracker", Aal::Aal3, None),
        ];
        for (api, aal, ial) in want {
            let p = t.get(api).unwrap_or_else(|| panic!("{api} missing"));
            assert_eq!((p.required_aal, p.required_ial), (aal, ial), "{api}");
        }
        assert_eq!(t.iter().count(), want.len());
        assert!(t.get("nrl").is_none());
    }

    #[test]
    fn decisions() {
        let t = PolicyTable::defaults();
        let cases = [
            ("pds", Aal::Aal2, Some(3), "allowed"),
            ("pds", Aal::Aal3, None, "allowed"),
            ("pds", Aal::Aal1, Some(3), "step-up"),
            ("eps", Aal::Aal2, Some(3), "step-up"),
            ("eps", Aal::Aal3, Some(3), "allowed"),
            ("prescription-tracker", Aal::Aal2, Some(3), "step-up"),
            ("ers", Aal::Aal3, Some(3), "allowed"),
            ("ers", Aal::Aal3, Some(2), "identity"),
            ("ers", Aal::Aal3, None, "identity"),
            ("scr", Aal::Aal2, None, "allowed"),
        ];
        for (api, aal, ial, want) in cases {
            let got = match decide(t.get(api).expect("listed"), aal, ial) {
                Access::Allowed => "allowed",
                Access::StepUpRequired { .. } => "step-up",
                Access::IdentityTooWeak { .. } => "identity",
            };
            assert_eq!(got, want, "{api} at {aal} ial {ial:?}");
        }
    }

    #[test]
    fn step_up_names_the_methods_and_never_says_aal() {
        let t = PolicyTable::defaults();
        let Access::StepUpRequired {
            required,
            current,
            message,
        } = decide(t.get("eps").expect("listed"), Aal::Aal2, Some(3))
        else {
            panic!("eps at AAL2 needs step-up");
        };
        assert_eq!((required, current), (Aal::Aal3, Aal::Aal2));
        assert!(
            message.starts_with("To prescribe or dispense medicines you need to sign in again")
        );
        for method in ["smartcard", "Windows Hello", "security key", "iPad app"] {
            assert!(message.contains(method), "{method} missing from {message}");
        }
        assert!(!message.to_ascii_lowercase().contains("aal"), "{message}");
        assert!(!message.contains("assurance"), "{message}");
    }

    #[test]
    fn overrides_replace_by_name() {
        let custom = ApiPolicy {
            api: "pds".into(),
            required_aal: Aal::Aal3,
            required_ial: None,
            description: "PDS".into(),
            task: "look up patients".into(),
        };
        let t = PolicyTable::defaults().merged([custom.clone()]);
        assert_eq!(t.get("pds"), Some(&custom));
        assert_eq!(t.iter().count(), 5);
    }
}
