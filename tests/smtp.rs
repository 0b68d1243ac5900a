//! E-mail over real SMTP: with `SMTP_URL` set, the notifier speaks SMTP (lettre) to a small SMTP server run
//! by this test (the test double for a mail provider we cannot reach), which records what it accepted.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::TestStack;
use common::smtp::{smtp_server, smtp_server_with};
use tracehop::client::{ApiClient, unique_email};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmations_go_out_over_smtp_when_smtp_url_is_set() {
    let (port, inbox) = smtp_server().await;
    let smtp_url = format!("smtp://127.0.0.1:{port}");
    let test = TestStack::boot(&[("SMTP_URL", smtp_url.as_str())]).await;
    let mut customer = ApiClient::new(&test.stack.gateway_url());
    let email = unique_email("dani");
    customer
        .signup_and_login(&email, "correct horse battery")
        .await
        .unwrap();
    let checkout = customer.checkout("42.00", "usd", None).await.unwrap();
    assert_eq!(checkout.status, 200);
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();
    let trace_id = checkout.body["traceId"].as_str().unwrap().to_owned();

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let order = customer.order(&order_id).await.unwrap();
        if order.body["notification"] == "sent" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not sent: {}",
            order.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let messages = inbox.lock().unwrap().clone();
    assert_eq!(messages.len(), 1, "{messages:?}");
    let message = &messages[0];
    assert!(message.contains("Subject: Order confirmed"), "{message}");
    assert!(message.contains(&format!("To: {email}")), "{message}");
    assert!(message.contains(&order_id), "{message}");
    assert!(message.contains("42.00 usd"), "{message}");
    // The Message-ID is the order's: a resend (the one window left) shows as one message in mail clients.
    assert!(
        message.contains(&format!("Message-ID: <order-{order_id}@tracehop>")),
        "{message}"
    );
    assert!(
        test.sent_mail().is_empty(),
        "nothing in the local sink when SMTP is used"
    );

    let trace = test
        .trace(&trace_id, |t| !t.named("mail.send").is_empty())
        .await;
    let send = common::one(&trace, "mail.send");
    assert_eq!(send.tag("mail.transport").as_deref(), Some("smtp"));
    assert!(!send.is_error());
}

/// A recipient the SMTP server refuses: the order says `smtp_rejected`, and the address (which the server's
/// reply quotes) appears nowhere in the trace, the stored error, the dead letter or the answer; the log
/// has the server's reply with the address masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_recipient_is_a_code_and_the_address_stays_out_of_telemetry() {
    let (port, inbox) = smtp_server_with(true, Duration::ZERO).await;
    let smtp_url = format!("smtp://127.0.0.1:{port}");
    let test = TestStack::boot(&[
        ("SMTP_URL", smtp_url.as_str()),
        ("NOTIFICATIONS_MAX_DELIVER", "2"),
        ("NOTIFICATIONS_BACKOFF_MS", "100"),
    ])
    .await;
    let mut customer = ApiClient::new(&test.stack.gateway_url());
    let email = unique_email("private");
    customer
        .signup_and_login(&email, "correct horse battery")
        .await
        .unwrap();
    let checkout = customer.checkout("7.00", "usd", None).await.unwrap();
    assert_eq!(checkout.status, 200);
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();
    let trace_id = checkout.body["traceId"].as_str().unwrap().to_owned();

    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let order = loop {
        let order = customer.order(&order_id).await.unwrap();
        if order.body["notification"] == "failed" {
            break order;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not failed: {}",
            order.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        order.body["notificationError"], "smtp_rejected",
        "{}",
        order.body
    );
    assert!(!order.body.to_string().contains(&email));
    assert!(inbox.lock().unwrap().is_empty());

    // The whole trace, every attribute, event and status: no address.
    let trace = test
        .trace(&trace_id, |t| t.named("mail.send").len() >= 2)
        .await;
    for send in trace.named("mail.send") {
        assert!(send.is_error());
    }
    let raw = reqwest::get(format!("{}/api/traces/{trace_id}", test.jaeger()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(raw.contains("smtp_rejected"), "the code is in the trace");
    assert!(!raw.contains(&email), "the address leaked into the trace");
    let local_part = email.split('@').next().unwrap();
    assert!(
        !raw.contains(local_part),
        "the address leaked into the trace"
    );

    // The dead letter's reason is the code.
    {
        use futures::StreamExt;
        let jetstream = async_nats::jetstream::new(test.stack.nats_client().await.unwrap());
        let stream = jetstream.get_stream("ORDERS").await.unwrap();
        let reader = stream
            .create_consumer(async_nats::jetstream::consumer::pull::Config {
                filter_subject: "order.completed.dead".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut messages = reader
            .fetch()
            .max_messages(10)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .unwrap();
        let message = messages.next().await.unwrap().unwrap();
        let reason = message
            .headers
            .as_ref()
            .unwrap()
            .get("Tracehop-Dead-Letter-Reason")
            .unwrap()
            .to_string();
        assert!(reason.ends_with("smtp_rejected"), "{reason}");
        assert!(!reason.contains('@'), "{reason}");
    }

    // The log keeps the server's reply, with the address masked.
    let log = std::fs::read_to_string(test.state_dir.join("logs/notifications.log")).unwrap();
    assert!(
        log.contains("Recipient address rejected"),
        "the detail is in the log"
    );
    assert!(!log.contains(local_part), "the log masks the address");
}

/// Two deliveries of one order at once (the same event published twice with different message ids, as a
/// duplicate publish would): the first claims the notification and sends, slowly; the second finds it
/// claimed, is not acknowledged, comes back, finds it sent. One e-mail, and nothing left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deliveries_of_one_order_send_one_email() {
    let (port, inbox) = smtp_server_with(false, Duration::from_millis(1500)).await;
    let smtp_url = format!("smtp://127.0.0.1:{port}");
    let test = TestStack::boot(&[("SMTP_URL", smtp_url.as_str())]).await;
    let mut customer = ApiClient::new(&test.stack.gateway_url());
    customer
        .signup_and_login(&unique_email("twice"), "correct horse battery")
        .await
        .unwrap();
    let checkout = customer.checkout("11.00", "usd", None).await.unwrap();
    assert_eq!(checkout.status, 200);
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();

    // While the first delivery is still waiting on the slow SMTP server, the same event again.
    let jetstream = async_nats::jetstream::new(test.stack.nats_client().await.unwrap());
    let stream = jetstream.get_stream("ORDERS").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let original = loop {
        if let Ok(message) = stream
            .get_last_raw_message_by_subject("order.completed")
            .await
        {
            break message;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the event never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut headers = original.headers.clone();
    headers.insert(
        "Nats-Msg-Id",
        format!("duplicate-{}", uuid::Uuid::new_v4()).as_str(),
    );
    jetstream
        .publish_with_headers("order.completed", headers, original.payload.clone())
        .await
        .unwrap()
        .await
        .unwrap();

    // The e-mail goes out once; then both messages are acknowledged.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let order = customer.order(&order_id).await.unwrap();
        let mut consumer = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("notifications")
            .await
            .unwrap();
        let info = consumer.info().await.unwrap();
        if order.body["notification"] == "sent"
            && info.num_ack_pending == 0
            && info.num_pending == 0
        {
            assert_eq!(order.body["notificationAttempts"], 1, "{}", order.body);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not settled: {} ({} unacked, {} pending)",
            order.body,
            info.num_ack_pending,
            info.num_pending
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let messages = inbox.lock().unwrap().clone();
    assert_eq!(messages.len(), 1, "one e-mail per order: {messages:?}");
}
