//! # tracehop-telemetry
//!
//! One distributed trace across actix-web services, NATS JetStream, actix actors and diesel, with every hop
//! a span and the W3C Trace Context carried across each of them. It knows nothing of the services that use
//! it: any actix-web service that talks HTTP, NATS and PostgreSQL can use it as tracehop's services do.
//!
//! - [`setup`]: OpenTelemetry from the standard `OTEL_*` environment ([`init`]), JSON logs that carry
//!   `trace_id`/`span_id`, a guard that flushes the last spans on shutdown, attribute value limits, and
//!   the span spool (`TRACEHOP_SPAN_SPOOL`): spans through a file, so a SIGKILLed process's are exported by
//!   a sibling.
//! - [`propagation`]: the strict W3C Trace Context Level 2 propagator ([`propagation::w3c`]) and the
//!   carriers for actix-web, `http` (reqwest) and NATS header maps, and for a stored context.
//! - [`http`]: the actix-web root span (HTTP server semantic conventions, an edge policy for what callers
//!   may set, `traceresponse`), the traced HTTP client (CLIENT spans, context injection) and one JSON error
//!   body.
//! - [`messaging`]: JetStream publish (PRODUCER span, context in NATS headers) and consume (CONSUMER span
//!   whose parent is the producer).
//! - [`actor`]: [`actor::Traced`], the envelope that carries span context through an actix mailbox.
//! - [`db`]: diesel over r2d2 on a blocking pool, one CLIENT span per statement; [`db::GroupCommit`] for
//!   small writes that many requests need (one statement per batch), [`db::RideAlong`] for those that can
//!   ride on a statement written anyway (no commit of their own).
//! - [`service`]: the shape of a service's `main` (telemetry, serve, log the error, flush).
//! - [`config`]: reading settings from the environment.
//!
//! See `README.md` beside this crate for a walk through each mechanism, and `examples/` for programs that
//! run them.

pub mod actor;
pub mod config;
pub mod db;
pub mod http;
pub mod messaging;
pub mod propagation;
pub mod service;
pub mod setup;

pub use setup::{TelemetryGuard, current_trace_id, init};

/// What the crate's own unit tests share.
#[cfg(test)]
pub(crate) mod testing {
    /// An exporter that keeps what it is given, for reading back.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct Keep(
        pub(crate) std::sync::Arc<std::sync::Mutex<Vec<opentelemetry_sdk::trace::SpanData>>>,
    );

    impl opentelemetry_sdk::trace::SpanExporter for Keep {
        async fn export(
            &self,
            batch: Vec<opentelemetry_sdk::trace::SpanData>,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            if let Ok(mut kept) = self.0.lock() {
                kept.extend(batch);
            }
            Ok(())
        }
    }
}

// The README's examples compile as doc tests, so the walk-through cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeExamples;
