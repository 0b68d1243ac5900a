//! End to end: all five services as real processes, real NATS JetStream and PostgreSQL, OTLP to the
//! embedded collector; the assertions read the exported trace back through the Jaeger query API.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;

use common::{TestStack, one};
use diesel::{QueryDsl, RunQueryDsl};
use tracehop::client::{ApiClient, unique_email};
use tracehop::trace_view::TraceView;

fn has_everything(trace: &TraceView) -> bool {
    let names: HashSet<&str> = trace.spans.iter().map(|s| s.name.as_str()).collect();
    // The notifier's span ends once the e-mail is sent and recorded.
    [
        "notification.send_confirmation",
        "notification.record_sent",
        "publish order.completed",
        "process order.completed",
        "POST /checkout",
        "session.validate",
    ]
    .iter()
    .all(|name| names.contains(name))
        && trace
            .spans
            .iter()
            .any(|s| s.name == "INSERT notifications" && s.service == "notifications")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_checkout_is_one_trace_across_all_four_services() {
    let test = TestStack::boot(&[]).await;
    let mut customer = ApiClient::new(&test.stack.gateway_url());
    let user_id = customer
        .signup_and_login(&unique_email("dani"), "correct horse battery")
        .await
        .expect("signup and login");

    let checkout = customer
        .checkout("49.99", "usd", None)
        .await
        .expect("checkout");
    assert_eq!(checkout.status, 200, "{}", checkout.body);
    assert_eq!(checkout.body["status"], "completed");
    let order_id = checkout.body["orderId"]
        .as_str()
        .expect("orderId")
        .to_owned();
    let trace_id = checkout.body["traceId"]
        .as_str()
        .expect("traceId")
        .to_owned();
    assert_eq!(trace_id.len(), 32);
    assert_eq!(
        checkout.trace_id.as_deref(),
        Some(trace_id.as_str()),
        "traceresponse header names the trace"
    );

    let trace = test.trace(&trace_id, has_everything).await;
    assert_eq!(trace.trace_id, trace_id);
    let services: HashSet<String> = trace.services().into_iter().collect();
    for service in ["gateway", "users", "billing", "notifications"] {
        assert!(
            services.contains(service),
            "no spans from {service}: {services:?}"
        );
    }
    assert!(!services.contains("unknown"), "a span without service.name");
    let roots = trace.roots();
    assert_eq!(
        roots.len(),
        1,
        "one root: {:?}",
        roots.iter().map(|s| &s.name).collect::<Vec<_>>()
    );

    // Gateway: server span -> checkout.process.
    let root = roots[0];
    assert_eq!(root.name, "POST /checkout");
    assert_eq!(root.service, "gateway");
    assert_eq!(root.kind(), "server");
    assert_eq!(root.tag("http.request.method").as_deref(), Some("POST"));
    assert_eq!(root.tag("http.route").as_deref(), Some("/checkout"));
    assert_eq!(root.tag("url.path").as_deref(), Some("/checkout"));
    assert_eq!(root.tag("url.scheme").as_deref(), Some("http"));
    assert_eq!(
        root.tag("http.response.status_code").as_deref(),
        Some("200")
    );
    let process = one(&trace, "checkout.process");
    assert_eq!(
        trace.parent(process).map(|p| &p.span_id),
        Some(&root.span_id)
    );
    assert_eq!(process.tag("user.id").as_deref(), Some(user_id.as_str()));
    assert_eq!(process.tag("order.total").as_deref(), Some("49.99"));
    assert_eq!(process.tag("order.id").as_deref(), Some(order_id.as_str()));

    // -> users call -> users server span -> session.validate (+ its query).
    let users_call = trace
        .children(process)
        .into_iter()
        .find(|s| s.name == "POST /sessions/validate")
        .expect("client call to users");
    assert_eq!(users_call.kind(), "client");
    assert_eq!(users_call.service, "gateway");
    assert!(
        users_call
            .tag("url.full")
            .unwrap_or_default()
            .ends_with("/sessions/validate")
    );
    assert_eq!(
        users_call.tag("server.address").as_deref(),
        Some("127.0.0.1")
    );
    assert!(users_call.tag("server.port").is_some());
    let users_server = trace.children(users_call);
    assert_eq!(users_server.len(), 1);
    assert_eq!(users_server[0].service, "users");
    assert_eq!(users_server[0].kind(), "server");
    let validate = one(&trace, "session.validate");
    assert_eq!(
        trace.parent(validate).map(|p| &p.span_id),
        Some(&users_server[0].span_id)
    );
    let session_query = trace.children(validate);
    assert!(
        session_query
            .iter()
            .any(|s| s.name == "SELECT sessions" && s.kind() == "client"),
        "session lookup query span"
    );

    // -> billing call -> billing server span -> BillingActor handle -> billing.charge.
    let billing_call = trace
        .children(process)
        .into_iter()
        .find(|s| s.name == "POST /charge")
        .expect("client call to billing");
    assert_eq!(billing_call.kind(), "client");
    let billing_server = trace.children(billing_call);
    assert_eq!(billing_server.len(), 1);
    assert_eq!(billing_server[0].service, "billing");
    assert_eq!(billing_server[0].name, "POST /charge");
    let billing_actor = one(&trace, "BillingActor handle Charge");
    assert_eq!(
        trace.parent(billing_actor).map(|p| &p.span_id),
        Some(&billing_server[0].span_id)
    );
    assert_eq!(
        billing_actor.tag("actor.name").as_deref(),
        Some("BillingActor")
    );
    assert_eq!(
        billing_actor.tag("actor.message.type").as_deref(),
        Some("Charge")
    );
    assert!(
        billing_actor
            .tag("actor.mailbox.wait_us")
            .is_some_and(|w| w.parse::<u64>().is_ok())
    );
    let charge = one(&trace, "billing.charge");
    assert_eq!(
        trace.parent(charge).map(|p| &p.span_id),
        Some(&billing_actor.span_id)
    );
    assert_eq!(charge.tag("billing.amount").as_deref(), Some("4999"));
    assert_eq!(charge.tag("billing.currency").as_deref(), Some("usd"));

    // -> StripeClientActor handle -> stripe.create_charge -> HTTP client span to Stripe.
    let stripe_actor = one(&trace, "StripeClientActor handle CreateCharge");
    assert_eq!(
        trace.parent(stripe_actor).map(|p| &p.span_id),
        Some(&charge.span_id)
    );
    let stripe = one(&trace, "stripe.create_charge");
    assert_eq!(
        trace.parent(stripe).map(|p| &p.span_id),
        Some(&stripe_actor.span_id)
    );
    let charge_id = stripe.tag("stripe.charge_id").expect("stripe.charge_id");
    assert!(charge_id.starts_with("ch_"), "{charge_id}");
    let stripe_http = one(&trace, "POST /v1/charges");
    assert_eq!(
        trace.parent(stripe_http).map(|p| &p.span_id),
        Some(&stripe.span_id)
    );
    assert_eq!(stripe_http.kind(), "client");
    assert_eq!(
        stripe_http.tag("http.response.status_code").as_deref(),
        Some("200")
    );

    // -> db.save_transaction -> one CLIENT span per statement, no literal values.
    let save = one(&trace, "db.save_transaction");
    assert_eq!(
        trace.parent(save).map(|p| &p.span_id),
        Some(&charge.span_id)
    );
    // (A `db.pool.acquire` span may sit beside the statements when the pool was slow to hand out a connection.)
    let statements: Vec<_> = trace
        .children(save)
        .into_iter()
        .filter(|s| s.name != "db.pool.acquire")
        .collect();
    let names: HashSet<&str> = statements.iter().map(|s| s.name.as_str()).collect();
    // One statement: the update of the transaction and the insert of its event, together.
    assert_eq!(
        statements.len(),
        1,
        "one statement under db.save_transaction: {names:?}"
    );
    assert!(names.contains("INSERT outbox"), "{names:?}");
    let text = statements[0].tag("db.query.text").unwrap_or_default();
    assert!(text.contains("UPDATE transactions"), "{text}");
    // The notification row is notifications' own: billing does not write it.
    assert!(
        !names.contains("INSERT notifications"),
        "billing writes notifications' table: {names:?}"
    );
    for statement in &statements {
        assert_eq!(statement.kind(), "client", "{}", statement.name);
        assert_eq!(
            statement.tag("db.system.name").as_deref(),
            Some("postgresql")
        );
        assert_eq!(
            statement.tag("db.namespace").as_deref(),
            Some(test.database_name.as_str())
        );
        let text = statement.tag("db.query.text").unwrap_or_default();
        assert!(text.contains("$1"), "placeholders in {text}");
        assert!(
            !text.contains(&charge_id),
            "literal value leaked into {text}"
        );
    }

    // -> publish order.completed (PRODUCER) -> process order.completed (CONSUMER, other service).
    let publish = one(&trace, "publish order.completed");
    assert!(
        trace.is_ancestor(charge, publish),
        "publish joins the charge"
    );
    assert_eq!(publish.kind(), "producer");
    assert_eq!(publish.service, "billing");
    assert_eq!(publish.tag("messaging.system").as_deref(), Some("nats"));
    assert_eq!(
        publish.tag("messaging.destination.name").as_deref(),
        Some("order.completed")
    );
    assert_eq!(
        publish.tag("messaging.operation.type").as_deref(),
        Some("send")
    );
    let message_id = publish.tag("messaging.message.id").expect("message id");
    let consume = one(&trace, "process order.completed");
    assert_eq!(
        trace.parent(consume).map(|p| &p.span_id),
        Some(&publish.span_id)
    );
    assert_eq!(consume.kind(), "consumer");
    assert_eq!(consume.service, "notifications");
    assert_eq!(
        consume.tag("messaging.operation.type").as_deref(),
        Some("process")
    );
    assert_eq!(consume.tag("messaging.message.id"), Some(message_id));
    assert_eq!(
        consume.tag("messaging.nats.delivery_count").as_deref(),
        Some("1")
    );

    // -> NotifierActor handle -> notification.send_confirmation (OK).
    let notifier = one(&trace, "NotifierActor handle SendConfirmation");
    assert_eq!(
        trace.parent(notifier).map(|p| &p.span_id),
        Some(&consume.span_id)
    );
    let send = one(&trace, "notification.send_confirmation");
    assert_eq!(
        trace.parent(send).map(|p| &p.span_id),
        Some(&notifier.span_id)
    );
    assert_eq!(send.tag("otel.status_code").as_deref(), Some("OK"));
    assert_eq!(send.tag("order.id").as_deref(), Some(order_id.as_str()));
    // The wait for the e-mail's sent record is a span of its own, after the sending, so that the time a
    // record waits for a claim to ride on is not read as the sending's.
    let mail_send = one(&trace, "mail.send");
    let record = one(&trace, "notification.record_sent");
    assert_eq!(
        trace.parent(record).map(|p| &p.span_id),
        Some(&send.span_id)
    );
    assert!(record.start_us >= mail_send.start_us + mail_send.duration_us);
    assert!(record.start_us + record.duration_us <= send.start_us + send.duration_us);

    // The database and the mail agree.
    use tracehop_contracts::schema::notifications;
    let mut db = test.db();
    let order_uuid: uuid::Uuid = order_id.parse().unwrap();
    let status: String = notifications::table
        .find(order_uuid)
        .select(notifications::status)
        .first(&mut db)
        .expect("notification row");
    assert_eq!(status, "sent");
    let mail = test.sent_mail();
    let ours: Vec<_> = mail
        .iter()
        .filter(|m| m["orderId"] == order_id.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "exactly one e-mail: {mail:?}");
    assert_eq!(ours[0]["traceId"], trace_id.as_str());
    assert!(
        ours[0]["body"]
            .as_str()
            .unwrap_or_default()
            .contains("49.99 usd")
    );

    // The order, as its owner sees it.
    let order = customer.order(&order_id).await.expect("order");
    assert_eq!(order.status, 200, "{}", order.body);
    assert_eq!(order.body["amount"], "49.99");
    assert_eq!(order.body["currency"], "usd");
    assert_eq!(order.body["chargeId"], charge_id.as_str());
    assert_eq!(order.body["notification"], "sent");
    assert_eq!(order.body["checkoutTraceId"], trace_id.as_str());

    // ...and nobody else does.
    let mut stranger = ApiClient::new(&test.stack.gateway_url());
    stranger
        .signup_and_login(&unique_email("eve"), "another password")
        .await
        .expect("stranger");
    let peek = stranger.order(&order_id).await.expect("order");
    assert_eq!(peek.status, 404);

    // The terminal waterfall draws every span.
    let drawn = trace.waterfall(false);
    assert_eq!(drawn.lines().count(), trace.spans.len() + 1, "{drawn}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_payment_provider_is_pending_with_the_order_and_key_and_an_error_span() {
    let test = TestStack::boot(&[
        ("BILLING_STRIPE_MAX_ATTEMPTS", "3"),
        ("BILLING_RECONCILE_AFTER_MS", "3000"),
        ("BILLING_RECONCILE_EVERY_MS", "500"),
    ])
    .await;
    let customer = test.customer().await;
    test.stripe_faults(serde_json::json!({"failNext": 3, "failStatus": 500}))
        .await;

    // After 5xx answers Stripe *might* have charged: the outcome is unknown, and the client learns that,
    // with the order and the key that make a retry safe (the gateway made the key up: none was sent).
    let checkout = customer
        .checkout("12.00", "eur", None)
        .await
        .expect("checkout");
    assert_eq!(checkout.status, 202, "{}", checkout.body);
    assert_eq!(checkout.body["status"], "pending", "{}", checkout.body);
    let order_id = checkout.body["orderId"]
        .as_str()
        .expect("orderId")
        .to_owned();
    let key = checkout.body["idempotencyKey"]
        .as_str()
        .expect("idempotencyKey")
        .to_owned();
    assert!(!key.is_empty());
    let trace_id = checkout.body["traceId"]
        .as_str()
        .expect("traceId")
        .to_owned();
    assert_eq!(checkout.trace_id.as_deref(), Some(trace_id.as_str()));
    // The order exists, pending, for its owner to look up.
    let order = customer.order(&order_id).await.unwrap();
    assert_eq!(order.status, 200, "{}", order.body);
    assert_eq!(order.body["status"], "pending", "{}", order.body);

    let trace = test
        .trace(&trace_id, |t| {
            t.named("POST /v1/charges").len() == 3 && !t.named("POST /checkout").is_empty()
        })
        .await;
    let stripe = one(&trace, "stripe.create_charge");
    assert!(
        stripe.is_error(),
        "stripe.create_charge is ERROR: {:?}",
        stripe.tags
    );
    assert!(
        stripe
            .events
            .iter()
            .any(
                |event| event.get("event").and_then(|e| e.as_str()) == Some("exception")
                    || event.contains_key("exception.message")
            ),
        "exception recorded on stripe.create_charge: {:?}",
        stripe.events
    );
    let attempts = trace.named("POST /v1/charges");
    let mut resends: Vec<String> = attempts
        .iter()
        .map(|a| {
            a.tag("http.request.resend_count")
                .unwrap_or_else(|| "0".into())
        })
        .collect();
    resends.sort();
    assert_eq!(resends, vec!["0", "1", "2"]);
    for attempt in attempts {
        assert!(attempt.is_error());
        assert_eq!(
            attempt.tag("http.response.status_code").as_deref(),
            Some("500")
        );
        assert_eq!(
            trace.parent(attempt).map(|p| &p.span_id),
            Some(&stripe.span_id)
        );
    }
    let root = one(&trace, "POST /checkout");
    assert_eq!(
        root.tag("http.response.status_code").as_deref(),
        Some("202")
    );
    // billing's failure is ours and an ERROR, where it happened.
    assert!(one(&trace, "billing.charge").is_error());
    assert!(test.stripe_charges().await.is_empty());

    // Retrying with the same key is safe: while the order is pending it says so (409), and once the
    // reconciler has settled it (no charge at Stripe: the key is released) the retry charges, once, the
    // same order.
    let retried = retry_until_settled(&customer, "12.00", "eur", &key).await;
    assert_eq!(
        retried.body["orderId"],
        order_id.as_str(),
        "{}",
        retried.body
    );
    assert_eq!(retried.body["status"], "completed");
    assert_eq!(test.stripe_charges().await.len(), 1);
    use tracehop_contracts::schema::transactions;
    let statuses: Vec<String> = transactions::table
        .select(transactions::status)
        .load(&mut test.db())
        .unwrap();
    assert_eq!(statuses, vec!["charged".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_error_with_the_trace_id() {
    let test = TestStack::boot(&[]).await;
    let gateway = test.stack.gateway_url();
    let mut customer = ApiClient::new(&gateway);
    customer
        .signup_and_login(&unique_email("dani"), "correct horse battery")
        .await
        .expect("signup and login");
    let raw = tracehop_telemetry::http::client::plain_client_builder()
        .build()
        .unwrap();

    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "malformed JSON",
            raw.post(format!("{gateway}/checkout"))
                .bearer_auth(customer.token.clone().unwrap())
                .header("content-type", "application/json")
                .body("{\"total\": "),
            400,
            "invalid_body",
        ),
        (
            "missing field",
            raw.post(format!("{gateway}/checkout"))
                .bearer_auth(customer.token.clone().unwrap())
                .json(&serde_json::json!({"total": "5.00"})),
            400,
            "invalid_body",
        ),
        (
            "unknown currency",
            raw.post(format!("{gateway}/checkout"))
                .bearer_auth(customer.token.clone().unwrap())
                .json(&serde_json::json!({"total": "5.00", "currency": "xyz"})),
            400,
            "invalid_currency",
        ),
        (
            "negative total",
            raw.post(format!("{gateway}/checkout"))
                .bearer_auth(customer.token.clone().unwrap())
                .json(&serde_json::json!({"total": -5, "currency": "usd"})),
            400,
            "invalid_total",
        ),
        (
            "absurd total",
            raw.post(format!("{gateway}/checkout"))
                .bearer_auth(customer.token.clone().unwrap())
                .json(&serde_json::json!({"total": "99999999999.99", "currency": "usd"})),
            400,
            "invalid_total",
        ),
        (
            "too many decimals",
            raw.post(format!("{gateway}/checkout"))
                .bearer_auth(customer.token.clone().unwrap())
                .json(&serde_json::json!({"total": 1.005, "currency": "usd"})),
            400,
            "invalid_total",
        ),
        (
            "oversized body",
            raw.post(format!("{gateway}/checkout"))
                .bearer_auth(customer.token.clone().unwrap())
                .json(&serde_json::json!({"total": "5.00", "currency": "x".repeat(100_000)})),
            400,
            "invalid_body",
        ),
        (
            "missing token",
            raw.post(format!("{gateway}/checkout"))
                .json(&serde_json::json!({"total": "5.00", "currency": "usd"})),
            401,
            "unauthorized",
        ),
        (
            "bad token",
            raw.post(format!("{gateway}/checkout"))
                .bearer_auth("f".repeat(64))
                .json(&serde_json::json!({"total": "5.00", "currency": "usd"})),
            401,
            "unauthorized",
        ),
        (
            "bad e-mail at signup",
            raw.post(format!("{gateway}/signup")).json(
                &serde_json::json!({"email": "not-an-email", "name": "x", "password": "12345678"}),
            ),
            400,
            "invalid_email",
        ),
        (
            "unknown route",
            raw.get(format!("{gateway}/nope")),
            404,
            "not_found",
        ),
        (
            "malformed order id",
            raw.get(format!("{gateway}/orders/not-a-uuid"))
                .bearer_auth(customer.token.clone().unwrap()),
            400,
            "invalid_path",
        ),
    ];
    let mut bad_token_trace = None;
    for (case, request, status, code) in cases {
        let response = request.send().await.expect(case);
        assert_eq!(response.status().as_u16(), status, "{case}");
        let header_trace = response
            .headers()
            .get("traceresponse")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split('-').nth(1))
            .map(str::to_owned);
        let body: serde_json::Value = response.json().await.expect(case);
        assert_eq!(body["error"], code, "{case}: {body}");
        assert!(
            !body["message"].as_str().unwrap_or_default().is_empty(),
            "{case}: {body}"
        );
        let trace_id = body["traceId"].as_str().unwrap_or_default();
        assert_eq!(trace_id.len(), 32, "{case}: {body}");
        assert_ne!(trace_id, "0".repeat(32), "{case}");
        assert_eq!(header_trace.as_deref(), Some(trace_id), "{case}");
        if case == "bad token" {
            bad_token_trace = Some(trace_id.to_owned());
        }
    }
    // Nothing was charged by any of it.
    assert!(test.stripe_charges().await.is_empty());

    // A 4xx is an answer, not a failure: no server or internal span of that checkout is an ERROR, in the
    // gateway or in users (only the gateway's client span, as the HTTP client conventions say).
    let trace_id = bad_token_trace.expect("bad token case");
    let trace = test
        .trace(&trace_id, |t| {
            !t.named("POST /checkout").is_empty()
                && !t.named("checkout.process").is_empty()
                && !t.named("session.validate").is_empty()
        })
        .await;
    for span in &trace.spans {
        if span.kind() == "client" && span.tag("http.request.method").is_some() {
            assert!(
                span.is_error(),
                "a 4xx makes a client span an error: {}",
                span.name
            );
        } else {
            assert!(
                !span.is_error(),
                "{} [{}] is ERROR on a 401: {:?}",
                span.name,
                span.service,
                span.tags
            );
        }
    }
    assert_eq!(
        one(&trace, "POST /checkout")
            .tag("http.response.status_code")
            .as_deref(),
        Some("401")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_charges_once_and_refuses_a_different_body() {
    let test = TestStack::boot(&[]).await;
    let customer = test.customer().await;
    let first = customer
        .checkout("20.00", "usd", Some("order-42"))
        .await
        .unwrap();
    let again = customer
        .checkout("20.00", "usd", Some("order-42"))
        .await
        .unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(first.body["orderId"], again.body["orderId"]);
    let other = customer
        .checkout("21.00", "usd", Some("order-42"))
        .await
        .unwrap();
    assert_eq!(other.status, 422, "{}", other.body);
    assert_eq!(other.body["error"], "idempotency_key_reused");
    assert_eq!(test.stripe_charges().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_also_arrive_over_otlp_grpc() {
    // OTEL_EXPORTER_OTLP_PROTOCOL=grpc (the other tests run the default, http/protobuf): the tonic exporter,
    // its connection on the service's runtime, into the collector's port 4317 equivalent.
    let test = TestStack::boot_with(&[], "grpc").await;
    assert!(
        test.stack.otlp_endpoint.ends_with(
            &test
                .stack
                .collector
                .as_ref()
                .unwrap()
                .addresses
                .otlp_grpc
                .port()
                .to_string()
        )
    );
    let customer = test.customer().await;
    let checkout = customer.checkout("1.00", "gbp", None).await.unwrap();
    assert_eq!(checkout.status, 200, "{}", checkout.body);
    let trace_id = checkout.body["traceId"].as_str().unwrap().to_owned();
    let trace = test.trace(&trace_id, has_everything).await;
    assert_eq!(trace.services().len(), 4, "{:?}", trace.services());
    assert_eq!(trace.roots().len(), 1);
}

/// The gateway's call to billing goes unanswered (it times out while billing waits on a slow Stripe): the
/// gateway cannot know whether the card was charged, so it answers 202 `pending` with the order that the key
/// names, computed on its side. billing finishes the charge meanwhile; the retry with the same key answers
/// that order, and Stripe charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_charge_is_pending_with_the_order_the_key_names() {
    let test = TestStack::boot(&[("GATEWAY_UPSTREAM_TIMEOUT_MS", "1500")]).await;
    let customer = test.customer().await;
    test.stripe_faults(serde_json::json!({"hangNext": 1, "hangMs": 3000}))
        .await;
    let key = format!("lost-{}", uuid::Uuid::new_v4());
    let checkout = customer
        .checkout("9.00", "usd", Some(&key))
        .await
        .expect("checkout");
    assert_eq!(checkout.status, 202, "{}", checkout.body);
    assert_eq!(checkout.body["status"], "pending");
    assert_eq!(checkout.body["idempotencyKey"], key.as_str());
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();

    let retried = retry_until_settled(&customer, "9.00", "usd", &key).await;
    assert_eq!(
        retried.body["orderId"],
        order_id.as_str(),
        "the key names the same order"
    );
    let charges = test.stripe_charges().await;
    let ours: Vec<_> = charges
        .iter()
        .filter(|c| c["metadata"]["order_id"] == order_id.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "charged once: {charges:?}");
}

/// Retries a checkout with the same key until it is settled (200), as a client told "pending" should: while
/// the order's outcome is unknown the answer is 202 or 409, never a second charge.
async fn retry_until_settled(
    customer: &tracehop::client::ApiClient,
    total: &str,
    currency: &str,
    key: &str,
) -> tracehop::client::ApiResponse {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let retry = customer
            .checkout(total, currency, Some(key))
            .await
            .expect("retry");
        if retry.status == 200 {
            return retry;
        }
        assert!(
            matches!(retry.status, 202 | 409),
            "{}: {}",
            retry.status,
            retry.body
        );
        assert!(std::time::Instant::now() < deadline, "never settled");
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Every trace sampled out (`parentbased_traceidratio` at 0): nothing reaches the collector, yet the trace id
/// and the decision travel on: users' and billing's log lines, the stored order and the e-mail all carry the
/// gateway's trace id, so no service started a trace of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampled_out_checkout_exports_nothing_and_keeps_one_trace_id_everywhere() {
    let test = TestStack::boot(&[
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0"),
    ])
    .await;
    let customer = test.customer().await;
    let checkout = customer.checkout("7.00", "usd", None).await.unwrap();
    assert_eq!(checkout.status, 200, "{}", checkout.body);
    let trace_id = checkout.body["traceId"].as_str().unwrap().to_owned();
    assert_eq!(trace_id.len(), 32);
    assert_ne!(trace_id, "0".repeat(32));
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();

    // The e-mail (written after the checkout answered) carries the checkout's trace id.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let email = loop {
        let sent = test.sent_mail();
        if let Some(email) = sent.into_iter().find(|e| e["orderId"] == order_id.as_str()) {
            break email;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no e-mail for {order_id}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(email["traceId"], trace_id.as_str());
    for service in ["users", "billing"] {
        let log = std::fs::read_to_string(
            test.stack
                .options
                .state_dir
                .join("logs")
                .join(format!("{service}.log")),
        )
        .unwrap();
        assert!(
            log.contains(&format!("\"trace_id\":\"{trace_id}\"")),
            "{service} logged no line of trace {trace_id}"
        );
    }
    let mut db = test.db();
    let stored: String = tracehop_contracts::schema::transactions::table
        .find(uuid::Uuid::parse_str(&order_id).unwrap())
        .select(tracehop_contracts::schema::transactions::trace_id)
        .first(&mut db)
        .unwrap();
    assert_eq!(stored, trace_id);

    // Nothing of it was exported.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let found = TraceView::fetch(&test.jaeger(), &trace_id).await;
    assert!(found.is_err() || found.is_ok_and(|t| t.spans.is_empty()));
}

/// Half the traces sampled out (`parentbased_traceidratio` at 0.5): the sampled-in checkouts are whole, and
/// no span of a sampled-out one reaches the collector as a trace of its own (the statements run on
/// another thread than their request: the decision must travel there too), nor does a batch's or a
/// timer's wait for a pooled connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_half_the_traces_sampled_out_no_statement_becomes_a_trace_of_its_own() {
    let test = TestStack::boot(&[
        ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
    ])
    .await;
    let customer = test.customer().await;
    let mut trace_ids = Vec::new();
    for _ in 0..16 {
        let checkout = customer.checkout("2.00", "usd", None).await.unwrap();
        assert_eq!(checkout.status, 200, "{}", checkout.body);
        trace_ids.push(checkout.body["traceId"].as_str().unwrap().to_owned());
    }
    // The notifications' spans come after the answer, and the batch processors export every 500 ms.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut sampled = 0;
    for trace_id in &trace_ids {
        if let Ok(trace) = TraceView::fetch(&test.jaeger(), trace_id).await
            && !trace.spans.is_empty()
        {
            sampled += 1;
            assert!(
                !trace.named("POST /checkout").is_empty()
                    && !trace.named("INSERT notifications").is_empty(),
                "a sampled checkout is whole"
            );
        }
    }
    assert!(
        sampled > 0 && sampled < trace_ids.len(),
        "{sampled} of {} sampled",
        trace_ids.len()
    );
    for service in ["users", "billing", "notifications"] {
        let traces = TraceView::search(
            &test.jaeger(),
            &[
                ("service", service.to_owned()),
                ("limit", "1000".to_owned()),
            ],
        )
        .await
        .unwrap();
        // Traces start at a request (a SERVER span) or at a timer's round: nothing else is a root.
        for trace in &traces {
            for root in trace
                .spans
                .iter()
                .filter(|span| trace.parent(span).is_none())
            {
                assert!(
                    root.kind() == "server" || root.name.starts_with("retention "),
                    "{} of {} exported as a trace of its own ({}: {:?}, parent {:?}, {} spans)",
                    root.name,
                    root.service,
                    trace.trace_id,
                    root.tags,
                    root.parent_id,
                    trace.spans.len()
                );
            }
        }
    }
}
