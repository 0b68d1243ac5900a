//! What tracing costs a service's process: the span builders of `tracehop-telemetry`, a JSON log line inside
//! a span, and an actix mailbox hop with and without the [`Traced`] envelope.
//!
//! Every case runs four times, under the subscriber the services install: `spooled` exports every span
//! through the span spool (`TRACEHOP_SPAN_SPOOL`, as the services run) and over OTLP/HTTP, as the services
//! do with the default protocol, to a receiver in this process that reads each request and answers 200 (so
//! the encoding and the HTTP client are measured; the collector's own work is not); `traced` through the
//! batch span processor (the spool unset), whose exporter discards the batches. `untraced` is the same subscriber with
//! `OTEL_SDK_DISABLED=true` (spans still exist for the logs' `trace_id`, nothing is exported). The difference
//! is what the OpenTelemetry layer adds. `floor` is the same subscriber around a tracer that records nothing
//! ([`RecordNothing`]): what `tracing`, `tracing-opentelemetry`'s layer and tracehop's own code spend on a
//! span before any SDK or span processor sees it, the least a traced span can cost with these crates.
//!
//! Everything is measured in CPU time of the whole process ([`ProcessCpu`]), so a span's figure includes
//! what the span processor's own thread spends on it.
//!
//! Run: `cargo bench -p tracehop-telemetry --bench tracing_cost` (results in BENCHMARKS.md, sections 3, 9, 15,
//! 20, 22 and 23).
//! With `OTEL_TRACES_SAMPLER=always_off` the `traced` cases measure spans of a sampled-out trace: what a
//! request costs when it is not sampled (`./dev bench` runs both).

#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use actix::{Actor, Context, Handler, Message};
use criterion::measurement::{Measurement, ValueFormatter};
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
use tracehop_telemetry::setup::{
    RecordNothing, TelemetryGuard, dispatch_with_exporter, dispatch_with_spool_to,
    dispatch_with_tracer,
};
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

/// The subscribers each case runs under, in this order: `traced` with the batch span processor,
/// `untraced` (`OTEL_SDK_DISABLED=true`), `floor` ([`RecordNothing`]), and `spooled` as the services run
/// (`TRACEHOP_SPAN_SPOOL`: every span through the span spool's file). The spool comes last and is made only when its turn comes: once one
/// exists, `propagation::inject` asks it about every context (`setup::expose`).
const MODES: [&str; 4] = ["traced", "untraced", "floor", "spooled"];

fn subscriber(mode: &str) -> (tracing::Dispatch, Option<TelemetryGuard>) {
    match mode {
        "spooled" => {
            let dir =
                std::env::temp_dir().join(format!("tracehop-bench-spool-{}", std::process::id()));
            let endpoint = discarding_receiver();
            let (dispatch, guard) =
                dispatch_with_spool_to("bench", &endpoint, &dir).expect("a spool in the temp dir");
            (dispatch, Some(guard))
        }
        "traced" => {
            let (dispatch, guard) = dispatch_with_exporter("bench", Some(DiscardExporter));
            (dispatch, Some(guard))
        }
        "floor" => (dispatch_with_tracer(RecordNothing::default()), None),
        _ => {
            let (dispatch, guard) = dispatch_with_exporter("bench", None::<DiscardExporter>);
            (dispatch, Some(guard))
        }
    }
}

/// An OTLP/HTTP receiver on a thread of this process that reads each request whole and answers 200 without
/// decoding it: the export path's far end, at the cost of reading the bytes. Returns its URL.
fn discarding_receiver() -> String {
    use std::io::{BufRead, BufReader, Read, Write};

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a local port");
    let url = format!(
        "http://{}/v1/traces",
        listener.local_addr().expect("its address")
    );
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                loop {
                    let mut length = 0;
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(value) =
                            line.to_ascii_lowercase().strip_prefix("content-length:")
                        {
                            length = value.trim().parse().unwrap_or(0);
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err()
                        || reader
                            .get_mut()
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// CPU time of the whole process, every thread: the serving thread's work and what the span processor's
/// export thread does for it (the spool's reading back, the batch processor's batching), so a span's cost
/// "including export" is what the process pays for it, wherever it is paid
/// (`clock_gettime(CLOCK_PROCESS_CPUTIME_ID)`).
struct ProcessCpu;

fn process_cpu_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

impl Measurement for ProcessCpu {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        process_cpu_ns()
    }
    fn end(&self, started: u64) -> u64 {
        process_cpu_ns().saturating_sub(started)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &CpuFormatter
    }
}

/// Nanoseconds of CPU, printed as `ns` (the unit every case here is in).
struct CpuFormatter;

impl ValueFormatter for CpuFormatter {
    fn scale_values(&self, _typical: f64, _values: &mut [f64]) -> &'static str {
        "ns (CPU)"
    }
    fn scale_throughputs(
        &self,
        _typical: f64,
        _throughput: &criterion::Throughput,
        _values: &mut [f64],
    ) -> &'static str {
        "ns (CPU)"
    }
    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

/// A parent span for the case, as a service would have (the request's server span, whose sampling
/// decision is taken when it starts: under `OTEL_TRACES_SAMPLER=always_off` every case below it is a span of
/// a sampled-out trace).
fn with_parent<R>(work: impl FnOnce() -> R) -> R {
    let parent = tracing::info_span!("bench.parent", otel.kind = "server");
    tracehop_telemetry::setup::note_sampling(&parent);
    parent.in_scope(work)
}

/// Every case under each subscriber in turn.
fn all_cases(c: &mut Criterion<ProcessCpu>) {
    for mode in MODES {
        let (dispatch, _guard) = subscriber(mode);
        span_builders(c, mode, &dispatch);
        actor_hop(c, mode, &dispatch);
    }
}

fn span_builders(c: &mut Criterion<ProcessCpu>, mode: &str, dispatch: &tracing::Dispatch) {
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

    {
        let mut group = c.benchmark_group(format!("span_builders/{mode}"));
        tracing::dispatcher::with_default(dispatch, || {
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
            // One log line inside a span, as every request's access line ("request finished"): the JSON
            // line formatted with the span's ids and written to standard output (here /dev/null, so the
            // bench's own output is not flooded; the write is still a system call).
            group.bench_function("log_line", |b| {
                with_parent(|| {
                    let _quiet = QuietStdout::new();
                    b.iter(|| tracing::info!(status = black_box(200_u16), "request finished"))
                })
            });
            // What each poll of an instrumented future costs, per span in its chain: an async span is
            // entered and left at every poll, not once.
            group.bench_function("enter_and_exit", |b| {
                with_parent(|| {
                    let span = tracing::info_span!("bench.polled");
                    b.iter(|| drop(black_box(&span).enter()))
                })
            });
        });
        group.finish();
    }
}

/// Standard output pointed at /dev/null while it lives, then restored: the `log_line` case writes millions
/// of lines, and criterion reports on standard output too (after the routine, when this is dropped).
struct QuietStdout(Option<std::os::fd::OwnedFd>);

impl QuietStdout {
    fn new() -> Self {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // Nothing is redirected that could not be restored.
        let saved = rustix::io::dup(std::io::stdout()).ok();
        if saved.is_some()
            && let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null")
        {
            let _ = rustix::stdio::dup2_stdout(&null);
        }
        Self(saved)
    }
}

impl Drop for QuietStdout {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        if let Some(saved) = &self.0 {
            let _ = rustix::stdio::dup2_stdout(saved);
        }
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
fn actor_hop(c: &mut Criterion<ProcessCpu>, mode: &str, dispatch: &tracing::Dispatch) {
    {
        let mut group = c.benchmark_group(format!("actor_hop/{mode}"));
        tracing::dispatcher::with_default(dispatch, || {
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
                            let started = process_cpu_ns();
                            for i in 0..iterations {
                                let reply = if enveloped {
                                    echo.send(Traced::new(Ping(i))).await
                                } else {
                                    echo.send(Ping(i)).await
                                };
                                black_box(reply.ok());
                            }
                            process_cpu_ns().saturating_sub(started)
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
        .with_measurement(ProcessCpu)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = all_cases
}
criterion_main!(benches);
