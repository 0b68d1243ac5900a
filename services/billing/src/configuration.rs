//! billing settings, from the environment.

use std::time::Duration;

use tracehop_contracts::events::ORDERS_STREAM;
use tracehop_contracts::schema::DEFAULT_DATABASE_URL;
use tracehop_telemetry::config::{ConfigError, env_or, env_parse, listen_address, required};
use tracehop_telemetry::db::DatabaseSettings;
use tracehop_telemetry::messaging::NatsSettings;

#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    /// `BILLING_PORT` (default 3002).
    pub port: u16,
    /// `DATABASE_URL`, `DATABASE_POOL_SIZE` (default 10).
    pub database: DatabaseSettings,
    /// `NATS_URL`, `NATS_STREAM` (default ORDERS).
    pub nats: NatsSettings,
    pub stripe: StripeSettings,
    /// `BILLING_OUTBOX_SWEEP_MS`: how often the relay looks for events that were not published right away.
    pub outbox_sweep: Duration,
    /// `BILLING_OUTBOX_RELAY_PAUSED=true`: record events but do not publish them (maintenance of NATS; the crash
    /// tests use it to hold events in the outbox, then restart billing without it).
    pub outbox_paused: bool,
    /// `BILLING_OUTBOX_CLAIM_LEASE_MS` (default 30000): how long a relay's claim on an event holds; longer
    /// than a publish takes. A dead replica's events are published by another after it.
    pub outbox_claim_lease: Duration,
    /// `BILLING_OUTBOX_RETENTION_HOURS` (default 168): published outbox events older than this are deleted.
    pub outbox_retention: Duration,
    /// `BILLING_RETENTION_EVERY_MS` (default 600000): how often.
    pub retention_every: Duration,
    /// `BILLING_RECONCILE_EVERY_MS` (default 10000): how often charges of unknown outcome are looked for.
    pub reconcile_every: Duration,
    /// `BILLING_RECONCILE_AFTER_MS` (default 120000): how old a `pending` charge must be to count as lost track of;
    /// above the whole Stripe retry budget.
    pub reconcile_after: Duration,
    /// `BILLING_FAULT_PANIC_AMOUNT_MINOR`: a test hook, only in builds with the `fault-injection` feature;
    /// charging exactly this many minor units panics inside the BillingActor (the supervision test).
    pub panic_on_amount: Option<i64>,
    /// `SERVICE_TOKEN_PUBLIC_KEY_FILE` (required): the gateway's public key(s), PEM (README, "Security model").
    pub service_token_public_key_file: String,
}

/// How billing talks to the payment provider.
#[derive(Debug, Clone)]
pub struct StripeSettings {
    /// `STRIPE_API_BASE` (default http://127.0.0.1:12111, the simulator).
    pub api_base: String,
    /// `STRIPE_SECRET_KEY`.
    pub secret_key: String,
    /// `BILLING_STRIPE_ATTEMPT_TIMEOUT_MS` (default 10000): one attempt gives up after this long.
    pub attempt_timeout: Duration,
    /// `BILLING_STRIPE_MAX_ATTEMPTS` (default 3).
    pub max_attempts: u32,
    /// `BILLING_STRIPE_BACKOFF_MS` (default 200): first retry delay, doubled each time, plus jitter.
    pub backoff: Duration,
    /// `BILLING_STRIPE_BREAKER_THRESHOLD` (default 5): consecutive failed charges that open the circuit.
    pub breaker_threshold: u32,
    /// `BILLING_STRIPE_BREAKER_COOLDOWN_MS` (default 15000): how long the circuit stays open.
    pub breaker_cooldown: Duration,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let (host, port) = listen_address("BILLING", 3002)?;
        Ok(Self {
            host,
            port,
            database: DatabaseSettings::from_env(DEFAULT_DATABASE_URL, 10)?,
            nats: NatsSettings::from_env(ORDERS_STREAM)?,
            stripe: StripeSettings {
                api_base: env_or("STRIPE_API_BASE", "http://127.0.0.1:12111"),
                secret_key: env_or("STRIPE_SECRET_KEY", "sk_test_tracehop"),
                attempt_timeout: Duration::from_millis(env_parse(
                    "BILLING_STRIPE_ATTEMPT_TIMEOUT_MS",
                    10_000,
                )?),
                max_attempts: env_parse("BILLING_STRIPE_MAX_ATTEMPTS", 3)?,
                backoff: Duration::from_millis(env_parse("BILLING_STRIPE_BACKOFF_MS", 200)?),
                breaker_threshold: env_parse("BILLING_STRIPE_BREAKER_THRESHOLD", 5)?,
                breaker_cooldown: Duration::from_millis(env_parse(
                    "BILLING_STRIPE_BREAKER_COOLDOWN_MS",
                    15_000,
                )?),
            },
            outbox_sweep: Duration::from_millis(env_parse("BILLING_OUTBOX_SWEEP_MS", 2_000)?),
            outbox_paused: env_parse("BILLING_OUTBOX_RELAY_PAUSED", false)?,
            outbox_claim_lease: Duration::from_millis(env_parse(
                "BILLING_OUTBOX_CLAIM_LEASE_MS",
                30_000,
            )?),
            outbox_retention: Duration::from_secs(
                3600 * env_parse("BILLING_OUTBOX_RETENTION_HOURS", 168_u64)?,
            ),
            retention_every: Duration::from_millis(env_parse(
                "BILLING_RETENTION_EVERY_MS",
                600_000,
            )?),
            reconcile_every: Duration::from_millis(env_parse(
                "BILLING_RECONCILE_EVERY_MS",
                10_000,
            )?),
            reconcile_after: Duration::from_millis(env_parse(
                "BILLING_RECONCILE_AFTER_MS",
                120_000,
            )?),
            panic_on_amount: panic_on_amount()?,
            service_token_public_key_file: required("SERVICE_TOKEN_PUBLIC_KEY_FILE")?,
        })
    }
}

/// The panic hook's amount: read only in builds with the `fault-injection` feature.
#[cfg(feature = "fault-injection")]
fn panic_on_amount() -> Result<Option<i64>, ConfigError> {
    match std::env::var("BILLING_FAULT_PANIC_AMOUNT_MINOR") {
        Ok(value) if !value.trim().is_empty() => {
            Ok(Some(env_parse("BILLING_FAULT_PANIC_AMOUNT_MINOR", 0)?))
        }
        _ => Ok(None),
    }
}

/// A production build has no panic hook; setting its variable there is a mistake worth a warning.
#[cfg(not(feature = "fault-injection"))]
fn panic_on_amount() -> Result<Option<i64>, ConfigError> {
    if std::env::var_os("BILLING_FAULT_PANIC_AMOUNT_MINOR").is_some() {
        tracing::warn!(
            "BILLING_FAULT_PANIC_AMOUNT_MINOR is ignored: this build has no fault-injection feature"
        );
    }
    Ok(None)
}
