//! The admin UserSig, cached and renewed before it expires.
//!
//! Handing out a UserSig is one atomic load. Renewal starts when half its life is
//! gone, so a sig is never handed out with less than half (well above the 10% floor)
//! of its life left. One caller renews (a `try_lock`); the others keep using the
//! current sig, which is still valid. Only when the current sig is below the floor
//! (the process was suspended, the clock jumped) do callers wait for the renewal.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use crate::chat::usersig;
use crate::config::Secret;

/// A UserSig and the times that govern its use.
#[derive(Debug)]
pub struct IssuedSig {
    /// The UserSig, URL-safe as is.
    pub sig: Arc<str>,
    /// Unix second it was issued.
    pub issued_at: u64,
    /// Unix second after which it is renewed.
    pub renew_at: u64,
    /// Unix second after which it must not be handed out (10% of life left).
    pub floor_at: u64,
}

/// Issues and caches the admin's UserSig.
pub struct Signer {
    /// Which app the sigs are for.
    sdkappid: u64,
    /// The admin account the sigs are for.
    identifier: String,
    /// The app's secret key; only used to compute HMACs. Swapped when the key file
    /// changes ([`Signer::set_key`]).
    key: ArcSwap<Secret>,
    /// Lifetime of each sig.
    ttl: Duration,
    /// The sig currently handed out.
    current: ArcSwap<IssuedSig>,
    /// Held while renewing, so two renewals never run at once.
    renewing: Mutex<()>,
    /// Source of "now" in unix seconds (a parameter so tests can move time).
    clock: fn() -> u64,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("sdkappid", &self.sdkappid)
            .field("identifier", &self.identifier)
            .field("key", &self.key)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// The system clock in unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Signer {
    /// A signer for `identifier`, with a first sig issued now.
    pub fn new(sdkappid: u64, identifier: String, key: Secret, ttl: Duration) -> Self {
        Self::with_clock(sdkappid, identifier, key, ttl, unix_now)
    }

    /// Like [`Signer::new`] with an injected clock (tests).
    pub fn with_clock(
        sdkappid: u64,
        identifier: String,
        key: Secret,
        ttl: Duration,
        clock: fn() -> u64,
    ) -> Self {
        let first = issue(sdkappid, &identifier, &key, ttl, clock());
        Signer {
            sdkappid,
            identifier,
            key: ArcSwap::from_pointee(key),
            ttl,
            current: ArcSwap::from_pointee(first),
            renewing: Mutex::new(()),
            clock,
        }
    }

    /// The admin identifier.
    pub fn identifier(&self) -> &str {
        &self.identifier
    }

    /// A valid UserSig with at least 10% of its life left (normally over 50%).
    pub fn usersig(&self) -> Arc<IssuedSig> {
        let cur = self.current.load_full();
        let now = (self.clock)();
        if now < cur.renew_at {
            return cur;
        }
        match self.renewing.try_lock() {
            Ok(_guard) => self.renew_locked(now),
            Err(_) if now < cur.floor_at => cur,
            Err(_) => {
                // Below the floor and someone else is renewing: wait for them.
                let _guard = self.renewing.lock().unwrap_or_else(|p| p.into_inner());
                self.renew_locked((self.clock)())
            }
        }
    }

    /// Issues a fresh sig now, whatever the current one's age (after Chat refused the
    /// current one). Returns the new sig.
    pub fn force_renew(&self) -> Arc<IssuedSig> {
        let _guard = self.renewing.lock().unwrap_or_else(|p| p.into_inner());
        // A sig is a function of its issue second: issue at least one second after the
        // refused one so that the new sig differs from it.
        let now = (self.clock)().max(self.current.load().issued_at + 1);
        tracing::info!(identifier = %self.identifier, "UserSig renewed on demand");
        self.store_fresh(now)
    }

    /// Signs with `key` from now on: a fresh UserSig is issued at once, so the next
    /// call to Chat carries a sig made with the new key.
    pub fn set_key(&self, key: Secret) {
        let _guard = self.renewing.lock().unwrap_or_else(|p| p.into_inner());
        self.key.store(std::sync::Arc::new(key));
        let now = (self.clock)().max(self.current.load().issued_at + 1);
        self.store_fresh(now);
        tracing::info!(identifier = %self.identifier, "UserSig re-issued with the new secret key");
    }

    /// Renews unless another caller did while we waited for the lock.
    fn renew_locked(&self, now: u64) -> Arc<IssuedSig> {
        let cur = self.current.load_full();
        if now < cur.renew_at {
            return cur;
        }
        tracing::debug!(identifier = %self.identifier, "UserSig renewed");
        self.store_fresh(now)
    }

    /// Issues a sig at `now` and hands it out from then on. Call with `renewing` held.
    fn store_fresh(&self, now: u64) -> Arc<IssuedSig> {
        let fresh = Arc::new(issue(
            self.sdkappid,
            &self.identifier,
            &self.key.load(),
            self.ttl,
            now,
        ));
        self.current.store(fresh.clone());
        fresh
    }
}

fn issue(sdkappid: u64, identifier: &str, key: &Secret, ttl: Duration, now: u64) -> IssuedSig {
    let life = ttl.as_secs().max(1);
    let sig = usersig::generate(
        sdkappid,
        key.expose().as_bytes(),
        identifier,
        life,
        now,
        None,
    );
    IssuedSig {
        sig: Arc::from(sig),
        issued_at: now,
        renew_at: now + life / 2,
        floor_at: now + life - life / 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    static NOW: AtomicU64 = AtomicU64::new(1_000_000);
    fn fake_now() -> u64 {
        NOW.load(Ordering::SeqCst)
    }

    #[test]
    fn renews_at_half_life_and_never_hands_out_below_the_floor() {
        let s = Signer::with_clock(
            7,
            "admin".into(),
            Secret::new("k"),
            Duration::from_secs(1000),
            fake_now,
        );
        let a = s.usersig();
        assert_eq!(a.issued_at, 1_000_000);
        NOW.store(1_000_499, Ordering::SeqCst);
        assert!(Arc::ptr_eq(&a, &s.usersig()), "no renewal before half life");
        NOW.store(1_000_500, Ordering::SeqCst);
        let b = s.usersig();
        assert_eq!(b.issued_at, 1_000_500);
        let info = usersig::verify(&b.sig, 7, b"k", "admin", 1_000_500).unwrap();
        assert_eq!(info.expire, 1000);
        // Whatever the clock does, what is handed out has >= 10% of its life left.
        for t in [1_000_900u64, 1_001_400, 1_005_000] {
            NOW.store(t, Ordering::SeqCst);
            let c = s.usersig();
            assert!(c.issued_at + 1000 - t >= 100, "at {t}");
        }
        let before = s.usersig();
        let forced = s.force_renew();
        assert_ne!(
            before.sig, forced.sig,
            "a forced renewal gives a different sig"
        );
        assert!(Arc::ptr_eq(&forced, &s.usersig()));
        assert!(!format!("{s:?}").contains("\"k\""));
    }
}
