//! An exporter wrapper that counts what reached the collector and what did not, so a collector outage is a
//! number in the logs rather than silence.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

/// Export outcomes since start.
#[derive(Debug, Default)]
pub struct ExportCounts {
    pub exported: AtomicU64,
    pub failed: AtomicU64,
}

#[derive(Debug)]
pub(super) struct CountingExporter<E> {
    pub(super) inner: E,
    pub(super) counts: Arc<ExportCounts>,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let size = batch.len() as u64;
        let outcome = self.inner.export(batch).await;
        if outcome.is_ok() {
            self.counts.exported.fetch_add(size, Ordering::Relaxed);
        } else {
            let before = self.counts.failed.fetch_add(size, Ordering::Relaxed);
            // The first failure, then one line per ~10 000 lost spans: visible, never a flood.
            if before == 0 || before / 10_000 != (before + size) / 10_000 {
                eprintln!(
                    "{{\"level\":\"WARN\",\"target\":\"tracehop_shared::telemetry\",\"message\":\"span export failed; spans are being dropped\",\"fields\":{{\"failed_spans_total\":{}}}}}",
                    before + size
                );
            }
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
