//! # billing
//!
//! `POST /charge` hands the request to the [`actors::BillingActor`] (span `billing.charge`), which
//!
//! 1. claims the idempotency key (a `pending` transaction row; a repeated key returns the first order),
//! 2. asks the [`actors::StripeClientActor`] to charge the card over HTTP (span `stripe.create_charge`, one
//!    HTTP client span per attempt, retries with back-off behind a circuit breaker),
//! 3. records the charge and the `order.completed` outbox event in one statement (span
//!    `db.save_transaction`), the event already claimed by this replica,
//! 4. hands the event to the [`actors::OutboxRelay`], which publishes it to JetStream from memory (span
//!    `publish order.completed`, under `OutboxRelay handle RelayEvent`, or under an `outbox.relay` span
//!    when a sweep relays it late; either way inside the `billing.charge` of its checkout) and marks it
//!    sent with the next batch.
//!
//! Each HTTP worker (one per core) has its own billing, Stripe client and relay actors; the sweeping relay
//! and the reconciler run once per process, on the main thread.
//!
//! A [`actors::Reconciler`] settles charges whose outcome billing lost track of (database gone after Stripe
//! answered): it asks Stripe by order id and records or releases them.
//!
//! `GET /orders/{id}` reads an order with its notification status (the gateway checks ownership).
//! All actors carry span context in [`tracehop_telemetry::actor::Traced`] envelopes and are supervised.

#![forbid(unsafe_code)]

pub mod actors;
pub mod configuration;
pub mod routes;
pub mod startup;
pub mod store;
