//! Per-caller request limits: a token bucket for the request rate and another for sign-ins
//! started (`StartLogin`), each caller with its own pair.
//!
//! Buckets live in this replica's memory: with N replicas behind a load balancer a caller may
//! make up to N times its configured rate across the cluster. That is deliberate: a limit shared
//! through Redis would put a Redis round trip on every call, and these limits exist to stop a
//! runaway caller from starving the others, not to meter exact quotas.

use crate::clock::Clock;
use crate::error::BrokerError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// How many requests a caller may make, burst included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sustained requests per second; bursts of twice this are allowed.
    pub rate_per_second: u32,
    /// `StartLogin` calls per minute (each one stores a pending sign-in).
    pub logins_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            rate_per_second: 200,
            logins_per_minute: 600,
        }
    }
}

/// A token bucket: holds up to `capacity` tokens and gains `refill` tokens every `period`; each
/// request takes one. Counted in whole units (one token = `period` in nanoseconds) so no
/// rounding ever lets a request through early or refuses one late.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Units gained per nanosecond.
    refill: u128,
    /// Units one token costs.
    cost: u128,
    capacity: u128,
    level: u128,
    last: Option<SystemTime>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(refill: u64, period: Duration, capacity: u64) -> Self {
        let cost = period.as_nanos().max(1);
        TokenBucket {
            refill: u128::from(refill),
            cost,
            capacity: u128::from(capacity) * cost,
            level: u128::from(capacity) * cost,
            last: None,
        }
    }

    /// Takes one token at `now`, or says how long until one is there.
    pub fn try_take(&mut self, now: SystemTime) -> Result<(), Duration> {
        // A clock that steps backwards (NTP) refills nothing rather than failing.
        let elapsed = self
            .last
            .and_then(|last| now.duration_since(last).ok())
            .unwrap_or(Duration::ZERO);
        if self.last.is_none_or(|last| now > last) {
            self.last = Some(now);
        }
        self.level = self
            .level
            .saturating_add(elapsed.as_nanos().saturating_mul(self.refill))
            .min(self.capacity);
        if self.level >= self.cost {
            self.level -= self.cost;
            return Ok(());
        }
        Err(wait_for(self.cost - self.level, self.refill))
    }
}

/// How long refilling `missing` units takes, rounded up to the millisecond so a client that
/// waits exactly that long finds a token.
fn wait_for(missing: u128, refill_per_nano: u128) -> Duration {
    if refill_per_nano == 0 {
        return Duration::from_secs(60);
    }
    let nanos = missing.div_ceil(refill_per_nano);
    let millis = nanos.div_ceil(1_000_000).max(1);
    Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}

const SECOND: Duration = Duration::from_secs(1);
const MINUTE: Duration = Duration::from_secs(60);

/// One caller's buckets.
pub struct CallerLimits {
    requests: Mutex<TokenBucket>,
    logins: Mutex<TokenBucket>,
    clock: Arc<dyn Clock>,
}

impl CallerLimits {
    pub fn new(limits: Limits, clock: Arc<dyn Clock>) -> Self {
        let rate = u64::from(limits.rate_per_second);
        let logins = u64::from(limits.logins_per_minute);
        CallerLimits {
            requests: Mutex::new(TokenBucket::new(rate, SECOND, 2 * rate)),
            logins: Mutex::new(TokenBucket::new(logins, MINUTE, logins)),
            clock,
        }
    }

    /// Counts one call of `rpc`; refuses it with a retry hint when over a limit.
    pub fn check(&self, rpc: &str) -> Result<(), BrokerError> {
        let now = self.clock.now();
        take(&self.requests, now)?;
        if rpc == "StartLogin" {
            take(&self.logins, now)?;
        }
        Ok(())
    }
}

fn take(bucket: &Mutex<TokenBucket>, now: SystemTime) -> Result<(), BrokerError> {
    bucket
        .lock()
        .expect("bucket mutex is never poisoned: nothing under it panics")
        .try_take(now)
        .map_err(|retry_after| BrokerError::RateLimited { retry_after })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::time::UNIX_EPOCH;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_millis(ms)
    }

    #[test]
    fn a_bucket_allows_its_burst_then_says_when_to_come_back() {
        let mut b = TokenBucket::new(10, SECOND, 20);
        for i in 0..20 {
            assert_eq!(b.try_take(at(0)), Ok(()), "request {i} of the burst");
        }
        assert_eq!(b.try_take(at(0)), Err(Duration::from_millis(100)));
        // 50 ms refills half a token: still refused, and the hint shrinks.
        assert_eq!(b.try_take(at(50)), Err(Duration::from_millis(50)));
        assert_eq!(b.try_take(at(100)), Ok(()));
        assert!(b.try_take(at(100)).is_err());
    }

    #[test]
    fn a_bucket_refills_to_its_capacity_and_no_further() {
        let mut b = TokenBucket::new(10, SECOND, 20);
        for _ in 0..20 {
            b.try_take(at(0)).expect("burst");
        }
        let later = at(3_600_000);
        for i in 0..20 {
            assert_eq!(b.try_take(later), Ok(()), "request {i} after an hour idle");
        }
        assert!(b.try_take(later).is_err(), "capacity caps the refill");
    }

    #[test]
    fn a_clock_stepping_back_refills_nothing() {
        let mut b = TokenBucket::new(1, SECOND, 1);
        b.try_take(at(10_000)).expect("first");
        assert!(b.try_take(at(0)).is_err());
        // Time measured from the latest instant seen, not the stepped-back one.
        assert!(b.try_take(at(10_500)).is_err());
        assert_eq!(b.try_take(at(11_000)), Ok(()));
    }

    #[test]
    fn retry_hints_round_up_and_are_never_zero() {
        // (refill per period, period, tokens held, wait in ms)
        for (refill, period, held, want_ms) in [
            (200, SECOND, 0, 5),
            (3, SECOND, 0, 334),
            (10, MINUTE, 0, 6000),
        ] {
            let mut b = TokenBucket::new(refill, period, held);
            assert_eq!(
                b.try_take(at(0)),
                Err(Duration::from_millis(want_ms)),
                "{refill} per {period:?}"
            );
        }
        let mut b = TokenBucket::new(10, SECOND, 1);
        b.try_take(at(0)).expect("full");
        assert_eq!(
            b.try_take(at(99)),
            Err(Duration::from_millis(1)),
            "a hint is never zero"
        );
        let mut never = TokenBucket::new(0, SECOND, 0);
        assert_eq!(never.try_take(at(0)), Err(Duration::from_secs(60)));
    }

    #[test]
    fn sign_ins_have_their_own_bound_under_the_request_rate() {
        let clock = Arc::new(ManualClock::new(at(0)));
        let limits = CallerLimits::new(
            Limits {
                rate_per_second: 100,
                logins_per_minute: 3,
            },
            clock.clone(),
        );
        for _ in 0..3 {
            limits.check("StartLogin").expect("within the login bound");
        }
        let Err(BrokerError::RateLimited { retry_after }) = limits.check("StartLogin") else {
            panic!("the fourth sign-in in a minute is refused");
        };
        assert_eq!(retry_after, Duration::from_secs(20));
        limits
            .check("GetCurrentAal")
            .expect("other RPCs are not bound by the login limit");
        clock.advance(Duration::from_secs(20));
        limits.check("StartLogin").expect("one login token back");
    }

    #[test]
    fn the_request_rate_covers_every_rpc_with_a_burst_of_twice_the_rate() {
        let clock = Arc::new(ManualClock::new(at(0)));
        let limits = CallerLimits::new(
            Limits {
                rate_per_second: 2,
                logins_per_minute: 600,
            },
            clock.clone(),
        );
        for rpc in ["GetSession", "CheckAccess", "StartLogin", "Logout"] {
            limits.check(rpc).expect("within the burst of 4");
        }
        let Err(BrokerError::RateLimited { retry_after }) = limits.check("GetSession") else {
            panic!("the fifth request is refused");
        };
        assert_eq!(retry_after, Duration::from_millis(500));
        clock.advance(Duration::from_millis(500));
        limits.check("GetSession").expect("refilled");
    }
}
