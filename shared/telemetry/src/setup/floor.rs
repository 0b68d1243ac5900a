//! [`RecordNothing`]: a tracer whose spans are built by the OpenTelemetry layer and dropped, for measuring
//! the least a traced span can cost with `tracing` and `tracing-opentelemetry` (BENCHMARKS.md, section 23).

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use opentelemetry::KeyValue;
use opentelemetry::trace::{
    SpanBuilder, SpanContext, SpanId, Status, TraceContextExt, TraceFlags, TraceId, Tracer,
};

/// A tracer that records nothing: each span gets a sampled context (its parent's trace id or a new one, a
/// new span id, from a counter) and is dropped when it ends; the layer's builder is dropped unread. Under
/// it a span costs what `tracing`, `tracing-opentelemetry`'s layer and tracehop's own code spend on it,
/// before any SDK, span processor or exporter: the floor beneath every traced span.
///
/// ```
/// use tracehop_telemetry::setup::{RecordNothing, dispatch_with_tracer};
///
/// let dispatch = dispatch_with_tracer(RecordNothing::default());
/// tracing::dispatcher::with_default(&dispatch, || tracing::info_span!("work").in_scope(|| ()));
/// ```
#[derive(Debug, Default)]
pub struct RecordNothing {
    next: AtomicU64,
}

/// What [`RecordNothing`] builds: a context, and nothing else.
#[derive(Debug)]
pub struct NothingSpan(SpanContext);

impl opentelemetry::trace::Span for NothingSpan {
    fn add_event_with_timestamp<T>(&mut self, _: T, _: SystemTime, _: Vec<KeyValue>)
    where
        T: Into<Cow<'static, str>>,
    {
    }
    fn span_context(&self) -> &SpanContext {
        &self.0
    }
    fn is_recording(&self) -> bool {
        true
    }
    fn set_attribute(&mut self, _: KeyValue) {}
    fn set_status(&mut self, _: Status) {}
    fn update_name<T>(&mut self, _: T)
    where
        T: Into<Cow<'static, str>>,
    {
    }
    fn add_link(&mut self, _: SpanContext, _: Vec<KeyValue>) {}
    fn end_with_timestamp(&mut self, _: SystemTime) {}
}

impl Tracer for RecordNothing {
    type Span = NothingSpan;

    fn build_with_context(
        &self,
        builder: SpanBuilder,
        parent_cx: &opentelemetry::Context,
    ) -> NothingSpan {
        drop(builder);
        let next = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let parent = parent_cx.span();
        let parent = parent.span_context();
        let trace_id = if parent.is_valid() {
            parent.trace_id()
        } else {
            TraceId::from(u128::from(next))
        };
        NothingSpan(SpanContext::new(
            trace_id,
            SpanId::from(next),
            TraceFlags::SAMPLED,
            false,
            parent.trace_state().clone(),
        ))
    }
}
