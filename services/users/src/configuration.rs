//! users settings, from the environment.

use tracehop_telemetry::config::{ConfigError, env_or, env_parse, listen_address};

/// Everything the service needs to start.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    /// `USERS_PORT` (default 3001; 0 picks a free port).
    pub port: u16,
    /// `DATABASE_URL`.
    pub database_url: String,
    /// `DATABASE_POOL_SIZE` (default 8).
    pub pool_size: u32,
    /// `USERS_SESSION_TTL_HOURS` (default 24).
    pub session_ttl_hours: i64,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let (host, port) = listen_address("USERS", 3001)?;
        Ok(Self {
            host,
            port,
            database_url: env_or(
                "DATABASE_URL",
                tracehop_contracts::schema::DEFAULT_DATABASE_URL,
            ),
            pool_size: env_parse("DATABASE_POOL_SIZE", 8)?,
            session_ttl_hours: env_parse("USERS_SESSION_TTL_HOURS", 24)?,
        })
    }
}
