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
            StoreError::Unavailable(cause) => crate::error::BrokerError::StoreUnavailable(cause),
        }
    }
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

    /// Moves an existing session's expiry to `ttl` from now (sliding idle timeout). Returns false
    /// when the session no longer exists; never creates one.
    async fn touch_session(&self, id: &SessionId, ttl: Duration) -> Result<bool, StoreError>;

    /// Deletes a session and everything kept for it. Returns whether it existed.
    async fn delete_session(&self, id: &SessionId) -> Result<bool, StoreError>;

    /// Whether the store answers (readiness).
    async fn ping(&self) -> Result<(), StoreError>;
}
