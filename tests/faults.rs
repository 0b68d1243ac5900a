//! Fault tests: real processes, real NATS and PostgreSQL, a burst of checkouts while something breaks, then
//! the database, the payment provider and the mail sink are compared. Nothing lost, nothing twice.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::TestStack;
use diesel::{ExpressionMethods, QueryDsl, RunQueryDsl};
use futures::StreamExt;
use tracehop::client::ApiClient;

const BURST: usize = 200;
const CONCURRENCY: usize = 8;

/// Runs `count` checkouts, `CONCURRENCY` at a time; returns (status, order id) per checkout.
async fn burst(customer: &ApiClient, count: usize) -> Vec<(u16, Option<String>)> {
    burst_counting(customer, count, Arc::default()).await
}

/// Like [`burst`], counting finished checkouts in `done` so a test can strike mid-burst.
async fn burst_counting(
    customer: &ApiClient,
    count: usize,
    done: Arc<AtomicUsize>,
) -> Vec<(u16, Option<String>)> {
    futures::stream::iter(0..count)
        .map(|i| {
            let customer = customer.clone();
            let done = done.clone();
            async move {
                let _count_when_finished = Finished(done);
                let total = format!("{}.{:02}", 1 + i % 90, i % 100);
                match customer.checkout(&total, "usd", None).await {
                    Ok(response) => (
                        response.status,
                        response.body["orderId"].as_str().map(str::to_owned),
                    ),
                    Err(_) => (0, None),
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

struct Finished(Arc<AtomicUsize>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Starts a burst in the background and returns once `threshold` checkouts have finished.
async fn burst_until(
    customer: &ApiClient,
    threshold: usize,
) -> (
    tokio::task::JoinHandle<Vec<(u16, Option<String>)>>,
    Arc<AtomicUsize>,
) {
    let done: Arc<AtomicUsize> = Arc::default();
    let running = tokio::spawn({
        let customer = customer.clone();
        let done = done.clone();
        async move { burst_counting(&customer, BURST, done).await }
    });
    while done.load(Ordering::SeqCst) < threshold {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (running, done)
}

/// Waits until every charged order's notification is `sent` (or the deadline), then checks the books:
/// every order answered 200 is charged once at Stripe, recorded once, and mailed exactly once.
async fn assert_nothing_lost_nothing_twice(
    test: &TestStack,
    results: &[(u16, Option<String>)],
) -> (usize, usize) {
    use tracehop_contracts::schema::{notifications, outbox, transactions};
    let ok: HashSet<String> = results
        .iter()
        .filter(|(status, _)| *status == 200)
        .filter_map(|(_, id)| id.clone())
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut db = test.db();
    // notifications makes its row from the event, so "done" is: as many rows sent as orders charged.
    loop {
        let sent: i64 = notifications::table
            .filter(notifications::status.eq("sent"))
            .count()
            .get_result(&mut db)
            .unwrap();
        let charged: i64 = transactions::table
            .filter(transactions::status.eq("charged"))
            .count()
            .get_result(&mut db)
            .unwrap();
        if (charged > 0 && sent >= charged) || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let charged: Vec<(uuid::Uuid, Option<String>)> = transactions::table
        .filter(transactions::status.eq("charged"))
        .select((transactions::id, transactions::charge_id))
        .load(&mut db)
        .unwrap();
    let charged_ids: HashSet<String> = charged.iter().map(|(id, _)| id.to_string()).collect();
    for id in &ok {
        assert!(
            charged_ids.contains(id),
            "order {id} answered 200 but is not recorded as charged"
        );
    }
    // Stripe: one charge per recorded order, and no charge without a record.
    let stripe = test.stripe_charges().await;
    let mut per_order: HashMap<String, usize> = HashMap::new();
    for charge in &stripe {
        let order = charge["metadata"]["order_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        *per_order.entry(order).or_default() += 1;
    }
    for (order, count) in &per_order {
        assert_eq!(*count, 1, "order {order} charged {count} times");
    }
    let charged_at_stripe: HashSet<&String> = per_order.keys().collect();
    for id in &charged_ids {
        assert!(
            charged_at_stripe.contains(id),
            "recorded order {id} has no Stripe charge"
        );
    }
    // Outbox: exactly one order.completed event per charged order (two events would carry two message ids,
    // which JetStream does not deduplicate), none for anything else.
    let payloads: Vec<String> = outbox::table
        .filter(outbox::subject.eq("order.completed"))
        .select(outbox::payload)
        .load(&mut db)
        .unwrap();
    let mut events: HashMap<String, usize> = HashMap::new();
    for payload in &payloads {
        let event: serde_json::Value = serde_json::from_str(payload).unwrap();
        *events
            .entry(event["orderId"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    for id in &charged_ids {
        assert_eq!(events.get(id), Some(&1), "outbox events of order {id}");
    }
    assert_eq!(
        events.len(),
        charged_ids.len(),
        "an event for an order never charged"
    );
    // Mail: exactly one e-mail per charged order, none for anything else.
    let mail = test.sent_mail();
    let mut mailed: HashMap<String, usize> = HashMap::new();
    for email in &mail {
        *mailed
            .entry(email["orderId"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let lost: Vec<&String> = charged_ids
        .iter()
        .filter(|id| !mailed.contains_key(*id))
        .collect();
    let duplicated: Vec<(&String, &usize)> = mailed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        lost.is_empty(),
        "{} charged orders never got an e-mail: {lost:?}",
        lost.len()
    );
    assert!(
        duplicated.is_empty(),
        "e-mailed more than once: {duplicated:?}"
    );
    for id in mailed.keys() {
        assert!(
            charged_ids.contains(id),
            "e-mail for an order that was never charged: {id}"
        );
    }
    let sent: i64 = notifications::table
        .filter(notifications::status.eq("sent"))
        .count()
        .get_result(&mut db)
        .unwrap();
    assert_eq!(
        sent as usize,
        charged_ids.len(),
        "every notification row says sent"
    );
    println!(
        "orders answered 200: {}, charged: {}, e-mails: {}, lost: 0, duplicated: 0",
        ok.len(),
        charged_ids.len(),
        mail.len()
    );
    (ok.len(), charged_ids.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_notifier_mid_burst_loses_no_email_and_sends_none_twice() {
    let mut test = TestStack::boot(&[("NOTIFICATIONS_ACK_WAIT_MS", "2000")]).await;
    let customer = test.customer().await;
    let (running, done) = burst_until(&customer, 40).await;
    test.stack
        .service("notifications")
        .expect("notifications")
        .kill();
    let at_kill = done.load(Ordering::SeqCst);
    assert!(
        at_kill < BURST,
        "the kill must land mid-burst ({at_kill} done)"
    );
    println!("notifier SIGKILLed after {at_kill} of {BURST} checkouts");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    test.stack
        .start_service("notifications")
        .await
        .expect("restart notifications");
    let results = running.await.unwrap();
    assert!(
        results.iter().all(|(status, _)| *status == 200),
        "checkouts do not depend on the notifier"
    );
    let (ok, _) = assert_nothing_lost_nothing_twice(&test, &results).await;
    assert_eq!(ok, BURST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_nats_mid_burst_delays_email_but_loses_none() {
    let mut test = TestStack::boot(&[]).await;
    let customer = test.customer().await;
    let (running, done) = burst_until(&customer, 40).await;
    let nats = test.stack.nats.as_mut().expect("private NATS");
    nats.stop();
    let at_stop = done.load(Ordering::SeqCst);
    assert!(at_stop < BURST, "NATS must stop mid-burst ({at_stop} done)");
    println!("NATS stopped after {at_stop} of {BURST} checkouts");
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart().await.expect("restart NATS");
    let results = running.await.unwrap();
    // The outbox decouples checkout from NATS: every checkout still succeeds.
    assert!(
        results.iter().all(|(status, _)| *status == 200),
        "{:?}",
        results.iter().filter(|r| r.0 != 200).collect::<Vec<_>>()
    );
    let (ok, _) = assert_nothing_lost_nothing_twice(&test, &results).await;
    assert_eq!(ok, BURST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_killed_between_commit_and_publish_still_delivers_through_the_outbox() {
    // Events are committed but held in the outbox (relay paused), then billing is SIGKILLed: exactly the
    // state of a crash between the database commit and the publish. Restarted normally, it relays them.
    let mut test = TestStack::boot(&[("BILLING_OUTBOX_RELAY_PAUSED", "true")]).await;
    let customer = test.customer().await;
    let results = burst(&customer, BURST).await;
    assert!(results.iter().all(|(status, _)| *status == 200));
    {
        use tracehop_contracts::schema::outbox;
        let pending: i64 = outbox::table
            .filter(outbox::published_at.is_null())
            .count()
            .get_result(&mut test.db())
            .unwrap();
        assert_eq!(pending, BURST as i64, "nothing published while paused");
    }
    assert!(test.sent_mail().is_empty());
    test.stack.service("billing").expect("billing").kill();
    test.stack
        .options
        .extra_env
        .retain(|(key, _)| key != "BILLING_OUTBOX_RELAY_PAUSED");
    test.stack
        .start_service("billing")
        .await
        .expect("restart billing");
    assert_nothing_lost_nothing_twice(&test, &results).await;

    // The late publish still joined its checkout's trace.
    let order = results[0].1.clone().unwrap();
    let order = customer.order(&order).await.unwrap();
    let trace_id = order.body["checkoutTraceId"].as_str().unwrap().to_owned();
    let trace = test
        .trace(&trace_id, |t| {
            [
                "outbox.relay",
                "publish order.completed",
                "process order.completed",
            ]
            .iter()
            .all(|name| !t.named(name).is_empty())
        })
        .await;
    let relay = common::one(&trace, "outbox.relay");
    let charge = common::one(&trace, "billing.charge");
    assert_eq!(
        trace.parent(relay).map(|p| &p.span_id),
        Some(&charge.span_id)
    );
    let publish = common::one(&trace, "publish order.completed");
    assert_eq!(
        trace.parent(publish).map(|p| &p.span_id),
        Some(&relay.span_id)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_stripe_attempt_is_retried_and_charged_once() {
    let test = TestStack::boot(&[("BILLING_STRIPE_ATTEMPT_TIMEOUT_MS", "2000")]).await;
    let customer = test.customer().await;
    test.stripe_faults(serde_json::json!({"hangNext": 1, "hangMs": 4000}))
        .await;
    let checkout = customer.checkout("30.00", "usd", None).await.unwrap();
    assert_eq!(checkout.status, 200, "{}", checkout.body);
    let trace_id = checkout.body["traceId"].as_str().unwrap().to_owned();
    let trace = test
        .trace(&trace_id, |t| t.named("POST /v1/charges").len() == 2)
        .await;
    let mut attempts = trace.named("POST /v1/charges");
    attempts.sort_by_key(|a| a.start_us);
    assert!(attempts[0].is_error(), "first attempt timed out");
    assert_eq!(attempts[0].tag("error.type").as_deref(), Some("timeout"));
    assert!(
        attempts[0].duration_us >= 2_000_000,
        "the slow attempt is the wide bar"
    );
    assert!(!attempts[1].is_error());
    assert_eq!(
        attempts[1].tag("http.request.resend_count").as_deref(),
        Some("1")
    );
    let stripe = common::one(&trace, "stripe.create_charge");
    assert_eq!(stripe.tag("stripe.attempts").as_deref(), Some("2"));
    // The whole trace first (spans arrive in batches from four processes), then `stack why`.
    test.trace(&trace_id, |t| {
        t.roots().len() == 1
            && !t.named("POST /checkout").is_empty()
            && !t.named("notification.send_confirmation").is_empty()
    })
    .await;
    // `stack why` blames the first attempt, from the collector's query API like a user would.
    let why = std::process::Command::new(tracehop::process::bin_dir().unwrap().join("stack"))
        .args(["why", &trace_id, "--jaeger", &test.jaeger()])
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&why.stdout).to_string();
    let blame = why
        .lines()
        .find(|l| l.starts_with("why: "))
        .unwrap_or_default();
    assert!(
        blame.contains(": billing › ")
            && blame.contains("› POST /v1/charges attempt 1 timed out after 2.")
            && blame.ends_with(", retried"),
        "{why}"
    );
    // The hung request completes later and finds the idempotency key: still one charge.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(test.stripe_charges().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_checkouts_with_one_idempotency_key_charge_once() {
    let test = TestStack::boot(&[]).await;
    let customer = test.customer().await;
    let answers: Vec<_> = futures::stream::iter(0..20)
        .map(|_| {
            let customer = customer.clone();
            async move {
                customer
                    .checkout("99.99", "usd", Some("same-key-20"))
                    .await
                    .unwrap()
            }
        })
        .buffer_unordered(20)
        .collect()
        .await;
    let orders: HashSet<String> = answers
        .iter()
        .map(|a| {
            assert_eq!(a.status, 200, "{}", a.body);
            a.body["orderId"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(orders.len(), 1, "one order for one key");
    assert_eq!(test.stripe_charges().await.len(), 1, "exactly one charge");
    assert_nothing_lost_nothing_twice(
        &test,
        &answers
            .iter()
            .map(|a| (a.status, a.body["orderId"].as_str().map(str::to_owned)))
            .collect::<Vec<_>>(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_actor_fails_one_request_and_is_restarted() {
    let test = TestStack::boot(&[("BILLING_FAULT_PANIC_AMOUNT_MINOR", "1337")]).await;
    let customer = test.customer().await;
    let failed = customer.checkout("13.37", "usd", None).await.unwrap();
    assert_eq!(failed.status, 500, "{}", failed.body);
    let trace_id = failed.body["traceId"].as_str().expect("traceId").to_owned();
    assert_eq!(failed.trace_id.as_deref(), Some(trace_id.as_str()));

    // The service keeps serving, through the restarted actor.
    for total in ["13.38", "13.39"] {
        let ok = customer.checkout(total, "usd", None).await.unwrap();
        assert_eq!(ok.status, 200, "{}", ok.body);
    }
    // The panic is on the actor's span in the failed checkout's trace, and the restart is logged with it.
    let trace = test
        .trace(&trace_id, |t| {
            t.named("BillingActor handle Charge")
                .first()
                .is_some_and(|s| s.is_error())
        })
        .await;
    let actor = common::one(&trace, "BillingActor handle Charge");
    assert!(actor.is_error(), "{:?}", actor.tags);
    let log = std::fs::read_to_string(test.state_dir.join("logs/billing.log")).unwrap();
    let restart = log
        .lines()
        .find(|line| line.contains("supervisor restarts it"))
        .expect("restart logged");
    assert!(restart.contains("injected panic"), "{restart}");
    assert!(log.lines().any(|line| line.contains("actor restarting")));
    assert!(
        log.lines()
            .any(|line| line.contains("actor handler panicked") && line.contains(&trace_id)),
        "the panic is logged with the trace id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_trace_collector_down_checkouts_succeed_and_lost_spans_are_counted() {
    let dead_port = tracehop::process::free_port().unwrap();
    let mut test = TestStack::boot_custom(
        &[],
        "http/protobuf",
        tracehop::stack::TraceBackend::External {
            otlp_endpoint: format!("http://127.0.0.1:{dead_port}"),
            jaeger_url: None,
        },
    )
    .await;
    let customer = test.customer().await;
    let results = burst(&customer, BURST).await;
    assert!(
        results.iter().all(|(status, _)| *status == 200),
        "tracing never fails a request"
    );
    assert_nothing_lost_nothing_twice(&test, &results).await;
    // Stopping the gateway flushes its telemetry; its last log line counts what could not be exported.
    let gateway = test.stack.service("gateway").unwrap();
    gateway.stop(Duration::from_secs(15));
    let log = std::fs::read_to_string(test.state_dir.join("logs/gateway.log")).unwrap();
    let flushed = log
        .lines()
        .find(|line| line.contains("telemetry flushed"))
        .expect("shutdown line");
    let failed: serde_json::Value = serde_json::from_str(flushed).unwrap();
    let failed = failed["fields"]["spans_failed"].as_u64().unwrap();
    assert!(
        failed >= BURST as u64,
        "every gateway span was counted as lost: {flushed}"
    );
    assert!(
        log.contains("span export failed"),
        "the first failure is reported right away"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_answers_503_and_leaves_no_charge_without_a_record() {
    // A private PostgreSQL this test can stop and start.
    let mut postgres = common::StoppablePostgres::start();
    let server = postgres.url.clone();
    let test = TestStack::boot_on(
        &[
            ("BILLING_RECONCILE_AFTER_MS", "4000"),
            ("BILLING_RECONCILE_EVERY_MS", "500"),
        ],
        "http/protobuf",
        tracehop::stack::TraceBackend::Embedded,
        server,
    )
    .await;
    let customer = test.customer().await;
    let (running, done) = burst_until(&customer, 40).await;
    postgres.stop(); // pg_ctl stop -m fast
    let at_stop = done.load(Ordering::SeqCst);
    assert!(
        at_stop < BURST,
        "the database must stop mid-burst ({at_stop} done)"
    );
    let during_outage = std::time::Instant::now();
    let probe = customer.checkout("7.00", "usd", None).await.unwrap();
    let waited = during_outage.elapsed();
    assert!(
        matches!(probe.status, 202 | 502 | 503),
        "{}: {}",
        probe.status,
        probe.body
    );
    assert_eq!(
        probe.body["traceId"].as_str().map(str::len),
        Some(32),
        "{}",
        probe.body
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    postgres.start_again();
    let results = running.await.unwrap();
    let failed: Vec<_> = results
        .iter()
        .filter(|(status, _)| *status != 200)
        .collect();
    // 503 when nothing was charged; 202 `pending` when Stripe charged and the record could not be written
    // (the reconciler records it below).
    for (status, _) in &failed {
        assert!(
            matches!(status, 202 | 502 | 503),
            "a dependency outage is a 202 (pending), 502 or 503, not {status}"
        );
    }
    println!(
        "PostgreSQL stopped after {at_stop} of {BURST} checkouts; {} answered 503/502; a checkout during the outage answered in {:.1} s",
        failed.len(),
        waited.as_secs_f64()
    );
    // Give the reconciler time to settle charges made just before the outage.
    tokio::time::sleep(Duration::from_secs(6)).await;
    {
        use tracehop_contracts::schema::transactions;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let pending: i64 = transactions::table
                .filter(transactions::status.eq("pending"))
                .count()
                .get_result(&mut test.db())
                .unwrap();
            if pending == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{pending} charges still of unknown outcome"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert_nothing_lost_nothing_twice(&test, &results).await;
    drop(test);
}

/// The issue's own evidence, over real SMTP: PostgreSQL stopped for 5 s a quarter of the way into 200
/// checkouts (8 in flight), the notifier sending to an SMTP server that records every message. Every
/// charged order gets exactly one delivery (one message per `Message-ID`), and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_over_smtp_delivers_each_email_exactly_once() {
    let (smtp_port, inbox) = common::smtp::smtp_server().await;
    let smtp_url = format!("smtp://127.0.0.1:{smtp_port}");
    let mut postgres = common::StoppablePostgres::start();
    let server = postgres.url.clone();
    let test = TestStack::boot_on(
        &[
            ("SMTP_URL", smtp_url.as_str()),
            ("BILLING_RECONCILE_AFTER_MS", "4000"),
            ("BILLING_RECONCILE_EVERY_MS", "500"),
            // Longer than the outage: a sent e-mail's record is retried while the claim holds.
            ("NOTIFICATIONS_CLAIM_LEASE_MS", "20000"),
        ],
        "http/protobuf",
        tracehop::stack::TraceBackend::Embedded,
        server,
    )
    .await;
    let customer = test.customer().await;
    let (running, done) = burst_until(&customer, BURST / 4).await;
    postgres.stop(); // pg_ctl stop -m fast
    let at_stop = done.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    postgres.start_again();
    let results = running.await.unwrap();
    let ok: HashSet<String> = results
        .iter()
        .filter(|(status, _)| *status == 200)
        .filter_map(|(_, id)| id.clone())
        .collect();

    // Wait until every charged order (the reconciler settles those of unknown outcome) has its e-mail.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let charged: HashSet<String> = loop {
        use tracehop_contracts::schema::transactions;
        let mut db = test.db();
        let pending: i64 = transactions::table
            .filter(transactions::status.eq("pending"))
            .count()
            .get_result(&mut db)
            .unwrap();
        let charged: Vec<uuid::Uuid> = transactions::table
            .filter(transactions::status.eq("charged"))
            .select(transactions::id)
            .load(&mut db)
            .unwrap();
        let charged: HashSet<String> = charged.iter().map(ToString::to_string).collect();
        let mailed: HashSet<String> = inbox
            .lock()
            .unwrap()
            .iter()
            .filter_map(|m| common::smtp::message_id(m))
            .collect();
        let all_mailed = charged
            .iter()
            .all(|id| mailed.contains(&format!("<order-{id}@tracehop>")));
        if pending == 0 && all_mailed {
            break charged;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{pending} pending, {} charged, {} mailed",
            charged.len(),
            mailed.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // A little longer, so that a late duplicate would have arrived.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for id in &ok {
        assert!(
            charged.contains(id),
            "order {id} answered 200 but is not charged"
        );
    }
    let messages = inbox.lock().unwrap().clone();
    let mut per_message_id: HashMap<String, usize> = HashMap::new();
    for message in &messages {
        let id = common::smtp::message_id(message).expect("a Message-ID");
        *per_message_id.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = per_message_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(
        per_message_id.len(),
        charged.len(),
        "one e-mail per charged order, none for anything else"
    );
    println!(
        "PostgreSQL stopped for 5 s after {at_stop} of {BURST} checkouts: {} answered 200, {} charged, {} e-mails over SMTP, 0 lost, 0 twice",
        ok.len(),
        charged.len(),
        messages.len()
    );
    drop(test);
}

/// A database restart between bursts (`pg_ctl stop -m fast`, then start): every pooled connection of every
/// service is dead, and none of them may cost a request. The first checkout after the restart, and every
/// one after it, answers 200 (a pool that hands out a dead connection fails that request's first
/// statement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_database_restart_no_request_fails() {
    let mut postgres = common::StoppablePostgres::start();
    let server = postgres.url.clone();
    let test = TestStack::boot_on(
        &[],
        "http/protobuf",
        tracehop::stack::TraceBackend::Embedded,
        server,
    )
    .await;
    let customer = test.customer().await;
    // Concurrent checkouts and order lookups, so every service holds several pooled connections.
    let before = burst(&customer, 40).await;
    assert!(
        before.iter().all(|(status, _)| *status == 200),
        "{before:?}"
    );
    let order = before[0].1.clone().unwrap();

    postgres.stop();
    postgres.start_again();

    let mut failed = Vec::new();
    let first = customer.checkout("3.00", "usd", None).await.unwrap();
    if first.status != 200 {
        failed.push(format!("first checkout: {} {}", first.status, first.body));
    }
    let lookup = customer.order(&order).await.unwrap();
    if lookup.status != 200 {
        failed.push(format!("first lookup: {} {}", lookup.status, lookup.body));
    }
    for (status, id) in burst(&customer, 40).await {
        if status != 200 {
            failed.push(format!("checkout in the burst: {status} {id:?}"));
        }
    }
    assert!(
        failed.is_empty(),
        "requests failed after the database came back: {failed:#?}"
    );
    drop(test);
}

/// A service that starts before JetStream answers (a fresh cluster still placing the stream on a busy
/// machine: a drill's billing replica once exited on it) waits for it: the stream's set-up is tried again
/// until JetStream is ready, rather than given up at the first failure. Here the server first runs without
/// JetStream (every set-up request fails at once), then is replaced by one with it on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_set_up_waits_for_jetstream_to_be_ready() {
    use tracehop_telemetry::messaging::{StreamSettings, ensure_stream};
    let port = tracehop::process::free_port().unwrap();
    let dir = std::env::temp_dir().join(format!(
        "tracehop-late-jetstream-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut plain = std::process::Command::new(
        tracehop::process::find_executable("nats-server").expect("nats-server"),
    );
    plain.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    let mut without_jetstream =
        tracehop::process::ChildProcess::spawn("nats-server", plain, &dir.join("plain.log"))
            .unwrap();
    let url = format!("nats://127.0.0.1:{port}");
    let client = tracehop_telemetry::messaging::connect(&url, "late", None)
        .await
        .unwrap();
    let context = async_nats::jetstream::new(client);
    let setting_up = tokio::spawn(async move {
        let settings = StreamSettings::new("LATE", &["late.>"]);
        ensure_stream(&context, &settings).await.map(|_| ())
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !setting_up.is_finished(),
        "the set-up gave up while JetStream was away: {:?}",
        setting_up.await
    );
    without_jetstream.stop(Duration::from_secs(5));
    let _nats =
        tracehop::infra::PrivateNats::start(port, &dir.join("store"), &dir.join("nats.log"))
            .await
            .unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(50), setting_up)
        .await
        .expect("set up once JetStream answered")
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
