//! The load generator against a real stack: what it reports is what happened (rows in the database, traces
//! in the collector), and its slow-Stripe share really slows the payment hop.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::TestStack;
use diesel::{QueryDsl, RunQueryDsl};
use tracehop::load::{self, LoadOptions, SlowStripe};
use tracehop_contracts::schema::transactions;

#[tokio::test]
async fn load_report_matches_the_database_and_slow_stripe_shows_in_the_traces() {
    let test = TestStack::boot(&[]).await;
    let gateway = test.stack.gateway_url();
    let users = load::user_pool(&gateway, 3).await.expect("users sign up");

    let options = LoadOptions {
        gateway: gateway.clone(),
        rate: None,
        concurrency: 4,
        duration: Duration::from_secs(3),
        warmup: Duration::ZERO,
        users: 3,
        lookup_share: 0.3,
        progress: false,
        slow_stripe: Some(SlowStripe {
            stripe_sim: test.stack.stripe_sim_url(),
            share: 1.0,
            delay_ms: 300,
        }),
    };
    let report = load::run(&options, users).await.expect("load run");

    // Every request answered, and the counts add up.
    assert_eq!(report.errors, 0, "{}", report.table());
    assert_eq!(
        report.status_counts.get("200").copied(),
        Some(report.requests),
        "{}",
        report.table()
    );
    assert_eq!(report.checkout.count + report.lookup.count, report.requests);
    assert!(
        report.checkout.count > 0 && report.lookup.count > 0,
        "{}",
        report.table()
    );
    // Every charge was slowed by 300 ms, so no checkout can have been faster.
    assert!(report.checkout.p50_ms >= 300.0, "{}", report.table());
    assert!(report.lookup.p50_ms < 300.0, "{}", report.table());

    // Each reported checkout is one order in the database (there was no warm-up to leave out).
    let orders: i64 = transactions::table
        .count()
        .get_result(&mut test.db())
        .expect("count orders");
    assert_eq!(orders as u64, report.checkout.count);
    assert_eq!(report.checkout_traces.len() as u64, report.checkout.count);

    // The trace says where the time went: the call to the payment provider.
    let trace_id = &report.checkout_traces[0];
    let trace = test
        .trace(trace_id, |trace| {
            !trace.named("POST /v1/charges").is_empty()
        })
        .await;
    let charge = common::one(&trace, "POST /v1/charges");
    assert!(
        charge.duration_us >= 300_000,
        "POST /v1/charges took {} µs",
        charge.duration_us
    );

    // The fault was for the run only: stripe-sim is fast again.
    let faults = test.current_stripe_faults().await;
    assert_eq!(faults["slowShare"], 0.0, "{faults}");
}
