//! `Reconciler`: settles charges whose outcome is unknown.
//!
//! A `pending` transaction older than the whole Stripe retry budget means billing lost track of a charge:
//! the database went away after Stripe answered, or billing died mid-charge. The reconciler asks Stripe
//! whether a charge exists for the order (search by `metadata[order_id]`): if it does, the charge is
//! recorded like any other (transaction, outbox event, notification), so there is never a charge without a
//! record; if it does not, the idempotency key is released. Each settlement is a `billing.reconcile` trace
//! carrying the original checkout's trace id as `checkout.trace_id` (only its id is stored, so it cannot
//! be the parent).
//!
//! A round runs under a PostgreSQL advisory lock ([`RECONCILE_LOCK`]), taken with `pg_try_advisory_lock` on
//! a connection of its own: of billing's replicas one reconciles at a time, a round that overlaps the next
//! (a slow Stripe) is not joined by it, and a replica that dies mid-round releases the lock with its
//! session, so the next round of any replica takes over.

use std::time::Duration;

use actix::{Actor, Addr, AsyncContext, Context, Supervised};
use tracehop_telemetry::actor::Traced;
use tracehop_telemetry::db::Database;
use tracehop_telemetry::propagation::SerializedContext;
use tracing::Instrument;

use super::billing::{ChargedOrder, record_charge};
use super::outbox::Relay;
use super::stripe::{FindCharge, StripeClientActor};
use crate::store::{self, Transaction};

/// The advisory lock key of the reconciler's rounds ("tracehop reconcile", as 8 bytes).
pub const RECONCILE_LOCK: i64 = 0x7472_6163_7265_636f;

pub struct Reconciler {
    database: Database,
    stripe: Addr<StripeClientActor>,
    relay: Relay,
    every: Duration,
    after: Duration,
}

impl Reconciler {
    pub fn new(
        database: Database,
        stripe: Addr<StripeClientActor>,
        relay: Relay,
        every: Duration,
        after: Duration,
    ) -> Self {
        Self {
            database,
            stripe,
            relay,
            every,
            after,
        }
    }
}

impl Actor for Reconciler {
    type Context = Context<Self>;

    fn started(&mut self, context: &mut Self::Context) {
        context.run_interval(self.every, |reconciler, context| {
            let database = reconciler.database.clone();
            let stripe = reconciler.stripe.clone();
            let relay = reconciler.relay.clone();
            let after = reconciler.after;
            context.spawn(actix::fut::wrap_future(reconcile_stale(
                database, stripe, relay, after,
            )));
        });
    }
}

impl Supervised for Reconciler {}

async fn reconcile_stale(
    database: Database,
    stripe: Addr<StripeClientActor>,
    relay: Relay,
    after: Duration,
) {
    let lock = match database.try_advisory_lock(RECONCILE_LOCK).await {
        Ok(Some(lock)) => lock,
        Ok(None) => {
            tracing::debug!("another round holds the reconcile lock; skipping this one");
            return;
        }
        Err(error) => {
            tracing::debug!(error = error.code(), "reconcile round skipped: no database");
            return;
        }
    };
    reconcile_round(&database, &stripe, &relay, after).await;
    lock.release().await;
}

/// Test hook (`fault-injection` builds only): `BILLING_FAULT_RECONCILE_DELAY_MS` slows every round that found
/// work by this much, between reading the pending charges and settling them, so rounds overlap the next
/// (the lock must keep them apart).
#[cfg(feature = "fault-injection")]
fn slow_round_fault() -> Option<Duration> {
    std::env::var("BILLING_FAULT_RECONCILE_DELAY_MS")
        .ok()?
        .trim()
        .parse()
        .ok()
        .map(Duration::from_millis)
}

/// One round, under the lock.
async fn reconcile_round(
    database: &Database,
    stripe: &Addr<StripeClientActor>,
    relay: &Relay,
    after: Duration,
) {
    let cutoff = chrono::Utc::now()
        - chrono::Duration::from_std(after).unwrap_or_else(|_| chrono::Duration::minutes(5));
    // Untraced, like the outbox sweep: the poll itself is not part of any request.
    let stale = database
        .run(move |connection, _| store::stale_pending(connection, cutoff, 50))
        .await;
    let Ok(stale) = stale else {
        return;
    };
    // A slow round (as with a slow Stripe): what it read is stale by the time it acts on it.
    #[cfg(feature = "fault-injection")]
    if let Some(delay) = slow_round_fault().filter(|_| !stale.is_empty()) {
        tokio::time::sleep(delay).await;
    }
    for transaction in stale {
        let span = tracing::info_span!(
            "billing.reconcile",
            otel.kind = "internal",
            order.id = %transaction.id,
            checkout.trace_id = %transaction.trace_id,
            reconcile.outcome = tracing::field::Empty,
        );
        reconcile_one(database, stripe, relay, transaction)
            .instrument(span)
            .await;
    }
}

async fn reconcile_one(
    database: &Database,
    stripe: &Addr<StripeClientActor>,
    relay: &Relay,
    transaction: Transaction,
) {
    let span = tracing::Span::current();
    let order_id = transaction.id;
    let found = stripe.send(Traced::new(FindCharge { order_id })).await;
    let outcome = match found {
        Ok(Ok(Some(charge))) => match verdict(&transaction, &charge) {
            Verdict::Record => {
                let order = ChargedOrder {
                    order_id,
                    user_id: transaction.user_id,
                    email: transaction.email.clone(),
                    amount_minor: transaction.amount_minor,
                    currency: transaction.currency.clone(),
                    charge_id: charge.id,
                };
                match record_charge(
                    database,
                    relay,
                    order,
                    SerializedContext::capture(&tracehop_telemetry::propagation::context_of(&span)),
                )
                .await
                {
                    Ok(()) => "recorded",
                    Err(error) => {
                        tracing::warn!(error = %error, "could not record the reconciled charge; next round");
                        "retry"
                    }
                }
            }
            // Declined: the order was not charged; the key goes back.
            Verdict::Release => release(database, order_id).await,
            // Still being decided at the provider: ask again next round.
            Verdict::Wait => "retry",
            // A charge that is not the one asked for: never recorded, never released, said loudly.
            Verdict::Mismatch => {
                tracehop_telemetry::setup::log_detail(
                    "charge mismatch",
                    &format!(
                        "charge {} is {} {}, the order {} {}",
                        charge.id,
                        charge.amount,
                        charge.currency,
                        transaction.amount_minor,
                        transaction.currency
                    ),
                );
                tracing::error!(
                    "the payment provider's charge does not match the order; left pending for a person"
                );
                "mismatch"
            }
        },
        Ok(Ok(None)) => release(database, order_id).await,
        Ok(Err(error)) => {
            tracing::warn!(error = %error, "Stripe search failed; next round");
            "retry"
        }
        Err(error) => {
            tracing::warn!(error = %error, "Stripe client unavailable; next round");
            "retry"
        }
    };
    span.record("reconcile.outcome", outcome);
    tracing::info!(%order_id, outcome, "reconciled a charge of unknown outcome");
}

/// Gives a pending order's key back (the provider has no successful charge for it): the outcome's name.
async fn release(database: &Database, order_id: uuid::Uuid) -> &'static str {
    let released = database
        .run(move |connection, statements| store::release(connection, statements, order_id))
        .await;
    if released.is_ok() {
        "released"
    } else {
        "retry"
    }
}

/// What to do with the charge the payment provider has for a pending order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// It succeeded, for this amount in this currency: record it.
    Record,
    /// It failed (declined): the order was not charged; give the key back.
    Release,
    /// It is still pending at the provider: ask again next round.
    Wait,
    /// Its amount or currency differ from the order's: a person must look.
    Mismatch,
}

/// The reconciler records only a charge that succeeded, for exactly the order's amount and currency (real
/// Stripe keeps declined charges, with status `failed`, and they are found by the same search).
fn verdict(transaction: &Transaction, charge: &super::stripe::StripeCharge) -> Verdict {
    match charge.status.as_str() {
        "failed" => Verdict::Release,
        "succeeded" => {
            if charge.amount == transaction.amount_minor
                && charge.currency.eq_ignore_ascii_case(&transaction.currency)
            {
                Verdict::Record
            } else {
                Verdict::Mismatch
            }
        }
        _ => Verdict::Wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::stripe::StripeCharge;

    fn order(amount_minor: i64, currency: &str) -> Transaction {
        Transaction {
            id: uuid::Uuid::nil(),
            user_id: uuid::Uuid::nil(),
            email: "a@example.com".into(),
            amount_minor,
            currency: currency.into(),
            status: "pending".into(),
            charge_id: None,
            idempotency_key: "k".into(),
            request_fingerprint: "f".into(),
            trace_id: "0".repeat(32),
            created_at: chrono::Utc::now(),
        }
    }

    fn charge(amount: i64, currency: &str, status: &str) -> StripeCharge {
        StripeCharge {
            id: "ch_1".into(),
            amount,
            currency: currency.into(),
            status: status.into(),
        }
    }

    #[test]
    fn only_a_succeeded_charge_of_the_orders_amount_and_currency_is_recorded() {
        let pending = order(4999, "usd");
        assert_eq!(
            verdict(&pending, &charge(4999, "usd", "succeeded")),
            Verdict::Record
        );
        assert_eq!(
            verdict(&pending, &charge(4999, "USD", "succeeded")),
            Verdict::Record
        );
        assert_eq!(
            verdict(&pending, &charge(4999, "usd", "failed")),
            Verdict::Release
        );
        assert_eq!(
            verdict(&pending, &charge(4999, "usd", "pending")),
            Verdict::Wait
        );
        assert_eq!(
            verdict(&pending, &charge(5000, "usd", "succeeded")),
            Verdict::Mismatch
        );
        assert_eq!(
            verdict(&pending, &charge(4999, "eur", "succeeded")),
            Verdict::Mismatch
        );
    }
}
