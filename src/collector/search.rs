//! Jaeger's trace search (`GET /api/traces`) over the embedded store, with the parameters real Jaeger
//! takes, so `stack slow`, `stack errors` and following span links work the same against both:
//! `service`, `operation`, `tags` (a JSON object), `start` and `end` (µs since the epoch), `minDuration` and
//! `maxDuration` (`250ms`, `1.5s`, `2m`), `limit` (default 20).
//!
//! As in Jaeger, a trace matches when one of its spans has the service, the operation, a duration within
//! the bounds and every tag. Only the spans one searches for are indexed: roots, SERVER, PRODUCER and
//! CONSUMER spans, failed spans, and spans carrying one of [`INDEXED_TAGS`]; and of their tags only
//! [`INDEXED_TAGS`], `span.kind`, `otel.status_code` and `error`. Results are the newest first.
//!
//! `GET /api/services` lists every service that sent a span, as Jaeger does (the embedded store lists only
//! services that start traces, which would hide billing from a search for its failures).

use std::collections::{BTreeSet, HashMap, VecDeque};

use otlp_embedded::proto::common::v1::any_value;
use otlp_embedded::proto::trace::v1::ResourceSpans;
use serde::Deserialize;

/// Tags a search can name besides `span.kind`, `otel.status_code` and `error`.
pub const INDEXED_TAGS: [&str; 7] = [
    "order.id",
    "messaging.message.id",
    "messaging.destination.name",
    "http.response.status_code",
    "http.route",
    "error.type",
    "user.id",
];

#[derive(Debug, Clone)]
struct IndexedSpan {
    service: String,
    name: String,
    start_us: u64,
    duration_us: u64,
    tags: Vec<(String, String)>,
}

/// Searchable spans of the stored traces, oldest evicted first.
#[derive(Debug)]
pub struct SearchIndex {
    traces: HashMap<Vec<u8>, Vec<IndexedSpan>>,
    services: BTreeSet<String>,
    order: VecDeque<Vec<u8>>,
    capacity: usize,
}

/// The query string of `GET /api/traces`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceQuery {
    pub service: Option<String>,
    pub operation: Option<String>,
    pub tags: Option<String>,
    pub start: Option<u64>,
    pub end: Option<u64>,
    pub min_duration: Option<String>,
    pub max_duration: Option<String>,
    pub limit: Option<usize>,
}

/// A query that could be read, or why not.
#[derive(Debug)]
struct Criteria {
    service: Option<String>,
    operation: Option<String>,
    tags: Vec<(String, String)>,
    start: u64,
    end: u64,
    min_us: u64,
    max_us: u64,
    limit: usize,
}

impl TraceQuery {
    fn criteria(self) -> Result<Criteria, String> {
        let tags = match self.tags.as_deref().filter(|tags| !tags.trim().is_empty()) {
            None => Vec::new(),
            Some(text) => {
                let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
                    .map_err(|error| format!("tags must be a JSON object: {error}"))?;
                object
                    .into_iter()
                    .map(|(key, value)| {
                        let value = match value {
                            serde_json::Value::String(text) => text,
                            other => other.to_string(),
                        };
                        (key, value)
                    })
                    .collect()
            }
        };
        let duration = |text: Option<String>, default: u64| -> Result<u64, String> {
            match text.filter(|text| !text.is_empty()) {
                None => Ok(default),
                Some(text) => parse_duration_us(&text)
                    .ok_or_else(|| format!("{text:?} is not a duration such as 250ms or 1.5s")),
            }
        };
        Ok(Criteria {
            service: self.service.filter(|s| !s.is_empty()),
            operation: self.operation.filter(|s| !s.is_empty()),
            tags,
            start: self.start.unwrap_or(0),
            end: self.end.unwrap_or(u64::MAX),
            min_us: duration(self.min_duration, 0)?,
            max_us: duration(self.max_duration, u64::MAX)?,
            limit: self.limit.unwrap_or(20).clamp(1, 10_000),
        })
    }
}

/// `250ms`, `1.5s`, `2m`, `100us`, `1h` (Go's duration syntax, one unit) as microseconds.
pub fn parse_duration_us(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic() || c == 'µ')?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    let scale = match unit {
        "us" | "µs" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some((number * scale) as u64)
}

impl SearchIndex {
    pub fn new(capacity: usize) -> Self {
        Self {
            traces: HashMap::new(),
            services: BTreeSet::new(),
            order: VecDeque::new(),
            capacity,
        }
    }

    /// Indexes the spans about to be stored.
    pub fn add(&mut self, parts: &[ResourceSpans]) {
        for part in parts {
            let service = super::service_name(part);
            if !self.services.contains(&service) {
                self.services.insert(service.clone());
            }
            for span in part.scope_spans.iter().flat_map(|scope| &scope.spans) {
                let failed = span.status.as_ref().is_some_and(|status| status.code == 2);
                let mut tags: Vec<(String, String)> = span
                    .attributes
                    .iter()
                    .filter(|kv| INDEXED_TAGS.contains(&kv.key.as_str()))
                    .filter_map(|kv| {
                        Some((kv.key.clone(), text(kv.value.as_ref()?.value.as_ref()?)?))
                    })
                    .collect();
                let wanted = span.parent_span_id.is_empty()
                    || matches!(span.kind, 2 | 4 | 5)
                    || failed
                    || !tags.is_empty();
                if !wanted {
                    continue;
                }
                tags.push(("span.kind".into(), super::span_kind_name(span.kind).into()));
                if failed {
                    tags.push(("error".into(), "true".into()));
                    tags.push(("otel.status_code".into(), "ERROR".into()));
                }
                let entry = match self.traces.get_mut(&span.trace_id) {
                    Some(entry) => entry,
                    None => {
                        self.order.push_back(span.trace_id.clone());
                        self.traces.entry(span.trace_id.clone()).or_default()
                    }
                };
                entry.push(IndexedSpan {
                    service: service.clone(),
                    name: span.name.clone(),
                    start_us: span.start_time_unix_nano / 1000,
                    duration_us: span
                        .end_time_unix_nano
                        .saturating_sub(span.start_time_unix_nano)
                        / 1000,
                    tags,
                });
            }
        }
        while self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.traces.remove(&oldest);
            }
        }
    }

    /// The ids of the matching traces, newest first, at most `limit`.
    fn find(&self, criteria: &Criteria) -> Vec<Vec<u8>> {
        let mut found: Vec<(u64, &Vec<u8>)> = self
            .traces
            .iter()
            .filter_map(|(id, spans)| {
                let matching = spans.iter().filter(|span| {
                    criteria.service.as_ref().is_none_or(|s| *s == span.service)
                        && criteria.operation.as_ref().is_none_or(|o| *o == span.name)
                        && span.start_us >= criteria.start
                        && span.start_us <= criteria.end
                        && span.duration_us >= criteria.min_us
                        && span.duration_us <= criteria.max_us
                        && criteria.tags.iter().all(|(key, value)| {
                            span.tags.iter().any(|(k, v)| k == key && v == value)
                        })
                });
                matching
                    .map(|span| span.start_us)
                    .max()
                    .map(|start| (start, id))
            })
            .collect();
        found.sort_by_key(|entry| std::cmp::Reverse(entry.0));
        found
            .into_iter()
            .take(criteria.limit)
            .map(|(_, id)| id.clone())
            .collect()
    }
}

fn text(value: &any_value::Value) -> Option<String> {
    match value {
        any_value::Value::StringValue(text) => Some(text.clone()),
        any_value::Value::IntValue(number) => Some(number.to_string()),
        any_value::Value::BoolValue(flag) => Some(flag.to_string()),
        any_value::Value::DoubleValue(number) => Some(number.to_string()),
        _ => None,
    }
}

/// `GET /api/services`: every service that sent a span.
pub async fn services_handler(
    axum::extract::State(shared): axum::extract::State<super::Shared>,
) -> axum::Json<serde_json::Value> {
    let services: Vec<String> = match shared.index.lock() {
        Ok(index) => index.services.iter().cloned().collect(),
        Err(_) => Vec::new(),
    };
    let total = services.len();
    axum::Json(serde_json::json!({ "data": services, "total": total, "errors": null }))
}

/// `GET /api/traces`: the matching traces in Jaeger's JSON, or 400 with what was wrong.
pub async fn handler(
    axum::extract::State(shared): axum::extract::State<super::Shared>,
    axum::extract::Query(query): axum::extract::Query<TraceQuery>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let criteria = match query.criteria() {
        Ok(criteria) => criteria,
        Err(message) => {
            return (
                axum::http::StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({
                    "data": null, "total": 0, "errors": [{"code": 400, "msg": message}]
                })),
            )
                .into_response();
        }
    };
    let ids = match shared.index.lock() {
        Ok(index) => index.find(&criteria),
        Err(_) => Vec::new(),
    };
    let mut data = Vec::new();
    {
        let mut state = shared.state.write().await;
        for id in ids {
            if let Some(trace) = state.get_by_id(&id) {
                let batch = trace.to_jaeger_batch();
                if let Some(one) = batch["data"].get(0) {
                    data.push(one.clone());
                }
            }
        }
    }
    let total = data.len();
    axum::Json(serde_json::json!({
        "data": data, "total": total, "limit": 0, "offset": 0, "errors": null
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration_us("250ms"), Some(250_000));
        assert_eq!(parse_duration_us("1.5s"), Some(1_500_000));
        assert_eq!(parse_duration_us("2m"), Some(120_000_000));
        assert_eq!(parse_duration_us("10us"), Some(10));
        assert_eq!(parse_duration_us("ten"), None);
        assert_eq!(parse_duration_us("5"), None);
        assert_eq!(parse_duration_us("-1s"), None);
    }

    #[test]
    fn bad_tags_are_refused() {
        let query = TraceQuery {
            tags: Some("{not json".into()),
            ..Default::default()
        };
        assert!(query.criteria().is_err());
    }
}
