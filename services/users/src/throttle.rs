//! Failed-login throttling, per account and per client address (OWASP ASVS 2.2.1), shared by every replica.
//!
//! Counted in PostgreSQL (`login_failures`), over a fixed window: after `limit` failures for an account (or
//! from an address) the next attempts are answered 429 with `Retry-After` until the window ends, *before*
//! any password is hashed, so a flood costs one short statement per attempt and no hashing, and cannot
//! starve other users' logins. Counted in each replica's memory (as it once was), N replicas behind the
//! gateway let an attacker try N times the limit; in the database every replica counts against the same
//! rows.
//!
//! An attempt counts as a failure from the moment it is let in ([`LoginThrottle::begin`], one upsert per
//! account, so concurrent attempts on any replica cannot all slip in at the limit); a success takes its count
//! back and clears the account ([`LoginThrottle::succeeded`]). Attempts refused by the throttle do not count
//! against the address, so one account under attack does not lock its address out, and other accounts from
//! the same address log in normally. The address's lock is read in the same statement that counts the
//! account, which keeps an address already locked to one statement per attempt; the attempts let in are
//! then counted against the address by an atomic upsert, and one that finds the address past its limit
//! (attempts racing at the limit, from any replica) is refused after all and its account's count taken back.
//! So exactly the limit is let in per address and window, however many attempts arrive at once.
//!
//! Rows whose window has ended are deleted by retention (`startup`), so the table holds only the accounts
//! and addresses with failures in the current window.

use std::time::Duration;

use diesel::sql_types::{BigInt, Int4, Nullable, Text};
use diesel::{OptionalExtension, RunQueryDsl};
use tracehop_telemetry::db::{Database, DbError, traced};

/// Counts the attempt against the account, unless its address is locked; answers the account's count and
/// the seconds left in its window, or no row when the address is locked. Binds: account key, address key
/// (or NULL), window in milliseconds, per-account limit, per-address limit. (The address's lock is read in
/// the statement's snapshot; the account's count is one atomic upsert.)
const COUNT_ACCOUNT: &str = "\
WITH address_lock AS (\
SELECT FROM login_failures WHERE key = $2 AND failures >= $5 AND window_ends > now()\
) \
INSERT INTO login_failures AS f (key, window_ends, failures) \
SELECT $1, now() + $3 * INTERVAL '1 millisecond', 1 WHERE NOT EXISTS (SELECT FROM address_lock) \
ON CONFLICT (key) DO UPDATE SET \
window_ends = CASE WHEN f.window_ends <= now() THEN EXCLUDED.window_ends ELSE f.window_ends END, \
failures = CASE WHEN f.window_ends <= now() THEN 1 ELSE LEAST(f.failures + 1, $4 + 1) END \
RETURNING failures, CEIL(date_part('epoch', f.window_ends - now()))::BIGINT AS retry_after";

/// Counts an attempt that was let in against its address; answers the address's count (one past the limit at
/// most) and the seconds left in its window. Binds: address key, window in milliseconds, per-address limit.
const COUNT_ADDRESS: &str = "\
INSERT INTO login_failures AS f (key, window_ends, failures) \
VALUES ($1, now() + $2 * INTERVAL '1 millisecond', 1) \
ON CONFLICT (key) DO UPDATE SET \
window_ends = CASE WHEN f.window_ends <= now() THEN EXCLUDED.window_ends ELSE f.window_ends END, \
failures = CASE WHEN f.window_ends <= now() THEN 1 ELSE LEAST(f.failures + 1, $3 + 1) END \
RETURNING failures, CEIL(date_part('epoch', f.window_ends - now()))::BIGINT AS retry_after";

/// Takes back an account's attempt that the address refused after all. Bind: account key.
const TAKE_BACK: &str = "\
UPDATE login_failures SET failures = failures - 1 WHERE key = $1 AND failures > 0";

/// The seconds left in a locked address's window. Bind: address key.
const ADDRESS_LOCK: &str = "\
SELECT 0 AS failures, CEIL(date_part('epoch', window_ends - now()))::BIGINT AS retry_after \
FROM login_failures WHERE key = $1";

/// Clears the account's failures and takes the address's attempt back. Binds: account key, address key (or
/// NULL).
const SUCCEEDED: &str = "\
WITH cleared AS (DELETE FROM login_failures WHERE key = $1) \
UPDATE login_failures SET failures = failures - 1 WHERE key = $2 AND failures > 0";

/// The limits, and the statements that apply them.
#[derive(Debug, Clone, Copy)]
pub struct LoginThrottle {
    per_account: i32,
    per_address: i32,
    window_ms: i64,
}

/// Refused by the throttle: try again after this many seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub retry_after: u64,
}

/// A key's count after an attempt, and the seconds left in its window.
#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = Int4)]
    failures: i32,
    #[diesel(sql_type = BigInt)]
    retry_after: i64,
}

impl Count {
    fn throttled(&self) -> Throttled {
        Throttled {
            retry_after: u64::try_from(self.retry_after).unwrap_or(0).max(1),
        }
    }
}

fn account_key(account: &str) -> String {
    format!("account:{account}")
}

fn address_key(address: Option<&str>) -> Option<String> {
    address.map(|address| format!("address:{address}"))
}

impl LoginThrottle {
    /// `per_account` failures per account and `per_address` per client address, within `window`.
    pub fn new(per_account: u32, per_address: u32, window: Duration) -> Self {
        let limit = |n: u32| i32::try_from(n.max(1)).unwrap_or(i32::MAX - 1);
        Self {
            per_account: limit(per_account),
            per_address: limit(per_address),
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1),
        }
    }

    /// May this attempt go ahead? If so it is counted as a failure until [`LoginThrottle::succeeded`].
    ///
    /// One statement counts the attempt against the account (none when the address is locked), a second
    /// against the address when the attempt is let in: refused attempts do not count against the address.
    pub async fn begin(
        &self,
        database: &Database,
        account: &str,
        address: Option<&str>,
    ) -> Result<Result<(), Throttled>, DbError> {
        let (account, address) = (account_key(account), address_key(address));
        let limits = *self;
        database
            .run(move |connection, statements| {
                let query = diesel::sql_query(COUNT_ACCOUNT)
                    .bind::<Text, _>(account.clone())
                    .bind::<Nullable<Text>, _>(address.clone())
                    .bind::<BigInt, _>(limits.window_ms)
                    .bind::<Int4, _>(limits.per_account)
                    .bind::<Int4, _>(limits.per_address);
                let counted = traced(statements, query, |query| {
                    query.get_result::<Count>(connection).optional()
                })?;
                match (counted, address) {
                    (Some(account), _) if account.failures > limits.per_account => {
                        Ok(Err(account.throttled()))
                    }
                    (Some(_), None) => Ok(Ok(())),
                    (Some(_), Some(address)) => {
                        let query = diesel::sql_query(COUNT_ADDRESS)
                            .bind::<Text, _>(address)
                            .bind::<BigInt, _>(limits.window_ms)
                            .bind::<Int4, _>(limits.per_address);
                        let address = traced(statements, query, |query| {
                            query.get_result::<Count>(connection)
                        })?;
                        if address.failures <= limits.per_address {
                            return Ok(Ok(()));
                        }
                        // Raced past the address's limit: refused, and not held against the account.
                        let query = diesel::sql_query(TAKE_BACK).bind::<Text, _>(account);
                        traced(statements, query, |query| query.execute(connection))?;
                        Ok(Err(address.throttled()))
                    }
                    // The address is locked: how long for.
                    (None, address) => {
                        let query =
                            diesel::sql_query(ADDRESS_LOCK).bind::<Nullable<Text>, _>(address);
                        let lock = traced(statements, query, |query| {
                            query.get_result::<Count>(connection).optional()
                        })?;
                        Ok(Err(lock.map_or(Throttled { retry_after: 1 }, |lock| {
                            lock.throttled()
                        })))
                    }
                }
            })
            .await
    }

    /// The password was right: the account's failures are cleared and the address's attempt taken back.
    pub async fn succeeded(
        &self,
        database: &Database,
        account: &str,
        address: Option<&str>,
    ) -> Result<(), DbError> {
        let (account, address) = (account_key(account), address_key(address));
        database
            .run(move |connection, statements| {
                let query = diesel::sql_query(SUCCEEDED)
                    .bind::<Text, _>(account)
                    .bind::<Nullable<Text>, _>(address);
                Ok(traced(statements, query, |query| {
                    query.execute(connection)
                })?)
            })
            .await?;
        Ok(())
    }
}
