//! The HTTP port: liveness and readiness, Prometheus metrics, the broker's public JWKS, and (dev
//! mode only) the walk-through pages, and CIS2's back-channel logout.

pub mod backchannel;
pub mod dev;

use crate::server::App;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

pub fn router(app: App) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/.well-known/jwks.json", get(jwks))
        .merge(backchannel::router(app.broker.clone()));
    if let Some(dev) = app.dev.clone() {
        router = router.merge(dev::router(dev, app.broker.clone()));
    }
    router.with_state(app)
}

/// Liveness: the process answers.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: the store answers and CIS2 discovery is loaded.
async fn readyz(State(app): State<App>) -> Response {
    if crate::server::ready(&app.broker).await {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: session store or CIS2 unavailable\n",
        )
            .into_response()
    }
}

/// Prometheus scrapes this. Counts and latencies only: no label names a user or a session.
async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        crate::metrics::render(),
    )
        .into_response()
}

/// The public half of the broker's signing keys: what APIM's `jwks-resource-url` and a CIS2
/// `private_key_jwt` registration point at.
async fn jwks(State(app): State<App>) -> Response {
    let body = match &app.signing {
        Some(keys) => keys.public_jwks_json(),
        None => serde_json::json!({ "keys": [] }),
    };
    ([(header::CACHE_CONTROL, "public, max-age=300")], Json(body)).into_response()
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
