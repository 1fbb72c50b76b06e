//! `POST /backchannel-logout`: OpenID Connect Back-Channel Logout 1.0, as CIS2 sends it. The form
//! field `logout_token` is checked by the broker (signature, claims, replay) and the matching
//! sessions end on every replica. 200 when done, 400 with a JSON error for a token that fails a
//! check, 503 when CIS2's keys or the store cannot be reached (CIS2 may retry). The token is never
//! logged, and every answer carries `Cache-Control: no-store` (§2.8).

use crate::broker::Broker;
use crate::error::BrokerError;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

pub const PATH: &str = "/backchannel-logout";

/// A logout token is a few kilobytes; the form around it adds little.
const MAX_BODY: usize = 70 * 1024;

pub fn router<S: Clone + Send + Sync + 'static>(broker: Arc<Broker>) -> Router<S> {
    Router::new()
        .route(PATH, post(backchannel_logout))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(broker)
}

async fn backchannel_logout(
    State(broker): State<Arc<Broker>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = match logout_token(&headers, &body) {
        Ok(token) => token,
        Err(problem) => return answer(StatusCode::BAD_REQUEST, "invalid_request", problem),
    };
    match broker.backchannel_logout(&token).await {
        Ok(_) => (StatusCode::OK, [(header::CACHE_CONTROL, "no-store")]).into_response(),
        Err(e) => refusal(&e),
    }
}

/// The one `logout_token` of a form-encoded body. Errors are safe to show: they never quote it.
pub fn logout_token(headers: &HeaderMap, body: &[u8]) -> Result<String, &'static str> {
    let form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            v.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !form {
        return Err("the body must be application/x-www-form-urlencoded");
    }
    let mut tokens = url::form_urlencoded::parse(body)
        .filter(|(name, _)| name == "logout_token")
        .map(|(_, value)| value.into_owned());
    match (tokens.next(), tokens.next()) {
        (Some(token), None) if !token.is_empty() => Ok(token),
        (Some(_), Some(_)) => Err("logout_token is given more than once"),
        _ => Err("logout_token is required"),
    }
}

fn refusal(e: &BrokerError) -> Response {
    match e {
        BrokerError::LoginRejected { detail, .. } => {
            answer(StatusCode::BAD_REQUEST, "invalid_request", detail)
        }
        BrokerError::IdpUnavailable(_) | BrokerError::StoreUnavailable(_) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "the broker cannot check or apply the logout now; retry later",
        ),
        _ => answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the logout could not be applied",
        ),
    }
}

fn answer(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        [(header::CACHE_CONTROL, "no-store")],
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn form() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
        );
        h
    }

    #[test]
    fn the_form_field_is_read_strictly() {
        let cases: &[(&[u8], Result<&str, &str>)] = &[
            (b"logout_token=a.b.c", Ok("a.b.c")),
            (b"x=1&logout_token=a%2Eb.c", Ok("a.b.c")),
            (b"", Err("logout_token is required")),
            (b"logout_token=", Err("logout_token is required")),
            (b"other=a.b.c", Err("logout_token is required")),
            (
                b"logout_token=a&logout_token=b",
                Err("logout_token is given more than once"),
            ),
        ];
        for (body, want) in cases {
            assert_eq!(
                logout_token(&form(), body).as_deref().map_err(|e| *e),
                *want,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn other_content_types_are_refused() {
        let mut json = HeaderMap::new();
        json.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for headers in [HeaderMap::new(), json] {
            assert_eq!(
                logout_token(&headers, b"logout_token=a.b.c"),
                Err("the body must be application/x-www-form-urlencoded")
            );
        }
    }

    #[test]
    fn refusals_never_echo_the_token_and_are_not_cached() {
        let r = answer(StatusCode::BAD_REQUEST, "invalid_request", "x");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        let unavailable = refusal(&BrokerError::StoreUnavailable("down".into()));
        assert_eq!(unavailable.status(), StatusCode::SERVICE_UNAVAILABLE);
        let rejected = refusal(&BrokerError::rejected("bad"));
        assert_eq!(rejected.status(), StatusCode::BAD_REQUEST);
    }
}
