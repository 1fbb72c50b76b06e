//! The storage contract. Stores hold opaque sealed bytes under keys derived from hashes: they
//! never see a token, a session token or a clear-text session. One contract test suite
//! (`tests/store_contract.rs`) runs against every implementation.
//!
//! TTLs are relative durations computed by the broker, so clock skew between broker replicas and
//! Redis does not move expiries.

use super::token::{LoginKey, SessionId};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer, answered with an error, or timed out: safe to retry.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
}

impl From<StoreError> for crate::error::BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(cause) => {
                crate::metrics::redis_error();
                crate::error::BrokerError::StoreUnavailable(cause)
            }
        }
    }
}

/// The indexes that find sessions by something other than their id: back-channel logout finds
/// them by CIS2 `sid`, the admin RPCs by user. Stores key them by a hash of the value, so no key
/// names a user or a CIS2 session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IndexKind {
    /// CIS2's session id (`sid`) -> the broker sessions it signed in.
    Cis2Sid,
    /// The CIS2 user id (`sub`/`uid`) -> that user's broker sessions.
    User,
}

impl IndexKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IndexKind::Cis2Sid => "sid",
            IndexKind::User => "uid",
        }
    }
}

/// The hex SHA-256 of `kind:value`: what stores key an index or a one-time marker by.
pub fn hashed(kind: &str, value: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(kind.as_bytes())
        .chain_update(b":")
        .chain_update(value.as_bytes())
        .finalize();
    crate::hex::encode(&digest)
}

/// A session as read from the store: its sealed record and how long until it expires (the idle
/// deadline, never later than the absolute one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub sealed: Vec<u8>,
    pub ttl: Duration,
}

#[async_trait::async_trait]
pub trait SessionStore: Send + Sync + 'static {
    /// Stores a pending sign-in. Returns false (and changes nothing) if the key already exists.
    async fn put_pending_login(
        &self,
        key: &LoginKey,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Removes and returns a pending sign-in, atomically: of any number of concurrent callers on
    /// any number of replicas, exactly one gets `Some`.
    async fn take_pending_login(&self, key: &LoginKey) -> Result<Option<Vec<u8>>, StoreError>;

    /// Creates a session that expires after `ttl`. Returns false (and changes nothing) if the id
    /// is taken.
    async fn create_session(
        &self,
        id: &SessionId,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Replaces an existing session's record and TTL. Returns false (and creates nothing) when the
    /// session no longer exists, so a session revoked meanwhile is never brought back.
    async fn replace_session(
        &self,
        id: &SessionId,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// Reads a session in one round trip. `None` when unknown or expired.
    async fn get_session(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError>;

    /// Moves an existing session's expiry, and its token cache's, to `ttl` from now (sliding idle
    /// timeout). Returns false when the session no longer exists; never creates one.
    async fn touch_session(&self, id: &SessionId, ttl: Duration) -> Result<bool, StoreError>;

    /// Deletes a session and everything kept for it. Returns whether it existed.
    async fn delete_session(&self, id: &SessionId) -> Result<bool, StoreError>;

    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;

    // ---- the session's API token cache --------------------------------------------------------
    //
    // A hash of sealed values per session, read together with the session record so that a
    // cache hit costs no more round trips than reading the session alone. It is deleted with the
    // session and never outlives the record by being written after it is gone.

    /// Reads a session and every field of its token cache in one round trip, so both describe
    /// the same moment. `None` when the session is unknown or expired (whatever the cache holds).
    async fn get_session_with_tokens(
        &self,
        id: &SessionId,
    ) -> Result<Option<(StoredSession, Vec<(String, Vec<u8>)>)>, StoreError>;

    /// Sets one field of the session's token cache, atomically and only if the session record
    /// still exists: returns false (and writes nothing) otherwise, so a revoked session never
    /// regains tokens. The cache then lives at least `ttl`, and never less than the record.
    async fn put_token(
        &self,
        id: &SessionId,
        field: &str,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError>;

    /// One field of the session's token cache.
    async fn get_token(&self, id: &SessionId, field: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Drops the session's whole token cache (step-up, back-channel logout); the session stays.
    async fn delete_tokens(&self, id: &SessionId) -> Result<(), StoreError>;

    // ---- per-session locks --------------------------------------------------------------------
    //
    // A lease-based lock shared by every replica, so that one of them fetches a session's token
    // while the others wait. `owner` is a random value the holder chose: only it renews or
    // releases the lock, so a holder whose lease ran out cannot release its successor's.

    /// Takes the lock `name` of the session for `lease`. False when someone holds it.
    async fn acquire_lock(
        &self,
        id: &SessionId,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError>;

    /// Extends the lease to `lease` from now if `owner` still holds the lock. False when it does
    /// not (the lease ran out, and perhaps someone else holds it now).
    async fn renew_lock(
        &self,
        id: &SessionId,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError>;

    /// Releases the lock if `owner` holds it. Returns whether it did.
    async fn release_lock(
        &self,
        id: &SessionId,
        name: &str,
        owner: &str,
    ) -> Result<bool, StoreError>;

    /// Whether anyone holds the lock: lets a waiter notice that a holder gave up.
    async fn lock_held(&self, id: &SessionId, name: &str) -> Result<bool, StoreError>;

    // ---- indexes ------------------------------------------------------------------------------
    //
    // Index entries live in other keys (in Redis Cluster, other slots) than their session, so
    // they cannot be written in one transaction with it. They are therefore only hints: each
    // entry carries its own deadline (never before its session's absolute end), expired entries
    // are pruned on read, and the caller treats an entry whose session is gone as absent. The
    // defaults suit test doubles that keep no indexes: writes do nothing and reads fail closed.

    /// Adds `id` to the index `kind`/`value`, for at least `ttl` (pass the session's absolute
    /// end, so sliding its idle deadline never outlives the entry).
    async fn index_add(
        &self,
        kind: IndexKind,
        value: &str,
        id: &SessionId,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let _ = (kind, value, id, ttl);
        Ok(())
    }

    /// Removes `id` from the index `kind`/`value`; removing an absent entry is not an error.
    async fn index_remove(
        &self,
        kind: IndexKind,
        value: &str,
        id: &SessionId,
    ) -> Result<(), StoreError> {
        let _ = (kind, value, id);
        Ok(())
    }

    /// The session ids under `kind`/`value` whose entries have not expired, in no set order.
    /// Their sessions may be gone: callers check.
    async fn index_members(
        &self,
        kind: IndexKind,
        value: &str,
    ) -> Result<Vec<SessionId>, StoreError> {
        let _ = (kind, value);
        Err(StoreError::Unavailable(
            "this store keeps no session indexes".into(),
        ))
    }

    /// Records `marker` (e.g. a hash of a logout token's `jti`) for `ttl`. True the first time,
    /// false while it is remembered: one replica of any number wins.
    async fn first_use(&self, marker: &str, ttl: Duration) -> Result<bool, StoreError> {
        let _ = (marker, ttl);
        Err(StoreError::Unavailable(
            "this store cannot remember one-time values".into(),
        ))
    }
}
