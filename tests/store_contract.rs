//! The `SessionStore` contract, written once and run against every store: the in-memory store and
//! a real Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`).
//!
//! Each Redis test works under its own random key prefix, so parallel tests and runs never
//! collide, and deletes its keys at the end. Every key a test writes also carries a TTL, so even a
//! failed test leaves nothing behind for long. If Redis is unreachable the Redis tests fail with a
//! message saying so: they never skip.

use cis2_session_broker::clock::ManualClock;
use cis2_session_broker::session::memory::MemoryStore;
use cis2_session_broker::session::redis::{RedisMode, RedisSettings, RedisStore, RedisTopology};
use cis2_session_broker::session::store::IndexKind;
use cis2_session_broker::session::token::random_urlsafe;
use cis2_session_broker::session::{LoginKey, SessionId, SessionStore, SessionToken, StoreError};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

/// The URL without its password, for failure messages.
fn shown_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                let _ = url.set_password(Some("redacted"));
            }
            url.to_string()
        }
        Err(_) => "[unparseable REDIS_URL]".to_owned(),
    }
}

fn new_session_id() -> SessionId {
    SessionToken::generate().id()
}

fn new_login_key() -> LoginKey {
    LoginKey::from_state(&random_urlsafe(32))
}

/// A store under test, plus what the contract needs to know about its backend.
enum Backend {
    Memory {
        store: Arc<MemoryStore>,
        clock: Arc<ManualClock>,
    },
    Redis {
        store: Arc<RedisStore>,
        raw: Raw,
        prefix: String,
    },
}

/// The tests' own connection behind the store's back: to the one server, the Cluster, or the
/// master the sentinels name.
#[derive(Clone)]
enum Raw {
    Single(redis::aio::MultiplexedConnection),
    /// The connection and the node URLs (every node is a master in the test Cluster).
    Cluster(redis::cluster_async::ClusterConnection, Vec<String>),
}

impl redis::aio::ConnectionLike for Raw {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Raw::Single(c) => c.req_packed_command(cmd),
            Raw::Cluster(c, _) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Raw::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Raw::Cluster(c, _) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// A comma-separated list from the environment, or a failure that says how to get one.
fn env_urls(name: &str) -> Vec<String> {
    let value = std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set. The Cluster and Sentinel contract runs need the servers that \
             scripts/test.sh starts. These tests fail rather than skip."
        )
    });
    value.split(',').map(str::to_owned).collect()
}

fn ha_settings(topology: RedisTopology, prefix: &str) -> RedisSettings {
    RedisSettings {
        url: topology.to_url(),
        key_prefix: prefix.to_owned(),
        connect_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
    }
}

impl Backend {
    fn memory() -> Self {
        let clock = Arc::new(ManualClock::new(
            UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        ));
        Backend::Memory {
            store: Arc::new(MemoryStore::new(clock.clone())),
            clock,
        }
    }

    async fn redis() -> Self {
        let url = redis_url();
        let raw = raw_connection(&url).await;
        let prefix = format!("cis2sb-test:{}:", random_urlsafe(12));
        let store = RedisStore::new(RedisSettings {
            url,
            key_prefix: prefix.clone(),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
        })
        .expect("REDIS_URL was just used to connect, so the store accepts it");
        Backend::Redis {
            store: Arc::new(store),
            raw: Raw::Single(raw),
            prefix,
        }
    }

    /// A store on the Redis Cluster of `REDIS_CLUSTER_URLS`.
    async fn cluster() -> Self {
        let urls = env_urls("REDIS_CLUSTER_URLS");
        let raw = redis::cluster::ClusterClient::new(urls.clone())
            .expect("the cluster URLs parse")
            .get_async_connection()
            .await
            .expect("the test Cluster answers");
        let prefix = format!("cis2sb-test:{}:", random_urlsafe(12));
        let topology = RedisTopology {
            mode: RedisMode::Cluster,
            urls: urls.clone(),
            ..RedisTopology::default()
        };
        let store = RedisStore::new(ha_settings(topology, &prefix)).expect("valid settings");
        Backend::Redis {
            store: Arc::new(store),
            raw: Raw::Cluster(raw, urls),
            prefix,
        }
    }

    /// A store on the master that the sentinels of `REDIS_SENTINEL_URLS` name.
    async fn sentinel() -> Self {
        let urls = env_urls("REDIS_SENTINEL_URLS");
        let master = std::env::var("REDIS_SENTINEL_MASTER").expect("set with REDIS_SENTINEL_URLS");
        let raw = redis::sentinel::Sentinel::build(urls.clone())
            .expect("the sentinel URLs parse")
            .async_master_for(&master, None)
            .await
            .expect("the sentinels name a master")
            .get_multiplexed_async_connection()
            .await
            .expect("the master answers");
        let prefix = format!("cis2sb-test:{}:", random_urlsafe(12));
        let topology = RedisTopology {
            mode: RedisMode::Sentinel,
            urls,
            sentinel_master_name: Some(master),
            ..RedisTopology::default()
        };
        let store = RedisStore::new(ha_settings(topology, &prefix)).expect("valid settings");
        Backend::Redis {
            store: Arc::new(store),
            raw: Raw::Single(raw),
            prefix,
        }
    }

    fn store(&self) -> Arc<dyn SessionStore> {
        match self {
            Backend::Memory { store, .. } => store.clone(),
            Backend::Redis { store, .. } => store.clone(),
        }
    }

    /// Lets `d` pass as the store sees time: the manual clock moves, Redis needs a real wait.
    async fn let_time_pass(&self, d: Duration) {
        match self {
            Backend::Memory { clock, .. } => clock.advance(d),
            Backend::Redis { .. } => tokio::time::sleep(d).await,
        }
    }

    /// Writes the session's token cache key behind the store's back (Redis), to check that
    /// `delete_session` removes a cache whoever wrote it. False for the memory store.
    async fn plant_token_cache(&self, id: &SessionId) -> bool {
        match self {
            Backend::Memory { .. } => false,
            Backend::Redis { raw, prefix, .. } => {
                let key = format!("{prefix}s:{{{id}}}:tokens");
                let mut raw = raw.clone();
                let () = redis::pipe()
                    .cmd("HSET")
                    .arg(&key)
                    .arg("pds")
                    .arg(b"sealed\x00token".as_slice())
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(&key)
                    .arg(60_000)
                    .ignore()
                    .query_async(&mut raw)
                    .await
                    .expect("a test write to Redis succeeds");
                true
            }
        }
    }

    async fn token_cache_exists(&self, id: &SessionId) -> bool {
        match self {
            Backend::Memory { store, .. } => store
                .get_token(id, "pds")
                .await
                .expect("the memory store always answers")
                .is_some(),
            Backend::Redis { raw, prefix, .. } => {
                let mut raw = raw.clone();
                redis::cmd("EXISTS")
                    .arg(format!("{prefix}s:{{{id}}}:tokens"))
                    .query_async(&mut raw)
                    .await
                    .expect("a test read from Redis succeeds")
            }
        }
    }

    async fn cleanup(&self) {
        match self {
            Backend::Redis {
                raw: Raw::Single(raw),
                prefix,
                ..
            } => delete_prefixed(raw.clone(), prefix).await,
            Backend::Redis {
                raw: Raw::Cluster(_, nodes),
                prefix,
                ..
            } => {
                // SCAN sees one node; every test node is a master, so each is scanned and its
                // keys deleted there one by one (they may sit in different slots).
                for node in nodes {
                    let mut conn = raw_connection(node).await;
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("{prefix}*"))
                        .query_async(&mut conn)
                        .await
                        .expect("KEYS on a test Cluster node succeeds");
                    for key in keys {
                        let _: i64 = redis::cmd("DEL")
                            .arg(&key)
                            .query_async(&mut conn)
                            .await
                            .expect("DEL of a key the node holds succeeds");
                    }
                }
            }
            Backend::Memory { .. } => {}
        }
    }
}

async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    let connect = async {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok::<_, redis::RedisError>(conn)
    };
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => panic!(
            "Redis is not reachable at {} ({e}). The store contract needs a running Redis: \
             start one or set REDIS_URL. These tests fail rather than skip.",
            shown_url(url)
        ),
        Err(_) => panic!(
            "Redis at {} did not answer within 10 s. The store contract needs a running Redis: \
             start one or set REDIS_URL. These tests fail rather than skip.",
            shown_url(url)
        ),
    }
}

async fn delete_prefixed(mut raw: redis::aio::MultiplexedConnection, prefix: &str) {
    // The prefix is base64url, which holds no glob metacharacters.
    let pattern = format!("{prefix}*");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut raw)
            .await
            .expect("SCAN on the test Redis succeeds");
        if !keys.is_empty() {
            let () = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut raw)
                .await
                .expect("DEL on the test Redis succeeds");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// The contract. Each case is written once and knows nothing of the backend beyond [`Backend`].
mod cases {
    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    pub async fn pending_login_is_taken_exactly_once(b: &Backend) {
        let store = b.store();
        let key = new_login_key();
        assert!(
            store
                .put_pending_login(&key, b"pending", LONG)
                .await
                .unwrap()
        );
        assert_eq!(
            store.take_pending_login(&key).await.unwrap().as_deref(),
            Some(&b"pending"[..])
        );
        assert_eq!(store.take_pending_login(&key).await.unwrap(), None);
        assert_eq!(
            store.take_pending_login(&new_login_key()).await.unwrap(),
            None,
            "an unknown key is simply absent"
        );
    }

    pub async fn concurrent_takers_get_one_value(b: &Backend) {
        let store = b.store();
        let key = new_login_key();
        assert!(store.put_pending_login(&key, b"once", LONG).await.unwrap());
        let start = Arc::new(tokio::sync::Barrier::new(50));
        let takers: Vec<_> = (0..50)
            .map(|_| {
                let (store, key, start) = (store.clone(), key.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    store.take_pending_login(&key).await
                })
            })
            .collect();
        let mut winners = Vec::new();
        for taker in takers {
            if let Some(value) = taker.await.expect("a taker task does not panic").unwrap() {
                winners.push(value);
            }
        }
        assert_eq!(winners, vec![b"once".to_vec()], "exactly one taker wins");
    }

    pub async fn put_pending_keeps_the_original(b: &Backend) {
        let store = b.store();
        let key = new_login_key();
        assert!(store.put_pending_login(&key, b"first", LONG).await.unwrap());
        assert!(
            !store
                .put_pending_login(&key, b"second", LONG)
                .await
                .unwrap()
        );
        assert_eq!(
            store.take_pending_login(&key).await.unwrap().as_deref(),
            Some(&b"first"[..])
        );
    }

    pub async fn entries_expire(b: &Backend) {
        let store = b.store();
        let short = Duration::from_millis(150);
        let key = new_login_key();
        let id = new_session_id();
        assert!(store.put_pending_login(&key, b"p", short).await.unwrap());
        assert!(store.create_session(&id, b"s", short).await.unwrap());

        b.let_time_pass(Duration::from_millis(500)).await;

        assert_eq!(store.take_pending_login(&key).await.unwrap(), None);
        assert_eq!(store.get_session(&id).await.unwrap(), None);
        assert!(!store.touch_session(&id, LONG).await.unwrap());
        assert!(!store.replace_session(&id, b"back", LONG).await.unwrap());
        assert_eq!(store.get_session(&id).await.unwrap(), None);
        assert!(
            store.put_pending_login(&key, b"again", LONG).await.unwrap(),
            "an expired key is free again"
        );
        assert!(store.create_session(&id, b"again", LONG).await.unwrap());
    }

    pub async fn create_refuses_an_existing_id(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        assert!(store.create_session(&id, b"original", LONG).await.unwrap());
        assert!(!store.create_session(&id, b"intruder", LONG).await.unwrap());
        let got = store.get_session(&id).await.unwrap().expect("still there");
        assert_eq!(got.sealed, b"original");
    }

    pub async fn replace_updates_but_never_resurrects(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        assert!(
            !store.replace_session(&id, b"ghost", LONG).await.unwrap(),
            "replacing an unknown session fails"
        );
        assert_eq!(store.get_session(&id).await.unwrap(), None);

        assert!(
            store
                .create_session(&id, b"v1", Duration::from_secs(30))
                .await
                .unwrap()
        );
        assert!(store.replace_session(&id, b"v2", LONG).await.unwrap());
        let got = store.get_session(&id).await.unwrap().expect("replaced");
        assert_eq!(got.sealed, b"v2");
        assert!(
            got.ttl > Duration::from_secs(30),
            "the new TTL applies: {:?}",
            got.ttl
        );

        assert!(store.delete_session(&id).await.unwrap());
        assert!(!store.replace_session(&id, b"v3", LONG).await.unwrap());
        assert_eq!(store.get_session(&id).await.unwrap(), None);
    }

    pub async fn touch_extends_and_never_creates(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        assert!(!store.touch_session(&id, LONG).await.unwrap());
        assert_eq!(store.get_session(&id).await.unwrap(), None);

        assert!(
            store
                .create_session(&id, b"s", Duration::from_secs(10))
                .await
                .unwrap()
        );
        assert!(
            store
                .touch_session(&id, Duration::from_secs(120))
                .await
                .unwrap()
        );
        let got = store.get_session(&id).await.unwrap().expect("touched");
        assert!(got.ttl > Duration::from_secs(10), "extended: {:?}", got.ttl);
        assert!(got.ttl <= Duration::from_secs(120), "{:?}", got.ttl);
        assert_eq!(got.sealed, b"s", "touch leaves the record alone");
    }

    pub async fn get_returns_bytes_and_remaining_ttl(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        assert_eq!(store.get_session(&id).await.unwrap(), None);
        assert!(store.create_session(&id, b"record", LONG).await.unwrap());
        let got = store.get_session(&id).await.unwrap().expect("just created");
        assert_eq!(got.sealed, b"record");
        assert!(got.ttl <= LONG, "{:?}", got.ttl);
        assert!(got.ttl > Duration::ZERO, "{:?}", got.ttl);
    }

    pub async fn delete_removes_the_record_and_its_tokens(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        assert!(store.create_session(&id, b"s", LONG).await.unwrap());
        if !b.plant_token_cache(&id).await {
            assert!(store.put_token(&id, "pds", b"t", LONG).await.unwrap());
        }
        assert!(
            b.token_cache_exists(&id).await,
            "the token cache was written"
        );
        assert!(store.delete_session(&id).await.unwrap());
        assert_eq!(store.get_session(&id).await.unwrap(), None);
        assert!(!b.token_cache_exists(&id).await, "the token cache went too");
        assert!(
            !store.delete_session(&id).await.unwrap(),
            "a second delete finds nothing"
        );
    }

    pub async fn binary_values_round_trip(b: &Backend) {
        let store = b.store();
        let every_byte: Vec<u8> = (0..=255u8).collect();
        let values: [Vec<u8>; 5] = [
            vec![0x00],
            vec![0xff, 0xfe, 0x00, 0xc3, 0x28, 0x80],
            every_byte.iter().rev().copied().collect(),
            every_byte.repeat(256),
            Vec::new(),
        ];
        for value in values {
            let key = new_login_key();
            assert!(store.put_pending_login(&key, &value, LONG).await.unwrap());
            assert_eq!(
                store.take_pending_login(&key).await.unwrap().as_ref(),
                Some(&value)
            );

            let id = new_session_id();
            assert!(store.create_session(&id, &value, LONG).await.unwrap());
            assert_eq!(
                store
                    .get_session(&id)
                    .await
                    .unwrap()
                    .expect("created")
                    .sealed,
                value
            );
            let replaced: Vec<u8> = value.iter().map(|b| b ^ 0xff).collect();
            assert!(store.replace_session(&id, &replaced, LONG).await.unwrap());
            assert_eq!(
                store
                    .get_session(&id)
                    .await
                    .unwrap()
                    .expect("replaced")
                    .sealed,
                replaced
            );
        }
    }

    pub async fn ping_answers(b: &Backend) {
        b.store().ping().await.unwrap();
    }

    pub async fn tokens_are_read_with_their_session(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        assert_eq!(store.get_session_with_tokens(&id).await.unwrap(), None);

        assert!(store.create_session(&id, b"record", LONG).await.unwrap());
        let (session, tokens) = store
            .get_session_with_tokens(&id)
            .await
            .unwrap()
            .expect("just created");
        assert_eq!(session.sealed, b"record");
        assert!(
            session.ttl > Duration::ZERO && session.ttl <= LONG,
            "{:?}",
            session.ttl
        );
        assert!(tokens.is_empty(), "no token yet: {tokens:?}");

        assert!(store.put_token(&id, "aal2:g0", b"two", LONG).await.unwrap());
        assert!(
            store
                .put_token(&id, "aal3:g1", b"three", LONG)
                .await
                .unwrap()
        );
        let (session, mut tokens) = store
            .get_session_with_tokens(&id)
            .await
            .unwrap()
            .expect("still there");
        assert_eq!(session.sealed, b"record");
        tokens.sort();
        assert_eq!(
            tokens,
            vec![
                ("aal2:g0".to_owned(), b"two".to_vec()),
                ("aal3:g1".to_owned(), b"three".to_vec()),
            ]
        );
    }

    pub async fn a_token_is_stored_only_for_a_live_session(b: &Backend) {
        let store = b.store();
        let unknown = new_session_id();
        assert!(
            !store.put_token(&unknown, "f", b"t", LONG).await.unwrap(),
            "no session, no token"
        );
        assert_eq!(store.get_token(&unknown, "f").await.unwrap(), None);

        let revoked = new_session_id();
        assert!(store.create_session(&revoked, b"s", LONG).await.unwrap());
        assert!(store.delete_session(&revoked).await.unwrap());
        assert!(
            !store.put_token(&revoked, "f", b"t", LONG).await.unwrap(),
            "a revoked session never regains tokens"
        );
        assert_eq!(store.get_token(&revoked, "f").await.unwrap(), None);
        assert!(!b.token_cache_exists(&revoked).await);

        let expired = new_session_id();
        let short = Duration::from_millis(150);
        assert!(store.create_session(&expired, b"s", short).await.unwrap());
        b.let_time_pass(Duration::from_millis(500)).await;
        assert!(!store.put_token(&expired, "f", b"t", LONG).await.unwrap());
        assert_eq!(store.get_token(&expired, "f").await.unwrap(), None);
    }

    pub async fn a_token_field_is_replaced_and_the_others_kept(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        assert!(store.create_session(&id, b"s", LONG).await.unwrap());
        let binary: Vec<u8> = (0..=255u8).rev().collect();
        assert!(store.put_token(&id, "a", b"first", LONG).await.unwrap());
        assert!(store.put_token(&id, "b", &binary, LONG).await.unwrap());
        assert!(store.put_token(&id, "a", b"second", LONG).await.unwrap());
        assert_eq!(
            store.get_token(&id, "a").await.unwrap().as_deref(),
            Some(&b"second"[..])
        );
        assert_eq!(store.get_token(&id, "b").await.unwrap(), Some(binary));
        assert_eq!(store.get_token(&id, "c").await.unwrap(), None);
    }

    pub async fn deleting_tokens_keeps_the_session(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        assert!(store.create_session(&id, b"s", LONG).await.unwrap());
        assert!(store.put_token(&id, "a", b"t", LONG).await.unwrap());
        assert!(store.put_token(&id, "b", b"t", LONG).await.unwrap());
        store.delete_tokens(&id).await.unwrap();
        let (session, tokens) = store
            .get_session_with_tokens(&id)
            .await
            .unwrap()
            .expect("the session stays");
        assert_eq!(session.sealed, b"s");
        assert!(tokens.is_empty(), "{tokens:?}");
        store
            .delete_tokens(&new_session_id())
            .await
            .expect("deleting what is not there is fine");
        assert!(
            store.put_token(&id, "a", b"again", LONG).await.unwrap(),
            "the cache can be refilled"
        );
    }

    pub async fn the_token_cache_slides_with_its_session(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        let short = Duration::from_millis(300);
        assert!(store.create_session(&id, b"s", short).await.unwrap());
        assert!(store.put_token(&id, "f", b"t", short).await.unwrap());
        assert!(store.touch_session(&id, LONG).await.unwrap());
        b.let_time_pass(Duration::from_millis(600)).await;
        let (_, tokens) = store
            .get_session_with_tokens(&id)
            .await
            .unwrap()
            .expect("touched");
        assert_eq!(tokens, vec![("f".to_owned(), b"t".to_vec())]);
    }

    pub async fn the_token_cache_lives_as_long_as_its_session(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        assert!(store.create_session(&id, b"s", LONG).await.unwrap());
        assert!(
            store
                .put_token(&id, "f", b"t", Duration::from_millis(100))
                .await
                .unwrap()
        );
        b.let_time_pass(Duration::from_millis(400)).await;
        assert_eq!(
            store.get_token(&id, "f").await.unwrap().as_deref(),
            Some(&b"t"[..]),
            "a short TTL never makes the cache die before its session"
        );
    }

    pub async fn the_token_cache_expires_with_its_session(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        let short = Duration::from_millis(150);
        assert!(store.create_session(&id, b"s", short).await.unwrap());
        assert!(store.put_token(&id, "f", b"t", short).await.unwrap());
        b.let_time_pass(Duration::from_millis(500)).await;
        assert_eq!(store.get_token(&id, "f").await.unwrap(), None);
        assert_eq!(store.get_session_with_tokens(&id).await.unwrap(), None);
    }

    pub async fn a_lock_has_one_owner(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        assert!(!store.lock_held(&id, "tok").await.unwrap());
        assert!(store.acquire_lock(&id, "tok", "alice", LONG).await.unwrap());
        assert!(store.lock_held(&id, "tok").await.unwrap());
        assert!(
            !store.acquire_lock(&id, "tok", "bob", LONG).await.unwrap(),
            "held"
        );
        assert!(
            !store.acquire_lock(&id, "tok", "alice", LONG).await.unwrap(),
            "not re-entrant"
        );
        assert!(!store.renew_lock(&id, "tok", "bob", LONG).await.unwrap());
        assert!(store.renew_lock(&id, "tok", "alice", LONG).await.unwrap());
        assert!(
            !store.release_lock(&id, "tok", "bob").await.unwrap(),
            "only the owner releases"
        );
        assert!(store.lock_held(&id, "tok").await.unwrap());
        assert!(store.release_lock(&id, "tok", "alice").await.unwrap());
        assert!(!store.lock_held(&id, "tok").await.unwrap());
        assert!(!store.release_lock(&id, "tok", "alice").await.unwrap());
        assert!(!store.renew_lock(&id, "tok", "alice", LONG).await.unwrap());
        assert!(store.acquire_lock(&id, "tok", "bob", LONG).await.unwrap());
    }

    pub async fn locks_are_per_session_and_name(b: &Backend) {
        let store = b.store();
        let (one, two) = (new_session_id(), new_session_id());
        assert!(store.acquire_lock(&one, "a", "x", LONG).await.unwrap());
        assert!(store.acquire_lock(&one, "b", "x", LONG).await.unwrap());
        assert!(store.acquire_lock(&two, "a", "x", LONG).await.unwrap());
        assert!(store.release_lock(&one, "a", "x").await.unwrap());
        assert!(store.lock_held(&one, "b").await.unwrap());
        assert!(store.lock_held(&two, "a").await.unwrap());
    }

    pub async fn a_lease_runs_out_unless_renewed(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        // Wide margins: on Redis these are real sleeps, which a busy machine stretches.
        let lease = Duration::from_millis(800);
        assert!(
            store
                .acquire_lock(&id, "tok", "alice", lease)
                .await
                .unwrap()
        );
        b.let_time_pass(Duration::from_millis(500)).await;
        assert!(store.renew_lock(&id, "tok", "alice", lease).await.unwrap());
        b.let_time_pass(Duration::from_millis(500)).await;
        assert!(
            store.lock_held(&id, "tok").await.unwrap(),
            "the renewal moved the lease"
        );
        b.let_time_pass(Duration::from_millis(900)).await;
        assert!(!store.lock_held(&id, "tok").await.unwrap());
        assert!(
            !store.renew_lock(&id, "tok", "alice", lease).await.unwrap(),
            "an expired lease cannot be renewed"
        );
        assert!(store.acquire_lock(&id, "tok", "bob", LONG).await.unwrap());
        assert!(
            !store.release_lock(&id, "tok", "alice").await.unwrap(),
            "a late holder cannot release its successor's lock"
        );
        assert!(store.lock_held(&id, "tok").await.unwrap());
    }

    pub async fn concurrent_lockers_get_one_lock(b: &Backend) {
        let store = b.store();
        let id = new_session_id();
        let start = Arc::new(tokio::sync::Barrier::new(50));
        let lockers: Vec<_> = (0..50)
            .map(|n| {
                let (store, id, start) = (store.clone(), id.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    store
                        .acquire_lock(&id, "tok", &format!("owner-{n}"), LONG)
                        .await
                })
            })
            .collect();
        let mut winners = 0;
        for locker in lockers {
            if locker.await.expect("a locker task does not panic").unwrap() {
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "exactly one locker wins");
    }

    fn sorted(mut ids: Vec<SessionId>) -> Vec<String> {
        let mut out: Vec<String> = ids.drain(..).map(|id| id.as_str().to_owned()).collect();
        out.sort();
        out
    }

    pub async fn an_index_lists_what_was_added_and_not_removed(b: &Backend) {
        let store = b.store();
        let uid = random_urlsafe(8);
        let (one, two) = (new_session_id(), new_session_id());
        assert!(
            store
                .index_members(IndexKind::User, &uid)
                .await
                .unwrap()
                .is_empty()
        );
        store
            .index_add(IndexKind::User, &uid, &one, LONG)
            .await
            .unwrap();
        store
            .index_add(IndexKind::User, &uid, &two, LONG)
            .await
            .unwrap();
        store
            .index_add(IndexKind::User, &uid, &two, LONG)
            .await
            .unwrap();
        assert_eq!(
            sorted(store.index_members(IndexKind::User, &uid).await.unwrap()),
            sorted(vec![one.clone(), two.clone()])
        );
        // Another kind or value is another index.
        assert!(
            store
                .index_members(IndexKind::Cis2Sid, &uid)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            store
                .index_members(IndexKind::User, "other")
                .await
                .unwrap()
                .is_empty()
        );
        store
            .index_remove(IndexKind::User, &uid, &one)
            .await
            .unwrap();
        store
            .index_remove(IndexKind::User, &uid, &one)
            .await
            .unwrap();
        assert_eq!(
            sorted(store.index_members(IndexKind::User, &uid).await.unwrap()),
            sorted(vec![two.clone()])
        );
        store
            .index_remove(IndexKind::User, &uid, &two)
            .await
            .unwrap();
        assert!(
            store
                .index_members(IndexKind::User, &uid)
                .await
                .unwrap()
                .is_empty()
        );
    }

    pub async fn index_entries_expire_one_by_one(b: &Backend) {
        let store = b.store();
        let sid = random_urlsafe(8);
        let (short, long) = (new_session_id(), new_session_id());
        store
            .index_add(IndexKind::Cis2Sid, &sid, &short, Duration::from_millis(150))
            .await
            .unwrap();
        store
            .index_add(IndexKind::Cis2Sid, &sid, &long, LONG)
            .await
            .unwrap();
        // A shorter re-add never cuts an entry short.
        store
            .index_add(IndexKind::Cis2Sid, &sid, &long, Duration::from_millis(150))
            .await
            .unwrap();

        b.let_time_pass(Duration::from_millis(500)).await;

        assert_eq!(
            sorted(store.index_members(IndexKind::Cis2Sid, &sid).await.unwrap()),
            sorted(vec![long])
        );
    }

    pub async fn a_marker_is_new_only_once(b: &Backend) {
        let store = b.store();
        let marker = random_urlsafe(16);
        assert!(
            store
                .first_use(&marker, Duration::from_millis(150))
                .await
                .unwrap()
        );
        assert!(!store.first_use(&marker, LONG).await.unwrap());
        assert!(store.first_use(&random_urlsafe(16), LONG).await.unwrap());

        b.let_time_pass(Duration::from_millis(500)).await;

        assert!(
            store.first_use(&marker, LONG).await.unwrap(),
            "a marker is forgotten after its TTL"
        );
    }

    pub async fn concurrent_first_uses_have_one_winner(b: &Backend) {
        let store = b.store();
        let marker = random_urlsafe(16);
        let start = Arc::new(tokio::sync::Barrier::new(30));
        let users: Vec<_> = (0..30)
            .map(|_| {
                let (store, marker, start) = (store.clone(), marker.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    store.first_use(&marker, LONG).await
                })
            })
            .collect();
        let mut winners = 0;
        for user in users {
            if user.await.expect("a task does not panic").unwrap() {
                winners += 1;
            }
        }
        assert_eq!(winners, 1, "exactly one first use");
    }
}

/// Runs every listed case against both stores. The multi-threaded runtime makes the concurrent
/// cases truly concurrent.
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let backend = super::Backend::memory();
                    super::cases::$case(&backend).await;
                    backend.cleanup().await;
                }
            )*
        }

        mod redis_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let backend = super::Backend::redis().await;
                    super::cases::$case(&backend).await;
                    backend.cleanup().await;
                }
            )*
        }

        mod redis_cluster_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let backend = super::Backend::cluster().await;
                    super::cases::$case(&backend).await;
                    backend.cleanup().await;
                }
            )*
        }

        mod redis_sentinel_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let backend = super::Backend::sentinel().await;
                    super::cases::$case(&backend).await;
                    backend.cleanup().await;
                }
            )*
        }
    };
}

contract!(
    pending_login_is_taken_exactly_once,
    concurrent_takers_get_one_value,
    put_pending_keeps_the_original,
    entries_expire,
    create_refuses_an_existing_id,
    replace_updates_but_never_resurrects,
    touch_extends_and_never_creates,
    get_returns_bytes_and_remaining_ttl,
    delete_removes_the_record_and_its_tokens,
    binary_values_round_trip,
    ping_answers,
    tokens_are_read_with_their_session,
    a_token_is_stored_only_for_a_live_session,
    a_token_field_is_replaced_and_the_others_kept,
    deleting_tokens_keeps_the_session,
    the_token_cache_slides_with_its_session,
    the_token_cache_lives_as_long_as_its_session,
    the_token_cache_expires_with_its_session,
    a_lock_has_one_owner,
    locks_are_per_session_and_name,
    a_lease_runs_out_unless_renewed,
    concurrent_lockers_get_one_lock,
    an_index_lists_what_was_added_and_not_removed,
    index_entries_expire_one_by_one,
    a_marker_is_new_only_once,
    concurrent_first_uses_have_one_winner,
);

/// What only the Redis store has: a key layout, a URL, and a network that fails.
mod redis_only {
    use super::*;
    use std::future::Future;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    /// Far above the store's own timeouts: a call that hits it hung instead of failing.
    const HANG: Duration = Duration::from_secs(15);

    fn settings_for(url: String, prefix: &str) -> RedisSettings {
        RedisSettings {
            url,
            key_prefix: prefix.to_owned(),
            connect_timeout: Duration::from_millis(300),
            command_timeout: Duration::from_millis(300),
        }
    }

    /// A port on which nothing listens (just released by the OS).
    async fn free_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding an ephemeral port succeeds");
        listener
            .local_addr()
            .expect("a bound listener has an address")
            .port()
    }

    async fn expect_unavailable<T: std::fmt::Debug>(
        what: &str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) {
        let outcome = tokio::time::timeout(HANG, call)
            .await
            .unwrap_or_else(|_| panic!("{what} hung instead of failing"));
        match outcome {
            Err(StoreError::Unavailable(cause)) => {
                assert!(
                    !cause.contains("never-shown"),
                    "{what} named a key: {cause}"
                );
                assert!(
                    !cause.contains("hunter2"),
                    "{what} showed the password: {cause}"
                );
            }
            Ok(v) => panic!("{what} succeeded against a dead Redis: {v:?}"),
        }
    }

    /// Every method of the store fails as `Unavailable`, promptly and without panicking.
    async fn every_method_is_unavailable(store: &RedisStore) {
        let key = new_login_key();
        let id = new_session_id();
        let ttl = Duration::from_secs(60);
        expect_unavailable(
            "put_pending_login",
            store.put_pending_login(&key, b"v", ttl),
        )
        .await;
        expect_unavailable("take_pending_login", store.take_pending_login(&key)).await;
        expect_unavailable("create_session", store.create_session(&id, b"v", ttl)).await;
        expect_unavailable("replace_session", store.replace_session(&id, b"v", ttl)).await;
        expect_unavailable("get_session", store.get_session(&id)).await;
        expect_unavailable("touch_session", store.touch_session(&id, ttl)).await;
        expect_unavailable("delete_session", store.delete_session(&id)).await;
        expect_unavailable("ping", store.ping()).await;
        expect_unavailable(
            "get_session_with_tokens",
            store.get_session_with_tokens(&id),
        )
        .await;
        expect_unavailable("put_token", store.put_token(&id, "f", b"v", ttl)).await;
        expect_unavailable("get_token", store.get_token(&id, "f")).await;
        expect_unavailable("delete_tokens", store.delete_tokens(&id)).await;
        expect_unavailable("acquire_lock", store.acquire_lock(&id, "l", "o", ttl)).await;
        expect_unavailable("renew_lock", store.renew_lock(&id, "l", "o", ttl)).await;
        expect_unavailable("release_lock", store.release_lock(&id, "l", "o")).await;
        expect_unavailable("lock_held", store.lock_held(&id, "l")).await;
    }

    #[tokio::test]
    async fn a_closed_port_is_unavailable_for_every_method() {
        let store = RedisStore::new(settings_for(
            "redis://user:hunter2@127.0.0.1:1".into(),
            "never-shown:",
        ))
        .expect("a well-formed URL is accepted without connecting");
        every_method_is_unavailable(&store).await;
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_unavailable_for_every_method() {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding an ephemeral port succeeds");
        let port = listener.local_addr().expect("bound").port();
        // Accepts connections and holds them open without ever replying.
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let store = RedisStore::new(settings_for(
            format!("redis://127.0.0.1:{port}"),
            "never-shown:",
        ))
        .expect("a well-formed URL is accepted without connecting");
        every_method_is_unavailable(&store).await;
        silent.abort();
    }

    /// Where the real Redis listens, for the relay. The relay forwards plain TCP, so that Redis
    /// must need neither TLS nor a password for the tests that use it.
    fn upstream_addr() -> String {
        let upstream = redis_url();
        let parsed = url::Url::parse(&upstream).expect("REDIS_URL parses");
        assert!(
            parsed.scheme() == "redis" && parsed.password().is_none(),
            "the relay tests need REDIS_URL to be a plain redis:// URL without a password"
        );
        format!(
            "{}:{}",
            parsed.host_str().expect("REDIS_URL names a host"),
            parsed.port().unwrap_or(6379)
        )
    }

    /// A TCP relay to the real Redis that the test can pause. While paused it holds whatever the
    /// store sends, like a Redis that has stopped answering; on resume it delivers it.
    struct Relay {
        paused: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Relay {
        fn start(listener: TcpListener, upstream: String) -> Self {
            let (paused, _) = watch::channel(false);
            let gate = paused.clone();
            let task = tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let Ok(outbound) = TcpStream::connect(&upstream).await else {
                        continue;
                    };
                    let (mut from_store, mut to_store) = inbound.into_split();
                    let (mut from_redis, mut to_redis) = outbound.into_split();
                    let mut open = gate.subscribe();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match from_store.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if open.wait_for(|paused| !*paused).await.is_err()
                                || to_redis.write_all(&buf[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                    });
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut from_redis, &mut to_store).await;
                    });
                }
            });
            Relay { paused, task }
        }

        fn pause(&self) {
            self.paused.send_replace(true);
        }

        fn resume(&self) {
            self.paused.send_replace(false);
        }
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    #[tokio::test]
    async fn a_failed_first_connect_is_retried_by_the_next_call() {
        let upstream = upstream_addr();
        let _ = raw_connection(&redis_url()).await;

        let port = free_port().await;
        let store = RedisStore::new(settings_for(
            format!("redis://127.0.0.1:{port}"),
            "never-shown:",
        ))
        .expect("a well-formed URL is accepted without connecting");
        expect_unavailable("ping before Redis is up", store.ping()).await;

        // Redis "comes up" on that port.
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("the released port is still free");
        let _relay = Relay::start(listener, upstream);
        store.ping().await.expect("the next call connects");
    }

    #[tokio::test]
    async fn a_redis_that_stops_answering_times_out_then_recovers() {
        let upstream = upstream_addr();
        let raw = raw_connection(&redis_url()).await;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding an ephemeral port succeeds");
        let port = listener.local_addr().expect("bound").port();
        let relay = Relay::start(listener, upstream);
        let prefix = format!("never-shown-{}:", random_urlsafe(12));
        let store = RedisStore::new(settings_for(format!("redis://127.0.0.1:{port}"), &prefix))
            .expect("a well-formed URL is accepted without connecting");
        store.ping().await.expect("connected through the relay");

        relay.pause();
        every_method_is_unavailable(&store).await;

        relay.resume();
        let id = new_session_id();
        assert!(
            store
                .create_session(&id, b"after", Duration::from_secs(60))
                .await
                .expect("the store recovers once Redis answers again")
        );
        let got = store
            .get_session(&id)
            .await
            .expect("answers")
            .expect("created");
        assert_eq!(
            got.sealed, b"after",
            "replies are matched to the right commands"
        );
        // The commands held while paused ran on resume; their keys carry TTLs, but go now.
        delete_prefixed(raw, &prefix).await;
    }

    #[tokio::test]
    async fn keys_follow_the_documented_layout() {
        let backend = Backend::redis().await;
        let Backend::Redis { store, raw, prefix } = &backend else {
            unreachable!("Backend::redis builds the Redis variant")
        };
        assert_eq!(store.key_prefix(), prefix);
        let key = LoginKey::from_state("layout-state");
        let id = new_session_id();
        assert!(
            store
                .put_pending_login(&key, b"p", Duration::from_secs(60))
                .await
                .unwrap()
        );
        assert!(
            store
                .create_session(&id, b"s", Duration::from_secs(60))
                .await
                .unwrap()
        );

        let mut raw = raw.clone();
        for name in [
            format!("{prefix}login:{}", key.as_str()),
            format!("{prefix}s:{{{}}}", id.as_str()),
        ] {
            let pttl: i64 = redis::cmd("PTTL")
                .arg(&name)
                .query_async(&mut raw)
                .await
                .expect("PTTL on the test Redis succeeds");
            assert!(pttl > 0 && pttl <= 60_000, "{name}: PTTL {pttl}");
        }
        let value: Vec<u8> = redis::cmd("GET")
            .arg(format!("{prefix}s:{{{}}}", id.as_str()))
            .query_async(&mut raw)
            .await
            .expect("GET on the test Redis succeeds");
        assert_eq!(value, b"s", "the store writes the sealed bytes as they are");

        assert!(
            store
                .put_token(&id, "aal2:g0", b"sealed", Duration::from_secs(1))
                .await
                .unwrap()
        );
        assert!(
            store
                .acquire_lock(&id, "aal2:g0", "owner-1", Duration::from_secs(5))
                .await
                .unwrap()
        );
        let tokens = format!("{prefix}s:{{{}}}:tokens", id.as_str());
        let lock = format!("{prefix}s:{{{}}}:lock:aal2:g0", id.as_str());
        let field: Vec<u8> = redis::cmd("HGET")
            .arg(&tokens)
            .arg("aal2:g0")
            .query_async(&mut raw)
            .await
            .expect("HGET on the test Redis succeeds");
        assert_eq!(field, b"sealed");
        let owner: String = redis::cmd("GET")
            .arg(&lock)
            .query_async(&mut raw)
            .await
            .expect("GET on the test Redis succeeds");
        assert_eq!(owner, "owner-1");
        for (name, low, high) in [(&tokens, 1_000, 60_000), (&lock, 1, 5_000)] {
            let pttl: i64 = redis::cmd("PTTL")
                .arg(name)
                .query_async(&mut raw)
                .await
                .expect("PTTL on the test Redis succeeds");
            assert!(
                pttl >= low && pttl <= high,
                "{name}: PTTL {pttl}, the cache lives as long as the record"
            );
        }
        backend.cleanup().await;
    }

    #[tokio::test]
    async fn a_ttl_below_a_millisecond_is_accepted() {
        let backend = Backend::redis().await;
        let store = backend.store();
        let id = new_session_id();
        assert!(
            store
                .create_session(&id, b"s", Duration::ZERO)
                .await
                .unwrap()
        );
        assert!(
            store
                .put_pending_login(&new_login_key(), b"p", Duration::from_micros(10))
                .await
                .unwrap()
        );
        backend.cleanup().await;
    }

    #[test]
    fn malformed_urls_are_refused() {
        for url in [
            "",
            "127.0.0.1:6379",
            "redis//127.0.0.1",
            "http://127.0.0.1:6379",
            "redis://user:hunter2@127.0.0.1:notaport",
        ] {
            match RedisStore::new(settings_for(url.into(), "p:")) {
                Err(StoreError::Unavailable(cause)) => {
                    assert!(!cause.contains("hunter2"), "{url}: {cause}");
                }
                Ok(_) => panic!("{url:?} was accepted"),
            }
        }
    }
}

#[test]
fn the_memory_store_expiry_follows_its_clock_not_the_wall() {
    // Guards the contract's assumption that moving the manual clock is what expires entries.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime builds");
    runtime.block_on(async {
        let backend = Backend::memory();
        let store = backend.store();
        let id = new_session_id();
        assert!(
            store
                .create_session(&id, b"s", Duration::from_millis(1))
                .await
                .unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(store.get_session(&id).await.unwrap().is_some());
        backend.let_time_pass(Duration::from_millis(1)).await;
        assert!(store.get_session(&id).await.unwrap().is_none());
    });
}
