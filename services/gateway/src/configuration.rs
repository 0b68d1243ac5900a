//! gateway settings, from the environment.

use std::time::Duration;

use tracehop_telemetry::config::{ConfigError, env_or, env_parse, listen_address, required};
use tracehop_telemetry::http::server::RequestTrust;

#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    /// `GATEWAY_PORT` (default 3000).
    pub port: u16,
    /// `USERS_URL` (default http://127.0.0.1:3001); like the other two, a comma-separated list when the
    /// service runs as several replicas.
    pub users_url: String,
    /// `BILLING_URL` (default http://127.0.0.1:3002).
    pub billing_url: String,
    /// `NOTIFICATIONS_URL` (default http://127.0.0.1:3003): the state of an order's e-mail.
    pub notifications_url: String,
    /// `GATEWAY_UPSTREAM_TIMEOUT_MS` (default 60000): must exceed billing's whole Stripe retry budget.
    pub upstream_timeout: Duration,
    /// What the gateway believes of its callers' headers (README, "Edge policy"):
    /// `GATEWAY_CONTINUE_CALLER_TRACE` (default false: a caller's `traceparent` becomes a span link of a new
    /// trace) and `GATEWAY_TRUST_FORWARDED_HEADERS` (default false: `client.address` is the connection's peer).
    pub trust: RequestTrust,
    /// `SERVICE_TOKEN_SIGNING_KEY_FILE` (required): the Ed25519 private key (PKCS#8 PEM) that signs the
    /// gateway's service tokens to users and billing (README, "Security model").
    pub signing_key_file: String,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let (host, port) = listen_address("GATEWAY", 3000)?;
        Ok(Self {
            host,
            port,
            users_url: env_or("USERS_URL", "http://127.0.0.1:3001"),
            billing_url: env_or("BILLING_URL", "http://127.0.0.1:3002"),
            notifications_url: env_or("NOTIFICATIONS_URL", "http://127.0.0.1:3003"),
            upstream_timeout: Duration::from_millis(env_parse(
                "GATEWAY_UPSTREAM_TIMEOUT_MS",
                60_000,
            )?),
            signing_key_file: required("SERVICE_TOKEN_SIGNING_KEY_FILE")?,
            trust: RequestTrust {
                continue_caller_trace: env_parse("GATEWAY_CONTINUE_CALLER_TRACE", false)?,
                forwarded_headers: env_parse("GATEWAY_TRUST_FORWARDED_HEADERS", false)?,
            },
        })
    }
}
