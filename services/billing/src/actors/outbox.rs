//! `OutboxRelay`: publishes outbox events to JetStream, then marks them sent.
//!
//! Billing pokes the relay right after a charge is committed; a periodic sweep catches whatever that missed
//! (NATS down, billing restarted between commit and publish). Both paths first *claim* the event in
//! PostgreSQL (a lease naming this replica, [`store::RelayClaim`]), so billing's replicas never publish the same
//! event at once, and a dead replica's claims run out and are taken over by any sweep. Publishing uses the
//! event id as `Nats-Msg-Id` as well, so should a lease run out mid-publish and a second relay publish it,
//! JetStream keeps one (duplicate window: see [`tracehop_telemetry::messaging::StreamSettings`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, Handler, ResponseFuture, Supervised};
use async_nats::jetstream;
use opentelemetry::Context as OtelContext;
use tracehop_telemetry::actor::Traced;
use tracehop_telemetry::db::Database;
use tracehop_telemetry::messaging;
use tracehop_telemetry::propagation::{SerializedContext, set_remote_parent};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::store::{self, OutboxEvent, RelayClaim};

/// Publish this event now.
#[derive(Debug, Clone, actix::Message)]
#[rtype(result = "()")]
pub struct RelayEvent {
    pub event_id: uuid::Uuid,
}

pub struct OutboxRelay {
    database: Database,
    jetstream: jetstream::Context,
    sweep_every: Duration,
    paused: bool,
    claim: RelayClaim,
    /// Set while a sweep runs: a sweep stuck on a NATS outage must not be joined by the next one.
    sweeping: Arc<AtomicBool>,
}

impl OutboxRelay {
    pub fn new(
        database: Database,
        jetstream: jetstream::Context,
        sweep_every: Duration,
        paused: bool,
        claim: RelayClaim,
    ) -> Self {
        if paused {
            tracing::warn!("BILLING_OUTBOX_RELAY_PAUSED: events are recorded but not published");
        }
        Self {
            database,
            jetstream,
            sweep_every,
            paused,
            claim,
            sweeping: Arc::default(),
        }
    }
}

impl Actor for OutboxRelay {
    type Context = Context<Self>;

    fn started(&mut self, context: &mut Self::Context) {
        if self.paused {
            return;
        }
        context.run_interval(self.sweep_every, |relay, context| {
            if relay.sweeping.swap(true, Ordering::AcqRel) {
                return;
            }
            let database = relay.database.clone();
            let jetstream = relay.jetstream.clone();
            let sweeping = relay.sweeping.clone();
            let claim = relay.claim.clone();
            context.spawn(actix::fut::wrap_future(async move {
                sweep(database, jetstream, claim).await;
                sweeping.store(false, Ordering::Release);
            }));
        });
    }
}

impl Supervised for OutboxRelay {
    fn restarting(&mut self, _: &mut Self::Context) {
        tracing::warn!(actor = "OutboxRelay", "actor restarting");
    }
}

impl Handler<Traced<RelayEvent>> for OutboxRelay {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, message: Traced<RelayEvent>, _: &mut Self::Context) -> Self::Result {
        let (RelayEvent { event_id }, span) = message.into_parts::<Self>();
        if self.paused {
            return Box::pin(async {});
        }
        let database = self.database.clone();
        let jetstream = self.jetstream.clone();
        let claim = self.claim.clone();
        Box::pin(
            async move {
                let event = database
                    .run(move |connection, statements| {
                        store::claim_event(connection, statements, event_id, &claim)
                    })
                    .await;
                match event {
                    // Relayed right away: the publish is a child of this handler span (itself a child of
                    // billing.charge), so the in-process hop shows too.
                    Ok(Some(event)) => {
                        let parent = tracing::Span::current().context();
                        publish_event(&database, &jetstream, event, parent).await
                    }
                    Ok(None) => tracing::debug!(%event_id, "already published, or claimed by another relay"),
                    Err(error) => {
                        tracing::warn!(error = error.code(), %event_id, "could not load event; the sweep will retry")
                    }
                }
            }
            .instrument(span),
        )
    }
}

/// Claims and publishes the events still waiting (oldest first, at most 100 per sweep) that no other relay
/// holds. Events younger than a few seconds are left to the immediate path, which is normally about to
/// publish them.
async fn sweep(database: Database, jetstream: jetstream::Context, claim: RelayClaim) {
    let created_before = chrono::Utc::now() - chrono::Duration::seconds(3);
    let events = database
        .run(move |connection, _| store::claim_unpublished(connection, created_before, 100, &claim))
        .await;
    match events {
        Ok(events) => {
            if !events.is_empty() {
                tracing::info!(
                    count = events.len(),
                    "relaying outbox events that were not published right away"
                );
            }
            for event in events {
                let parent = restore_context(&event);
                let span = tracing::info_span!("outbox.relay", otel.kind = "internal", messaging.message.id = %event.id, outbox.late = true);
                set_remote_parent(&span, parent);
                let parent = span.context();
                publish_event(&database, &jetstream, event, parent)
                    .instrument(span)
                    .await;
            }
        }
        Err(error) => tracing::debug!(error = %error, "outbox sweep skipped"),
    }
}

fn restore_context(event: &OutboxEvent) -> OtelContext {
    serde_json::from_str::<SerializedContext>(&event.trace_context)
        .map(|context| context.restore())
        .unwrap_or_default()
}

/// Publishes one event (PRODUCER span, child of `parent`) and records the outcome.
async fn publish_event(
    database: &Database,
    jetstream: &jetstream::Context,
    event: OutboxEvent,
    parent: OtelContext,
) {
    let event_id = event.id;
    let outcome = messaging::publish(
        jetstream,
        &event.subject,
        &event.id.to_string(),
        async_nats::HeaderMap::new(),
        event.payload.into_bytes().into(),
        parent,
    )
    .await;
    let recorded = match outcome {
        Ok(_) => {
            database
                .run(move |connection, statements| {
                    store::mark_published(connection, statements, event_id)
                })
                .await
        }
        Err(error) => {
            let message = error.to_string();
            database
                .run(move |connection, statements| {
                    store::mark_publish_failed(connection, statements, event_id, &message)
                })
                .await
        }
    };
    if let Err(error) = recorded {
        tracing::warn!(error = error.code(), %event_id, "could not record the publish outcome; the sweep will retry");
    }
}
