//! The load generator (`stack load`): real users against the gateway, open or closed loop, HDR latency.
//!
//! - **Closed loop**: `concurrency` clients, each sending its next request when the last one answered.
//! - **Open loop**: requests *scheduled* at a fixed rate whatever the answers; latency is measured from the
//!   scheduled time, so a slow system cannot hide its queueing (no coordinated omission).
//!
//! A pool of users is signed up and logged in first; then checkouts and order look-ups are mixed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::json;
use tokio::sync::Mutex;

use crate::client::{ApiClient, unique_email};

/// How to drive the gateway.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub gateway: String,
    /// `Some(rate)`: open loop at `rate` requests per second; `None`: closed loop.
    pub rate: Option<f64>,
    /// Closed loop: clients. Open loop: the most requests in flight (beyond it, arrivals count as errors).
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub users: usize,
    /// Share of requests that are order look-ups (the rest are checkouts).
    pub lookup_share: f64,
    /// Print a progress line every second (to stderr).
    pub progress: bool,
    /// Make a share of the payment provider's answers slow for the run (the seed's slow Stripe).
    pub slow_stripe: Option<SlowStripe>,
}

/// The seed's fault, as a share of the load: stripe-sim delays this share of charge requests, so the tail
/// of the latency distribution looks like production's. Set through stripe-sim's `/_admin/faults` for the
/// run (replacing whatever faults were set there) and reset after it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlowStripe {
    /// stripe-sim's base URL.
    #[serde(skip)]
    pub stripe_sim: String,
    /// Share of charge requests delayed (0.0 to 1.0).
    pub share: f64,
    /// How long each of them is delayed, in ms.
    pub delay_ms: u64,
}

impl SlowStripe {
    async fn set(&self, enabled: bool) -> anyhow::Result<()> {
        let http = tracehop_telemetry::http::client::plain_client_builder().build()?;
        let url = format!("{}/_admin/faults", self.stripe_sim.trim_end_matches('/'));
        let request = if enabled {
            http.post(url)
                .json(&json!({"slowShare": self.share, "slowMs": self.delay_ms}))
        } else {
            http.delete(url)
        };
        request.send().await?.error_for_status()?;
        Ok(())
    }
}

/// What one run measured (after the warm-up).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    pub mode: String,
    pub duration_s: f64,
    pub requests: u64,
    pub throughput_rps: f64,
    pub errors: u64,
    pub status_counts: BTreeMap<String, u64>,
    pub checkout: Percentiles,
    pub lookup: Percentiles,
    /// The injected slow-provider share, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_stripe: Option<SlowStripe>,
    /// Trace ids of successful checkouts (for completeness checks).
    #[serde(skip)]
    pub checkout_traces: Vec<String>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    fn from(histogram: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p90_ms: ms(histogram.value_at_quantile(0.90)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }
}

#[derive(Clone, Copy)]
enum Operation {
    Checkout,
    Lookup,
}

struct Recorder {
    checkout: Histogram<u64>,
    lookup: Histogram<u64>,
    statuses: BTreeMap<String, u64>,
    errors: u64,
    traces: Vec<String>,
}

struct Shared {
    users: Vec<ApiClient>,
    orders: Mutex<Vec<(usize, String)>>,
    recorder: Mutex<Recorder>,
    measuring: AtomicBool,
    done: AtomicU64,
    lookup_share: f64,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 µs to 10 minutes, 3 significant digits.
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

/// Signs up and logs in `count` users, 16 at a time.
pub async fn user_pool(gateway: &str, count: usize) -> anyhow::Result<Vec<ApiClient>> {
    let users: Vec<anyhow::Result<ApiClient>> = futures::stream::iter(0..count)
        .map(|_| async move {
            let mut client = ApiClient::new(gateway);
            client
                .signup_and_login(&unique_email("load"), "correct horse battery")
                .await?;
            Ok(client)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    users.into_iter().collect()
}

impl Shared {
    async fn one_request(&self, scheduled: Instant) {
        let (user_index, lookup, pick) = {
            let mut rng = rand::rng();
            (
                rng.random_range(0..self.users.len()),
                rng.random_bool(self.lookup_share.clamp(0.0, 1.0)),
                rng.random::<u64>(),
            )
        };
        let (user_index, operation, order) = {
            let orders = self.orders.lock().await;
            let order = if lookup && !orders.is_empty() {
                Some(orders[(pick % orders.len() as u64) as usize].clone())
            } else {
                None
            };
            match order {
                Some(order) => (order.0, Operation::Lookup, Some(order.1)),
                None => (user_index, Operation::Checkout, None),
            }
        };
        let user = &self.users[user_index];
        let outcome = match (&operation, order) {
            (Operation::Lookup, Some(order_id)) => user.order(&order_id).await,
            _ => {
                let cents = rand::rng().random_range(100..100_000);
                user.call(
                    reqwest::Method::POST,
                    "/checkout",
                    Some(json!({"total": format!("{}.{:02}", cents / 100, cents % 100), "currency": "usd"})),
                    &[],
                )
                .await
            }
        };
        let latency = scheduled.elapsed();
        if let (Operation::Checkout, Ok(response)) = (&operation, &outcome)
            && let Some(order_id) = response.body["orderId"].as_str()
        {
            let mut orders = self.orders.lock().await;
            if orders.len() < 100_000 {
                orders.push((user_index, order_id.to_owned()));
            }
        }
        self.done.fetch_add(1, Ordering::Relaxed);
        if !self.measuring.load(Ordering::Relaxed) {
            return;
        }
        let mut recorder = self.recorder.lock().await;
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let status = match &outcome {
            Ok(response) => response.status.to_string(),
            Err(_) => "transport".to_owned(),
        };
        *recorder.statuses.entry(status).or_default() += 1;
        match &outcome {
            Ok(response) if response.status < 400 => {
                let histogram = match operation {
                    Operation::Checkout => &mut recorder.checkout,
                    Operation::Lookup => &mut recorder.lookup,
                };
                let _ = histogram.record(micros);
                if let (Operation::Checkout, Some(trace)) =
                    (&operation, response.body["traceId"].as_str())
                {
                    recorder.traces.push(trace.to_owned());
                }
            }
            _ => recorder.errors += 1,
        }
    }
}

/// Runs the load and reports what was measured after the warm-up.
pub async fn run(options: &LoadOptions, users: Vec<ApiClient>) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(!users.is_empty(), "no users");
    if let Some(slow) = &options.slow_stripe {
        slow.set(true).await.map_err(|error| {
            anyhow::anyhow!("could not set the slow-Stripe share on stripe-sim: {error}")
        })?;
    }
    let outcome = drive(options, users).await;
    if let Some(slow) = &options.slow_stripe
        && let Err(error) = slow.set(false).await
    {
        eprintln!("could not reset stripe-sim's faults: {error}");
    }
    outcome
}

async fn drive(options: &LoadOptions, users: Vec<ApiClient>) -> anyhow::Result<LoadReport> {
    let shared = Arc::new(Shared {
        users,
        orders: Mutex::new(Vec::new()),
        recorder: Mutex::new(Recorder {
            checkout: histogram()?,
            lookup: histogram()?,
            statuses: BTreeMap::new(),
            errors: 0,
            traces: Vec::new(),
        }),
        measuring: AtomicBool::new(options.warmup.is_zero()),
        done: AtomicU64::new(0),
        lookup_share: options.lookup_share,
    });
    let started = Instant::now();
    let measure_from = started + options.warmup;
    let end = measure_from + options.duration;

    let progress = options.progress.then(|| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let done = shared.done.load(Ordering::Relaxed);
                let errors = shared.recorder.lock().await.errors;
                let phase = if shared.measuring.load(Ordering::Relaxed) {
                    "measuring"
                } else {
                    "warm-up"
                };
                eprint!(
                    "\r{phase:>9}  {:>6.0}s  {done:>8} requests  {:>6} req/s  {errors} errors   ",
                    started.elapsed().as_secs_f64(),
                    done - last
                );
                last = done;
            }
        })
    });
    let flip = {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            shared.measuring.store(true, Ordering::Relaxed);
        })
    };

    match options.rate {
        None => {
            let workers: Vec<_> = (0..options.concurrency.max(1))
                .map(|_| {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        while Instant::now() < end {
                            shared.one_request(Instant::now()).await;
                        }
                    })
                })
                .collect();
            for worker in workers {
                worker.await?;
            }
        }
        Some(rate) => {
            let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
            let in_flight = Arc::new(tokio::sync::Semaphore::new(options.concurrency.max(1)));
            let mut tasks = tokio::task::JoinSet::new();
            let mut next = Instant::now();
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                let scheduled = next;
                next += interval;
                match in_flight.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let shared = shared.clone();
                        tasks.spawn(async move {
                            shared.one_request(scheduled).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        if shared.measuring.load(Ordering::Relaxed) {
                            let mut recorder = shared.recorder.lock().await;
                            recorder.errors += 1;
                            *recorder
                                .statuses
                                .entry("not-sent (too many in flight)".into())
                                .or_default() += 1;
                        }
                    }
                }
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    flip.abort();
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }
    let measured = Instant::now()
        .saturating_duration_since(measure_from)
        .max(Duration::from_millis(1));
    let recorder = shared.recorder.lock().await;
    let requests: u64 = recorder.statuses.values().sum();
    Ok(LoadReport {
        mode: match options.rate {
            Some(rate) => format!("open loop, {rate} req/s"),
            None => format!("closed loop, {} clients", options.concurrency),
        },
        duration_s: measured.as_secs_f64(),
        requests,
        throughput_rps: (requests - recorder.errors) as f64 / measured.as_secs_f64(),
        errors: recorder.errors,
        status_counts: recorder.statuses.clone(),
        checkout: Percentiles::from(&recorder.checkout),
        lookup: Percentiles::from(&recorder.lookup),
        slow_stripe: options.slow_stripe.clone(),
        checkout_traces: recorder.traces.clone(),
    })
}

impl LoadReport {
    /// A plain-text table.
    pub fn table(&self) -> String {
        let faults = match &self.slow_stripe {
            Some(slow) => format!(
                ", {:.1}% of charges slowed by {} ms",
                slow.share * 100.0,
                slow.delay_ms
            ),
            None => String::new(),
        };
        let mut out = format!(
            "{}{faults}: {:.1} s measured, {} requests, {:.1} ok/s, {} errors {:?}\n",
            self.mode,
            self.duration_s,
            self.requests,
            self.throughput_rps,
            self.errors,
            self.status_counts
        );
        out.push_str("operation    count     p50 ms    p90 ms    p99 ms  p99.9 ms    max ms\n");
        for (name, p) in [("checkout", &self.checkout), ("lookup", &self.lookup)] {
            out.push_str(&format!(
                "{name:<10} {:>7} {:>10.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n",
                p.count, p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
            ));
        }
        out
    }
}
