//! The embedded trace backend: OTLP in, Jaeger UI and query API out, all in memory.
//!
//! Spans go into [`otlp_embedded`]'s store. On the way in, each span gets the tags real Jaeger derives from
//! OTLP (`span.kind`, `otel.status_code`, `otel.status_description`, `error`, `w3c.tracestate`), so the UI shows kinds and
//! errors, and code reading the query API (the waterfall, the tests) works the same against real Jaeger.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use otlp_embedded::proto::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use otlp_embedded::proto::common::v1::{AnyValue, KeyValue, any_value};
use otlp_embedded::{Config, State, StateRef, TraceService, TraceServiceImpl, TraceServiceServer};
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

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
    state: StateRef,
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
    /// With `store = false` spans are received, decoded and counted, then dropped: a collector that costs
    /// the machine almost nothing, for measuring what tracing costs the *services* (`stack bench`).
    pub async fn start(requested: CollectorAddresses, store: bool) -> anyhow::Result<Self> {
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
            max_length: 50_000,
            max_memory_usage: usize::MAX >> 1,
        });

        let received = Arc::new(AtomicU64::new(0));
        let grpc_service =
            TraceServiceServer::new(Enriching::new(state.clone(), store, received.clone()))
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

        let http_state = state.clone();
        let http_received = received.clone();
        let http_app = axum::Router::new()
            .route(
                "/v1/traces",
                axum::routing::post(move |body: bytes::Bytes| {
                    let service = Enriching::new(http_state.clone(), store, http_received.clone());
                    async move { export_http(&service, body).await }
                }),
            )
            .layer(axum::extract::DefaultBodyLimit::max(32 << 20));
        let http = tokio::spawn(async move {
            if let Err(error) = axum::serve(http_listener, http_app).await {
                eprintln!("collector: OTLP HTTP server stopped: {error}");
            }
        });

        let ui_app = otlp_embedded::ui_app(state.clone(), "/");
        let ui = tokio::spawn(async move {
            if let Err(error) = axum::serve(ui_listener, ui_app).await {
                eprintln!("collector: Jaeger UI server stopped: {error}");
            }
        });

        Ok(Self {
            addresses,
            state,
            received,
            tasks: vec![grpc, http, ui],
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
        self.state.read().await.len()
    }
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

/// Adds the Jaeger-style tags, then stores (or, when not storing, only counts).
struct Enriching {
    inner: TraceServiceImpl,
    store: bool,
    received: Arc<AtomicU64>,
}

impl Enriching {
    fn new(state: StateRef, store: bool, received: Arc<AtomicU64>) -> Self {
        Self {
            inner: TraceServiceImpl::new(state),
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
            for scope_spans in &mut resource_spans.scope_spans {
                for span in &mut scope_spans.spans {
                    let kind = match span.kind {
                        1 => "internal",
                        2 => "server",
                        3 => "client",
                        4 => "producer",
                        5 => "consumer",
                        _ => "unspecified",
                    };
                    span.attributes.push(string_tag("span.kind", kind));
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
        self.inner.export(request).await
    }
}
