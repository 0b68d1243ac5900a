//! One module per route.

pub mod login;
pub mod revoke;
pub mod signup;
pub mod validate;

use tracehop_telemetry::db::Database;

/// Shared by every handler.
pub struct State {
    pub database: Database,
    pub session_ttl: chrono::Duration,
    /// Where Argon2 runs: one thread per core (see [`crate::hashing`]).
    pub hashing: crate::hashing::HashingPool,
    /// Sessions validated in the last few seconds (`USERS_SESSION_CACHE_MS`).
    pub sessions: std::sync::Arc<crate::sessions::SessionCache>,
    /// Failed logins per account and per client address.
    pub throttle: crate::throttle::LoginThrottle,
}
