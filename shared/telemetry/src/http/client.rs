//! The traced HTTP client: every outgoing call is a CLIENT span (`{method} {url.template}`) with the HTTP
//! client conventions, and carries the span's context: `traceparent`/`tracestate`/`baggage` to the services
//! of the deployment, only `traceparent` to a third party ([`TracedClient::third_party`]).

use std::time::Duration;

use tracing::Instrument;

use crate::propagation::{HttpHeaderInjector, inject, w3c};

/// A reqwest client (one connection pool, keep-alive) that traces and propagates every request.
#[derive(Clone, Debug)]
pub struct TracedClient {
    inner: reqwest::Client,
    third_party: bool,
}

/// Why an outgoing call produced no response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not build the request: {0}")]
    Build(#[source] reqwest::Error),
    #[error("request timed out: {0}")]
    Timeout(#[source] reqwest::Error),
    #[error("could not connect: {0}")]
    Connect(#[source] reqwest::Error),
    #[error("request failed: {0}")]
    Transport(#[source] reqwest::Error),
}

impl ClientError {
    fn classify(error: reqwest::Error) -> Self {
        if error.is_timeout() {
            Self::Timeout(error)
        } else if error.is_connect() {
            Self::Connect(error)
        } else if error.is_builder() {
            Self::Build(error)
        } else {
            Self::Transport(error)
        }
    }

    /// `error.type` value for the span.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Build(_) => "build",
            Self::Timeout(_) => "timeout",
            Self::Connect(_) => "connect",
            Self::Transport(_) => "transport",
        }
    }
}

/// Installs rustls' `ring` provider for the process (reqwest is built without one, so there is exactly one
/// TLS stack). Idempotent; every entry point calls it before building an HTTP client.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How long a client keeps an idle connection: under actix-web's default keep-alive (5 s), so the client
/// drops a connection before the server does. With a longer idle time a request can be written into a
/// connection the server is closing at that very moment, and fails (seen once in 6 000 requests under load).
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(4);

/// A plain reqwest client builder, with the crypto provider in place and idle connections dropped before
/// the server drops them ([`IDLE_CONNECTION_TIMEOUT`]); for tools and tests.
pub fn plain_client_builder() -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder().pool_idle_timeout(IDLE_CONNECTION_TIMEOUT)
}

impl TracedClient {
    /// A client whose every request gives up after `timeout`.
    pub fn new(timeout: Duration) -> Result<Self, reqwest::Error> {
        install_crypto_provider();
        let inner = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(IDLE_CONNECTION_TIMEOUT)
            .build()?;
        Ok(Self {
            inner,
            third_party: false,
        })
    }

    /// The same client for calls that leave the deployment (a payment provider): they carry `traceparent`
    /// only. `tracestate` and `baggage` are ours and our callers', not the third party's to read.
    pub fn third_party(mut self) -> Self {
        self.third_party = true;
        self
    }

    /// The underlying client, to build requests with.
    pub fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.inner.request(method, url)
    }

    /// Sends `request` inside a CLIENT span named `{method} {url_template}`. 4xx and 5xx answers mark the span
    /// as an error, as the HTTP client conventions say; the response is returned either way.
    pub async fn send(
        &self,
        url_template: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        self.send_attempt(url_template, request, 0).await
    }

    /// Like [`TracedClient::send`], for the `resend_count`-th retry of the same logical request; recorded as
    /// `http.request.resend_count` (each attempt is its own CLIENT span, as the conventions ask).
    pub async fn send_attempt(
        &self,
        url_template: &'static str,
        request: reqwest::RequestBuilder,
        resend_count: u32,
    ) -> Result<reqwest::Response, ClientError> {
        let mut request = request.build().map_err(ClientError::Build)?;
        let span = client_span(&request, url_template);
        if resend_count > 0 {
            span.record("http.request.resend_count", i64::from(resend_count));
        }
        let context = crate::propagation::context_of(&span);
        if self.third_party {
            crate::setup::expose(&context);
            if let Some(value) = w3c::traceparent(&context).and_then(|value| value.parse().ok()) {
                request.headers_mut().insert(w3c::TRACEPARENT, value);
            }
        } else {
            inject(&context, &mut HttpHeaderInjector(request.headers_mut()));
        }
        let outcome = self
            .inner
            .execute(request)
            .instrument(span.clone())
            .await
            .map_err(ClientError::classify);
        match &outcome {
            Ok(response) => {
                let status = response.status();
                span.record("http.response.status_code", i64::from(status.as_u16()));
                if status.is_client_error() || status.is_server_error() {
                    span.record("otel.status_code", "ERROR");
                    span.record("error.type", status.as_str());
                }
            }
            Err(error) => {
                span.record("otel.status_code", "ERROR");
                span.record("error.type", error.kind());
                span.in_scope(|| tracing::error!(error = %error, "HTTP request failed"));
            }
        }
        outcome
    }
}

/// The CLIENT span of one HTTP request (HTTP client semantic conventions), named `{method} {url_template}`;
/// the response fields are recorded on it later.
pub fn client_span(request: &reqwest::Request, url_template: &'static str) -> tracing::Span {
    let url = request.url();
    tracing::info_span!(
        "HTTP client request",
        otel.name = %format!("{} {url_template}", request.method()),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = %request.method(),
        url.full = %url,
        url.template = url_template,
        server.address = url.host_str().unwrap_or_default(),
        server.port = url.port_or_known_default().map(i64::from),
        http.request.resend_count = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}
