//! `stack slow` and `stack errors`: what is slow or failing right now, read from a Jaeger query API.
//!
//! Both search the collector for the checkouts of a time window (Jaeger's search, which the embedded
//! collector serves with the same parameters), explain each with [`Why`], and group them by the hop to
//! blame, so twenty slow checkouts caused by one slow Stripe read as one line with a count.
//!
//! - **slow**: the checkouts (`gateway`'s `POST /checkout`) of the window, slowest end to end first (late
//!   NATS consumers included); the hop to blame is the span the trace waited on longest by itself.
//! - **errors**: every trace of the window with a failed span, in any service (each service is searched
//!   for `error=true`, as Jaeger matches tags per span); the hop to blame is the *first cause*: the
//!   earliest failed span none of whose descendants failed (a 503 at the gateway is blamed on the Stripe
//!   500 under it, not on itself).

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use crate::trace_view::{SpanView, TraceView};
use crate::why::Why;

/// The service and span of a checkout's entry point.
pub const CHECKOUT_SERVICE: &str = "gateway";
pub const CHECKOUT_OPERATION: &str = "POST /checkout";

/// What to look at.
#[derive(Debug, Clone)]
pub struct Window {
    /// How far back from now.
    pub since: Duration,
    /// How many traces to list.
    pub top: usize,
    /// How many traces to read from the collector at most.
    pub scan: usize,
}

/// One trace with its explanation.
#[derive(Debug, Clone)]
pub struct Explained {
    pub trace: TraceView,
    pub why: Why,
    /// `service › span` of the hop to blame.
    pub hop: String,
    /// For errors: what failed first (`billing › POST /v1/charges failed (500)`).
    pub cause: Option<String>,
}

/// The report: the traces listed and the groups by hop (count, hop), largest first.
#[derive(Debug, Clone)]
pub struct Report {
    pub title: String,
    pub found: usize,
    pub listed: Vec<Explained>,
    pub by_hop: Vec<(usize, String)>,
}

fn window_query(window: &Window) -> Vec<(&'static str, String)> {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64;
    let start = now_us.saturating_sub(window.since.as_micros() as u64);
    vec![
        ("start", start.to_string()),
        ("end", now_us.to_string()),
        ("limit", window.scan.to_string()),
    ]
}

/// The slowest checkouts of the window.
pub async fn slow(jaeger: &str, window: &Window) -> anyhow::Result<Report> {
    let mut query = window_query(window);
    query.push(("service", CHECKOUT_SERVICE.to_owned()));
    query.push(("operation", CHECKOUT_OPERATION.to_owned()));
    let traces = TraceView::search(jaeger, &query).await?;
    let found = traces.len();
    let mut ranked: Vec<(u64, TraceView)> = traces
        .into_iter()
        .map(|trace| (Why::of(&trace).end_to_end_us, trace))
        .collect();
    ranked.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    let mut listed = Vec::new();
    for (_, trace) in ranked.into_iter().take(window.top) {
        // Consumers in traces of their own: join them so the e-mail's time counts.
        let trace = TraceView::fetch_joined(jaeger, &trace.trace_id)
            .await
            .unwrap_or(trace);
        let why = Why::of(&trace);
        let hop = why
            .culprit()
            .map(|step| format!("{} › {}", step.service, step.name))
            .unwrap_or_else(|| "(no spans)".to_owned());
        listed.push(Explained {
            trace,
            why,
            hop,
            cause: None,
        });
    }
    let by_hop = group(listed.iter().map(|e| e.hop.clone()));
    Ok(Report {
        title: format!(
            "the {} slowest checkouts of the last {}",
            listed.len(),
            human(window.since)
        ),
        found,
        listed,
        by_hop,
    })
}

/// The failed traces of the window, newest first.
pub async fn errors(jaeger: &str, window: &Window) -> anyhow::Result<Report> {
    let services = TraceView::known_services(jaeger).await?;
    let mut seen = HashSet::new();
    let mut failed = Vec::new();
    for service in services {
        let mut query = window_query(window);
        query.push(("service", service));
        query.push(("tags", r#"{"error":"true"}"#.to_owned()));
        for trace in TraceView::search(jaeger, &query).await? {
            if seen.insert(trace.trace_id.clone()) {
                failed.push(trace);
            }
        }
    }
    let found = failed.len();
    failed.sort_by_key(|trace| {
        std::cmp::Reverse(trace.spans.iter().map(|s| s.start_us).min().unwrap_or(0))
    });
    let mut listed = Vec::new();
    for trace in failed.into_iter().take(window.top) {
        let trace = TraceView::fetch_joined(jaeger, &trace.trace_id)
            .await
            .unwrap_or(trace);
        let why = Why::of(&trace);
        let (hop, cause) = match first_cause(&trace) {
            Some(span) => (
                format!("{} › {}", span.service, span.name),
                Some(describe_failure(span)),
            ),
            None => ("(error flag only)".to_owned(), None),
        };
        listed.push(Explained {
            trace,
            why,
            hop,
            cause,
        });
    }
    let by_hop = group(listed.iter().map(|e| e.hop.clone()));
    Ok(Report {
        title: format!(
            "the {} latest failed traces of the last {}",
            listed.len(),
            human(window.since)
        ),
        found,
        listed,
        by_hop,
    })
}

/// The earliest failed span none of whose descendants failed.
pub fn first_cause(trace: &TraceView) -> Option<&SpanView> {
    let failed: Vec<&SpanView> = trace.spans.iter().filter(|span| span.is_error()).collect();
    failed
        .iter()
        .copied()
        .filter(|span| {
            !failed
                .iter()
                .any(|other| other.span_id != span.span_id && trace.is_ancestor(span, other))
        })
        .min_by_key(|span| span.start_us)
}

/// `billing › POST /v1/charges failed (500)`.
fn describe_failure(span: &SpanView) -> String {
    let kind = span
        .tag("error.type")
        .or_else(|| span.tag("http.response.status_code"))
        .or_else(|| span.tag("otel.status_description"))
        .unwrap_or_else(|| "error".to_owned());
    format!("{} › {} failed ({kind})", span.service, span.name)
}

fn group(hops: impl Iterator<Item = String>) -> Vec<(usize, String)> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for hop in hops {
        *counts.entry(hop).or_default() += 1;
    }
    let mut groups: Vec<(usize, String)> = counts.into_iter().map(|(h, c)| (c, h)).collect();
    groups.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    groups
}

fn human(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs.is_multiple_of(3600) && secs >= 3600 {
        format!("{} h", secs / 3600)
    } else if secs.is_multiple_of(60) && secs >= 60 {
        format!("{} min", secs / 60)
    } else {
        format!("{secs} s")
    }
}

impl Report {
    /// What `stack slow` and `stack errors` print.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.listed.is_empty() {
            let _ = writeln!(out, "none: {} found", self.found);
            return out;
        }
        let _ = writeln!(out, "{} ({} found):", self.title, self.found);
        for item in &self.listed {
            let _ = writeln!(out, "  trace {}", item.trace.trace_id);
            if let Some(cause) = &item.cause {
                let _ = writeln!(out, "    failed first: {cause}");
            }
            let _ = writeln!(out, "    why: {}", item.why.blame);
        }
        let _ = writeln!(out, "by the hop to blame:");
        for (count, hop) in &self.by_hop {
            let _ = writeln!(out, "  {count:>5}  {hop}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_first_cause_is_the_deepest_earliest_failure() {
        let span =
            |id: &str, parent: Option<&str>, service: &str, name: &str, error: bool, start: u64| {
                let mut tags = vec![json!({"key": "span.kind", "value": "client"})];
                if error {
                    tags.push(json!({"key": "otel.status_code", "value": "ERROR"}));
                    tags.push(json!({"key": "http.response.status_code", "value": 500}));
                }
                let references = parent
                    .map(|p| vec![json!({"refType": "CHILD_OF", "traceID": "t", "spanID": p})])
                    .unwrap_or_default();
                json!({"spanID": id, "operationName": name, "references": references,
                   "startTime": start, "duration": 10, "tags": tags, "processID": service})
            };
        let trace = TraceView::from_jaeger_trace(&json!({
            "traceID": "t",
            "processes": {"gateway": {"serviceName": "gateway"}, "billing": {"serviceName": "billing"}},
            "spans": [
                span("a", None, "gateway", "POST /checkout", true, 1),
                span("b", Some("a"), "billing", "POST /charges", true, 2),
                span("c", Some("b"), "billing", "POST /v1/charges", true, 3),
                span("d", Some("b"), "billing", "POST /v1/charges", true, 5),
            ],
        }));
        let cause = first_cause(&trace).unwrap();
        assert_eq!(cause.span_id, "c");
        assert_eq!(
            describe_failure(cause),
            "billing › POST /v1/charges failed (500)"
        );
        assert_eq!(
            group(["x".to_owned(), "y".to_owned(), "x".to_owned()].into_iter()),
            vec![(2, "x".to_owned()), (1, "y".to_owned())]
        );
    }
}
