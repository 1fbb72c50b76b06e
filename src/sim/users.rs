//! The test users, their roles and authenticators, and which authenticators an `acr_values`
//! request allows.
//!
//! The user ids are the NHS mock-CIS2 test users (NHS-CIS2-REFERENCE.md §6); names, role ids
//! and organisations are made up but shaped like real CIS2 data. The `amr` values CIS2 really
//! sends are unconfirmed: they live only in the table below, so a correction is one edit.

use crate::aal::Aal;

/// A way of signing in: the `amr` value it puts in the ID token, a label people recognise, and
/// the assurance level it achieves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Authenticator {
    pub amr: &'static str,
    pub label: &'static str,
    pub aal: Aal,
}

// The one table of authenticators.
pub const SMARTCARD: Authenticator = Authenticator {
    amr: "N3_SMARTCARD",
    label: "Smartcard",
    aal: Aal::Aal3,
};
pub const SECURITY_KEY: Authenticator = Authenticator {
    amr: "FIDO2",
    label: "Security key",
    aal: Aal::Aal3,
};
pub const IPAD_APP: Authenticator = Authenticator {
    amr: "IOS",
    label: "iPad app",
    aal: Aal::Aal3,
};
pub const PASSKEY: Authenticator = Authenticator {
    amr: "PASSKEY",
    label: "Passkey",
    aal: Aal::Aal2,
};
pub const NHS_NET_CONNECT: Authenticator = Authenticator {
    amr: "NHSMAIL",
    label: "NHS.net Connect",
    aal: Aal::Aal2,
};
pub const MS_AUTHENTICATOR: Authenticator = Authenticator {
    amr: "MS_AUTHENTICATOR",
    label: "Microsoft Authenticator",
    aal: Aal::Aal2,
};
pub const PASSWORD: Authenticator = Authenticator {
    amr: "PWD",
    label: "Password",
    aal: Aal::Aal1,
};

/// Every authenticator the simulator knows.
pub const AUTHENTICATORS: &[Authenticator] = &[
    SMARTCARD,
    SECURITY_KEY,
    IPAD_APP,
    PASSKEY,
    NHS_NET_CONNECT,
    MS_AUTHENTICATOR,
    PASSWORD,
];

/// A role a user holds in an organisation (one `nhsid_nrbac_roles` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimRole {
    /// The role id (URID): `selected_roleid`, `NHSD-Session-URID`.
    pub person_roleid: &'static str,
    pub role_code: &'static str,
    pub role_name: &'static str,
    pub org_code: &'static str,
    pub org_name: &'static str,
    pub person_orgid: &'static str,
}

/// A test user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimUser {
    /// The 12-digit CIS2 user id: `sub`, `uid`, `nhsid_useruid`.
    pub uid: &'static str,
    pub title: &'static str,
    pub given_name: &'static str,
    pub family_name: &'static str,
    pub initials: &'static str,
    /// What the user is for, shown on the sign-in page.
    pub note: &'static str,
    pub roles: &'static [SimRole],
    /// In order of preference: the first one a request allows is the default.
    pub authenticators: &'static [Authenticator],
}

impl SimUser {
    /// `name`: given and family name.
    pub fn name(&self) -> String {
        format!("{} {}", self.given_name, self.family_name)
    }

    /// `display_name`: title, given and family name.
    pub fn display_name(&self) -> String {
        format!("{} {} {}", self.title, self.given_name, self.family_name)
    }

    pub fn role(&self, person_roleid: &str) -> Option<&'static SimRole> {
        self.roles.iter().find(|r| r.person_roleid == person_roleid)
    }

    pub fn authenticator(&self, amr: &str) -> Option<&'static Authenticator> {
        self.authenticators.iter().find(|a| a.amr == amr)
    }

    /// The organisations of the user's roles, each once, in role order.
    pub fn orgs(&self) -> Vec<(&'static str, &'static str)> {
        let mut orgs: Vec<(&'static str, &'static str)> = Vec::new();
        for role in self.roles {
            if !orgs.iter().any(|(code, _)| *code == role.org_code) {
                orgs.push((role.org_code, role.org_name));
            }
        }
        orgs
    }
}

const SOMERSET: (&str, &str) = ("RBA", "Somerset NHS Foundation Trust");
const LEEDS: (&str, &str) = ("RR8", "Leeds Teaching Hospitals NHS Trust");
const GSTT: (&str, &str) = ("RJ1", "Guy's and St Thomas' NHS Foundation Trust");

const fn role(
    person_roleid: &'static str,
    role_code: &'static str,
    role_name: &'static str,
    org: (&'static str, &'static str),
    person_orgid: &'static str,
) -> SimRole {
    SimRole {
        person_roleid,
        role_code,
        role_name,
        org_code: org.0,
        org_name: org.1,
        person_orgid,
    }
}

const GP: &str = "General Medical Practitioner";
const CLINICAL: &str = "Clinical Practitioner Access Role";

/// The test users.
pub static USERS: &[SimUser] = &[
    SimUser {
        uid: "656005750108",
        title: "Dr",
        given_name: "Amelia",
        family_name: "Clarke",
        initials: "AC",
        note: "Smartcard only (AAL3)",
        roles: &[role(
            "555021935108",
            "S0010:G0020:R0260",
            GP,
            SOMERSET,
            "555021930108",
        )],
        authenticators: &[SMARTCARD],
    },
    SimUser {
        uid: "656005750107",
        title: "Dr",
        given_name: "Priya",
        family_name: "Sharma",
        initials: "PS",
        note: "Smartcard and passkey: signs in at AAL2, steps up to AAL3",
        roles: &[role(
            "555021935107",
            "S8000:G8000:R8000",
            CLINICAL,
            SOMERSET,
            "555021930107",
        )],
        authenticators: &[SMARTCARD, PASSKEY],
    },
    SimUser {
        uid: "656005750104",
        title: "Mr",
        given_name: "Liam",
        family_name: "O'Neill",
        initials: "LO",
        note: "Several roles in several organisations (AAL3)",
        roles: &[
            role(
                "555021935104",
                "S8000:G8001:R8008",
                "Admin/Clinical Support Access Role",
                LEEDS,
                "555021930104",
            ),
            role(
                "555021935114",
                "S8000:G8000:R8003",
                "Health Professional Access Role",
                GSTT,
                "555021930114",
            ),
            role(
                "555021935124",
                "S8000:G8000:R8000",
                CLINICAL,
                SOMERSET,
                "555021930124",
            ),
        ],
        authenticators: &[SMARTCARD, SECURITY_KEY, IPAD_APP],
    },
    SimUser {
        uid: "656005750111",
        title: "Ms",
        given_name: "Grace",
        family_name: "Okafor",
        initials: "GO",
        note: "Passkey only (AAL2): cannot step up",
        roles: &[role(
            "555021935111",
            "S0010:G0020:R0260",
            GP,
            LEEDS,
            "555021930111",
        )],
        authenticators: &[PASSKEY],
    },
    SimUser {
        uid: "656005750109",
        title: "Mr",
        given_name: "Tom",
        family_name: "Evans",
        initials: "TE",
        note: "NHS.net Connect or Microsoft Authenticator (AAL2)",
        roles: &[role(
            "555021935109",
            "S8000:G8000:R8000",
            CLINICAL,
            GSTT,
            "555021930109",
        )],
        authenticators: &[NHS_NET_CONNECT, MS_AUTHENTICATOR],
    },
    SimUser {
        uid: "656005750110",
        title: "Ms",
        given_name: "Sam",
        family_name: "Taylor",
        initials: "ST",
        note: "No role, password only (AAL1)",
        roles: &[],
        authenticators: &[PASSWORD],
    },
];

pub fn find_user(uid: &str) -> Option<&'static SimUser> {
    USERS.iter().find(|u| u.uid == uid)
}

/// The authentication class a request asks for (`acr_values`), and what it allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcrClass {
    Aal3Any,
    Aal2OrAal3Any,
}

impl AcrClass {
    /// Reads `acr_values` (space-separated, in order of preference): the first value the
    /// simulator knows wins. Absent means `AAL3_ANY`, as CIS2. Values it does not know
    /// (method-specific ones included, their semantics being unconfirmed) count as `AAL3_ANY`:
    /// failing safe, never offering a weaker authenticator than may have been meant.
    pub fn from_acr_values(acr_values: Option<&str>) -> Self {
        acr_values
            .into_iter()
            .flat_map(str::split_ascii_whitespace)
            .find_map(|v| match v {
                "AAL3_ANY" => Some(AcrClass::Aal3Any),
                "AAL2_OR_AAL3_ANY" => Some(AcrClass::Aal2OrAal3Any),
                _ => None,
            })
            .unwrap_or(AcrClass::Aal3Any)
    }

    /// The `acr` claim: the class that was satisfied.
    pub fn as_str(self) -> &'static str {
        match self {
            AcrClass::Aal3Any => "AAL3_ANY",
            AcrClass::Aal2OrAal3Any => "AAL2_OR_AAL3_ANY",
        }
    }

    pub fn min_aal(self) -> Aal {
        match self {
            AcrClass::Aal3Any => Aal::Aal3,
            AcrClass::Aal2OrAal3Any => Aal::Aal2,
        }
    }

    pub fn allows(self, authenticator: &Authenticator) -> bool {
        authenticator.aal >= self.min_aal()
    }

    /// The user's preferred authenticator that this class allows.
    pub fn first_allowed(self, user: &SimUser) -> Option<&'static Authenticator> {
        user.authenticators.iter().find(|a| self.allows(a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acr_values_resolve_fail_safe() {
        let cases = [
            (None, AcrClass::Aal3Any),
            (Some(""), AcrClass::Aal3Any),
            (Some("AAL3_ANY"), AcrClass::Aal3Any),
            (Some("AAL2_OR_AAL3_ANY"), AcrClass::Aal2OrAal3Any),
            (Some("AAL2_TOTP"), AcrClass::Aal3Any),
            (Some("aal2_or_aal3_any"), AcrClass::Aal3Any),
            (Some("SOMETHING AAL2_OR_AAL3_ANY"), AcrClass::Aal2OrAal3Any),
            (Some("AAL3_ANY AAL2_OR_AAL3_ANY"), AcrClass::Aal3Any),
        ];
        for (acr_values, want) in cases {
            assert_eq!(
                AcrClass::from_acr_values(acr_values),
                want,
                "{acr_values:?}"
            );
        }
    }

    #[test]
    fn classes_allow_authenticators_by_level() {
        let cases = [
            (AcrClass::Aal3Any, SMARTCARD, true),
            (AcrClass::Aal3Any, SECURITY_KEY, true),
            (AcrClass::Aal3Any, IPAD_APP, true),
            (AcrClass::Aal3Any, PASSKEY, false),
            (AcrClass::Aal3Any, NHS_NET_CONNECT, false),
            (AcrClass::Aal3Any, PASSWORD, false),
            (AcrClass::Aal2OrAal3Any, SMARTCARD, true),
            (AcrClass::Aal2OrAal3Any, PASSKEY, true),
            (AcrClass::Aal2OrAal3Any, MS_AUTHENTICATOR, true),
            (AcrClass::Aal2OrAal3Any, PASSWORD, false),
        ];
        for (class, authenticator, want) in cases {
            assert_eq!(
                class.allows(&authenticator),
                want,
                "{class:?} {authenticator:?}"
            );
        }
    }

    #[test]
    fn default_authenticator_is_the_first_allowed() {
        let step_up = find_user("656005750107").expect("the step-up user exists");
        assert_eq!(
            AcrClass::Aal2OrAal3Any.first_allowed(step_up),
            Some(&SMARTCARD)
        );
        let passkey_only = find_user("656005750111").expect("the passkey user exists");
        assert_eq!(AcrClass::Aal3Any.first_allowed(passkey_only), None);
        assert_eq!(
            AcrClass::Aal2OrAal3Any.first_allowed(passkey_only),
            Some(&PASSKEY)
        );
        let no_role = find_user("656005750110").expect("the no-role user exists");
        assert_eq!(AcrClass::Aal2OrAal3Any.first_allowed(no_role), None);
    }

    #[test]
    fn the_table_is_consistent() {
        for user in USERS {
            assert_eq!(user.uid.len(), 12, "{}", user.uid);
            assert!(!user.authenticators.is_empty(), "{}", user.uid);
            for a in user.authenticators {
                assert!(AUTHENTICATORS.contains(a), "{} {}", user.uid, a.amr);
            }
            for r in user.roles {
                assert_eq!(r.person_roleid.len(), 12);
                assert_eq!(user.role(r.person_roleid), Some(r));
            }
        }
        let several = find_user("656005750104").expect("the several-roles user exists");
        assert_eq!(several.roles.len(), 3);
        assert_eq!(several.orgs().len(), 3);
        assert!(find_user("656005750110").is_some_and(|u| u.roles.is_empty()));
        assert!(find_user("000000000000").is_none());
    }
}
