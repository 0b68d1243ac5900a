//! The body of every service's `main`, so the order of start-up and shutdown is written once.

use std::future::Future;
use std::sync::OnceLock;

/// This process among the replicas of its service: `host/pid/random`, made once. Leases and locks name
/// their holder with it (who claimed a notification or an outbox event), so a log line or a row says which
/// replica held it.
pub fn instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".to_owned());
        let random = uuid::Uuid::new_v4().simple().to_string();
        format!("{host}/{}/{}", std::process::id(), &random[..8])
    })
}

/// Telemetry first (so start-up is logged and traced), then `serve` until it returns, then an error, if
/// any, logged with its causes, then the telemetry flushed: in that order, so the last spans and the reason
/// for stopping are exported too.
pub async fn run<F, Fut>(default_service_name: &'static str, serve: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let telemetry = crate::setup::init(default_service_name)?;
    let outcome = serve().await;
    if let Err(error) = &outcome {
        tracing::error!(
            error = format!("{error:#}"),
            "{default_service_name} stopped with an error"
        );
    }
    telemetry.shutdown().await;
    outcome
}
