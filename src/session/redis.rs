//! The Redis [`SessionStore`]: what every broker replica shares.
//!
//! # Key layout
//!
//! Every key starts with the configured prefix (`{prefix}` below, e.g. `cis2sb:`), so several
//! deployments can share one Redis.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `{prefix}login:<login-key>` | string | a sealed pending sign-in; TTL = the sign-in window |
//! | `{prefix}s:{<session-id>}` | string | a sealed session record; TTL = the idle deadline |
//! | `{prefix}s:{<session-id>}:tokens` | hash | the session's sealed API token cache; TTL = at least the record's |
//! | `{prefix}s:{<session-id>}:lock:<name>` | string | a lock's owner (a random value); TTL = its lease |
//! | `{prefix}idx:sid:<sha256>` / `{prefix}idx:uid:<sha256>` | hash | session id -> deadline (server ms) of the sessions of one CIS2 sid / one user; TTL = its longest entry |
//! | `{prefix}once:<sha256>` | string | a one-time marker (a logout token's `jti`); TTL = while the token is acceptable |
//!
//! The braces around the session id are a Redis Cluster hash tag: every key of one session hashes
//! to the same slot, so a multi-key command such as the one `DEL` of [`SessionStore::delete_session`]
//! and the Lua scripts of the token cache and locks work in Cluster too. The prefix must therefore not contain `{` or `}`, or it would become the
//! tag and put every session in one slot; [`RedisStore::new`] refuses such a prefix.
//!
//! Login keys and session ids are hashes (see `session::token`): no key names a token.
//!
//! # Connections and failures
//!
//! [`RedisStore::new`] only validates its settings, so the broker starts while Redis is down and
//! reports itself not ready. The first operation connects through a `ConnectionManager`, which then
//! reconnects by itself when the connection drops; a first connection that fails is retried by
//! the next operation. A command that times out makes the store drop that connection and open a
//! new one on the next operation: the manager does not reconnect on timeouts, and a half-open
//! connection (a failed-over or partitioned Redis that sent no reset) would otherwise time out
//! every command until the kernel gave up on it.
//! Connecting is bounded by `connect_timeout` and each command by `command_timeout`. Any Redis error
//! or timeout becomes [`StoreError::Unavailable`] with a cause that names neither keys nor values.

mod conn;

pub use conn::{Mode as RedisMode, Topology as RedisTopology};

use super::store::{IndexKind, SessionStore, StoreError, StoredSession, hashed};
use super::token::{LoginKey, SessionId};
use conn::{Conn, Connector, redact_url};
use redis::{RedisError, Script, Value};
use std::fmt;
use std::future::Future;
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// `put_token`: KEYS = record, token cache; ARGV = field, value, TTL in ms. In a script so that
/// "the session still exists" and the write are one step: a session deleted in between never
/// regains a cache. The cache lives at least as long as the record, so a token is not lost while
/// its session lives.
static PUT_TOKEN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
        redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
        local ttl = tonumber(ARGV[3])
        local left = redis.call('PTTL', KEYS[1])
        if left > ttl then ttl = left end
        redis.call('PEXPIRE', KEYS[2], ttl)
        return 1
        ",
    )
});

/// `renew_lock`: KEYS = lock; ARGV = owner, lease in ms. Compare and extend in one step, so a
/// holder whose lease ran out cannot extend its successor's.
static RENEW_LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then
            return redis.call('PEXPIRE', KEYS[1], ARGV[2])
        end
        return 0
        ",
    )
});

/// `release_lock`: KEYS = lock; ARGV = owner. Compare and delete in one step, for the same reason.
static RELEASE_LOCK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
        if redis.call('GET', KEYS[1]) == ARGV[1] then
            return redis.call('DEL', KEYS[1])
        end
        return 0
        ",
    )
});

/// The server's clock in milliseconds, as Lua sees it: one clock for every replica.
const LUA_NOW_MS: &str = "local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)";

/// `index_add`: KEYS = index; ARGV = session id, TTL in ms. The entry's value is its deadline
/// on the server's clock, never moved earlier; the key lives as long as its longest entry.
static INDEX_ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"
        {LUA_NOW_MS}
        local ttl = tonumber(ARGV[2])
        local deadline = now + ttl
        local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') or 0
        if old > deadline then deadline = old end
        redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', deadline))
        local left = redis.call('PTTL', KEYS[1])
        if left > ttl then ttl = left end
        redis.call('PEXPIRE', KEYS[1], ttl)
        return 1
        "
    ))
});

/// `index_members`: KEYS = index. Prunes expired entries and returns the live session ids.
static INDEX_MEMBERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"
        {LUA_NOW_MS}
        local all = redis.call('HGETALL', KEYS[1])
        local live = {{}}
        for i = 1, #all, 2 do
            local deadline = tonumber(all[i + 1])
            if deadline and deadline > now then
                table.insert(live, all[i])
            else
                redis.call('HDEL', KEYS[1], all[i])
            end
        end
        return live
        "
    ))
});

/// How to reach Redis. `url` is `redis://` or `rediss://` (TLS) and may carry `user:password@`.
#[derive(Clone)]
pub struct RedisSettings {
    pub url: String,
    pub key_prefix: String,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

impl fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact_url(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

pub struct RedisStore {
    connector: Connector,
    connection: Mutex<Slot>,
    /// Serialises connecting, so a burst of calls after an outage opens one connection, not many.
    connecting: tokio::sync::Mutex<()>,
    key_prefix: String,
    connect_timeout: Duration,
    command_timeout: Duration,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("key_prefix", &self.key_prefix)
            .field("connected", &self.slot().current.is_some())
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Checks the settings without connecting. Errors name the problem, never the URL (it may
    /// carry a password).
    pub fn new(settings: RedisSettings) -> Result<Self, StoreError> {
        let RedisSettings {
            url,
            key_prefix,
            connect_timeout,
            command_timeout,
        } = settings;
        check_prefix(&key_prefix).map_err(invalid)?;
        check_timeout("connect_timeout", connect_timeout).map_err(invalid)?;
        check_timeout("command_timeout", command_timeout).map_err(invalid)?;
        let connector = Connector::new(&url, connect_timeout, command_timeout).map_err(invalid)?;
        Ok(RedisStore {
            connector,
            connection: Mutex::new(Slot::default()),
            connecting: tokio::sync::Mutex::new(()),
            key_prefix,
            connect_timeout,
            command_timeout,
        })
    }

    pub fn key_prefix(&self) -> &str {
        &self.key_prefix
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        // Every critical section is a plain assignment or clone, so a poisoned lock still guards
        // a consistent slot.
        self.connection
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The live connection, opening one (bounded by `connect_timeout`) if there is none.
    async fn connection(&self) -> Result<Connected, StoreError> {
        if let Some(current) = self.slot().current.clone() {
            return Ok(current);
        }
        let connect = async {
            let _one_at_a_time = self.connecting.lock().await;
            // Another call may have connected while this one waited.
            if let Some(current) = self.slot().current.clone() {
                return Ok(current);
            }
            let conn = self.connector.connect().await?;
            Ok(self.slot().install(conn))
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(connected)) => Ok(connected),
            Ok(Err(e)) => Err(unavailable("connect", &e)),
            Err(_) => Err(StoreError::Unavailable("connect: timed out".into())),
        }
    }

    /// Runs one command (or pipeline) under `command_timeout`, connecting first if need be.
    async fn run<T, F, Fut>(&self, op: &'static str, send: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let Connected {
            generation,
            manager,
        } = self.connection().await?;
        let outcome = match tokio::time::timeout(self.command_timeout, send(manager)).await {
            Ok(result) => result,
            // Dropping the future is safe: a late reply is matched to its own command and
            // discarded, never handed to another.
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
        };
        outcome.map_err(|e| {
            if self.connector.must_reconnect(&e) {
                self.slot().forget(generation);
            }
            unavailable(op, &e)
        })
    }

    async fn set(
        &self,
        op: &'static str,
        key: String,
        sealed: &[u8],
        ttl: Duration,
        condition: SetCondition,
    ) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key)
            .arg(sealed)
            .arg(condition.as_arg())
            .arg("PX")
            .arg(ttl_millis(ttl));
        let reply: Value = self
            .run(
                op,
                |mut conn| async move { cmd.query_async(&mut conn).await },
            )
            .await?;
        set_outcome(&reply).map_err(|unexpected| unexpected_reply(op, unexpected))
    }
}

#[async_trait::async_trait]
impl SessionStore for RedisStore {
    async fn put_pending_login(
        &self,
        key: &LoginKey,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let key = login_key(&self.key_prefix, key);
        self.set(
            "put_pending_login",
            key,
            sealed,
            ttl,
            SetCondition::IfAbsent,
        )
        .await
    }

    async fn take_pending_login(&self, key: &LoginKey) -> Result<Option<Vec<u8>>, StoreError> {
        let mut cmd = redis::cmd("GETDEL");
        cmd.arg(login_key(&self.key_prefix, key));
        self.run("take_pending_login", |mut conn| async move {
            cmd.query_async(&mut conn).await
        })
        .await
    }

    async fn create_session(
        &self,
        id: &SessionId,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let key = session_key(&self.key_prefix, id);
        self.set("create_session", key, sealed, ttl, SetCondition::IfAbsent)
            .await
    }

    async fn replace_session(
        &self,
        id: &SessionId,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let key = session_key(&self.key_prefix, id);
        self.set("replace_session", key, sealed, ttl, SetCondition::IfPresent)
            .await
    }

    async fn get_session(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        let key = session_key(&self.key_prefix, id);
        let mut pipe = redis::pipe();
        // A plain pipeline, not MULTI/EXEC: two commands instead of four on the hot path. Were
        // the key to expire or go between the two, PTTL answers -2, a zero TTL, and the caller
        // treats the session as gone, which by then it is.
        pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
        let (sealed, pttl): (Option<Vec<u8>>, i64) = self
            .run("get_session", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await?;
        Ok(sealed.map(|sealed| StoredSession {
            sealed,
            ttl: ttl_from_pttl(pttl),
        }))
    }

    async fn touch_session(&self, id: &SessionId, ttl: Duration) -> Result<bool, StoreError> {
        let mut pipe = redis::pipe();
        // The token cache slides with its session; PEXPIRE never creates either key.
        pipe.atomic()
            .cmd("PEXPIRE")
            .arg(session_key(&self.key_prefix, id))
            .arg(ttl_millis(ttl))
            .cmd("PEXPIRE")
            .arg(token_cache_key(&self.key_prefix, id))
            .arg(ttl_millis(ttl))
            .ignore();
        let (touched,): (bool,) = self
            .run("touch_session", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await?;
        Ok(touched)
    }

    async fn delete_session(&self, id: &SessionId) -> Result<bool, StoreError> {
        let record = session_key(&self.key_prefix, id);
        let tokens = token_cache_key(&self.key_prefix, id);
        let mut pipe = redis::pipe();
        // EXISTS answers "did the session exist" even when only its token cache was left; one
        // DEL removes both keys, which share a hash slot.
        pipe.atomic()
            .cmd("EXISTS")
            .arg(&record)
            .cmd("DEL")
            .arg(&record)
            .arg(&tokens)
            .ignore();
        let (existed,): (bool,) = self
            .run("delete_session", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await?;
        Ok(existed)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let cmd = redis::cmd("PING");
        let reply: Value = self
            .run("ping", |mut conn| async move {
                cmd.query_async(&mut conn).await
            })
            .await?;
        match reply {
            Value::SimpleString(_) | Value::Okay | Value::BulkString(_) => Ok(()),
            _ => Err(unexpected_reply("ping", kind_of(&reply))),
        }
    }

    async fn get_session_with_tokens(
        &self,
        id: &SessionId,
    ) -> Result<Option<(StoredSession, Vec<(String, Vec<u8>)>)>, StoreError> {
        let record = session_key(&self.key_prefix, id);
        let tokens = token_cache_key(&self.key_prefix, id);
        let mut pipe = redis::pipe();
        // One round trip, pipelined as in `get_session`: a cache hit costs what a session
        // read costs. Cached tokens are keyed by the session's generation, so a step-up landing
        // between the commands cannot pair a record with another level's token.
        pipe.cmd("GET")
            .arg(&record)
            .cmd("PTTL")
            .arg(&record)
            .cmd("HGETALL")
            .arg(&tokens);
        let (sealed, pttl, fields): (Option<Vec<u8>>, i64, Vec<(Vec<u8>, Vec<u8>)>) = self
            .run("get_session_with_tokens", |mut conn| async move {
                pipe.query_async(&mut conn).await
            })
            .await?;
        Ok(sealed.map(|sealed| {
            let session = StoredSession {
                sealed,
                ttl: ttl_from_pttl(pttl),
            };
            (session, utf8_fields(fields))
        }))
    }

    async fn put_token(
        &self,
        id: &SessionId,
        field: &str,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let record = session_key(&self.key_prefix, id);
        let tokens = token_cache_key(&self.key_prefix, id);
        let ttl = ttl_millis(ttl);
        let wrote: i64 = self
            .run("put_token", |mut conn| async move {
                PUT_TOKEN
                    .key(record)
                    .key(tokens)
                    .arg(field)
                    .arg(sealed)
                    .arg(ttl)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(wrote == 1)
    }

    async fn get_token(&self, id: &SessionId, field: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut cmd = redis::cmd("HGET");
        cmd.arg(token_cache_key(&self.key_prefix, id)).arg(field);
        self.run("get_token", |mut conn| async move {
            cmd.query_async(&mut conn).await
        })
        .await
    }

    async fn delete_tokens(&self, id: &SessionId) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("DEL");
        cmd.arg(token_cache_key(&self.key_prefix, id));
        let _deleted: i64 = self
            .run("delete_tokens", |mut conn| async move {
                cmd.query_async(&mut conn).await
            })
            .await?;
        Ok(())
    }

    async fn acquire_lock(
        &self,
        id: &SessionId,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let key = lock_key(&self.key_prefix, id, name);
        self.set(
            "acquire_lock",
            key,
            owner.as_bytes(),
            lease,
            SetCondition::IfAbsent,
        )
        .await
    }

    async fn renew_lock(
        &self,
        id: &SessionId,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let key = lock_key(&self.key_prefix, id, name);
        let lease = ttl_millis(lease);
        let renewed: i64 = self
            .run("renew_lock", |mut conn| async move {
                RENEW_LOCK
                    .key(key)
                    .arg(owner)
                    .arg(lease)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(renewed == 1)
    }

    async fn release_lock(
        &self,
        id: &SessionId,
        name: &str,
        owner: &str,
    ) -> Result<bool, StoreError> {
        let key = lock_key(&self.key_prefix, id, name);
        let released: i64 = self
            .run("release_lock", |mut conn| async move {
                RELEASE_LOCK
                    .key(key)
                    .arg(owner)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(released == 1)
    }

    async fn lock_held(&self, id: &SessionId, name: &str) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(lock_key(&self.key_prefix, id, name));
        self.run("lock_held", |mut conn| async move {
            cmd.query_async(&mut conn).await
        })
        .await
    }

    async fn index_add(
        &self,
        kind: IndexKind,
        value: &str,
        id: &SessionId,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let key = index_key(&self.key_prefix, kind, value);
        let id = id.as_str().to_owned();
        let ttl = ttl_millis(ttl);
        let _added: i64 = self
            .run("index_add", |mut conn| async move {
                INDEX_ADD
                    .key(key)
                    .arg(id)
                    .arg(ttl)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(())
    }

    async fn index_remove(
        &self,
        kind: IndexKind,
        value: &str,
        id: &SessionId,
    ) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("HDEL");
        cmd.arg(index_key(&self.key_prefix, kind, value))
            .arg(id.as_str());
        let _removed: i64 = self
            .run("index_remove", |mut conn| async move {
                cmd.query_async(&mut conn).await
            })
            .await?;
        Ok(())
    }

    async fn index_members(
        &self,
        kind: IndexKind,
        value: &str,
    ) -> Result<Vec<SessionId>, StoreError> {
        let key = index_key(&self.key_prefix, kind, value);
        let ids: Vec<Vec<u8>> = self
            .run("index_members", |mut conn| async move {
                INDEX_MEMBERS.key(key).invoke_async(&mut conn).await
            })
            .await?;
        // Anything that is not a session id was not written by the broker: left out.
        Ok(ids
            .iter()
            .filter_map(|raw| std::str::from_utf8(raw).ok().and_then(SessionId::parse))
            .collect())
    }

    async fn first_use(&self, marker: &str, ttl: Duration) -> Result<bool, StoreError> {
        let key = once_key(&self.key_prefix, marker);
        self.set("first_use", key, b"1", ttl, SetCondition::IfAbsent)
            .await
    }
}

/// Cache field names as text. The broker writes only ASCII names; anything else was not written
/// by it and is left out rather than guessed at.
fn utf8_fields(fields: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    let mut fields: Vec<(String, Vec<u8>)> = fields
        .into_iter()
        .filter_map(|(name, value)| String::from_utf8(name).ok().map(|name| (name, value)))
        .collect();
    fields.sort();
    fields
}

/// The connection in use, numbered so that a caller who saw it time out forgets that one and not
/// a newer one that another call has opened since.
#[derive(Default)]
struct Slot {
    current: Option<Connected>,
    opened: u64,
}

#[derive(Clone)]
struct Connected {
    generation: u64,
    manager: Conn,
}

impl Slot {
    fn install(&mut self, manager: Conn) -> Connected {
        self.opened += 1;
        let connected = Connected {
            generation: self.opened,
            manager,
        };
        self.current = Some(connected.clone());
        connected
    }

    fn forget(&mut self, generation: u64) {
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.generation == generation)
        {
            self.current = None;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetCondition {
    IfAbsent,
    IfPresent,
}

impl SetCondition {
    fn as_arg(self) -> &'static str {
        match self {
            SetCondition::IfAbsent => "NX",
            SetCondition::IfPresent => "XX",
        }
    }
}

fn login_key(prefix: &str, key: &LoginKey) -> String {
    format!("{prefix}login:{}", key.as_str())
}

// The two keys of the hot path are concatenated, not `format!`ted: `format!` cost about 1k
// instructions a key (callgrind), and a cached GetPdsToken names both.
fn session_key(prefix: &str, id: &SessionId) -> String {
    [prefix, "s:{", id.as_str(), "}"].concat()
}

fn token_cache_key(prefix: &str, id: &SessionId) -> String {
    [prefix, "s:{", id.as_str(), "}:tokens"].concat()
}

fn lock_key(prefix: &str, id: &SessionId, name: &str) -> String {
    format!("{}:lock:{name}", session_key(prefix, id))
}

/// An index's key: its own hash slot (no hash tag), named by a hash of the indexed value.
fn index_key(prefix: &str, kind: IndexKind, value: &str) -> String {
    format!(
        "{prefix}idx:{}:{}",
        kind.as_str(),
        hashed(kind.as_str(), value)
    )
}

/// A one-time marker's key, hashed again so no caller's value ever names a key.
fn once_key(prefix: &str, marker: &str) -> String {
    format!("{prefix}once:{}", hashed("once", marker))
}

/// Milliseconds for `PX`/`PEXPIRE`: at least 1 (Redis refuses 0), saturating rather than
/// wrapping for absurd durations.
fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// `PTTL` answers -1 (no expiry) or -2 (no key) besides a count of milliseconds. Neither should
/// happen for a key just read with a TTL, so both become "expires now": the caller then treats the
/// session as at its end rather than as everlasting.
fn ttl_from_pttl(pttl: i64) -> Duration {
    Duration::from_millis(u64::try_from(pttl).unwrap_or(0))
}

/// `SET ... NX|XX` answers OK when it wrote and nil when the condition failed.
fn set_outcome(reply: &Value) -> Result<bool, &'static str> {
    match reply {
        Value::Okay => Ok(true),
        Value::SimpleString(s) if s == "OK" => Ok(true),
        Value::Nil => Ok(false),
        other => Err(kind_of(other)),
    }
}

/// The shape of an unexpected reply, for an error message: never its content.
fn kind_of(reply: &Value) -> &'static str {
    match reply {
        Value::Nil => "nil",
        Value::Int(_) => "integer",
        Value::BulkString(_) => "bulk string",
        Value::Array(_) => "array",
        Value::SimpleString(_) => "simple string",
        Value::Okay => "OK",
        Value::ServerError(_) => "server error",
        _ => "other",
    }
}

/// A Redis failure as a cause safe to log: the kind of failure and the server's error code, never
/// the server's detail text (which can quote a key) nor any value.
fn describe(e: &RedisError) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connection_refusal() {
        "connection refused".into()
    } else if e.is_connection_dropped() {
        "connection dropped".into()
    } else if let Some(code) = e.code() {
        format!("server error {code}")
    } else {
        e.category().to_owned()
    }
}

fn unavailable(op: &'static str, e: &RedisError) -> StoreError {
    StoreError::Unavailable(format!("{op}: {}", describe(e)))
}

fn unexpected_reply(op: &'static str, kind: &'static str) -> StoreError {
    StoreError::Unavailable(format!("{op}: unexpected {kind} reply"))
}

fn invalid(problem: String) -> StoreError {
    StoreError::Unavailable(format!("invalid Redis settings: {problem}"))
}

fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.contains(['{', '}']) {
        return Err(
            "key_prefix must not contain '{' or '}' (they would replace the session hash tag)"
                .into(),
        );
    }
    Ok(())
}

fn check_timeout(name: &str, value: Duration) -> Result<(), String> {
    if value.is_zero() {
        return Err(format!("{name} must be greater than zero"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> RedisSettings {
        RedisSettings {
            url: url.into(),
            key_prefix: "cis2sb:".into(),
            connect_timeout: Duration::from_millis(500),
            command_timeout: Duration::from_millis(500),
        }
    }

    fn id() -> SessionId {
        SessionId::parse("0123456789abcdef0123456789abcdef")
            .expect("32 lowercase hex digits form a session id")
    }

    fn message(e: StoreError) -> String {
        e.to_string()
    }

    #[test]
    fn keys_follow_the_documented_layout() {
        let login = LoginKey::from_state("some-state");
        assert_eq!(
            login_key("p:", &login),
            format!("p:login:{}", login.as_str())
        );
        assert_eq!(
            session_key("p:", &id()),
            "p:s:{0123456789abcdef0123456789abcdef}"
        );
        assert_eq!(
            token_cache_key("p:", &id()),
            "p:s:{0123456789abcdef0123456789abcdef}:tokens"
        );
        assert_eq!(
            session_key("", &id()),
            "s:{0123456789abcdef0123456789abcdef}"
        );
    }

    #[test]
    fn a_session_and_its_token_cache_share_a_hash_tag() {
        fn hash_tag(key: &str) -> &str {
            let open = key.find('{').expect("session keys carry a hash tag");
            let close = key[open..].find('}').expect("the tag is closed") + open;
            &key[open + 1..close]
        }
        let record = session_key("cis2sb:", &id());
        let tokens = token_cache_key("cis2sb:", &id());
        assert_eq!(hash_tag(&record), id().as_str());
        assert_eq!(hash_tag(&record), hash_tag(&tokens));
    }

    #[test]
    fn ttls_become_at_least_one_millisecond() {
        let cases = [
            (Duration::ZERO, 1),
            (Duration::from_micros(999), 1),
            (Duration::from_millis(1), 1),
            (Duration::from_millis(1_500), 1_500),
            (Duration::from_secs(1_800), 1_800_000),
            (Duration::MAX, u64::MAX),
        ];
        for (ttl, want) in cases {
            assert_eq!(ttl_millis(ttl), want, "ttl {ttl:?}");
        }
    }

    #[test]
    fn pttl_replies_clamp_at_zero() {
        let cases = [
            (-2, Duration::ZERO),
            (-1, Duration::ZERO),
            (0, Duration::ZERO),
            (1, Duration::from_millis(1)),
            (90_000, Duration::from_secs(90)),
        ];
        for (pttl, want) in cases {
            assert_eq!(ttl_from_pttl(pttl), want, "pttl {pttl}");
        }
    }

    #[test]
    fn set_replies_are_read_strictly() {
        assert_eq!(set_outcome(&Value::Okay), Ok(true));
        assert_eq!(set_outcome(&Value::SimpleString("OK".into())), Ok(true));
        assert_eq!(set_outcome(&Value::Nil), Ok(false));
        assert_eq!(
            set_outcome(&Value::SimpleString("QUEUED".into())),
            Err("simple string")
        );
        assert_eq!(set_outcome(&Value::Int(1)), Err("integer"));
        assert_eq!(
            set_outcome(&Value::BulkString(b"secret".to_vec())),
            Err("bulk string")
        );
    }

    #[test]
    fn good_settings_are_accepted_without_a_server() {
        for url in [
            "redis://127.0.0.1:6379",
            "redis://localhost",
            "redis://user:pa%40ss@redis.internal:6380/2",
            "redis://:password@127.0.0.1",
            "rediss://redis.example.org:6380",
            "redis://[::1]:6379",
        ] {
            let store = RedisStore::new(settings(url));
            assert!(store.is_ok(), "{url} should be accepted: {store:?}");
        }
        let store = RedisStore::new(settings("redis://127.0.0.1")).expect("valid settings");
        assert_eq!(store.key_prefix(), "cis2sb:");
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_them() {
        for url in [
            "",
            "not a url",
            "127.0.0.1:6379",
            "http://user:hunter2@127.0.0.1:6379",
            "unix:///tmp/redis.sock",
            "redis://",
            "redis://user:hunter2@",
            "redis://user:hunter2@127.0.0.1:6379/notadb",
            "redis://user:hunter2@127.0.0.1:99999",
        ] {
            let err = RedisStore::new(settings(url)).expect_err(url);
            let shown = message(err);
            assert!(shown.contains("invalid Redis settings"), "{url}: {shown}");
            assert!(!shown.contains("hunter2"), "{url}: {shown}");
        }
    }

    #[test]
    fn braces_in_the_prefix_are_refused() {
        for prefix in ["{app}:", "app{", "app}"] {
            let mut s = settings("redis://127.0.0.1");
            s.key_prefix = prefix.into();
            assert!(RedisStore::new(s).is_err(), "{prefix}");
        }
    }

    #[test]
    fn zero_timeouts_are_refused() {
        let mut s = settings("redis://127.0.0.1");
        s.connect_timeout = Duration::ZERO;
        assert!(
            message(RedisStore::new(s).expect_err("zero connect timeout"))
                .contains("connect_timeout")
        );
        let mut s = settings("redis://127.0.0.1");
        s.command_timeout = Duration::ZERO;
        assert!(
            message(RedisStore::new(s).expect_err("zero command timeout"))
                .contains("command_timeout")
        );
    }

    #[test]
    fn debug_never_shows_the_password() {
        let s = settings("redis://user:hunter2@127.0.0.1:6379");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
        let store = RedisStore::new(s).expect("valid settings");
        assert!(!format!("{store:?}").contains("hunter2"));
        assert_eq!(redact_url("::"), "[unparseable]");
    }

    #[tokio::test]
    async fn a_timed_out_connection_is_forgotten_only_if_still_current() {
        let lazy = || {
            Conn::Single(
                redis::aio::ConnectionManager::new_lazy_with_config(
                    redis::Client::open("redis://127.0.0.1:1").expect("a valid URL"),
                    redis::aio::ConnectionManagerConfig::new(),
                )
                .expect("a lazy manager does not connect"),
            )
        };
        let mut slot = Slot::default();
        let first = slot.install(lazy()).generation;
        let second = slot.install(lazy()).generation;
        assert_ne!(first, second);

        slot.forget(first);
        assert_eq!(
            slot.current.as_ref().map(|c| c.generation),
            Some(second),
            "a stale timeout leaves the newer connection alone"
        );
        slot.forget(second);
        assert!(slot.current.is_none());
        slot.forget(second);
        assert!(slot.current.is_none());
        assert!(slot.install(lazy()).generation > second);
    }

    #[test]
    fn failures_are_described_without_detail() {
        let server: RedisError = (
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "ERR",
            "wrong number of arguments for 'cis2sb:s:{secret}'".to_string(),
        )
            .into();
        let shown = describe(&server);
        assert!(!shown.contains("secret"), "{shown}");
        let io: RedisError =
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused").into();
        assert_eq!(describe(&io), "connection refused");
        let timeout: RedisError = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow").into();
        assert_eq!(describe(&timeout), "timed out");
    }
}
