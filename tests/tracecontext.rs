//! The W3C Trace Context endpoint (`shared/telemetry/examples/tracecontext.rs`) propagates like the spec says: same
//! trace id, a new parent id (its own client span), flags and `tracestate` kept; an invalid `traceparent`
//! starts a new trace.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracehop::process::{ChildProcess, bin_dir, free_port, wait_healthy};

type Seen = Arc<Mutex<Vec<(Option<String>, Option<String>, serde_json::Value)>>>;

/// A peer that records the headers and body of every POST it receives.
async fn recording_peer() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let recorder = seen.clone();
    let app = axum::Router::new().route(
        "/echo",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::Json<serde_json::Value>| {
                let recorder = recorder.clone();
                async move {
                    let get = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                    };
                    recorder
                        .lock()
                        .unwrap()
                        .push((get("traceparent"), get("tracestate"), body.0));
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/echo", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_endpoint_propagates_trace_context() {
    let binary = bin_dir().unwrap().join("examples/tracecontext");
    assert!(
        binary.exists(),
        "{} missing: cargo test builds examples",
        binary.display()
    );
    let port = free_port().unwrap();
    let mut command = std::process::Command::new(binary);
    command
        .arg(port.to_string())
        // No collector in this test: spans are made (they carry the context) and dropped on export.
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
        .env("OTEL_BSP_EXPORT_TIMEOUT", "100");
    let log = std::env::temp_dir().join(format!("tracecontext-{port}.log"));
    let mut endpoint = ChildProcess::spawn("tracecontext", command, &log).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(
        &format!("{base}/healthz"),
        Duration::from_secs(20),
        Some(&mut endpoint),
    )
    .await
    .unwrap();
    let (peer, seen) = recording_peer().await;
    let client = tracehop_telemetry::http::client::plain_client_builder()
        .build()
        .unwrap();

    // A valid parent: same trace id, new parent id, sampled flag and tracestate kept.
    let response = client
        .post(format!("{base}/test"))
        .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .header("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        .json(&serde_json::json!([{"url": peer, "arguments": [1, 2]}, {"url": peer, "arguments": []}]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "both cases forwarded, in order");
        assert_eq!(seen[0].2, serde_json::json!([1, 2]));
        for (traceparent, tracestate, _) in seen.iter() {
            let traceparent = traceparent.as_deref().expect("traceparent forwarded");
            let parts: Vec<&str> = traceparent.split('-').collect();
            assert_eq!(parts.len(), 4, "{traceparent}");
            assert_eq!(parts[0], "00");
            assert_eq!(parts[1], "0af7651916cd43dd8448eb211c80319c");
            assert_ne!(parts[2], "b7ad6b7169203331", "a new parent id");
            assert_eq!(parts[3], "01");
            assert_eq!(
                tracestate.as_deref(),
                Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
            );
        }
    }

    // An invalid traceparent (version ff) is ignored: a new trace starts.
    seen.lock().unwrap().clear();
    let response = client
        .post(format!("{base}/test"))
        .header(
            "traceparent",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .json(&serde_json::json!([{"url": peer, "arguments": []}]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = seen.lock().unwrap();
    let traceparent = seen[0].0.as_deref().expect("traceparent");
    assert!(
        !traceparent.contains("0af7651916cd43dd8448eb211c80319c"),
        "{traceparent}"
    );
    assert_eq!(traceparent.len(), 55);
}
