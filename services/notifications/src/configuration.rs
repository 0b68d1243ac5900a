//! notifications settings, from the environment.

use std::time::Duration;

use tracehop_contracts::events::ORDERS_STREAM;
use tracehop_contracts::schema::DEFAULT_DATABASE_URL;
use tracehop_telemetry::config::{ConfigError, env_or, env_parse, listen_address, required};
use tracehop_telemetry::db::DatabaseSettings;
use tracehop_telemetry::messaging::NatsSettings;

#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    /// `NOTIFICATIONS_PORT` (default 3003).
    pub port: u16,
    /// `DATABASE_URL`, `DATABASE_POOL_SIZE` (default 8).
    pub database: DatabaseSettings,
    /// `NATS_URL`, `NATS_STREAM` (default ORDERS).
    pub nats: NatsSettings,
    /// `NATS_CONSUMER` (default notifications): the durable consumer name.
    pub nats_consumer: String,
    /// `NOTIFICATIONS_RETENTION_DAYS` (default 30): sent or failed notification records older than this
    /// are deleted.
    pub retention: Duration,
    /// `NOTIFICATIONS_RETENTION_EVERY_MS` (default 600000): how often.
    pub retention_every: Duration,
    /// `SERVICE_TOKEN_PUBLIC_KEY_FILE` (required): the gateway's public key(s), PEM (README, "Security model").
    pub service_token_public_key_file: String,
    /// `NOTIFICATIONS_MAX_DELIVER` (default 5): deliveries before a message is dead-lettered.
    pub max_deliver: i64,
    /// `NOTIFICATIONS_ACK_WAIT_MS` (default 30000): above the slowest e-mail send.
    pub ack_wait: Duration,
    /// `NOTIFICATIONS_BACKOFF_MS` (default 1000): delay before the first redelivery, doubled each time.
    pub backoff: Duration,
    /// `NOTIFICATIONS_CONCURRENCY` (default 16): messages processed at once; also the most pulled at a
    /// time, so no message waits in a buffer while its ack wait runs out.
    pub concurrency: usize,
    /// `NOTIFICATIONS_CLAIM_LEASE_MS` (default 60000): how long a delivery's claim on a notification holds
    /// (longer than the slowest send; a dead holder's claim runs out after it).
    pub claim_lease: Duration,
    pub mail: MailSettings,
}

/// Where e-mails go.
#[derive(Debug, Clone)]
pub struct MailSettings {
    /// `SMTP_URL` (e.g. `smtp://127.0.0.1:1025`): send over SMTP when set.
    pub smtp_url: Option<String>,
    /// `MAIL_SINK` (default `mail`): without SMTP, each e-mail is written to `<folder>/<order id>.json`,
    /// created exclusively so an order can never be mailed twice (`-` for stdout).
    pub sink: String,
    /// `MAIL_FROM` (default `tracehop <no-reply@tracehop.local>`).
    pub from: String,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let (host, port) = listen_address("NOTIFICATIONS", 3003)?;
        let smtp_url = std::env::var("SMTP_URL")
            .ok()
            .filter(|url| !url.trim().is_empty());
        Ok(Self {
            host,
            port,
            database: DatabaseSettings::from_env(DEFAULT_DATABASE_URL, 8)?,
            service_token_public_key_file: required("SERVICE_TOKEN_PUBLIC_KEY_FILE")?,
            nats: NatsSettings::from_env(ORDERS_STREAM)?,
            nats_consumer: env_or(
                "NATS_CONSUMER",
                tracehop_contracts::events::NOTIFICATIONS_CONSUMER,
            ),
            retention: Duration::from_secs(
                86_400 * env_parse("NOTIFICATIONS_RETENTION_DAYS", 30_u64)?,
            ),
            retention_every: Duration::from_millis(env_parse(
                "NOTIFICATIONS_RETENTION_EVERY_MS",
                600_000,
            )?),
            max_deliver: env_parse("NOTIFICATIONS_MAX_DELIVER", 5)?,
            ack_wait: Duration::from_millis(env_parse("NOTIFICATIONS_ACK_WAIT_MS", 30_000)?),
            claim_lease: Duration::from_millis(env_parse("NOTIFICATIONS_CLAIM_LEASE_MS", 60_000)?),
            backoff: Duration::from_millis(env_parse("NOTIFICATIONS_BACKOFF_MS", 1_000)?),
            concurrency: env_parse("NOTIFICATIONS_CONCURRENCY", 16)?,
            mail: MailSettings {
                smtp_url,
                sink: env_or("MAIL_SINK", "mail"),
                from: env_or("MAIL_FROM", "tracehop <no-reply@tracehop.local>"),
            },
        })
    }
}
