//! The embedded trace backend: OTLP in, Jaeger UI and query API out, all in memory.
//!
//! Spans go into [`otlp_embedded`]'s store. On the way in, each span gets the tags real Jaeger derives from
//! OTLP (`span.kind`, `otel.status_code`, `otel.status_description`, `error`, `w3c.tracestate`), so the UI shows kinds and
//! errors, and code reading the query API (the waterfall, the tests) works the same against real Jaeger.
//!
//! What a real deployment would put in an OpenTelemetry Collector (docker compose does) happens here too:
//! - [`metrics`]: span metrics (the RED set, as the `spanmetrics` connector names them) and trace
//!   completeness on `GET /metrics` of the UI port;
//! - [`sampling`]: each trace decided once it is whole, late NATS consumers included; with tail sampling on,
//!   every error and slow trace kept and a share of the rest;
//! - [`search`]: Jaeger's `GET /api/traces` search with its real parameters (the embedded store's own
//!   search knows only service, operation and limit).

pub mod metrics;
pub mod sampling;
pub mod search;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use otlp_embedded::proto::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use otlp_embedded::proto::common::v1::{AnyValue, KeyValue, any_value};
use otlp_embedded::proto::trace::v1::ResourceSpans;
use otlp_embedded::{Config, State, StateRef, TraceService, TraceServiceImpl, TraceServiceServer};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use self::metrics::SpanMetrics;
use self::sampling::{TailPolicy, Tracker};
use self::search::SearchIndex;

/// Traces held (the store's bound, and the search index's).
pub const MAX_TRACES: usize = 50_000;

/// What the collector does with the spans it receives.
#[derive(Debug, Clone)]
pub enum Storage {
    /// Decode and count them, then drop them: a collector that costs the machine almost nothing, for
    /// measuring what tracing costs the *services* (`stack bench`).
    Count,
    /// Keep them (all, or as the tail-sampling policy decides), with metrics and search.
    Keep(TailPolicy),
}

/// What the OTLP receivers, the decision task and the UI's own routes share.
#[derive(Clone)]
pub struct Shared {
    state: StateRef,
    index: Arc<Mutex<SearchIndex>>,
    tracker: Arc<Mutex<Tracker>>,
    metrics: Arc<SpanMetrics>,
}

impl Shared {
    /// Indexes `parts` and puts them in the store.
    async fn store(&self, parts: Vec<ResourceSpans>) {
        if parts.is_empty() {
            return;
        }
        if let Ok(mut index) = self.index.lock() {
            index.add(&parts);
        }
        let request = ExportTraceServiceRequest {
            resource_spans: parts,
        };
        // The store's own export only takes the write lock and applies: it cannot fail.
        let _ = TraceServiceImpl::new(self.state.clone())
            .export(tonic::Request::new(request))
            .await;
    }

    fn pending(&self) -> usize {
        self.tracker.lock().map(|t| t.pending()).unwrap_or(0)
    }
}

/// The `service.name` of the resource that sent `part` (`unknown_service`, the SDKs' default, without one).
pub(crate) fn service_name(part: &ResourceSpans) -> String {
    part.resource
        .as_ref()
        .and_then(|resource| {
            resource
                .attributes
                .iter()
                .find(|kv| kv.key == "service.name")
        })
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(name) => Some(name.clone()),
            _ => None,
        })
        .unwrap_or_else(|| "unknown_service".to_owned())
}

/// The OTLP span kind as Jaeger's `span.kind` tag names it.
pub(crate) fn span_kind_name(kind: i32) -> &'static str {
    match kind {
        1 => "internal",
        2 => "server",
        3 => "client",
        4 => "producer",
        5 => "consumer",
        _ => "unspecified",
    }
}

/// The `collector.warning` tag of a span received with an end before its start (stored with end = start).
pub const END_BEFORE_START: &str =
    "the span ended before it started; stored with its end at its start";

/// Where the collector listens.
#[derive(Debug, Clone, Copy)]
pub struct CollectorAddresses {
    pub otlp_grpc: SocketAddr,
    pub otlp_http: SocketAddr,
    pub ui: SocketAddr,
}

/// A running collector; stops when dropped.
pub struct Collector {
    pub addresses: CollectorAddresses,
    shared: Shared,
    received: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Collector {
    /// Binds all three listeners (port 0 picks free ports) and serves in the background.
    pub async fn start(requested: CollectorAddresses, storage: Storage) -> anyhow::Result<Self> {
        let grpc_listener = TcpListener::bind(requested.otlp_grpc)
            .await
            .with_context(|| format!("OTLP gRPC port {} is in use", requested.otlp_grpc))?;
        let http_listener = TcpListener::bind(requested.otlp_http)
            .await
            .with_context(|| format!("OTLP HTTP port {} is in use", requested.otlp_http))?;
        let ui_listener = TcpListener::bind(requested.ui)
            .await
            .with_context(|| format!("Jaeger UI port {} is in use", requested.ui))?;
        let addresses = CollectorAddresses {
            otlp_grpc: grpc_listener.local_addr()?,
            otlp_http: http_listener.local_addr()?,
            ui: ui_listener.local_addr()?,
        };
        let state = State::new(Config {
            // Bounded by trace count only: otlp-embedded 0.0.2 adds a trace's whole size again on every
            // batch that extends it, so its memory estimate grows much faster than real use and, under load,
            // evicted every trace (found by `stack bench`). 50 000 traces of ~35 spans is ~2 GB at most.
            max_length: MAX_TRACES as u32,
            max_memory_usage: usize::MAX >> 1,
        });
        let (store, policy) = match storage {
            Storage::Count => (false, TailPolicy::default()),
            Storage::Keep(policy) => (true, policy),
        };
        let shared = Shared {
            state: state.clone(),
            index: Arc::new(Mutex::new(SearchIndex::new(MAX_TRACES))),
            tracker: Arc::new(Mutex::new(Tracker::new(policy))),
            metrics: Arc::new(SpanMetrics::default()),
        };

        let received = Arc::new(AtomicU64::new(0));
        let grpc_service =
            TraceServiceServer::new(Enriching::new(shared.clone(), store, received.clone()))
                .max_decoding_message_size(32 << 20);
        let grpc = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(grpc_listener);
            if let Err(error) = tonic::transport::Server::builder()
                .add_service(grpc_service)
                .serve_with_incoming(incoming)
                .await
            {
                eprintln!("collector: OTLP gRPC server stopped: {error}");
            }
        });

        let http_shared = shared.clone();
        let http_received = received.clone();
        let http_app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(move |body: bytes::Bytes| {
                    let service = Enriching::new(http_shared.clone(), store, http_received.clone());
                    async move { export_http(&service, body).await }
                }),
            )
            .layer(axum::extract::DefaultBodyLimit::max(32 << 20));
        let http = tokio::spawn(async move {
            if let Err(error) = axum::serve(http_listener, http_app).await {
                eprintln!("collector: OTLP HTTP server stopped: {error}");
            }
        });

        // Our routes first; everything else (the UI, a trace by id, services, operations) is the store's.
        let ui_app = axum::Router::new()
            .route("/api/traces", axum::routing::get(search::handler))
            .route(
                "/api/services",
                axum::routing::get(search::services_handler),
            )
            .route("/metrics", axum::routing::get(metrics_handler))
            .with_state(shared.clone())
            .fallback_service(otlp_embedded::ui_app(state.clone(), "/"));
        let ui = tokio::spawn(async move {
            if let Err(error) = axum::serve(ui_listener, ui_app).await {
                eprintln!("collector: Jaeger UI server stopped: {error}");
            }
        });

        let deciding = shared.clone();
        let decide = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let parts = match deciding.tracker.lock() {
                    Ok(mut tracker) => tracker.decide_ready(Instant::now(), &deciding.metrics),
                    Err(_) => Vec::new(),
                };
                deciding.store(parts).await;
            }
        });

        Ok(Self {
            addresses,
            shared,
            received,
            tasks: vec![grpc, http, ui, decide],
        })
    }

    /// Base URL of the Jaeger UI and query API.
    pub fn ui_url(&self) -> String {
        format!("http://{}", self.addresses.ui)
    }

    /// Spans received since start (stored or not).
    pub fn spans_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Number of traces held.
    pub async fn trace_count(&self) -> usize {
        self.shared.state.read().await.len()
    }
}

/// `GET /metrics`: Prometheus text.
async fn metrics_handler(
    axum::extract::State(shared): axum::extract::State<Shared>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        shared.metrics.render(shared.pending()),
    )
        .into_response()
}

/// OTLP/HTTP with protobuf bodies (`OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`).
async fn export_http(service: &Enriching, body: bytes::Bytes) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let request = match ExportTraceServiceRequest::decode(body) {
        Ok(request) => request,
        Err(error) => {
            return (
                StatusCode::BAD_REQUEST,
                format!("invalid OTLP protobuf: {error}"),
            )
                .into_response();
        }
    };
    match service.export(tonic::Request::new(request)).await {
        Ok(response) => (
            [(header::CONTENT_TYPE, "application/x-protobuf")],
            response.into_inner().encode_to_vec(),
        )
            .into_response(),
        Err(status) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            status.message().to_owned(),
        )
            .into_response(),
    }
}

/// Adds the Jaeger-style tags, counts span metrics, and hands the spans to the tracker, storing what it
/// says to store now (or, when not storing, only counts spans).
struct Enriching {
    shared: Shared,
    store: bool,
    received: Arc<AtomicU64>,
}

impl Enriching {
    fn new(shared: Shared, store: bool, received: Arc<AtomicU64>) -> Self {
        Self {
            shared,
            store,
            received,
        }
    }
}

fn string_tag(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
    }
}

#[tonic::async_trait]
impl TraceService for Enriching {
    async fn export(
        &self,
        mut request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.received.fetch_add(spans as u64, Ordering::Relaxed);
        if !self.store {
            return Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }));
        }
        for resource_spans in &mut request.get_mut().resource_spans {
            let service = service_name(resource_spans);
            for scope_spans in &mut resource_spans.scope_spans {
                for span in &mut scope_spans.spans {
                    // A span that ends before it starts (a sender's clock stepped back, or a hostile
                    // sender) is kept as lasting nothing, and says so: the store's Jaeger view subtracts
                    // the two unchecked, which overflows.
                    if span.end_time_unix_nano < span.start_time_unix_nano {
                        span.end_time_unix_nano = span.start_time_unix_nano;
                        span.attributes
                            .push(string_tag("collector.warning", END_BEFORE_START));
                    }
                    self.shared.metrics.record(
                        &service,
                        &span.name,
                        span.kind,
                        span.status.as_ref().map(|status| status.code),
                        span.end_time_unix_nano
                            .saturating_sub(span.start_time_unix_nano)
                            as f64
                            / 1e6,
                    );
                    span.attributes
                        .push(string_tag("span.kind", span_kind_name(span.kind)));
                    // As Jaeger's own OTLP translator does, so a span's tracestate can be read back.
                    if !span.trace_state.is_empty() {
                        span.attributes
                            .push(string_tag("w3c.tracestate", span.trace_state.clone()));
                    }
                    if let Some(status) = &span.status {
                        match status.code {
                            1 => span.attributes.push(string_tag("otel.status_code", "OK")),
                            2 => {
                                span.attributes
                                    .push(string_tag("otel.status_code", "ERROR"));
                                span.attributes.push(KeyValue {
                                    key: "error".to_owned(),
                                    value: Some(AnyValue {
                                        value: Some(any_value::Value::BoolValue(true)),
                                    }),
                                });
                                if !status.message.is_empty() {
                                    span.attributes.push(string_tag(
                                        "otel.status_description",
                                        status.message.clone(),
                                    ));
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        let resource_spans = std::mem::take(&mut request.get_mut().resource_spans);
        let now_store = match self.shared.tracker.lock() {
            Ok(mut tracker) => tracker.accept(resource_spans, Instant::now(), &self.shared.metrics),
            Err(_) => resource_spans,
        };
        self.shared.store(now_store).await;
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use otlp_embedded::proto::resource::v1::Resource;
    use otlp_embedded::proto::trace::v1::{ScopeSpans, Span};

    use super::*;

    fn any_port() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// A span whose end is before its start is stored, shown as lasting nothing, with a warning; the
    /// collector keeps serving (the store's Jaeger view used to subtract the two unchecked).
    #[tokio::test]
    async fn a_span_that_ends_before_it_starts_is_kept_as_lasting_nothing() {
        tracehop_telemetry::http::client::install_crypto_provider();
        let addresses = CollectorAddresses {
            otlp_grpc: any_port(),
            otlp_http: any_port(),
            ui: any_port(),
        };
        let collector = Collector::start(addresses, Storage::Keep(TailPolicy::default()))
            .await
            .unwrap();
        let trace_id = [7_u8; 16];
        let span = Span {
            trace_id: trace_id.to_vec(),
            span_id: vec![1; 8],
            name: "backwards".to_owned(),
            kind: 2,
            start_time_unix_nano: 2_000_000_000_000_000_000,
            end_time_unix_nano: 1_000_000_000_000_000_000,
            ..Span::default()
        };
        let request = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        string_tag("service.name", "skewed"),
                        string_tag("service.instance.id", "skewed-1"),
                    ],
                    ..Resource::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans: vec![span],
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        };
        let client = reqwest::Client::new();
        let sent = client
            .post(format!(
                "http://{}/v1/traces",
                collector.addresses.otlp_http
            ))
            .header("content-type", "application/x-protobuf")
            .body(request.encode_to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(sent.status(), 200);

        let hex: String = trace_id.iter().map(|b| format!("{b:02x}")).collect();
        let url = format!("{}/api/traces/{hex}", collector.ui_url());
        let trace: serde_json::Value = client.get(&url).send().await.unwrap().json().await.unwrap();
        let stored = &trace["data"][0]["spans"][0];
        assert_eq!(stored["operationName"], "backwards", "{trace}");
        assert_eq!(stored["duration"], 0, "{trace}");
        assert_eq!(stored["startTime"], 2_000_000_000_000_000_u64, "{trace}");
        let warned = stored["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|tag| tag["key"] == "collector.warning" && tag["value"] == END_BEFORE_START);
        assert!(warned, "{trace}");
        // Still serving.
        let services = client
            .get(format!("{}/api/services", collector.ui_url()))
            .send()
            .await
            .unwrap();
        assert_eq!(services.status(), 200);
    }
}
