//! The JetStream consumer loop: one `process order.completed` span per delivery, ack after the e-mail is
//! sent and recorded, negative ack with back-off on failure, dead letter after the last attempt.

use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracehop_shared::actor::Traced;
use tracehop_shared::db::Database;
use tracehop_shared::messaging::{self, ORDER_COMPLETED_DEAD_LETTER, OrderCompleted};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::notifier::{self, NotifierActor, SendConfirmation};

/// Everything a delivery needs.
#[derive(Clone)]
pub struct ConsumerDeps {
    pub jetstream: jetstream::Context,
    pub notifier: Addr<NotifierActor>,
    pub database: Database,
    /// Deliveries before dead-lettering.
    pub max_deliver: i64,
    pub backoff: Duration,
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
        let mut messages = match consumer.messages().await {
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
    let span = messaging::process_span(&message);
    async {
        let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
        // Our producer always sets headers (at least Nats-Msg-Id; traceparent unless OTEL_SDK_DISABLED):
        // a message without any did not come from billing.
        if message.headers.is_none() {
            dead_letter(deps, &message, "malformed message: no headers").await;
            return;
        }
        let event: OrderCompleted = match serde_json::from_slice(&message.payload) {
            Ok(event) => event,
            Err(error) => {
                dead_letter(deps, &message, &format!("malformed message: {error}")).await;
                return;
            }
        };
        let order_id = event.order_id;
        let outcome = deps
            .notifier
            .send(Traced::new(SendConfirmation { event }))
            .await;
        let failure = match outcome {
            Ok(Ok(_)) => {
                if let Err(error) = message.ack().await {
                    // The e-mail is recorded as sent, so a redelivery will not send it again.
                    tracing::warn!(error = %error, "ack failed; a redelivery will be recognised as sent");
                }
                return;
            }
            Ok(Err(error)) => error.to_string(),
            Err(error) => format!("notifier unavailable: {error}"),
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
                tracing::error!(error = %error, %order_id, "could not mark the notification failed");
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

fn mark_error(reason: &str) {
    let span = tracing::Span::current();
    span.record("otel.status_code", "ERROR");
    span.record("error.type", "delivery_failed");
    span.set_status(opentelemetry::trace::Status::error(reason.to_owned()));
}

/// Moves `message` to the dead-letter subject with the reason, then terminates it (no more redeliveries).
async fn dead_letter(deps: &ConsumerDeps, message: &jetstream::Message, reason: &str) {
    mark_error(reason);
    tracing::error!(reason, "dead-lettering message");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Tracehop-Dead-Letter-Reason", reason);
    headers.insert("Tracehop-Original-Subject", message.subject.as_str());
    let original_id = messaging::message_id(message).unwrap_or_else(|| {
        message
            .info()
            .map(|info| format!("seq-{}", info.stream_sequence))
            .unwrap_or_default()
    });
    let published = messaging::publish(
        &deps.jetstream,
        ORDER_COMPLETED_DEAD_LETTER,
        &format!("{original_id}-dead"),
        headers,
        message.payload.clone(),
        tracing::Span::current().context(),
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
