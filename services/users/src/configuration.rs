//! users settings, from the environment.

use tracehop_contracts::schema::DEFAULT_DATABASE_URL;
use tracehop_telemetry::config::{ConfigError, env_parse, listen_address};
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
    /// `USERS_RETENTION_EVERY_MS` (default 600000): how often expired sessions are deleted.
    pub retention_every: std::time::Duration,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let (host, port) = listen_address("USERS", 3001)?;
        Ok(Self {
            host,
            port,
            database: DatabaseSettings::from_env(DEFAULT_DATABASE_URL, 8)?,
            session_ttl_hours: env_parse("USERS_SESSION_TTL_HOURS", 24)?,
            retention_every: std::time::Duration::from_millis(env_parse(
                "USERS_RETENTION_EVERY_MS",
                600_000,
            )?),
        })
    }
}
