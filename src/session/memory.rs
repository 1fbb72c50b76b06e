//! An in-process [`SessionStore`] for dev mode and tests.
//!
//! Expiry (of sessions, token caches and lock leases) is judged against the injected [`Clock`],
//! so a test can move time with `clock::ManualClock` instead of sleeping. Expired entries behave as absent at once; they are
//! removed when next touched, and a sweep every [`SWEEP_EVERY`] writes drops the ones nobody
//! touches again, so memory does not grow without bound.
//!
//! Every operation takes one `std` mutex, does its map work and releases it without awaiting, which
//! is what makes take-once and create-if-absent atomic. State is not shared between processes:
//! this store is for a single replica only.

use super::store::{IndexKind, SessionStore, StoreError, StoredSession};
use super::token::{LoginKey, SessionId};
use crate::clock::Clock;
use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

/// Writes between sweeps of expired entries. Small enough to bound the garbage, large enough that
/// the O(n) sweep is rare.
const SWEEP_EVERY: u32 = 1024;

/// Redis refuses `PX 0`; the memory store rounds the same way so both behave alike.
const MIN_TTL: Duration = Duration::from_millis(1);

pub struct MemoryStore {
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    logins: HashMap<LoginKey, Entry>,
    sessions: HashMap<SessionId, Entry>,
    tokens: HashMap<SessionId, TokenCache>,
    locks: HashMap<(SessionId, String), Lock>,
    /// Index entries, each with its own deadline, as in Redis.
    indexes: HashMap<(IndexKind, String), HashMap<SessionId, SystemTime>>,
    /// One-time markers (logout token `jti`s) and their deadlines.
    once: HashMap<String, SystemTime>,
    writes_since_sweep: u32,
}

/// A session's token cache: like the Redis hash, one expiry for all its fields.
struct TokenCache {
    fields: HashMap<String, Vec<u8>>,
    expires_at: SystemTime,
}

impl TokenCache {
    fn is_live(&self, now: SystemTime) -> bool {
        now < self.expires_at
    }
}

struct Lock {
    owner: String,
    expires_at: SystemTime,
}

impl Lock {
    fn is_live(&self, now: SystemTime) -> bool {
        now < self.expires_at
    }
}

struct Entry {
    value: Vec<u8>,
    expires_at: SystemTime,
}

impl Entry {
    fn new(value: &[u8], now: SystemTime, ttl: Duration) -> Self {
        Entry {
            value: value.to_vec(),
            expires_at: deadline(now, ttl),
        }
    }

    fn is_live(&self, now: SystemTime) -> bool {
        now < self.expires_at
    }

    fn remaining(&self, now: SystemTime) -> Duration {
        self.expires_at
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }
}

/// `now + ttl`, rounded up to [`MIN_TTL`], saturating far in the future instead of overflowing.
fn deadline(now: SystemTime, ttl: Duration) -> SystemTime {
    let ttl = ttl.max(MIN_TTL);
    now.checked_add(ttl).unwrap_or_else(|| far_future(now))
}

fn far_future(now: SystemTime) -> SystemTime {
    // About 136 years: longer than any session, and representable on every platform.
    now.checked_add(Duration::from_secs(u64::from(u32::MAX)))
        .unwrap_or(now)
}

/// The live entry under `key`, dropping it first if it has expired.
fn live_entry<'m, K: Eq + Hash>(
    map: &'m mut HashMap<K, Entry>,
    key: &K,
    now: SystemTime,
) -> Option<&'m mut Entry> {
    if map.get(key).is_some_and(|e| !e.is_live(now)) {
        map.remove(key);
    }
    map.get_mut(key)
}

/// Inserts unless a live entry exists. Returns whether it inserted.
fn insert_if_absent<K: Eq + Hash>(
    map: &mut HashMap<K, Entry>,
    key: K,
    entry: Entry,
    now: SystemTime,
) -> bool {
    match map.entry(key) {
        MapEntry::Occupied(mut slot) => {
            if slot.get().is_live(now) {
                return false;
            }
            slot.insert(entry);
            true
        }
        MapEntry::Vacant(slot) => {
            slot.insert(entry);
            true
        }
    }
}

impl State {
    fn note_write(&mut self, now: SystemTime) {
        self.writes_since_sweep += 1;
        if self.writes_since_sweep >= SWEEP_EVERY {
            self.sweep(now);
        }
    }

    fn sweep(&mut self, now: SystemTime) {
        self.logins.retain(|_, e| e.is_live(now));
        self.sessions.retain(|_, e| e.is_live(now));
        self.tokens.retain(|_, c| c.is_live(now));
        self.locks.retain(|_, l| l.is_live(now));
        self.once.retain(|_, until| now < *until);
        for entries in self.indexes.values_mut() {
            entries.retain(|_, until| now < *until);
        }
        self.indexes.retain(|_, entries| !entries.is_empty());
        self.writes_since_sweep = 0;
    }

    /// The session's live token cache, dropping it first if it has expired.
    fn live_tokens(&mut self, id: &SessionId, now: SystemTime) -> Option<&mut TokenCache> {
        if self.tokens.get(id).is_some_and(|c| !c.is_live(now)) {
            self.tokens.remove(id);
        }
        self.tokens.get_mut(id)
    }

    /// The live lock under `key`, dropping it first if its lease has run out.
    fn live_lock(&mut self, key: &(SessionId, String), now: SystemTime) -> Option<&mut Lock> {
        if self.locks.get(key).is_some_and(|l| !l.is_live(now)) {
            self.locks.remove(key);
        }
        self.locks.get_mut(key)
    }
}

fn lock_key(id: &SessionId, name: &str) -> (SessionId, String) {
    (id.clone(), name.to_owned())
}

impl MemoryStore {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        MemoryStore {
            clock,
            state: Mutex::new(State::default()),
        }
    }

    /// Runs `f` under the lock with the current time. The clock is read before locking so a slow
    /// clock never extends the critical section.
    fn with_state<T>(&self, f: impl FnOnce(&mut State, SystemTime) -> T) -> T {
        let now = self.clock.now();
        let mut guard = self.lock();
        f(&mut guard, now)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Each operation is a single map call that leaves the maps consistent even if it
        // unwinds, so a poisoned lock still guards valid state: keep serving.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryStore")
            .field("pending_logins", &state.logins.len())
            .field("sessions", &state.sessions.len())
            .field("token_caches", &state.tokens.len())
            .field("locks", &state.locks.len())
            .finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl SessionStore for MemoryStore {
    async fn put_pending_login(
        &self,
        key: &LoginKey,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.with_state(|state, now| {
            let inserted = insert_if_absent(
                &mut state.logins,
                key.clone(),
                Entry::new(sealed, now, ttl),
                now,
            );
            state.note_write(now);
            inserted
        }))
    }

    async fn take_pending_login(&self, key: &LoginKey) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.with_state(|state, now| {
            state
                .logins
                .remove(key)
                .filter(|e| e.is_live(now))
                .map(|e| e.value)
        }))
    }

    async fn create_session(
        &self,
        id: &SessionId,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.with_state(|state, now| {
            let inserted = insert_if_absent(
                &mut state.sessions,
                id.clone(),
                Entry::new(sealed, now, ttl),
                now,
            );
            state.note_write(now);
            inserted
        }))
    }

    async fn replace_session(
        &self,
        id: &SessionId,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.with_state(
            |state, now| match live_entry(&mut state.sessions, id, now) {
                Some(entry) => {
                    *entry = Entry::new(sealed, now, ttl);
                    true
                }
                None => false,
            },
        ))
    }

    async fn get_session(&self, id: &SessionId) -> Result<Option<StoredSession>, StoreError> {
        Ok(self.with_state(|state, now| {
            live_entry(&mut state.sessions, id, now).map(|e| StoredSession {
                sealed: e.value.clone(),
                ttl: e.remaining(now),
            })
        }))
    }

    async fn touch_session(&self, id: &SessionId, ttl: Duration) -> Result<bool, StoreError> {
        Ok(self.with_state(|state, now| {
            let Some(entry) = live_entry(&mut state.sessions, id, now) else {
                return false;
            };
            entry.expires_at = deadline(now, ttl);
            if let Some(cache) = state.live_tokens(id, now) {
                cache.expires_at = deadline(now, ttl);
            }
            true
        }))
    }

    async fn delete_session(&self, id: &SessionId) -> Result<bool, StoreError> {
        Ok(self.with_state(|state, now| {
            state.tokens.remove(id);
            state.sessions.remove(id).is_some_and(|e| e.is_live(now))
        }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn get_session_with_tokens(
        &self,
        id: &SessionId,
    ) -> Result<Option<(StoredSession, Vec<(String, Vec<u8>)>)>, StoreError> {
        Ok(self.with_state(|state, now| {
            let session = live_entry(&mut state.sessions, id, now).map(|e| StoredSession {
                sealed: e.value.clone(),
                ttl: e.remaining(now),
            })?;
            let mut fields: Vec<(String, Vec<u8>)> = state
                .live_tokens(id, now)
                .map(|c| {
                    c.fields
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                })
                .unwrap_or_default();
            fields.sort();
            Some((session, fields))
        }))
    }

    async fn put_token(
        &self,
        id: &SessionId,
        field: &str,
        sealed: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.with_state(|state, now| {
            let Some(record) = live_entry(&mut state.sessions, id, now) else {
                return false;
            };
            // As in Redis: the cache lives `ttl`, but never less than its session.
            let expires_at = deadline(now, ttl).max(record.expires_at);
            match state.live_tokens(id, now) {
                Some(cache) => {
                    cache.fields.insert(field.to_owned(), sealed.to_vec());
                    cache.expires_at = expires_at;
                }
                None => {
                    let fields = HashMap::from([(field.to_owned(), sealed.to_vec())]);
                    state
                        .tokens
                        .insert(id.clone(), TokenCache { fields, expires_at });
                }
            }
            state.note_write(now);
            true
        }))
    }

    async fn get_token(&self, id: &SessionId, field: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.with_state(|state, now| {
            state
                .live_tokens(id, now)
                .and_then(|c| c.fields.get(field).cloned())
        }))
    }

    async fn delete_tokens(&self, id: &SessionId) -> Result<(), StoreError> {
        self.with_state(|state, _| state.tokens.remove(id));
        Ok(())
    }

    async fn acquire_lock(
        &self,
        id: &SessionId,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.with_state(|state, now| {
            let key = lock_key(id, name);
            if state.live_lock(&key, now).is_some() {
                return false;
            }
            let lock = Lock {
                owner: owner.to_owned(),
                expires_at: deadline(now, lease),
            };
            state.locks.insert(key, lock);
            state.note_write(now);
            true
        }))
    }

    async fn renew_lock(
        &self,
        id: &SessionId,
        name: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.with_state(
            |state, now| match state.live_lock(&lock_key(id, name), now) {
                Some(lock) if lock.owner == owner => {
                    lock.expires_at = deadline(now, lease);
                    true
                }
                _ => false,
            },
        ))
    }

    async fn release_lock(
        &self,
        id: &SessionId,
        name: &str,
        owner: &str,
    ) -> Result<bool, StoreError> {
        Ok(self.with_state(|state, now| {
            let key = lock_key(id, name);
            let held = state
                .live_lock(&key, now)
                .is_some_and(|lock| lock.owner == owner);
            if held {
                state.locks.remove(&key);
            }
            held
        }))
    }

    async fn lock_held(&self, id: &SessionId, name: &str) -> Result<bool, StoreError> {
        Ok(self.with_state(|state, now| state.live_lock(&lock_key(id, name), now).is_some()))
    }

    async fn index_add(
        &self,
        kind: IndexKind,
        value: &str,
        id: &SessionId,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.with_state(|state, now| {
            let until = deadline(now, ttl);
            let entries = state.indexes.entry((kind, value.to_owned())).or_default();
            let entry = entries.entry(id.clone()).or_insert(until);
            // Never shorten an entry: its session may still need it.
            *entry = (*entry).max(until);
            state.note_write(now);
        });
        Ok(())
    }

    async fn index_remove(
        &self,
        kind: IndexKind,
        value: &str,
        id: &SessionId,
    ) -> Result<(), StoreError> {
        self.with_state(|state, _| {
            let key = (kind, value.to_owned());
            if let Some(entries) = state.indexes.get_mut(&key) {
                entries.remove(id);
                if entries.is_empty() {
                    state.indexes.remove(&key);
                }
            }
        });
        Ok(())
    }

    async fn index_members(
        &self,
        kind: IndexKind,
        value: &str,
    ) -> Result<Vec<SessionId>, StoreError> {
        Ok(self.with_state(|state, now| {
            let key = (kind, value.to_owned());
            let Some(entries) = state.indexes.get_mut(&key) else {
                return Vec::new();
            };
            entries.retain(|_, until| now < *until);
            let ids = entries.keys().cloned().collect();
            if entries.is_empty() {
                state.indexes.remove(&key);
            }
            ids
        }))
    }

    async fn first_use(&self, marker: &str, ttl: Duration) -> Result<bool, StoreError> {
        Ok(self.with_state(|state, now| {
            if state.once.get(marker).is_some_and(|until| now < *until) {
                return false;
            }
            state.once.insert(marker.to_owned(), deadline(now, ttl));
            state.note_write(now);
            true
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::time::UNIX_EPOCH;

    fn start() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    fn store() -> (Arc<ManualClock>, MemoryStore) {
        let clock = Arc::new(ManualClock::new(start()));
        (clock.clone(), MemoryStore::new(clock))
    }

    fn id(n: u8) -> SessionId {
        SessionId::parse(&format!("{n:032x}")).expect("32 lowercase hex digits form a session id")
    }

    #[test]
    fn deadlines_round_up_and_saturate() {
        let now = start();
        let cases = [
            (Duration::ZERO, now + MIN_TTL),
            (Duration::from_nanos(1), now + MIN_TTL),
            (Duration::from_millis(5), now + Duration::from_millis(5)),
            (Duration::MAX, far_future(now)),
        ];
        for (ttl, want) in cases {
            assert_eq!(deadline(now, ttl), want, "ttl {ttl:?}");
        }
    }

    #[test]
    fn entries_are_live_strictly_before_their_deadline() {
        let now = start();
        let e = Entry::new(b"v", now, Duration::from_secs(10));
        assert!(e.is_live(now));
        assert!(e.is_live(now + Duration::from_millis(9_999)));
        assert!(!e.is_live(now + Duration::from_secs(10)));
        assert_eq!(
            e.remaining(now + Duration::from_secs(4)),
            Duration::from_secs(6)
        );
        assert_eq!(e.remaining(now + Duration::from_secs(11)), Duration::ZERO);
    }

    #[tokio::test]
    async fn expired_entries_are_removed_when_touched() {
        let (clock, store) = store();
        assert!(
            store
                .create_session(&id(1), b"a", Duration::from_secs(1))
                .await
                .unwrap()
        );
        clock.advance(Duration::from_secs(2));
        assert!(store.get_session(&id(1)).await.unwrap().is_none());
        assert_eq!(store.lock().sessions.len(), 0);
    }

    #[tokio::test]
    async fn an_expired_id_can_be_created_again() {
        let (clock, store) = store();
        assert!(
            store
                .create_session(&id(1), b"a", Duration::from_secs(1))
                .await
                .unwrap()
        );
        clock.advance(Duration::from_secs(1));
        assert!(
            store
                .create_session(&id(1), b"b", Duration::from_secs(1))
                .await
                .unwrap()
        );
        let got = store
            .get_session(&id(1))
            .await
            .unwrap()
            .expect("just created");
        assert_eq!(got.sealed, b"b");
    }

    #[tokio::test]
    async fn deleting_an_expired_session_reports_it_absent() {
        let (clock, store) = store();
        assert!(
            store
                .create_session(&id(1), b"a", Duration::from_secs(1))
                .await
                .unwrap()
        );
        clock.advance(Duration::from_secs(5));
        assert!(!store.delete_session(&id(1)).await.unwrap());
        assert_eq!(store.lock().sessions.len(), 0);
    }

    #[tokio::test]
    async fn the_sweep_drops_entries_nobody_reads_again() {
        let (clock, store) = store();
        for n in 0..10u8 {
            let key = LoginKey::from_state(&format!("state-{n}"));
            assert!(
                store
                    .put_pending_login(&key, b"p", Duration::from_secs(1))
                    .await
                    .unwrap()
            );
        }
        clock.advance(Duration::from_secs(2));
        let keep = LoginKey::from_state("kept");
        // Ten writes so far; these bring the count to exactly one sweep.
        for _ in 10..SWEEP_EVERY {
            store
                .put_pending_login(&keep, b"k", Duration::from_secs(60))
                .await
                .unwrap();
        }
        let state = store.lock();
        assert_eq!(state.logins.len(), 1, "only the live entry survives");
        assert!(state.logins.contains_key(&keep));
        assert_eq!(state.writes_since_sweep, 0);
    }

    #[test]
    fn debug_shows_counts_not_values() {
        let (_, store) = store();
        let shown = format!("{store:?}");
        assert!(shown.contains("sessions: 0"), "{shown}");
    }
}
