//! Retention, stated and enforced: rows older than their setting are deleted by their owning service, a
//! batch per statement, visible as spans; what is still needed (an unpublished event, a pending
//! notification, a live session, anything recent) stays.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::TestStack;
use diesel::RunQueryDsl;
use diesel::sql_types::BigInt;
use tracehop::trace_view::TraceView;

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn count(connection: &mut diesel::PgConnection, sql: &str) -> i64 {
    diesel::sql_query(sql)
        .get_result::<Count>(connection)
        .unwrap()
        .n
}

fn run(connection: &mut diesel::PgConnection, sql: &str) {
    diesel::sql_query(sql).execute(connection).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_rows_go_and_what_is_still_needed_stays() {
    let test = TestStack::boot(&[
        ("USERS_RETENTION_EVERY_MS", "300"),
        ("BILLING_RETENTION_EVERY_MS", "300"),
        ("NOTIFICATIONS_RETENTION_EVERY_MS", "300"),
        ("BILLING_OUTBOX_RETENTION_HOURS", "1"),
        ("NOTIFICATIONS_RETENTION_DAYS", "1"),
        // No relay: the old unpublished event below must stay unpublished, and stay.
        ("BILLING_OUTBOX_RELAY_PAUSED", "true"),
    ])
    .await;
    let customer = test.customer().await;
    let mut db = test.db();
    let user = "(SELECT id FROM users LIMIT 1)";

    // Aged rows, more than one batch (1 000) of each, and the ones that must stay.
    run(
        &mut db,
        &format!(
            "INSERT INTO sessions (token_hash, user_id, expires_at) \
             SELECT 'old-' || g, {user}, now() - interval '1 day' FROM generate_series(1, 1500) g"
        ),
    );
    run(
        &mut db,
        "INSERT INTO outbox (id, subject, payload, trace_context, created_at, published_at) \
         SELECT gen_random_uuid(), 'order.completed', '{}', '{}', now() - interval '3 hours', \
         now() - interval '2 hours' FROM generate_series(1, 2500)",
    );
    run(
        &mut db,
        "INSERT INTO outbox (id, subject, payload, trace_context, created_at, published_at) VALUES \
         (gen_random_uuid(), 'fresh', '{}', '{}', now(), now()), \
         (gen_random_uuid(), 'unpublished', '{}', '{}', now() - interval '3 hours', NULL)",
    );
    run(
        &mut db,
        &format!(
            "INSERT INTO transactions (id, user_id, email, amount_minor, currency, status, \
             idempotency_key, request_fingerprint, trace_id) \
             SELECT md5('t' || g)::uuid, {user}, 'a@example.com', 100, 'usd', 'charged', 'k' || g, 'f', '0' \
             FROM generate_series(1, 1202) g"
        ),
    );
    run(
        &mut db,
        "INSERT INTO notifications (order_id, email, status, attempts, updated_at) \
         SELECT md5('t' || g)::uuid, 'a@example.com', \
         CASE WHEN g % 2 = 0 THEN 'sent' ELSE 'failed' END, 1, now() - interval '2 days' \
         FROM generate_series(1, 1200) g",
    );
    run(
        &mut db,
        "INSERT INTO notifications (order_id, email, status, attempts, updated_at) VALUES \
         (md5('t1201')::uuid, 'a@example.com', 'pending', 1, now() - interval '2 days'), \
         (md5('t1202')::uuid, 'a@example.com', 'sent', 1, now())",
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    let gone = |db: &mut diesel::PgConnection| {
        count(
            db,
            "SELECT count(*) AS n FROM sessions WHERE token_hash LIKE 'old-%'",
        ) == 0
            && count(
                db,
                "SELECT count(*) AS n FROM outbox WHERE subject = 'order.completed'",
            ) == 0
            && count(
                db,
                "SELECT count(*) AS n FROM notifications WHERE updated_at < now() - interval '1 day' AND status <> 'pending'",
            ) == 0
    };
    while !gone(&mut db) {
        assert!(Instant::now() < deadline, "old rows are still there");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // What is still needed stays.
    assert_eq!(
        count(
            &mut db,
            "SELECT count(*) AS n FROM outbox WHERE subject IN ('fresh', 'unpublished')"
        ),
        2
    );
    assert_eq!(count(&mut db, "SELECT count(*) AS n FROM notifications"), 2);
    assert_eq!(
        count(&mut db, "SELECT count(*) AS n FROM sessions"),
        1,
        "the live session"
    );
    let order = customer
        .order("00000000-0000-0000-0000-000000000000")
        .await
        .unwrap();
    assert_eq!(
        order.status, 404,
        "the customer's session still works: {}",
        order.body
    );

    // Each round is a span, each batch a DELETE under it: 2 500 events took three statements.
    let url = format!(
        "{}/api/traces?service=billing&operation=retention%20outbox&limit=1000",
        test.jaeger()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let body: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        let rounds: Vec<TraceView> = body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|trace| {
                TraceView::from_jaeger_json(&serde_json::json!({"data": [trace]})).ok()
            })
            .collect();
        let found = rounds.iter().any(|round| {
            round.spans.iter().any(|s| {
                s.name == "retention outbox"
                    && s.tags.get("retention.deleted") == Some(&serde_json::json!(2500))
            }) && round.named("DELETE outbox").len() == 3
        });
        if found {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no `retention outbox` round deleting 2500 rows in 3 statements among {} rounds",
            rounds.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
