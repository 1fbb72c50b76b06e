//! The per-session APIM token cache, with single flight across replicas.
//!
//! Tokens live sealed (AEAD, bound to the session id and field) in the session's token cache,
//! one field per AAL and session generation (`aal2:g0`): a step-up bumps the generation, so a
//! token minted at the lower level is never handed out again.
//!
//! When the cached token runs low, exactly one caller fetches a new one, whatever replica it is
//! on: it takes a lease lock in the store (renewed while APIM answers), re-reads the cache
//! (another replica may just have stored a token, and its refresh token is the only one still
//! good), calls APIM once, stores, and releases. Everyone else polls the cache and takes the
//! token the holder stores. Refresh tokens are single-use, so the refresh token used is always
//! the one re-read under the lock, never one read before it.

use super::client::{ApimClient, ApimError, TokenGrant};
use super::grant::{CachedGrant, usable_until};
use crate::aal::Aal;
use crate::clock::Clock;
use crate::error::{BrokerError, Result};
use crate::secret::Secret;
use crate::session::codec::IdToken;
use crate::session::token::random_urlsafe;
use crate::session::{KeyRing, SessionId, SessionStore};
use crate::telemetry::call;
use opentelemetry::context::FutureExt as _;
use rand::RngExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{Instrument, info, instrument, warn};

/// Waiters poll the cache every 10-40 ms: quick to notice the token, light on the store.
const POLL_MIN_MS: u64 = 10;
const POLL_MAX_MS: u64 = 40;
/// Random bytes of a lock owner: enough that two holders never share one.
const OWNER_BYTES: usize = 18;

/// The session a token is for, as read with its token cache (`get_session_with_tokens`).
#[derive(Debug, Clone, Copy)]
pub struct TokenSubject<'a> {
    pub session_id: &'a SessionId,
    pub aal: Aal,
    pub generation: u32,
    /// The CIS2 ID token (separate pattern); `None` in the combined pattern.
    pub id_token: Option<&'a IdToken>,
    /// When the ID token expires (Unix seconds).
    pub id_token_expires_at: Option<i64>,
    /// The session's remaining TTL: the token cache lives at least this long.
    pub ttl: Duration,
}

/// An access token to hand to the caller. `Debug` shows no token.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub access_token: Secret<String>,
    pub token_type: String,
    pub expires_at: SystemTime,
}

/// The cache field of the tokens for one AAL and session generation.
pub fn token_field(aal: Aal, generation: u32) -> String {
    format!("aal{}:g{generation}", aal.level())
}

pub struct TokenService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn SessionStore>,
    keys: Arc<KeyRing>,
    client: ApimClient,
    clock: Arc<dyn Clock>,
    lock_lease: Duration,
}

impl std::fmt::Debug for TokenService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenService")
            .field("client", &self.inner.client)
            .field("lock_lease", &self.inner.lock_lease)
            .finish_non_exhaustive()
    }
}

/// One request for a token, owned, so the fetch can outlive a caller that goes away.
struct Job {
    session_id: SessionId,
    field: String,
    id_token: Option<Secret<String>>,
    id_token_expires_at: Option<i64>,
    ttl: Duration,
    min_validity: Duration,
    /// The access token the caller saw in the cache, if any: any other unexpired one was stored
    /// since, and is accepted.
    seen: Option<Secret<String>>,
}

impl Job {
    /// Whether `grant`, found in the cache, answers this request.
    fn accepts(&self, grant: &CachedGrant, now: SystemTime) -> bool {
        if grant.valid_for(now) > self.min_validity {
            return true;
        }
        let newer = self
            .seen
            .as_ref()
            .is_none_or(|seen| seen.expose() != grant.access_token());
        newer && grant.valid_for(now) > Duration::ZERO
    }

    /// The ID token, if APIM would still accept it.
    fn exchangeable_id_token(&self, now: SystemTime) -> Option<&str> {
        let expires_at = crate::clock::from_unix_seconds(self.id_token_expires_at?);
        if !usable_until(expires_at, now) {
            return None;
        }
        self.id_token.as_ref().map(|t| t.expose().as_str())
    }
}

/// How to get a new token, with what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan<'a> {
    /// Redeem this refresh token; exchange the ID token (if any) should APIM refuse it.
    Refresh {
        refresh_token: &'a str,
        id_token: Option<&'a str>,
    },
    Exchange {
        id_token: &'a str,
    },
    SignInAgain,
}

/// Refresh when a live refresh token can be redeemed; else exchange a live ID token; else the
/// user must sign in again.
fn plan<'a>(
    refresh_token: Option<&'a str>,
    can_refresh: bool,
    id_token: Option<&'a str>,
) -> Plan<'a> {
    match (refresh_token.filter(|_| can_refresh), id_token) {
        (Some(refresh_token), id_token) => Plan::Refresh {
            refresh_token,
            id_token,
        },
        (None, Some(id_token)) => Plan::Exchange { id_token },
        (None, None) => Plan::SignInAgain,
    }
}

/// The associated data of a sealed token: a value copied to another session or field won't open.
fn token_aad(id: &SessionId, field: &str) -> Vec<u8> {
    // Every cached GetPdsToken builds one: a concatenation, not the formatting machinery.
    [
        &b"apim-token|"[..],
        id.as_str().as_bytes(),
        b"|",
        field.as_bytes(),
    ]
    .concat()
}

fn new_owner() -> String {
    random_urlsafe(OWNER_BYTES)
}

fn poll_pause() -> Duration {
    Duration::from_millis(rand::rng().random_range(POLL_MIN_MS..=POLL_MAX_MS))
}

impl TokenService {
    pub fn new(
        store: Arc<dyn SessionStore>,
        keys: Arc<KeyRing>,
        client: ApimClient,
        clock: Arc<dyn Clock>,
        lock_lease: Duration,
    ) -> Self {
        TokenService {
            inner: Arc::new(Inner {
                store,
                keys,
                client,
                clock,
                // A zero lease would expire before it could be renewed.
                lock_lease: lock_lease.max(Duration::from_millis(30)),
            }),
        }
    }

    pub fn client(&self) -> &ApimClient {
        &self.inner.client
    }

    /// An access token with more than `min_validity` left, from the cache when it has one.
    /// `cached` are the fields read with the session (`get_session_with_tokens`). A token
    /// fetched just now is returned even if its whole lifetime is shorter than `min_validity`.
    pub async fn access_token(
        &self,
        s: &TokenSubject<'_>,
        cached: &[(String, Vec<u8>)],
        min_validity: Duration,
    ) -> Result<IssuedToken> {
        let field = token_field(s.aal, s.generation);
        let seen = cached
            .iter()
            .find(|(name, _)| *name == field)
            .and_then(|(_, sealed)| self.inner.open(s.session_id, &field, sealed));
        let now = self.inner.clock.now();
        let seen = match seen {
            Some(grant) if grant.valid_for(now) > min_validity => {
                crate::metrics::token_cache(true);
                return Ok(grant.into_issued());
            }
            other => other,
        };
        crate::metrics::token_cache(false);
        let job = Arc::new(Job {
            session_id: s.session_id.clone(),
            field,
            id_token: s.id_token.map(|t| Secret::new(t.text())),
            id_token_expires_at: s.id_token_expires_at,
            ttl: s.ttl,
            min_validity,
            seen: seen.map(|g| Secret::new(g.access_token().to_owned())),
        });
        // A cache hit opens no span (it is the hot path); a fetch does.
        let span = tracing::info_span!(
            "apim.access_token",
            session_id = %s.session_id,
            aal = %s.aal,
            generation = s.generation,
        );
        Inner::single_flight(&self.inner, job)
            .instrument(span)
            .await
    }

    /// Caches tokens obtained elsewhere (the combined pattern's code exchange). Fails with
    /// `SessionInvalid` when the session no longer exists.
    #[instrument(skip_all, fields(session_id = %s.session_id, aal = %s.aal, generation = s.generation))]
    pub async fn store_grant(&self, s: &TokenSubject<'_>, grant: TokenGrant) -> Result<()> {
        let field = token_field(s.aal, s.generation);
        self.inner
            .put(
                s.session_id,
                &field,
                &CachedGrant::from_grant(&grant),
                s.ttl,
            )
            .await
    }

    /// Forgets every token of the session (step-up, back-channel logout).
    pub async fn drop_tokens(&self, id: &SessionId) -> Result<()> {
        Ok(self.inner.store.delete_tokens(id).await?)
    }
}

impl Inner {
    async fn single_flight(this: &Arc<Self>, job: Arc<Job>) -> Result<IssuedToken> {
        let owner = new_owner();
        if this
            .store
            .acquire_lock(&job.session_id, &job.field, &owner, this.lock_lease)
            .await?
        {
            return Self::hold(this, job, owner).await;
        }
        Self::wait(this, job).await
    }

    /// Runs the fetch as its own task: if the caller goes away mid-call, the token APIM issues
    /// is still stored (a refresh has already consumed the old refresh token) and the lock is
    /// still released.
    async fn hold(this: &Arc<Self>, job: Arc<Job>, owner: String) -> Result<IssuedToken> {
        let inner = Arc::clone(this);
        let task = tokio::spawn(call::carry(
            async move {
            let renewal = inner.keep_lock(&job, &owner);
            let outcome = inner.fetch_and_store(&job).await;
            drop(renewal);
            match inner
                .store
                .release_lock(&job.session_id, &job.field, &owner)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    warn!(session_id = %job.session_id, "the token lock had expired before release")
                }
                // The lease ends it anyway.
                Err(error) => {
                    warn!(session_id = %job.session_id, %error, "could not release the token lock")
                }
            }
            outcome
        }
            // The fetch stays in the caller's trace (the span's, or when spans are not
            // exported, the caller's context), and its log lines name the call's caller.
            .instrument(tracing::Span::current())
            .with_current_context(),
        ));
        task.await
            .map_err(|e| BrokerError::Internal(format!("the token fetch task failed: {e}")))?
    }

    /// Renews the lease every third of it until dropped.
    fn keep_lock(self: &Arc<Self>, job: &Arc<Job>, owner: &str) -> AbortOnDrop {
        let (inner, job, owner) = (Arc::clone(self), Arc::clone(job), owner.to_owned());
        let period = (self.lock_lease / 3).max(Duration::from_millis(10));
        AbortOnDrop(tokio::spawn(call::carry(async move {
            loop {
                tokio::time::sleep(period).await;
                match inner
                    .store
                    .renew_lock(&job.session_id, &job.field, &owner, inner.lock_lease)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        warn!(session_id = %job.session_id, "lost the token lock while APIM was answering");
                        return;
                    }
                    // Keep trying: the lease may still outlast a short store hiccup.
                    Err(error) => {
                        warn!(session_id = %job.session_id, %error, "could not renew the token lock")
                    }
                }
            }
        })))
    }

    /// Under the lock: re-read, then refresh or exchange, store, and return.
    async fn fetch_and_store(&self, job: &Job) -> Result<IssuedToken> {
        let latest = self.read(job).await?;
        let now = self.clock.now();
        let latest = match latest {
            Some(grant) if job.accepts(&grant, now) => return Ok(grant.into_issued()),
            other => other,
        };
        let refresh_token = latest.as_ref().and_then(|g| g.usable_refresh_token(now));
        let id_token = job.exchangeable_id_token(now);
        let grant = match plan(refresh_token, self.client.can_refresh(), id_token) {
            Plan::Refresh {
                refresh_token,
                id_token,
            } => match self.client.refresh(refresh_token).await {
                Ok(grant) => grant,
                Err(ApimError::InvalidGrant) => {
                    warn!(session_id = %job.session_id, "APIM refused the refresh token");
                    match id_token {
                        Some(id_token) => self.client.exchange_id_token(id_token).await?,
                        None => {
                            if let Some(dead) = latest {
                                self.forget_refresh_token(job, dead).await;
                            }
                            return Err(BrokerError::SessionInvalid);
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            },
            Plan::Exchange { id_token } => self.client.exchange_id_token(id_token).await?,
            Plan::SignInAgain => {
                info!(session_id = %job.session_id, "no live refresh token or ID token: sign-in needed");
                return Err(BrokerError::SessionInvalid);
            }
        };
        let cached = CachedGrant::from_grant(&grant);
        self.put(&job.session_id, &job.field, &cached, job.ttl)
            .await?;
        Ok(cached.into_issued())
    }

    /// Keeps the access token but drops a refresh token APIM refused, so later calls don't
    /// offer it again. Best effort: failing leaves one more refused refresh to come.
    async fn forget_refresh_token(&self, job: &Job, grant: CachedGrant) {
        let grant = grant.without_refresh_token();
        if let Err(error) = self.put(&job.session_id, &job.field, &grant, job.ttl).await {
            warn!(session_id = %job.session_id, %error, "could not drop a refused refresh token");
        }
    }

    /// Not holding the lock: wait for the holder's token. If the lock vanishes with no new
    /// token (the holder failed), try once to take over; give up after `http_timeout + lease`.
    async fn wait(this: &Arc<Self>, job: Arc<Job>) -> Result<IssuedToken> {
        let deadline = tokio::time::Instant::now() + this.client.http_timeout() + this.lock_lease;
        let mut took_over_once = false;
        loop {
            if tokio::time::Instant::now() >= deadline {
                return this.give_up(&job, "timed out").await;
            }
            tokio::time::sleep(poll_pause()).await;
            if let Some(token) = this.fresh(&job).await? {
                return Ok(token);
            }
            if this.store.lock_held(&job.session_id, &job.field).await? {
                continue;
            }
            // The holder may have stored and released between the two reads.
            if let Some(token) = this.fresh(&job).await? {
                return Ok(token);
            }
            if took_over_once {
                return this.give_up(&job, "failed").await;
            }
            took_over_once = true;
            let owner = new_owner();
            if this
                .store
                .acquire_lock(&job.session_id, &job.field, &owner, this.lock_lease)
                .await?
            {
                return Self::hold(this, job, owner).await;
            }
        }
    }

    /// A waiter's last word: sign in again if nothing could fetch a token, else unavailable.
    async fn give_up(&self, job: &Job, what: &str) -> Result<IssuedToken> {
        let latest = self.read(job).await?;
        let now = self.clock.now();
        let can_fetch = plan(
            latest.as_ref().and_then(|g| g.usable_refresh_token(now)),
            self.client.can_refresh(),
            job.exchangeable_id_token(now),
        ) != Plan::SignInAgain;
        if !can_fetch {
            return Err(BrokerError::SessionInvalid);
        }
        warn!(session_id = %job.session_id, "gave up waiting for another caller's APIM token");
        Err(BrokerError::ApimUnavailable(format!(
            "the caller fetching this session's APIM token {what}"
        )))
    }

    async fn fresh(&self, job: &Job) -> Result<Option<IssuedToken>> {
        let now = self.clock.now();
        Ok(self
            .read(job)
            .await?
            .filter(|g| job.accepts(g, now))
            .map(CachedGrant::into_issued))
    }

    async fn read(&self, job: &Job) -> Result<Option<CachedGrant>> {
        Ok(self
            .store
            .get_token(&job.session_id, &job.field)
            .await?
            .and_then(|sealed| self.open(&job.session_id, &job.field, &sealed)))
    }

    /// A cached grant, or `None` when it no longer opens (its key left the ring, or tampering):
    /// then it is as good as absent.
    fn open(&self, id: &SessionId, field: &str, sealed: &[u8]) -> Option<CachedGrant> {
        match CachedGrant::open(&self.keys, sealed, &token_aad(id, field)) {
            Ok(grant) => Some(grant),
            Err(error) => {
                warn!(session_id = %id, field, %error, "a cached APIM token could not be opened");
                None
            }
        }
    }

    async fn put(
        &self,
        id: &SessionId,
        field: &str,
        grant: &CachedGrant,
        ttl: Duration,
    ) -> Result<()> {
        let sealed = grant
            .seal(&self.keys, &token_aad(id, field))
            .map_err(|e| BrokerError::Internal(format!("sealing an APIM token: {e}")))?;
        if !self.store.put_token(id, field, &sealed, ttl).await? {
            // Revoked or expired meanwhile: the token is dropped with it.
            info!(session_id = %id, "session ended while its APIM token was fetched");
            return Err(BrokerError::SessionInvalid);
        }
        Ok(())
    }
}

/// A background task that stops when its owner drops it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apim::grant::tests::{grant, t0};

    fn job(seen: Option<&str>, min_validity: Duration) -> Job {
        Job {
            session_id: SessionId::parse(&"a".repeat(32)).expect("32 hex digits"),
            field: token_field(Aal::Aal2, 0),
            id_token: Some(Secret::new("idt".into())),
            id_token_expires_at: Some(crate::clock::unix_seconds(t0()) + 60),
            ttl: Duration::from_secs(60),
            min_validity,
            seen: seen.map(|s| Secret::new(s.into())),
        }
    }

    #[test]
    fn fields_name_the_level_and_generation() {
        assert_eq!(token_field(Aal::Aal2, 0), "aal2:g0");
        assert_eq!(token_field(Aal::Aal3, 7), "aal3:g7");
    }

    #[test]
    fn the_associated_data_is_pinned() {
        // Grants cached by earlier versions were sealed with this text: it must not change.
        let id = SessionId::parse(&"ab".repeat(16)).expect("32 hex digits");
        assert_eq!(
            token_aad(&id, "aal2:g0"),
            format!("apim-token|{}|aal2:g0", "ab".repeat(16)).into_bytes()
        );
    }

    #[test]
    fn plans_prefer_refresh_then_exchange() {
        let (rt, idt) = (Some("rt"), Some("idt"));
        let refresh = |id_token| Plan::Refresh {
            refresh_token: "rt",
            id_token,
        };
        let exchange = Plan::Exchange { id_token: "idt" };
        let cases = [
            ((rt, true, idt), refresh(idt)),
            ((rt, true, None), refresh(None)),
            // Without the client secret APIM will not redeem a refresh token.
            ((rt, false, idt), exchange),
            ((None, true, idt), exchange),
            ((None, false, idt), exchange),
            ((rt, false, None), Plan::SignInAgain),
            ((None, true, None), Plan::SignInAgain),
            ((None, false, None), Plan::SignInAgain),
        ];
        for ((refresh_token, can, id_token), want) in cases {
            assert_eq!(
                plan(refresh_token, can, id_token),
                want,
                "{refresh_token:?} {can} {id_token:?}"
            );
        }
    }

    #[test]
    fn a_token_is_accepted_when_long_lived_or_newly_stored() {
        let min = Duration::from_secs(60);
        let cases = [
            // (seen by the caller, found in the cache, left, accepted)
            (None, "a", 120, true),
            (None, "a", 30, true),
            (None, "a", 0, false),
            (Some("a"), "a", 120, true),
            (Some("a"), "a", 30, false),
            (Some("a"), "b", 30, true),
            (Some("a"), "b", 0, false),
        ];
        for (seen, found, left, want) in cases {
            let g = grant(found, Duration::from_secs(left));
            assert_eq!(
                job(seen, min).accepts(&g, t0()),
                want,
                "{seen:?} {found} {left}"
            );
        }
    }

    #[test]
    fn expiring_id_tokens_are_not_offered() {
        let mut j = job(None, Duration::ZERO);
        assert_eq!(j.exchangeable_id_token(t0()), Some("idt"));
        j.id_token_expires_at = Some(crate::clock::unix_seconds(t0()) + 5);
        assert_eq!(j.exchangeable_id_token(t0()), None);
        j.id_token_expires_at = None;
        assert_eq!(j.exchangeable_id_token(t0()), None);
        j.id_token_expires_at = Some(crate::clock::unix_seconds(t0()) + 60);
        j.id_token = None;
        assert_eq!(j.exchangeable_id_token(t0()), None);
    }
}
