//! One module per route.

pub mod login;
pub mod signup;
pub mod validate;

use tracehop_shared::db::Database;

/// Shared by every handler.
pub struct State {
    pub database: Database,
    pub session_ttl: chrono::Duration,
    /// Argon2 takes ~19 MiB and a core per hash: at most one hash per core at a time, so a signup burst
    /// queues instead of growing memory by the blocking pool's size (and starving everything else).
    pub hashing: tokio::sync::Semaphore,
}
