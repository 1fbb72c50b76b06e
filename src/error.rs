//! The broker's failures, named for what went wrong. `grpc::status` turns each into the
//! documented gRPC status and `ErrorInfo` reason; nothing else does.
//!
//! Messages here may reach callers: they never contain a token, code, state, nonce or session
//! token. Server faults carry their cause for the log only (`Internal`, `*Unavailable`).

use crate::aal::Aal;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: &'static str,
    pub description: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("invalid request: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    InvalidArgument(Vec<FieldViolation>),

    #[error("caller not authenticated")]
    CallerUnauthenticated,

    #[error("caller may not use this method")]
    CallerForbidden,

    /// Unknown, expired, idle-timed-out, revoked or malformed session token.
    #[error("session is not valid: sign in again")]
    SessionInvalid,

    /// Unknown, expired or already-used `state`.
    #[error("sign-in state is unknown, expired or already used: start the sign-in again")]
    LoginStateInvalid,

    /// The IdP refused, or its answer failed a check. `idp_error` is the IdP's own error code when
    /// it sent one; `detail` says which check failed (safe to show: no secret values).
    #[error("sign-in rejected: {detail}")]
    LoginRejected {
        idp_error: Option<String>,
        detail: String,
    },

    #[error("this task needs a stronger sign-in")]
    StepUpRequired {
        api: String,
        required: Aal,
        current: Aal,
        message: String,
    },

    /// The API needs an identity assurance level the user's account does not have: no sign-in
    /// can fix this, only the user's Registration Authority.
    #[error("this task needs a higher level of identity checks than the user's account has")]
    IdentityAssuranceInsufficient {
        api: String,
        required_ial: u8,
        message: String,
    },

    /// APIM or CIS2 refused with a 4xx that the user or configuration must fix.
    #[error("{upstream} refused the request: {error}")]
    UpstreamRejected {
        upstream: &'static str,
        error: String,
        description: String,
    },

    #[error("too many requests")]
    RateLimited { retry_after: Duration },

    #[error("CIS2 is unavailable")]
    IdpUnavailable(String),

    #[error("APIM is unavailable")]
    ApimUnavailable(String),

    #[error("the session store is unavailable")]
    StoreUnavailable(String),

    #[error("internal error")]
    Internal(String),
}

impl BrokerError {
    pub fn invalid(field: &'static str, description: impl Into<String>) -> Self {
        BrokerError::InvalidArgument(vec![FieldViolation {
            field,
            description: description.into(),
        }])
    }

    pub fn rejected(detail: impl Into<String>) -> Self {
        BrokerError::LoginRejected {
            idp_error: None,
            detail: detail.into(),
        }
    }
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;
