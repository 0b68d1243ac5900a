//! Metrics from spans, served as Prometheus text on the collector's `/metrics`.
//!
//! The RED set per service and span, named and labelled as the OpenTelemetry Collector's `spanmetrics`
//! connector makes them once its Prometheus exporter has translated them (namespace `traces.span.metrics`,
//! duration in milliseconds, the connector's default buckets), so dashboards and alerts written against
//! docker compose's real collector work against the embedded one:
//!
//! - `traces_span_metrics_calls_total{service_name, span_name, span_kind, status_code}`: the rate;
//!   `status_code="STATUS_CODE_ERROR"` the errors;
//! - `traces_span_metrics_duration_milliseconds_{bucket,sum,count}`: the duration histogram.
//!
//! Every span is counted as it arrives, before tail sampling drops any (as the connector sits before the
//! `tail_sampling` processor in docker compose), so sampling never skews the rates.
//!
//! Trace completeness, which no span metric can say, comes from the sampler's decisions
//! ([`super::sampling`]): `tracehop_traces_total{completeness}` counts traces whose every NATS message was
//! consumed (`complete`) and those whose consumer span never arrived within the decision wait
//! (`consumer_missing`), and `tracehop_tail_sampling_decisions_total{decision, policy}` what was kept and why.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Mutex;

/// The `spanmetrics` connector's default histogram buckets, in milliseconds.
pub const BUCKETS_MS: [f64; 16] = [
    2.0, 4.0, 6.0, 8.0, 10.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1000.0, 1400.0, 2000.0, 5000.0,
    10000.0, 15000.0,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SeriesKey {
    service_name: String,
    span_name: String,
    span_kind: &'static str,
    status_code: &'static str,
}

#[derive(Debug, Default, Clone)]
struct Series {
    calls: u64,
    /// Per bucket (not cumulative); the last one is `+Inf`.
    buckets: [u64; BUCKETS_MS.len() + 1],
    sum_ms: f64,
}

/// Counters kept by the collector; cheap to update from the export path.
#[derive(Debug, Default)]
pub struct SpanMetrics {
    series: Mutex<HashMap<SeriesKey, Series>>,
    /// `(completeness, count)`.
    traces: Mutex<BTreeMap<&'static str, u64>>,
    /// `((decision, policy), count)`.
    decisions: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

/// The OTLP span kind as the connector labels it.
pub fn span_kind_label(kind: i32) -> &'static str {
    match kind {
        1 => "SPAN_KIND_INTERNAL",
        2 => "SPAN_KIND_SERVER",
        3 => "SPAN_KIND_CLIENT",
        4 => "SPAN_KIND_PRODUCER",
        5 => "SPAN_KIND_CONSUMER",
        _ => "SPAN_KIND_UNSPECIFIED",
    }
}

/// The OTLP status code as the connector labels it.
pub fn status_code_label(code: Option<i32>) -> &'static str {
    match code {
        Some(1) => "STATUS_CODE_OK",
        Some(2) => "STATUS_CODE_ERROR",
        _ => "STATUS_CODE_UNSET",
    }
}

impl SpanMetrics {
    /// Counts one span of `service`.
    pub fn record(
        &self,
        service: &str,
        span_name: &str,
        kind: i32,
        status: Option<i32>,
        duration_ms: f64,
    ) {
        let key = SeriesKey {
            service_name: service.to_owned(),
            span_name: span_name.to_owned(),
            span_kind: span_kind_label(kind),
            status_code: status_code_label(status),
        };
        let bucket = BUCKETS_MS
            .iter()
            .position(|bound| duration_ms <= *bound)
            .unwrap_or(BUCKETS_MS.len());
        let Ok(mut series) = self.series.lock() else {
            return;
        };
        let entry = series.entry(key).or_default();
        entry.calls += 1;
        entry.buckets[bucket] += 1;
        entry.sum_ms += duration_ms.max(0.0);
    }

    /// Counts one trace decided (`complete` or `consumer_missing`).
    pub fn trace_decided(&self, completeness: &'static str) {
        if let Ok(mut traces) = self.traces.lock() {
            *traces.entry(completeness).or_default() += 1;
        }
    }

    /// Counts one tail-sampling decision (`keep`/`drop`) and the policy that made it.
    pub fn sampling_decided(&self, decision: &'static str, policy: &'static str) {
        if let Ok(mut decisions) = self.decisions.lock() {
            *decisions.entry((decision, policy)).or_default() += 1;
        }
    }

    /// The Prometheus text exposition (format 0.0.4), with `pending` traces awaiting a decision.
    pub fn render(&self, pending: usize) -> String {
        let mut out = String::new();
        let series: Vec<(SeriesKey, Series)> = match self.series.lock() {
            Ok(series) => {
                let mut all: Vec<_> = series.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                all.sort_by(|a, b| a.0.cmp(&b.0));
                all
            }
            Err(_) => Vec::new(),
        };
        out.push_str("# HELP traces_span_metrics_calls_total Spans received, per service, span name, kind and status.\n");
        out.push_str("# TYPE traces_span_metrics_calls_total counter\n");
        for (key, value) in &series {
            let _ = writeln!(
                out,
                "traces_span_metrics_calls_total{{{}}} {}",
                labels(key),
                value.calls
            );
        }
        out.push_str("# HELP traces_span_metrics_duration_milliseconds Span durations.\n");
        out.push_str("# TYPE traces_span_metrics_duration_milliseconds histogram\n");
        for (key, value) in &series {
            let labels = labels(key);
            let mut cumulative = 0;
            for (index, count) in value.buckets.iter().enumerate() {
                cumulative += count;
                let bound = BUCKETS_MS
                    .get(index)
                    .map(|bound| format!("{bound}"))
                    .unwrap_or_else(|| "+Inf".to_owned());
                let _ = writeln!(
                    out,
                    "traces_span_metrics_duration_milliseconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "traces_span_metrics_duration_milliseconds_sum{{{labels}}} {}",
                value.sum_ms
            );
            let _ = writeln!(
                out,
                "traces_span_metrics_duration_milliseconds_count{{{labels}}} {}",
                value.calls
            );
        }
        out.push_str("# HELP tracehop_traces_total Traces decided, by whether every NATS message in them was consumed.\n");
        out.push_str("# TYPE tracehop_traces_total counter\n");
        if let Ok(traces) = self.traces.lock() {
            for completeness in ["complete", "consumer_missing"] {
                let count = traces.get(completeness).copied().unwrap_or(0);
                let _ = writeln!(
                    out,
                    "tracehop_traces_total{{completeness=\"{completeness}\"}} {count}"
                );
            }
        }
        out.push_str("# HELP tracehop_tail_sampling_decisions_total Tail-sampling decisions and the policy that made each.\n");
        out.push_str("# TYPE tracehop_tail_sampling_decisions_total counter\n");
        if let Ok(decisions) = self.decisions.lock() {
            for ((decision, policy), count) in decisions.iter() {
                let _ = writeln!(
                    out,
                    "tracehop_tail_sampling_decisions_total{{decision=\"{decision}\",policy=\"{policy}\"}} {count}"
                );
            }
        }
        out.push_str("# HELP tracehop_traces_pending Traces waiting for their decision (complete, or the decision wait).\n");
        out.push_str("# TYPE tracehop_traces_pending gauge\n");
        let _ = writeln!(out, "tracehop_traces_pending {pending}");
        out
    }
}

fn labels(key: &SeriesKey) -> String {
    format!(
        "service_name=\"{}\",span_name=\"{}\",span_kind=\"{}\",status_code=\"{}\"",
        escape(&key.service_name),
        escape(&key.span_name),
        key.span_kind,
        key.status_code
    )
}

/// Label values escape `\`, `"` and line feeds (the text format's only special characters).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_labels_escaped() {
        let metrics = SpanMetrics::default();
        metrics.record("gateway", "POST /checkout", 2, None, 3.0);
        metrics.record("gateway", "POST /checkout", 2, None, 120.0);
        metrics.record("gateway", "POST /checkout", 2, Some(2), 20_000.0);
        metrics.record("odd", "say \"hi\"\\\n", 1, None, 1.0);
        let text = metrics.render(0);
        assert!(text.contains(
            "traces_span_metrics_calls_total{service_name=\"gateway\",span_name=\"POST /checkout\",span_kind=\"SPAN_KIND_SERVER\",status_code=\"STATUS_CODE_UNSET\"} 2"
        ), "{text}");
        assert!(text.contains(
            "span_kind=\"SPAN_KIND_SERVER\",status_code=\"STATUS_CODE_UNSET\",le=\"4\"} 1"
        ));
        assert!(text.contains(
            "span_kind=\"SPAN_KIND_SERVER\",status_code=\"STATUS_CODE_UNSET\",le=\"200\"} 2"
        ));
        assert!(text.contains("status_code=\"STATUS_CODE_ERROR\",le=\"15000\"} 0"));
        assert!(text.contains("status_code=\"STATUS_CODE_ERROR\",le=\"+Inf\"} 1"));
        assert!(
            text.contains("span_name=\"say \\\"hi\\\"\\\\\\n\""),
            "{text}"
        );
    }
}
