//! How the Redis store reaches Redis: one server, a Redis Cluster, or the master that a set of
//! Sentinels names.
//!
//! The store sees one connection type, [`Conn`], whatever the topology: it sends commands,
//! MULTI/EXEC pipelines and Lua scripts through it. In Cluster mode a pipeline or script must
//! only touch keys of one hash slot (the session keys share the `{<session-id>}` tag, the
//! pending-login key is a single key); the cluster connection refuses anything else with a
//! CROSSSLOT error rather than splitting a transaction.
//!
//! What the topology adds to a plain URL travels inside `RedisSettings::url` (see
//! [`Topology::to_url`]), so that settings built from a plain `redis://` URL keep working
//! unchanged.

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    TlsCertificates, Value,
};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

/// Which kind of deployment the URLs point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One server (or a managed endpoint that fails over behind one name).
    #[default]
    Standalone,
    /// A Redis Cluster; the URLs are seed nodes, the rest is discovered.
    Cluster,
    /// Sentinels that name the current master of [`Topology::sentinel_master_name`].
    Sentinel,
}

/// Where Redis is and how to authenticate to it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub mode: Mode,
    /// Standalone: the one server. Cluster: seed nodes. Sentinel: the sentinels (any
    /// `user:password@` in them is the sentinels' own credential).
    pub urls: Vec<String>,
    pub sentinel_master_name: Option<String>,
    /// The ACL user of the data nodes; replaces any user in the URLs.
    pub username: Option<String>,
    /// The data nodes' password; replaces any in the URLs.
    pub password: Option<String>,
    /// A PEM file with the CA certificates that sign the servers' certificates (`rediss://`),
    /// instead of the system's trust store.
    pub tls_ca_file: Option<String>,
}

/// Marks a `RedisSettings::url` that carries a whole [`Topology`] rather than one URL.
const MARKER: &str = "redis-topology:";

impl fmt::Debug for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("Topology")
            .field("mode", &self.mode)
            .field("urls", &urls)
            .field("sentinel_master_name", &self.sentinel_master_name)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

impl Topology {
    /// The form `RedisSettings::url` carries.
    pub fn to_url(&self) -> String {
        let json = serde_json::to_string(self)
            .expect("a struct of strings and a unit enum always serialises");
        format!("{MARKER}{json}")
    }

    /// Reads `RedisSettings::url`: either a plain `redis://`/`rediss://` URL (standalone) or the
    /// output of [`Topology::to_url`]. Errors never quote the input (it may hold a password).
    pub fn from_url(url: &str) -> Result<Topology, String> {
        match url.strip_prefix(MARKER) {
            Some(json) => serde_json::from_str(json)
                .map_err(|_| "the store topology does not parse".to_owned()),
            None => Ok(Topology {
                urls: vec![url.to_owned()],
                ..Topology::default()
            }),
        }
    }

    /// Every problem with the topology, without connecting.
    pub fn check(&self) -> Result<(), String> {
        match (self.mode, self.urls.len()) {
            (_, 0) => return Err("no Redis URL given".into()),
            (Mode::Standalone, n) if n > 1 => {
                return Err("standalone mode takes exactly one URL".into());
            }
            _ => {}
        }
        let mut tls = None;
        for url in &self.urls {
            let secure = check_url(url)?;
            if tls.is_some_and(|t| t != secure) {
                return Err("the URLs mix redis:// and rediss://".into());
            }
            tls = Some(secure);
        }
        match (self.mode, self.sentinel_master_name.as_deref()) {
            (Mode::Sentinel, None | Some("")) => {
                return Err("sentinel mode needs sentinel_master_name".into());
            }
            (Mode::Standalone | Mode::Cluster, Some(_)) => {
                return Err("sentinel_master_name is only for sentinel mode".into());
            }
            _ => {}
        }
        if self.username.is_some() && self.password.is_none() {
            return Err("a username needs a password".into());
        }
        if self.tls_ca_file.is_some() && tls != Some(true) {
            return Err("tls_ca_file needs rediss:// URLs".into());
        }
        Ok(())
    }

    fn uses_tls(&self) -> bool {
        self.urls.iter().any(|u| u.starts_with("rediss://"))
    }

    /// The URL with the topology's data-node credentials in place of its own.
    fn data_node_url(&self, raw: &str) -> Result<String, String> {
        let mut url = url::Url::parse(raw).map_err(|_| "a Redis URL does not parse".to_owned())?;
        if let Some(password) = &self.password {
            url.set_username(self.username.as_deref().unwrap_or(""))
                .and_then(|()| url.set_password(Some(password)))
                .map_err(|()| "a Redis URL cannot carry credentials".to_owned())?;
        }
        Ok(url.to_string())
    }

    fn certificates(&self) -> Result<Option<TlsCertificates>, String> {
        let Some(path) = &self.tls_ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read(path)
            .map_err(|e| format!("tls_ca_file {path:?} cannot be read ({})", e.kind()))?;
        if !pem
            .windows(b"-----BEGIN CERTIFICATE-----".len())
            .any(|w| w == b"-----BEGIN CERTIFICATE-----")
        {
            return Err(format!("tls_ca_file {path:?} holds no PEM certificate"));
        }
        Ok(Some(TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        }))
    }
}

/// Whether the URL is TLS; refuses what the store cannot or must not use.
fn check_url(raw: &str) -> Result<bool, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("a URL does not parse ({e})"))?;
    let secure = match url.scheme() {
        "redis" => false,
        "rediss" => true,
        _ => return Err("the URL scheme must be redis:// or rediss://".into()),
    };
    if url.host_str().is_none_or(str::is_empty) {
        return Err("a URL names no host".into());
    }
    // redis-rs reads `#insecure` as "skip certificate checks": a session store must not.
    if url.fragment().is_some() {
        return Err("a URL must not carry a #fragment (certificate checks stay on)".into());
    }
    Ok(secure)
}

/// The URL with any password replaced, for `Debug`.
pub(super) fn redact_url(raw: &str) -> String {
    if let Some(json) = raw.strip_prefix(MARKER) {
        return match serde_json::from_str::<Topology>(json) {
            Ok(topology) => format!("{topology:?}"),
            Err(_) => "[unparseable topology]".into(),
        };
    }
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Only fails for URLs that cannot carry credentials, which have none to hide.
                let _ = url.set_password(Some("redacted"));
            }
            url.to_string()
        }
        Err(_) => "[unparseable]".into(),
    }
}

/// Reconnection attempts inside one connect. Kept low: the caller's timeout bounds the attempt
/// anyway, and the next operation tries again.
const CONNECT_RETRIES: usize = 1;
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);

/// Opens connections for one topology.
pub(super) struct Connector {
    kind: Kind,
    connect_timeout: Duration,
    command_timeout: Duration,
}

enum Kind {
    Standalone(Client),
    Cluster(ClusterClient),
    /// Asking the sentinels takes `&mut`; connecting is serialised by the store anyway.
    Sentinel(tokio::sync::Mutex<SentinelClient>),
}

impl Connector {
    /// Checks the settings and builds the clients, without connecting.
    pub(super) fn new(
        url: &str,
        connect_timeout: Duration,
        command_timeout: Duration,
    ) -> Result<Connector, String> {
        let topology = Topology::from_url(url)?;
        topology.check()?;
        let certs = topology.certificates()?;
        let kind = match topology.mode {
            Mode::Standalone => Kind::Standalone(standalone(&topology, certs)?),
            Mode::Cluster => {
                Kind::Cluster(cluster(&topology, certs, connect_timeout, command_timeout)?)
            }
            Mode::Sentinel => Kind::Sentinel(tokio::sync::Mutex::new(sentinel(&topology, certs)?)),
        };
        Ok(Connector {
            kind,
            connect_timeout,
            command_timeout,
        })
    }

    pub(super) fn mode(&self) -> Mode {
        match self.kind {
            Kind::Standalone(_) => Mode::Standalone,
            Kind::Cluster(_) => Mode::Cluster,
            Kind::Sentinel(_) => Mode::Sentinel,
        }
    }

    /// A new connection. The caller bounds the whole attempt with `connect_timeout`.
    pub(super) async fn connect(&self) -> Result<Conn, RedisError> {
        match &self.kind {
            Kind::Standalone(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(self.command_timeout))
                    .set_number_of_retries(CONNECT_RETRIES)
                    .set_min_delay(RECONNECT_MIN_DELAY)
                    .set_max_delay(RECONNECT_MAX_DELAY);
                ConnectionManager::new_with_config(client.clone(), config)
                    .await
                    .map(Conn::Single)
            }
            Kind::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
            Kind::Sentinel(sentinels) => {
                // Asks the sentinels every time: after a failover this is how the new master
                // is found. The lookup also checks that the server named calls itself master.
                let master = sentinels.lock().await.async_get_client().await?;
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(self.connect_timeout))
                    .set_response_timeout(Some(self.command_timeout));
                master
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(Conn::Master)
            }
        }
    }

    /// Whether the connection that returned `e` must be dropped and a new one opened.
    pub(super) fn must_reconnect(&self, e: &RedisError) -> bool {
        must_reconnect(self.mode(), e)
    }
}

/// A timeout always drops the connection: no client reconnects on it, and a half-open
/// connection would time out every command. A Sentinel master connection does not reconnect by
/// itself, and even if it did it would go back to the old address, so every connection failure
/// means "ask the sentinels again". A server that answers READONLY (or refuses a transaction
/// for it) is no longer the master: a failover happened behind a Sentinel or a managed
/// endpoint's name. The Cluster connection follows MOVED and reconnects nodes itself.
fn must_reconnect(mode: Mode, e: &RedisError) -> bool {
    if e.is_timeout() {
        return true;
    }
    let demoted = matches!(
        e.code(),
        Some("READONLY" | "MASTERDOWN" | "LOADING" | "EXECABORT")
    );
    let broken = e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_io_error()
        || e.is_unrecoverable_error();
    match mode {
        Mode::Standalone => demoted,
        Mode::Sentinel => demoted || broken,
        Mode::Cluster => false,
    }
}

fn standalone(topology: &Topology, certs: Option<TlsCertificates>) -> Result<Client, String> {
    let url = topology.data_node_url(&topology.urls[0])?;
    let client = match certs {
        Some(certs) => Client::build_with_tls(url.as_str(), certs),
        None => Client::open(url.as_str()),
    };
    client.map_err(|e| format!("the Redis client refused the URL: {}", e.category()))
}

fn cluster(
    topology: &Topology,
    certs: Option<TlsCertificates>,
    connect_timeout: Duration,
    command_timeout: Duration,
) -> Result<ClusterClient, String> {
    let seeds = topology
        .urls
        .iter()
        .map(|u| topology.data_node_url(u))
        .collect::<Result<Vec<_>, _>>()?;
    let mut builder = ClusterClientBuilder::new(seeds)
        .connection_timeout(connect_timeout)
        .response_timeout(command_timeout)
        // One retry follows a MOVED after a resharding or failover; the store's own timeout
        // bounds the whole call anyway.
        .retries(2);
    if let Some(password) = &topology.password {
        builder = builder.password(password);
    }
    if let Some(username) = &topology.username {
        builder = builder.username(username);
    }
    if topology.uses_tls() {
        builder = builder.tls(redis::TlsMode::Secure);
    }
    if let Some(certs) = certs {
        builder = builder.certs(certs);
    }
    builder.build().map_err(|e| {
        format!(
            "the Redis Cluster client refused the settings: {}",
            e.category()
        )
    })
}

fn sentinel(topology: &Topology, certs: Option<TlsCertificates>) -> Result<SentinelClient, String> {
    let mut addrs = Vec::new();
    let mut sentinel_auth = None;
    for raw in &topology.urls {
        let info = raw
            .as_str()
            .into_connection_info()
            .map_err(|e| format!("a sentinel URL is refused: {}", e.category()))?;
        if sentinel_auth.is_none()
            && let Some(password) = info.redis_settings().password()
        {
            let username = info.redis_settings().username().map(str::to_owned);
            sentinel_auth = Some((username, password.to_owned()));
        }
        addrs.push(info.addr().clone());
    }
    let master = topology
        .sentinel_master_name
        .clone()
        .ok_or_else(|| "sentinel mode needs sentinel_master_name".to_owned())?;
    let mut builder = SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
        .map_err(|e| format!("the sentinel client refused the settings: {}", e.category()))?;
    if let Some((username, password)) = sentinel_auth {
        if let Some(username) = username.filter(|u| !u.is_empty()) {
            builder = builder.set_client_to_sentinel_username(username);
        }
        builder = builder.set_client_to_sentinel_password(password);
    }
    if let Some(username) = &topology.username {
        builder = builder.set_client_to_redis_username(username);
    }
    if let Some(password) = &topology.password {
        builder = builder.set_client_to_redis_password(password);
    }
    // The masters speak TLS when the sentinels do: one choice for the whole deployment.
    if topology.uses_tls() {
        builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
    }
    if let Some(certs) = certs {
        builder = builder
            .set_client_to_sentinel_certificates(certs.clone())
            .set_client_to_redis_certificates(certs);
    }
    builder
        .build()
        .map_err(|e| format!("the sentinel client refused the settings: {}", e.category()))
}

/// One connection, whatever the topology. Cheap to clone: every kind multiplexes.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
    Master(MultiplexedConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
            Conn::Master(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Master(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
            Conn::Master(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(mode: Mode, urls: &[&str]) -> Topology {
        Topology {
            mode,
            urls: urls.iter().map(|u| (*u).to_owned()).collect(),
            sentinel_master_name: (mode == Mode::Sentinel).then(|| "sb".to_owned()),
            ..Topology::default()
        }
    }

    #[test]
    fn a_plain_url_is_a_standalone_topology_and_the_encoding_round_trips() {
        let plain = Topology::from_url("redis://h:1").expect("plain");
        assert_eq!(plain, topology(Mode::Standalone, &["redis://h:1"]));
        let mut t = topology(Mode::Sentinel, &["redis://s1:26379", "redis://s2:26379"]);
        t.password = Some("hunter2".into());
        assert_eq!(Topology::from_url(&t.to_url()).expect("round trip"), t);
        let err =
            Topology::from_url("redis-topology:{\"password\":\"hunter2\"").expect_err("truncated");
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn topologies_are_checked() {
        let good = [
            topology(Mode::Standalone, &["redis://h"]),
            topology(Mode::Standalone, &["rediss://u:p@h:6380/2"]),
            topology(Mode::Cluster, &["redis://a:7000", "redis://b:7000"]),
            topology(Mode::Sentinel, &["redis://s:26379"]),
        ];
        for t in good {
            assert_eq!(t.check(), Ok(()), "{t:?}");
        }
        let with = |mut t: Topology, f: fn(&mut Topology)| {
            f(&mut t);
            t
        };
        let bad = [
            (topology(Mode::Cluster, &[]), "no Redis URL"),
            (
                topology(Mode::Standalone, &["redis://a", "redis://b"]),
                "exactly one",
            ),
            (topology(Mode::Cluster, &["http://a"]), "scheme"),
            (topology(Mode::Cluster, &["redis://"]), "no host"),
            (topology(Mode::Cluster, &["redis://a", "rediss://b"]), "mix"),
            (
                topology(Mode::Standalone, &["rediss://a/#insecure"]),
                "fragment",
            ),
            (
                with(topology(Mode::Sentinel, &["redis://s"]), |t| {
                    t.sentinel_master_name = None
                }),
                "sentinel_master_name",
            ),
            (
                with(topology(Mode::Cluster, &["redis://a"]), |t| {
                    t.sentinel_master_name = Some("m".into())
                }),
                "only for sentinel",
            ),
            (
                with(topology(Mode::Standalone, &["redis://a"]), |t| {
                    t.username = Some("u".into())
                }),
                "needs a password",
            ),
            (
                with(topology(Mode::Standalone, &["redis://a"]), |t| {
                    t.tls_ca_file = Some("/ca.pem".into())
                }),
                "rediss",
            ),
        ];
        for (t, needle) in bad {
            let err = t.check().expect_err(needle);
            assert!(err.contains(needle), "{t:?}: {err}");
        }
    }

    #[test]
    fn credentials_replace_those_of_the_url_and_never_show() {
        let mut t = topology(Mode::Standalone, &["redis://old:old-pw@h:1/0"]);
        t.username = Some("broker".into());
        t.password = Some("p@ss:w/rd".into());
        let url = t.data_node_url(&t.urls[0]).expect("valid");
        let parsed = url::Url::parse(&url).expect("valid");
        assert_eq!(parsed.username(), "broker");
        assert_eq!(parsed.password(), Some("p%40ss%3Aw%2Frd"));
        let shown = format!("{t:?} {}", redact_url(&t.to_url()));
        assert!(
            !shown.contains("p@ss") && !shown.contains("old-pw"),
            "{shown}"
        );
        assert!(
            Connector::new(&t.to_url(), Duration::from_secs(1), Duration::from_secs(1)).is_ok()
        );
    }

    #[test]
    fn a_missing_ca_file_is_refused() {
        let mut t = topology(Mode::Standalone, &["rediss://h"]);
        t.tls_ca_file = Some("/nonexistent/ca.pem".into());
        let err = Connector::new(&t.to_url(), Duration::from_secs(1), Duration::from_secs(1))
            .err()
            .expect("no such file");
        assert!(err.contains("tls_ca_file"), "{err}");
    }

    #[test]
    fn which_failures_drop_the_connection() {
        let io = |kind| -> RedisError { std::io::Error::new(kind, "x").into() };
        let timeout = io(std::io::ErrorKind::TimedOut);
        let dropped = io(std::io::ErrorKind::BrokenPipe);
        let readonly: RedisError = (
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
            "READONLY",
            "You can't write against a read only replica.".to_owned(),
        )
            .into();
        let cases = [
            (&timeout, [true, true, true]),
            (&dropped, [false, true, false]),
            (&readonly, [true, true, false]),
        ];
        for (e, [standalone, sentinel, cluster]) in cases {
            assert_eq!(must_reconnect(Mode::Standalone, e), standalone, "{e:?}");
            assert_eq!(must_reconnect(Mode::Sentinel, e), sentinel, "{e:?}");
            assert_eq!(must_reconnect(Mode::Cluster, e), cluster, "{e:?}");
        }
    }
}
