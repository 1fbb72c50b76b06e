//! Configuration: a TOML file, then environment overrides, checked once at start-up.
//!
//! Every problem is collected and reported together, so an operator fixes a file in one pass.
//! Overrides: `BROKER__<SECTION>__<KEY>=value` sets `[section] key = value`, e.g.
//! `BROKER__CIS2__CLIENT_SECRET=...` (values starting with `[` or `{`, and `true`/`false`, are read
//! as TOML; everything else is a string). Secrets are [`Secret`]s: `Debug` never shows them.

use crate::aal::Aal;
use crate::grpc::auth::AllowedRpcs;
use crate::grpc::limits::Limits;
use crate::policy::{ApiPolicy, PolicyTable};
use crate::secret::Secret;
use crate::session::redis::{RedisMode, RedisSettings, RedisTopology};
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

pub const ENV_PREFIX: &str = "BROKER__";

/// The validated configuration the broker runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    /// Encryption keys for records at rest, newest first: `(id, base64 of 32 bytes)`.
    pub encryption_keys: Vec<(String, Secret<String>)>,
    pub cis2: Cis2Config,
    /// The broker's RS512 signing keys, newest first.
    pub signing_keys: Vec<SigningKeySource>,
    pub sessions: SessionConfig,
    pub policy: PolicyTable,
    /// NHS API Management: absent when the broker only signs users in.
    pub apim: Option<ApimConfig>,
    /// The backend services that may call the broker (`[[callers]]`).
    pub callers: Vec<CallerConfig>,
}

/// Which NHS security pattern the broker runs (reference §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Sign in with CIS2, then exchange the ID token at APIM (RFC 8693).
    Separate,
    /// APIM runs CIS2 and hands out its own tokens; no ID token reaches the broker.
    Combined,
}

#[derive(Debug, Clone)]
pub struct ApimConfig {
    pub pattern: Pattern,
    /// The exact token URL: also the `aud` of every client assertion.
    pub token_url: Url,
    /// APIM's `/oauth2/authorize` (combined pattern).
    pub authorize_url: Option<Url>,
    /// The application's API key: `client_id`, and `iss`/`sub` of client assertions.
    pub api_key: String,
    /// Needed by the combined pattern and for refreshing tokens.
    pub client_secret: Option<Secret<String>>,
    pub http_timeout: Duration,
    /// `GetPdsToken`/`GetApiToken` hand out tokens valid at least this long unless asked otherwise.
    pub min_validity: Duration,
    /// The lease of the cross-replica lock held while one replica fetches a session's token.
    pub lock_lease: Duration,
    /// Add `NHSD-End-User-Organisation-ODS` (the selected role's organisation) to API headers:
    /// mandatory for apps serving several organisations.
    pub end_user_organisation_header: bool,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// How long in-flight calls may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// Serve gRPC server reflection (so grpcurl needs no proto files).
    pub reflection: bool,
    /// Serve gRPC over TLS; mutual TLS when a client CA is given.
    pub tls: Option<TlsConfig>,
    /// Let a call with no credential at all through, as caller "unauthenticated", to every RPC.
    /// Only for a broker that nothing but trusted workloads can reach.
    pub insecure_allow_unauthenticated_callers: bool,
}

/// `[server.tls]`: PEM files.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Client certificates must chain to this CA: turns on mutual TLS.
    pub client_ca_file: Option<PathBuf>,
    /// Refuse TLS connections without a client certificate (else callers may use bearer tokens,
    /// and health checks need no certificate).
    pub require_client_cert: bool,
}

/// One `[[callers]]` entry: a backend service, how it proves who it is, what it may call.
#[derive(Debug, Clone)]
pub struct CallerConfig {
    pub name: String,
    /// SHA-256 of the caller's bearer token. The token itself is never configured.
    pub token_sha256: Option<[u8; 32]>,
    /// The client certificate's subject, in RFC 4514 form without spaces (as
    /// `openssl x509 -noout -subject -nameopt RFC2253` prints it).
    pub client_cert_subject: Option<String>,
    /// A URI or DNS subject alternative name of the client certificate (e.g. a SPIFFE ID).
    pub client_cert_san: Option<String>,
    pub rpcs: AllowedRpcs,
    pub limits: Limits,
}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Memory,
    Redis(RedisSettings),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAuthMethod {
    ClientSecretPost(Secret<String>),
    PrivateKeyJwt,
}

#[derive(Debug, Clone)]
pub struct Cis2Config {
    /// Compared verbatim with discovery and the `iss` claim (CIS2's carries an explicit `:443`).
    pub issuer: String,
    pub discovery_url: Url,
    pub client_id: String,
    pub client_auth: ClientAuthMethod,
    /// Exact-match allow-list for `StartLogin.redirect_uri`.
    pub redirect_uris: Vec<String>,
    /// Exact-match allow-list for `Logout.post_logout_redirect_uri`.
    pub post_logout_redirect_uris: Vec<String>,
    pub scopes: String,
    pub max_age: Option<Duration>,
    pub acr_values_aal2: String,
    pub acr_values_aal3: String,
    pub http_timeout: Duration,
    pub clock_skew: Duration,
    pub discovery_refresh: Duration,
    pub jwks_min_refresh_interval: Duration,
    pub userinfo: bool,
}

impl Cis2Config {
    /// The `acr_values` to request for a level (reference §1: AAL2 offers AAL2 and AAL3
    /// authenticators, AAL3 only AAL3 ones).
    pub fn acr_values_for(&self, aal: Aal) -> &str {
        match aal {
            Aal::Aal3 => &self.acr_values_aal3,
            Aal::Aal1 | Aal::Aal2 => &self.acr_values_aal2,
        }
    }
}

#[derive(Debug, Clone)]
pub enum SigningKeySource {
    File { kid: String, path: PathBuf },
    Pem { kid: String, pem: Secret<String> },
}

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub idle_timeout_aal2: Duration,
    pub idle_timeout_aal3: Duration,
    pub absolute_lifetime: Duration,
    /// Activity slides the idle timer at most this often, so reads stay reads.
    pub touch_interval: Duration,
    pub pending_login_ttl: Duration,
    /// The level a sign-in reaches when the caller names neither a level nor an API.
    pub default_aal: Aal,
}

impl SessionConfig {
    pub fn idle_timeout(&self, aal: Aal) -> Duration {
        match aal {
            Aal::Aal3 => self.idle_timeout_aal3,
            Aal::Aal1 | Aal::Aal2 => self.idle_timeout_aal2,
        }
    }
}

/// Everything wrong with a configuration, one line each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "the configuration has {} problem(s):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads `path`, applies `BROKER__*` environment overrides, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("cannot read {}: {e}", path.display())]))?;
        Self::from_toml_with_env(&text, std::env::vars())
    }

    /// Parses TOML text with the given environment (tests pass their own).
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigErrors> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigErrors(vec![format!("not valid TOML: {}", e.message())])
        })?;
        let mut errors = Vec::new();
        apply_env(&mut table, env, &mut errors);
        let raw: RawConfig = match RawConfig::deserialize(toml::Value::Table(table)) {
            Ok(raw) => raw,
            Err(e) => {
                errors.push(e.message().to_string());
                return Err(ConfigErrors(errors));
            }
        };
        let config = raw.validate(&mut errors);
        match config {
            Some(c) if errors.is_empty() => Ok(c),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    errors: &mut Vec<String>,
) {
    for (name, raw) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
        if keys.iter().any(String::is_empty) {
            errors.push(format!("environment variable {name}: empty key segment"));
            continue;
        }
        let value = env_value(&raw);
        let Some(value) = value else {
            errors.push(format!(
                "environment variable {name}: not a valid TOML array or table"
            ));
            continue;
        };
        if let Err(k) = set_path(table, &keys, value) {
            errors.push(format!("environment variable {name}: {k} is not a section"));
        }
    }
}

/// Sets `keys` (a path of section names then a key) to `value`, making sections as needed.
/// Fails with the name of a path element that is a value rather than a section.
fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<(), String> {
    match keys {
        [] => Ok(()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [first, rest @ ..] => {
            let entry = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => set_path(t, rest, value),
                _ => Err(first.clone()),
            }
        }
    }
}

fn env_value(raw: &str) -> Option<toml::Value> {
    let t = raw.trim();
    match t {
        "true" => Some(toml::Value::Boolean(true)),
        "false" => Some(toml::Value::Boolean(false)),
        _ if t.starts_with('[') || t.starts_with('{') => {
            let doc: toml::Table = format!("v = {t}").parse().ok()?;
            doc.get("v").cloned()
        }
        _ => Some(toml::Value::String(raw.to_owned())),
    }
}

// ---- the file's shape -------------------------------------------------------------------------

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    server: RawServer,
    store: RawStore,
    encryption: RawEncryption,
    cis2: RawCis2,
    signing: RawSigning,
    sessions: RawSessions,
    policy: RawPolicy,
    apim: Option<RawApim>,
    callers: Vec<RawCaller>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawApim {
    pattern: String,
    token_url: String,
    authorize_url: Option<String>,
    api_key: String,
    client_secret: Option<Secret<String>>,
    http_timeout: String,
    min_validity: String,
    lock_lease: String,
    end_user_organisation_header: bool,
}

impl Default for RawApim {
    fn default() -> Self {
        RawApim {
            pattern: "separate".into(),
            token_url: String::new(),
            authorize_url: None,
            api_key: String::new(),
            client_secret: None,
            // The reference advises 15-30 s on /token.
            http_timeout: "20s".into(),
            min_validity: "60s".into(),
            lock_lease: "10s".into(),
            end_user_organisation_header: false,
        }
    }
}

impl RawApim {
    fn validate(self, errors: &mut Vec<String>) -> Option<ApimConfig> {
        let pattern = match self.pattern.as_str() {
            "separate" => Some(Pattern::Separate),
            "combined" => Some(Pattern::Combined),
            other => {
                errors.push(format!(
                    "apim.pattern: {other:?} is not \"separate\" or \"combined\""
                ));
                None
            }
        };
        let token_url = if self.token_url.is_empty() {
            errors.push(
                "apim.token_url: required, e.g. https://int.api.service.nhs.uk/oauth2/token".into(),
            );
            None
        } else {
            absolute_url("apim.token_url", &self.token_url, errors)
        };
        let authorize_url = self
            .authorize_url
            .as_deref()
            .and_then(|u| absolute_url("apim.authorize_url", u, errors));
        if self.api_key.trim().is_empty() {
            errors.push("apim.api_key: required (the application's API key)".into());
        }
        let client_secret = self.client_secret.filter(|s| !s.expose().is_empty());
        if pattern == Some(Pattern::Combined) {
            if authorize_url.is_none() {
                errors.push("apim.authorize_url: required by the combined pattern".into());
            }
            if client_secret.is_none() {
                errors.push("apim.client_secret: required by the combined pattern (BROKER__APIM__CLIENT_SECRET)".into());
            }
        }
        let http_timeout = duration("apim.http_timeout", &self.http_timeout, errors);
        positive("apim.http_timeout", http_timeout, errors);
        let lock_lease = duration("apim.lock_lease", &self.lock_lease, errors);
        positive("apim.lock_lease", lock_lease, errors);
        Some(ApimConfig {
            pattern: pattern?,
            token_url: token_url?,
            authorize_url,
            api_key: self.api_key,
            client_secret,
            http_timeout,
            min_validity: duration("apim.min_validity", &self.min_validity, errors),
            lock_lease,
            end_user_organisation_header: self.end_user_organisation_header,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    grpc_addr: String,
    http_addr: String,
    shutdown_grace: String,
    reflection: bool,
    tls: Option<RawTls>,
    insecure_allow_unauthenticated_callers: bool,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            grpc_addr: "0.0.0.0:50051".into(),
            http_addr: "0.0.0.0:8080".into(),
            shutdown_grace: "20s".into(),
            reflection: true,
            tls: None,
            insecure_allow_unauthenticated_callers: false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    require_client_cert: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaller {
    name: String,
    token_sha256: Option<String>,
    client_cert_subject: Option<String>,
    client_cert_san: Option<String>,
    #[serde(default)]
    rpcs: Vec<String>,
    rate_per_second: Option<i64>,
    max_pending_logins_per_minute: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    kind: String,
    url: Option<Secret<String>>,
    mode: String,
    urls: Vec<Secret<String>>,
    sentinel_master_name: Option<String>,
    username: Option<String>,
    password: Option<Secret<String>>,
    tls_ca_file: Option<String>,
    key_prefix: String,
    connect_timeout: String,
    command_timeout: String,
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            kind: "redis".into(),
            url: None,
            mode: "standalone".into(),
            urls: Vec::new(),
            sentinel_master_name: None,
            username: None,
            password: None,
            tls_ca_file: None,
            key_prefix: "sb:".into(),
            connect_timeout: "2s".into(),
            command_timeout: "1s".into(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawEncryption {
    keys: RawKeys,
}

/// Keys as an array of `{ id, key }` tables, or as one string `id:base64,id:base64` (handy in
/// an environment variable).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawKeys {
    List(Vec<RawKey>),
    Joined(Secret<String>),
}

impl Default for RawKeys {
    fn default() -> Self {
        RawKeys::List(Vec::new())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    key: Secret<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawCis2 {
    issuer: String,
    discovery_url: Option<String>,
    client_id: String,
    client_auth: String,
    client_secret: Option<Secret<String>>,
    redirect_uris: Vec<String>,
    post_logout_redirect_uris: Vec<String>,
    scopes: String,
    max_age: Option<String>,
    acr_values_aal2: String,
    acr_values_aal3: String,
    http_timeout: String,
    clock_skew: String,
    discovery_refresh: String,
    jwks_min_refresh_interval: String,
    userinfo: bool,
}

impl Default for RawCis2 {
    fn default() -> Self {
        RawCis2 {
            issuer: String::new(),
            discovery_url: None,
            client_id: String::new(),
            client_auth: "client_secret_post".into(),
            client_secret: None,
            redirect_uris: Vec::new(),
            post_logout_redirect_uris: Vec::new(),
            scopes: "openid profile nationalrbacaccess associatedorgs selectedrole".into(),
            max_age: None,
            acr_values_aal2: "AAL2_OR_AAL3_ANY".into(),
            acr_values_aal3: "AAL3_ANY".into(),
            http_timeout: "15s".into(),
            clock_skew: "60s".into(),
            discovery_refresh: "1h".into(),
            jwks_min_refresh_interval: "30s".into(),
            userinfo: true,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawSigning {
    keys: Vec<RawSigningKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigningKey {
    kid: String,
    private_key_file: Option<PathBuf>,
    private_key_pem: Option<Secret<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSessions {
    idle_timeout_aal2: String,
    idle_timeout_aal3: String,
    absolute_lifetime: String,
    touch_interval: String,
    pending_login_ttl: String,
    default_aal: toml::Value,
}

impl Default for RawSessions {
    fn default() -> Self {
        RawSessions {
            idle_timeout_aal2: "30m".into(),
            idle_timeout_aal3: "15m".into(),
            absolute_lifetime: "12h".into(),
            touch_interval: "60s".into(),
            pending_login_ttl: "10m".into(),
            default_aal: toml::Value::Integer(2),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawPolicy {
    /// Start from an empty table instead of the reference defaults.
    replace_defaults: bool,
    apis: std::collections::BTreeMap<String, RawApiPolicy>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApiPolicy {
    required_aal: toml::Value,
    required_ial: Option<toml::Value>,
    description: Option<String>,
    task: Option<String>,
}

// ---- validation -------------------------------------------------------------------------------

fn duration(field: &str, raw: &str, errors: &mut Vec<String>) -> Duration {
    match humantime::parse_duration(raw.trim()) {
        Ok(d) => d,
        Err(e) => {
            errors.push(format!(
                "{field}: {raw:?} is not a duration like \"30s\" or \"15m\" ({e})"
            ));
            Duration::ZERO
        }
    }
}

fn positive(field: &str, d: Duration, errors: &mut Vec<String>) {
    if d.is_zero() {
        errors.push(format!("{field}: must be more than zero"));
    }
}

fn socket_addr(field: &str, raw: &str, errors: &mut Vec<String>) -> Option<SocketAddr> {
    raw.parse()
        .map_err(|_| {
            errors.push(format!(
                "{field}: {raw:?} is not an address like 0.0.0.0:50051"
            ))
        })
        .ok()
}

fn level(
    field: &str,
    value: &toml::Value,
    allowed: &[i64],
    errors: &mut Vec<String>,
) -> Option<i64> {
    let n = match value {
        toml::Value::Integer(n) => Some(*n),
        toml::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    match n {
        Some(n) if allowed.contains(&n) => Some(n),
        _ => {
            errors.push(format!("{field}: must be one of {allowed:?}"));
            None
        }
    }
}

fn absolute_url(field: &str, raw: &str, errors: &mut Vec<String>) -> Option<Url> {
    match Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
        _ => {
            errors.push(format!("{field}: {raw:?} is not an absolute http(s) URL"));
            None
        }
    }
}

impl RawConfig {
    fn validate(self, errors: &mut Vec<String>) -> Option<Config> {
        // Validate every section before giving up on any, so all problems are reported.
        let grpc_addr = socket_addr("server.grpc_addr", &self.server.grpc_addr, errors);
        let http_addr = socket_addr("server.http_addr", &self.server.http_addr, errors);
        let shutdown_grace = duration("server.shutdown_grace", &self.server.shutdown_grace, errors);
        let tls = self.server.tls.and_then(|t| t.validate(errors));
        let callers = validate_callers(self.callers, errors);
        let store = self.store.validate(errors);
        let encryption_keys = self.encryption.validate(errors);
        let cis2 = self.cis2.validate(errors);
        let signing_keys = self.signing.validate(errors);
        if matches!(
            cis2.as_ref().map(|c| &c.client_auth),
            Some(ClientAuthMethod::PrivateKeyJwt)
        ) && signing_keys.is_empty()
        {
            errors.push(
                "cis2.client_auth = \"private_key_jwt\" needs at least one [[signing.keys]] entry"
                    .into(),
            );
        }
        let sessions = self.sessions.validate(errors);
        let policy = self.policy.validate(errors);
        let apim = self.apim.map(|a| a.validate(errors));
        if let Some(Some(a)) = &apim
            && a.pattern == Pattern::Separate
            && signing_keys.is_empty()
        {
            errors.push(
                "apim: the separate pattern signs client assertions: add a [[signing.keys]] entry"
                    .into(),
            );
        }
        Some(Config {
            server: ServerConfig {
                grpc_addr: grpc_addr?,
                http_addr: http_addr?,
                shutdown_grace,
                reflection: self.server.reflection,
                tls,
                insecure_allow_unauthenticated_callers: self
                    .server
                    .insecure_allow_unauthenticated_callers,
            },
            store: store?,
            encryption_keys,
            cis2: cis2?,
            signing_keys,
            sessions: sessions?,
            policy,
            apim: match apim {
                Some(a) => Some(a?),
                None => None,
            },
            callers,
        })
    }
}

impl RawStore {
    fn validate(self, errors: &mut Vec<String>) -> Option<StoreConfig> {
        let connect_timeout = duration("store.connect_timeout", &self.connect_timeout, errors);
        let command_timeout = duration("store.command_timeout", &self.command_timeout, errors);
        positive("store.command_timeout", command_timeout, errors);
        positive("store.connect_timeout", connect_timeout, errors);
        match self.kind.as_str() {
            "memory" => Some(StoreConfig::Memory),
            "redis" => {
                if self.key_prefix.len() > 64 || self.key_prefix.contains(['{', '}', ' ']) {
                    errors.push(
                        "store.key_prefix: at most 64 characters, no braces or spaces".into(),
                    );
                }
                let url = redis_topology(
                    self.url,
                    &self.mode,
                    self.urls,
                    self.sentinel_master_name,
                    self.username,
                    self.password,
                    self.tls_ca_file,
                    errors,
                )?;
                Some(StoreConfig::Redis(RedisSettings {
                    url,
                    key_prefix: self.key_prefix,
                    connect_timeout,
                    command_timeout,
                }))
            }
            other => {
                errors.push(format!(
                    "store.kind: {other:?} is not \"redis\" or \"memory\""
                ));
                None
            }
        }
    }
}

/// The store's `RedisSettings::url`: the plain URL when that says everything, else the whole
/// topology (see `session::redis::RedisTopology`). Messages never echo a URL or the password.
#[allow(clippy::too_many_arguments)] // one per `[store]` key, each checked here
fn redis_topology(
    url: Option<Secret<String>>,
    mode: &str,
    urls: Vec<Secret<String>>,
    sentinel_master_name: Option<String>,
    username: Option<String>,
    password: Option<Secret<String>>,
    tls_ca_file: Option<String>,
    errors: &mut Vec<String>,
) -> Option<String> {
    let before = errors.len();
    let mode = match mode {
        "standalone" => RedisMode::Standalone,
        "cluster" => RedisMode::Cluster,
        "sentinel" => RedisMode::Sentinel,
        other => {
            errors.push(format!(
                "store.mode: {other:?} is not \"standalone\", \"cluster\" or \"sentinel\""
            ));
            return None;
        }
    };
    let check = |key: &str, u: &Secret<String>, errors: &mut Vec<String>| {
        let scheme_ok = ["redis://", "rediss://"]
            .iter()
            .any(|s| u.expose().starts_with(s));
        if !scheme_ok || Url::parse(u.expose()).is_err() {
            // The URL may carry a password: never echo it.
            errors.push(format!("{key}: must be a redis:// or rediss:// URL"));
        }
    };
    if let Some(u) = &url {
        check("store.url", u, errors);
    }
    for u in &urls {
        check("store.urls", u, errors);
    }
    let mut all: Vec<String> = url.into_iter().map(Secret::into_inner).collect();
    match mode {
        RedisMode::Standalone => {
            if !urls.is_empty() {
                errors.push(
                    "store.urls: only for store.mode = \"cluster\" or \"sentinel\" (use store.url)"
                        .into(),
                );
            }
            if all.is_empty() {
                errors.push("store.url: required when store.kind = \"redis\"".into());
            }
        }
        RedisMode::Cluster | RedisMode::Sentinel => {
            // `url`, when set, is one more seed node or sentinel (so BROKER__STORE__URL works
            // in every mode).
            all.extend(urls.into_iter().map(Secret::into_inner));
            if all.is_empty() {
                errors.push(
                    "store.urls: required when store.mode = \"cluster\" or \"sentinel\"".into(),
                );
            }
        }
    }
    match (mode, &sentinel_master_name) {
        (RedisMode::Sentinel, None) => errors
            .push("store.sentinel_master_name: required when store.mode = \"sentinel\"".into()),
        (RedisMode::Sentinel, Some(name))
            if name.is_empty() || name.contains(char::is_whitespace) =>
        {
            errors
                .push("store.sentinel_master_name: must be a non-empty name without spaces".into())
        }
        (RedisMode::Standalone | RedisMode::Cluster, Some(_)) => {
            errors.push("store.sentinel_master_name: only for store.mode = \"sentinel\"".into())
        }
        _ => {}
    }
    if username.is_some() && password.is_none() {
        errors.push("store.username: needs store.password (BROKER__STORE__PASSWORD)".into());
    }
    if username
        .as_deref()
        .is_some_and(|u| u.is_empty() || u.contains([':', '@', '/', ' ']))
    {
        errors.push("store.username: must be a plain ACL user name".into());
    }
    if password.as_ref().is_some_and(|p| p.expose().is_empty()) {
        errors.push("store.password: must not be empty".into());
    }
    if errors.len() > before {
        return None;
    }
    let plain = mode == RedisMode::Standalone
        && username.is_none()
        && password.is_none()
        && tls_ca_file.is_none();
    let topology = RedisTopology {
        mode,
        urls: all,
        sentinel_master_name,
        username,
        password: password.map(Secret::into_inner),
        tls_ca_file,
    };
    // What only the store knows how to check (mixed schemes, #fragments, the CA file's use).
    if let Err(problem) = topology.check() {
        errors.push(format!("store: {problem}"));
        return None;
    }
    if plain {
        return topology.urls.into_iter().next();
    }
    Some(topology.to_url())
}

impl RawEncryption {
    fn validate(self, errors: &mut Vec<String>) -> Vec<(String, Secret<String>)> {
        let keys: Vec<(String, Secret<String>)> = match self.keys {
            RawKeys::List(list) => list.into_iter().map(|k| (k.id, k.key)).collect(),
            RawKeys::Joined(joined) => {
                let mut keys = Vec::new();
                for (i, part) in joined
                    .expose()
                    .split(',')
                    .filter(|p| !p.trim().is_empty())
                    .enumerate()
                {
                    match part.trim().split_once(':') {
                        Some((id, key)) => keys.push((id.to_owned(), Secret::new(key.to_owned()))),
                        None => errors.push(format!(
                            "encryption.keys: entry {} is not id:base64key",
                            i + 1
                        )),
                    }
                }
                keys
            }
        };
        if let Err(e) = crate::session::KeyRing::new(&keys) {
            errors.push(format!("encryption.keys: {e}"));
        }
        keys
    }
}

impl RawCis2 {
    fn validate(self, errors: &mut Vec<String>) -> Option<Cis2Config> {
        let issuer_url = if self.issuer.is_empty() {
            errors.push(
                "cis2.issuer: required (exactly as CIS2's discovery document states it)".into(),
            );
            None
        } else {
            absolute_url("cis2.issuer", &self.issuer, errors)
        };
        let discovery_url = match &self.discovery_url {
            Some(raw) => absolute_url("cis2.discovery_url", raw, errors),
            // Parsing drops a default port (":443"), which is where CIS2 serves discovery.
            None => issuer_url.and_then(|_| crate::oidc::default_discovery_url(&self.issuer).ok()),
        };
        if self.client_id.trim().is_empty() {
            errors.push("cis2.client_id: required".into());
        }
        let client_auth = match (self.client_auth.as_str(), self.client_secret) {
            ("client_secret_post", Some(secret)) if !secret.expose().is_empty() => {
                Some(ClientAuthMethod::ClientSecretPost(secret))
            }
            ("client_secret_post", _) => {
                errors.push(
                    "cis2.client_secret: required for client_secret_post (set BROKER__CIS2__CLIENT_SECRET)"
                        .into(),
                );
                None
            }
            ("private_key_jwt", _) => Some(ClientAuthMethod::PrivateKeyJwt),
            (other, _) => {
                errors.push(format!(
                    "cis2.client_auth: {other:?} is not \"client_secret_post\" or \"private_key_jwt\""
                ));
                None
            }
        };
        if self.redirect_uris.is_empty() {
            errors.push("cis2.redirect_uris: list at least one callback URL".into());
        }
        for (i, u) in self.redirect_uris.iter().enumerate() {
            absolute_url(&format!("cis2.redirect_uris[{i}]"), u, errors);
        }
        for (i, u) in self.post_logout_redirect_uris.iter().enumerate() {
            absolute_url(&format!("cis2.post_logout_redirect_uris[{i}]"), u, errors);
        }
        if !self.scopes.split_whitespace().any(|s| s == "openid") {
            errors.push("cis2.scopes: must include \"openid\"".into());
        }
        let max_age = self
            .max_age
            .as_deref()
            .map(|m| duration("cis2.max_age", m, errors));
        let http_timeout = duration("cis2.http_timeout", &self.http_timeout, errors);
        positive("cis2.http_timeout", http_timeout, errors);
        let config = Cis2Config {
            issuer: self.issuer,
            discovery_url: discovery_url?,
            client_id: self.client_id,
            client_auth: client_auth?,
            redirect_uris: self.redirect_uris,
            post_logout_redirect_uris: self.post_logout_redirect_uris,
            scopes: self.scopes,
            max_age,
            acr_values_aal2: self.acr_values_aal2,
            acr_values_aal3: self.acr_values_aal3,
            http_timeout,
            clock_skew: duration("cis2.clock_skew", &self.clock_skew, errors),
            discovery_refresh: duration("cis2.discovery_refresh", &self.discovery_refresh, errors),
            jwks_min_refresh_interval: duration(
                "cis2.jwks_min_refresh_interval",
                &self.jwks_min_refresh_interval,
                errors,
            ),
            userinfo: self.userinfo,
        };
        Some(config)
    }
}

impl RawSigning {
    fn validate(self, errors: &mut Vec<String>) -> Vec<SigningKeySource> {
        let mut out = Vec::new();
        for (i, k) in self.keys.into_iter().enumerate() {
            match (k.private_key_file, k.private_key_pem) {
                (Some(path), None) => out.push(SigningKeySource::File { kid: k.kid, path }),
                (None, Some(pem)) => out.push(SigningKeySource::Pem { kid: k.kid, pem }),
                _ => errors.push(format!(
                    "signing.keys[{i}]: give exactly one of private_key_file or private_key_pem"
                )),
            }
        }
        out
    }
}

impl RawSessions {
    fn validate(self, errors: &mut Vec<String>) -> Option<SessionConfig> {
        let c = SessionConfig {
            idle_timeout_aal2: duration(
                "sessions.idle_timeout_aal2",
                &self.idle_timeout_aal2,
                errors,
            ),
            idle_timeout_aal3: duration(
                "sessions.idle_timeout_aal3",
                &self.idle_timeout_aal3,
                errors,
            ),
            absolute_lifetime: duration(
                "sessions.absolute_lifetime",
                &self.absolute_lifetime,
                errors,
            ),
            touch_interval: duration("sessions.touch_interval", &self.touch_interval, errors),
            pending_login_ttl: duration(
                "sessions.pending_login_ttl",
                &self.pending_login_ttl,
                errors,
            ),
            default_aal: Aal::from_level(level(
                "sessions.default_aal",
                &self.default_aal,
                &[2, 3],
                errors,
            )?)?,
        };
        positive("sessions.idle_timeout_aal2", c.idle_timeout_aal2, errors);
        positive("sessions.idle_timeout_aal3", c.idle_timeout_aal3, errors);
        positive("sessions.absolute_lifetime", c.absolute_lifetime, errors);
        positive("sessions.pending_login_ttl", c.pending_login_ttl, errors);
        Some(c)
    }
}

impl RawPolicy {
    fn validate(self, errors: &mut Vec<String>) -> PolicyTable {
        let base = if self.replace_defaults {
            PolicyTable::from_policies([])
        } else {
            PolicyTable::defaults()
        };
        let mut overrides = Vec::new();
        for (api, p) in self.apis {
            let field = format!("policy.apis.{api}");
            if api.is_empty()
                || api.len() > 64
                || !api
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                errors.push(format!(
                    "{field}: API names use a-z, 0-9 and '-' (at most 64)"
                ));
            }
            let aal = level(
                &format!("{field}.required_aal"),
                &p.required_aal,
                &[1, 2, 3],
                errors,
            )
            .and_then(Aal::from_level);
            let ial = p
                .required_ial
                .as_ref()
                .and_then(|v| level(&format!("{field}.required_ial"), v, &[1, 2, 3], errors))
                .and_then(|n| u8::try_from(n).ok());
            let Some(required_aal) = aal else { continue };
            let description = p.description.unwrap_or_else(|| api.clone());
            overrides.push(ApiPolicy {
                task: p.task.unwrap_or_else(|| format!("use {description}")),
                api,
                required_aal,
                required_ial: ial,
                description,
            });
        }
        base.merged(overrides)
    }
}

impl Config {
    /// Why this configuration cannot serve: no caller could ever be admitted. Kept out of
    /// validation so a file may be checked piecemeal; `server::build` and `check-config` ask.
    pub fn callers_problem(&self) -> Option<String> {
        (self.callers.is_empty() && !self.server.insecure_allow_unauthenticated_callers).then(
            || {
                "callers: no [[callers]] configured, so every RPC would be refused: add one \
             (`session-broker callers new-token` makes a token and its hash), or set \
             server.insecure_allow_unauthenticated_callers = true if only trusted workloads can \
             reach the broker"
                    .to_owned()
            },
        )
    }
}

impl RawTls {
    fn validate(self, errors: &mut Vec<String>) -> Option<TlsConfig> {
        let mut readable = |field: &str, path: &Path| {
            if !path.is_file() {
                errors.push(format!(
                    "server.tls.{field}: {} is not a readable file",
                    path.display()
                ));
            }
        };
        readable("cert_file", &self.cert_file);
        readable("key_file", &self.key_file);
        if let Some(ca) = &self.client_ca_file {
            readable("client_ca_file", ca);
        } else if self.require_client_cert {
            errors.push(
                "server.tls.require_client_cert: needs client_ca_file (the CA client certificates chain to)"
                    .into(),
            );
        }
        Some(TlsConfig {
            cert_file: self.cert_file,
            key_file: self.key_file,
            client_ca_file: self.client_ca_file,
            require_client_cert: self.require_client_cert,
        })
    }
}

/// Every caller's problems are reported, and names, token hashes, subjects and SANs must each
/// be unique: two callers sharing a credential would make the name in the log a guess.
fn validate_callers(raw: Vec<RawCaller>, errors: &mut Vec<String>) -> Vec<CallerConfig> {
    let mut out: Vec<CallerConfig> = Vec::new();
    for (i, c) in raw.into_iter().enumerate() {
        let field = format!("callers[{i}]");
        if let Some(caller) = validate_caller(&field, c, errors) {
            let clash = |what: &str, other: &CallerConfig| {
                format!(
                    "{field}: {what} is also caller {:?}'s: each caller needs its own",
                    other.name
                )
            };
            for other in &out {
                if other.name == caller.name {
                    errors.push(clash("the name", other));
                }
                if caller.token_sha256.is_some() && other.token_sha256 == caller.token_sha256 {
                    errors.push(clash("token_sha256", other));
                }
                if caller.client_cert_subject.is_some()
                    && other.client_cert_subject == caller.client_cert_subject
                {
                    errors.push(clash("client_cert_subject", other));
                }
                if caller.client_cert_san.is_some()
                    && other.client_cert_san == caller.client_cert_san
                {
                    errors.push(clash("client_cert_san", other));
                }
            }
            out.push(caller);
        }
    }
    out
}

fn validate_caller(field: &str, c: RawCaller, errors: &mut Vec<String>) -> Option<CallerConfig> {
    let before = errors.len();
    let has_credential =
        c.token_sha256.is_some() || c.client_cert_subject.is_some() || c.client_cert_san.is_some();
    let name_ok = !c.name.is_empty()
        && c.name.len() <= 64
        && c.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !name_ok {
        errors.push(format!(
            "{field}.name: {:?}: use A-Z, a-z, 0-9, '-', '_' and '.' (at most 64)",
            c.name
        ));
    }
    let token_sha256 = c.token_sha256.as_deref().and_then(|h| {
        let parsed = crate::grpc::auth::parse_token_hash(h);
        if parsed.is_none() {
            errors.push(format!(
                "{field}.token_sha256: not 64 hex digits (the SHA-256 of the token: `session-broker callers hash-token`)"
            ));
        }
        parsed
    });
    let client_cert_subject = c.client_cert_subject.as_deref().and_then(|s| {
        let canonical = s
            .parse::<x509_cert::name::RdnSequence>()
            .ok()
            .filter(|n| !n.is_empty())
            .map(|n| n.to_string());
        if canonical.is_none() {
            errors.push(format!(
                "{field}.client_cert_subject: {s:?} is not an RFC 4514 name like \"CN=web-frontend,O=Example\""
            ));
        }
        canonical
    });
    let client_cert_san = c.client_cert_san.filter(|s| {
        let ok = !s.trim().is_empty() && s.trim() == s;
        if !ok {
            errors.push(format!(
                "{field}.client_cert_san: empty or padded with spaces"
            ));
        }
        ok
    });
    if !has_credential {
        errors.push(format!(
            "{field}: give token_sha256, client_cert_subject or client_cert_san: how the caller proves who it is"
        ));
    }
    let rpcs = if c.rpcs.is_empty() {
        errors.push(format!(
            "{field}.rpcs: list the RPCs this caller may use, or [\"*\"] for all"
        ));
        None
    } else {
        AllowedRpcs::parse(&c.rpcs)
            .map_err(|bad| {
                errors.push(format!(
                    "{field}.rpcs: not RPCs of SessionBroker: {}",
                    bad.join(", ")
                ))
            })
            .ok()
    };
    let defaults = Limits::default();
    let mut bound = |key: &str, value: Option<i64>, default: u32| {
        let v = value.unwrap_or(i64::from(default));
        u32::try_from(v)
            .ok()
            .filter(|v| (1..=1_000_000).contains(v))
            .unwrap_or_else(|| {
                errors.push(format!("{field}.{key}: {v} is not between 1 and 1000000"));
                default
            })
    };
    let limits = Limits {
        rate_per_second: bound(
            "rate_per_second",
            c.rate_per_second,
            defaults.rate_per_second,
        ),
        logins_per_minute: bound(
            "max_pending_logins_per_minute",
            c.max_pending_logins_per_minute,
            defaults.logins_per_minute,
        ),
    };
    if errors.len() > before {
        return None;
    }
    Some(CallerConfig {
        name: c.name,
        token_sha256,
        client_cert_subject,
        client_cert_san,
        rpcs: rpcs?,
        limits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";

    fn minimal() -> String {
        format!(
            r#"
[store]
url = "redis://127.0.0.1:6379"

[encryption]
keys = [{{ id = "k1", key = "{KEY}" }}]

[cis2]
issuer = "https://am.nhsint.auth-ptl.cis2.spineservices.nhs.uk:443/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare"
client_id = "my-client"
client_secret = "s3cret"
redirect_uris = ["https://app.example/callback"]
"#
        )
    }

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        Config::from_toml_with_env(
            text,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = load(&minimal(), &[]).expect("valid");
        assert_eq!(c.server.grpc_addr.port(), 50051);
        assert_eq!(
            c.sessions.idle_timeout(Aal::Aal2),
            Duration::from_secs(30 * 60)
        );
        assert_eq!(
            c.sessions.idle_timeout(Aal::Aal3),
            Duration::from_secs(15 * 60)
        );
        assert_eq!(c.sessions.absolute_lifetime, Duration::from_secs(12 * 3600));
        assert_eq!(c.sessions.pending_login_ttl, Duration::from_secs(600));
        assert_eq!(c.sessions.default_aal, Aal::Aal2);
        assert_eq!(c.cis2.acr_values_for(Aal::Aal2), "AAL2_OR_AAL3_ANY");
        assert_eq!(c.cis2.acr_values_for(Aal::Aal3), "AAL3_ANY");
        assert_eq!(
            c.cis2.scopes,
            "openid profile nationalrbacaccess associatedorgs selectedrole"
        );
        assert!(c.policy.get("eps").is_some());
    }

    #[test]
    fn the_issuer_is_kept_verbatim_and_discovery_drops_the_default_port() {
        let c = load(&minimal(), &[]).expect("valid");
        assert!(c.cis2.issuer.contains(".uk:443/openam"));
        assert_eq!(
            c.cis2.discovery_url.as_str(),
            "https://am.nhsint.auth-ptl.cis2.spineservices.nhs.uk/openam/oauth2/realms/root/realms/NHSIdentity/realms/Healthcare/.well-known/openid-configuration"
        );
    }

    #[test]
    fn environment_overrides_win_and_secrets_stay_hidden() {
        let c = load(
            &minimal(),
            &[
                ("BROKER__CIS2__CLIENT_SECRET", "from-env"),
                ("BROKER__SESSIONS__IDLE_TIMEOUT_AAL3", "5m"),
                ("BROKER__ENCRYPTION__KEYS", &format!("new:{KEY},k1:{KEY}")),
                ("OTHER", "ignored"),
            ],
        )
        .expect("valid");
        assert_eq!(
            c.cis2.client_auth,
            ClientAuthMethod::ClientSecretPost(Secret::new("from-env".into()))
        );
        assert_eq!(c.sessions.idle_timeout_aal3, Duration::from_secs(300));
        assert_eq!(c.encryption_keys.len(), 2);
        assert_eq!(c.encryption_keys[0].0, "new");
        let dump = format!("{c:?}");
        assert!(
            !dump.contains("from-env") && !dump.contains(KEY),
            "secret in Debug output"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
[server]
grpc_addr = "nonsense"
[store]
kind = "redis"
[encryption]
keys = []
[cis2]
issuer = ""
client_auth = "client_secret_basic"
scopes = "profile"
[sessions]
idle_timeout_aal2 = "forever"
default_aal = 1
"#;
        let errs = load(text, &[]).expect_err("invalid").0;
        let joined = errs.join("\n");
        for needle in [
            "server.grpc_addr",
            "store.url",
            "encryption.keys",
            "cis2.issuer",
            "cis2.client_id",
            "cis2.client_auth",
            "cis2.redirect_uris",
            "cis2.scopes",
            "sessions.idle_timeout_aal2",
            "sessions.default_aal",
        ] {
            assert!(
                joined.contains(needle),
                "{needle} not reported in:\n{joined}"
            );
        }
    }

    #[test]
    fn the_example_file_is_valid_once_given_a_real_key() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/broker.example.toml"
        ))
        .expect("example exists");
        let c = load(
            &text,
            &[("BROKER__ENCRYPTION__KEYS", &format!("2026-12:{KEY}"))],
        )
        .expect("valid");
        assert!(matches!(
            c.cis2.client_auth,
            ClientAuthMethod::PrivateKeyJwt
        ));
        assert!(matches!(c.store, StoreConfig::Redis(_)));
        let errs = load(&text, &[]).expect_err("placeholder key").0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("encryption.keys"), "{errs:?}");
    }

    #[test]
    fn apim_settings_are_checked_per_pattern() {
        let separate = format!(
            "{}\n[[signing.keys]]\nkid = \"k1\"\nprivate_key_file = \"/k.pem\"\n[apim]\ntoken_url = \"https://int.api.service.nhs.uk/oauth2/token\"\napi_key = \"key\"\n",
            minimal()
        );
        let c = load(&separate, &[]).expect("valid");
        let apim = c.apim.expect("apim configured");
        assert_eq!(apim.pattern, Pattern::Separate);
        assert_eq!(apim.min_validity, Duration::from_secs(60));
        assert_eq!(
            apim.token_url.as_str(),
            "https://int.api.service.nhs.uk/oauth2/token"
        );

        let combined = format!(
            "{}\n[apim]\npattern = \"combined\"\ntoken_url = \"https://x/oauth2/token\"\napi_key = \"k\"\n",
            minimal()
        );
        let errs = load(&combined, &[])
            .expect_err("combined needs more")
            .0
            .join("\n");
        assert!(
            errs.contains("apim.authorize_url") && errs.contains("apim.client_secret"),
            "{errs}"
        );

        let no_key = format!(
            "{}\n[apim]\ntoken_url = \"https://x/oauth2/token\"\napi_key = \"k\"\n",
            minimal()
        );
        let errs = load(&no_key, &[])
            .expect_err("needs a signing key")
            .0
            .join("\n");
        assert!(errs.contains("signing.keys"), "{errs}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let errs = load(&format!("{}\nclient_secert = \"typo\"\n", minimal()), &[])
            .expect_err("typo")
            .0;
        assert!(errs.join(" ").contains("client_secert"), "{errs:?}");
    }

    #[test]
    fn a_redis_password_is_never_echoed() {
        let text = minimal().replace("redis://127.0.0.1:6379", "http://user:hunter2@host");
        let errs = load(&text, &[]).expect_err("bad scheme").0;
        assert!(!errs.join(" ").contains("hunter2"));
    }

    /// `minimal()` with its `[store]` url line replaced by `store`.
    fn with_store(store: &str) -> String {
        minimal().replace("url = \"redis://127.0.0.1:6379\"", store)
    }

    fn redis_topology_of(c: &Config) -> crate::session::redis::RedisTopology {
        match &c.store {
            StoreConfig::Redis(s) => {
                crate::session::redis::RedisTopology::from_url(&s.url).expect("parses")
            }
            StoreConfig::Memory => panic!("expected a Redis store"),
        }
    }

    #[test]
    fn redis_modes_are_configured() {
        use crate::session::redis::RedisMode;
        let plain = load(&minimal(), &[]).expect("valid");
        let StoreConfig::Redis(s) = &plain.store else {
            panic!("redis")
        };
        assert_eq!(
            s.url, "redis://127.0.0.1:6379",
            "a plain URL stays as it is"
        );

        let cluster = load(
            &with_store(
                "mode = \"cluster\"\nurls = [\"redis://10.0.0.1:7000\", \"redis://10.0.0.2:7000\"]",
            ),
            &[("BROKER__STORE__PASSWORD", "hunter2")],
        )
        .expect("valid");
        let t = redis_topology_of(&cluster);
        assert_eq!(t.mode, RedisMode::Cluster);
        assert_eq!(t.urls.len(), 2);
        assert_eq!(t.password.as_deref(), Some("hunter2"));
        assert!(
            !format!("{cluster:?}").contains("hunter2"),
            "Debug hides it"
        );

        let sentinel = load(
            &with_store(
                "mode = \"sentinel\"\nurl = \"redis://s0:26379\"\nurls = [\"redis://s1:26379\"]\nsentinel_master_name = \"sb\"\nusername = \"broker\"\npassword = \"pw\"",
            ),
            &[],
        )
        .expect("valid");
        let t = redis_topology_of(&sentinel);
        assert_eq!(t.mode, RedisMode::Sentinel);
        assert_eq!(
            t.urls,
            ["redis://s0:26379", "redis://s1:26379"],
            "url is one more"
        );
        assert_eq!(t.sentinel_master_name.as_deref(), Some("sb"));
        assert_eq!(t.username.as_deref(), Some("broker"));
    }

    #[test]
    fn bad_redis_modes_are_reported() {
        let cases = [
            ("mode = \"ring\"\nurl = \"redis://h\"", "store.mode"),
            ("mode = \"cluster\"", "store.urls"),
            ("url = \"redis://h\"\nurls = [\"redis://h2\"]", "store.urls"),
            (
                "mode = \"sentinel\"\nurls = [\"redis://h\"]",
                "store.sentinel_master_name",
            ),
            (
                "mode = \"sentinel\"\nurls = [\"redis://h\"]\nsentinel_master_name = \"\"",
                "store.sentinel_master_name",
            ),
            (
                "url = \"redis://h\"\nsentinel_master_name = \"m\"",
                "store.sentinel_master_name",
            ),
            (
                "mode = \"cluster\"\nurls = [\"http://user:hunter2@h\"]",
                "store.urls",
            ),
            (
                "url = \"redis://h\"\nusername = \"broker\"",
                "store.username",
            ),
            (
                "url = \"redis://h\"\nusername = \"a:b\"\npassword = \"hunter2\"",
                "store.username",
            ),
            ("url = \"redis://h\"\npassword = \"\"", "store.password"),
            (
                "mode = \"cluster\"\nurls = [\"redis://:hunter2@h\", \"rediss://h2\"]",
                "mix",
            ),
            ("url = \"rediss://:hunter2@h/#insecure\"", "fragment"),
            (
                "url = \"redis://h\"\ntls_ca_file = \"/ca.pem\"",
                "tls_ca_file",
            ),
        ];
        for (store, needle) in cases {
            let errs = load(&with_store(store), &[]).expect_err(store).0.join("\n");
            assert!(errs.contains(needle), "{store}: {errs}");
            assert!(!errs.contains("hunter2"), "{store}: {errs}");
        }
    }

    #[test]
    fn private_key_jwt_needs_a_signing_key() {
        let text = minimal().replace(
            "client_secret = \"s3cret\"",
            "client_auth = \"private_key_jwt\"",
        );
        let errs = load(&text, &[]).expect_err("no key").0;
        assert!(errs.join(" ").contains("signing.keys"), "{errs:?}");
        let with_key = format!(
            "{text}\n[[signing.keys]]\nkid = \"k1\"\nprivate_key_file = \"/keys/k1.pem\"\n"
        );
        let c = load(&with_key, &[]).expect("valid");
        assert!(matches!(
            c.cis2.client_auth,
            ClientAuthMethod::PrivateKeyJwt
        ));
    }

    #[test]
    fn policy_overrides_merge_with_the_defaults() {
        let text = format!(
            "{}\n[policy.apis.pds]\nrequired_aal = 3\n[policy.apis.nrl]\nrequired_aal = \"2\"\ndescription = \"National Record Locator\"\n",
            minimal()
        );
        let c = load(&text, &[]).expect("valid");
        assert_eq!(c.policy.get("pds").map(|p| p.required_aal), Some(Aal::Aal3));
        assert_eq!(c.policy.get("nrl").map(|p| p.required_aal), Some(Aal::Aal2));
        assert!(c.policy.get("eps").is_some());
    }

    // sha256("abc") and sha256("") : any 64 hex digits will do.
    const HASH_A: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    const HASH_B: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn callers_are_read_with_their_credentials_rpcs_and_limits() {
        let text = format!(
            r#"{}
[[callers]]
name = "web-frontend"
token_sha256 = "{}"
rpcs = ["StartLogin", "ExchangeCode", "Logout", "GetSession"]
rate_per_second = 50

[[callers]]
name = "prescribing"
client_cert_subject = "CN=prescribing,O=Example Trust"
client_cert_san = "spiffe://example.nhs.uk/ns/rx/sa/api"
rpcs = ["*"]
max_pending_logins_per_minute = 10
"#,
            minimal(),
            HASH_A.to_uppercase()
        );
        let c = load(&text, &[]).expect("valid");
        assert_eq!(c.callers.len(), 2);
        let web = &c.callers[0];
        assert_eq!(web.name, "web-frontend");
        assert_eq!(
            web.token_sha256,
            crate::grpc::auth::parse_token_hash(HASH_A)
        );
        assert!(web.rpcs.allows("ExchangeCode") && !web.rpcs.allows("GetApiToken"));
        assert_eq!(
            web.limits,
            Limits {
                rate_per_second: 50,
                logins_per_minute: 600
            }
        );
        let rx = &c.callers[1];
        assert_eq!(rx.token_sha256, None);
        assert_eq!(
            rx.client_cert_subject.as_deref(),
            Some("CN=prescribing,O=Example Trust")
        );
        assert_eq!(rx.rpcs, AllowedRpcs::All);
        assert_eq!(rx.limits.rate_per_second, 200);
        assert_eq!(rx.limits.logins_per_minute, 10);
        assert!(c.callers_problem().is_none());
        assert!(c.server.reflection, "reflection is on by default");
        assert!(c.server.tls.is_none());
    }

    #[test]
    fn every_caller_problem_is_reported_at_once() {
        let text = format!(
            r#"{}
[[callers]]
name = "web frontend"
token_sha256 = "not-hex"
rpcs = ["StartLogin", "DeleteEverything"]

[[callers]]
name = "a"
token_sha256 = "{HASH_A}"
rpcs = []
rate_per_second = 0

[[callers]]
name = "a"
token_sha256 = "{HASH_A}"
rpcs = ["*", "StartLogin"]
max_pending_logins_per_minute = -1

[[callers]]
name = "no-credential"
rpcs = ["*"]

[[callers]]
name = "bad-subject"
client_cert_subject = "web frontend"
rpcs = ["*"]

[[callers]]
name = "c"
client_cert_san = "spiffe://x"
rpcs = ["*"]

[[callers]]
name = "d"
client_cert_san = "spiffe://x"
token_sha256 = "{HASH_B}"
rpcs = ["GetSession"]
"#,
            minimal()
        );
        let errs = load(&text, &[]).expect_err("invalid").0.join("\n");
        for needle in [
            "callers[0].name",
            "callers[0].token_sha256",
            "DeleteEverything",
            "callers[1].rpcs",
            "callers[1].rate_per_second",
            "callers[2].rpcs",
            "callers[2].max_pending_logins_per_minute",
            "callers[3]: give token_sha256",
            "callers[4].client_cert_subject",
            "callers[6]: client_cert_san is also caller \"c\"'s",
        ] {
            assert!(errs.contains(needle), "{needle} not reported in:\n{errs}");
        }
        // callers[2] is invalid on its own, so the duplicate name and hash are not compared.
        let once = format!(
            "{}\n[[callers]]\nname = \"a\"\ntoken_sha256 = \"{HASH_A}\"\nrpcs = [\"*\"]\n[[callers]]\nname = \"a\"\ntoken_sha256 = \"{HASH_A}\"\nrpcs = [\"*\"]\n",
            minimal()
        );
        let errs = load(&once, &[]).expect_err("duplicates").0.join("\n");
        assert!(
            errs.contains("callers[1]: the name is also caller \"a\"'s")
                && errs.contains("callers[1]: token_sha256 is also caller \"a\"'s"),
            "{errs}"
        );
    }

    #[test]
    fn no_callers_cannot_serve_unless_loudly_allowed() {
        let c = load(&minimal(), &[]).expect("valid as a file");
        assert!(
            c.callers_problem()
                .is_some_and(|p| p.contains("insecure_allow_unauthenticated_callers"))
        );
        let c = load(
            &minimal(),
            &[
                (
                    "BROKER__SERVER__INSECURE_ALLOW_UNAUTHENTICATED_CALLERS",
                    "true",
                ),
                ("BROKER__SERVER__REFLECTION", "false"),
            ],
        )
        .expect("valid");
        assert!(c.callers_problem().is_none());
        assert!(!c.server.reflection);
        let c = load(
            &minimal(),
            &[(
                "BROKER__CALLERS",
                &format!("[{{ name = \"env\", token_sha256 = \"{HASH_B}\", rpcs = [\"*\"] }}]"),
            )],
        )
        .expect("callers from the environment");
        assert_eq!(c.callers[0].name, "env");
        assert!(c.callers_problem().is_none());
    }

    #[test]
    fn tls_files_must_exist_and_a_required_client_cert_needs_a_ca() {
        let text = format!(
            "{}\n[server.tls]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\nrequire_client_cert = true\n",
            minimal()
        );
        let errs = load(&text, &[]).expect_err("missing files").0.join("\n");
        for needle in [
            "server.tls.cert_file",
            "server.tls.key_file",
            "server.tls.require_client_cert",
        ] {
            assert!(errs.contains(needle), "{needle} not reported in:\n{errs}");
        }
        let here = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let text = format!(
            "{}\n[server.tls]\ncert_file = {here:?}\nkey_file = {here:?}\nclient_ca_file = {here:?}\n",
            minimal()
        );
        let tls = load(&text, &[]).expect("files exist").server.tls;
        let tls = tls.expect("TLS configured");
        assert!(tls.client_ca_file.is_some() && !tls.require_client_cert);
    }
}
