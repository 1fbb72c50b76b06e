//! `session-broker dev`: the broker with the in-memory store (or `--redis`), wired to the
//! built-in CIS2 simulator, on loopback only. For trying the broker out and for demos; it says
//! loudly that it is not for production.

use crate::config::Config;
use crate::http::dev::DevPages;
use crate::secret::Secret;
use crate::server::{self, StartupError};
use crate::session::KeyRing;
use crate::signing::{SigningKeys, generate_private_pem};
use crate::sim::{ApimApp, ApimOptions, ApimSimulator, Cis2Simulator, SimClient, SimOptions};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

pub struct DevOptions {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub sim_addr: SocketAddr,
    /// Where the APIM simulator listens.
    pub apim_addr: SocketAddr,
    pub redis_url: Option<String>,
}

/// The simulated APIM application dev mode signs in as.
const DEV_API_KEY: &str = "session-broker-dev-api-key";

/// Where dev mode's simulators are, for the generated configuration.
pub struct DevEndpoints<'a> {
    pub issuer: &'a str,
    pub discovery_url: &'a str,
    pub callback: &'a str,
    pub apim_token_url: &'a str,
}

pub const DEV_CLIENT_ID: &str = "session-broker-dev";
const DEV_KID: &str = "dev-1";

/// The name of dev mode's one caller, which may use every RPC.
pub const DEV_CALLER: &str = "dev";

/// The configuration dev mode runs on, as TOML, so it goes through the same validation as a
/// production file. `caller_token_sha256` is the hash of the caller token dev mode prints.
pub fn dev_config(
    opts: &DevOptions,
    at: &DevEndpoints<'_>,
    signing_pem: &Secret<String>,
    caller_token_sha256: &str,
) -> Result<Config, StartupError> {
    let DevEndpoints {
        issuer,
        discovery_url,
        callback,
        apim_token_url,
    } = at;
    let store = match &opts.redis_url {
        Some(url) => format!("kind = \"redis\"\nurl = {url:?}\nkey_prefix = \"sb-dev:\""),
        None => "kind = \"memory\"".to_owned(),
    };
    let key = KeyRing::generate_key();
    let text = format!(
        r#"
[server]
grpc_addr = "{grpc}"
http_addr = "{http}"
shutdown_grace = "2s"

[store]
{store}

[cis2]
issuer = "{issuer}"
discovery_url = "{discovery_url}"
client_id = "{DEV_CLIENT_ID}"
client_auth = "private_key_jwt"
redirect_uris = ["{callback}"]
http_timeout = "5s"

[apim]
pattern = "separate"
token_url = "{apim_token_url}"
api_key = "{DEV_API_KEY}"
http_timeout = "5s"
end_user_organisation_header = true

[[callers]]
name = "{DEV_CALLER}"
token_sha256 = "{caller_token_sha256}"
rpcs = ["*"]
"#,
        grpc = opts.grpc_addr,
        http = opts.http_addr,
    );
    // Secrets go in through the environment route so they never sit in a formatted string.
    let env = [
        (
            "BROKER__ENCRYPTION__KEYS".to_owned(),
            format!("dev:{}", key.expose()),
        ),
        (
            "BROKER__SIGNING__KEYS".to_owned(),
            format!(
                "[{{ kid = \"{DEV_KID}\", private_key_pem = {:?} }}]",
                signing_pem.expose()
            ),
        ),
    ];
    Config::from_toml_with_env(&text, env).map_err(|e| StartupError::Config(e.to_string()))
}

/// Runs dev mode until `shutdown`.
pub async fn run(
    opts: DevOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    if !opts.grpc_addr.ip().is_loopback()
        || !opts.http_addr.ip().is_loopback()
        || !opts.sim_addr.ip().is_loopback()
        || !opts.apim_addr.ip().is_loopback()
    {
        return Err(StartupError::Config(
            "dev mode listens on loopback addresses only".into(),
        ));
    }
    let listeners = DevListeners {
        grpc: TcpListener::bind(opts.grpc_addr).await?,
        http: TcpListener::bind(opts.http_addr).await?,
        sim: TcpListener::bind(opts.sim_addr).await?,
        apim: TcpListener::bind(opts.apim_addr).await?,
    };
    serve(listeners, &opts, shutdown).await
}

/// Dev mode's listeners, bound by the caller (tests bind port 0).
pub struct DevListeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
    pub sim: TcpListener,
    pub apim: TcpListener,
}

/// Runs dev mode on listeners already bound.
pub async fn serve(
    listeners: DevListeners,
    opts: &DevOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let DevListeners {
        grpc,
        http,
        sim: sim_listener,
        apim: apim_listener,
    } = listeners;
    let callback = format!("http://{}/dev/callback", http.local_addr()?);

    let pem = generate_private_pem().map_err(|e| StartupError::Config(e.to_string()))?;
    let signing = SigningKeys::from_pems(&[(DEV_KID.to_owned(), pem.clone())])
        .map_err(|e| StartupError::Config(e.to_string()))?;
    let sim = Cis2Simulator::start(
        sim_listener,
        SimOptions {
            clients: vec![SimClient {
                client_id: DEV_CLIENT_ID.into(),
                client_secret: None,
                jwks: Some(signing.public_jwks()),
                redirect_uris: vec![callback.clone()],
                post_logout_redirect_uris: vec![format!("http://{}/dev", http.local_addr()?)],
            }],
            ..SimOptions::default()
        },
    )
    .await?;

    let mut apim_options = ApimOptions::for_cis2(&sim);
    apim_options.apps = vec![ApimApp {
        api_key: DEV_API_KEY.into(),
        client_secret: None,
        jwks: Some(signing.public_jwks()),
        redirect_uris: Vec::new(),
        apis: vec![
            "personal-demographics-service".into(),
            "summary-care-record".into(),
            "e-referrals-service".into(),
            "electronic-prescription-service@aal3".into(),
            "prescription-tracker@aal3".into(),
        ],
    }];
    let apim = ApimSimulator::start(apim_listener, apim_options).await?;

    // A fresh caller token each run: printed below, so only whoever started dev mode has it.
    let (caller_token, caller_hash) = crate::grpc::auth::new_token();
    let endpoints = DevEndpoints {
        issuer: sim.issuer(),
        discovery_url: &sim.discovery_url(),
        callback: &callback,
        apim_token_url: &apim.token_url(),
    };
    let config = dev_config(opts, &endpoints, &pem, &caller_hash)?;

    let mut app = server::build_default(&config)?;
    app.dev = Some(Arc::new(DevPages {
        callback_url: callback.clone(),
        grpc_addr: grpc.local_addr()?.to_string(),
    }));

    print_banner(
        &grpc.local_addr()?,
        &http.local_addr()?,
        &sim,
        &apim,
        &callback,
        opts.redis_url.is_some(),
        &caller_token,
    );
    let result = server::run(app, grpc, http, shutdown).await;
    sim.shutdown();
    apim.shutdown();
    result
}

fn print_banner(
    grpc: &SocketAddr,
    http: &SocketAddr,
    sim: &Cis2Simulator,
    apim: &ApimSimulator,
    callback: &str,
    redis: bool,
    caller_token: &Secret<String>,
) {
    let store = if redis {
        "Redis"
    } else {
        "in-memory (sessions vanish on exit)"
    };
    println!(
        r#"
================================================================================
  cis2-session-broker DEV MODE: NOT FOR PRODUCTION
  CIS2 is simulated, keys are made up at start-up, the store is {store}.
================================================================================
  gRPC   {grpc}   (reflection on: grpcurl -plaintext {grpc} list)
  HTTP   http://{http}
  CIS2   {issuer}   (simulator)
  APIM   {apim_url}   (simulator)

  Every SessionBroker RPC needs the dev caller token (made up at start-up, all RPCs):
      export TOKEN={token}

  Walk-through:
   1. Open http://{http}/dev and press "Sign in".
   2. Pick a test user on the simulator's page (656005750107 has a smartcard and a passkey).
   3. You land on {callback}, which calls ExchangeCode and shows the session.
   4. Or over gRPC:
      grpcurl -plaintext -H "authorization: Bearer $TOKEN" \
        -d '{{"redirect_uri":"{callback}"}}' {grpc} session_broker.v1.SessionBroker/StartLogin
      then open the authorization_url, and read the session with GetCurrentAal.
================================================================================
"#,
        issuer = sim.issuer(),
        apim_url = apim.token_url(),
        // Printing it is the point: dev mode's operator must be able to call the broker.
        token = caller_token.expose(),
    );
}
