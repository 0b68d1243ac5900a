//! Answers, not just waterfalls (the seed's two stories, asked of a running stack):
//! - `stack where` gives the right last line for an e-mail sent, sent on a redelivery, waiting because
//!   notification-service is down, dead-lettered, and for an unknown order;
//! - `stack slow` and `stack errors` name the hop to blame;
//! - `/metrics` is Prometheus text whose counts match the requests made;
//! - tail sampling keeps every failed and slow trace, whole, and about a tenth of the rest;
//! - consumers in traces of their own (`NATS_CONSUMER_TRACE=link`) are followed through the link.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::TestStack;
use tracehop::client::ApiClient;
use tracehop::trace_view::TraceView;
use tracehop::whereabouts::{Sources, Subject};

fn http() -> reqwest::Client {
    tracehop_telemetry::http::client::plain_client_builder()
        .build()
        .unwrap()
}

async fn wait_for_notification(customer: &ApiClient, order_id: &str, wanted: &str) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let order = customer.order(order_id).await.unwrap();
        if order.body["notification"] == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "notification never {wanted}: {}",
            order.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn notifier_faults(test: &TestStack, faults: serde_json::Value) {
    http()
        .post(format!("{}/_admin/faults", test.stack.notifications_url()))
        .json(&faults)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
}

async fn sources(test: &TestStack) -> Sources {
    Sources::new(
        &test.stack.database_url,
        Some(test.stack.nats_client().await.unwrap()),
        Some(&test.jaeger()),
    )
}

/// `stack where` as a user runs it, as the operator; returns its output.
fn stack_where(test: &TestStack, id: &str) -> String {
    let operator = test.stack.nats_operator().unwrap();
    let output = std::process::Command::new(tracehop::process::bin_dir().unwrap().join("stack"))
        .args([
            "where",
            id,
            "--database-url",
            &test.stack.database_url,
            "--nats-url",
            &test.stack.nats_url,
            "--jaeger",
            &test.jaeger(),
        ])
        .env("NATS_USER", &operator.user)
        .env("NATS_PASSWORD", &operator.password)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

fn last_line(text: &str) -> &str {
    text.lines().last().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_says_sent_redelivered_waiting_dead_lettered_and_unknown() {
    let test = TestStack::boot(&[
        ("NOTIFICATIONS_MAX_DELIVER", "3"),
        ("NOTIFICATIONS_BACKOFF_MS", "100"),
    ])
    .await;
    let customer = test.customer().await;
    let sources = sources(&test).await;

    // Unknown.
    let unknown = uuid::Uuid::new_v4();
    let found = tracehop::whereabouts::locate(&sources, &Subject::Order(unknown)).await;
    assert!(
        found.verdict.starts_with("unknown order"),
        "{}",
        found.render()
    );

    // Sent on the first delivery, asked by order id with the command a user types.
    let checkout = customer.checkout("12.00", "eur", None).await.unwrap();
    assert_eq!(checkout.status, 200, "{}", checkout.body);
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();
    let trace_id = checkout.body["traceId"].as_str().unwrap().to_owned();
    wait_for_notification(&customer, &order_id, "sent").await;
    test.trace(&trace_id, |t| {
        !t.named("process order.completed").is_empty()
    })
    .await;
    let report = stack_where(&test, &order_id);
    assert!(last_line(&report).starts_with("e-mail sent "), "{report}");
    assert!(last_line(&report).ends_with("(1st delivery)"), "{report}");
    assert!(report.contains("JetStream ORDERS sequence"), "{report}");
    assert!(report.contains("acknowledged"), "{report}");
    // By trace id, the same order.
    let by_trace = stack_where(&test, &trace_id);
    assert_eq!(last_line(&by_trace), last_line(&report), "{by_trace}");

    // Sent on a redelivery: the first attempt fails.
    notifier_faults(&test, serde_json::json!({"failNext": 1})).await;
    let checkout = customer.checkout("13.00", "eur", None).await.unwrap();
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();
    let trace_id = checkout.body["traceId"].as_str().unwrap().to_owned();
    wait_for_notification(&customer, &order_id, "sent").await;
    test.trace(&trace_id, |t| t.named("process order.completed").len() == 2)
        .await;
    let found = tracehop::whereabouts::locate(&sources, &Subject::parse(&order_id).unwrap()).await;
    assert!(
        found.verdict.starts_with("e-mail sent "),
        "{}",
        found.render()
    );
    assert!(
        found.verdict.ends_with("(2nd delivery)"),
        "{}",
        found.render()
    );
    assert!(
        found
            .render()
            .contains("delivery 1 to notifications: failed"),
        "{}",
        found.render()
    );

    // Dead-lettered: every attempt fails.
    notifier_faults(&test, serde_json::json!({"failNext": 1000})).await;
    let checkout = customer.checkout("14.00", "eur", None).await.unwrap();
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();
    wait_for_notification(&customer, &order_id, "failed").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let found = loop {
        let found =
            tracehop::whereabouts::locate(&sources, &Subject::parse(&order_id).unwrap()).await;
        if found.verdict.starts_with("dead-lettered") || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        found.verdict.starts_with("dead-lettered: ")
            && found.verdict.contains("injected")
            && found
                .verdict
                .ends_with("; replay with stack replay-dead-letters"),
        "{}",
        found.render()
    );
    notifier_faults(&test, serde_json::json!({"failNext": 0})).await;

    // Waiting: notification-service is down.
    let mut test = test;
    test.stack
        .service("notifications")
        .unwrap()
        .stop(Duration::from_secs(10));
    let checkout = customer.checkout("15.00", "eur", None).await.unwrap();
    assert_eq!(checkout.status, 200, "{}", checkout.body);
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    let found = loop {
        let found =
            tracehop::whereabouts::locate(&sources, &Subject::parse(&order_id).unwrap()).await;
        if found.verdict.starts_with("waiting in JetStream") || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        found.verdict.starts_with("waiting in JetStream for ")
            && found.verdict.contains("consumer has 1 pending"),
        "{}",
        found.render()
    );
    // Back up: the same order's e-mail goes out.
    test.stack.start_service("notifications").await.unwrap();
    wait_for_notification(&customer, &order_id, "sent").await;
    let found = tracehop::whereabouts::locate(&sources, &Subject::parse(&order_id).unwrap()).await;
    assert!(
        found.verdict.starts_with("e-mail sent "),
        "{}",
        found.render()
    );
}

/// `stack slow` / `stack errors` as a user runs them.
fn stack_report(test: &TestStack, command: &str) -> String {
    let output = std::process::Command::new(tracehop::process::bin_dir().unwrap().join("stack"))
        .args([
            command,
            "--since",
            "5m",
            "--top",
            "5",
            "--jaeger",
            &test.jaeger(),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_errors_name_the_hop_to_blame() {
    let test = TestStack::boot(&[]).await;
    let customer = test.customer().await;
    // One checkout whose first Stripe attempt hangs past billing's 2 s attempt timeout, three quick ones.
    test.stripe_faults(serde_json::json!({"hangNext": 1, "hangMs": 2600}))
        .await;
    let slow = customer.checkout("20.00", "eur", None).await.unwrap();
    assert_eq!(slow.status, 200, "{}", slow.body);
    let slow_trace = slow.body["traceId"].as_str().unwrap().to_owned();
    for _ in 0..3 {
        assert_eq!(
            customer.checkout("5.00", "eur", None).await.unwrap().status,
            200
        );
    }
    // One checkout whose every Stripe attempt fails: 202 pending.
    test.stripe_faults(serde_json::json!({"failNext": 3})).await;
    let failed = customer.checkout("7.00", "eur", None).await.unwrap();
    assert_eq!(failed.status, 202, "{}", failed.body);
    let failed_trace = failed.trace_id.clone().unwrap();
    test.trace(&slow_trace, |t| {
        !t.named("process order.completed").is_empty()
    })
    .await;
    test.trace(&failed_trace, |t| t.named("POST /v1/charges").len() == 3)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let report = stack_report(&test, "slow");
    let first = report.lines().nth(1).unwrap_or_default();
    assert!(first.contains(&slow_trace), "the slowest first:\n{report}");
    let why = report.lines().nth(2).unwrap_or_default();
    assert!(
        why.contains("billing") && why.contains("POST /v1/charges attempt 1 timed out"),
        "{report}"
    );
    assert!(report.contains("by the hop to blame:"), "{report}");

    let report = stack_report(&test, "errors");
    assert!(report.contains(&failed_trace), "{report}");
    assert!(
        report.contains("failed first: billing › POST /v1/charges failed ("),
        "{report}"
    );
    let groups: Vec<&str> = report
        .lines()
        .skip_while(|l| !l.starts_with("by the hop to blame:"))
        .skip(1)
        .collect();
    assert!(
        groups.iter().any(|line| line.trim_start().starts_with('2')
            && line.ends_with("billing › POST /v1/charges")),
        "the failed and the timed-out checkout share their hop:\n{report}"
    );
}

/// The samples of one metric family, by their labels.
fn samples(text: &str, name: &str) -> Vec<(HashMap<String, String>, f64)> {
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    scrape
        .samples
        .into_iter()
        .filter(|s| s.metric == name)
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            };
            (
                s.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                value,
            )
        })
        .collect()
}

async fn metrics(test: &TestStack) -> String {
    http()
        .get(format!("{}/metrics", test.jaeger()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn calls(text: &str, service: &str, span: &str) -> f64 {
    samples(text, "traces_span_metrics_calls_total")
        .into_iter()
        .filter(|(labels, _)| labels["service_name"] == service && labels["span_name"] == span)
        .map(|(_, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text_counting_the_requests_made() {
    let test = TestStack::boot(&[("COLLECTOR_TAIL_QUIET_MS", "1000")]).await;
    let customer = test.customer().await;
    let mut traces = Vec::new();
    for i in 0..7 {
        let checkout = customer
            .checkout(&format!("{i}.50"), "eur", None)
            .await
            .unwrap();
        assert_eq!(checkout.status, 200);
        traces.push(checkout.body["traceId"].as_str().unwrap().to_owned());
    }
    for trace in &traces {
        test.trace(trace, |t| !t.named("process order.completed").is_empty())
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = metrics(&test).await;
        let complete = samples(&text, "tracehop_traces_total")
            .into_iter()
            .find(|(labels, _)| labels["completeness"] == "complete")
            .map(|(_, v)| v)
            .unwrap_or_default();
        if complete >= 7.0 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(calls(&text, "gateway", "POST /checkout"), 7.0, "{text}");
    assert_eq!(calls(&text, "gateway", "POST /signup"), 1.0, "{text}");
    assert_eq!(calls(&text, "gateway", "POST /login"), 1.0, "{text}");
    assert_eq!(
        calls(&text, "notifications", "process order.completed"),
        7.0,
        "{text}"
    );
    let errors: f64 = samples(&text, "traces_span_metrics_calls_total")
        .into_iter()
        .filter(|(labels, _)| labels["status_code"] == "STATUS_CODE_ERROR")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(errors, 0.0, "{text}");
    // The histogram agrees with the counter, and its +Inf bucket is the count.
    let count: f64 = samples(&text, "traces_span_metrics_duration_milliseconds_count")
        .into_iter()
        .filter(|(l, _)| l["service_name"] == "gateway" && l["span_name"] == "POST /checkout")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(count, 7.0, "{text}");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let histogram = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "traces_span_metrics_duration_milliseconds"
                && s.labels.get("span_name") == Some("POST /checkout")
        })
        .expect("the duration histogram");
    match &histogram.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert_eq!(buckets.len(), 17, "16 bounds and +Inf");
            assert_eq!(buckets.last().unwrap().count, 7.0);
        }
        other => panic!("not a histogram: {other:?}"),
    }
    let complete = samples(&text, "tracehop_traces_total")
        .into_iter()
        .find(|(labels, _)| labels["completeness"] == "complete")
        .unwrap()
        .1;
    assert!(complete >= 7.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_sampling_keeps_every_failed_and_slow_trace_whole_and_a_tenth_of_the_rest() {
    const CHECKOUTS: usize = 500;
    let test = TestStack::boot(&[
        ("COLLECTOR_TAIL_SAMPLING_PERCENT", "10"),
        ("COLLECTOR_TAIL_SLOW_MS", "1000"),
        ("COLLECTOR_TAIL_DECISION_WAIT_MS", "15000"),
        ("COLLECTOR_TAIL_QUIET_MS", "1500"),
    ])
    .await;
    // Faults: 3 % of Stripe attempts fail (retried: mostly still 200, with an error span), 3 % take 1.5 s.
    test.stripe_faults(serde_json::json!({"failRate": 0.03, "slowShare": 0.03, "slowMs": 1500}))
        .await;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let customer = test.customer().await;
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < CHECKOUTS {
                let started = Instant::now();
                let checkout = customer.checkout("9.99", "eur", None).await.unwrap();
                done.push((
                    checkout.status,
                    started.elapsed(),
                    checkout.trace_id.unwrap(),
                ));
            }
            done
        }));
    }
    let mut results = Vec::new();
    for worker in workers {
        results.extend(worker.await.unwrap());
    }
    assert_eq!(results.len(), CHECKOUTS);

    // Every trace decided.
    let deadline = Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = metrics(&test).await;
        let pending = samples(&text, "tracehop_traces_pending")
            .first()
            .map(|(_, v)| *v)
            .unwrap_or(f64::NAN);
        if pending == 0.0 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let mut kept_rest = 0;
    let mut dropped = 0;
    let mut failed_charges_kept = 0.0;
    for (status, took, trace_id) in &results {
        let kept = TraceView::fetch(&test.jaeger(), trace_id).await.ok();
        match kept {
            None => {
                assert!(
                    *status == 200 && *took < Duration::from_millis(1000),
                    "a {status} checkout of {took:?} was dropped: {trace_id}"
                );
                dropped += 1;
            }
            Some(trace) => {
                let errors = trace
                    .named("POST /v1/charges")
                    .iter()
                    .filter(|s| s.is_error())
                    .count();
                failed_charges_kept += errors as f64;
                if *status == 200 {
                    assert!(
                        !trace.named("process order.completed").is_empty(),
                        "kept, but not whole (no consumer span): {trace_id}"
                    );
                }
                let slow = tracehop::why::Why::of(&trace).end_to_end_us >= 1_000_000;
                if errors == 0 && !slow && !trace.spans.iter().any(|s| s.is_error()) {
                    kept_rest += 1;
                }
            }
        }
    }
    // Every failed Stripe attempt the collector saw (metrics count spans before sampling) is in a kept trace.
    let failed_charges_seen: f64 = samples(&text, "traces_span_metrics_calls_total")
        .into_iter()
        .filter(|(l, _)| {
            l["service_name"] == "billing"
                && l["span_name"] == "POST /v1/charges"
                && l["status_code"] == "STATUS_CODE_ERROR"
        })
        .map(|(_, v)| v)
        .sum();
    assert!(
        failed_charges_seen > 0.0,
        "the faults did not fire:\n{text}"
    );
    assert_eq!(failed_charges_kept, failed_charges_seen, "{text}");
    let rest = kept_rest + dropped;
    let share = kept_rest as f64 / rest as f64;
    assert!(
        (0.05..=0.17).contains(&share),
        "kept {kept_rest} of {rest} ordinary traces ({share:.3})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linked_consumer_traces_are_followed_by_why_where_and_the_waterfall() {
    let test = TestStack::boot(&[("NATS_CONSUMER_TRACE", "link")]).await;
    let customer = test.customer().await;
    let checkout = customer.checkout("31.00", "eur", None).await.unwrap();
    assert_eq!(checkout.status, 200);
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();
    let trace_id = checkout.body["traceId"].as_str().unwrap().to_owned();
    wait_for_notification(&customer, &order_id, "sent").await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let joined = loop {
        // Spans arrive in batches, each process's on its own schedule: until the checkout's own have, the
        // trace is not found, and until every process's have, some span's parent is missing.
        let joined = TraceView::fetch_joined(&test.jaeger(), &trace_id).await;
        match joined {
            Ok(joined)
                if !joined.named("process order.completed").is_empty()
                    && tracehop::why::Why::of(&joined).incomplete == 0 =>
            {
                break joined;
            }
            Err(error) if Instant::now() > deadline => panic!("{error:#}"),
            Ok(joined) if Instant::now() > deadline => break joined,
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    // The checkout trace itself has no consumer span: it is in a trace of its own, linked.
    let own = TraceView::fetch(&test.jaeger(), &trace_id).await.unwrap();
    assert!(own.named("process order.completed").is_empty());
    let process = *joined
        .named("process order.completed")
        .first()
        .expect("joined");
    let consumer_trace = process.tag("linked.trace_id").expect("from another trace");
    assert_ne!(consumer_trace, trace_id);
    assert_eq!(process.links.len(), 1);
    let publish = joined
        .parent(process)
        .expect("hung under the span it links to");
    assert_eq!(publish.name, "publish order.completed");
    assert_eq!(
        process.links[0],
        (trace_id.clone(), publish.span_id.clone())
    );

    // From the consumer's trace id, the same joined view.
    let from_consumer = TraceView::fetch_joined(&test.jaeger(), &consumer_trace)
        .await
        .unwrap();
    assert_eq!(from_consumer.trace_id, trace_id);
    assert_eq!(from_consumer.named("process order.completed").len(), 1);
    assert_eq!(from_consumer.named("POST /checkout").len(), 1);
    // why crosses the link; the waterfall draws it; where finds the delivery.
    let why = tracehop::why::Why::of(&joined);
    assert_eq!(why.incomplete, 0, "{}", why.report());
    assert!(
        why.path
            .iter()
            .any(|step| step.name == "process order.completed"),
        "{}",
        why.report()
    );
    assert!(joined.waterfall(false).contains("process order.completed"));
    let found =
        tracehop::whereabouts::locate(&sources(&test).await, &Subject::parse(&order_id).unwrap())
            .await;
    assert!(
        found.verdict.starts_with("e-mail sent "),
        "{}",
        found.render()
    );
    assert!(
        found.verdict.ends_with("(1st delivery)"),
        "{}",
        found.render()
    );
}
