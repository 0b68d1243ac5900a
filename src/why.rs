//! `stack why <trace-id>`: what a trace's end-to-end time waited on.
//!
//! The **critical path** is the chain of spans the end-to-end time waited on: walking back from the end of
//! the trace, at each span the child that finished last before the walk's cursor is what the span was waiting
//! for, and the time in between that no child covers is the span's own (its *self time on the path*). The
//! walk takes a span's whole subtree into account, so it goes through actor hops and across the NATS hop
//! (a `process order.completed` that ends after the checkout answered is still what the trace waited on).
//!
//! The blame line names the span with the most self time on the path, the chain above it, and what its
//! attributes say about it (an HTTP attempt that timed out and was retried, an error, or, for a PRODUCER
//! span, that its time is the message waiting in JetStream for its deliveries, or that it is a wait by design:
//! an e-mail's sent record waiting for a claim to ride on).

use std::collections::HashMap;
use std::fmt::Write as _;

use crate::trace_view::{SpanView, TraceView};

/// One span on the critical path with the time the trace waited on it alone.
#[derive(Debug, Clone, PartialEq)]
pub struct OnPath {
    pub span_id: String,
    pub service: String,
    pub name: String,
    /// Microseconds of the end-to-end time spent in this span and none of its children.
    pub self_us: u64,
}

/// The critical path of a trace, the blame line, and the shares of each service.
#[derive(Debug, Clone)]
pub struct Why {
    pub trace_id: String,
    /// From the first span's start to the last span's end.
    pub end_to_end_us: u64,
    /// In the order the trace waited on them.
    pub path: Vec<OnPath>,
    /// Self time on the path per service, largest first.
    pub by_service: Vec<(String, u64)>,
    /// One line that blames.
    pub blame: String,
    /// Spans whose parent is missing besides the root (0 for a whole trace): their subtrees are not on the
    /// path.
    pub incomplete: usize,
}

impl Why {
    /// Analyses `trace` (a trace with no spans has an empty path and says so).
    pub fn of(trace: &TraceView) -> Why {
        let start = trace.spans.iter().map(|s| s.start_us).min().unwrap_or(0);
        let end = trace.spans.iter().map(end_us).max().unwrap_or(0);
        let mut children: HashMap<&str, Vec<&SpanView>> = HashMap::new();
        for span in &trace.spans {
            if let Some(parent) = trace.parent(span) {
                children
                    .entry(parent.span_id.as_str())
                    .or_default()
                    .push(span);
            }
        }
        let mut subtree_end: HashMap<&str, u64> = HashMap::new();
        for root in trace.roots() {
            fill_subtree_end(root, &children, &mut subtree_end, trace.spans.len());
        }
        let mut path = Vec::new();
        // Several roots mean spans whose parent has not arrived (yet): the walk starts from the earliest,
        // the request's entry point, and the report says the trace is incomplete.
        let mut roots = trace.roots();
        roots.sort_by_key(|root| root.start_us);
        let incomplete = roots.len().saturating_sub(1);
        if let Some(root) = roots.first() {
            let cursor = subtree_end
                .get(root.span_id.as_str())
                .copied()
                .unwrap_or(end);
            walk(
                root,
                cursor,
                &children,
                &subtree_end,
                &mut path,
                trace.spans.len(),
            );
        }
        let mut shares: HashMap<String, u64> = HashMap::new();
        for step in &path {
            *shares.entry(step.service.clone()).or_default() += step.self_us;
        }
        let mut by_service: Vec<(String, u64)> = shares.into_iter().collect();
        by_service.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let end_to_end_us = end.saturating_sub(start);
        let blame = blame_line(trace, &path, end_to_end_us);
        Why {
            trace_id: trace.trace_id.clone(),
            end_to_end_us,
            path,
            by_service,
            blame,
            incomplete,
        }
    }

    /// The step the trace waited on longest by itself: the hop the blame line names.
    pub fn culprit(&self) -> Option<&OnPath> {
        self.path.iter().max_by_key(|step| step.self_us)
    }

    /// The report `stack why` prints.
    pub fn report(&self) -> String {
        let mut out = String::new();
        let total = self.end_to_end_us.max(1);
        let _ = writeln!(
            out,
            "trace {}: {} end to end",
            self.trace_id,
            seconds(self.end_to_end_us)
        );
        if self.incomplete > 0 {
            let _ = writeln!(
                out,
                "(incomplete: {} span(s) without their parent; spans may still be arriving)",
                self.incomplete
            );
        }
        let _ = writeln!(
            out,
            "critical path (time the trace waited on each span alone):"
        );
        for step in self.path.iter().filter(|step| step.self_us > 0) {
            let _ = writeln!(
                out,
                "  {:>9}  {:>5.1}%  {:<14} {}",
                seconds(step.self_us),
                100.0 * step.self_us as f64 / total as f64,
                step.service,
                step.name
            );
        }
        let shares: Vec<String> = self
            .by_service
            .iter()
            .map(|(service, us)| {
                format!(
                    "{service} {} ({:.0}%)",
                    seconds(*us),
                    100.0 * *us as f64 / total as f64
                )
            })
            .collect();
        let _ = writeln!(out, "by service: {}", shares.join(", "));
        let _ = writeln!(out, "why: {}", self.blame);
        out
    }
}

fn end_us(span: &SpanView) -> u64 {
    span.start_us + span.duration_us
}

/// The latest end in each span's subtree (an async child may end after its parent).
fn fill_subtree_end<'a>(
    span: &'a SpanView,
    children: &HashMap<&str, Vec<&'a SpanView>>,
    subtree_end: &mut HashMap<&'a str, u64>,
    budget: usize,
) -> u64 {
    let mut latest = end_us(span);
    if budget > 0 {
        for child in children.get(span.span_id.as_str()).into_iter().flatten() {
            latest = latest.max(fill_subtree_end(child, children, subtree_end, budget - 1));
        }
    }
    subtree_end.insert(span.span_id.as_str(), latest);
    latest
}

/// Walks `span`'s subtree back from `cursor` and pushes the path: the span, then what it waited on, earliest
/// first.
fn walk(
    span: &SpanView,
    mut cursor: u64,
    children: &HashMap<&str, Vec<&SpanView>>,
    subtree_end: &HashMap<&str, u64>,
    path: &mut Vec<OnPath>,
    budget: usize,
) {
    let mut own = 0;
    let mut kids: Vec<&SpanView> = children
        .get(span.span_id.as_str())
        .cloned()
        .unwrap_or_default();
    kids.sort_by_key(|kid| std::cmp::Reverse(subtree_end.get(kid.span_id.as_str()).copied()));
    let mut waited_on = Vec::new();
    for kid in kids {
        if cursor <= span.start_us || budget == 0 {
            break;
        }
        let kid_end = subtree_end
            .get(kid.span_id.as_str())
            .copied()
            .unwrap_or(end_us(kid))
            .min(cursor);
        if kid_end <= kid.start_us || kid.start_us >= cursor {
            continue;
        }
        own += cursor - kid_end;
        waited_on.push((kid, kid_end));
        cursor = kid.start_us.max(span.start_us);
    }
    own += cursor.saturating_sub(span.start_us);
    path.push(OnPath {
        span_id: span.span_id.clone(),
        service: span.service.clone(),
        name: span.name.clone(),
        self_us: own,
    });
    for (kid, kid_end) in waited_on.into_iter().rev() {
        walk(kid, kid_end, children, subtree_end, path, budget - 1);
    }
}

/// `10.0 s of 11.4 s: billing › stripe.create_charge › POST /v1/charges attempt 1 timed out, retried`
/// Spans whose time is a deliberate wait, and what they wait for: the blame line says so, so that a wait by
/// design is not read as slow code.
const WAITS: [(&str, &str); 1] = [(
    "notification.record_sent",
    "waiting for the sent record's commit (it rides on the next delivery's claim, or is written alone once \
     its linger runs out)",
)];

fn blame_line(trace: &TraceView, path: &[OnPath], end_to_end_us: u64) -> String {
    let Some(worst) = path.iter().max_by_key(|step| step.self_us) else {
        return "the trace has no spans".to_owned();
    };
    let Some(span) = trace.span(&worst.span_id) else {
        return format!(
            "{} of {}: {}",
            seconds(worst.self_us),
            seconds(end_to_end_us),
            worst.name
        );
    };
    // The chain above it within its service (at most two steps: enough to say where).
    let mut chain = Vec::new();
    let mut current = trace.parent(span);
    while let Some(parent) = current {
        if parent.service != span.service || chain.len() == 2 {
            break;
        }
        chain.push(parent.name.clone());
        current = trace.parent(parent);
    }
    chain.reverse();
    let mut what = span.name.clone();
    if span.tag("http.request.method").is_some() && span.kind() == "client" {
        let attempt = span
            .tag("http.request.resend_count")
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
            + 1;
        let _ = write!(what, " attempt {attempt}");
        match span.tag("error.type").as_deref() {
            Some("timeout") => {
                let _ = write!(what, " timed out after {}", seconds(span.duration_us));
            }
            Some(kind) => {
                let _ = write!(what, " failed ({kind})");
            }
            None => {}
        }
        let retried = trace
            .named(&span.name)
            .iter()
            .any(|other| other.parent_id == span.parent_id && other.start_us > span.start_us);
        if retried {
            what.push_str(", retried");
        }
    } else if span.kind() == "producer" {
        // A producer's own time on the path is the message waiting in the broker: before its first
        // delivery, and between redeliveries (each consumer span is a child).
        let deliveries: Vec<&SpanView> = trace
            .children(span)
            .into_iter()
            .filter(|child| child.kind() == "consumer")
            .collect();
        let failed = deliveries.iter().filter(|d| d.is_error()).count();
        let count = deliveries.len();
        let _ = write!(
            what,
            ": waiting in JetStream for delivery ({count} {}, {failed} failed)",
            if count == 1 { "delivery" } else { "deliveries" }
        );
    } else if span.is_error() {
        let kind = span.tag("error.type").unwrap_or_else(|| "error".to_owned());
        let _ = write!(what, " failed ({kind})");
    } else if let Some((_, wait)) = WAITS.iter().find(|(name, _)| *name == span.name) {
        let _ = write!(what, ": {wait}");
    }
    let mut line = format!(
        "{} of {}: {}",
        seconds(worst.self_us),
        seconds(end_to_end_us),
        span.service
    );
    for name in chain {
        let _ = write!(line, " › {name}");
    }
    let _ = write!(line, " › {what}");
    line
}

fn seconds(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.1} s", us as f64 / 1e6)
    } else {
        format!("{:.1} ms", us as f64 / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn span(
        id: &str,
        parent: Option<&str>,
        service: &str,
        name: &str,
        start: u64,
        duration: u64,
        tags: Value,
    ) -> Value {
        let references = parent
            .map(|p| json!([{"refType": "CHILD_OF", "spanID": p, "traceID": "t"}]))
            .unwrap_or(json!([]));
        json!({"spanID": id, "operationName": name, "startTime": start, "duration": duration,
               "processID": service, "references": references, "tags": tags, "logs": []})
    }

    fn trace(spans: Vec<Value>) -> TraceView {
        TraceView::from_jaeger_json(&json!({"data": [{
            "traceID": "t",
            "processes": {"gateway": {"serviceName": "gateway"}, "billing": {"serviceName": "billing"},
                          "notifications": {"serviceName": "notifications"}},
            "spans": spans,
        }]}))
        .unwrap()
    }

    #[test]
    fn a_timed_out_first_stripe_attempt_is_blamed() {
        let kv = |k: &str, v: Value| json!({"key": k, "value": v});
        let client = |n: i64, error: Option<&str>| {
            let mut tags = vec![
                kv("span.kind", json!("client")),
                kv("http.request.method", json!("POST")),
            ];
            if n > 0 {
                tags.push(kv("http.request.resend_count", json!(n)));
            }
            if let Some(error) = error {
                tags.push(kv("error.type", json!(error)));
            }
            Value::Array(tags)
        };
        let view = trace(vec![
            span(
                "1",
                None,
                "gateway",
                "POST /checkout",
                0,
                11_400_000,
                json!([]),
            ),
            span(
                "2",
                Some("1"),
                "billing",
                "billing.charge",
                100_000,
                11_200_000,
                json!([]),
            ),
            span(
                "3",
                Some("2"),
                "billing",
                "stripe.create_charge",
                200_000,
                11_000_000,
                json!([]),
            ),
            span(
                "4",
                Some("3"),
                "billing",
                "POST /v1/charges",
                210_000,
                10_000_000,
                client(0, Some("timeout")),
            ),
            span(
                "5",
                Some("3"),
                "billing",
                "POST /v1/charges",
                10_400_000,
                700_000,
                client(1, None),
            ),
        ]);
        let why = Why::of(&view);
        assert_eq!(why.end_to_end_us, 11_400_000);
        let total: u64 = why.path.iter().map(|s| s.self_us).sum();
        assert_eq!(
            total, why.end_to_end_us,
            "the path covers the end-to-end time"
        );
        assert_eq!(
            why.blame,
            "10.0 s of 11.4 s: billing › billing.charge › stripe.create_charge › POST /v1/charges attempt 1 timed out after 10.0 s, retried"
        );
        assert_eq!(why.by_service[0].0, "billing");
    }

    #[test]
    fn an_incomplete_trace_starts_from_its_entry_point_and_says_so() {
        let view = trace(vec![
            span(
                "1",
                None,
                "gateway",
                "POST /checkout",
                0,
                3_000_000,
                json!([]),
            ),
            span(
                "2",
                Some("1"),
                "billing",
                "billing.charge",
                100_000,
                2_800_000,
                json!([]),
            ),
            // Its parent (`db.save_transaction`) has not arrived yet.
            span(
                "9",
                Some("8"),
                "billing",
                "INSERT outbox",
                2_500_000,
                1_000,
                json!([]),
            ),
        ]);
        let why = Why::of(&view);
        assert_eq!(why.incomplete, 1);
        assert_eq!(why.path[0].name, "POST /checkout");
        assert!(why.report().contains("incomplete"));
    }

    #[test]
    fn a_sent_record_waiting_for_its_ride_is_blamed_as_a_wait() {
        let view = trace(vec![
            span("1", None, "gateway", "POST /checkout", 0, 10_000, json!([])),
            span(
                "2",
                Some("1"),
                "billing",
                "publish order.completed",
                5_000,
                1_000,
                json!([]),
            ),
            span(
                "3",
                Some("2"),
                "notifications",
                "notification.send_confirmation",
                8_000,
                25_000,
                json!([]),
            ),
            span(
                "4",
                Some("3"),
                "notifications",
                "mail.send",
                9_000,
                1_000,
                json!([]),
            ),
            span(
                "5",
                Some("3"),
                "notifications",
                "notification.record_sent",
                10_000,
                22_000,
                json!([]),
            ),
        ]);
        let why = Why::of(&view);
        assert_eq!(
            why.culprit().map(|step| step.name.as_str()),
            Some("notification.record_sent")
        );
        assert!(
            why.blame.contains(
                "notification.send_confirmation › notification.record_sent: waiting for the sent \
                 record's commit"
            ),
            "{}",
            why.blame
        );
    }

    #[test]
    fn the_path_crosses_the_nats_hop_to_a_late_email() {
        let view = trace(vec![
            span("1", None, "gateway", "POST /checkout", 0, 20_000, json!([])),
            span(
                "2",
                Some("1"),
                "billing",
                "publish order.completed",
                15_000,
                1_000,
                json!([]),
            ),
            // The consumer ends long after the checkout answered.
            span(
                "3",
                Some("2"),
                "notifications",
                "process order.completed",
                30_000,
                2_000_000,
                json!([]),
            ),
            span(
                "4",
                Some("3"),
                "notifications",
                "notification.send_confirmation",
                40_000,
                1_900_000,
                json!([]),
            ),
        ]);
        let why = Why::of(&view);
        assert_eq!(why.end_to_end_us, 2_030_000);
        let names: Vec<&str> = why.path.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "POST /checkout",
                "publish order.completed",
                "process order.completed",
                "notification.send_confirmation"
            ]
        );
        assert!(
            why.blame.starts_with("1.9 s of 2.0 s: notifications"),
            "{}",
            why.blame
        );
        assert!(why.report().contains("by service: notifications"));
    }
}
