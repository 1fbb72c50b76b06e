//! Fault knobs: ways to make the simulator misbehave the way a broken or hostile provider would,
//! so tests can prove the client fails closed. Faults are sticky until cleared; several may be
//! set at once and they combine.

use std::sync::Mutex;
use std::time::Duration;

/// One way to misbehave. ID token faults change every ID token issued while set; endpoint faults
/// change the endpoint's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Signed by another key, under the published kid.
    BadSignature,
    /// `iss` is not the issuer from discovery.
    WrongIssuer,
    /// `aud` is some other client.
    WrongAudience,
    /// `nonce` is not the one the client sent.
    WrongNonce,
    /// `exp` (and `iat`) lie in the past.
    Expired,
    /// An unsigned token: header `"alg":"none"` and an empty signature.
    AlgNone,
    /// Signed under a kid that the JWKS does not publish.
    UnknownKid,
    /// No `authentication_assurance_level` claim.
    AalMissing,
    /// `authentication_assurance_level` is `"1"`.
    AalTooLow,
    /// Not a fault: `authentication_assurance_level` as an integer, as some NHS fixtures have it.
    /// Clients must accept it.
    AalAsInteger,
    /// `auth_time` an hour ago although the user just signed in.
    StaleAuthTime,
    /// `/userinfo` answers with another user's `sub`.
    UserinfoWrongSub,
    /// `/access_token` answers 500.
    TokenServerError,
    /// Discovery answers 503.
    DiscoveryDown,
    /// The JWKS answers 503.
    JwksDown,
    /// Every response is delayed by this long.
    Slow(Duration),
}

/// The set of faults in force. Setting `Slow` replaces any earlier `Slow`.
#[derive(Debug, Default)]
pub(crate) struct Faults(Mutex<Vec<Fault>>);

impl Faults {
    pub(crate) fn set(&self, fault: Fault) {
        let mut faults = self.lock();
        faults.retain(|f| !same_kind(f, &fault));
        faults.push(fault);
    }

    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    pub(crate) fn has(&self, fault: Fault) -> bool {
        self.lock().contains(&fault)
    }

    pub(crate) fn delay(&self) -> Option<Duration> {
        self.lock().iter().find_map(|f| match f {
            Fault::Slow(d) => Some(*d),
            _ => None,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Fault>> {
        // A poisoned lock only means a panic elsewhere mid-update of a plain Vec: still usable.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn same_kind(a: &Fault, b: &Fault) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_combine_stay_until_cleared_and_slow_is_replaced() {
        let faults = Faults::default();
        assert!(!faults.has(Fault::Expired));
        assert_eq!(faults.delay(), None);

        faults.set(Fault::Expired);
        faults.set(Fault::WrongNonce);
        faults.set(Fault::Expired);
        faults.set(Fault::Slow(Duration::from_millis(5)));
        faults.set(Fault::Slow(Duration::from_millis(7)));
        assert!(faults.has(Fault::Expired) && faults.has(Fault::WrongNonce));
        assert!(!faults.has(Fault::AlgNone));
        assert_eq!(faults.delay(), Some(Duration::from_millis(7)));
        assert_eq!(faults.lock().len(), 3);

        faults.clear();
        assert!(!faults.has(Fault::Expired));
        assert_eq!(faults.delay(), None);
    }
}
