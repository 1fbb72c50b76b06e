//! The error table of the README, in code: every [`BrokerError`] becomes a gRPC status with a
//! `google.rpc.ErrorInfo` (domain `session-broker`) carrying a stable `reason`.
//!
//! Client errors tell the caller what to fix. Server faults say only what failed and that a retry
//! is safe; their cause goes to the log, never to the caller.

use crate::error::BrokerError;
use std::collections::HashMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub const ERROR_DOMAIN: &str = "session-broker";

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let message = e.to_string();
        let mut details = ErrorDetails::new();
        let (code, reason) = match e {
            BrokerError::InvalidArgument(violations) => {
                for v in violations {
                    details.add_bad_request_violation(v.field, v.description);
                }
                (Code::InvalidArgument, "INVALID_ARGUMENT")
            }
            BrokerError::CallerUnauthenticated => (Code::Unauthenticated, "CALLER_UNAUTHENTICATED"),
            BrokerError::CallerForbidden => (Code::PermissionDenied, "CALLER_FORBIDDEN"),
            BrokerError::SessionInvalid => (Code::Unauthenticated, "SESSION_INVALID"),
            BrokerError::LoginStateInvalid => (Code::FailedPrecondition, "LOGIN_STATE_INVALID"),
            BrokerError::LoginRejected {
                idp_error,
                detail: _,
            } => {
                let metadata = idp_error.map(|e| HashMap::from([("idp_error".to_owned(), e)]));
                return with_info(
                    Code::PermissionDenied,
                    "LOGIN_REJECTED",
                    message,
                    details,
                    metadata,
                );
            }
            BrokerError::StepUpRequired {
                api,
                required,
                current,
                message: for_clinician,
            } => {
                details.set_localized_message("en-GB", for_clinician);
                let metadata = HashMap::from([
                    ("api".to_owned(), api),
                    (
                        "required_aal".to_owned(),
                        format!("AAL_{}", required.level()),
                    ),
                    ("current_aal".to_owned(), format!("AAL_{}", current.level())),
                ]);
                return with_info(
                    Code::FailedPrecondition,
                    "STEP_UP_REQUIRED",
                    message,
                    details,
                    Some(metadata),
                );
            }
            BrokerError::IdentityAssuranceInsufficient {
                api,
                required_ial,
                message: for_clinician,
            } => {
                details.set_localized_message("en-GB", for_clinician);
                let metadata = HashMap::from([
                    ("api".to_owned(), api),
                    ("required_ial".to_owned(), required_ial.to_string()),
                ]);
                return with_info(
                    Code::PermissionDenied,
                    "IDENTITY_ASSURANCE_INSUFFICIENT",
                    message,
                    details,
                    Some(metadata),
                );
            }
            BrokerError::UpstreamRejected {
                upstream,
                error,
                description: _,
            } => {
                let metadata = HashMap::from([
                    ("upstream".to_owned(), upstream.to_owned()),
                    ("error".to_owned(), error),
                ]);
                return with_info(
                    Code::FailedPrecondition,
                    "UPSTREAM_REJECTED",
                    message,
                    details,
                    Some(metadata),
                );
            }
            BrokerError::RateLimited { retry_after } => {
                details.set_retry_info(Some(retry_after));
                (Code::ResourceExhausted, "RATE_LIMITED")
            }
            BrokerError::IdpUnavailable(cause) => {
                tracing::warn!(%cause, upstream = "cis2", "CIS2 unavailable");
                (Code::Unavailable, "IDP_UNAVAILABLE")
            }
            BrokerError::ApimUnavailable(cause) => {
                tracing::warn!(%cause, upstream = "apim", "APIM unavailable");
                (Code::Unavailable, "APIM_UNAVAILABLE")
            }
            BrokerError::StoreUnavailable(cause) => {
                tracing::warn!(%cause, "session store unavailable");
                (Code::Unavailable, "STORE_UNAVAILABLE")
            }
            BrokerError::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                (Code::Internal, "INTERNAL")
            }
        };
        with_info(code, reason, message, details, None)
    }
}

fn with_info(
    code: Code,
    reason: &str,
    message: String,
    mut details: ErrorDetails,
    metadata: Option<HashMap<String, String>>,
) -> Status {
    details.set_error_info(reason, ERROR_DOMAIN, metadata.unwrap_or_default());
    Status::with_error_details(code, message, details)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aal::Aal;
    use crate::error::FieldViolation;
    use std::time::Duration;

    fn reason(s: &Status) -> String {
        s.get_details_error_info()
            .map(|i| i.reason)
            .unwrap_or_default()
    }

    #[test]
    fn every_error_has_its_documented_code_and_reason() {
        let cases: Vec<(BrokerError, Code, &str)> = vec![
            (
                BrokerError::invalid("api", "unknown"),
                Code::InvalidArgument,
                "INVALID_ARGUMENT",
            ),
            (
                BrokerError::CallerUnauthenticated,
                Code::Unauthenticated,
                "CALLER_UNAUTHENTICATED",
            ),
            (
                BrokerError::CallerForbidden,
                Code::PermissionDenied,
                "CALLER_FORBIDDEN",
            ),
            (
                BrokerError::SessionInvalid,
                Code::Unauthenticated,
                "SESSION_INVALID",
            ),
            (
                BrokerError::LoginStateInvalid,
                Code::FailedPrecondition,
                "LOGIN_STATE_INVALID",
            ),
            (
                BrokerError::rejected("nonce"),
                Code::PermissionDenied,
                "LOGIN_REJECTED",
            ),
            (
                BrokerError::StepUpRequired {
                    api: "eps".into(),
                    required: Aal::Aal3,
                    current: Aal::Aal2,
                    message: "m".into(),
                },
                Code::FailedPrecondition,
                "STEP_UP_REQUIRED",
            ),
            (
                BrokerError::UpstreamRejected {
                    upstream: "apim",
                    error: "unauthorized_client".into(),
                    description: String::new(),
                },
                Code::FailedPrecondition,
                "UPSTREAM_REJECTED",
            ),
            (
                BrokerError::IdentityAssuranceInsufficient {
                    api: "ers".into(),
                    required_ial: 3,
                    message: "m".into(),
                },
                Code::PermissionDenied,
                "IDENTITY_ASSURANCE_INSUFFICIENT",
            ),
            (
                BrokerError::RateLimited {
                    retry_after: Duration::from_secs(1),
                },
                Code::ResourceExhausted,
                "RATE_LIMITED",
            ),
            (
                BrokerError::IdpUnavailable("x".into()),
                Code::Unavailable,
                "IDP_UNAVAILABLE",
            ),
            (
                BrokerError::ApimUnavailable("x".into()),
                Code::Unavailable,
                "APIM_UNAVAILABLE",
            ),
            (
                BrokerError::StoreUnavailable("x".into()),
                Code::Unavailable,
                "STORE_UNAVAILABLE",
            ),
            (
                BrokerError::Internal("x".into()),
                Code::Internal,
                "INTERNAL",
            ),
        ];
        for (err, code, want) in cases {
            let s = Status::from(err);
            assert_eq!(s.code(), code, "{want}");
            assert_eq!(reason(&s), want);
            assert_eq!(
                s.get_details_error_info().map(|i| i.domain).as_deref(),
                Some(ERROR_DOMAIN)
            );
        }
    }

    #[test]
    fn server_faults_keep_their_cause_out_of_the_message() {
        for e in [
            BrokerError::StoreUnavailable("redis://user:pw@10.0.0.1 refused".into()),
            BrokerError::Internal("stack detail".into()),
            BrokerError::IdpUnavailable("tcp reset at 10.1.1.1".into()),
        ] {
            let s = Status::from(e);
            assert!(!s.message().contains("10."), "{}", s.message());
            assert!(!s.message().contains("detail"), "{}", s.message());
        }
    }

    #[test]
    fn step_up_carries_metadata_and_a_message_for_the_clinician() {
        let s = Status::from(BrokerError::StepUpRequired {
            api: "eps".into(),
            required: Aal::Aal3,
            current: Aal::Aal2,
            message: "To prescribe medicines you need to sign in again with a smartcard.".into(),
        });
        let info = s.get_details_error_info().expect("error info");
        assert_eq!(info.metadata.get("api").map(String::as_str), Some("eps"));
        assert_eq!(
            info.metadata.get("required_aal").map(String::as_str),
            Some("AAL_3")
        );
        assert_eq!(
            info.metadata.get("current_aal").map(String::as_str),
            Some("AAL_2")
        );
        let lm = s
            .get_details_localized_message()
            .expect("localized message");
        assert_eq!(lm.locale, "en-GB");
        assert!(lm.message.contains("smartcard"));
    }

    #[test]
    fn bad_requests_list_each_field_and_rejections_keep_the_idp_code() {
        let s = Status::from(BrokerError::InvalidArgument(vec![
            FieldViolation {
                field: "redirect_uri",
                description: "unknown".into(),
            },
            FieldViolation {
                field: "app_state",
                description: "too long".into(),
            },
        ]));
        let fields: Vec<String> = s
            .get_details_bad_request()
            .expect("bad request")
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["redirect_uri", "app_state"]);

        let s = Status::from(BrokerError::LoginRejected {
            idp_error: Some("access_denied".into()),
            detail: "d".into(),
        });
        let info = s.get_details_error_info().expect("error info");
        assert_eq!(
            info.metadata.get("idp_error").map(String::as_str),
            Some("access_denied")
        );

        let s = Status::from(BrokerError::RateLimited {
            retry_after: Duration::from_secs(2),
        });
        assert_eq!(
            s.get_details_retry_info().and_then(|r| r.retry_delay),
            Some(Duration::from_secs(2))
        );
    }
}
