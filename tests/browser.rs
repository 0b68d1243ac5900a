//! The demo trace, seen in the real Jaeger UI in headless Chromium: the spans of all four services and the
//! actor hops are on the page. Ignored by `cargo test` (it needs Chromium, which `./dev test` does not
//! install); `./dev screenshot` installs Chromium, runs it, and writes the README's screenshot
//! (`TRACEHOP_SCREENSHOT=docs/jaeger-trace.png`).

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::TestStack;

fn chromium() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| tracehop::process::find_executable(name))
}

/// Flags that keep Chromium quiet on a machine without internet (see the machine notes).
fn headless(chromium: &PathBuf, profile: &std::path::Path) -> Command {
    let mut command = Command::new(chromium);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1600,1500",
            "--virtual-time-budget=20000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()));
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Chromium: `./dev screenshot` installs it and runs this test"]
async fn the_jaeger_ui_shows_every_service_and_actor_hop_of_the_demo_trace() {
    let chromium =
        chromium().expect("Chromium is not installed (Debian: apt-get install chromium)");
    let test = TestStack::boot(&[]).await;
    let customer = test.customer().await;
    let checkout = customer.checkout("49.99", "usd", None).await.unwrap();
    assert_eq!(checkout.status, 200);
    let trace_id = checkout.body["traceId"].as_str().unwrap().to_owned();
    test.trace(&trace_id, |t| {
        t.spans
            .iter()
            .any(|s| s.name == "INSERT notifications" && s.service == "notifications")
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let page = format!("{}/trace/{trace_id}", test.jaeger());
    let profile = test.state_dir.join("chromium-profile");
    let output = headless(&chromium, &profile)
        .arg("--dump-dom")
        .arg(&page)
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for expected in [
        "gateway",
        "users",
        "billing",
        "notifications",
        "BillingActor handle Charge",
        "StripeClientActor handle CreateCharge",
        "NotifierActor handle SendConfirmation",
        "publish order.completed",
        "process order.completed",
    ] {
        assert!(
            dom.contains(expected),
            "{expected:?} is not on the Jaeger page {page}"
        );
    }

    if let Ok(target) = std::env::var("TRACEHOP_SCREENSHOT") {
        let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(target);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let status = headless(&chromium, &profile)
            .arg(format!("--screenshot={}", target.display()))
            .arg(&page)
            .status()
            .expect("run chromium");
        assert!(status.success());
        println!("screenshot written to {}", target.display());
    }
}
