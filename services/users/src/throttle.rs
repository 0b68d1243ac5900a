//! Failed-login throttling, per account and per client address (OWASP ASVS 2.2.1).
//!
//! Counted in memory, per replica, over a fixed window: after `limit` failures for an account (or from an
//! address) the next attempts are answered 429 with `Retry-After` until the window ends, *before* any
//! password is hashed, so a flood costs no hashing and cannot starve other users' logins. An attempt counts
//! as a failure from the moment it is let in ([`LoginThrottle::begin`]), so a burst sent all at once cannot
//! slip past the limit while its first hashes are still running; a success takes its count back and clears
//! the account. Attempts refused by the throttle do not count, so one account under attack does not lock its
//! address out, and other accounts from the same address log in normally.
//!
//! Memory is bounded: at `MAX_ENTRIES` keys, expired windows are dropped first; if every key is still live the
//! new key is not tracked (the other dimension still applies) and a warning is logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const MAX_ENTRIES: usize = 100_000;

/// One dimension: accounts or addresses.
struct Window {
    limit: u32,
    length: Duration,
    failures: Mutex<HashMap<String, (Instant, u32)>>,
}

impl Window {
    fn new(limit: u32, length: Duration) -> Self {
        Self {
            limit,
            length,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Seconds until `key` may try again, if it is locked out now.
    fn locked(&self, key: &str, now: Instant) -> Option<u64> {
        let failures = self.failures.lock().ok()?;
        self.locked_in(&failures, key, now)
    }

    fn locked_in(
        &self,
        failures: &HashMap<String, (Instant, u32)>,
        key: &str,
        now: Instant,
    ) -> Option<u64> {
        let (started, count) = failures.get(key)?;
        let ends = *started + self.length;
        (*count >= self.limit && ends > now).then(|| (ends - now).as_secs().max(1))
    }

    fn fail(&self, key: &str, now: Instant) {
        if let Ok(mut failures) = self.failures.lock() {
            self.fail_in(&mut failures, key, now);
        }
    }

    fn fail_in(&self, failures: &mut HashMap<String, (Instant, u32)>, key: &str, now: Instant) {
        if failures.len() >= MAX_ENTRIES && !failures.contains_key(key) {
            let length = self.length;
            failures.retain(|_, (started, _)| *started + length > now);
            if failures.len() >= MAX_ENTRIES {
                tracing::warn!("login throttle is full; a key is not tracked");
                return;
            }
        }
        let entry = failures.entry(key.to_owned()).or_insert((now, 0));
        if entry.0 + self.length <= now {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    fn clear(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }

    fn forgive_one(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock()
            && let Some(entry) = failures.get_mut(key)
        {
            entry.1 = entry.1.saturating_sub(1);
        }
    }

    /// Locked, or counted in (one more attempt), in one step under the lock, so concurrent attempts cannot
    /// all slip in at the limit.
    fn enter(&self, key: &str, now: Instant) -> Result<(), u64> {
        let Ok(mut failures) = self.failures.lock() else {
            return Ok(());
        };
        if let Some(retry_after) = self.locked_in(&failures, key, now) {
            return Err(retry_after);
        }
        self.fail_in(&mut failures, key, now);
        Ok(())
    }
}

/// The two windows.
pub struct LoginThrottle {
    accounts: Window,
    addresses: Window,
}

/// Refused by the throttle: try again after this many seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub retry_after: u64,
}

impl LoginThrottle {
    /// `per_account` failures per account and `per_address` per client address, within `window`.
    pub fn new(per_account: u32, per_address: u32, window: Duration) -> Self {
        Self {
            accounts: Window::new(per_account.max(1), window),
            addresses: Window::new(per_address.max(1), window),
        }
    }

    /// May this attempt go ahead? If so it is counted as a failure until [`LoginThrottle::succeeded`].
    pub fn begin(&self, account: &str, address: Option<&str>) -> Result<(), Throttled> {
        let now = Instant::now();
        if let Some(address) = address
            && let Some(retry_after) = self.addresses.locked(address, now)
        {
            return Err(Throttled { retry_after });
        }
        self.accounts
            .enter(account, now)
            .map_err(|retry_after| Throttled { retry_after })?;
        if let Some(address) = address {
            self.addresses.fail(address, now);
        }
        Ok(())
    }

    /// The password was right: the account's failures are cleared and the address's attempt taken back.
    pub fn succeeded(&self, account: &str, address: Option<&str>) {
        self.accounts.clear(account);
        if let Some(address) = address {
            self.addresses.forgive_one(address);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_is_locked_after_its_limit_and_others_are_not() {
        let throttle = LoginThrottle::new(3, 100, Duration::from_secs(60));
        // Three attempts let in (a burst: none has finished yet), the fourth refused.
        for _ in 0..3 {
            assert!(
                throttle
                    .begin("victim@example.com", Some("10.0.0.1"))
                    .is_ok()
            );
        }
        let refused = throttle.begin("victim@example.com", Some("10.0.0.1"));
        assert!(
            matches!(refused, Err(Throttled { retry_after }) if (1..=60).contains(&retry_after))
        );
        // Same address, another account: fine, and a success does not count against the address.
        assert!(
            throttle
                .begin("other@example.com", Some("10.0.0.1"))
                .is_ok()
        );
        throttle.succeeded("other@example.com", Some("10.0.0.1"));
        // A success clears the account.
        throttle.succeeded("victim@example.com", Some("10.0.0.1"));
        assert!(
            throttle
                .begin("victim@example.com", Some("10.0.0.1"))
                .is_ok()
        );
    }

    #[test]
    fn an_address_is_locked_across_accounts() {
        let throttle = LoginThrottle::new(100, 5, Duration::from_secs(60));
        for index in 0..5 {
            assert!(
                throttle
                    .begin(&format!("user{index}@example.com"), Some("10.0.0.9"))
                    .is_ok()
            );
        }
        assert!(
            throttle
                .begin("fresh@example.com", Some("10.0.0.9"))
                .is_err()
        );
        assert!(
            throttle
                .begin("fresh@example.com", Some("10.0.0.8"))
                .is_ok()
        );
        assert!(throttle.begin("fresh2@example.com", None).is_ok());
    }

    #[test]
    fn the_window_ends() {
        let throttle = LoginThrottle::new(1, 1, Duration::from_millis(20));
        assert!(throttle.begin("a", Some("b")).is_ok());
        assert!(throttle.begin("a", Some("b")).is_err());
        std::thread::sleep(Duration::from_millis(30));
        assert!(throttle.begin("a", Some("b")).is_ok());
    }
}
