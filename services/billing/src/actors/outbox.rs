//! `OutboxRelay`: publishes outbox events to JetStream, then marks them sent.
//!
//! Billing hands the relay each event right after the charge is committed, and the relay publishes it from
//! memory: the event row was written already claimed by this replica (a lease naming it,
//! [`store::RelayClaim`], in the same statement as the charge), so nothing is read back. Published events
//! are marked in batches ([`GroupCommit`]): one statement a second for all the events published in it
//! ([`MARK_LINGER`]). A periodic sweep catches whatever the immediate path missed (NATS down, billing
//! restarted between commit and publish); it claims the events it takes (`FOR UPDATE SKIP LOCKED`), so
//! billing's replicas never publish the same event at once, and a dead replica's claims run out and are
//! taken over by any sweep. Publishing uses the event id as `Nats-Msg-Id` as well, so should a lease run out
//! mid-publish, or the batch that marks an event fail, and a second relay publish it, JetStream keeps one
//! (duplicate window: see [`tracehop_telemetry::messaging::StreamSettings`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, Handler, ResponseFuture, Supervised};
use async_nats::jetstream;
use opentelemetry::Context as OtelContext;
use tracehop_telemetry::actor::Traced;
use tracehop_telemetry::db::{Database, GroupCommit};
use tracehop_telemetry::messaging;
use tracehop_telemetry::propagation::{SerializedContext, set_remote_parent};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::store::{self, OutboxEvent, RelayClaim};

/// How long a published event waits to be marked, with the others published meanwhile: one `UPDATE outbox`
/// a second instead of one per few events (0.29 statements and commits per checkout at 800 checkouts/s,
/// BENCHMARKS.md section 7). Nobody waits for the mark, and the event's own claim keeps the sweep off it far
/// longer than this ([`store::RelayClaim`]); a mark lost with the process costs a republish that JetStream's
/// duplicate window drops.
const MARK_LINGER: Duration = Duration::from_secs(1);
/// The most events one mark covers.
const MARK_BATCH: usize = 5000;

/// Publish this event now: it was just committed, claimed by this replica.
#[derive(Debug, Clone, actix::Message)]
#[rtype(result = "()")]
pub struct RelayEvent {
    pub event: OutboxEvent,
}

/// What billing holds to hand events to the relay: the relay's address, and the claim the events are
/// written with (this replica's, so that the relay may publish them without claiming them again).
#[derive(Clone)]
pub struct Relay {
    pub address: actix::Addr<OutboxRelay>,
    pub claim: RelayClaim,
}

pub struct OutboxRelay {
    database: Database,
    jetstream: jetstream::Context,
    /// `None` for the relays of the HTTP workers: one relay per process sweeps.
    sweep_every: Option<Duration>,
    paused: bool,
    claim: RelayClaim,
    /// Marks published events, in batches.
    published: Option<GroupCommit<uuid::Uuid>>,
    /// Set while a sweep runs: a sweep stuck on a NATS outage must not be joined by the next one.
    sweeping: Arc<AtomicBool>,
}

impl OutboxRelay {
    pub fn new(
        database: Database,
        jetstream: jetstream::Context,
        sweep_every: Option<Duration>,
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
            published: None,
            sweeping: Arc::default(),
        }
    }

    /// The batch writer, started on first use (it needs the actor's runtime).
    fn published(&mut self) -> GroupCommit<uuid::Uuid> {
        self.published
            .get_or_insert_with(|| {
                GroupCommit::start_lingering(
                    self.database.clone(),
                    MARK_BATCH,
                    MARK_LINGER,
                    store::mark_published,
                )
            })
            .clone()
    }
}

impl Actor for OutboxRelay {
    type Context = Context<Self>;

    fn started(&mut self, context: &mut Self::Context) {
        let Some(sweep_every) = self.sweep_every.filter(|_| !self.paused) else {
            return;
        };
        context.run_interval(sweep_every, |relay, context| {
            if relay.sweeping.swap(true, Ordering::AcqRel) {
                return;
            }
            let database = relay.database.clone();
            let jetstream = relay.jetstream.clone();
            let sweeping = relay.sweeping.clone();
            let claim = relay.claim.clone();
            let published = relay.published();
            context.spawn(actix::fut::wrap_future(async move {
                sweep(database, jetstream, published, claim).await;
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
        let (RelayEvent { event }, span) = message.into_parts::<Self>();
        if self.paused {
            return Box::pin(async {});
        }
        let database = self.database.clone();
        let jetstream = self.jetstream.clone();
        let published = self.published();
        Box::pin(
            async move {
                // Relayed right away: the publish is a child of this handler span (itself a child of
                // billing.charge), so the in-process hop shows too.
                let parent = tracehop_telemetry::propagation::context_of(&tracing::Span::current());
                publish_event(&database, &jetstream, &published, event, parent).await
            }
            .instrument(span),
        )
    }
}

/// Claims and publishes the events still waiting (oldest first, at most 100 per sweep) that no other relay
/// holds. Events younger than a few seconds are left to the immediate path, which is normally about to
/// publish them.
async fn sweep(
    database: Database,
    jetstream: jetstream::Context,
    published: GroupCommit<uuid::Uuid>,
    claim: RelayClaim,
) {
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
                publish_event(&database, &jetstream, &published, event, parent)
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

/// Publishes one event (PRODUCER span, child of `parent`) and records the outcome: a success with the next
/// batch of `published`, a failure at once (releasing the claim, so that the sweep retries).
async fn publish_event(
    database: &Database,
    jetstream: &jetstream::Context,
    published: &GroupCommit<uuid::Uuid>,
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
            published.submit(event_id);
            Ok(())
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
