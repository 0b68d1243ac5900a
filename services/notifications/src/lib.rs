//! # notifications
//!
//! A durable JetStream consumer of `order.completed`. Each delivery runs in a `process order.completed`
//! CONSUMER span (child of billing's publish span, so the e-mail is part of the checkout trace) and is handed
//! to one of the [`notifier::NotifierActor`]s (one per core, each on a thread of its own), which claims the
//! notification in PostgreSQL, sends the confirmation (span `notification.send_confirmation`) and records it
//! with the next batch of sent e-mails.
//!
//! - The message is acked only after the e-mail is sent *and* recorded; a redelivery of an order whose
//!   e-mail is already recorded as sent is acked without sending again.
//! - A failed send is negatively acked with a delay; after the last delivery the message goes to
//!   `order.completed.dead` and the notification is marked `failed`.
//! - A message that cannot be parsed goes to the dead-letter subject with the reason, and is never retried.
//!
//! HTTP: `GET /healthz`; `GET /notifications/{orderId}?orderedAt=` for the gateway (service token checked
//! first); with the `fault-injection` feature (on by default, off in the Dockerfile's build)
//! also `POST /_admin/faults` `{"failNext": n}` (make the next n sends fail, for the `lost-email` demo and the
//! tests). A production build answers 404 there.

#![forbid(unsafe_code)]

pub mod configuration;
pub mod consumer;
pub mod mailer;
pub mod notifier;
pub mod routes;
pub mod startup;
