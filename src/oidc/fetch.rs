//! One outbound HTTP exchange with CIS2: send, time, log (never a body or a token), read a
//! bounded body, and turn failures into [`OidcError`]s. Each exchange is an OpenTelemetry client
//! span whose `traceparent` travels with the request, and a sample in the upstream metrics.

use super::OidcError;
use crate::metrics::{self, Upstream};
use reqwest::{RequestBuilder, StatusCode};
use serde::Deserialize;
use std::time::Instant;
use tracing::Instrument;
use tracing::field::Empty;

/// No CIS2 answer the broker reads is anywhere near this; a bigger one is refused unread.
pub(crate) const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Longest piece of CIS2's own error text carried into an error message.
const MAX_IDP_TEXT: usize = 300;

/// A CIS2 answer: its status and a body of at most [`MAX_BODY_BYTES`].
pub(crate) struct Answer {
    pub status: StatusCode,
    pub body: Vec<u8>,
}

/// Sends `request` and reads the answer. Network errors, timeouts and oversized or broken bodies
/// are `Unavailable`; interpreting the status is the caller's job.
pub(crate) async fn exchange(
    endpoint: &'static str,
    request: RequestBuilder,
) -> Result<Answer, OidcError> {
    let (client, request) = request.build_split();
    let mut request = request.map_err(|error| {
        OidcError::Unavailable(format!("CIS2 {endpoint}: {}", describe(&error)))
    })?;
    // Only the method, host and path: a query or a header could carry something secret.
    let span = tracing::info_span!(
        "cis2",
        otel.name = %format_args!("{} CIS2 {endpoint}", request.method()),
        otel.kind = "client",
        otel.status_code = Empty,
        upstream = "cis2",
        endpoint,
        http.request.method = %request.method(),
        server.address = request.url().host_str().unwrap_or_default(),
        url.path = request.url().path(),
        http.response.status_code = Empty,
    );
    crate::telemetry::inject_span_context(&span, request.headers_mut());
    let started = Instant::now();
    let result = send(endpoint, &client, request, started)
        .instrument(span.clone())
        .await;
    let status = match &result {
        Ok(answer) => Some(answer.status.as_u16()),
        Err(_) => None,
    };
    if let Some(status) = status {
        span.record("http.response.status_code", i64::from(status));
    }
    if status.is_none_or(|s| s >= 500) {
        span.record("otel.status_code", "ERROR");
    }
    metrics::upstream(Upstream::Cis2, endpoint, status, started.elapsed());
    result
}

async fn send(
    endpoint: &'static str,
    client: &reqwest::Client,
    request: reqwest::Request,
    started: Instant,
) -> Result<Answer, OidcError> {
    let elapsed_ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut response = match client.execute(request).await {
        Ok(response) => response,
        Err(error) => {
            let elapsed_ms = elapsed_ms();
            let cause = describe(&error);
            tracing::warn!(upstream = "cis2", endpoint, elapsed_ms, error = %cause, "CIS2 request failed");
            return Err(OidcError::Unavailable(format!("CIS2 {endpoint}: {cause}")));
        }
    };
    let status = response.status();
    if response
        .content_length()
        .is_some_and(|len| len > MAX_BODY_BYTES as u64)
    {
        return Err(too_large(endpoint));
    }
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(too_large(endpoint));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(error) => {
                let cause = describe(&error);
                tracing::warn!(upstream = "cis2", endpoint, status = status.as_u16(), elapsed_ms = elapsed_ms(), error = %cause, "reading CIS2's answer failed");
                return Err(OidcError::Unavailable(format!("CIS2 {endpoint}: {cause}")));
            }
        }
    }
    tracing::info!(
        upstream = "cis2",
        endpoint,
        status = status.as_u16(),
        elapsed_ms = elapsed_ms(),
        "CIS2 answered"
    );
    Ok(Answer { status, body })
}

fn too_large(endpoint: &'static str) -> OidcError {
    tracing::warn!(
        upstream = "cis2",
        endpoint,
        limit = MAX_BODY_BYTES,
        "CIS2 answer too large"
    );
    OidcError::Unavailable(format!(
        "CIS2 {endpoint} answer is larger than {MAX_BODY_BYTES} bytes"
    ))
}

/// reqwest's error text with its causes, timeouts named plainly. It may name the URL: these are
/// CIS2's published endpoints, and the broker never puts a secret in their query.
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out".to_owned();
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The OAuth 2.0 error body (RFC 6749 §5.2) that CIS2 sends with a 4xx.
#[derive(Deserialize)]
struct OAuthErrorBody {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// A 4xx answer: `Rejected`, carrying CIS2's OAuth `error` code when it sent one.
pub(crate) fn rejected_by_idp(endpoint: &'static str, answer: &Answer) -> OidcError {
    let status = answer.status.as_u16();
    match serde_json::from_slice::<OAuthErrorBody>(&answer.body) {
        Ok(body) => {
            let code = printable(&body.error);
            let detail = match body.error_description.as_deref().map(printable) {
                Some(description) if !description.is_empty() => {
                    format!("CIS2 {endpoint} refused (HTTP {status}): {code}: {description}")
                }
                _ => format!("CIS2 {endpoint} refused (HTTP {status}): {code}"),
            };
            OidcError::Rejected {
                idp_error: Some(code),
                detail,
            }
        }
        Err(_) => OidcError::rejected(format!("CIS2 {endpoint} refused (HTTP {status})")),
    }
}

/// A status that is neither success nor a client error.
pub(crate) fn unexpected_status(endpoint: &'static str, status: StatusCode) -> OidcError {
    OidcError::Unavailable(format!("CIS2 {endpoint} answered HTTP {}", status.as_u16()))
}

/// CIS2's text, cut short and stripped of control characters before it joins a message.
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_IDP_TEXT)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).expect("valid status"),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn idp_errors_keep_the_code_and_a_clean_description() {
        let cases = [
            (
                answer(
                    400,
                    r#"{"error":"invalid_grant","error_description":"grant expired"}"#,
                ),
                Some("invalid_grant"),
                "CIS2 token endpoint refused (HTTP 400): invalid_grant: grant expired",
            ),
            (
                answer(401, r#"{"error":"invalid_client"}"#),
                Some("invalid_client"),
                "CIS2 token endpoint refused (HTTP 401): invalid_client",
            ),
            (
                answer(
                    400,
                    "{\"error\":\"bad\\nthing\",\"error_description\":\"\\u0007\"}",
                ),
                Some("badthing"),
                "CIS2 token endpoint refused (HTTP 400): badthing",
            ),
            (
                answer(403, "<html>no</html>"),
                None,
                "CIS2 token endpoint refused (HTTP 403)",
            ),
            (
                answer(400, r#"{"message":"x"}"#),
                None,
                "CIS2 token endpoint refused (HTTP 400)",
            ),
        ];
        for (answer, code, text) in cases {
            match rejected_by_idp("token endpoint", &answer) {
                OidcError::Rejected { idp_error, detail } => {
                    assert_eq!(idp_error.as_deref(), code);
                    assert_eq!(detail, text);
                }
                other => panic!("expected Rejected, got {other:?}"),
            }
        }
        let long = format!(
            r#"{{"error":"x","error_description":"{}"}}"#,
            "d".repeat(5000)
        );
        let err = rejected_by_idp("token endpoint", &answer(400, &long));
        assert!(err.to_string().len() < 400);
    }
}
