//! What a session and a pending sign-in hold. Both are sealed as a whole before they reach the
//! store (a session by `SessionRecord::seal`, in the form `codec` defines; a pending sign-in by
//! `KeyRing::seal_json`), so names and roles are as protected as the tokens. `SessionRecord`
//! keeps its serde derives for the JSON form earlier versions stored.

use super::codec::IdToken;
use crate::aal::{Aal, AalSource};
use crate::secret::Secret;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The CIS2 user id (`sub`).
    pub uid: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub given_name: String,
    #[serde(default)]
    pub family_name: String,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub title: String,
    /// CIS2 `id_assurance_level`, when it sent one.
    #[serde(default)]
    pub ial: Option<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    /// `person_roleid`: the URID that PDS wants in `NHSD-Session-URID`.
    pub role_id: String,
    #[serde(default)]
    pub role_code: String,
    #[serde(default)]
    pub role_name: String,
    #[serde(default)]
    pub org_code: String,
    #[serde(default)]
    pub org_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Organisation {
    pub org_code: String,
    #[serde(default)]
    pub org_name: String,
}

/// A signed-in session. Times are Unix seconds. The idle deadline is not stored: it is the
/// store's TTL, which activity slides.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub user: User,
    pub selected_role: Option<Role>,
    pub roles: Vec<Role>,
    pub organisations: Vec<Organisation>,
    pub aal: Aal,
    pub aal_source: AalSource,
    pub acr: String,
    pub amr: Vec<String>,
    pub auth_time: i64,
    pub created_at: i64,
    /// The absolute end of the session, whatever the activity.
    pub expires_at: i64,
    /// CIS2's session id (`sid`), for back-channel logout.
    pub cis2_sid: Option<String>,
    /// The CIS2 ID token (APIM token exchange, `id_token_hint` at logout).
    #[serde(with = "crate::secret::exposed")]
    pub id_token: Secret<Option<IdToken>>,
    /// When that ID token expires (Unix seconds); an expired one cannot be exchanged at APIM.
    pub id_token_expires_at: Option<i64>,
    /// Bumped by every step-up: tokens minted under an older generation are not reused.
    pub generation: u32,
}

/// A sign-in that has been started and not yet finished, keyed by a hash of its `state`.
#[derive(Debug, Serialize, Deserialize)]
pub struct PendingLogin {
    #[serde(with = "crate::secret::exposed")]
    pub nonce: Secret<String>,
    #[serde(with = "crate::secret::exposed")]
    pub pkce_verifier: Secret<String>,
    pub redirect_uri: String,
    pub required_aal: Aal,
    pub acr_values: String,
    pub api: Option<String>,
    pub app_state: String,
    /// Unix seconds when the sign-in started: `auth_time` must not be older.
    pub started_at: i64,
    /// `max_age` sent with the request, if any.
    pub max_age: Option<u64>,
    /// For a step-up: the session being upgraded and its user.
    pub step_up: Option<StepUpOf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepUpOf {
    pub session_id: String,
    pub uid: String,
}
