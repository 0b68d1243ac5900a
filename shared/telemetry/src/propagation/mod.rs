//! W3C Trace Context carriers for every header map a tracehop hop travels in, and the strict parser they
//! all go through ([`w3c`]).
//!
//! Each adapter is tiny; having them in one place means there is exactly one way context enters and leaves a
//! service. All of them go through the global propagator installed by [`crate::setup`]: the strict
//! [`w3c::TraceContext`] (`traceparent`, `tracestate`) and OpenTelemetry's W3C Baggage propagator
//! (`baggage`, at most 64 members and 8 192 bytes, as that specification says).
//!
//! Every value written into a NATS header goes through [`header_value`]: a header value with a control
//! character is refused by the NATS client with a panic, and a caller's text must never reach one raw.

pub mod w3c;

use opentelemetry::Context;
use opentelemetry::global;
use opentelemetry::propagation::{Extractor, Injector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The longest header value tracehop writes from text it did not make (a dead-letter reason, ...).
pub const MAX_HEADER_VALUE_LENGTH: usize = 512;

/// `text` made safe for a header value: control characters become spaces and it is cut to
/// [`MAX_HEADER_VALUE_LENGTH`] bytes (at a character boundary).
///
/// ```
/// use tracehop_telemetry::propagation::header_value;
/// assert_eq!(header_value("bad\r\ninput\0"), "bad  input ");
/// assert_eq!(header_value(&"é".repeat(1000)).len(), 512);
/// ```
pub fn header_value(text: &str) -> String {
    let mut cleaned = String::with_capacity(text.len().min(MAX_HEADER_VALUE_LENGTH));
    for character in text.chars() {
        let character = if character.is_control() {
            ' '
        } else {
            character
        };
        if cleaned.len() + character.len_utf8() > MAX_HEADER_VALUE_LENGTH {
            break;
        }
        cleaned.push(character);
    }
    cleaned
}

/// Every value of a header, in order (`None` when it is absent). A value that is not text counts as empty,
/// so that several headers stay several: the W3C parser must see that there were two `traceparent`s.
fn every_value<'a>(values: impl Iterator<Item = &'a str>) -> Option<Vec<&'a str>> {
    let values: Vec<&str> = values.collect();
    (!values.is_empty()).then_some(values)
}

/// Reads context from actix-web request headers.
pub struct ActixHeaderExtractor<'a>(pub &'a actix_web::http::header::HeaderMap);

impl Extractor for ActixHeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        every_value(
            self.0
                .get_all(key)
                .map(|value| value.to_str().unwrap_or_default()),
        )
    }
}

/// Writes context into `http` header maps (what reqwest sends).
pub struct HttpHeaderInjector<'a>(pub &'a mut reqwest::header::HeaderMap);

impl Injector for HttpHeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            reqwest::header::HeaderName::from_bytes(key.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Reads context from `http` header maps (tests and clients that inspect responses).
pub struct HttpHeaderExtractor<'a>(pub &'a reqwest::header::HeaderMap);

impl Extractor for HttpHeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        every_value(
            self.0
                .get_all(key)
                .iter()
                .map(|value| value.to_str().unwrap_or_default()),
        )
    }
}

/// Writes context into NATS message headers.
pub struct NatsHeaderInjector<'a>(pub &'a mut async_nats::HeaderMap);

impl Injector for NatsHeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, header_value(&value).as_str());
    }
}

/// Reads context from NATS message headers.
pub struct NatsHeaderExtractor<'a>(pub &'a async_nats::HeaderMap);

impl Extractor for NatsHeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
    fn get_all(&self, key: &str) -> Option<Vec<&str>> {
        every_value(self.0.get_all(key).map(|value| value.as_str()))
    }
}

/// Writes context into a plain map (stored with outbox rows, so a later relay keeps the trace).
impl Injector for SerializedContext {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

impl Extractor for SerializedContext {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Trace context in a form that can be stored (JSON) and restored later.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerializedContext(pub std::collections::BTreeMap<String, String>);

impl SerializedContext {
    /// Captures an OpenTelemetry context.
    pub fn capture(context: &Context) -> Self {
        crate::setup::expose(context);
        let mut carrier = Self::default();
        global::get_text_map_propagator(|propagator| {
            propagator.inject_context(context, &mut carrier)
        });
        carrier
    }

    /// Restores the context (a remote parent).
    pub fn restore(&self) -> Context {
        extract(self)
    }
}

/// Injects `context` with the global propagator. With the span spool, the span it names is written to the
/// spool first (`setup`, the span spool): a span another process may make children under must outlive this
/// one's death.
pub fn inject(context: &Context, injector: &mut dyn Injector) {
    crate::setup::expose(context);
    global::get_text_map_propagator(|propagator| propagator.inject_context(context, injector));
}

/// Extracts a context with the global propagator (an empty context when the carrier has none).
pub fn extract(extractor: &dyn Extractor) -> Context {
    global::get_text_map_propagator(|propagator| propagator.extract(extractor))
}

/// Makes `span` a child of `parent` when `parent` carries a valid span context (a span without a remote
/// parent simply starts a new trace), then takes its sampling decision ([`crate::setup::note_sampling`]):
/// inside a sampled-out trace nothing is built beneath it.
pub fn set_remote_parent(span: &tracing::Span, parent: Context) {
    use opentelemetry::trace::TraceContextExt;
    if parent.span().span_context().is_valid() {
        // Only fails when the span has already been started, which our callers never do.
        if let Err(error) = span.set_parent(parent) {
            tracing::debug!(%error, "could not set remote parent");
        }
    }
    crate::setup::note_sampling(span);
}

/// The context to propagate from `span`: its own, or, for a span the OpenTelemetry layer did not build
/// (its trace was sampled out, [`crate::setup::note_sampling`], or the layer does not want its callsite),
/// the one of its nearest ancestor that the layer built. So the trace id and the decision "not sampled"
/// still travel downstream, and the next service does not start a trace of its own. A span with no such
/// ancestor gets the context made current on this thread (work handed over with its context, as
/// [`crate::db::Database::run`] does). Empty without the OpenTelemetry layer.
///
/// The ancestor is looked up in the registry, not taken from the current OpenTelemetry context: the layer
/// does not make a span's context current when it is entered (an async span is entered at every poll; README,
/// "Deviations, on purpose").
pub fn context_of(span: &tracing::Span) -> Context {
    use opentelemetry::trace::TraceContextExt;
    let own = span.context();
    if own.span().span_context().is_valid() {
        return own;
    }
    span.with_subscriber(|(id, dispatch)| nearest_built_ancestor(id, dispatch))
        .flatten()
        .unwrap_or_else(Context::current)
}

/// The context of the nearest ancestor of span `id` that the OpenTelemetry layer built.
fn nearest_built_ancestor(id: &tracing::Id, dispatch: &tracing::Dispatch) -> Option<Context> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_subscriber::registry::LookupSpan;
    let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
    let span = registry.span(id)?;
    span.scope().skip(1).find_map(|ancestor| {
        tracing_opentelemetry::get_otel_context(&ancestor.id(), dispatch)
            .filter(|context| context.span().span_context().is_valid())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };

    fn sample_context() -> Context {
        let span_context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "opaque")]).unwrap(),
        );
        Context::new().with_remote_span_context(span_context)
    }

    fn install() {
        global::set_text_map_propagator(w3c::TraceContext);
    }

    fn assert_same_span(restored: &Context) {
        let original = sample_context();
        let expected = original.span().span_context().clone();
        let actual = restored.span().span_context().clone();
        assert_eq!(actual.trace_id(), expected.trace_id());
        assert_eq!(actual.span_id(), expected.span_id());
        assert!(actual.is_sampled());
        assert!(actual.is_remote());
        assert_eq!(actual.trace_state().get("vendor"), Some("opaque"));
    }

    #[test]
    fn http_headers_round_trip() {
        install();
        let mut headers = reqwest::header::HeaderMap::new();
        inject(&sample_context(), &mut HttpHeaderInjector(&mut headers));
        // Sampled, and random: a span context that did not arrive through a `traceparent` is one of ours.
        assert_eq!(
            headers["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03"
        );
        assert_same_span(&extract(&HttpHeaderExtractor(&headers)));
    }

    #[test]
    fn actix_headers_extract() {
        install();
        let mut headers = actix_web::http::header::HeaderMap::new();
        headers.insert(
            actix_web::http::header::HeaderName::from_static("traceparent"),
            actix_web::http::header::HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        );
        headers.insert(
            actix_web::http::header::HeaderName::from_static("tracestate"),
            actix_web::http::header::HeaderValue::from_static("vendor=opaque"),
        );
        assert_same_span(&extract(&ActixHeaderExtractor(&headers)));
    }

    #[test]
    fn nats_headers_round_trip() {
        install();
        let mut headers = async_nats::HeaderMap::new();
        inject(&sample_context(), &mut NatsHeaderInjector(&mut headers));
        assert!(headers.get("traceparent").is_some());
        assert_same_span(&extract(&NatsHeaderExtractor(&headers)));
    }

    #[test]
    fn serialized_context_round_trip_through_json() {
        install();
        let captured = SerializedContext::capture(&sample_context());
        let json = serde_json::to_string(&captured).unwrap();
        let back: SerializedContext = serde_json::from_str(&json).unwrap();
        assert_same_span(&back.restore());
    }

    #[test]
    fn garbage_traceparent_yields_no_parent() {
        install();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("traceparent", "00-zzzz-not-a-trace-01");
        let context = extract(&NatsHeaderExtractor(&headers));
        assert!(!context.span().span_context().is_valid());
    }

    /// Beneath a span whose trace was sampled out, nothing is built, and nothing is made current when a
    /// span is entered: the context to propagate comes from the nearest span the layer built, the one that
    /// received the decision, however deep the span asking for it is.
    #[test]
    fn a_span_beneath_a_sampled_out_span_propagates_its_trace_id_and_the_decision() {
        let (dispatch, _guard) =
            crate::setup::dispatch_with_exporter("test", Some(crate::testing::Keep::default()));
        tracing::dispatcher::with_default(&dispatch, || {
            let upstream = SpanContext::new(
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                TraceFlags::default(),
                true,
                TraceState::default(),
            );
            let request = tracing::info_span!("request");
            set_remote_parent(&request, Context::new().with_remote_span_context(upstream));
            let _request = request.enter();
            let statement = tracing::info_span!("statement");
            let _statement = statement.enter();
            // A span the logs want and the OpenTelemetry layer never does (a transport crate's), deeper still.
            let detail = tracing::info_span!(target: "tracing_actix_web", "detail");
            let _detail = detail.enter();

            let mut headers = reqwest::header::HeaderMap::new();
            inject(
                &context_of(&tracing::Span::current()),
                &mut HttpHeaderInjector(&mut headers),
            );
            let traceparent = headers["traceparent"].to_str().unwrap();
            assert!(
                traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{traceparent}"
            );
            let flags = u8::from_str_radix(&traceparent[traceparent.len() - 2..], 16).unwrap();
            assert_eq!(flags & 1, 0, "not sampled: {traceparent}");
            assert!(!traceparent.contains("00f067aa0ba902b7"), "{traceparent}");
        });
    }

    /// A span the layer does not want, inside a traced one, propagates the traced span's context.
    #[test]
    fn a_span_the_layer_does_not_build_propagates_its_nearest_traced_ancestor() {
        let (dispatch, _guard) =
            crate::setup::dispatch_with_exporter("test", Some(crate::testing::Keep::default()));
        tracing::dispatcher::with_default(&dispatch, || {
            let request = tracing::info_span!("request");
            let _request = request.enter();
            let detail = tracing::info_span!(target: "tracing_actix_web", "detail");
            let _detail = detail.enter();
            assert_eq!(tracing::Span::current().id(), detail.id());
            let own = request.context().span().span_context().clone();
            assert!(own.is_valid() && own.is_sampled());
            let found = context_of(&tracing::Span::current());
            assert_eq!(found.span().span_context(), &own);
        });
    }
}
