//! `stack bench`: the benchmarks of BENCHMARKS.md, reproducible by one command (`./dev bench`).
//!
//! Each configuration gets a fresh stack of release binaries (own NATS, own database, embedded collector),
//! so runs do not disturb each other; traced and untraced runs alternate within one session.

mod compare;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use crate::load::{self, LoadOptions, LoadReport};
use crate::process::free_port;
use crate::stack::{NatsChoice, Ports, SERVICES, Stack, StackOptions, TraceBackend};
use crate::trace_view::TraceView;

/// Knobs of a benchmark session.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub database_server_url: String,
    pub state_dir: std::path::PathBuf,
    /// Closed-loop clients for the overhead runs.
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub rounds: usize,
    pub completeness_duration: Duration,
    /// The completeness run's open-loop rate when it runs alone (with everything, 80% of the best traced
    /// throughput of the overhead runs).
    pub completeness_rate: Option<f64>,
    /// The open-loop rate of the fixed-rate overhead runs (below what both configurations sustain).
    pub fixed_rate: f64,
    /// Run one part only (all when `None`).
    pub only: Option<BenchPart>,
    /// The services' binaries of the baseline build that section 6 compares with (`None`: no baseline).
    pub baseline_bin_dir: Option<std::path::PathBuf>,
    /// Closed-loop clients of section 6's runs.
    pub compare_concurrency: usize,
    /// Extra environment for the services of the overhead runs (`--service-env KEY=VALUE`), applied last:
    /// e.g. `TRACEHOP_SPAN_SPOOL=` to measure the batch span processor instead of the spool.
    pub service_env: Vec<(String, String)>,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` of every service in every run: `grpc` or `http/protobuf`.
    pub otlp_protocol: String,
}

/// The parts of a benchmark session that can run alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPart {
    /// Sections 1 and 4: traced against untraced stacks, alternating, with CPU and memory per service.
    Overhead,
    /// Part of section 3: NATS hops at rest (bare core NATS; JetStream with and without propagation).
    Hops,
    /// Section 6: CPU, statements and commits per checkout against the baseline build; one core against two.
    Compare,
    /// Section 2 (with section 3's hops under load and section 5's time split) at `--completeness-rate`.
    Completeness,
}

/// CPU time (user + system) and resident memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessSample {
    pub cpu_ticks: u64,
    /// CPU of the span export thread(s): the batch span processor's (`OpenTelemetry.Traces.BatchProcessor`)
    /// or the span spool's (`span-spool`).
    pub export_cpu_ticks: u64,
    pub rss_kib: u64,
}

/// utime + stime of a `/proc/.../stat` file, in clock ticks.
fn cpu_ticks(stat_path: &std::path::Path) -> u64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    // Fields after the `)` of the command name: state is field 3, utime 14, stime 15.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    ticks(11) + ticks(12)
}

/// CPU ticks of the threads of `pid` whose name starts with `OpenTelemetry` (the SDK names its threads).
fn export_thread_ticks(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|name| name.starts_with("OpenTelemetry") || name.trim() == "span-spool")
        })
        .map(|task| cpu_ticks(&task.path().join("stat")))
        .sum()
}

fn sample(pid: u32) -> ProcessSample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    ProcessSample {
        cpu_ticks: cpu_ticks(std::path::Path::new(&format!("/proc/{pid}/stat"))),
        export_cpu_ticks: export_thread_ticks(pid),
        rss_kib,
    }
}

/// The services' process ids, by name.
fn service_pids(stack: &mut Stack) -> Vec<(String, u32)> {
    SERVICES
        .iter()
        .filter_map(|name| Some(((*name).to_owned(), stack.service(name)?.pid()?)))
        .collect()
}

fn samples(pids: &[(String, u32)]) -> BTreeMap<String, ProcessSample> {
    pids.iter()
        .map(|(name, pid)| (name.clone(), sample(*pid)))
        .collect()
}

async fn start(
    options: &BenchOptions,
    traced: bool,
    label: &str,
    trace_backend: TraceBackend,
) -> anyhow::Result<Stack> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut extra_env = vec![("RUST_LOG".to_owned(), "warn".to_owned())];
    if !traced {
        extra_env.push(("OTEL_SDK_DISABLED".to_owned(), "true".to_owned()));
    }
    extra_env.extend(options.service_env.iter().cloned());
    Stack::start(StackOptions {
        state_dir: options.state_dir.join(format!("{label}-{}", &id[..8])),
        ports: Ports::free()?,
        nats: NatsChoice::Private { port: free_port()? },
        database_server_url: options.database_server_url.clone(),
        database_name: format!("tracehop_bench_{}", &id[..12]),
        trace_backend,
        otlp_protocol: options.otlp_protocol.clone(),
        extra_env,
        replicas: 1,
        bin_dir: None,
        cpus: None,
    })
    .await
}

async fn finish(mut stack: Stack, options: &BenchOptions) {
    let database = stack.options.database_name.clone();
    stack.stop();
    let _ = crate::infra::drop_database(&options.database_server_url, &database).await;
}

/// One measured run: load report, CPU ticks per successful checkout per service, RSS at rest and at load.
pub struct RunResult {
    pub report: LoadReport,
    pub cpu_ms_per_checkout: BTreeMap<String, f64>,
    /// The part of `cpu_ms_per_checkout` spent on the span export threads.
    pub export_cpu_ms_per_checkout: BTreeMap<String, f64>,
    pub rss_rest_mib: BTreeMap<String, f64>,
    pub rss_load_mib: BTreeMap<String, f64>,
    /// This process's CPU per checkout: the load generator and, in-process, the collector. What tracing adds
    /// here is the collector's share of the two cores (in production it runs elsewhere).
    pub bench_process_cpu_ms_per_checkout: f64,
}

async fn measured_run(
    stack: &mut Stack,
    load_options: &LoadOptions,
    users: Vec<crate::client::ApiClient>,
) -> anyhow::Result<RunResult> {
    let pids = service_pids(stack);
    let own_pid = std::process::id();
    let rest = samples(&pids);
    // CPU is counted from the end of the warm-up, like the checkouts it is divided by.
    let measure_start = tokio::spawn({
        let pids = pids.clone();
        let warmup = load_options.warmup;
        async move {
            tokio::time::sleep(warmup).await;
            (samples(&pids), sample(own_pid))
        }
    });
    let report = load::run(load_options, users).await?;
    let loaded = samples(&pids);
    let own_loaded = sample(own_pid);
    let (measure_start, own_start) = measure_start.await?;
    // Clock ticks are 1/100 s on Linux.
    let checkouts = report.checkout.count.max(1) as f64;
    let per_checkout = |ticks: fn(&ProcessSample) -> u64| -> BTreeMap<String, f64> {
        loaded
            .iter()
            .map(|(name, after)| {
                let before = measure_start.get(name).copied().unwrap_or_default();
                let used = ticks(after).saturating_sub(ticks(&before));
                (name.clone(), used as f64 * 10.0 / checkouts)
            })
            .collect()
    };
    let cpu_ms_per_checkout = per_checkout(|sample| sample.cpu_ticks);
    let export_cpu_ms_per_checkout = per_checkout(|sample| sample.export_cpu_ticks);
    let mib = |map: &BTreeMap<String, ProcessSample>| {
        map.iter()
            .map(|(name, s)| (name.clone(), s.rss_kib as f64 / 1024.0))
            .collect()
    };
    let bench_process_cpu_ms_per_checkout =
        own_loaded.cpu_ticks.saturating_sub(own_start.cpu_ticks) as f64 * 10.0 / checkouts;
    Ok(RunResult {
        report,
        cpu_ms_per_checkout,
        export_cpu_ms_per_checkout,
        bench_process_cpu_ms_per_checkout,
        rss_rest_mib: mib(&rest),
        rss_load_mib: mib(&loaded),
    })
}

/// Span names every complete checkout trace has.
pub const EXPECTED_SPANS: [&str; 15] = [
    "POST /checkout",
    "checkout.process",
    "session.validate",
    "BillingActor handle Charge",
    "billing.charge",
    "StripeClientActor handle CreateCharge",
    "stripe.create_charge",
    "POST /v1/charges",
    "db.save_transaction",
    "publish order.completed",
    "process order.completed",
    "NotifierActor handle SendConfirmation",
    "notification.send_confirmation",
    "INSERT notifications",
    "notification.record_sent",
];

/// Whether a trace is whole: every expected span, one root, every parent present.
pub fn is_complete(trace: &TraceView) -> bool {
    EXPECTED_SPANS
        .iter()
        .all(|name| !trace.named(name).is_empty())
        && trace.roots().len() == 1
        && trace
            .spans
            .iter()
            .filter(|s| s.parent_id.is_some())
            .all(|s| trace.parent(s).is_some())
}

/// Where one checkout's time went, in milliseconds, from its trace.
pub fn time_split(trace: &TraceView) -> Option<BTreeMap<&'static str, f64>> {
    let ms = |us: u64| us as f64 / 1000.0;
    let total = |name: &str| trace.named(name).iter().map(|s| s.duration_us).sum::<u64>();
    let root = trace.named("POST /checkout").first().copied()?;
    let users = trace
        .named("POST /sessions/validate")
        .into_iter()
        .find(|s| s.service == "gateway")?
        .duration_us;
    let billing_call = trace
        .named("POST /charge")
        .into_iter()
        .find(|s| s.service == "gateway")?
        .duration_us;
    let stripe = total("POST /v1/charges");
    let billing_db: u64 = trace
        .spans
        .iter()
        .filter(|s| s.service == "billing" && s.tag("db.system.name").is_some())
        .map(|s| s.duration_us)
        .sum();
    let publish = trace.named("publish order.completed").first().copied()?;
    let process = trace.named("process order.completed").first().copied()?;
    let billing_own = billing_call
        .saturating_sub(stripe)
        .saturating_sub(billing_db);
    Some(BTreeMap::from([
        (
            "gateway (own)",
            ms(root.duration_us.saturating_sub(users + billing_call)),
        ),
        ("users (incl. its DB)", ms(users)),
        ("billing (own, incl. actor hops)", ms(billing_own)),
        ("Stripe (HTTP)", ms(stripe)),
        ("billing DB statements", ms(billing_db)),
        (
            "NATS (publish start -> process start)",
            ms(process.start_us.saturating_sub(publish.start_us)),
        ),
        ("notification (process span)", ms(process.duration_us)),
        (
            "of which the sent record's wait (notification.record_sent)",
            ms(total("notification.record_sent")),
        ),
        ("checkout as the customer sees it", ms(root.duration_us)),
    ]))
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[((values.len() as f64 - 1.0) * q).round() as usize]
}

async fn fetch_traces(jaeger: &str, ids: &[String]) -> Vec<Option<TraceView>> {
    let traces: Vec<Result<TraceView, String>> = futures::stream::iter(ids.iter().cloned())
        .map(|id| async move {
            TraceView::fetch(jaeger, &id)
                .await
                .map_err(|e| format!("{e:#}"))
        })
        .buffered(16)
        .collect()
        .await;
    if let Some(Err(error)) = traces.iter().find(|t| t.is_err()) {
        eprintln!(
            "{} of {} traces could not be fetched, e.g.: {error}",
            traces.iter().filter(|t| t.is_err()).count(),
            traces.len()
        );
    }
    traces.into_iter().map(Result::ok).collect()
}

fn split_medians(traces: &[Option<TraceView>]) -> BTreeMap<String, f64> {
    let mut columns: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    for trace in traces.iter().flatten() {
        if let Some(split) = time_split(trace) {
            for (name, value) in split {
                columns.entry(name).or_default().push(value);
            }
        }
    }
    columns
        .into_iter()
        .map(|(name, mut values)| (name.to_owned(), median(&mut values)))
        .collect()
}

/// Runs every benchmark and returns the results as JSON.
pub async fn run(options: BenchOptions) -> anyhow::Result<serde_json::Value> {
    let mut results = serde_json::Map::new();
    results.insert(
        "otlp_protocol".to_owned(),
        options.otlp_protocol.clone().into(),
    );
    if options.only.is_none() || options.only == Some(BenchPart::Compare) {
        results.insert("compare".to_owned(), compare::run(&options).await?);
    }
    // With every part, 80% of the best traced throughput of the overhead runs.
    let mut completeness_rate = None;
    if options.only.is_none() || options.only == Some(BenchPart::Overhead) {
        let (overhead, max_rate) = overhead_runs(&options).await?;
        results.insert("overhead".to_owned(), overhead.into());
        if options.only.is_none() {
            eprintln!("== completeness at 80% of {max_rate:.0} req/s");
            completeness_rate = Some(max_rate * 0.8);
        }
    }
    if options.only == Some(BenchPart::Completeness) {
        completeness_rate = Some(
            options
                .completeness_rate
                .ok_or_else(|| anyhow::anyhow!("--only completeness needs --completeness-rate"))?,
        );
    }
    if let Some(rate) = completeness_rate {
        // 2, 3 and 5: completeness, hop costs and the time split.
        let (completeness, hops, time_split) = completeness_run(&options, rate).await?;
        results.insert("completeness".to_owned(), completeness);
        results.insert("hops_under_load".to_owned(), hops);
        results.insert("time_split_ms".to_owned(), time_split);
    }
    if options.only.is_none() || options.only == Some(BenchPart::Hops) {
        eprintln!("== NATS hops at rest");
        results.insert(
            "bare_nats_core_pubsub_ms".to_owned(),
            bare_nats_latency(&options).await.unwrap_or_default(),
        );
        results.insert(
            "jetstream_publish_to_process_at_rest_ms".to_owned(),
            jetstream_hop(&options, 2000).await?,
        );
    }
    Ok(results.into())
}

/// Sections 1 and 4: the overhead rounds; returns them with the best traced throughput.
async fn overhead_runs(options: &BenchOptions) -> anyhow::Result<(Vec<serde_json::Value>, f64)> {
    let closed = |duration, warmup| LoadOptions {
        gateway: String::new(),
        rate: None,
        concurrency: options.concurrency,
        duration,
        warmup,
        users: 50,
        // Checkouts only: the ratio is of checkouts per second.
        lookup_share: 0.0,
        progress: true,
        slow_stripe: None,
    };

    // 1 and 4: tracing overhead and resources, traced and untraced alternating.
    let mut overhead = Vec::new();
    for round in 0..options.rounds {
        // Alternate which configuration goes first: the first stack of a session runs on colder caches.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for traced in order {
            let label = if traced { "traced" } else { "untraced" };
            eprintln!("== overhead round {} ({label})", round + 1);
            // The overhead runs export every span to a collector that only counts them: on two cores, a
            // collector that indexes 20 000 spans a second would be measured as "tracing overhead" too.
            let mut stack = start(options, traced, label, TraceBackend::Counting).await?;
            let mut load_options = closed(options.duration, options.warmup);
            load_options.gateway = stack.gateway_url();
            let outcome = async {
                let users = load::user_pool(&stack.gateway_url(), 50).await?;
                let saturated = measured_run(&mut stack, &load_options, users.clone()).await?;
                // The same stack at a fixed rate both configurations sustain: what tracing costs in CPU
                // and latency when the machine is not saturated (no feedback from a lower throughput).
                let mut fixed = load_options.clone();
                fixed.rate = Some(options.fixed_rate);
                fixed.concurrency = 256;
                fixed.warmup = Duration::from_secs(3);
                let at_fixed_rate = measured_run(&mut stack, &fixed, users).await?;
                anyhow::Ok((saturated, at_fixed_rate))
            }
            .await;
            let spans_received = stack.collector.as_ref().map_or(0, |c| c.spans_received());
            finish(stack, options).await;
            let (result, fixed) = outcome?;
            eprintln!("{}", result.report.table());
            eprintln!("{}", fixed.report.table());
            overhead.push(json!({
                "round": round + 1,
                "traced": traced,
                "report": result.report,
                "cpu_ms_per_checkout": result.cpu_ms_per_checkout,
                "export_cpu_ms_per_checkout": result.export_cpu_ms_per_checkout,
                "bench_process_cpu_ms_per_checkout": result.bench_process_cpu_ms_per_checkout,
                "rss_rest_mib": result.rss_rest_mib,
                "rss_load_mib": result.rss_load_mib,
                "fixed_rate": {
                    "rate_rps": options.fixed_rate,
                    "report": fixed.report,
                    "cpu_ms_per_checkout": fixed.cpu_ms_per_checkout,
                    "export_cpu_ms_per_checkout": fixed.export_cpu_ms_per_checkout,
                    "bench_process_cpu_ms_per_checkout": fixed.bench_process_cpu_ms_per_checkout,
                },
                "spans_received_by_collector": spans_received,
            }));
        }
    }
    let max_rate = overhead
        .iter()
        .filter(|run| run["traced"] == true)
        .filter_map(|run| run["report"]["throughput_rps"].as_f64())
        .fold(0.0_f64, f64::max);

    Ok((overhead, max_rate))
}

/// Sections 2, 3 (under load) and 5: an open-loop run at 80% of `max_rate`, every checkout trace checked.
async fn completeness_run(
    options: &BenchOptions,
    rate: f64,
) -> anyhow::Result<(serde_json::Value, serde_json::Value, serde_json::Value)> {
    // Every trace of the run must still be in the collector when it is checked: it holds
    // `MAX_TRACES` and drops the oldest beyond (50 000 of 52 173 checked, on a day the stack was fast).
    let rate = rate.max(1.0);
    let fits = Duration::from_secs_f64((crate::collector::MAX_TRACES as f64 * 0.9) / rate);
    let duration = options.completeness_duration.min(fits);
    eprintln!(
        "== completeness at {rate:.0} req/s for {:.0} s",
        duration.as_secs_f64()
    );
    let mut stack = start(options, true, "completeness", TraceBackend::Embedded).await?;
    let jaeger = stack.jaeger_url.clone().unwrap_or_default();
    let gateway = stack.gateway_url();
    // At rest: 30 checkouts one after the other.
    let rest_users = load::user_pool(&gateway, 1).await?;
    let mut rest_ids = Vec::new();
    for _ in 0..30 {
        let response = rest_users[0].checkout("12.34", "usd", None).await?;
        if let Some(trace) = response.body["traceId"].as_str() {
            rest_ids.push(trace.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let users = load::user_pool(&gateway, 50).await?;
    let report = load::run(
        &LoadOptions {
            gateway: gateway.clone(),
            rate: Some(rate),
            concurrency: 256,
            duration,
            warmup: Duration::ZERO,
            users: 50,
            lookup_share: 0.0,
            progress: true,
            slow_stripe: None,
        },
        users,
    )
    .await?;
    // Give the batch processors time to export the last spans.
    tokio::time::sleep(Duration::from_secs(5)).await;
    if let Some(collector) = &stack.collector {
        eprintln!("collector holds {} traces", collector.trace_count().await);
    }
    let started = Instant::now();
    let load_traces = fetch_traces(&jaeger, &report.checkout_traces).await;
    let rest_traces = fetch_traces(&jaeger, &rest_ids).await;
    eprintln!(
        "fetched {} traces in {:.1} s",
        load_traces.len(),
        started.elapsed().as_secs_f64()
    );
    let complete = load_traces
        .iter()
        .flatten()
        .filter(|t| is_complete(t))
        .count();
    let mut nats_hop: Vec<f64> = Vec::new();
    let mut mailbox_wait: Vec<f64> = Vec::new();
    for trace in load_traces.iter().flatten() {
        if let (Some(publish), Some(process)) = (
            trace.named("publish order.completed").first(),
            trace.named("process order.completed").first(),
        ) {
            nats_hop.push(process.start_us.saturating_sub(publish.start_us) as f64 / 1000.0);
        }
        for span in &trace.spans {
            if let Some(wait) = span
                .tag("actor.mailbox.wait_us")
                .and_then(|w| w.parse::<f64>().ok())
            {
                mailbox_wait.push(wait / 1000.0);
            }
        }
    }
    let database = stack.options.database_name.clone();
    let logs = stack.options.state_dir.join("logs");
    stack.stop();
    let _ = crate::infra::drop_database(&options.database_server_url, &database).await;
    let mut failed_spans = 0;
    let mut queue_drops = 0;
    for service in SERVICES {
        let log = std::fs::read_to_string(logs.join(format!("{service}.log"))).unwrap_or_default();
        for line in log.lines() {
            if line.contains("telemetry flushed")
                && let Ok(value) = serde_json::from_str::<serde_json::Value>(line)
            {
                failed_spans += value["fields"]["spans_failed"].as_u64().unwrap_or(0);
            }
            if line.contains("dropped") && line.contains("queue") {
                queue_drops += 1;
            }
        }
    }
    Ok((
        json!({
            "rate_rps": rate,
            "report": report,
            "traces": report.checkout_traces.len(),
            "complete": complete,
            "export_failed_spans": failed_spans,
            "queue_drop_warnings": queue_drops,
        }),
        json!({
            "nats_publish_to_process_ms": {"p50": percentile(&mut nats_hop, 0.5), "p99": percentile(&mut nats_hop, 0.99)},
            "actor_mailbox_wait_ms": {"p50": percentile(&mut mailbox_wait, 0.5), "p99": percentile(&mut mailbox_wait, 0.99)},
        }),
        json!({
            "at_rest_median": split_medians(&rest_traces),
            "at_load_median": split_medians(&load_traces),
        }),
    ))
}

/// Publish -> receive latency of bare core NATS (no JetStream, no tracing) on a private server.
async fn bare_nats_latency(options: &BenchOptions) -> anyhow::Result<serde_json::Value> {
    let port = free_port()?;
    let dir = options.state_dir.join("bare-nats");
    let mut server =
        crate::infra::PrivateNats::start(port, &dir.join("store"), &dir.join("nats.log")).await?;
    let client = async_nats::connect(&server.url).await?;
    let mut subscriber = client.subscribe("bench.bare").await?;
    client.flush().await?;
    let mut latencies = Vec::new();
    for _ in 0..2000 {
        let sent = Instant::now();
        client.publish("bench.bare", "x".into()).await?;
        client.flush().await?;
        if subscriber.next().await.is_some() {
            latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
        }
    }
    server.stop();
    Ok(json!({"p50": percentile(&mut latencies, 0.5), "p99": percentile(&mut latencies, 0.99)}))
}

/// JetStream publish start -> process start, one message at a time on an idle private server, alternating
/// two ways of sending the same `order.completed` event through the same stream and durable consumer:
///
/// - `traced`: the services' own helpers: `messaging::publish` (PRODUCER span, context injected into the
///   headers) and `messaging::process_span` (context extracted, CONSUMER span), under the subscriber the
///   services install, every span exported over OTLP/gRPC to a counting collector;
/// - `bare`: `publish_with_headers` with only the `Nats-Msg-Id`, and a plain receive: no span, no header.
async fn jetstream_hop(
    options: &BenchOptions,
    messages_each: usize,
) -> anyhow::Result<serde_json::Value> {
    use tracing::instrument::WithSubscriber;

    // A fresh store each time: a stream left from an earlier run would remember these message ids and
    // drop them as duplicates.
    let dir = options.state_dir.join("jetstream-hop");
    let _ = std::fs::remove_dir_all(&dir);
    let mut server =
        crate::infra::PrivateNats::start(free_port()?, &dir.join("store"), &dir.join("nats.log"))
            .await?;
    let any_port: std::net::SocketAddr = "127.0.0.1:0".parse()?;
    let collector = crate::collector::Collector::start(
        crate::collector::CollectorAddresses {
            otlp_grpc: any_port,
            otlp_http: any_port,
            ui: any_port,
        },
        crate::collector::Storage::Count,
    )
    .await?;
    let exporter = tracehop_telemetry::setup::otlp_grpc_exporter(&format!(
        "http://{}",
        collector.addresses.otlp_grpc
    ))?;
    let (dispatch, guard) =
        tracehop_telemetry::setup::dispatch_with_exporter("bench-hop", Some(exporter));
    let measured = measure_jetstream_hops(&server.url, messages_each)
        .with_subscriber(dispatch)
        .await;
    guard.shutdown().await;
    let spans_received = collector.spans_received();
    server.stop();
    let (mut traced, mut bare) = measured?;
    let summary = |values: &mut Vec<f64>| {
        json!({
            "messages": values.len(),
            "p50": percentile(values, 0.5),
            "p90": percentile(values, 0.9),
            "p99": percentile(values, 0.99),
            "mean": values.iter().sum::<f64>() / values.len().max(1) as f64,
        })
    };
    Ok(json!({
        "traced": summary(&mut traced),
        "bare": summary(&mut bare),
        "spans_received_by_collector": spans_received,
    }))
}

/// The measuring loop of [`jetstream_hop`]: latencies in ms, (traced, bare).
async fn measure_jetstream_hops(
    nats_url: &str,
    messages_each: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    use tracehop_contracts::events::{
        NOTIFICATIONS_CONSUMER, ORDER_COMPLETED, ORDER_COMPLETED_DEAD_LETTER, ORDERS_STREAM,
    };
    use tracehop_telemetry::messaging::{self, ConsumerSettings, StreamSettings};
    use tracing::Instrument;
    use tracing::instrument::WithSubscriber;

    let client = messaging::connect(nats_url, "bench-hop", None).await?;
    let jetstream = async_nats::jetstream::new(client);
    let stream = messaging::ensure_stream(
        &jetstream,
        &StreamSettings::new(
            ORDERS_STREAM,
            &[ORDER_COMPLETED, ORDER_COMPLETED_DEAD_LETTER],
        ),
    )
    .await?;
    let consumer = messaging::ensure_consumer(
        &stream,
        &ConsumerSettings::new(NOTIFICATIONS_CONSUMER, ORDER_COMPLETED),
    )
    .await?;
    let base = Instant::now();
    let (received, mut latencies) = tokio::sync::mpsc::unbounded_channel::<(bool, f64)>();
    let consumer_task = tokio::spawn(
        async move {
            let mut deliveries = consumer.messages().await?;
            while let Some(message) = deliveries.next().await {
                let message = message.map_err(|error| anyhow::anyhow!(error))?;
                let traced = message.payload.first() == Some(&1);
                let sent_at_ns = message
                    .payload
                    .get(1..9)
                    .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                    .map(u64::from_le_bytes)
                    .unwrap_or_default();
                let since_sent = |now: Duration| {
                    now.saturating_sub(Duration::from_nanos(sent_at_ns))
                        .as_secs_f64()
                        * 1000.0
                };
                if traced {
                    let span = messaging::process_span(&message, messaging::ConsumerTrace::Parent);
                    let latency = span.in_scope(|| since_sent(base.elapsed()));
                    message
                        .ack()
                        .instrument(span)
                        .await
                        .map_err(|error| anyhow::anyhow!(error))?;
                    received.send((true, latency))?;
                } else {
                    let latency = since_sent(base.elapsed());
                    message
                        .ack()
                        .await
                        .map_err(|error| anyhow::anyhow!(error))?;
                    received.send((false, latency))?;
                }
            }
            anyhow::Ok(())
        }
        .with_current_subscriber(),
    );

    let (mut traced, mut bare) = (Vec::new(), Vec::new());
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    for i in 0..messages_each * 2 {
        let with_tracing = i % 2 == 0;
        let sent_at_ns = u64::try_from(base.elapsed().as_nanos())?;
        let mut payload = vec![u8::from(with_tracing)];
        payload.extend_from_slice(&sent_at_ns.to_le_bytes());
        let message_id = format!("hop-{run_id}-{i}");
        if with_tracing {
            messaging::publish(
                &jetstream,
                ORDER_COMPLETED,
                &message_id,
                async_nats::HeaderMap::new(),
                payload.into(),
                opentelemetry::Context::new(),
            )
            .await?;
        } else {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id.as_str());
            jetstream
                .publish_with_headers(ORDER_COMPLETED, headers, payload.into())
                .await?
                .await?;
        }
        match tokio::time::timeout(Duration::from_secs(10), latencies.recv()).await {
            Ok(Some((true, latency))) => traced.push(latency),
            Ok(Some((false, latency))) => bare.push(latency),
            Ok(None) | Err(_) => {
                consumer_task.abort();
                anyhow::bail!("message {i} was not delivered within 10 s");
            }
        }
    }
    consumer_task.abort();
    Ok((traced, bare))
}
