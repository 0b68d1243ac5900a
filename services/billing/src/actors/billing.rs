//! `BillingActor`: one checkout's charge, from idempotency claim to outbox.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Context, Handler, ResponseFuture, Supervised};
use sha2::{Digest, Sha256};
pub use tracehop_contracts::billing::ChargeReceipt;
use tracehop_contracts::events::{ORDER_COMPLETED, OrderCompleted};
use tracehop_telemetry::actor::{Traced, supervised_reply};
use tracehop_telemetry::db::{Database, DbError};
use tracehop_telemetry::http::error::{Failure, record_failure};
use tracehop_telemetry::propagation::SerializedContext;

use super::outbox::{Relay, RelayEvent};
use super::stripe::{CreateCharge, StripeClientActor, StripeError};
use crate::store::{self, Claim, OutboxEvent, PendingTransaction, RelayClaim};

/// How long a request waits for another request holding the same idempotency key to finish.
const CLAIM_WAIT: Duration = Duration::from_secs(30);

/// Charge a validated amount for a user.
#[derive(Debug, Clone, actix::Message)]
#[rtype(result = "Result<ChargeReceipt, ChargeError>")]
pub struct Charge {
    pub user_id: uuid::Uuid,
    pub email: String,
    pub amount_minor: i64,
    pub currency: String,
    pub idempotency_key: String,
}

/// Why a charge failed.
#[derive(Debug, thiserror::Error)]
pub enum ChargeError {
    #[error("this Idempotency-Key was already used for a different checkout")]
    IdempotencyKeyReused,
    #[error("a checkout with this Idempotency-Key is still in progress; retry later")]
    InProgress,
    #[error(transparent)]
    Payment(#[from] StripeError),
    /// Shown as its code: the driver's text stays in the log.
    #[error("database: {}", .0.code())]
    Database(#[from] DbError),
    #[error("internal: {0}")]
    Internal(String),
    /// The charge may or may not have been made (or was made and is not recorded yet); the order stays
    /// `pending` and the reconciler settles it with the payment provider.
    #[error("the outcome of the charge is not known yet ({reason}); the reconciler will settle it")]
    OutcomeUnknown {
        order_id: uuid::Uuid,
        reason: &'static str,
    },
}

impl Failure for ChargeError {
    /// The caller's doing: a reused key, a checkout still in progress, a declined card.
    fn is_client_error(&self) -> bool {
        matches!(
            self,
            Self::IdempotencyKeyReused | Self::InProgress | Self::Payment(StripeError::Declined(_))
        )
    }
}

/// What the handler futures share.
pub struct BillingDeps {
    pub database: Database,
    pub stripe: Addr<StripeClientActor>,
    pub relay: Relay,
    /// Fault injection for the supervision test (`BILLING_FAULT_PANIC_AMOUNT_MINOR`): charging exactly this
    /// amount panics inside the actor.
    pub panic_on_amount: Option<i64>,
}

/// Charges cards. It holds no state of its own; it is an actor because the design makes every in-process
/// hop of a checkout an actor message (the envelope makes the hop a span with its mailbox wait), and
/// because supervision turns a panicking charge into one failed request and a restart instead of a
/// crashed service.
pub struct BillingActor {
    deps: Arc<BillingDeps>,
}

impl BillingActor {
    pub fn new(deps: Arc<BillingDeps>) -> Self {
        Self { deps }
    }
}

impl Actor for BillingActor {
    type Context = Context<Self>;
}

impl Supervised for BillingActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        tracing::warn!(actor = "BillingActor", "actor restarting");
    }
}

impl Handler<Traced<Charge>> for BillingActor {
    type Result = ResponseFuture<Result<ChargeReceipt, ChargeError>>;

    fn handle(&mut self, message: Traced<Charge>, context: &mut Self::Context) -> Self::Result {
        let deps = self.deps.clone();
        supervised_reply(
            message,
            context,
            |charge| async move { charge_card(&deps, charge).await },
            |panic| {
                Err(ChargeError::Internal(format!(
                    "billing actor failed: {panic}"
                )))
            },
        )
    }
}

tracehop_telemetry::restart_on_request!(BillingActor);

/// SHA-256 of what the request asked for; the same key with another fingerprint is refused.
fn fingerprint(charge: &Charge) -> String {
    let text = format!(
        "{}|{}|{}",
        charge.user_id, charge.amount_minor, charge.currency
    );
    hex::encode(Sha256::digest(text.as_bytes()))
}

#[tracing::instrument(
    name = "billing.charge",
    skip_all,
    fields(
        billing.amount = charge.amount_minor,
        billing.currency = %charge.currency,
        user.id = %charge.user_id,
        order.id = tracing::field::Empty,
        billing.idempotent_replay = tracing::field::Empty,
    )
)]
async fn charge_card(deps: &BillingDeps, charge: Charge) -> Result<ChargeReceipt, ChargeError> {
    record_failure(
        async {
            let span = tracing::Span::current();
            #[cfg(feature = "fault-injection")]
            if deps.panic_on_amount == Some(charge.amount_minor) {
                panic!(
                    "injected panic (BILLING_FAULT_PANIC_AMOUNT_MINOR={})",
                    charge.amount_minor
                );
            }
            let request_fingerprint = fingerprint(&charge);
            // The order id is derived from (user, idempotency key): a retry after a released attempt asks Stripe
            // with the same parameters and the same Stripe key, so Stripe replays instead of refusing.
            let order_id =
                tracehop_contracts::billing::order_id(charge.user_id, &charge.idempotency_key);
            let pending = PendingTransaction {
                id: order_id,
                user_id: charge.user_id,
                email: charge.email.clone(),
                amount_minor: charge.amount_minor,
                currency: charge.currency.clone(),
                status: "pending".into(),
                idempotency_key: charge.idempotency_key.clone(),
                request_fingerprint: request_fingerprint.clone(),
                trace_id: tracehop_telemetry::setup::current_trace_id(),
            };

            // Claim the key; if someone else holds it, wait for their outcome (or for it to be released).
            let deadline = Instant::now() + CLAIM_WAIT;
            loop {
                let attempt = pending.clone();
                let claim = deps
                    .database
                    .run(move |connection, statements| {
                        store::claim(connection, statements, attempt)
                    })
                    .await?;
                match claim {
                    Claim::Claimed => break,
                    Claim::Existing(existing)
                        if existing.request_fingerprint != request_fingerprint =>
                    {
                        return Err(ChargeError::IdempotencyKeyReused);
                    }
                    Claim::Existing(existing) if existing.status == "charged" => {
                        return Ok(replayed(&span, *existing));
                    }
                    Claim::Vanished | Claim::Existing(_) => {
                        // Another request holds the key: wait for its outcome with reads only (no repeated
                        // inserts), backing off to 500 ms, then claim again if it released the key.
                        let mut pause = Duration::from_millis(50);
                        loop {
                            if Instant::now() >= deadline {
                                return Err(ChargeError::InProgress);
                            }
                            tokio::time::sleep(pause).await;
                            pause = (pause * 2).min(Duration::from_millis(500));
                            let holder = deps
                                .database
                                .run(move |connection, statements| {
                                    store::transaction(connection, statements, order_id)
                                })
                                .await?;
                            match holder {
                                None => break,
                                Some(existing) if existing.status == "charged" => {
                                    return Ok(replayed(&span, existing));
                                }
                                Some(_) => {}
                            }
                        }
                    }
                }
            }
            span.record("order.id", tracing::field::display(order_id));

            let created = deps
                .stripe
                .send(Traced::new(CreateCharge {
                    order_id,
                    user_id: charge.user_id,
                    amount_minor: charge.amount_minor,
                    currency: charge.currency.clone(),
                    idempotency_key: format!("tracehop-{order_id}"),
                }))
                .await
                .map_err(|error| {
                    ChargeError::Internal(format!("Stripe client actor unavailable: {error}"))
                });
            let created = match created {
                Ok(Ok(created)) => created,
                Ok(Err(error)) => {
                    if error.certainly_not_charged() {
                        release(deps, order_id).await;
                        return Err(error.into());
                    }
                    // A timeout or a 5xx: Stripe may have charged. The order stays pending for the
                    // reconciler, and the caller learns that, with the order id, rather than a bare error.
                    tracing::warn!(error = %error, "payment provider outcome unknown");
                    return Err(ChargeError::OutcomeUnknown {
                        order_id,
                        reason: "payment_provider_unavailable",
                    });
                }
                Err(error) => {
                    release(deps, order_id).await;
                    return Err(error);
                }
            };

            // The event keeps the context of this span (billing.charge), so its publish span joins the checkout
            // trace whenever it is relayed, even after a restart.
            let facts = ChargedOrder {
                order_id,
                user_id: charge.user_id,
                email: charge.email.clone(),
                amount_minor: charge.amount_minor,
                currency: charge.currency.clone(),
                charge_id: created.id.clone(),
            };
            let recorded = record_charge(
                &deps.database,
                &deps.relay,
                facts,
                SerializedContext::capture(&tracehop_telemetry::propagation::context_of(&span)),
            )
            .await;
            if let Err(error) = recorded {
                // Charged, not recorded: the reconciler finds the charge at Stripe and records it.
                tracing::warn!(error = %error, "charged but not recorded yet");
                return Err(ChargeError::OutcomeUnknown {
                    order_id,
                    reason: "charge_not_recorded",
                });
            }
            Ok(ChargeReceipt {
                order_id,
                charge_id: Some(created.id),
                status: "completed".into(),
                replayed: false,
            })
        }
        .await,
    )
}

/// The answer to a repeated key: the order the first request made.
fn replayed(span: &tracing::Span, existing: store::Transaction) -> ChargeReceipt {
    span.record("order.id", tracing::field::display(existing.id));
    span.record("billing.idempotent_replay", true);
    ChargeReceipt {
        order_id: existing.id,
        charge_id: existing.charge_id,
        status: "completed".into(),
        replayed: true,
    }
}

/// Gives the idempotency key back after a charge that certainly did not happen, so the customer may retry.
async fn release(deps: &BillingDeps, order_id: uuid::Uuid) {
    let outcome = deps
        .database
        .run(move |connection, statements| store::release(connection, statements, order_id))
        .await;
    if let Err(error) = outcome {
        tracing::error!(error = error.code(), %order_id, "could not release the idempotency key");
    }
}

/// A charge Stripe made, about to be recorded.
#[derive(Debug, Clone)]
pub struct ChargedOrder {
    pub order_id: uuid::Uuid,
    pub user_id: uuid::Uuid,
    pub email: String,
    pub amount_minor: i64,
    pub currency: String,
    pub charge_id: String,
}

/// Records a charge (transaction and outbox event: one statement) and hands the event to the relay, unless
/// it was recorded before (by another path, which relays it). `trace_context` is stored with the event: its
/// publish span will be that context's child.
pub async fn record_charge(
    database: &Database,
    relay: &Relay,
    order: ChargedOrder,
    trace_context: SerializedContext,
) -> Result<(), ChargeError> {
    let event = OrderCompleted {
        event_id: OrderCompleted::event_id_of(order.order_id),
        order_id: order.order_id,
        user_id: order.user_id,
        email: order.email.clone(),
        amount_minor: order.amount_minor,
        currency: order.currency.clone(),
        charge_id: order.charge_id.clone(),
    };
    let recorded = save_transaction(
        database,
        &relay.claim,
        order.order_id,
        &order.charge_id,
        event,
        trace_context,
    )
    .await?;
    if let Some(event) = recorded {
        relay.address.do_send(Traced::new(RelayEvent { event }));
    }
    Ok(())
}

#[tracing::instrument(name = "db.save_transaction", skip_all, fields(order.id = %order_id, stripe.charge_id = %charge_id), err(Display))]
async fn save_transaction(
    database: &Database,
    claim: &RelayClaim,
    order_id: uuid::Uuid,
    charge_id: &str,
    event: OrderCompleted,
    trace_context: SerializedContext,
) -> Result<Option<OutboxEvent>, ChargeError> {
    let payload =
        serde_json::to_string(&event).map_err(|error| ChargeError::Internal(error.to_string()))?;
    let trace_context = serde_json::to_string(&trace_context)
        .map_err(|error| ChargeError::Internal(error.to_string()))?;
    let outbox_event = OutboxEvent {
        id: event.event_id,
        subject: ORDER_COMPLETED.to_owned(),
        payload,
        trace_context,
    };
    let charge_id = charge_id.to_owned();
    let claim = claim.clone();
    let recorded = database
        .run(move |connection, statements| {
            let recorded = store::save_charged(
                connection,
                statements,
                order_id,
                &charge_id,
                &outbox_event,
                &claim,
            )?;
            Ok(recorded.then_some(outbox_event))
        })
        .await?;
    if recorded.is_none() {
        tracing::info!(%order_id, "the charge was already recorded");
    }
    Ok(recorded)
}
