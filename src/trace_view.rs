//! A trace as the Jaeger query API returns it (`GET /api/traces/{id}`), as a tree, and drawn as a terminal
//! waterfall. Works against the embedded collector and against real Jaeger.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

/// One span, flattened from Jaeger's JSON.
#[derive(Debug, Clone)]
pub struct SpanView {
    pub span_id: String,
    pub parent_id: Option<String>,
    pub service: String,
    /// The resource's `service.instance.id`, when set (which replica made the span).
    pub service_instance: Option<String>,
    pub name: String,
    /// Microseconds since the epoch.
    pub start_us: u64,
    pub duration_us: u64,
    pub tags: HashMap<String, Value>,
    /// Span links (Jaeger `FOLLOWS_FROM` references) as `(trace id, span id)`.
    pub links: Vec<(String, String)>,
    /// Span events (Jaeger "logs"), each as its fields.
    pub events: Vec<HashMap<String, Value>>,
}

impl SpanView {
    /// A tag as text (numbers and booleans rendered).
    pub fn tag(&self, key: &str) -> Option<String> {
        self.tags.get(key).map(|value| match value {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        })
    }

    /// `span.kind` (server, client, producer, consumer, internal).
    pub fn kind(&self) -> String {
        self.tag("span.kind").unwrap_or_else(|| "internal".into())
    }

    pub fn is_error(&self) -> bool {
        self.tag("otel.status_code").as_deref() == Some("ERROR")
            || self.tags.get("error") == Some(&Value::Bool(true))
    }
}

/// A whole trace.
#[derive(Debug, Clone)]
pub struct TraceView {
    pub trace_id: String,
    pub spans: Vec<SpanView>,
}

impl TraceView {
    /// Parses the body of `GET /api/traces/{id}`.
    pub fn from_jaeger_json(body: &Value) -> anyhow::Result<Self> {
        let trace = body["data"]
            .get(0)
            .ok_or_else(|| anyhow::anyhow!("no trace in the response"))?;
        Ok(Self::from_jaeger_trace(trace))
    }

    /// Parses one trace of Jaeger's JSON (an element of `data`).
    pub fn from_jaeger_trace(trace: &Value) -> Self {
        let processes = &trace["processes"];
        let mut spans = Vec::new();
        for span in trace["spans"].as_array().into_iter().flatten() {
            let parent_id = span["references"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|reference| reference["refType"] == "CHILD_OF")
                .and_then(|reference| reference["spanID"].as_str())
                .map(str::to_owned);
            let links = span["references"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|reference| reference["refType"] == "FOLLOWS_FROM")
                .map(|reference| {
                    let id = |key: &str| reference[key].as_str().unwrap_or_default().to_owned();
                    (id("traceID"), id("spanID"))
                })
                .collect();
            let process_id = span["processID"].as_str().unwrap_or_default();
            let service = processes[process_id]["serviceName"]
                .as_str()
                .unwrap_or("unknown")
                .to_owned();
            let service_instance = key_values(&processes[process_id]["tags"])
                .get("service.instance.id")
                .and_then(|value| value.as_str().map(str::to_owned));
            let tags = key_values(&span["tags"]);
            let events = span["logs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|log| key_values(&log["fields"]))
                .collect();
            spans.push(SpanView {
                span_id: span["spanID"].as_str().unwrap_or_default().to_owned(),
                parent_id,
                service,
                service_instance,
                name: span["operationName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                start_us: span["startTime"].as_u64().unwrap_or_default(),
                duration_us: span["duration"].as_u64().unwrap_or_default(),
                tags,
                links,
                events,
            });
        }
        spans.sort_by_key(|span| span.start_us);
        Self {
            trace_id: trace["traceID"].as_str().unwrap_or_default().to_owned(),
            spans,
        }
    }

    /// Jaeger's trace search (`GET /api/traces` with `service`, `operation`, `tags`, `start`, `end`,
    /// `minDuration`, `limit`): the embedded collector and real Jaeger take the same parameters.
    pub async fn search(jaeger: &str, query: &[(&str, String)]) -> anyhow::Result<Vec<TraceView>> {
        let url = format!("{}/api/traces", jaeger.trim_end_matches('/'));
        let response = http_client()
            .get(&url)
            .query(query)
            .timeout(Duration::from_secs(30))
            .send()
            .await?;
        if !response.status().is_success() {
            anyhow::bail!("{url} answered {}", response.status());
        }
        let body: Value = response.json().await?;
        Ok(body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(Self::from_jaeger_trace)
            .filter(|trace| !trace.spans.is_empty())
            .collect())
    }

    /// The services a Jaeger query API knows.
    pub async fn known_services(jaeger: &str) -> anyhow::Result<Vec<String>> {
        let url = format!("{}/api/services", jaeger.trim_end_matches('/'));
        let body: Value = http_client()
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await?
            .json()
            .await?;
        Ok(body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|service| service.as_str().map(str::to_owned))
            .collect())
    }

    /// A trace joined with the traces its NATS messages link it to, as one tree.
    ///
    /// When consumers start traces of their own (`NATS_CONSUMER_TRACE=link`), a checkout is two (or more)
    /// traces. Given either, this fetches the producer trace, finds the consumer traces whose span links
    /// point at its PRODUCER spans (searching by the message's `messaging.message.id`), and hangs each
    /// linked span under the producer span it links to. With parent/child consumers it is the trace as is.
    pub async fn fetch_joined(jaeger: &str, trace_id: &str) -> anyhow::Result<Self> {
        let first = Self::fetch(jaeger, trace_id).await?;
        // A consumer trace: start from the producer trace its first span links to.
        let producer_trace = first
            .roots()
            .iter()
            .flat_map(|root| root.links.iter())
            .map(|(trace, _)| trace.clone())
            .find(|trace| *trace != first.trace_id);
        let mut joined = match producer_trace {
            Some(producer) => Self::fetch(jaeger, &producer).await.unwrap_or(first),
            None => first,
        };
        let message_ids: Vec<String> = joined
            .spans
            .iter()
            .filter(|span| span.kind() == "producer")
            .filter_map(|span| span.tag("messaging.message.id"))
            .collect();
        if message_ids.is_empty() {
            return Ok(joined);
        }
        let services = Self::known_services(jaeger).await.unwrap_or_default();
        let mut seen: std::collections::HashSet<String> = joined
            .spans
            .iter()
            .map(|span| span.span_id.clone())
            .collect();
        for message_id in message_ids {
            let tags = serde_json::json!({ "messaging.message.id": message_id }).to_string();
            for service in &services {
                let found = Self::search(
                    jaeger,
                    &[
                        ("service", service.clone()),
                        ("tags", tags.clone()),
                        ("limit", "50".to_owned()),
                    ],
                )
                .await
                .unwrap_or_default();
                for linked in found {
                    if linked.trace_id != joined.trace_id {
                        joined.attach(linked, &mut seen);
                    }
                }
            }
        }
        joined.spans.sort_by_key(|span| span.start_us);
        Ok(joined)
    }

    /// Adds `linked`'s spans, each span that links into this trace hung under the span it links to.
    fn attach(&mut self, linked: TraceView, seen: &mut std::collections::HashSet<String>) {
        let own_ids: std::collections::HashSet<String> = linked
            .spans
            .iter()
            .map(|span| span.span_id.clone())
            .collect();
        for mut span in linked.spans {
            if !seen.insert(span.span_id.clone()) {
                continue;
            }
            let orphan = span
                .parent_id
                .as_ref()
                .is_none_or(|parent| !own_ids.contains(parent));
            if orphan
                && let Some((_, target)) =
                    span.links.iter().find(|(trace, _)| *trace == self.trace_id)
            {
                span.parent_id = Some(target.clone());
            }
            span.tags.insert(
                "linked.trace_id".to_owned(),
                Value::String(linked.trace_id.clone()),
            );
            self.spans.push(span);
        }
    }

    /// Fetches a trace from a Jaeger query API.
    pub async fn fetch(jaeger: &str, trace_id: &str) -> anyhow::Result<Self> {
        let url = format!("{}/api/traces/{trace_id}", jaeger.trim_end_matches('/'));
        let response = http_client()
            .get(&url)
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        if !response.status().is_success() {
            anyhow::bail!("{url} answered {}", response.status());
        }
        Self::from_jaeger_json(&response.json().await?)
    }

    /// Polls until `ready` says the trace is complete enough, or `timeout` passes (returns the last view).
    pub async fn wait_for(
        jaeger: &str,
        trace_id: &str,
        timeout: Duration,
        ready: impl Fn(&TraceView) -> bool,
    ) -> anyhow::Result<Self> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let attempt = Self::fetch(jaeger, trace_id).await;
            match attempt {
                Ok(view) if ready(&view) => return Ok(view),
                Ok(view) if tokio::time::Instant::now() >= deadline => return Ok(view),
                Err(error) if tokio::time::Instant::now() >= deadline => return Err(error),
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    pub fn span(&self, span_id: &str) -> Option<&SpanView> {
        self.spans.iter().find(|span| span.span_id == span_id)
    }

    /// All spans with this name.
    pub fn named(&self, name: &str) -> Vec<&SpanView> {
        self.spans.iter().filter(|span| span.name == name).collect()
    }

    pub fn parent(&self, span: &SpanView) -> Option<&SpanView> {
        span.parent_id.as_deref().and_then(|id| self.span(id))
    }

    pub fn children<'a>(&'a self, span: &SpanView) -> Vec<&'a SpanView> {
        self.spans
            .iter()
            .filter(|child| child.parent_id.as_deref() == Some(span.span_id.as_str()))
            .collect()
    }

    /// Whether `ancestor` is on the parent chain of `span`.
    pub fn is_ancestor(&self, ancestor: &SpanView, span: &SpanView) -> bool {
        let mut current = self.parent(span);
        // At most one step per span: a malformed trace with a parent cycle cannot loop forever.
        for _ in 0..self.spans.len() {
            let Some(candidate) = current else {
                return false;
            };
            if candidate.span_id == ancestor.span_id {
                return true;
            }
            current = self.parent(candidate);
        }
        false
    }

    /// Services that contributed spans.
    pub fn services(&self) -> Vec<String> {
        let mut services: Vec<String> = self.spans.iter().map(|s| s.service.clone()).collect();
        services.sort();
        services.dedup();
        services
    }

    /// Spans whose parent is not in the trace (1 for a whole trace: its root).
    pub fn roots(&self) -> Vec<&SpanView> {
        self.spans
            .iter()
            .filter(|span| {
                span.parent_id
                    .as_deref()
                    .and_then(|id| self.span(id))
                    .is_none()
            })
            .collect()
    }

    /// The terminal waterfall: one row per span in tree order, with service, name, start offset, duration
    /// and a bar on a common time axis.
    pub fn waterfall(&self, color: bool) -> String {
        const BAR_WIDTH: usize = 40;
        let Some(start) = self.spans.iter().map(|s| s.start_us).min() else {
            return format!("trace {}: no spans\n", self.trace_id);
        };
        let end = self
            .spans
            .iter()
            .map(|s| s.start_us + s.duration_us)
            .max()
            .unwrap_or(start);
        let total = (end - start).max(1);
        let mut rows = Vec::new();
        let mut roots = self.roots();
        roots.sort_by_key(|span| span.start_us);
        for root in roots {
            self.collect_rows(root, 0, &mut rows);
        }
        let label_width = rows
            .iter()
            .map(|(depth, span)| depth * 2 + span.name.chars().count())
            .max()
            .unwrap_or(10)
            .min(60);
        let service_width = rows.iter().map(|(_, s)| s.service.len()).max().unwrap_or(8);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "trace {}  ({} spans, {:.1} ms)",
            self.trace_id,
            self.spans.len(),
            total as f64 / 1000.0
        );
        for (depth, span) in rows {
            let offset = span.start_us - start;
            let bar_start = (offset as u128 * BAR_WIDTH as u128 / total as u128) as usize;
            let bar_len = ((span.duration_us as u128 * BAR_WIDTH as u128).div_ceil(total as u128)
                as usize)
                .max(1)
                .min(BAR_WIDTH - bar_start.min(BAR_WIDTH - 1));
            let bar = format!(
                "{}{}{}",
                " ".repeat(bar_start.min(BAR_WIDTH - 1)),
                "█".repeat(bar_len),
                " ".repeat(BAR_WIDTH.saturating_sub(bar_start.min(BAR_WIDTH - 1) + bar_len))
            );
            let label: String = format!("{}{}", "  ".repeat(depth), span.name)
                .chars()
                .take(label_width)
                .collect();
            let (paint, reset) = if color {
                (
                    if span.is_error() {
                        "\x1b[31m"
                    } else {
                        service_color(&span.service)
                    },
                    "\x1b[0m",
                )
            } else {
                ("", "")
            };
            let marker = if span.is_error() { " !" } else { "" };
            let _ = writeln!(
                out,
                "{paint}{:<service_width$}  {:<label_width$}  {:>9.2}ms {:>9.2}ms  |{bar}|{marker}{reset}",
                span.service,
                label,
                offset as f64 / 1000.0,
                span.duration_us as f64 / 1000.0,
            );
        }
        out
    }

    fn collect_rows<'a>(
        &'a self,
        span: &'a SpanView,
        depth: usize,
        rows: &mut Vec<(usize, &'a SpanView)>,
    ) {
        // A span already drawn means a parent cycle in malformed input: stop there.
        if depth > 256 || rows.iter().any(|(_, drawn)| drawn.span_id == span.span_id) {
            return;
        }
        rows.push((depth, span));
        let mut children = self.children(span);
        children.sort_by_key(|child| child.start_us);
        for child in children {
            self.collect_rows(child, depth + 1, rows);
        }
    }
}

fn http_client() -> reqwest::Client {
    tracehop_telemetry::http::client::plain_client_builder()
        .build()
        .unwrap_or_default()
}

fn service_color(service: &str) -> &'static str {
    match service {
        "gateway" => "\x1b[36m",
        "users" => "\x1b[35m",
        "billing" => "\x1b[33m",
        "notifications" => "\x1b[32m",
        _ => "\x1b[37m",
    }
}

fn key_values(list: &Value) -> HashMap<String, Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| Some((kv["key"].as_str()?.to_owned(), kv["value"].clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        serde_json::json!({"data": [{
            "traceID": "abc",
            "processes": {"p1": {"serviceName": "gateway"}, "p2": {"serviceName": "billing"}},
            "spans": [
                {"spanID": "1", "operationName": "POST /checkout", "startTime": 1000, "duration": 10000,
                 "processID": "p1", "tags": [{"key": "span.kind", "type": "string", "value": "server"}], "logs": []},
                {"spanID": "2", "operationName": "billing.charge", "startTime": 3000, "duration": 5000,
                 "processID": "p2", "references": [{"refType": "CHILD_OF", "spanID": "1", "traceID": "abc"}],
                 "tags": [{"key": "otel.status_code", "type": "string", "value": "ERROR"}], "logs": []}
            ]
        }]})
    }

    #[test]
    fn parses_tree_and_draws_waterfall() {
        let view = TraceView::from_jaeger_json(&sample()).unwrap();
        assert_eq!(view.spans.len(), 2);
        let child = &view.named("billing.charge")[0];
        assert_eq!(view.parent(child).unwrap().name, "POST /checkout");
        assert!(child.is_error());
        assert_eq!(view.roots().len(), 1);
        assert_eq!(
            view.services(),
            vec!["billing", "gateway"],
            "sorted by name"
        );
        let drawn = view.waterfall(false);
        assert!(drawn.contains("  billing.charge"), "{drawn}");
        assert!(drawn.contains("2.00ms"), "{drawn}");
        assert!(drawn.lines().nth(2).unwrap().ends_with("| !"), "{drawn}");
    }
}
