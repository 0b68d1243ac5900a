//! The edge policy, against the running stack: a public caller's `traceparent` becomes a span link of a
//! trace the gateway starts, its `tracestate` and `baggage` leave no trace in exported spans or in the
//! request to the payment provider, `X-Forwarded-For` is not believed; the trust settings restore
//! continuation and the forwarded address.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TestStack, one};
use serde_json::json;
use tracehop::client::ApiResponse;
use tracehop::trace_view::TraceView;

const CALLER_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";
const CALLER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

async fn checkout(test: &TestStack, headers: &[(&str, &str)]) -> ApiResponse {
    let customer = test.customer().await;
    let response = customer
        .call(
            reqwest::Method::POST,
            "/checkout",
            Some(json!({"total": "12.00", "currency": "usd"})),
            headers,
        )
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    response
}

/// Waits for the whole checkout trace, e-mail included, and returns it with its raw Jaeger JSON.
async fn whole_trace(test: &TestStack, trace_id: &str) -> (TraceView, String) {
    let trace = test
        .trace(trace_id, |t| {
            !t.named("POST /checkout").is_empty()
                && !t.named("process order.completed").is_empty()
                && !t.named("notification.send_confirmation").is_empty()
        })
        .await;
    let raw = reqwest::get(format!("{}/api/traces/{trace_id}", test.jaeger()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    (trace, raw)
}

async fn stripe_trace_headers(test: &TestStack) -> Vec<serde_json::Value> {
    let body: serde_json::Value = reqwest::get(format!(
        "{}/_admin/trace-headers",
        test.stack.stripe_sim_url()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    body["data"].as_array().cloned().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_caller_does_not_choose_the_trace_and_its_state_goes_nowhere() {
    let test = TestStack::boot(&[]).await;

    // 1. traceparent + a 2 000-member tracestate + a forged client address.
    let tracestate = (0..2000)
        .map(|i| format!("evil{i}=amplified"))
        .collect::<Vec<_>>()
        .join(",");
    let response = checkout(
        &test,
        &[
            ("traceparent", CALLER),
            ("tracestate", &tracestate),
            ("x-forwarded-for", "203.0.113.9"),
        ],
    )
    .await;
    let trace_id = response.body["traceId"].as_str().unwrap().to_owned();
    assert_ne!(trace_id, CALLER_TRACE, "the caller chose the trace id");
    assert_eq!(
        response.trace_id.as_deref(),
        Some(trace_id.as_str()),
        "traceresponse names the trace actually recorded"
    );
    let (trace, raw) = whole_trace(&test, &trace_id).await;
    let root = one(&trace, "POST /checkout");
    assert!(root.parent_id.is_none(), "the server span is a root");
    assert_eq!(
        root.links,
        [(CALLER_TRACE.to_owned(), CALLER_SPAN.to_owned())],
        "the caller's context is a span link"
    );
    assert_eq!(root.tag("client.address").as_deref(), Some("127.0.0.1"));
    assert!(
        !raw.contains("evil"),
        "the caller's tracestate was exported"
    );
    assert!(!raw.contains("203.0.113.9"));
    let order_trace: String = {
        use diesel::{ExpressionMethods, QueryDsl, RunQueryDsl};
        use tracehop_contracts::schema::transactions;
        let order_id: uuid::Uuid = response.body["orderId"].as_str().unwrap().parse().unwrap();
        transactions::table
            .filter(transactions::id.eq(order_id))
            .select(transactions::trace_id)
            .first(&mut test.db())
            .unwrap()
    };
    assert_eq!(
        order_trace, trace_id,
        "the order keeps the trace actually recorded"
    );
    // Nothing was recorded under the caller's trace id.
    let callers = reqwest::get(format!("{}/api/traces/{CALLER_TRACE}", test.jaeger()))
        .await
        .unwrap();
    let callers = TraceView::from_jaeger_json(&callers.json().await.unwrap_or_default());
    assert!(callers.map(|t| t.spans.is_empty()).unwrap_or(true));

    // 2. traceparent + 100 KB of baggage.
    let baggage = (0..1000)
        .map(|i| format!("junk{i:04}={}", "b".repeat(92)))
        .collect::<Vec<_>>()
        .join(",");
    assert!(baggage.len() >= 100_000);
    let response = checkout(&test, &[("traceparent", CALLER), ("baggage", &baggage)]).await;
    let trace_id = response.body["traceId"].as_str().unwrap().to_owned();
    assert_ne!(trace_id, CALLER_TRACE);
    let (_, raw) = whole_trace(&test, &trace_id).await;
    assert!(!raw.contains("junk0"), "the caller's baggage was exported");

    // The payment provider saw our traceparent, and never a tracestate or baggage.
    let seen = stripe_trace_headers(&test).await;
    assert!(seen.len() >= 2, "{seen:?}");
    for headers in &seen {
        let traceparent = headers["traceparent"].as_str().expect("traceparent sent");
        assert!(!traceparent.contains(CALLER_TRACE), "{traceparent}");
        assert!(headers["tracestate"].is_null(), "{headers}");
        assert!(headers["baggage"].is_null(), "{headers}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_callers_trace_continues() {
    let test = TestStack::boot(&[
        ("GATEWAY_CONTINUE_CALLER_TRACE", "true"),
        ("GATEWAY_TRUST_FORWARDED_HEADERS", "true"),
    ])
    .await;
    let response = checkout(
        &test,
        &[
            ("traceparent", CALLER),
            ("tracestate", "proxy=1"),
            ("x-forwarded-for", "203.0.113.9"),
        ],
    )
    .await;
    assert_eq!(response.body["traceId"], CALLER_TRACE);
    assert_eq!(response.trace_id.as_deref(), Some(CALLER_TRACE));
    let (trace, _) = whole_trace(&test, CALLER_TRACE).await;
    let root = one(&trace, "POST /checkout");
    assert_eq!(root.parent_id.as_deref(), Some(CALLER_SPAN));
    assert!(root.links.is_empty());
    assert_eq!(root.tag("client.address").as_deref(), Some("203.0.113.9"));
    assert_eq!(root.tag("w3c.tracestate").as_deref(), Some("proxy=1"));
    // Still nothing but the traceparent for the payment provider.
    for headers in stripe_trace_headers(&test).await {
        assert!(headers["tracestate"].is_null(), "{headers}");
        assert!(
            headers["traceparent"]
                .as_str()
                .unwrap()
                .contains(CALLER_TRACE)
        );
    }
}
