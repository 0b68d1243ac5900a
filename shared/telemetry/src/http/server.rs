//! The actix-web side: a root span per request that follows the HTTP server semantic conventions, decides
//! by the app's [`RequestTrust`] whether the caller's W3C context continues or is only linked, and answers
//! with a `traceresponse` header naming the trace actually recorded.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, web};
use opentelemetry::trace::{SpanContext, TraceContextExt, TraceState};
use tracing::Span;
use tracing_actix_web::{RootSpanBuilder, TracingLogger};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::http::error::ApiError;
use crate::propagation::{ActixHeaderExtractor, extract, set_remote_parent, w3c};

/// The largest JSON body any tracehop endpoint accepts.
pub const MAX_JSON_BODY_BYTES: usize = 16 * 1024;

/// The longest caller-supplied text (user agent, query, host, forwarded address) put on a server span.
pub const MAX_CALLER_TEXT: usize = 256;

/// What a service believes of its callers' headers. Every app states it ([`app`]); the root span reads it.
///
/// A service that faces the public internet uses [`RequestTrust::PUBLIC`]: a caller's `traceparent` does not
/// choose the trace id or the sampling decision; the server span starts a new trace and records the
/// caller's context as a span link (so a browser's or a partner's trace can still be joined), and the
/// caller's `tracestate` and `baggage` are dropped. Internal services use [`RequestTrust::INTERNAL`] and
/// continue their callers' traces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestTrust {
    /// Continue the caller's trace (`traceparent`, `tracestate`, `baggage`) rather than link to it.
    pub continue_caller_trace: bool,
    /// Take `client.address` from `Forwarded` / `X-Forwarded-For` rather than the connection's peer.
    pub forwarded_headers: bool,
}

impl RequestTrust {
    /// Facing the public internet: nothing a caller sends is believed.
    pub const PUBLIC: Self = Self {
        continue_caller_trace: false,
        forwarded_headers: false,
    };
    /// Called by the other services of the deployment: their trace context continues.
    pub const INTERNAL: Self = Self {
        continue_caller_trace: true,
        forwarded_headers: false,
    };
}

/// Root span builder with the stable HTTP server conventions (`http.request.method`, `http.route`,
/// `url.path`, `url.scheme`, `http.response.status_code`, ...). The span is named `{method} {route}`.
pub struct SemconvRootSpan;

impl RootSpanBuilder for SemconvRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        // Health probes are answered, not traced: docker compose's and the kubelet's probes, every few
        // seconds per process, would each be a trace of one span that says nothing, crowding out the traces
        // someone is looking for (the embedded collector holds the newest 50 000). A probe that fails is
        // still logged (`on_request_end`).
        if request.path() == HEALTH_PATH {
            return Span::none();
        }
        // An app that did not say is treated as public: trusting by default is the dangerous mistake.
        let trust = request
            .app_data::<RequestTrust>()
            .copied()
            .unwrap_or(RequestTrust::PUBLIC);
        // Lean by design: every value below is borrowed from the request as a `&str` (no copy, no
        // `format!`), except the span's name, joined once; the OpenTelemetry layer then records each value
        // without formatting it (BENCHMARKS.md, section 12).
        let method = request.method().as_str();
        let route = request.match_pattern();
        let name = match &route {
            Some(route) => [method, route.as_str()].join(" "),
            None => method.to_owned(),
        };
        let connection = request.connection_info();
        let (host, port) = split_host_port(connection.host());
        let headers = request.headers();
        let span = tracing::info_span!(
            "HTTP request",
            otel.name = name.as_str(),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = method,
            http.route = route.as_deref(),
            url.path = bounded(request.path(), 2 * MAX_CALLER_TEXT),
            url.query = tracing::field::Empty,
            url.scheme = connection.scheme(),
            server.address = bounded(host, MAX_CALLER_TEXT),
            server.port = port.map(i64::from),
            client.address = tracing::field::Empty,
            user_agent.original = tracing::field::Empty,
            network.protocol.version = protocol_version(request.version()),
            http.response.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        drop(connection);
        // Empty values are left out, as the conventions say, rather than exported as "".
        let query = request.query_string();
        if !query.is_empty() {
            span.record("url.query", bounded(query, MAX_CALLER_TEXT));
        }
        if let Some(address) = client_address_with(request.request(), trust) {
            span.record("client.address", address.as_str());
        }
        if let Some(agent) = headers
            .get(actix_web::http::header::USER_AGENT)
            .and_then(|value| value.to_str().ok())
        {
            span.record("user_agent.original", bounded(agent, MAX_CALLER_TEXT));
        }
        let caller = extract(&ActixHeaderExtractor(headers));
        if trust.continue_caller_trace {
            set_remote_parent(&span, caller);
        } else {
            link_to_caller(&span, &caller);
            crate::setup::note_sampling(&span);
        }
        span
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        let status = match outcome {
            Ok(response) => response.response().status(),
            Err(error) => error.as_response_error().status_code(),
        };
        if span.is_none() && status.is_success() {
            // An untraced health probe that passed: nothing to say, every few seconds.
            return;
        }
        span.record("http.response.status_code", i64::from(status.as_u16()));
        // Server spans: only 5xx is an error (a 4xx is the client's fault, not ours).
        if status.is_server_error() {
            span.record("otel.status_code", "ERROR");
            span.record("error.type", status.as_str());
        }
        // One access-log line per request, carrying trace_id/span_id like every other line.
        span.in_scope(|| tracing::info!(status = status.as_u16(), "request finished"));
    }
}

/// Records the caller's context as a link of `span` (without its `tracestate`): the trace is ours, the
/// caller's can still be found from it.
fn link_to_caller(span: &Span, caller: &opentelemetry::Context) {
    let caller = caller.span();
    let caller = caller.span_context();
    if caller.is_valid() {
        span.add_link(SpanContext::new(
            caller.trace_id(),
            caller.span_id(),
            caller.trace_flags(),
            true,
            TraceState::NONE,
        ));
    }
}

/// `host` and `port` of a `Host` header value (`example.com:3000`, `[::1]:3000`, `example.com`).
fn split_host_port(host: &str) -> (&str, Option<u16>) {
    if let Some((name, port)) = host.rsplit_once(':')
        && !name.is_empty()
        && (!name.contains(':') || name.ends_with(']'))
        && let Ok(port) = port.parse()
    {
        return (
            name.trim_start_matches('[').trim_end_matches(']'),
            Some(port),
        );
    }
    (host, None)
}

/// `network.protocol.version` as the conventions write it (`1.1`, `2`).
fn protocol_version(version: actix_web::http::Version) -> &'static str {
    use actix_web::http::Version;
    match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn bounded(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
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
    let traceparent = w3c::traceparent(&Span::current().context());
    let mut response = next.call(request).await?;
    if let Some(value) = traceparent.and_then(|value| HeaderValue::from_str(&value).ok()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("traceresponse"), value);
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

/// The client's address as this service's [`RequestTrust`] allows it to be known: the connection's peer,
/// or with `forwarded_headers` the **last** `Forwarded` (`for=`) or `X-Forwarded-For` address (bounded): the
/// one the trusted proxy in front of us appended. Earlier entries are whatever the caller sent, so trusting
/// the first would let any client choose its address (and dodge the per-address login limit). One trusted
/// hop is assumed; behind a chain of proxies, have the outermost one overwrite the header. It is what the
/// root span records as `client.address`, and what the login throttle counts by.
pub fn client_address(request: &actix_web::HttpRequest) -> Option<String> {
    let trust = request
        .app_data::<RequestTrust>()
        .copied()
        .unwrap_or(RequestTrust::PUBLIC);
    client_address_with(request, trust)
}

fn client_address_with(request: &actix_web::HttpRequest, trust: RequestTrust) -> Option<String> {
    let peer = || request.peer_addr().map(|address| address.ip().to_string());
    if !trust.forwarded_headers {
        return peer();
    }
    let header = |name: &str| {
        request
            .headers()
            .get_all(name)
            .filter_map(|value| value.to_str().ok())
            .collect::<Vec<_>>()
            .join(",")
    };
    last_forwarded(&header("forwarded"), &header("x-forwarded-for"))
        .map(|address| bounded(&address, MAX_CALLER_TEXT).to_owned())
        .or_else(peer)
}

/// The last address of `Forwarded` (its last element's `for=`), else of `X-Forwarded-For`; without quotes,
/// brackets or port.
fn last_forwarded(forwarded: &str, x_forwarded_for: &str) -> Option<String> {
    let from_forwarded = forwarded.rsplit(',').next().and_then(|element| {
        element.split(';').find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            key.trim().eq_ignore_ascii_case("for").then(|| value.trim())
        })
    });
    let raw = from_forwarded.or_else(|| x_forwarded_for.rsplit(',').next())?;
    let raw = raw.trim().trim_matches('"');
    // `[2001:db8::1]:443`, `203.0.113.9:443`, `2001:db8::1`, `203.0.113.9`
    let address = if let Some(rest) = raw.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if raw.matches(':').count() == 1 {
        raw.split(':').next().unwrap_or(raw)
    } else {
        raw
    };
    (!address.is_empty()).then(|| address.to_owned())
}

/// Where every tracehop service answers its health probes ([`healthz`]); requests to it are not traced.
pub const HEALTH_PATH: &str = "/healthz";

/// `GET /healthz`: the process is up and serving.
pub async fn healthz() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// A tracehop actix-web app: tracing root span (with `trust` deciding what callers' headers may set),
/// `traceresponse`, JSON errors for bad bodies and paths, `GET /healthz` (untraced), and a JSON 404; `configure` adds the
/// service's own routes and state.
pub fn app<F>(
    trust: RequestTrust,
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
        .app_data(trust)
        .wrap(actix_web::middleware::from_fn(trace_response))
        .wrap(tracing_middleware())
        .app_data(json_config())
        .app_data(path_config())
        .route(HEALTH_PATH, web::get().to(healthz))
        .configure(configure)
        .default_service(web::to(not_found))
}

/// Binds `host:port` (port 0 picks a free one) and reports the port actually bound.
pub fn bind(host: &str, port: u16) -> std::io::Result<(std::net::TcpListener, u16)> {
    let listener = std::net::TcpListener::bind((host, port))?;
    let port = listener.local_addr()?.port();
    Ok((listener, port))
}

#[cfg(test)]
mod forwarded_tests {
    use super::last_forwarded;

    #[test]
    fn the_last_hop_is_believed_not_what_the_caller_sent() {
        // The caller sent 1.2.3.4; the trusted proxy appended the address it saw.
        assert_eq!(
            last_forwarded("", "1.2.3.4, 203.0.113.9").as_deref(),
            Some("203.0.113.9")
        );
        assert_eq!(
            last_forwarded(
                "for=1.2.3.4, for=\"[2001:db8::1]:443\";proto=https",
                "9.9.9.9"
            )
            .as_deref(),
            Some("2001:db8::1")
        );
        assert_eq!(
            last_forwarded("", "203.0.113.9:5555").as_deref(),
            Some("203.0.113.9")
        );
        assert_eq!(
            last_forwarded("", "2001:db8::2").as_deref(),
            Some("2001:db8::2")
        );
        assert_eq!(last_forwarded("", "").as_deref(), None);
        assert_eq!(last_forwarded("proto=https", "").as_deref(), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_are_split() {
        assert_eq!(split_host_port("127.0.0.1:3000"), ("127.0.0.1", Some(3000)));
        assert_eq!(split_host_port("example.com"), ("example.com", None));
        assert_eq!(split_host_port("[::1]:3000"), ("::1", Some(3000)));
        assert_eq!(split_host_port("::1"), ("::1", None));
        assert_eq!(split_host_port("host:notaport"), ("host:notaport", None));
    }

    #[test]
    fn caller_text_is_bounded_at_a_character_boundary() {
        assert_eq!(bounded("short", 10), "short");
        assert_eq!(bounded(&"é".repeat(10), 5), "éé");
    }

    #[actix_web::test]
    async fn health_probes_are_answered_and_not_traced() {
        use crate::testing::Keep;
        use actix_web::test::{TestRequest, call_service, init_service};
        let kept = Keep::default();
        let (dispatch, guard) = crate::setup::dispatch_with_exporter("test", Some(kept.clone()));
        let default = tracing::dispatcher::set_default(&dispatch);
        let service = init_service(app(RequestTrust::INTERNAL, |config| {
            config.route("/work", web::get().to(|| async { "done" }));
        }))
        .await;
        for path in ["/healthz", "/work", "/healthz"] {
            let request = TestRequest::get().uri(path).to_request();
            let response = call_service(&service, request).await;
            assert!(response.status().is_success(), "{path}");
            let traced = response.headers().contains_key("traceresponse");
            assert_eq!(traced, path == "/work", "{path}: traceresponse");
        }
        drop(default);
        drop(dispatch);
        guard.shutdown().await;
        let kept = kept.0.lock().map(|spans| spans.clone()).unwrap_or_default();
        let names: Vec<&str> = kept.iter().map(|span| span.name.as_ref()).collect();
        assert_eq!(names, ["GET /work"]);
    }
}
