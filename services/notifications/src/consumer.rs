//! The JetStream consumer loop: one `process order.completed` span per delivery, ack after the e-mail is
//! sent and recorded, negative ack with back-off on failure, dead letter after the last attempt.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracehop_contracts::events::{ORDER_COMPLETED_DEAD_LETTER, OrderCompleted};
use tracehop_telemetry::actor::Traced;
use tracehop_telemetry::db::Database;
use tracehop_telemetry::messaging;
use tracehop_telemetry::propagation::header_value;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::notifier::{self, Delivery, Notifiers, SendConfirmation};

/// Everything a delivery needs.
#[derive(Clone)]
pub struct ConsumerDeps {
    pub jetstream: jetstream::Context,
    pub notifiers: Notifiers,
    pub database: Database,
    /// Deliveries before dead-lettering.
    pub max_deliver: i64,
    pub backoff: Duration,
    /// Consumer spans under the producer's, or in a trace of their own linked to it.
    pub consumer_trace: messaging::ConsumerTrace,
}

/// Pulls messages until `shutdown` flips, then waits for the ones in flight.
pub async fn run(
    consumer: jetstream::consumer::PullConsumer,
    deps: ConsumerDeps,
    concurrency: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut in_flight = JoinSet::new();
    'outer: loop {
        // Pull no more than can be worked on at once: a buffered message's ack wait would run out while it
        // waits, and JetStream would deliver it again beside the first copy.
        let pulled = consumer
            .stream()
            .max_messages_per_batch(concurrency.max(1))
            .messages()
            .await;
        let mut messages = match pulled {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(error = %error, "could not start pulling; retrying");
                tokio::select! {
                    _ = shutdown.changed() => break 'outer,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.changed() => break 'outer,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    let Ok(permit) = permits.clone().acquire_owned().await else {
                        break 'outer;
                    };
                    let deps = deps.clone();
                    in_flight.spawn(async move {
                        handle(&deps, message).await;
                        drop(permit);
                    });
                    while in_flight.try_join_next().is_some() {}
                }
                Some(Err(error)) => {
                    tracing::warn!(error = %error, "pull failed; continuing");
                }
                None => {
                    tracing::warn!("message stream ended; re-subscribing");
                    break;
                }
            }
        }
    }
    tracing::info!(in_flight = in_flight.len(), "consumer stopping; draining");
    while in_flight.join_next().await.is_some() {}
}

/// One delivery, in its CONSUMER span.
async fn handle(deps: &ConsumerDeps, message: jetstream::Message) {
    let span = messaging::process_span(&message, deps.consumer_trace);
    async {
        let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
        let event = match parse_delivery(message.headers.as_ref(), &message.payload) {
            Ok(event) => event,
            Err(malformed) => {
                dead_letter(deps, &message, &malformed.to_string()).await;
                return;
            }
        };
        let order_id = event.order_id;
        let outcome = deps
            .notifiers
            .next()
            .send(Traced::new(SendConfirmation { event }))
            .await;
        let failure = match outcome {
            Ok(Ok(Delivery::ClaimedElsewhere { retry_in })) => {
                // Another delivery of this order is sending right now. Not acked: if that one dies, this
                // message must still carry the e-mail. It comes back when the claim has run out, and then
                // finds the e-mail sent, or takes over a dead holder's claim.
                if let Err(error) = message.ack_with(AckKind::Nak(Some(retry_in))).await {
                    tracing::warn!(error = %error, "nak failed; JetStream redelivers after ack_wait");
                }
                return;
            }
            Ok(Ok(_)) => {
                if let Err(error) = message.ack().await {
                    // The e-mail is recorded as sent, so a redelivery will not send it again.
                    tracing::warn!(error = %error, "ack failed; a redelivery will be recognised as sent");
                }
                return;
            }
            Ok(Err(error)) => {
                // The detail (SQL error, panic message) for the log only; the trace gets the code.
                crate::mailer::log_detail("delivery failed", &format!("{error:?}"));
                error.code().to_owned()
            }
            Err(_) => "notifier_unavailable".to_owned(),
        };
        mark_error(&failure);
        if delivered >= deps.max_deliver {
            dead_letter(deps, &message, &format!("gave up after {delivered} deliveries: {failure}")).await;
            let reason = failure.clone();
            let marked = deps
                .database
                .run(move |connection, statements| {
                    notifier::mark_failed(connection, statements, order_id, &reason)
                })
                .await;
            if let Err(error) = marked {
                crate::mailer::log_detail("could not mark the notification failed", &error.to_string());
                tracing::error!(error = error.code(), %order_id, "could not mark the notification failed");
            }
        } else {
            let exponent = u32::try_from(delivered.saturating_sub(1)).unwrap_or(0).min(6);
            let delay = deps.backoff * 2_u32.pow(exponent);
            tracing::warn!(delivered, delay_ms = delay.as_millis() as u64, error = %failure, "delivery failed; will be redelivered");
            if let Err(error) = message.ack_with(AckKind::Nak(Some(delay))).await {
                tracing::warn!(error = %error, "nak failed; JetStream redelivers after ack_wait");
            }
        }
    }
    .instrument(span)
    .await
}

/// Why a delivery cannot be processed at all: it goes to the dead-letter subject at once, never retried.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Our producer always sets headers (at least `Nats-Msg-Id`; `traceparent` unless
    /// `OTEL_SDK_DISABLED`): a message without any did not come from billing.
    #[error("malformed message: no headers")]
    NoHeaders,
    /// Larger than any event billing publishes.
    #[error("malformed message: {0} bytes is larger than {MAX_EVENT_BYTES}")]
    TooLarge(usize),
    /// Not an `order.completed` event (the parser's words, without the payload's bytes).
    #[error("malformed message: {0}")]
    Payload(String),
}

/// The largest `order.completed` payload read; a real one is a few hundred bytes.
pub const MAX_EVENT_BYTES: usize = 16 * 1024;

/// The most of a malformed payload copied to the dead-letter subject (the whole message stays in the
/// stream at its sequence, named in `Tracehop-Original-Sequence`).
pub const MAX_DEAD_LETTER_PAYLOAD: usize = 64 * 1024;

/// The event in one delivery, whatever its bytes: an event, or why it is malformed. Never panics.
pub fn parse_delivery(
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
) -> Result<OrderCompleted, Malformed> {
    if headers.is_none() {
        return Err(Malformed::NoHeaders);
    }
    if payload.len() > MAX_EVENT_BYTES {
        return Err(Malformed::TooLarge(payload.len()));
    }
    serde_json::from_slice(payload).map_err(|error| {
        // serde_json's message can quote the offending input: keep only its category and position.
        let what = match error.classify() {
            serde_json::error::Category::Io => "unreadable",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "not an order.completed event",
            serde_json::error::Category::Eof => "truncated JSON",
        };
        Malformed::Payload(format!(
            "{what} (line {}, column {})",
            error.line(),
            error.column()
        ))
    })
}

/// The headers of a dead letter: the reason, the original subject and stream sequence, each made safe
/// for a header value (a caller's text never reaches the NATS client raw: it panics on a line break).
pub fn dead_letter_headers(
    reason: &str,
    subject: &str,
    stream_sequence: Option<u64>,
    payload_size: usize,
) -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(DEAD_LETTER_REASON, header_value(reason).as_str());
    headers.insert("Tracehop-Original-Subject", header_value(subject).as_str());
    if let Some(sequence) = stream_sequence {
        headers.insert("Tracehop-Original-Sequence", sequence.to_string().as_str());
    }
    if payload_size > MAX_DEAD_LETTER_PAYLOAD {
        headers.insert(
            "Tracehop-Payload-Truncated-From",
            payload_size.to_string().as_str(),
        );
    }
    headers
}

/// The header that says why a message was dead-lettered.
pub const DEAD_LETTER_REASON: &str = "Tracehop-Dead-Letter-Reason";

fn mark_error(reason: &str) {
    let span = tracing::Span::current();
    span.record("otel.status_code", "ERROR");
    span.record("error.type", "delivery_failed");
    span.set_status(opentelemetry::trace::Status::error(header_value(reason)));
}

/// Moves `message` to the dead-letter subject with the reason, then terminates it (no more redeliveries).
async fn dead_letter(deps: &ConsumerDeps, message: &jetstream::Message, reason: &str) {
    mark_error(reason);
    tracing::error!(reason, "dead-lettering message");
    let sequence = message.info().ok().map(|info| info.stream_sequence);
    let headers = dead_letter_headers(
        reason,
        message.subject.as_str(),
        sequence,
        message.payload.len(),
    );
    let original_id = messaging::message_id(message)
        .map(|id| header_value(&id))
        .unwrap_or_else(|| format!("seq-{}", sequence.unwrap_or_default()));
    let payload = message
        .payload
        .slice(..message.payload.len().min(MAX_DEAD_LETTER_PAYLOAD));
    let published = messaging::publish(
        &deps.jetstream,
        ORDER_COMPLETED_DEAD_LETTER,
        &format!("{original_id}-dead"),
        headers,
        payload,
        tracehop_telemetry::propagation::context_of(&tracing::Span::current()),
    )
    .await;
    match published {
        Ok(_) => {
            if let Err(error) = message.ack_with(AckKind::Term).await {
                tracing::warn!(error = %error, "terminating the message failed");
            }
        }
        // Not acked: JetStream redelivers and we try the dead letter again.
        Err(error) => tracing::error!(error = %error, "dead-letter publish failed"),
    }
}
