//! The actix-web side: a root span per request that follows the HTTP server semantic conventions, takes its
//! parent from the incoming W3C headers, and answers with a `traceresponse` header.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, web};
use opentelemetry::trace::TraceContextExt;
use tracing::Span;
use tracing_actix_web::{RootSpanBuilder, TracingLogger};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::http::error::ApiError;
use crate::propagation::{ActixHeaderExtractor, extract, set_remote_parent};

/// The largest JSON body any tracehop endpoint accepts.
pub const MAX_JSON_BODY_BYTES: usize = 16 * 1024;

/// Root span builder with the stable HTTP server conventions (`http.request.method`, `http.route`,
/// `url.path`, `url.scheme`, `http.response.status_code`, ...). The span is named `{method} {route}`.
pub struct SemconvRootSpan;

impl RootSpanBuilder for SemconvRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let method = request.method().as_str().to_owned();
        let route = request.match_pattern();
        let name = match &route {
            Some(route) => format!("{method} {route}"),
            None => method.clone(),
        };
        let connection = request.connection_info().clone();
        let user_agent = request
            .headers()
            .get(actix_web::http::header::USER_AGENT)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let span = tracing::info_span!(
            "HTTP request",
            otel.name = %name,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = %method,
            http.route = route.as_deref().unwrap_or_default(),
            url.path = %request.path(),
            url.query = request.query_string(),
            url.scheme = %connection.scheme(),
            server.address = %connection.host(),
            client.address = connection.realip_remote_addr().unwrap_or_default(),
            user_agent.original = %user_agent,
            network.protocol.version = ?request.version(),
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        set_remote_parent(&span, extract(&ActixHeaderExtractor(request.headers())));
        span
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        let status = match outcome {
            Ok(response) => response.response().status(),
            Err(error) => error.as_response_error().status_code(),
        };
        span.record("http.response.status_code", status.as_u16());
        // Server spans: only 5xx is an error (a 4xx is the client's fault, not ours).
        if status.is_server_error() {
            span.record("otel.status_code", "ERROR");
            span.record("error.type", status.as_str());
        }
        // One access-log line per request, carrying trace_id/span_id like every other line.
        span.in_scope(|| tracing::info!(status = status.as_u16(), "request finished"));
    }
}

/// The tracing middleware every service wraps its app in.
pub fn tracing_middleware() -> TracingLogger<SemconvRootSpan> {
    TracingLogger::<SemconvRootSpan>::new()
}

/// Adds `traceresponse: 00-{trace-id}-{span-id}-{flags}` (W3C Trace Context Level 2) naming the server span,
/// so whoever holds the response can hand over the trace id. Register it *inside* [`tracing_middleware`]
/// (`.wrap(from_fn(trace_response)).wrap(tracing_middleware())`) so the root span is current.
pub async fn trace_response(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, Error> {
    let context = Span::current().context();
    let span_context = context.span().span_context().clone();
    let mut response = next.call(request).await?;
    if span_context.is_valid() {
        let value = format!(
            "00-{}-{}-{:02x}",
            span_context.trace_id(),
            span_context.span_id(),
            span_context.trace_flags().to_u8()
        );
        if let Ok(value) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static("traceresponse"), value);
        }
    }
    Ok(response)
}

/// JSON extractor limits and errors: a malformed or oversized body is a 400 with `{error, message, traceId}`.
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(MAX_JSON_BODY_BYTES)
        .error_handler(|error, _request| {
            let message = match &error {
                actix_web::error::JsonPayloadError::OverflowKnownLength { .. }
                | actix_web::error::JsonPayloadError::Overflow { .. } => {
                    format!("request body is larger than {MAX_JSON_BODY_BYTES} bytes")
                }
                actix_web::error::JsonPayloadError::ContentType => {
                    "expected Content-Type: application/json".to_owned()
                }
                other => other.to_string(),
            };
            ApiError::bad_request("invalid_body", message).into()
        })
}

/// Path extractor errors (a malformed id in the URL) as JSON 400s.
pub fn path_config() -> web::PathConfig {
    web::PathConfig::default().error_handler(|error, _request| {
        ApiError::bad_request("invalid_path", error.to_string()).into()
    })
}

/// Unknown routes answer a JSON 404 like every other error.
pub async fn not_found() -> ApiError {
    ApiError::new(
        actix_web::http::StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint",
    )
}

/// `GET /healthz`: the process is up and serving.
pub async fn healthz() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// A tracehop actix-web app: tracing root span, `traceresponse`, JSON errors for bad bodies and paths,
/// `GET /healthz`, and a JSON 404; `configure` adds the service's own routes and state.
pub fn app<F>(
    configure: F,
) -> actix_web::App<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = Error,
        InitError = (),
    >,
>
where
    F: FnOnce(&mut web::ServiceConfig),
{
    actix_web::App::new()
        .wrap(actix_web::middleware::from_fn(trace_response))
        .wrap(tracing_middleware())
        .app_data(json_config())
        .app_data(path_config())
        .route("/healthz", web::get().to(healthz))
        .configure(configure)
        .default_service(web::to(not_found))
}

/// Binds `host:port` (port 0 picks a free one) and reports the port actually bound.
pub fn bind(host: &str, port: u16) -> std::io::Result<(std::net::TcpListener, u16)> {
    let listener = std::net::TcpListener::bind((host, port))?;
    let port = listener.local_addr()?.port();
    Ok((listener, port))
}
