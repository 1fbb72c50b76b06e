//! The end-to-end harness: the real broker (gRPC + HTTP on port 0) against the CIS2 simulator
//! over real HTTP, with sessions in a real Redis (`REDIS_URL`, a private one from
//! `scripts/test.sh`) or in memory.
#![allow(dead_code)] // each test binary uses its own part of the harness

use cis2_session_broker::config::Config;
use cis2_session_broker::config::Pattern;
use cis2_session_broker::grpc::pb;
use cis2_session_broker::grpc::pb::session_broker_client::SessionBrokerClient;
use cis2_session_broker::server::{self, App};
use cis2_session_broker::session::KeyRing;
use cis2_session_broker::signing::SigningKeys;
use cis2_session_broker::sim::{
    ApimApp, ApimOptions, ApimSimulator, Cis2Simulator, SimClient, SimOptions,
};
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};
use url::Url;

pub const CLIENT_ID: &str = "e2e-client";
pub const CLIENT_SECRET: &str = "e2e-client-secret-5f2c9a";
pub const CALLBACK: &str = "https://app.example.test/callback";

/// The harness's own caller: every RPC, no practical rate limit. Its bearer token is sent on
/// every call of [`Harness::client`].
pub const CALLER_NAME: &str = "e2e-tests";
pub const CALLER_TOKEN: &str = "sbc_e2e-caller-token-3f9c1a7e5b2d4c8a9e0f1b2c3d4e5f60";

/// A `SessionBroker` client that sends a bearer token (or none) on every call.
pub type Client = SessionBrokerClient<InterceptedService<Channel, BearerToken>>;

/// Adds `authorization: Bearer <token>` to each request.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> BearerToken {
        BearerToken(token.map(|t| {
            format!("Bearer {t}")
                .parse()
                .expect("test tokens are visible ASCII")
        }))
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

/// The `[[callers]]` entry for the harness's own caller.
pub fn harness_caller_toml() -> String {
    let hash = cis2_session_broker::hex::encode(&cis2_session_broker::grpc::auth::hash_token(
        CALLER_TOKEN,
    ));
    format!(
        "[[callers]]\nname = {CALLER_NAME:?}\ntoken_sha256 = {hash:?}\nrpcs = [\"*\"]\nrate_per_second = 100000\nmax_pending_logins_per_minute = 100000\n"
    )
}

/// Test users of the simulator (reference §6).
pub const SMARTCARD_AND_PASSKEY: &str = "656005750107";
pub const SMARTCARD_ONLY: &str = "656005750108";
pub const SEVERAL_ROLES: &str = "656005750104";
pub const PASSKEY_ONLY: &str = "656005750111";
pub const NO_ROLE_AAL1: &str = "656005750110";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Store {
    Redis,
    Memory,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Auth {
    SecretPost,
    PrivateKeyJwt,
}

pub struct Options {
    pub store: Store,
    pub auth: Auth,
    /// Override the simulator's issuer string (e.g. with an explicit `:443`).
    pub sim_issuer: Option<String>,
    /// Configure the broker's issuer differently from the simulator's (misconfiguration tests).
    pub broker_issuer: Option<String>,
    /// Point the broker at this Redis URL instead of `REDIS_URL`.
    pub redis_url: Option<String>,
    /// Extra TOML appended to the broker's configuration.
    pub extra_toml: String,
    /// The `[[callers]]` TOML; `None`: just the harness's own caller ([`harness_caller_toml`]).
    pub callers_toml: Option<String>,
    /// Connect over TLS with this (the broker needs `[server.tls]` in `extra_toml`).
    pub client_tls: Option<ClientTlsConfig>,
    /// Extra `BROKER__*` overrides, e.g. for keys of sections the harness already wrote.
    pub env: Vec<(String, String)>,
    /// The broker's clock; `None`: the system clock.
    pub clock: Option<std::sync::Arc<dyn cis2_session_broker::clock::Clock>>,
    /// Run the APIM simulator and configure `[apim]` with this pattern.
    pub apim: Option<Pattern>,
    /// The APIM simulator's access token lifetime (default 599 s).
    pub apim_access_token_ttl: Option<std::time::Duration>,
}
impl Default for Options {
    fn default() -> Self {
        Options {
            store: Store::Redis,
            auth: Auth::SecretPost,
            sim_issuer: None,
            broker_issuer: None,
            redis_url: None,
            extra_toml: String::new(),
            callers_toml: None,
            client_tls: None,
            env: Vec::new(),
            clock: None,
            apim: None,
            apim_access_token_ttl: None,
        }
    }
}

pub const API_KEY: &str = "e2e-api-key";
pub const APIM_SECRET: &str = "e2e-apim-secret-8d41c2";

/// Another broker replica on the same store and configuration as a harness.
pub struct Replica {
    pub client: Client,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Replica {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.server.await;
    }
}
pub struct Harness {
    pub sim: Cis2Simulator,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Sends the harness caller's token on every call.
    pub client: Client,
    /// The connection to the broker, for clients with other credentials.
    pub channel: Channel,
    pub key_prefix: String,
    pub redis_url: String,
    pub app: App,
    /// The APIM simulator, when `Options::apim` asked for one.
    pub apim: Option<ApimSimulator>,
    config: Config,
    clock: std::sync::Arc<dyn cis2_session_broker::clock::Clock>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

/// A broker app serving on fresh loopback ports until `stop` fires.
struct Served {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

async fn serve(app: App) -> Served {
    let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC");
    let http = TcpListener::bind("127.0.0.1:0").await.expect("bind HTTP");
    let grpc_addr = grpc.local_addr().expect("bound");
    let http_addr = http.local_addr().expect("bound");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        server::run(app, grpc, http, async move {
            let _ = stopped.await;
        })
        .await
        .expect("broker runs");
    });
    Served {
        grpc_addr,
        http_addr,
        stop,
        server,
    }
}

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn random_suffix() -> String {
    cis2_session_broker::session::token::random_urlsafe(6).replace(['-', '_'], "x")
}

impl Harness {
    pub async fn start() -> Harness {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Harness {
        let signing =
            SigningKeys::from_pems(&[("e2e-1".to_owned(), shared_pem())]).expect("test key parses");
        let sim_listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind simulator");
        let sim = Cis2Simulator::start(
            sim_listener,
            SimOptions {
                issuer: opts.sim_issuer.clone(),
                clients: vec![SimClient {
                    client_id: CLIENT_ID.into(),
                    client_secret: Some(CLIENT_SECRET.into()),
                    jwks: Some(signing.public_jwks()),
                    redirect_uris: vec![CALLBACK.into()],
                    post_logout_redirect_uris: vec!["https://app.example.test/signed-out".into()],
                }],
                ..SimOptions::default()
            },
        )
        .await
        .expect("simulator starts");

        let apim = match opts.apim {
            Some(_) => {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind APIM");
                let mut apim_opts = ApimOptions::for_cis2(&sim);
                apim_opts.apps = vec![ApimApp {
                    api_key: API_KEY.into(),
                    client_secret: Some(APIM_SECRET.into()),
                    jwks: Some(signing.public_jwks()),
                    redirect_uris: vec![CALLBACK.into()],
                    apis: vec![
                        "personal-demographics-service".into(),
                        "summary-care-record".into(),
                        "electronic-prescription-service@aal3".into(),
                    ],
                }];
                if let Some(ttl) = opts.apim_access_token_ttl {
                    apim_opts.access_token_ttl = ttl;
                }
                Some(
                    ApimSimulator::start(listener, apim_opts)
                        .await
                        .expect("APIM simulator starts"),
                )
            }
            None => None,
        };
        let apim_toml = match (&apim, opts.apim) {
            (Some(a), Some(pattern)) => format!(
                "[apim]\npattern = {:?}\ntoken_url = {:?}\nauthorize_url = {:?}\napi_key = {API_KEY:?}\nclient_secret = {APIM_SECRET:?}\nhttp_timeout = \"3s\"\nlock_lease = \"1s\"\n",
                if pattern == Pattern::Combined {
                    "combined"
                } else {
                    "separate"
                },
                a.token_url(),
                a.authorize_url(),
            ),
            _ => String::new(),
        };

        let key_prefix = format!("e2e-{}:", random_suffix());
        let redis_url = opts.redis_url.clone().unwrap_or_else(redis_url);
        let store = match opts.store {
            Store::Redis => format!(
                "kind = \"redis\"\nurl = {redis_url:?}\nkey_prefix = {key_prefix:?}\ncommand_timeout = \"500ms\"\nconnect_timeout = \"500ms\""
            ),
            Store::Memory => "kind = \"memory\"".into(),
        };
        let auth = match opts.auth {
            Auth::SecretPost => {
                format!("client_auth = \"client_secret_post\"\nclient_secret = {CLIENT_SECRET:?}")
            }
            Auth::PrivateKeyJwt => "client_auth = \"private_key_jwt\"".into(),
        };
        let issuer = opts
            .broker_issuer
            .clone()
            .unwrap_or_else(|| sim.issuer().to_owned());
        let text = format!(
            r#"
[server]
grpc_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
[store]
{store}
[cis2]
issuer = {issuer:?}
discovery_url = {discovery:?}
client_id = {CLIENT_ID:?}
{auth}
redirect_uris = [{CALLBACK:?}]
http_timeout = "3s"
jwks_min_refresh_interval = "1s"
{extra}
{apim_toml}
{callers}
"#,
            discovery = sim.discovery_url(),
            extra = opts.extra_toml,
            callers = opts
                .callers_toml
                .clone()
                .unwrap_or_else(harness_caller_toml),
        );
        let mut env = vec![
            (
                "BROKER__ENCRYPTION__KEYS".to_owned(),
                format!("e2e:{}", KeyRing::generate_key().expose()),
            ),
            (
                "BROKER__SIGNING__KEYS".to_owned(),
                format!(
                    "[{{ kid = \"e2e-1\", private_key_pem = {:?} }}]",
                    shared_pem().expose()
                ),
            ),
        ];
        env.extend(opts.env.iter().cloned());
        let config =
            Config::from_toml_with_env(&text, env).unwrap_or_else(|e| panic!("test config: {e}"));
        let clock = opts
            .clock
            .clone()
            .unwrap_or_else(|| std::sync::Arc::new(cis2_session_broker::clock::SystemClock));
        let app = server::build(&config, clock.clone()).expect("broker builds");
        let Served {
            grpc_addr,
            http_addr,
            stop,
            server,
        } = serve(app.clone()).await;
        let endpoint = match &opts.client_tls {
            None => Channel::from_shared(format!("http://{grpc_addr}")).expect("valid URI"),
            Some(tls) => Channel::from_shared(format!("https://{grpc_addr}"))
                .expect("valid URI")
                .tls_config(tls.clone())
                .expect("client TLS configuration"),
        };
        let channel = endpoint.connect().await.expect("connect to broker");
        Harness {
            sim,
            apim,
            config,
            clock: clock.clone(),
            grpc_addr,
            http_addr,
            client: SessionBrokerClient::with_interceptor(
                channel.clone(),
                BearerToken::new(Some(CALLER_TOKEN)),
            ),
            channel,
            key_prefix,
            redis_url,
            app,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// A second broker on the same configuration and store: another replica.
    pub async fn replica(&self) -> Replica {
        let app = server::build(&self.config, self.clock.clone()).expect("replica builds");
        let Served {
            grpc_addr,
            stop,
            server,
            ..
        } = serve(app).await;
        let channel = Channel::from_shared(format!("http://{grpc_addr}"))
            .expect("valid URI")
            .connect()
            .await
            .expect("connect to replica");
        Replica {
            client: SessionBrokerClient::with_interceptor(
                channel,
                BearerToken::new(Some(CALLER_TOKEN)),
            ),
            stop,
            server,
        }
    }

    /// Follows redirects from `authorization_url` (APIM, then CIS2, then APIM again in the
    /// combined pattern) until the browser would land on the callback.
    pub async fn follow_to_callback(
        &self,
        authorization_url: &str,
        uid: &str,
        amr: Option<&str>,
    ) -> Callback {
        let mut url = Url::parse(authorization_url).expect("authorization_url is a URL");
        url.query_pairs_mut().append_pair("login_hint", uid);
        if let Some(amr) = amr {
            url.query_pairs_mut().append_pair("sim_authenticator", amr);
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let mut next = url.to_string();
        for _ in 0..8 {
            if next.starts_with(CALLBACK) {
                return Callback::from_url(&next);
            }
            let resp = http.get(&next).send().await.expect("answers");
            assert!(
                resp.status().is_redirection(),
                "no redirect from {next}: {}",
                resp.status()
            );
            let location = resp
                .headers()
                .get("location")
                .expect("Location")
                .to_str()
                .expect("ascii")
                .to_owned();
            next = Url::parse(&next)
                .expect("url")
                .join(&location)
                .expect("location")
                .to_string();
        }
        panic!("too many redirects");
    }

    /// A client on the harness's connection that sends `token` (or no credential at all).
    pub fn client_with_token(&self, token: Option<&str>) -> Client {
        SessionBrokerClient::with_interceptor(self.channel.clone(), BearerToken::new(token))
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        self.sim.shutdown();
        if let Some(apim) = &self.apim {
            apim.shutdown();
        }
    }

    pub async fn start_login(
        &self,
        req: pb::StartLoginRequest,
    ) -> Result<pb::StartLoginResponse, tonic::Status> {
        self.client
            .clone()
            .start_login(req)
            .await
            .map(|r| r.into_inner())
    }

    pub fn login_request(aal: pb::Aal) -> pb::StartLoginRequest {
        pb::StartLoginRequest {
            redirect_uri: CALLBACK.into(),
            required_aal: aal.into(),
            ..Default::default()
        }
    }

    /// Follows the authorization URL through the simulator as a browser would, signing in
    /// `uid` with the authenticator `amr` (None: the simulator's default), and returns the
    /// callback's query parameters.
    pub async fn authorize(
        &self,
        authorization_url: &str,
        uid: &str,
        amr: Option<&str>,
    ) -> Callback {
        let mut url = Url::parse(authorization_url).expect("authorization_url is a URL");
        url.query_pairs_mut().append_pair("login_hint", uid);
        if let Some(amr) = amr {
            url.query_pairs_mut().append_pair("sim_authenticator", amr);
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let resp = http.get(url).send().await.expect("simulator answers");
        assert!(
            resp.status().is_redirection(),
            "simulator did not redirect: {}",
            resp.status()
        );
        let location = resp
            .headers()
            .get("location")
            .expect("Location")
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(
            location.starts_with(CALLBACK),
            "redirected elsewhere: {location}"
        );
        Callback::from_url(&location)
    }

    pub async fn exchange(&self, cb: &Callback) -> Result<pb::ExchangeCodeResponse, tonic::Status> {
        self.client
            .clone()
            .exchange_code(cb.request())
            .await
            .map(|r| r.into_inner())
    }

    /// A whole sign-in; returns the exchange's answer.
    pub async fn sign_in(
        &self,
        aal: pb::Aal,
        uid: &str,
        amr: Option<&str>,
    ) -> Result<pb::ExchangeCodeResponse, tonic::Status> {
        let started = self.start_login(Self::login_request(aal)).await?;
        let cb = self.authorize(&started.authorization_url, uid, amr).await;
        self.exchange(&cb).await
    }

    pub async fn current_aal(
        &self,
        token: &str,
    ) -> Result<pb::GetCurrentAalResponse, tonic::Status> {
        self.client
            .clone()
            .get_current_aal(pb::GetCurrentAalRequest {
                session_token: token.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn session(&self, token: &str) -> Result<pb::Session, tonic::Status> {
        self.client
            .clone()
            .get_session(pb::GetSessionRequest {
                session_token: token.into(),
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Every key under this broker's prefix, with its value (strings and hashes), from Redis.
    pub async fn redis_dump(&self) -> Vec<(String, Vec<u8>)> {
        let client = redis::Client::open(self.redis_url.as_str()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis up");
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.key_prefix))
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        let mut out = Vec::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("TYPE");
            let value: Vec<u8> = match kind.as_str() {
                "string" => redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .expect("GET"),
                "hash" => {
                    let pairs: Vec<Vec<u8>> = redis::cmd("HGETALL")
                        .arg(&key)
                        .query_async(&mut conn)
                        .await
                        .expect("HGETALL");
                    pairs.concat()
                }
                other => panic!("unexpected Redis type {other} at {key}"),
            };
            out.push((key, value));
        }
        out
    }

    /// How many sessions this broker has in Redis.
    pub async fn redis_session_count(&self) -> usize {
        self.redis_dump()
            .await
            .iter()
            .filter(|(k, _)| k.contains(":s:{") && k.ends_with('}'))
            .count()
    }
}

/// The callback's query parameters.
#[derive(Debug, Clone, Default)]
pub struct Callback {
    pub code: String,
    pub state: String,
    pub iss: String,
    pub error: String,
    pub error_description: String,
}

impl Callback {
    pub fn from_url(url: &str) -> Callback {
        let url = Url::parse(url).expect("callback URL");
        let mut cb = Callback::default();
        for (k, v) in url.query_pairs() {
            let v = v.into_owned();
            match k.as_ref() {
                "code" => cb.code = v,
                "state" => cb.state = v,
                "iss" => cb.iss = v,
                "error" => cb.error = v,
                "error_description" => cb.error_description = v,
                _ => {}
            }
        }
        cb
    }

    pub fn request(&self) -> pb::ExchangeCodeRequest {
        pb::ExchangeCodeRequest {
            state: self.state.clone(),
            code: self.code.clone(),
            error: self.error.clone(),
            error_description: self.error_description.clone(),
            iss: self.iss.clone(),
        }
    }
}

/// One RSA key for every harness in a test binary: generating keys is slow.
pub fn shared_pem() -> cis2_session_broker::secret::Secret<String> {
    static PEM: std::sync::OnceLock<cis2_session_broker::secret::Secret<String>> =
        std::sync::OnceLock::new();
    PEM.get_or_init(|| {
        cis2_session_broker::signing::generate_private_pem().expect("key generation works")
    })
    .clone()
}

/// The `ErrorInfo.reason` of a status.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|i| i.reason)
        .unwrap_or_else(|| format!("<no ErrorInfo: {status:?}>"))
}

pub fn error_metadata(status: &tonic::Status, key: &str) -> Option<String> {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .and_then(|i| i.metadata.get(key).cloned())
}

// ---- logs ------------------------------------------------------------------------------------

/// Log lines as written, shared between the layer writing them and the test reading them.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

/// Installs the broker's own log layers at every level as this test binary's global
/// subscriber, and returns what they write: (JSON lines as `serve` prints them, text lines as
/// `dev` does). Global, not per thread: tracing caches whether a log statement is wanted when
/// it is first reached, possibly by another test's thread, and would skip it for good.
pub fn capture_logs() -> (Captured, Captured) {
    use cis2_session_broker::telemetry::{LogFormat, log_layer};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::{Layer, filter::LevelFilter};
    let (json, text) = (Captured::default(), Captured::default());
    let (json_writer, text_writer) = (json.clone(), text.clone());
    let subscriber = tracing_subscriber::registry()
        .with(
            log_layer(LogFormat::Json, move || json_writer.clone(), false)
                .with_filter(LevelFilter::TRACE),
        )
        .with(
            log_layer(LogFormat::Text, move || text_writer.clone(), false)
                .with_filter(LevelFilter::TRACE),
        );
    tracing::subscriber::set_global_default(subscriber)
        .expect("the only subscriber in this test binary");
    (json, text)
}
