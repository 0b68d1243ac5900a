//! The JSON lines a service writes, read from its standard output as an operator reads them: the subscriber
//! the services install, made the global one as a service makes it, in a child process started with the
//! `RUST_LOG` under test (this test binary, running [`child_writes_lines`]).
//!
//! What is checked: whatever `RUST_LOG` lets through, a line written inside a traced span names that span
//! and carries its trace id and span id (`RUST_LOG=warn` once left every warning without them, its spans
//! being below the logs' level).

#![allow(clippy::expect_used)]

use std::process::Command;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use serde_json::Value;

/// Set in the child's environment: only then does [`child_writes_lines`] write anything.
const CHILD: &str = "TRACEHOP_TEST_LOG_LINES_CHILD";

/// The child: the services' subscriber, globally (spans sampled, exported nowhere); a warning and an
/// information line inside a traced span, and a warning inside a debug span beneath it. The traced span's
/// ids go to standard error.
#[test]
fn child_writes_lines() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let dispatch = tracehop_telemetry::setup::dispatch_with_tracer(provider.tracer("test"));
    tracing::dispatcher::set_global_default(dispatch).expect("the only global subscriber");
    let span = tracing::info_span!("checkout.process");
    let context = tracehop_telemetry::propagation::context_of(&span);
    let context = context.span();
    let ids = context.span_context();
    eprintln!("ids {} {}", ids.trace_id(), ids.span_id());
    span.in_scope(|| {
        tracing::warn!("payment declined");
        tracing::info!("order recorded");
        tracing::debug_span!("checkout.detail").in_scope(|| tracing::warn!("inside a debug span"));
    });
}

/// Runs the child under `rust_log`: its JSON lines, and the traced span's trace id and span id.
fn lines_under(rust_log: &str) -> (Vec<Value>, String, String) {
    let output = Command::new(std::env::current_exe().expect("this test binary"))
        .args(["child_writes_lines", "--exact", "--nocapture"])
        .env(CHILD, "1")
        .env("RUST_LOG", rust_log)
        .env_remove("LOG_FORMAT")
        .output()
        .expect("the child runs");
    assert!(output.status.success(), "the child failed: {output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines = stdout
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let ids = stderr
        .lines()
        .find_map(|line| line.strip_prefix("ids "))
        .expect("the child printed its span's ids");
    let (trace_id, span_id) = ids.split_once(' ').expect("two ids");
    (lines, trace_id.to_owned(), span_id.to_owned())
}

#[test]
fn every_line_in_a_traced_span_names_it_and_carries_its_ids_whatever_the_log_level() {
    for (rust_log, messages) in [
        ("warn", &["payment declined", "inside a debug span"][..]),
        // A span directive: read by `EnvFilter`, not `Targets`.
        (
            "warn,[checkout.unknown]=trace",
            &["payment declined", "inside a debug span"][..],
        ),
        (
            "info",
            &["payment declined", "order recorded", "inside a debug span"][..],
        ),
        (
            "debug",
            &["payment declined", "order recorded", "inside a debug span"][..],
        ),
    ] {
        let (lines, trace_id, span_id) = lines_under(rust_log);
        let ours: Vec<&Value> = lines
            .iter()
            .filter(|line| line["target"] == "log_lines")
            .collect();
        let written: Vec<&str> = ours
            .iter()
            .map(|line| line["message"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(written, messages, "RUST_LOG={rust_log}");
        for line in ours {
            assert_eq!(
                line["trace_id"],
                trace_id.as_str(),
                "RUST_LOG={rust_log}: {line}"
            );
            if line["message"] == "inside a debug span" && rust_log == "debug" {
                // The debug span exists for the logs only: its name, and the ids of its nearest traced
                // ancestor.
                assert_eq!(line["span"], "checkout.detail", "{line}");
            } else {
                assert_eq!(
                    line["span"], "checkout.process",
                    "RUST_LOG={rust_log}: {line}"
                );
            }
            assert_eq!(
                line["span_id"],
                span_id.as_str(),
                "RUST_LOG={rust_log}: {line}"
            );
        }
    }
}
