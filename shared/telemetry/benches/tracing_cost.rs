//! What tracing costs the thread that serves a request: the span builders of `tracehop-telemetry`, and an actix
//! mailbox hop with and without the [`Traced`] envelope.
//!
//! Every case runs twice, under the subscriber the services install (`telemetry::dispatch_with_exporter`):
//! `traced` exports every span through the batch span processor, exactly as in production except that the
//! exporter at the end of the queue discards the batches (the collector and the network are measured by
//! `stack bench`, not here); `untraced` is the same subscriber with `OTEL_SDK_DISABLED=true` (spans still
//! exist for the logs' `trace_id`, nothing is exported). The difference is what the OpenTelemetry layer adds.
//!
//! Run: `cargo bench -p tracehop-telemetry --bench tracing_cost` (results in BENCHMARKS.md, section 3).
//! With `OTEL_TRACES_SAMPLER=always_off` the `traced` cases measure spans of a sampled-out trace: what a
//! request costs when it is not sampled (`./dev bench` runs both).

#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Message};
use criterion::{Criterion, criterion_group, criterion_main};
use diesel::prelude::*;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tracehop_telemetry::actor::Traced;
use tracehop_telemetry::db::{Statements, traced};
use tracehop_telemetry::messaging::{ConsumerTrace, Delivery, delivery_span, publish_span};
use tracehop_telemetry::propagation::{NatsHeaderInjector, inject};

// A table of the shape the services query, declared here: this crate knows no application's schema.
diesel::table! {
    transactions (id) {
        id -> Uuid,
        status -> Text,
    }
}
use tracehop_telemetry::setup::{TelemetryGuard, dispatch_with_exporter};
use tracing_actix_web::RootSpanBuilder;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The end of the export pipeline: takes each batch off the queue and drops it.
#[derive(Debug)]
struct DiscardExporter;

impl SpanExporter for DiscardExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        black_box(batch);
        Ok(())
    }
}

fn subscribers() -> Vec<(&'static str, tracing::Dispatch, TelemetryGuard)> {
    let (traced, traced_guard) = dispatch_with_exporter("bench", Some(DiscardExporter));
    let (untraced, untraced_guard) = dispatch_with_exporter("bench", None::<DiscardExporter>);
    vec![
        ("traced", traced, traced_guard),
        ("untraced", untraced, untraced_guard),
    ]
}

/// A parent span for the case, as a service would have (the request's server span, whose sampling
/// decision is taken when it starts: under `OTEL_TRACES_SAMPLER=always_off` every case below it is a span of
/// a sampled-out trace).
fn with_parent<R>(work: impl FnOnce() -> R) -> R {
    let parent = tracing::info_span!("bench.parent", otel.kind = "server");
    tracehop_telemetry::setup::note_sampling(&parent);
    parent.in_scope(work)
}

fn span_builders(c: &mut Criterion) {
    let request = actix_web::test::TestRequest::post()
        .uri("/checkout")
        .insert_header(("user-agent", "bench/1.0"))
        .insert_header((
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ))
        .to_srv_request();
    let outgoing = reqwest::Request::new(
        reqwest::Method::POST,
        reqwest::Url::parse("http://127.0.0.1:12111/v1/charges").expect("valid URL"),
    );
    let statements = Statements::new("tracehop");

    for (mode, dispatch, _guard) in subscribers() {
        let mut group = c.benchmark_group(format!("span_builders/{mode}"));
        tracing::dispatcher::with_default(&dispatch, || {
            group.bench_function("http_server_root_span", |b| {
                b.iter(|| {
                    let span = tracehop_telemetry::http::server::SemconvRootSpan::on_request_start(
                        black_box(&request),
                    );
                    drop(span.enter());
                })
            });
            group.bench_function("http_client_span_and_inject", |b| {
                with_parent(|| {
                    b.iter(|| {
                        let span =
                            tracehop_telemetry::http::client::client_span(&outgoing, "/v1/charges");
                        let mut headers = reqwest::header::HeaderMap::new();
                        inject(
                            &span.context(),
                            &mut tracehop_telemetry::propagation::HttpHeaderInjector(&mut headers),
                        );
                        drop(span.enter());
                        black_box(headers);
                    })
                })
            });
            group.bench_function("nats_publish_span_and_inject", |b| {
                with_parent(|| {
                    b.iter(|| {
                        let span = publish_span("order.completed", "7f1c2b9e-order", 180);
                        let mut headers = async_nats::HeaderMap::new();
                        inject(&span.context(), &mut NatsHeaderInjector(&mut headers));
                        drop(span.enter());
                        black_box(headers);
                    })
                })
            });
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            );
            headers.insert(async_nats::header::NATS_MESSAGE_ID, "7f1c2b9e-order");
            group.bench_function("nats_process_span_with_extract", |b| {
                b.iter(|| {
                    let span = delivery_span(&Delivery {
                        subject: "order.completed",
                        headers: Some(black_box(&headers)),
                        body_size: 180,
                        delivery_count: 1,
                        stream_sequence: 42,
                        trace: ConsumerTrace::Parent,
                    });
                    drop(span.enter());
                })
            });
            group.bench_function("db_statement_span", |b| {
                with_parent(|| {
                    b.iter(|| {
                        let query = transactions::table
                            .filter(transactions::id.eq(uuid::Uuid::nil()))
                            .select(transactions::status);
                        let outcome = traced(&statements, query, |query| {
                            black_box(&query);
                            Ok(())
                        });
                        black_box(outcome)
                    })
                })
            });
            group.bench_function("actor_envelope", |b| {
                with_parent(|| {
                    b.iter(|| {
                        let (message, span) = Traced::new(Ping(7)).into_parts::<Echo>();
                        drop(span.enter());
                        black_box(message)
                    })
                })
            });
        });
        group.finish();
    }
}

#[derive(Message)]
#[rtype(result = "u64")]
struct Ping(u64);

/// The smallest actor: answers a ping with its number, inside the handler span when there is one.
struct Echo;

impl Actor for Echo {
    type Context = Context<Self>;
}

impl Handler<Ping> for Echo {
    type Result = u64;
    fn handle(&mut self, message: Ping, _: &mut Self::Context) -> u64 {
        message.0
    }
}

impl Handler<Traced<Ping>> for Echo {
    type Result = u64;
    fn handle(&mut self, message: Traced<Ping>, _: &mut Self::Context) -> u64 {
        let (message, span) = message.into_parts::<Self>();
        span.in_scope(|| message.0)
    }
}

/// Round trips through an actix mailbox: `send(Ping)` against `send(Traced::new(Ping))`.
fn actor_hop(c: &mut Criterion) {
    for (mode, dispatch, _guard) in subscribers() {
        let mut group = c.benchmark_group(format!("actor_hop/{mode}"));
        tracing::dispatcher::with_default(&dispatch, || {
            let system = actix::System::new();
            let echo = system.block_on(async { Echo.start() });
            for enveloped in [false, true] {
                let name = if enveloped {
                    "traced_envelope"
                } else {
                    "plain_message"
                };
                group.bench_function(name, |b| {
                    b.iter_custom(|iterations| {
                        let echo = echo.clone();
                        system.block_on(async move {
                            let parent = tracing::info_span!("bench.parent", otel.kind = "server");
                            let _entered = parent.enter();
                            let started = Instant::now();
                            for i in 0..iterations {
                                let reply = if enveloped {
                                    echo.send(Traced::new(Ping(i))).await
                                } else {
                                    echo.send(Ping(i)).await
                                };
                                black_box(reply.ok());
                            }
                            started.elapsed()
                        })
                    })
                });
            }
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = span_builders, actor_hop
}
criterion_main!(benches);
