//! Drills: exactly one charge and one e-mail per order while something breaks, on the deployment users run:
//! two replicas of users, billing and notifications, a three-node NATS cluster with the stream replicated
//! three times, e-mail over SMTP to an SMTP server that counts every message it accepts.
//!
//! Each drill runs checkouts, 8 in flight, and strikes a quarter of the way in. Then, once everything
//! settled, for every order:
//! - answered 200: one succeeded charge at Stripe, the transaction `charged`, e-mails accepted by the SMTP
//!   server under exactly one `Message-ID`, the order's (exactly one delivery, except that a notifier
//!   SIGKILLed between the SMTP accept and the record sends it again), and a complete trace with the
//!   e-mail's delivery in it;
//! - any answer: never two charges, and no charge without its record (the reconciler settles 202s).
//!
//! The full drills (300 checkouts each, six faults) take several minutes: `./dev drills` runs them
//! (`cargo test --test drills -- --ignored --test-threads 1`). `./dev test` runs the NATS-leader drill with
//! fewer checkouts, so the cluster is exercised on every change, and the billing-kill drill with fewer checkouts,
//! so the span spool is.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::smtp::{message_id, smtp_server};
use common::{StoppablePostgres, TestStack};
use tracehop::stack::TraceBackend;
use tracehop::trace_view::TraceView;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// PostgreSQL stopped for 5 s.
    PostgresOutage,
    /// One notifications replica SIGKILLed (and left dead).
    KillNotifier,
    /// One billing replica SIGKILLed (and left dead).
    KillBilling,
    /// The NATS node leading the stream SIGKILLed.
    KillStreamLeader,
    /// Stripe answers 500 to a tenth of the charge attempts from then on.
    StripeErrors,
    /// Every reconciler round slowed to overlap the next (from the start).
    SlowReconciler,
}

struct Outcome {
    answered: usize,
    ok: usize,
}

async fn drill(fault: Fault, checkouts: usize) -> Outcome {
    let (smtp_port, inbox) = smtp_server().await;
    let smtp_url = format!("smtp://127.0.0.1:{smtp_port}");
    let mut postgres = StoppablePostgres::start();
    let mut env = vec![
        ("SMTP_URL", smtp_url.as_str()),
        ("BILLING_RECONCILE_EVERY_MS", "1000"),
        ("BILLING_RECONCILE_AFTER_MS", "5000"),
    ];
    if fault == Fault::SlowReconciler {
        env.push(("BILLING_FAULT_RECONCILE_DELAY_MS", "2500"));
    }
    let mut test = TestStack::boot_replicated(
        &env,
        "http/protobuf",
        TraceBackend::Embedded,
        postgres.url.clone(),
        2,
        3,
    )
    .await;
    let mut customers = Vec::new();
    for _ in 0..8 {
        customers.push(test.customer().await);
    }
    if fault == Fault::SlowReconciler {
        // Work for the reconciler: half the Stripe attempts fail, so about one checkout in eight fails all
        // three and answers 202 `pending`, each then settled by the (slow, overlapping) rounds.
        test.stripe_faults(serde_json::json!({"failRate": 0.5}))
            .await;
    }

    // The load: 8 in flight.
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for customer in &customers {
        let customer = customer.clone();
        let (next, done) = (next.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < checkouts {
                let key = uuid::Uuid::new_v4().to_string();
                let answer = customer.checkout("12.34", "eur", Some(&key)).await;
                done.fetch_add(1, Ordering::Relaxed);
                if let Ok(answer) = answer {
                    results.push((
                        answer.status,
                        answer.body["orderId"].as_str().map(str::to_owned),
                        answer.trace_id.clone(),
                    ));
                }
            }
            results
        }));
    }

    // The strike, a quarter of the way in.
    while done.load(Ordering::Relaxed) < checkouts / 4 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match fault {
        Fault::PostgresOutage => {
            postgres.stop();
            tokio::time::sleep(Duration::from_secs(5)).await;
            postgres.start_again();
        }
        Fault::KillNotifier => test.stack.service("notifications-2").unwrap().kill(),
        Fault::KillBilling => test.stack.service("billing-2").unwrap().kill(),
        Fault::KillStreamLeader => {
            let client = test.stack.nats_client().await.unwrap();
            let mut stream = async_nats::jetstream::new(client)
                .get_stream("ORDERS")
                .await
                .unwrap();
            let leader = stream
                .info()
                .await
                .unwrap()
                .cluster
                .as_ref()
                .and_then(|cluster| cluster.leader.clone())
                .expect("a stream leader");
            let node: usize = leader
                .trim_start_matches("tracehop-")
                .parse()
                .expect("a node of ours");
            test.stack.nats_nodes()[node - 1].kill();
        }
        Fault::StripeErrors => {
            test.stripe_faults(serde_json::json!({"failRate": 0.1}))
                .await;
        }
        Fault::SlowReconciler => {}
    }

    let mut results = Vec::new();
    for worker in workers {
        results.extend(worker.await.unwrap());
    }
    // Stripe recovers, so outcomes that were pending can settle.
    test.stripe_faults(serde_json::json!({"failRate": 0.0}))
        .await;
    let answered = results.len();
    let ok: Vec<(String, String)> = results
        .iter()
        .filter(|(status, _, _)| *status == 200)
        .filter_map(|(_, order, trace)| Some((order.clone()?, trace.clone()?)))
        .collect();
    let all_orders: Vec<String> = results
        .iter()
        .filter_map(|(_, order, _)| order.clone())
        .collect();

    // Settled: every 200 order e-mailed (the notifier's lease is 10 s in tests), pending ones reconciled.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut emails: HashMap<String, usize>;
    loop {
        emails = HashMap::new();
        for message in inbox.lock().unwrap().iter() {
            *emails
                .entry(message_id(message).unwrap_or_default())
                .or_default() += 1;
        }
        let all_sent = ok
            .iter()
            .all(|(order, _)| emails.contains_key(&format!("<order-{order}@tracehop>")));
        if all_sent || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Anything still pending is settled by the reconciler (5 s old, every second).
    let deadline = Instant::now() + Duration::from_secs(60);
    let statuses = loop {
        let statuses = transaction_statuses(&test);
        if statuses.values().all(|s| s != "pending") || Instant::now() > deadline {
            break statuses;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // Late e-mails of orders the reconciler recorded.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut charges: HashMap<String, usize> = HashMap::new();
    for charge in test.stripe_charges().await {
        if charge["status"] == "succeeded" {
            let order = charge["metadata"]["order_id"].as_str().unwrap_or_default();
            *charges.entry(order.to_owned()).or_default() += 1;
        }
    }
    let mut emails: HashMap<String, usize> = HashMap::new();
    // Per order (found in the body, not trusted from the header): its deliveries and their Message-IDs.
    let mut delivered: HashMap<&str, (usize, std::collections::BTreeSet<String>)> = HashMap::new();
    for message in inbox.lock().unwrap().iter() {
        let id = message_id(message).unwrap_or_default();
        *emails.entry(id.clone()).or_default() += 1;
        if let Some(order) = all_orders
            .iter()
            .find(|order| message.contains(order.as_str()))
        {
            let entry = delivered.entry(order.as_str()).or_default();
            entry.0 += 1;
            entry.1.insert(id);
        }
    }
    // A SIGKILL between the SMTP server's accept and the record is the one window left: the e-mail is
    // sent again, with the same Message-ID (mail clients show one). Everywhere else: one delivery.
    let resends_allowed = fault == Fault::KillNotifier;
    let mut resent = 0;

    let mut problems = Vec::new();
    for (order, _) in &ok {
        if charges.get(order).copied() != Some(1) {
            problems.push(format!("{order}: {:?} charges", charges.get(order)));
        }
        if statuses.get(order).map(String::as_str) != Some("charged") {
            problems.push(format!("{order}: transaction {:?}", statuses.get(order)));
        }
        let (sent, ids) = delivered.get(order.as_str()).cloned().unwrap_or_default();
        if ids.len() != 1 || !ids.contains(&format!("<order-{order}@tracehop>")) {
            problems.push(format!("{order}: Message-IDs {ids:?}"));
        }
        match sent {
            1 => {}
            n if n > 1 && resends_allowed => resent += n - 1,
            n => problems.push(format!("{order}: {n} deliveries")),
        }
    }
    for order in &all_orders {
        let charged = charges.get(order).copied().unwrap_or(0);
        if charged > 1 {
            problems.push(format!("{order}: charged {charged} times"));
        }
        let recorded = statuses.get(order).map(String::as_str) == Some("charged");
        if (charged == 1) != recorded {
            problems.push(format!(
                "{order}: {charged} charge(s), transaction {:?}",
                statuses.get(order)
            ));
        }
    }
    // Every e-mail belongs to an order.
    for id in emails.keys() {
        let known = all_orders
            .iter()
            .any(|order| *id == format!("<order-{order}@tracehop>"));
        if !known {
            problems.push(format!("{id}: an e-mail for no order"));
        }
    }
    // Every answered order's trace is complete: one root, no span whose parent is missing, and the
    // e-mail's successful delivery in it. A SIGKILLed process's spans are not lost with it: its sibling
    // exports what its spool holds (TRACEHOP_SPAN_SPOOL), and the spans whose context had left it and that
    // never ended as errors (`error.type` `process_exited`).
    let whole = |t: &TraceView| {
        tracehop::why::Why::of(t).incomplete == 0
            && t.named("process order.completed")
                .iter()
                .any(|s| !s.is_error())
    };
    let mut ended_by_the_kill = 0;
    for (_, trace_id) in &ok {
        let trace =
            TraceView::wait_for(&test.jaeger(), trace_id, Duration::from_secs(10), whole).await;
        match trace {
            Ok(trace) if whole(&trace) => {
                ended_by_the_kill += trace
                    .spans
                    .iter()
                    .filter(|span| span.tag("error.type").as_deref() == Some("process_exited"))
                    .count();
            }
            _ => problems.push(format!("trace {trace_id}: not complete")),
        }
    }
    println!(
        "drill {fault:?}: {checkouts} checkouts, {answered} answered, {} answered 200, {} charges, {} orders e-mailed, {} deliveries ({resent} resent with the same Message-ID); {} traces complete ({ended_by_the_kill} spans in them ended by a kill)",
        ok.len(),
        charges.values().sum::<usize>(),
        emails.len(),
        emails.values().sum::<usize>(),
        ok.len() - problems.iter().filter(|p| p.starts_with("trace ")).count()
    );
    assert!(
        problems.is_empty(),
        "drill {fault:?}: {} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
    drop(test);
    Outcome {
        answered,
        ok: ok.len(),
    }
}

fn transaction_statuses(test: &TestStack) -> HashMap<String, String> {
    use diesel::{QueryDsl, RunQueryDsl};
    use tracehop_contracts::schema::transactions;
    let mut db = test.db();
    transactions::table
        .select((transactions::id, transactions::status))
        .load::<(uuid::Uuid, String)>(&mut db)
        .unwrap()
        .into_iter()
        .map(|(id, status)| (id.to_string(), status))
        .collect()
}

/// In `./dev test`: the cluster loses the node leading the stream mid-load; nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_cluster_rides_the_loss_of_the_stream_leader() {
    let outcome = drill(Fault::KillStreamLeader, 80).await;
    assert_eq!(outcome.answered, 80);
    assert!(outcome.ok >= 76, "{} of 80 answered 200", outcome.ok);
}

/// In `./dev test`: a billing replica SIGKILLed mid-load; nothing is charged or e-mailed twice, and the
/// traces of the orders it answered are whole (its spool, exported by its sibling).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_billing_replica_loses_no_order_and_no_span() {
    let outcome = drill(Fault::KillBilling, 80).await;
    assert!(outcome.ok >= 60, "{} of 80 answered 200", outcome.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a drill: ./dev drills"]
async fn drill_postgres_outage() {
    drill(Fault::PostgresOutage, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a drill: ./dev drills"]
async fn drill_kill_a_notifier_replica() {
    drill(Fault::KillNotifier, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a drill: ./dev drills"]
async fn drill_kill_a_billing_replica() {
    drill(Fault::KillBilling, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a drill: ./dev drills"]
async fn drill_kill_the_stream_leader() {
    drill(Fault::KillStreamLeader, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a drill: ./dev drills"]
async fn drill_stripe_errors() {
    drill(Fault::StripeErrors, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a drill: ./dev drills"]
async fn drill_slow_overlapping_reconciler_rounds() {
    drill(Fault::SlowReconciler, 300).await;
}
