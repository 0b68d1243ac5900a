//! Validated sessions, remembered for a few seconds so that a checkout does not cost a query to check its
//! session, while a logout still takes effect at once on every replica.
//!
//! A logout deletes the session row and, in the same statement, sends `NOTIFY tracehop_session_revoked`
//! with the token's hash ([`REVOKE`]). Every replica listens on a connection of its own and drains what has
//! arrived before it answers from memory ([`SessionCache::lookup`]); the replica that logged the session out
//! forgets it before it answers. When the listening connection is lost, notifications may have been
//! missed: the cache empties and is not used until a new connection listens again (every validation asks
//! PostgreSQL meanwhile). A validation that read the database while a revocation arrived is not
//! remembered (a generation count), so a stale "valid" cannot be stored after the notification that
//! should have removed it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use diesel::RunQueryDsl;
use diesel::pg::PgConnection;
use tracehop_contracts::users::SessionUser;
use tracehop_telemetry::db::Database;

/// The channel revocations are announced on.
pub const CHANNEL: &str = "tracehop_session_revoked";

/// Deletes a session (bind: its token hash) and announces it, in one statement: `pg_notify` runs once per
/// deleted row, and PostgreSQL delivers the notification when the deletion commits.
pub const REVOKE: &str = "DELETE FROM sessions WHERE token_hash = $1 \
                          RETURNING pg_notify('tracehop_session_revoked', token_hash)";

/// Remembered validations: token hash -> who, until when.
pub struct SessionCache {
    ttl: Duration,
    inner: Mutex<Inner>,
}

struct Inner {
    entries: HashMap<String, (SessionUser, Instant)>,
    /// Listening for revocations; `None` while (re)connecting: then nothing is remembered.
    listener: Option<PgConnection>,
    /// Counts revocations seen and listener losses: a validation started in one generation is only
    /// remembered in the same one.
    generation: u64,
}

/// The most sessions remembered; past it, the oldest half is dropped (a bound, not an LRU: cheap and
/// enough for a cache whose entries live seconds).
const MAX_ENTRIES: usize = 100_000;

impl SessionCache {
    /// A cache that remembers a validation for `ttl` (zero: never), listening on connections opened from
    /// `database` by a thread of its own, which also drains notifications every 100 ms between requests.
    pub fn start(database: Database, ttl: Duration) -> std::sync::Arc<Self> {
        let cache = std::sync::Arc::new(Self {
            ttl,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                listener: None,
                generation: 0,
            }),
        });
        if ttl.is_zero() {
            return cache;
        }
        let weak = std::sync::Arc::downgrade(&cache);
        let spawned = std::thread::Builder::new()
            .name("session-listener".to_owned())
            .spawn(move || listen(&weak, &database));
        if let Err(error) = spawned {
            tracing::warn!(error = %error, "no session listener thread; sessions are not cached");
        }
        cache
    }

    /// The user of a session validated less than `ttl` ago and not revoked since, after taking in every
    /// revocation that has reached this process. `None` means: ask the database.
    pub fn lookup(&self, token_hash: &str) -> Option<SessionUser> {
        let mut inner = self.inner.lock().ok()?;
        inner.drain();
        inner.listener.as_ref()?;
        match inner.entries.get(token_hash) {
            Some((user, until)) if *until > Instant::now() => Some(user.clone()),
            Some(_) => {
                inner.entries.remove(token_hash);
                None
            }
            None => None,
        }
    }

    /// The generation to hand back to [`SessionCache::remember`]: read it *before* asking the database.
    pub fn generation(&self) -> u64 {
        self.inner.lock().map_or(u64::MAX, |inner| inner.generation)
    }

    /// Remembers a validation the database confirmed, unless a revocation arrived (or the listener was lost)
    /// since `generation` was read, or the session expires sooner than the cache would forget it.
    pub fn remember(
        &self,
        generation: u64,
        token_hash: String,
        user: SessionUser,
        session_expires_in: Duration,
    ) {
        if self.ttl.is_zero() {
            return;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        inner.drain();
        if inner.generation != generation || inner.listener.is_none() {
            return;
        }
        if inner.entries.len() >= MAX_ENTRIES {
            let now = Instant::now();
            inner.entries.retain(|_, (_, until)| *until > now);
            if inner.entries.len() >= MAX_ENTRIES {
                inner.entries.clear();
            }
        }
        let until = Instant::now() + self.ttl.min(session_expires_in);
        inner.entries.insert(token_hash, (user, until));
    }

    /// Forgets a session this replica just revoked.
    pub fn forget(&self, token_hash: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.entries.remove(token_hash);
            inner.generation += 1;
        }
    }
}

impl Inner {
    /// Takes in the notifications that have arrived. Never waits: libpq reads only what the socket holds.
    fn drain(&mut self) {
        let Some(listener) = self.listener.as_mut() else {
            return;
        };
        let mut lost = false;
        let mut revoked = Vec::new();
        for notification in listener.notifications_iter() {
            match notification {
                Ok(notification) => revoked.push(notification.payload),
                Err(_) => {
                    lost = true;
                    break;
                }
            }
        }
        if !revoked.is_empty() {
            self.generation += 1;
            for token_hash in revoked {
                self.entries.remove(&token_hash);
            }
        }
        if lost {
            tracing::warn!("session listener lost; sessions are not cached until it is back");
            self.listener = None;
            self.entries.clear();
            self.generation += 1;
        }
    }
}

/// The listener thread: (re)connects and listens whenever there is no listener, and drains between
/// requests. Ends when the cache is dropped.
fn listen(cache: &std::sync::Weak<SessionCache>, database: &Database) {
    let mut pause = Duration::from_millis(100);
    loop {
        let Some(cache) = cache.upgrade() else {
            return;
        };
        let listening = cache
            .inner
            .lock()
            .map(|mut inner| {
                inner.drain();
                inner.listener.is_some()
            })
            .unwrap_or(true);
        if !listening {
            // Connect outside the lock: validations go on (uncached) meanwhile.
            let connected = database.dedicated_connection().and_then(|mut connection| {
                diesel::sql_query(format!("LISTEN {CHANNEL}"))
                    .execute(&mut connection)
                    .map_err(tracehop_telemetry::db::DbError::from)?;
                Ok(connection)
            });
            match connected {
                Ok(connection) => {
                    if let Ok(mut inner) = cache.inner.lock() {
                        inner.entries.clear();
                        inner.generation += 1;
                        inner.listener = Some(connection);
                    }
                    pause = Duration::from_millis(100);
                }
                Err(error) => {
                    tracing::debug!(error = error.code(), "session listener cannot connect yet");
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
        drop(cache);
        std::thread::sleep(pause);
    }
}
