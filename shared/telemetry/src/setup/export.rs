//! The exporter wrapper every service exports through. On the batch thread, off the request path, it:
//!
//! - caps every string attribute value (span, event and link attributes, and the status description) at the
//!   attribute value length limit, so a caller's text cannot grow a span past it
//!   (`OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT`, else `OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT`, else
//!   [`DEFAULT_VALUE_LENGTH_LIMIT`]; the SDK itself has no such limit);
//! - counts what reached the collector and what did not, so a collector outage is a number in the logs rather
//!   than silence.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::borrow::Cow;

use opentelemetry::trace::Status;
use opentelemetry::{Array, KeyValue, StringValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// The attribute value length limit when the environment sets none: tracehop's own values are far shorter;
/// only text from outside (a user agent, an error message) can reach it.
pub const DEFAULT_VALUE_LENGTH_LIMIT: usize = 2048;

/// The attribute value length limit from the standard environment (the span-specific variable first).
pub(super) fn value_length_limit() -> usize {
    [
        "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT",
        "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok()?.trim().parse().ok())
    .unwrap_or(DEFAULT_VALUE_LENGTH_LIMIT)
}

/// Export outcomes since start.
#[derive(Debug, Default)]
pub struct ExportCounts {
    pub exported: AtomicU64,
    pub failed: AtomicU64,
    /// Requests the collector took whole but answered with a message (OTLP's partial success that refuses
    /// nothing: a warning).
    pub warnings: AtomicU64,
}

impl ExportCounts {
    /// Counts `spans` the collector took.
    pub(super) fn exported(&self, spans: u64) {
        self.exported.fetch_add(spans, Ordering::Relaxed);
    }

    /// Counts `spans` that did not reach the collector, or that it refused, and why: the first failure is
    /// logged with its reason, then one line per ~10 000 lost spans (visible, never a flood).
    pub(super) fn failed(&self, spans: u64, reason: &str) {
        if spans == 0 {
            return;
        }
        let before = self.failed.fetch_add(spans, Ordering::Relaxed);
        if before == 0 || before / 10_000 != (before + spans) / 10_000 {
            warn(
                "span export failed; spans are being dropped",
                serde_json::json!({"failed_spans_total": before + spans, "reason": reason}),
            );
        }
    }

    /// Counts a request the collector took whole but answered with `message` (a partial success that
    /// refuses nothing, which OTLP calls a warning): the first is logged, then every 1 000th, since a
    /// collector that warns usually warns on every request.
    pub(super) fn warned(&self, message: &str) {
        let before = self.warnings.fetch_add(1, Ordering::Relaxed);
        if before.is_multiple_of(1_000) {
            warn(
                "the collector took the spans with a warning",
                serde_json::json!({"warnings_total": before + 1, "reason": message}),
            );
        }
    }
}

/// A warning line, straight to stderr in the JSON logs' shape: the export thread calls this, and a
/// `tracing` event there could be exported in turn.
fn warn(message: &str, fields: serde_json::Value) {
    let line = serde_json::json!({
        "level": "WARN",
        "target": "tracehop_telemetry::setup",
        "message": message,
        "fields": fields,
    });
    eprintln!("{line}");
}

#[derive(Debug)]
pub(super) struct GuardedExporter<E> {
    pub(super) inner: E,
    pub(super) counts: Arc<ExportCounts>,
    /// Longest string attribute value, in bytes (cut at a character boundary).
    pub(super) value_limit: usize,
}

impl<E: SpanExporter> SpanExporter for GuardedExporter<E> {
    async fn export(&self, mut batch: Vec<SpanData>) -> OTelSdkResult {
        for span in &mut batch {
            limit_values(span, self.value_limit);
        }
        let size = batch.len() as u64;
        let outcome = self.inner.export(batch).await;
        match &outcome {
            Ok(()) => self.counts.exported(size),
            Err(error) => self.counts.failed(size, &error.to_string()),
        }
        outcome
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// Cuts every string value of `span` to `limit` bytes.
pub(super) fn limit_values(span: &mut SpanData, limit: usize) {
    let attributes = span
        .attributes
        .iter_mut()
        .chain(
            span.events
                .events
                .iter_mut()
                .flat_map(|e| e.attributes.iter_mut()),
        )
        .chain(
            span.links
                .links
                .iter_mut()
                .flat_map(|l| l.attributes.iter_mut()),
        );
    for KeyValue { value, .. } in attributes {
        limit_value(value, limit);
    }
    if let Status::Error { description } = &mut span.status
        && description.len() > limit
    {
        *description = Cow::Owned(cut(description, limit).to_owned());
    }
}

fn limit_value(value: &mut Value, limit: usize) {
    match value {
        Value::String(text) if text.as_str().len() > limit => {
            *text = StringValue::from(cut(text.as_str(), limit).to_owned());
        }
        Value::Array(Array::String(texts)) => {
            for text in texts.iter_mut().filter(|t| t.as_str().len() > limit) {
                *text = StringValue::from(cut(text.as_str(), limit).to_owned());
            }
        }
        _ => {}
    }
}

fn cut(text: &str, limit: usize) -> &str {
    let mut end = limit.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_strings_are_cut_at_a_character_boundary_and_numbers_untouched() {
        let mut value = Value::from("é".repeat(10));
        limit_value(&mut value, 5);
        assert_eq!(value.as_str(), "éé");
        let mut value = Value::from("short");
        limit_value(&mut value, 5);
        assert_eq!(value.as_str(), "short");
        let mut value = Value::I64(1234567);
        limit_value(&mut value, 2);
        assert_eq!(value, Value::I64(1234567));
        let mut value = Value::Array(Array::String(vec!["abcdef".into(), "ab".into()]));
        limit_value(&mut value, 3);
        assert_eq!(
            value,
            Value::Array(Array::String(vec!["abc".into(), "ab".into()]))
        );
    }
}
