//! Several replicas of users, billing and notifications (`stack up --replicas N`):
//! - the gateway balances over them and a SIGKILLed replica costs no checkout (a refused connection goes to
//!   the next replica), and each order is e-mailed once over SMTP while one notifier replica dies;
//! - two billing replicas sweeping the same backlog of outbox events publish each event once
//!   (`FOR UPDATE SKIP LOCKED` and a lease), not once per replica;
//! - reconciler rounds slowed to overlap the next, on two replicas, settle a charge once (advisory lock);
//! - the advisory lock itself: one holder, released when its holder's session ends;
//! - a session remembered by both users replicas ends at once on both when it is logged out through one;
//! - wrong passwords for one account, through both users replicas, meet one limit, not one per replica.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::TestStack;
use common::smtp::{message_id, smtp_server};
use tracehop::client::ApiClient;
use tracehop::stack::TraceBackend;
use tracehop::trace_view::TraceView;

async fn boot(extra_env: &[(&str, &str)]) -> TestStack {
    TestStack::boot_replicated(
        extra_env,
        "http/protobuf",
        TraceBackend::Embedded,
        common::database_server_url(),
        2,
        1,
    )
    .await
}

/// `count` checkouts by `customers`, `in_flight` at a time; returns (status, order id, trace id) each.
async fn checkouts(
    customers: &[ApiClient],
    count: usize,
) -> Vec<(u16, Option<String>, Option<String>)> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for customer in customers {
        let customer = customer.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < count {
                let checkout = customer.checkout("11.00", "eur", None).await.unwrap();
                done.push((
                    checkout.status,
                    checkout.body["orderId"].as_str().map(str::to_owned),
                    checkout.trace_id.clone(),
                ));
            }
            done
        }));
    }
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_work_and_a_killed_one_costs_no_checkout_and_no_second_email() {
    let (smtp_port, inbox) = smtp_server().await;
    let smtp_url = format!("smtp://127.0.0.1:{smtp_port}");
    let mut test = boot(&[("SMTP_URL", smtp_url.as_str())]).await;
    assert!(test.stack.instances().contains(&"billing-2".to_owned()));
    let mut customers = Vec::new();
    for _ in 0..4 {
        customers.push(test.customer().await);
    }
    let first = checkouts(&customers, 40).await;
    // Both billing replicas served charges: the service.instance.id of their spans says which. (Read before
    // the kill below: a SIGKILLed process takes its last unexported spans with it.)
    let mut billing_instances = std::collections::BTreeSet::new();
    for (_, _, trace_id) in &first {
        let charge_served = |t: &TraceView| {
            t.spans
                .iter()
                .any(|s| s.name == "POST /charge" && s.service == "billing")
        };
        let trace = test.trace(trace_id.as_ref().unwrap(), charge_served).await;
        for span in &trace.spans {
            if span.name == "POST /charge" && span.service == "billing" {
                billing_instances.insert(span.service_instance.clone().unwrap_or_default());
            }
        }
    }
    assert_eq!(
        billing_instances.len(),
        2,
        "the gateway balanced over both billing replicas: {billing_instances:?}"
    );
    // One replica of billing and one of notifications die; the rest carry on.
    test.stack.service("billing").unwrap().kill();
    test.stack.service("notifications-2").unwrap().kill();
    let second = checkouts(&customers, 40).await;
    let all: Vec<_> = first.iter().chain(&second).collect();
    assert!(
        all.iter().all(|(status, _, _)| *status == 200),
        "{:?}",
        all.iter().filter(|c| c.0 != 200).collect::<Vec<_>>()
    );

    // Every order e-mailed once, counted at the SMTP server.
    let orders: Vec<String> = all
        .iter()
        .filter_map(|(_, order, _)| order.clone())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let by_id = loop {
        let mut by_id: HashMap<String, usize> = HashMap::new();
        for message in inbox.lock().unwrap().iter() {
            *by_id
                .entry(message_id(message).unwrap_or_default())
                .or_default() += 1;
        }
        if by_id.len() >= orders.len() || Instant::now() > deadline {
            break by_id;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for order in &orders {
        assert_eq!(
            by_id.get(&format!("<order-{order}@tracehop>")).copied(),
            Some(1),
            "order {order}"
        );
    }
    assert_eq!(by_id.len(), orders.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_through_one_users_replica_ends_the_session_the_other_remembers_at_once() {
    let test = boot(&[]).await;
    assert!(test.stack.instances().contains(&"users-2".to_owned()));
    let customer = test.customer().await;
    // The gateway alternates between the two users replicas: the first two validations ask PostgreSQL, one
    // on each, and the next two are answered from each replica's memory.
    let mut trace_ids = Vec::new();
    for _ in 0..4 {
        let checkout = customer.checkout("3.00", "eur", None).await.unwrap();
        assert_eq!(checkout.status, 200, "{}", checkout.body);
        trace_ids.push(checkout.trace_id.clone().unwrap());
    }
    let mut remembered_by = std::collections::BTreeSet::new();
    for trace_id in &trace_ids[2..] {
        let validated = |t: &TraceView| t.spans.iter().any(|s| s.name == "session.validate");
        let trace = test.trace(trace_id, validated).await;
        let validate = trace
            .spans
            .iter()
            .find(|s| s.name == "session.validate")
            .unwrap();
        assert_eq!(validate.tag("session.cached").as_deref(), Some("true"));
        assert!(
            trace.children(validate).is_empty(),
            "a remembered session costs no statement"
        );
        remembered_by.insert(validate.service_instance.clone().unwrap_or_default());
    }
    assert_eq!(remembered_by.len(), 2, "{remembered_by:?}");

    let logout = customer
        .call(reqwest::Method::POST, "/logout", None, &[])
        .await
        .unwrap();
    assert_eq!(logout.status, 204, "{}", logout.body);
    // Right away, through either replica: refused.
    for _ in 0..4 {
        let after = customer.checkout("3.00", "eur", None).await.unwrap();
        assert_eq!(after.status, 401, "{}", after.body);
    }
}

/// The gateway alternates between the two users replicas, so with a count per replica an attacker would get
/// twice the limit's guesses. The count is the deployment's: three wrong passwords, then 429 through either
/// replica, the right password included, until the window ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passwords_through_two_users_replicas_meet_one_limit() {
    let test = boot(&[("USERS_LOGIN_FAILURES_PER_ACCOUNT", "3")]).await;
    assert!(test.stack.instances().contains(&"users-2".to_owned()));
    let gateway = test.stack.gateway_url();
    let email = tracehop::client::unique_email("guessed");
    let password = "correct horse battery";
    ApiClient::new(&gateway)
        .signup_and_login(&email, password)
        .await
        .unwrap();
    let login = |password: String| {
        let client = ApiClient::new(&gateway);
        let email = email.clone();
        async move {
            let body = serde_json::json!({"email": email, "password": password});
            let answer = client
                .call(reqwest::Method::POST, "/login", Some(body), &[])
                .await
                .unwrap();
            answer.status
        }
    };
    let mut statuses = Vec::new();
    for attempt in 0..8 {
        statuses.push(login(format!("wrong password {attempt}")).await);
    }
    assert_eq!(statuses, [401, 401, 401, 429, 429, 429, 429, 429]);
    for _ in 0..2 {
        assert_eq!(login(password.to_owned()).await, 429);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_billing_replicas_sweeping_one_backlog_publish_each_event_once() {
    // Events pile up in the outbox while both relays are paused.
    let mut test = boot(&[("BILLING_OUTBOX_RELAY_PAUSED", "true")]).await;
    let mut customers = Vec::new();
    for _ in 0..4 {
        customers.push(test.customer().await);
    }
    let done = checkouts(&customers, 200).await;
    assert!(done.iter().all(|(status, _, _)| *status == 200));

    // Both replicas restart without the pause and sweep the same backlog at the same time.
    test.stack
        .options
        .extra_env
        .retain(|(key, _)| key != "BILLING_OUTBOX_RELAY_PAUSED");
    test.stack
        .service("billing")
        .unwrap()
        .stop(Duration::from_secs(10));
    test.stack
        .service("billing-2")
        .unwrap()
        .stop(Duration::from_secs(10));
    test.stack.start_service("billing").await.unwrap();
    test.stack.start_service("billing-2").await.unwrap();

    // Each event published once: one publish per trace, none a duplicate JetStream dropped.
    let mut publishers = std::collections::BTreeSet::new();
    for (_, _, trace_id) in &done {
        let trace = test
            .trace(trace_id.as_ref().unwrap(), |t| {
                !t.named("process order.completed").is_empty()
                    && !t.named("publish order.completed").is_empty()
            })
            .await;
        let publishes = trace.named("publish order.completed");
        assert_eq!(publishes.len(), 1, "trace {}", trace.trace_id);
        assert_eq!(
            publishes[0].tag("messaging.nats.duplicate").as_deref(),
            Some("false"),
            "trace {}",
            trace.trace_id
        );
        publishers.insert(publishes[0].service_instance.clone().unwrap_or_default());
    }
    assert_eq!(publishers.len(), 2, "both replicas swept: {publishers:?}");
    let stream = async_nats::jetstream::new(test.stack.nats_client().await.unwrap())
        .get_stream("ORDERS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(stream, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_reconciler_rounds_on_two_replicas_settle_a_charge_once() {
    let test = boot(&[
        ("BILLING_RECONCILE_EVERY_MS", "300"),
        ("BILLING_RECONCILE_AFTER_MS", "1000"),
        // Each round takes 1.5 s: five rounds would overlap on each replica without the lock.
        ("BILLING_FAULT_RECONCILE_DELAY_MS", "1500"),
    ])
    .await;
    let customer = test.customer().await;
    let checkout = customer.checkout("64.00", "eur", None).await.unwrap();
    assert_eq!(checkout.status, 200, "{}", checkout.body);
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();
    // Leave the order pending for the reconciler: a charge Stripe made that billing never recorded.
    let mut db = test.db();
    {
        use diesel::RunQueryDsl;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let status: Vec<String> = diesel::sql_query(format!(
                "SELECT status FROM transactions WHERE id = '{order_id}'"
            ))
            .load::<StatusRow>(&mut db)
            .unwrap()
            .into_iter()
            .map(|row| row.status)
            .collect();
            if status.first().map(String::as_str) == Some("charged") || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Back to pending, old enough to reconcile, with its event and e-mail not yet made: exactly the
        // state a billing crash between Stripe's answer and the record leaves.
        diesel::sql_query(format!(
            "DELETE FROM outbox WHERE payload LIKE '%{order_id}%'"
        ))
        .execute(&mut db)
        .unwrap();
        diesel::sql_query(format!(
            "UPDATE transactions SET status = 'pending', charge_id = NULL, \
             created_at = now() - interval '1 minute', updated_at = now() - interval '1 minute' \
             WHERE id = '{order_id}'"
        ))
        .execute(&mut db)
        .unwrap();
    }
    // Settled: charged again, one event.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        use diesel::RunQueryDsl;
        let status: Vec<StatusRow> = diesel::sql_query(format!(
            "SELECT status FROM transactions WHERE id = '{order_id}'"
        ))
        .load(&mut db)
        .unwrap();
        if status.first().is_some_and(|row| row.status == "charged") {
            break;
        }
        assert!(Instant::now() < deadline, "never reconciled");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Wait a few more rounds: no second settlement.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let tags = serde_json::json!({ "order.id": order_id }).to_string();
    let found = TraceView::search(
        &test.jaeger(),
        &[
            ("service", "billing".to_owned()),
            ("operation", "billing.reconcile".to_owned()),
            ("tags", tags),
            ("limit", "100".to_owned()),
        ],
    )
    .await
    .unwrap();
    // One settlement, and no other round even looked at the order (without the lock, overlapping rounds
    // on both replicas each find it pending and each ask Stripe).
    let rounds: Vec<_> = found
        .iter()
        .flat_map(|t| t.named("billing.reconcile"))
        .collect();
    assert_eq!(rounds.len(), 1, "{rounds:#?}");
    assert_eq!(
        rounds[0].tag("reconcile.outcome").as_deref(),
        Some("recorded")
    );
    assert_eq!(test.stripe_charges().await.len(), 1, "Stripe charged once");
}

#[derive(diesel::QueryableByName)]
struct StatusRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    status: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_advisory_lock_has_one_holder_and_goes_with_its_session() {
    let url = common::database_server_url();
    let one = tracehop_telemetry::db::Database::connect(&url, 1).unwrap();
    let two = tracehop_telemetry::db::Database::connect(&url, 1).unwrap();
    let key = rand::random::<i64>();
    let held = one.try_advisory_lock(key).await.unwrap().expect("free");
    assert!(
        two.try_advisory_lock(key).await.unwrap().is_none(),
        "held elsewhere"
    );
    held.release().await;
    let taken = two.try_advisory_lock(key).await.unwrap().expect("released");
    // Dropped without release (a cancelled round, a panic): its connection closes, so does the lock.
    drop(taken);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(again) = one.try_advisory_lock(key).await.unwrap() {
            again.release().await;
            break;
        }
        assert!(Instant::now() < deadline, "a dropped lock was not released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
