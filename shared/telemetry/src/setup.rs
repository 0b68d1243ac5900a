//! Telemetry set-up: traces to an OTLP collector, logs to stdout, both correlated by trace id.
//!
//! Configuration is the standard OpenTelemetry environment, so the same binary works against the embedded
//! collector, a Jaeger all-in-one or an OpenTelemetry Collector without code changes:
//!
//! | variable | effect |
//! | --- | --- |
//! | `OTEL_SERVICE_NAME` | `service.name` (defaults to the service's own name) |
//! | `OTEL_RESOURCE_ATTRIBUTES` | extra resource attributes (`key=value,...`) |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | collector address |
//! | `OTEL_EXPORTER_OTLP_PROTOCOL` | `http/protobuf` (default, as the specification asks) or `grpc` |
//! | `OTEL_EXPORTER_OTLP_HEADERS` / `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` / `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` | extra request headers, request timeout |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | sampling (default `parentbased_always_on`) |
//! | `OTEL_SDK_DISABLED` | `true`: no spans at all (so no context propagation either); logs stay |
//! | `OTEL_BSP_*` | batch span processor queue, batch size, delay, timeout (with the spool: delay and batch size) |
//! | `TRACEHOP_SPAN_SPOOL` | a directory: spans go through a spool file there, so a killed process's spans are exported by its successor or a sibling ([`spool`](self#the-span-spool)) |
//! | `OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT`, `OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT` | longest string attribute value exported (default [`DEFAULT_VALUE_LENGTH_LIMIT`]) |
//! | `RUST_LOG` | log filter (default `info`, and `warn` for `h2`, `hyper`, `tonic`, `tower`, `opentelemetry`); spans are not affected by it |
//! | `LOG_FORMAT` | `json` (default) or `text` |
//! | `TRACEHOP_FLOOR_TRACER` | only in a build with the `floor-tracer` feature (a measurement build, never the default): spans built by these layers and dropped, nothing exported ([`RecordNothing`]) |
//!
//! Export runs on the batch processor's own thread: an unreachable collector costs a full queue and dropped
//! spans (counted and logged at shutdown), never a slower or failed request.
//!
//! # The span spool
//!
//! With `TRACEHOP_SPAN_SPOOL` set, a span processor of our own takes the batch processor's place: each
//! process writes its finished spans (one `write(2)` per local tree) to a file under that directory before
//! they are exported, and writes a span whose context leaves the process before it leaves. Processes
//! sharing the directory (the replicas on one host, or a container and its restarted successor on one
//! volume) export the spool of one that died. See `spool.rs` for the mechanism and its limits.
//!
//! With OTLP/HTTP (the default protocol) the spool's export thread sends its own requests, written straight
//! from the spool's records (`spool/otlp.rs`, `otlp_http.rs`): a span is encoded once, when it ends, and is
//! never rebuilt as the SDK's `SpanData` and converted again to be exported. With gRPC, and for a dead
//! process's spool, the records are decoded and handed to `opentelemetry-otlp`'s exporter.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use opentelemetry::propagation::TextMapCompositePropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{KeyValue, global};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::BaggagePropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

mod export;
mod floor;
mod json_log;
mod otlp_http;
mod spool;

pub use export::{DEFAULT_VALUE_LENGTH_LIMIT, ExportCounts};
pub use floor::{NothingSpan, RecordNothing};
pub use otlp_http::BuildError as OtlpHttpError;
pub use spool::SpoolError;
pub(crate) use spool::expose;

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("could not build the OTLP span exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("unsupported OTEL_EXPORTER_OTLP_PROTOCOL {0:?} (use grpc or http/protobuf)")]
    Protocol(String),
    #[error("a global tracing subscriber is already installed: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    OtlpHttp(#[from] OtlpHttpError),
    #[error("building the OTLP span exporter panicked")]
    Panicked,
}

/// Keeps the tracer provider alive; [`TelemetryGuard::shutdown`] flushes what is still queued.
///
/// Shut down *after* the HTTP server and the consumers have drained, so that the spans of the last requests
/// are exported too.
#[must_use = "dropping the guard without shutdown loses the last spans"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    counts: Arc<ExportCounts>,
}

impl TelemetryGuard {
    /// Flushes and stops the exporter. Runs the blocking shutdown on the blocking pool, because the gRPC
    /// exporter's connection is driven by the very runtime we would otherwise block.
    pub async fn shutdown(mut self) {
        if let Some(provider) = self.provider.take() {
            let outcome = tokio::task::spawn_blocking(move || {
                provider.shutdown_with_timeout(Duration::from_secs(5))
            })
            .await;
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(error)) => eprintln!("telemetry shutdown: {error}"),
                Err(error) => eprintln!("telemetry shutdown task failed: {error}"),
            }
            // (Spans dropped because the queue was full are reported by the SDK itself at shutdown.)
            tracing::info!(
                spans_exported = self.counts.exported.load(Ordering::Relaxed),
                spans_failed = self.counts.failed.load(Ordering::Relaxed),
                export_warnings = self.counts.warnings.load(Ordering::Relaxed),
                "telemetry flushed"
            );
        }
    }

    /// Whether spans are exported (false when `OTEL_SDK_DISABLED=true`).
    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }
}

/// Installs the global propagators, tracer provider and `tracing` subscriber for one service.
///
/// `default_service_name` is used when `OTEL_SERVICE_NAME` is not set. Must be called from inside the
/// service's Tokio runtime (with `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`, the exporter spawns its connection task
/// there).
pub fn init(default_service_name: &'static str) -> Result<TelemetryGuard, TelemetryError> {
    // Before the exporter: the http/protobuf exporter builds its reqwest client right away.
    crate::http::client::install_crypto_provider();
    // A measurement build only (`--features tracehop-telemetry/floor-tracer`, never the default): every span
    // built by the layers the services run and dropped, nothing exported (BENCHMARKS.md, section 23).
    #[cfg(feature = "floor-tracer")]
    if std::env::var_os("TRACEHOP_FLOOR_TRACER").is_some() {
        dispatch_with_tracer(RecordNothing::default()).try_init()?;
        tracing::warn!("TRACEHOP_FLOOR_TRACER: spans are built and dropped, nothing is exported");
        return Ok(TelemetryGuard {
            provider: None,
            counts: Arc::default(),
        });
    }
    let spool_dir = std::env::var("TRACEHOP_SPAN_SPOOL")
        .ok()
        .filter(|dir| !dir.trim().is_empty());
    // OTLP/HTTP (the default protocol) with the spool: this process's spans are sent straight from the
    // spool's records, so `opentelemetry-otlp`'s exporter is only needed to adopt a dead process's spool,
    // and is built then. (Nothing is sent with OTEL_SDK_DISABLED: no client then.)
    let direct = !sdk_disabled() && spool_dir.is_some() && protocol().trim() == "http/protobuf";
    let exporter = if sdk_disabled() {
        None
    } else if direct {
        // Built once all the same, so that an environment it refuses (an endpoint that is not a URL,
        // compression) stops the service at start rather than at the first adoption; dropped on the thread
        // that built it (a blocking client may not be dropped on the async runtime `init` runs on).
        std::thread::spawn(|| span_exporter().map(drop))
            .join()
            .map_err(|_| TelemetryError::Panicked)??;
        Some(ServiceExporter::Direct)
    } else {
        Some(ServiceExporter::Otlp(Box::new(span_exporter()?)))
    };
    let spool = match spool_dir {
        Some(dir) => Some(Spool {
            dir: dir.into(),
            make_exporter: Box::new(|| {
                span_exporter()
                    .ok()
                    .map(|exporter| ServiceExporter::Otlp(Box::new(exporter)))
            }),
            direct: if direct {
                Some(otlp_http::OtlpHttp::from_env()?)
            } else {
                None
            },
        }),
        None => None,
    };
    let (dispatch, guard) = dispatch(default_service_name, exporter, spool)?;
    dispatch.try_init()?;
    if !guard.is_exporting() {
        tracing::info!("OTEL_SDK_DISABLED=true: spans are not exported");
    }
    Ok(guard)
}

/// The subscriber [`init`] installs, built around `exporter` (`None`: logs only, as with
/// `OTEL_SDK_DISABLED=true`), without installing it. Sets the global propagator and, with an exporter, the
/// global tracer provider.
///
/// For benchmarks and tests that compare traced and untraced code in one process
/// (`tracing::dispatcher::with_default`), with the very layers and filters the services run with.
pub fn dispatch_with_exporter<E>(
    default_service_name: &'static str,
    exporter: Option<E>,
) -> (tracing::Dispatch, TelemetryGuard)
where
    E: SpanExporter + 'static,
{
    match dispatch(default_service_name, exporter, None) {
        Ok(made) => made,
        // Only the spool can fail, and there is none.
        Err(error) => unreachable!("{error}"),
    }
}

/// [`dispatch_with_exporter`] with the span spool in `dir` in place of the batch span processor, as a
/// service runs with `TRACEHOP_SPAN_SPOOL=dir`: for benchmarks that measure what the spool costs. A dead
/// process's spool found under `dir` is left where it is (there is no exporter to adopt it with).
///
/// ```no_run
/// use opentelemetry_sdk::error::OTelSdkResult;
/// use opentelemetry_sdk::trace::{SpanData, SpanExporter};
///
/// #[derive(Debug)]
/// struct Discard;
///
/// impl SpanExporter for Discard {
///     async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
///         Ok(())
///     }
/// }
///
/// let dir = std::env::temp_dir().join("tracehop-example-spool");
/// let (dispatch, _guard) = tracehop_telemetry::setup::dispatch_with_spool("example", Discard, &dir)?;
/// tracing::dispatcher::with_default(&dispatch, || tracing::info_span!("work").in_scope(|| ()));
/// # Ok::<(), tracehop_telemetry::setup::SpoolError>(())
/// ```
pub fn dispatch_with_spool<E>(
    default_service_name: &'static str,
    exporter: E,
    dir: &std::path::Path,
) -> Result<(tracing::Dispatch, TelemetryGuard), SpoolError>
where
    E: SpanExporter + 'static,
{
    let spool = Spool {
        dir: dir.to_owned(),
        make_exporter: Box::new(|| None),
        direct: None,
    };
    dispatch(default_service_name, Some(exporter), Some(spool))
}

/// [`dispatch_with_spool`] with this process's spans sent as a service sends them with OTLP/HTTP (the
/// default protocol): export requests written straight from the spool's records and posted to `endpoint`,
/// the full URL (`http://host:port/v1/traces`). For benchmarks that measure the whole export path.
///
/// ```no_run
/// let dir = std::env::temp_dir().join("tracehop-example-spool");
/// let (dispatch, _guard) = tracehop_telemetry::setup::dispatch_with_spool_to(
///     "example",
///     "http://127.0.0.1:4318/v1/traces",
///     &dir,
/// )?;
/// tracing::dispatcher::with_default(&dispatch, || tracing::info_span!("work").in_scope(|| ()));
/// # Ok::<(), tracehop_telemetry::setup::TelemetryError>(())
/// ```
pub fn dispatch_with_spool_to(
    default_service_name: &'static str,
    endpoint: &str,
    dir: &std::path::Path,
) -> Result<(tracing::Dispatch, TelemetryGuard), TelemetryError> {
    crate::http::client::install_crypto_provider();
    let spool = Spool {
        dir: dir.to_owned(),
        make_exporter: Box::new(|| None),
        direct: Some(otlp_http::OtlpHttp::to(endpoint)?),
    };
    Ok(dispatch(
        default_service_name,
        Some(ServiceExporter::Direct),
        Some(spool),
    )?)
}

/// The span exporter a service exports through: `opentelemetry-otlp`'s, or none when the span spool sends
/// this process's spans itself over OTLP/HTTP ([`spool::Direct`]), and nothing is ever handed to it.
#[derive(Debug)]
enum ServiceExporter {
    Otlp(Box<opentelemetry_otlp::SpanExporter>),
    Direct,
}

impl SpanExporter for ServiceExporter {
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        match self {
            Self::Otlp(exporter) => exporter.export(batch).await,
            // Unreachable by design; should it ever be reached, the spans are counted as failed, not lost
            // in silence.
            Self::Direct => Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                "spans handed to the exporter of a spool that sends its own".to_owned(),
            )),
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        match self {
            Self::Otlp(exporter) => exporter.shutdown_with_timeout(timeout),
            Self::Direct => Ok(()),
        }
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        match self {
            Self::Otlp(exporter) => exporter.force_flush(),
            Self::Direct => Ok(()),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        if let Self::Otlp(exporter) = self {
            exporter.set_resource(resource);
        }
    }
}

/// Where the spool goes, how to make an exporter for a dead process's spans, and the OTLP/HTTP client this
/// process's own spans are sent with (`None`: through the exporter).
struct Spool<E> {
    dir: std::path::PathBuf,
    make_exporter: Box<dyn Fn() -> Option<E> + Send>,
    direct: Option<otlp_http::OtlpHttp>,
}

fn dispatch<E>(
    default_service_name: &'static str,
    exporter: Option<E>,
    spool: Option<Spool<E>>,
) -> Result<(tracing::Dispatch, TelemetryGuard), SpoolError>
where
    E: SpanExporter + 'static,
{
    crate::http::client::install_crypto_provider();
    global::set_text_map_propagator(propagator());

    let Some(exporter) = exporter else {
        let guard = TelemetryGuard {
            provider: None,
            counts: Arc::default(),
        };
        return Ok((
            tracing_subscriber::registry().with(log_layer()).into(),
            guard,
        ));
    };

    let counts = Arc::new(ExportCounts::default());
    let value_limit = export::value_length_limit();
    let exporter = export::GuardedExporter {
        inner: exporter,
        counts: counts.clone(),
        value_limit,
    };
    let builder = SdkTracerProvider::builder().with_resource(resource(default_service_name));
    let provider = match spool {
        None => builder.with_batch_exporter(exporter),
        Some(Spool {
            dir,
            make_exporter,
            direct,
        }) => {
            let service = std::env::var("OTEL_SERVICE_NAME")
                .unwrap_or_else(|_| default_service_name.to_owned());
            let direct = direct.map(|http| spool::Direct {
                http,
                counts: counts.clone(),
                value_limit,
            });
            let counts = counts.clone();
            let make_exporter = move || {
                make_exporter().map(|inner| export::GuardedExporter {
                    inner,
                    counts: counts.clone(),
                    value_limit,
                })
            };
            builder.with_span_processor(spool::SpoolProcessor::start(
                &dir,
                &service,
                exporter,
                make_exporter,
                spool::Settings::from_env(),
                direct,
            )?)
        }
    }
    .build();
    let tracer = provider.tracer("tracehop");
    global::set_tracer_provider(provider.clone());

    let dispatch = layered(tracer);
    let guard = TelemetryGuard {
        provider: Some(provider),
        counts,
    };
    Ok((dispatch, guard))
}

/// The subscriber the services install ([`init`]), with `tracer` in place of the SDK's: the same JSON logs,
/// the same OpenTelemetry layer with the same options and filter. Sets the global propagator; spans go
/// wherever `tracer` puts them.
///
/// For measuring what the `tracing` side of a span costs apart from the SDK and any span processor (with
/// [`RecordNothing`]: the criterion bench's `floor` mode).
///
/// ```
/// let dispatch = tracehop_telemetry::setup::dispatch_with_tracer(opentelemetry::trace::noop::NoopTracer::new());
/// tracing::dispatcher::with_default(&dispatch, || tracing::info_span!("work").in_scope(|| ()));
/// ```
pub fn dispatch_with_tracer<T>(tracer: T) -> tracing::Dispatch
where
    T: opentelemetry::trace::Tracer + Send + Sync + 'static,
    T::Span: Send + Sync + 'static,
{
    global::set_text_map_propagator(propagator());
    layered(tracer)
}

/// The logs' layer and the OpenTelemetry layer around `tracer`, on a registry.
fn layered<T>(tracer: T) -> tracing::Dispatch
where
    T: opentelemetry::trace::Tracer + Send + Sync + 'static,
    T::Span: Send + Sync + 'static,
{
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_error_records_to_exceptions(true)
        .with_tracked_inactivity(false)
        .with_threads(false)
        // A span's OpenTelemetry context is not made current each time the span is entered: an async
        // span is entered at every poll, and each entry cost an attach and a detach (a lock, two stacks
        // on the thread). Nothing here reads the current context to find a span's parent: the layer
        // takes it from the registry (the current `tracing` span), and `propagation::context_of` from
        // the nearest ancestor the layer built (BENCHMARKS.md, section 20).
        .with_context_activation(false)
        // No `target` and `code.*` attributes (four per span): the span's name says where it comes from, and
        // every attribute is paid for in building, exporting and storing each span (README, deviations).
        .with_target(false)
        .with_location(false)
        .with_filter(SpanWorthy);
    tracing_subscriber::registry()
        .with(log_layer())
        .with(otel_layer)
        .into()
}

/// The logs: JSON lines (or text with `LOG_FORMAT=text`) on standard output, filtered by `RUST_LOG`.
fn log_layer() -> Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync> {
    let directives = log_directives();
    if crate::config::env_or("LOG_FORMAT", "json") == "text" {
        tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_filter(env_filter(&directives))
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .event_format(json_log::JsonWithTraceIds)
            // The JSON lines carry the span's name and ids, never its fields: formatting every span's
            // fields into a string (the fmt layer's default) cost about 1 µs per span for nothing.
            .fmt_fields(json_log::NoSpanFields)
            .with_filter(json_log_filter(&directives))
            .boxed()
    }
}

/// `RUST_LOG`, or the default directives when it is unset or empty.
///
/// `RUST_LOG` filters the *logs* only. Spans are never switched off by a quieter log level: the trace must
/// not depend on how chatty the logs are (a `RUST_LOG=warn` once meant no traces at all).
fn log_directives() -> String {
    // Unset or empty: the default (an empty `EnvFilter` would let nothing through).
    std::env::var("RUST_LOG")
        .ok()
        .filter(|directives| !directives.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_LOG_DIRECTIVES.to_owned())
}

/// The logs' directives when `RUST_LOG` is unset or empty.
const DEFAULT_LOG_DIRECTIVES: &str =
    "info,h2=warn,hyper=warn,tonic=warn,tower=warn,opentelemetry=warn";

/// `directives` as an `EnvFilter`, or the default directives when it cannot read them.
fn env_filter(directives: &str) -> EnvFilter {
    EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_DIRECTIVES))
}

/// The JSON lines' filter: `directives` for events and spans, and beside them every span the trace may have
/// ([`TraceableSpans`]), whatever the level, so that a line names the span it was written in and carries
/// its ids (`RUST_LOG=warn` once left every warning without a trace id, its spans being below the level).
///
/// Directives that are only targets and levels (what `RUST_LOG` nearly always is) are read as `Targets`, a
/// filter decided once per callsite: `EnvFilter` also keeps a map of spans, looked up under a lock at every
/// entry, exit, record and close of every span (BENCHMARKS.md, section 22). Anything else (span and field
/// directives) keeps `EnvFilter`.
fn json_log_filter<S>(
    directives: &str,
) -> Box<dyn tracing_subscriber::layer::Filter<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'lookup> tracing_subscriber::registry::LookupSpan<'lookup>,
{
    match json_log::simple_targets(directives) {
        Some(targets) => targets.or(TraceableSpans).boxed(),
        None => env_filter(directives).or(TraceableSpans).boxed(),
    }
}

/// The propagator every tracehop process installs: strict W3C Trace Context ([`crate::propagation::w3c`])
/// and W3C Baggage.
pub fn propagator() -> TextMapCompositePropagator {
    TextMapCompositePropagator::new(vec![
        Box::new(crate::propagation::w3c::TraceContext),
        Box::new(BaggagePropagator::new()),
    ])
}

/// The OpenTelemetry layer's filter. Whether a callsite is worth a span at all ([`span_worthy`]) is told to
/// `tracing` once per callsite, so the callsites nobody wants cost nothing. What is left is decided per
/// span: nothing is built inside a trace that was sampled out, whose nearest traced ancestor carries the
/// [`SampledOut`] mark ([`note_sampling`]), or whose context was handed to this thread unsampled. Such a span still exists for the logs (and its trace id is in
/// them, [`crate::propagation::context_of`]); it only costs the OpenTelemetry layer nothing.
struct SpanWorthy;

/// The mark of a span whose trace was sampled out (see [`note_sampling`]).
struct SampledOut;

impl<S> tracing_subscriber::layer::Filter<S> for SpanWorthy
where
    S: tracing::Subscriber + for<'lookup> tracing_subscriber::registry::LookupSpan<'lookup>,
{
    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        context: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        // Asked whenever another layer (the logs) wants the callsite, so the callsite's own rule first.
        if !span_worthy(metadata) {
            return false;
        }
        // `lookup_current` sees the spans this layer traced only: the nearest traced ancestor on this thread.
        match context.lookup_current() {
            Some(span) => span.extensions().get::<SampledOut>().is_none(),
            // None on this thread (work handed to another thread, which carries the context it was given,
            // as `db::Database::run` does): the current OpenTelemetry context decides.
            None => opentelemetry::Context::map_current(|current| {
                let span = current.span();
                let span_context = span.span_context();
                !span_context.is_valid() || span_context.is_sampled()
            }),
        }
    }

    fn callsite_enabled(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if span_worthy(metadata) {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::never()
        }
    }
}

/// The JSON logs' filter for spans, beside `RUST_LOG`'s: every span the trace may have ([`span_worthy`]),
/// decided once per callsite. These spans exist anyway (the OpenTelemetry layer wants them), so the logs
/// seeing them costs the fmt layer's bookkeeping per span and nothing else.
struct TraceableSpans;

impl<S> tracing_subscriber::layer::Filter<S> for TraceableSpans {
    fn enabled(
        &self,
        metadata: &tracing::Metadata<'_>,
        _: &tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        metadata.is_span() && span_worthy(metadata)
    }

    fn callsite_enabled(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if metadata.is_span() && span_worthy(metadata) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::INFO)
    }
}

/// Takes the sampling decision for `span` now, and if its trace is sampled out, marks it so that the
/// OpenTelemetry layer builds nothing beneath it: a sampled-out request then costs one span per process it
/// crosses (the one that receives the decision) instead of one per span. Call it on a span that starts a
/// process's part of a trace, once its parent is set: tracehop's own helpers do (the HTTP server span,
/// [`crate::propagation::set_remote_parent`], so the consumer and actor spans). Without the OpenTelemetry
/// layer (`OTEL_SDK_DISABLED=true`) it does nothing.
///
/// ```
/// let span = tracing::info_span!("job");
/// tracehop_telemetry::setup::note_sampling(&span);
/// ```
pub fn note_sampling(span: &tracing::Span) {
    use tracing_subscriber::registry::LookupSpan;
    // Asking for the context starts the OpenTelemetry span, and the sampler decides.
    let context = span.context();
    let started = context.span();
    let span_context = started.span_context();
    if !span_context.is_valid() || span_context.is_sampled() {
        return;
    }
    span.with_subscriber(|(id, dispatch)| {
        if let Some(data) = dispatch
            .downcast_ref::<tracing_subscriber::Registry>()
            .and_then(|registry| registry.span(id))
        {
            data.extensions_mut().replace(SampledOut);
        }
    });
}

/// What becomes part of a trace: spans at INFO and above, and on them events at WARN and above (errors
/// become exceptions), from any crate but the transport and telemetry crates below. The decision is by a
/// span's origin, not by a list of the services: a new service's spans are exported without a change here.
///
/// The transport crates are left out because their spans describe their own machinery, once per message
/// or frame (the NATS client's per-message spans cost more than they tell), and the telemetry crates because
/// an exporter that traced itself would feed on its own output.
fn span_worthy(metadata: &tracing::Metadata<'_>) -> bool {
    const MACHINERY: [&str; 11] = [
        "async_nats",
        "h2",
        "hyper",
        "hyper_util",
        "reqwest",
        "tonic",
        "tower",
        "opentelemetry",
        "opentelemetry_sdk",
        "opentelemetry_otlp",
        "tracing_actix_web",
    ];
    let target = metadata.target();
    let from_machinery = MACHINERY.iter().any(|name| {
        target
            .strip_prefix(name)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    });
    let threshold = if metadata.is_span() {
        tracing::Level::INFO
    } else {
        tracing::Level::WARN
    };
    !from_machinery && *metadata.level() <= threshold
}

fn sdk_disabled() -> bool {
    std::env::var("OTEL_SDK_DISABLED").is_ok_and(|value| value.trim().eq_ignore_ascii_case("true"))
}

/// `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`, else `http/protobuf`.
fn protocol() -> String {
    std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        // The specification's default. It is also the lighter one here: with the spool its requests are
        // written straight from the records (BENCHMARKS.md, section 17), its client runs beside the span
        // export thread, where gRPC's connection runs on the service's own runtime, and each service holds
        // less memory with it (section 12).
        .unwrap_or_else(|_| "http/protobuf".to_owned())
}

fn span_exporter() -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    let protocol = protocol();
    let exporter = match protocol.trim() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_protocol(Protocol::Grpc)
            .build()?,
        "http/protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .build()?,
        other => return Err(TelemetryError::Protocol(other.to_owned())),
    };
    Ok(exporter)
}

/// An OTLP/gRPC span exporter to `endpoint` (`http://host:port`), for tools that start their own collector
/// (`stack bench`); services use the `OTEL_EXPORTER_OTLP_*` environment through [`init`].
pub fn otlp_grpc_exporter(
    endpoint: &str,
) -> Result<opentelemetry_otlp::SpanExporter, TelemetryError> {
    Ok(opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_protocol(Protocol::Grpc)
        .with_endpoint(endpoint)
        .build()?)
}

fn resource(default_service_name: &'static str) -> Resource {
    // The default detectors already read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; only fall back to the
    // built-in name when the operator did not choose one.
    let mut builder = Resource::builder().with_attributes([
        // The same id that names this replica's leases in the database (`claimed_by`).
        KeyValue::new("service.instance.id", crate::service::instance_id()),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    ]);
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        builder = builder.with_service_name(default_service_name);
    }
    builder.build()
}

/// The trace id of the current span as 32 lowercase hex digits (all zeros when there is none).
pub fn current_trace_id() -> String {
    crate::propagation::context_of(&tracing::Span::current())
        .span()
        .span_context()
        .trace_id()
        .to_string()
}

/// Logs a failure's detail (a driver's or a server's text, which can quote SQL, values, addresses or
/// internal URLs) for the service's log only. The event has no parent span, so the OpenTelemetry layer
/// never turns it into a span event; it carries the current trace id as a field, so the log line and the
/// trace still find each other. Spans get a code instead (`error.type`, a status, an error code).
///
/// ```
/// tracehop_telemetry::setup::log_detail("query failed", &"duplicate key value violates ...");
/// ```
pub fn log_detail(what: &str, detail: &dyn std::fmt::Display) {
    tracing::warn!(parent: None, trace_id = %current_trace_id(), detail = %detail, "{what}");
}

/// An unsigned count or size as the `int` attribute the conventions ask for. (`tracing-opentelemetry`
/// exports a `u64` field as text; an `i64` stays a number.) Saturates at `i64::MAX`.
///
/// ```
/// assert_eq!(tracehop_telemetry::setup::int_attribute(42_usize), 42_i64);
/// assert_eq!(tracehop_telemetry::setup::int_attribute(u64::MAX), i64::MAX);
/// ```
pub fn int_attribute<T: TryInto<i64>>(value: T) -> i64 {
    value.try_into().unwrap_or(i64::MAX)
}
