//! api-gateway settings, from the environment.

use std::time::Duration;

use tracehop_shared::config::{ConfigError, env_or, env_parse, listen_address};

#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    /// `GATEWAY_PORT` (default 3000).
    pub port: u16,
    /// `USERS_URL` (default http://127.0.0.1:3001).
    pub users_url: String,
    /// `BILLING_URL` (default http://127.0.0.1:3002).
    pub billing_url: String,
    /// `UPSTREAM_TIMEOUT_MS` (default 60000): must exceed billing's whole Stripe retry budget.
    pub upstream_timeout: Duration,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let (host, port) = listen_address("GATEWAY", 3000)?;
        Ok(Self {
            host,
            port,
            users_url: env_or("USERS_URL", "http://127.0.0.1:3001"),
            billing_url: env_or("BILLING_URL", "http://127.0.0.1:3002"),
            upstream_timeout: Duration::from_millis(env_parse("UPSTREAM_TIMEOUT_MS", 60_000)?),
        })
    }
}
