//! The seed's second story: the e-mail never arrives. Every attempt is visible in the trace, the message
//! ends on the dead-letter subject, the order says `failed`, and a replay after the fix delivers it once.
//! A malformed message goes to the dead-letter subject without blocking anything.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::TestStack;
use tracehop::client::ApiClient;

async fn wait_for_notification(
    customer: &ApiClient,
    order_id: &str,
    wanted: &str,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let order = customer.order(order_id).await.unwrap();
        if order.body["notification"] == wanted || std::time::Instant::now() > deadline {
            return order.body;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_email_is_visible_dead_lettered_marked_failed_and_replayable() {
    let test = TestStack::boot(&[
        ("NOTIFICATIONS_MAX_DELIVER", "3"),
        ("NOTIFICATIONS_BACKOFF_MS", "100"),
    ])
    .await;
    let customer = test.customer().await;
    let http = tracehop_telemetry::http::client::plain_client_builder()
        .build()
        .unwrap();
    let fail = |count: u32| {
        http.post(format!("{}/_admin/faults", test.stack.notifications_url()))
            .json(&serde_json::json!({ "failNext": count }))
            .send()
    };
    fail(1000).await.unwrap().error_for_status().unwrap();

    let checkout = customer.checkout("19.99", "usd", None).await.unwrap();
    assert_eq!(
        checkout.status, 200,
        "the checkout itself does not wait for the e-mail"
    );
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();
    let trace_id = checkout.body["traceId"].as_str().unwrap().to_owned();

    let order = wait_for_notification(&customer, &order_id, "failed").await;
    assert_eq!(order["notification"], "failed", "{order}");
    assert_eq!(order["notificationAttempts"], 3);
    // A code, not a message: no address, no server text (the detail is in notifications' log).
    assert_eq!(order["notificationError"], "injected", "{order}");
    assert!(test.sent_mail().is_empty());

    // The trace tells the story: three deliveries, each an ERROR, then the dead letter.
    let trace = test
        .trace(&trace_id, |t| {
            t.named("process order.completed").len() == 3
                && !t.named("publish order.completed.dead").is_empty()
        })
        .await;
    let mut deliveries = trace.named("process order.completed");
    deliveries.sort_by_key(|s| s.start_us);
    let counts: Vec<String> = deliveries
        .iter()
        .map(|s| s.tag("messaging.nats.delivery_count").unwrap_or_default())
        .collect();
    assert_eq!(counts, ["1", "2", "3"]);
    // What the whole story waited on crosses the NATS hop: the deliveries are on the critical path (read
    // once the whole trace is in: one root).
    let whole = test
        .trace(&trace_id, |t| {
            t.roots().len() == 1 && t.named("process order.completed").len() == 3
        })
        .await;
    let why = tracehop::why::Why::of(&whole);
    assert_eq!(why.incomplete, 0, "{}", why.report());
    assert!(
        why.path
            .iter()
            .any(|step| step.name == "publish order.completed")
            && why
                .path
                .iter()
                .any(|step| step.name == "process order.completed"),
        "{}",
        why.report()
    );
    let publish = common::one(&trace, "publish order.completed");
    for delivery in &deliveries {
        assert!(
            delivery.is_error(),
            "delivery {:?} is ERROR",
            delivery.tag("messaging.nats.delivery_count")
        );
        assert_eq!(
            trace.parent(delivery).map(|p| &p.span_id),
            Some(&publish.span_id)
        );
    }
    let sends = trace.named("notification.send_confirmation");
    assert_eq!(sends.len(), 3);
    for send in &sends {
        assert!(send.is_error());
        assert!(
            send.events.iter().any(|e| e
                .values()
                .any(|v| v.as_str().is_some_and(|s| s.starts_with("injected")))),
            "exception recorded: {:?}",
            send.events
        );
    }
    let dead = common::one(&trace, "publish order.completed.dead");
    assert_eq!(
        trace.parent(dead).map(|p| &p.span_id),
        Some(&deliveries[2].span_id)
    );

    // Fixed: replay, and the e-mail goes out once, in the same trace. (`stack replay-dead-letters` installs
    // telemetry; here only the propagator, so the replay exports no span of its own but the checkout's
    // context still travels.)
    opentelemetry::global::set_text_map_propagator(tracehop_telemetry::setup::propagator());
    fail(0).await.unwrap().error_for_status().unwrap();
    let report = tracehop::dead_letters::replay(test.stack.nats_client().await.unwrap(), "ORDERS")
        .await
        .unwrap();
    assert_eq!(report.replayed, 1);
    let order = wait_for_notification(&customer, &order_id, "sent").await;
    assert_eq!(order["notification"], "sent", "{order}");
    assert_eq!(test.sent_mail().len(), 1);
    let again = tracehop::dead_letters::replay(test.stack.nats_client().await.unwrap(), "ORDERS")
        .await
        .unwrap();
    assert_eq!(
        again.replayed, 0,
        "a replayed letter is gone from the dead-letter subject"
    );
    let trace = test
        .trace(&trace_id, |t| t.named("process order.completed").len() == 4)
        .await;
    assert!(
        trace
            .named("notification.send_confirmation")
            .iter()
            .any(|s| !s.is_error()),
        "the replayed delivery succeeded in the checkout's trace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_is_dead_lettered_and_does_not_block_the_consumer() {
    let test = TestStack::boot(&[]).await;
    let client = test.stack.nats_client().await.unwrap();
    let jetstream = async_nats::jetstream::new(client);
    // No headers at all, and not JSON.
    jetstream
        .publish("order.completed", "this is not an order".into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Headers, but a payload of the wrong shape.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    jetstream
        .publish_with_headers(
            "order.completed",
            headers.clone(),
            "{\"orderId\": 42}".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // Poison: an order id with a line break (it once reached a header value and panicked the consumer),
    // a NUL, bytes that are not UTF-8, and a payload of 1 MB.
    let event = |order_id: &str| {
        format!(
            r#"{{"eventId":"00000000-0000-0000-0000-000000000001","orderId":"{order_id}","userId":"00000000-0000-0000-0000-000000000002","email":"dani@example.com","amountMinor":100,"currency":"usd","chargeId":"ch_1"}}"#
        )
    };
    let poison: Vec<bytes::Bytes> = vec![
        event("line\\nbreak").into(),
        event("nul\u{0}byte").into(),
        bytes::Bytes::from_static(b"{\"orderId\":\"\xff\xfe\xfd\"}"),
        vec![b'x'; 1_000_000].into(),
    ];
    for payload in poison {
        jetstream
            .publish_with_headers("order.completed", headers.clone(), payload)
            .await
            .unwrap()
            .await
            .unwrap();
    }

    // A real checkout after them is still mailed.
    let customer = test.customer().await;
    let checkout = customer.checkout("5.00", "usd", None).await.unwrap();
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();
    let order = wait_for_notification(&customer, &order_id, "sent").await;
    assert_eq!(order["notification"], "sent");

    // Both bad messages are on the dead-letter subject, with their reasons.
    let mut stream = jetstream.get_stream("ORDERS").await.unwrap();
    let info = stream.info().await.unwrap();
    let mut reasons = Vec::new();
    for sequence in 1..=info.state.last_sequence {
        if let Ok(message) = stream.get_raw_message(sequence).await
            && message.subject.as_str() == "order.completed.dead"
        {
            let headers = message.headers;
            reasons.push(
                headers
                    .get("Tracehop-Dead-Letter-Reason")
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default(),
            );
        }
    }
    reasons.sort();
    assert_eq!(
        reasons.len(),
        6,
        "every bad message dead-lettered once: {reasons:?}"
    );
    let count = |prefix: &str| reasons.iter().filter(|r| r.starts_with(prefix)).count();
    assert_eq!(count("malformed message: no headers"), 1, "{reasons:?}");
    assert_eq!(
        count("malformed message: not an order.completed event"),
        2,
        "wrong shape, line break: {reasons:?}"
    );
    assert_eq!(
        count("malformed message: not JSON"),
        2,
        "NUL, not UTF-8: {reasons:?}"
    );
    assert_eq!(
        count("malformed message: 1000000 bytes is larger than"),
        1,
        "{reasons:?}"
    );
    assert!(
        !reasons.iter().any(|r| r.contains("dani@example.com")),
        "a reason never quotes the payload: {reasons:?}"
    );
}
