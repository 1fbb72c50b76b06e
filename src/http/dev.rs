//! Dev mode's pages: start a sign-in from the browser, land on `/dev/callback`, see the session,
//! try an AAL3 task and step up. Served only by `session-broker dev`.
//!
//! The session token is kept in an HttpOnly cookie scoped to `/dev` and shown on the page so a
//! developer can paste it into grpcurl: acceptable against the simulator, never in production.

use super::escape_html as esc;
use crate::broker::{Broker, ExchangeCode, SessionView, StartLogin};
use crate::clock::unix_seconds;
use crate::error::BrokerError;
use crate::secret::Secret;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use serde::Deserialize;
use std::sync::Arc;

const COOKIE: &str = "sb_dev_session";

pub struct DevPages {
    /// This page's own callback URL, registered with the simulator.
    pub callback_url: String,
    /// Where gRPC listens, for the commands shown.
    pub grpc_addr: String,
}

#[derive(Clone)]
struct DevState {
    pages: Arc<DevPages>,
    broker: Arc<Broker>,
}

pub fn router<S: Clone + Send + Sync + 'static>(
    pages: Arc<DevPages>,
    broker: Arc<Broker>,
) -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/dev") }))
        .route("/dev", get(home))
        .route("/dev/login", get(login))
        .route("/dev/callback", get(callback))
        .route("/dev/check", get(check))
        .route("/dev/token", get(token))
        .with_state(DevState { pages, broker })
}

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:Arial,Helvetica,sans-serif;margin:0;color:#212b32;background:#f0f4f5}}
header{{background:#005eb8;color:#fff;padding:16px 32px}} main{{max-width:860px;margin:24px auto;padding:0 16px}}
.warn{{background:#ffeb3b;color:#212b32;padding:8px 32px;font-weight:bold}}
.card{{background:#fff;padding:16px 24px;margin:16px 0;border-radius:4px}}
a.button,button{{display:inline-block;background:#007f3b;color:#fff;padding:10px 16px;margin:4px 8px 4px 0;border:0;border-radius:4px;text-decoration:none;font-size:16px}}
a.secondary{{background:#4c6272}} pre{{background:#212b32;color:#f0f4f5;padding:12px;overflow-x:auto;font-size:13px}}
th{{text-align:left;padding-right:16px;vertical-align:top}} .error{{border-left:6px solid #d5281b}}
</style></head><body><header><h1>{title}</h1></header>
<div class="warn">DEV MODE: simulated CIS2 and in-process keys. Not for production.</div><main>{body}</main></body></html>"#,
        title = esc(title)
    ))
}

async fn home(State(s): State<DevState>) -> Html<String> {
    page(
        "cis2-session-broker",
        &format!(
            r#"<div class="card"><p>Sign in through the CIS2 simulator, as a clinician would. Pick a test user
and an authenticator there; you come back here with a broker session.</p>
<a class="button" id="login-aal2" href="/dev/login?aal=2">Sign in (any authenticator)</a>
<a class="button" id="login-aal3" href="/dev/login?aal=3">Sign in with a smartcard or similar</a></div>
<div class="card"><h2>Or drive it over gRPC</h2><pre>grpcurl -plaintext {grpc} list
export TOKEN=sbc_...   # the caller token dev mode printed at start-up
grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{{"redirect_uri":"{cb}"}}' {grpc} session_broker.v1.SessionBroker/StartLogin</pre>
<p>Open the <code>authorization_url</code> it returns; the simulator sends the browser back to this page.</p></div>"#,
            grpc = esc(&s.pages.grpc_addr),
            cb = esc(&s.pages.callback_url)
        ),
    )
}

#[derive(Deserialize)]
struct LoginQuery {
    aal: Option<u8>,
    api: Option<String>,
    step_up: Option<bool>,
}

async fn login(
    State(s): State<DevState>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    let session_token = if q.step_up.unwrap_or(false) {
        cookie(&headers).map(Secret::new)
    } else {
        None
    };
    let req = StartLogin {
        redirect_uri: s.pages.callback_url.clone(),
        required_aal: q.aal.and_then(|a| crate::aal::Aal::from_level(a.into())),
        api: q.api.filter(|a| !a.is_empty()),
        session_token,
        app_state: String::new(),
    };
    match s.broker.start_login(req).await {
        Ok(started) => Redirect::to(&started.authorization_url).into_response(),
        Err(e) => error_page(e),
    }
}

#[derive(Deserialize, Default)]
struct CallbackQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
    #[serde(default)]
    iss: String,
}

async fn callback(State(s): State<DevState>, Query(q): Query<CallbackQuery>) -> Response {
    let exchanged = s
        .broker
        .exchange_code(ExchangeCode {
            state: Secret::new(q.state),
            code: Secret::new(q.code),
            error: q.error,
            error_description: q.error_description,
            iss: q.iss,
        })
        .await;
    let e = match exchanged {
        Ok(e) => e,
        Err(e) => return error_page(e),
    };
    let token = e.session_token.as_ref().map(|t| t.expose().to_owned());
    let headline = if e.stepped_up {
        "Your sign-in was upgraded: the same session can now be used for stronger tasks."
    } else {
        "You are signed in."
    };
    let body = session_html(&e.session, headline, token.as_deref(), &s.pages.grpc_addr);
    let mut response = page("Signed in", &body).into_response();
    if let Some(token) = token
        && let Ok(value) = format!("{COOKIE}={token}; Path=/dev; HttpOnly; SameSite=Lax").parse()
    {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[derive(Deserialize)]
struct CheckQuery {
    api: String,
}

async fn check(
    State(s): State<DevState>,
    headers: HeaderMap,
    Query(q): Query<CheckQuery>,
) -> Response {
    let Some(token) = cookie(&headers) else {
        return error_page(BrokerError::SessionInvalid);
    };
    match s.broker.check_access(&token, &q.api).await {
        Ok(c) if c.allowed => page(
            "Allowed",
            &format!(r#"<div class="card" id="allowed"><p>This session may use <b>{}</b> now.</p><a class="button secondary" href="/dev">Back</a></div>"#, esc(&c.api)),
        )
        .into_response(),
        Ok(c) => step_up_page(&c.message, &c.api),
        Err(e) => error_page(e),
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    api: String,
}

/// Asks for an APIM token as a backend would; a step-up answer shows what the clinician sees.
async fn token(
    State(s): State<DevState>,
    headers: HeaderMap,
    Query(q): Query<TokenQuery>,
) -> Response {
    let Some(session) = cookie(&headers) else {
        return error_page(BrokerError::SessionInvalid);
    };
    match s.broker.get_api_token(&session, &q.api, None).await {
        Ok(t) => {
            let header_rows: String = t
                .headers
                .iter()
                .map(|(k, v)| format!("<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v)))
                .collect();
            // Even in dev mode only a prefix is shown: enough to tell tokens apart.
            let prefix: String = t.access_token.expose().chars().take(8).collect();
            page(
                "APIM token",
                &format!(
                    r#"<div class="card" id="token"><p>An APIM access token for <b>{api}</b>, minted at <span id="token-aal">{aal}</span>.</p><table>
<tr><th>Token</th><td>{prefix}&hellip; ({token_type})</td></tr>
<tr><th>Expires at (Unix s)</th><td>{expires}</td></tr>{header_rows}</table>
<p><a class="button" id="try-eps" href="/dev/token?api=eps">Get a prescribing (EPS) token</a>
<a class="button secondary" href="/dev">Start again</a></p></div>"#,
                    api = esc(&t.api),
                    aal = esc(&t.aal.to_string()),
                    prefix = esc(&prefix),
                    token_type = esc(&t.token_type),
                    expires = unix_seconds(t.expires_at),
                ),
            )
            .into_response()
        }
        Err(BrokerError::StepUpRequired { api, message, .. }) => step_up_page(&message, &api),
        Err(e) => error_page(e),
    }
}

/// What a clinician sees when a task needs a stronger sign-in, with the step-up button.
fn step_up_page(message: &str, api: &str) -> Response {
    page(
        "A stronger sign-in is needed",
        &format!(
            r#"<div class="card error" id="step-up-needed"><p>{}</p>
<a class="button" id="step-up" href="/dev/login?api={}&amp;step_up=true">Sign in again</a>
<a class="button secondary" href="/dev">Back</a></div>"#,
            esc(message),
            esc(api)
        ),
    )
    .into_response()
}

fn session_html(v: &SessionView, headline: &str, token: Option<&str>, grpc: &str) -> String {
    let role = v
        .selected_role
        .as_ref()
        .map(|r| {
            format!(
                "{} ({}), {} [{}]",
                r.role_name, r.role_code, r.org_code, r.role_id
            )
        })
        .unwrap_or_else(|| "no role".into());
    let time = |t| unix_seconds(t).to_string();
    let token_hint = token.unwrap_or("<the session token you already hold>");
    format!(
        r#"<div class="card" id="session"><p id="headline">{headline}</p><table>
<tr><th>User</th><td id="user">{name} ({uid})</td></tr>
<tr><th>Role</th><td id="role">{role}</td></tr>
<tr><th>Level</th><td id="aal">{aal}</td></tr>
<tr><th>Signed in with</th><td id="authenticator">{authenticator}</td></tr>
<tr><th>Idle timeout at (Unix s)</th><td>{idle}</td></tr>
<tr><th>Session ends at (Unix s)</th><td>{ends}</td></tr>
<tr><th>Session id</th><td>{sid}</td></tr></table>
<p><a class="button" id="get-pds" href="/dev/token?api=pds">Get a PDS token</a>
<a class="button" id="try-eps" href="/dev/token?api=eps">Get a prescribing (EPS) token</a>
<a class="button secondary" href="/dev/check?api=eps">Check EPS access</a>
<a class="button secondary" href="/dev">Start again</a></p></div>
<div class="card"><h2>Try it over gRPC</h2><pre>grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{{"session_token":"{token}"}}' {grpc} session_broker.v1.SessionBroker/GetCurrentAal
grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{{"session_token":"{token}"}}' {grpc} session_broker.v1.SessionBroker/GetSession
grpcurl -plaintext -H "authorization: Bearer $TOKEN" -d '{{"session_token":"{token}","api":"eps"}}' {grpc} session_broker.v1.SessionBroker/CheckAccess</pre></div>"#,
        headline = esc(headline),
        name = esc(&v.user.name),
        uid = esc(&v.user.uid),
        role = esc(&role),
        aal = esc(&v.aal.to_string()),
        authenticator = esc(&v.authenticator),
        idle = time(v.idle_expires_at),
        ends = time(v.expires_at),
        sid = esc(v.session_id.as_str()),
        token = esc(token_hint),
        grpc = esc(grpc),
    )
}

fn error_page(e: BrokerError) -> Response {
    let status = match &e {
        BrokerError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        BrokerError::SessionInvalid | BrokerError::LoginStateInvalid => StatusCode::UNAUTHORIZED,
        BrokerError::LoginRejected { .. } => StatusCode::FORBIDDEN,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = format!(
        r#"<div class="card error" id="error"><p>{}</p><a class="button secondary" href="/dev">Start again</a></div>"#,
        esc(&e.to_string())
    );
    (status, page("Sign-in did not complete", &body)).into_response()
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}
