//! Replaying dead letters once their cause is fixed.
//!
//! The notifier moves a message to `order.completed.dead` after its last delivery (or when it cannot be
//! parsed). [`replay`] publishes each one back to `order.completed` under a PRODUCER span whose parent is the
//! checkout's context from the dead letter's headers, so the new delivery joins the same checkout trace, then
//! deletes it from the dead-letter subject. Messages that
//! were dead-lettered as malformed (reason `malformed message: ...`) are left alone: replaying them would
//! only fail again.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use tracehop_contracts::events::{ORDER_COMPLETED, ORDER_COMPLETED_DEAD_LETTER};
use tracehop_telemetry::{messaging, propagation};

/// What a replay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplayReport {
    pub replayed: usize,
    /// Malformed messages, left on the dead-letter subject.
    pub skipped: usize,
}

/// Replays every dead letter in `stream`, connected as `client` (a user allowed to publish
/// `order.completed` and read the dead letters: the operator). The trace context travels through the global
/// propagator, which [`tracehop_telemetry::init`] installs.
pub async fn replay(client: async_nats::Client, stream: &str) -> anyhow::Result<ReplayReport> {
    let jetstream = jetstream::new(client);
    let stream = jetstream
        .get_stream(stream)
        .await
        .with_context(|| format!("no JetStream stream {stream}"))?;
    let reader = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: ORDER_COMPLETED_DEAD_LETTER.to_owned(),
            ack_policy: consumer::AckPolicy::Explicit,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await?;
    let mut report = ReplayReport::default();
    let mut messages = reader
        .fetch()
        .max_messages(10_000)
        .expires(Duration::from_secs(2))
        .messages()
        .await?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|error| anyhow::anyhow!("reading dead letters: {error}"))?;
        let sequence = message
            .info()
            .map_err(|error| anyhow::anyhow!("{error}"))?
            .stream_sequence;
        let headers = message.headers.clone().unwrap_or_default();
        let reason = headers
            .get("Tracehop-Dead-Letter-Reason")
            .map(|value| value.as_str().to_owned())
            .unwrap_or_default();
        if reason.starts_with("malformed") {
            report.skipped += 1;
            message
                .ack()
                .await
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            continue;
        }
        let original = headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|value| value.as_str().trim_end_matches("-dead").to_owned())
            .unwrap_or_else(|| format!("seq-{sequence}"));
        // A fresh id: the original one is still inside JetStream's duplicate window.
        let message_id = format!("{original}-replay-{}", uuid::Uuid::new_v4().simple());
        // The dead letter carries the checkout's context: the replay's PRODUCER span, and so the new
        // delivery, join the checkout's trace.
        let checkout = propagation::extract(&propagation::NatsHeaderExtractor(&headers));
        messaging::publish(
            &jetstream,
            ORDER_COMPLETED,
            &message_id,
            async_nats::HeaderMap::new(),
            message.payload.clone(),
            checkout,
        )
        .await?;
        stream.delete_message(sequence).await?;
        report.replayed += 1;
    }
    Ok(report)
}
