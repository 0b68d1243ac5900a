//! # tracehop-shared
//!
//! Everything the tracehop services have in common, written once so that every hop of a checkout is traced
//! the same way:
//!
//! - [`telemetry`]: OpenTelemetry set-up from the standard `OTEL_*` environment, JSON logs that carry
//!   `trace_id`/`span_id`, and a guard that flushes the last spans on shutdown.
//! - [`propagation`]: W3C Trace Context carriers for actix-web, `http` (reqwest) and NATS header maps.
//! - [`http`]: the actix-web root span (HTTP server semantic conventions, `traceresponse` header), the traced
//!   HTTP client (CLIENT spans, context injection) and the JSON error body every service answers with.
//! - [`messaging`]: JetStream publish (PRODUCER span, context in NATS headers) and consume (CONSUMER span whose
//!   parent is the producer).
//! - [`actor`]: [`actor::Traced`], the envelope that carries span context through an actix mailbox.
//! - [`db`]: diesel over r2d2 on the blocking pool, one CLIENT span per statement.
//! - [`schema`]: the diesel tables of `migrations/`.
//! - [`service`]: the shape of every service's `main` (telemetry, serve, log the error, flush).
//! - [`domain`]: money in minor units, currency codes and e-mail addresses, parsed at the edge.

pub mod actor;
pub mod config;
pub mod db;
pub mod domain;
pub mod http;
pub mod messaging;
pub mod propagation;
pub mod schema;
pub mod service;
pub mod telemetry;
