//! users settings, from the environment.

use tracehop_contracts::schema::DEFAULT_DATABASE_URL;
use tracehop_telemetry::config::{ConfigError, env_parse, listen_address, required};
use tracehop_telemetry::db::DatabaseSettings;

/// Everything the service needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    /// `USERS_PORT` (default 3001; 0 picks a free port).
    pub port: u16,
    /// `DATABASE_URL`, `DATABASE_POOL_SIZE` (default 8).
    pub database: DatabaseSettings,
    /// `USERS_SESSION_TTL_HOURS` (default 24).
    pub session_ttl_hours: i64,
    /// `USERS_SESSION_CACHE_MS` (default 5000; 0 turns the cache off): how long a validated session is
    /// answered from memory. A logout takes effect at once regardless (`crate::sessions`).
    pub session_cache: std::time::Duration,
    /// `USERS_RETENTION_EVERY_MS` (default 600000): how often expired sessions and ended failed-login
    /// windows are deleted.
    pub retention_every: std::time::Duration,
    /// `SERVICE_TOKEN_PUBLIC_KEY_FILE` (required): the gateway's public key(s), PEM (README, "Security model").
    pub service_token_public_key_file: String,
    /// `USERS_HASHING_QUEUE` (default 32): logins and sign-ups that may wait for a hashing thread; more get 503.
    pub hashing_queue: usize,
    /// `USERS_LOGIN_FAILURES_PER_ACCOUNT` (default 5) and `USERS_LOGIN_FAILURES_PER_ADDRESS` (default 50)
    /// within `USERS_LOGIN_THROTTLE_WINDOW_SECS` (default 900), counted by every replica together
    /// (`crate::throttle`): then 429 until the window ends.
    pub login_failures_per_account: u32,
    pub login_failures_per_address: u32,
    pub login_throttle_window: std::time::Duration,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let (host, port) = listen_address("USERS", 3001)?;
        Ok(Self {
            host,
            port,
            database: DatabaseSettings::from_env(DEFAULT_DATABASE_URL, 8)?,
            session_ttl_hours: env_parse("USERS_SESSION_TTL_HOURS", 24)?,
            session_cache: std::time::Duration::from_millis(env_parse(
                "USERS_SESSION_CACHE_MS",
                5_000,
            )?),
            retention_every: std::time::Duration::from_millis(env_parse(
                "USERS_RETENTION_EVERY_MS",
                600_000,
            )?),
            service_token_public_key_file: required("SERVICE_TOKEN_PUBLIC_KEY_FILE")?,
            hashing_queue: env_parse("USERS_HASHING_QUEUE", 32)?,
            login_failures_per_account: env_parse("USERS_LOGIN_FAILURES_PER_ACCOUNT", 5)?,
            login_failures_per_address: env_parse("USERS_LOGIN_FAILURES_PER_ADDRESS", 50)?,
            login_throttle_window: std::time::Duration::from_secs(env_parse(
                "USERS_LOGIN_THROTTLE_WINDOW_SECS",
                900,
            )?),
        })
    }
}
