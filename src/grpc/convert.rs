//! Proto <-> domain. Requests are destructured field by field, so a new proto field breaks the
//! build here instead of being dropped silently.

use super::pb;
use crate::aal::{Aal, AalSource};
use crate::broker::{
    AccessCheck, ApiTokenView, ExchangeCode, Exchanged, LoggedOut, LoginStarted, SessionView,
    StartLogin,
};
use crate::error::BrokerError;
use crate::policy::ApiPolicy;
use crate::secret::Secret;
use crate::session::{Organisation, Role, User};
use std::time::SystemTime;

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

pub fn aal(a: Aal) -> pb::Aal {
    match a {
        Aal::Aal1 => pb::Aal::Aal1,
        Aal::Aal2 => pb::Aal::Aal2,
        Aal::Aal3 => pb::Aal::Aal3,
    }
}

fn aal_source(s: AalSource) -> pb::AalSource {
    match s {
        AalSource::IdToken => pb::AalSource::IdToken,
        AalSource::Requested => pb::AalSource::Requested,
    }
}

/// An optional level from the wire: unspecified is `None`; unknown numbers are refused.
pub fn aal_from_wire(field: &'static str, raw: i32) -> Result<Option<Aal>, BrokerError> {
    match pb::Aal::try_from(raw) {
        Ok(pb::Aal::Unspecified) => Ok(None),
        Ok(pb::Aal::Aal1) => Ok(Some(Aal::Aal1)),
        Ok(pb::Aal::Aal2) => Ok(Some(Aal::Aal2)),
        Ok(pb::Aal::Aal3) => Ok(Some(Aal::Aal3)),
        Err(_) => Err(BrokerError::invalid(field, "is not a known Aal value")),
    }
}

/// `min_validity` from the wire: absent means the configured default; negative is refused.
pub fn min_validity(
    d: Option<prost_types::Duration>,
) -> Result<Option<std::time::Duration>, BrokerError> {
    match d {
        None => Ok(None),
        Some(d) => std::time::Duration::try_from(d)
            .map(Some)
            .map_err(|_| BrokerError::invalid("min_validity", "must be a non-negative duration")),
    }
}

impl From<ApiTokenView> for pb::ApiToken {
    fn from(t: ApiTokenView) -> Self {
        let ApiTokenView {
            access_token,
            token_type,
            expires_at,
            api,
            aal: level,
            headers,
        } = t;
        pb::ApiToken {
            access_token: access_token.into_inner(),
            token_type,
            expires_at: Some(timestamp(expires_at)),
            api,
            aal: aal(level).into(),
            headers,
        }
    }
}

impl From<LoggedOut> for pb::LogoutResponse {
    fn from(out: LoggedOut) -> Self {
        pb::LogoutResponse {
            end_session_url: out.end_session_url.into_inner(),
        }
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl TryFrom<pb::StartLoginRequest> for StartLogin {
    type Error = BrokerError;

    fn try_from(r: pb::StartLoginRequest) -> Result<Self, BrokerError> {
        let pb::StartLoginRequest {
            redirect_uri,
            required_aal,
            api,
            session_token,
            app_state,
        } = r;
        Ok(StartLogin {
            redirect_uri,
            required_aal: aal_from_wire("required_aal", required_aal)?,
            api: non_empty(api),
            session_token: non_empty(session_token).map(Secret::new),
            app_state,
        })
    }
}

impl From<pb::ExchangeCodeRequest> for ExchangeCode {
    fn from(r: pb::ExchangeCodeRequest) -> Self {
        let pb::ExchangeCodeRequest {
            state,
            code,
            error,
            error_description,
            iss,
        } = r;
        ExchangeCode {
            state: Secret::new(state),
            code: Secret::new(code),
            error,
            error_description,
            iss,
        }
    }
}

impl From<LoginStarted> for pb::StartLoginResponse {
    fn from(s: LoginStarted) -> Self {
        pb::StartLoginResponse {
            authorization_url: s.authorization_url,
            state: s.state.into_inner(),
            expires_at: Some(timestamp(s.expires_at)),
            acr_values: s.acr_values,
            step_up: s.step_up,
        }
    }
}

impl From<Exchanged> for pb::ExchangeCodeResponse {
    fn from(e: Exchanged) -> Self {
        pb::ExchangeCodeResponse {
            session_token: e
                .session_token
                .map(|t| t.expose().to_owned())
                .unwrap_or_default(),
            session: Some(e.session.into()),
            stepped_up: e.stepped_up,
            app_state: e.app_state,
        }
    }
}

fn user(u: User) -> pb::User {
    let User {
        uid,
        name,
        given_name,
        family_name,
        display_name,
        title,
        ial,
    } = u;
    pb::User {
        uid,
        name,
        given_name,
        family_name,
        display_name,
        title,
        id_assurance_level: ial.map(i32::from).unwrap_or(0),
    }
}

fn role(r: Role) -> pb::Role {
    let Role {
        role_id,
        role_code,
        role_name,
        org_code,
        org_name,
    } = r;
    pb::Role {
        role_id,
        role_code,
        role_name,
        org_code,
        org_name,
    }
}

fn organisation(o: Organisation) -> pb::Organisation {
    let Organisation { org_code, org_name } = o;
    pb::Organisation { org_code, org_name }
}

impl From<SessionView> for pb::Session {
    fn from(v: SessionView) -> Self {
        let SessionView {
            session_id,
            user: u,
            selected_role,
            roles,
            organisations,
            aal: a,
            aal_source: source,
            acr,
            amr,
            authenticator,
            auth_time,
            created_at,
            idle_expires_at,
            expires_at,
        } = v;
        pb::Session {
            session_id: session_id.to_string(),
            user: Some(user(u)),
            selected_role: selected_role.map(role),
            roles: roles.into_iter().map(role).collect(),
            aal: aal(a).into(),
            acr,
            amr,
            authenticator,
            auth_time: Some(timestamp(auth_time)),
            created_at: Some(timestamp(created_at)),
            idle_expires_at: Some(timestamp(idle_expires_at)),
            expires_at: Some(timestamp(expires_at)),
            aal_source: aal_source(source).into(),
            organisations: organisations.into_iter().map(organisation).collect(),
        }
    }
}

impl From<SessionView> for pb::GetCurrentAalResponse {
    fn from(v: SessionView) -> Self {
        pb::GetCurrentAalResponse {
            aal: aal(v.aal).into(),
            acr: v.acr,
            amr: v.amr,
            authenticator: v.authenticator,
            auth_time: Some(timestamp(v.auth_time)),
            idle_expires_at: Some(timestamp(v.idle_expires_at)),
            expires_at: Some(timestamp(v.expires_at)),
            aal_source: aal_source(v.aal_source).into(),
        }
    }
}

impl From<AccessCheck> for pb::CheckAccessResponse {
    fn from(c: AccessCheck) -> Self {
        let AccessCheck {
            allowed,
            api,
            required_aal,
            current_aal,
            message,
        } = c;
        pb::CheckAccessResponse {
            allowed,
            api,
            required_aal: aal(required_aal).into(),
            current_aal: aal(current_aal).into(),
            message,
        }
    }
}

impl From<&ApiPolicy> for pb::ApiPolicy {
    fn from(p: &ApiPolicy) -> Self {
        pb::ApiPolicy {
            api: p.api.clone(),
            required_aal: aal(p.required_aal).into(),
            required_ial: p.required_ial.map(i32::from).unwrap_or(0),
            description: p.description.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_login_maps_empty_strings_to_none_and_refuses_unknown_levels() {
        let req = pb::StartLoginRequest {
            redirect_uri: "https://app/cb".into(),
            required_aal: pb::Aal::Aal3.into(),
            api: String::new(),
            session_token: String::new(),
            app_state: "x".into(),
        };
        let d = StartLogin::try_from(req.clone()).expect("valid");
        assert_eq!(d.required_aal, Some(Aal::Aal3));
        assert!(d.api.is_none() && d.session_token.is_none());
        let bad = pb::StartLoginRequest {
            required_aal: 42,
            ..req
        };
        assert!(matches!(
            StartLogin::try_from(bad),
            Err(BrokerError::InvalidArgument(_))
        ));
    }
}
