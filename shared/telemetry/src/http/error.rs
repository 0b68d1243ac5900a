//! The one error body every tracehop endpoint answers with: `{"error", "message", "traceId"}`.
//!
//! Handlers keep their own error enums (what can go wrong *there*) and convert into [`ApiError`] at the
//! edge; the trace id is taken from the current span when the response is built, so support can jump from
//! any error straight to its trace.

use std::borrow::Cow;
use std::fmt;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

/// An HTTP error with a stable machine-readable code and a human message.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Cow<'static, str>,
    pub message: String,
    /// Seconds, sent as `Retry-After` (429 and 503 answers that know when trying again makes sense).
    pub retry_after: Option<u64>,
    trace_id: String,
}

/// The JSON body of an [`ApiError`]; also what clients deserialize.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
    pub trace_id: String,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            code: code.into(),
            message: message.into(),
            retry_after: None,
            trace_id: crate::setup::current_trace_id(),
        }
    }

    /// The same error, answered with `Retry-After: seconds`.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// 429: the caller is sending too much; `Retry-After` says when to try again.
    pub fn too_many_requests(
        code: &'static str,
        message: impl Into<String>,
        retry_after: u64,
    ) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, code, message).with_retry_after(retry_after)
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn bad_gateway(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, code, message)
    }

    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
    }

    /// A failure on our side. The detail goes to the log only (with the trace id,
    /// [`crate::setup::log_detail`]); the client and the trace get a generic message, never internal error
    /// text.
    pub fn internal(detail: impl fmt::Display) -> Self {
        crate::setup::log_detail("internal error", &detail);
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; quote the trace id to support",
        )
    }

    /// A database failure: 503 when the database is unreachable (retry later), otherwise internal.
    pub fn from_db(error: &crate::db::DbError, what: &str) -> Self {
        if error.is_unavailable() {
            Self::unavailable(
                "database_unavailable",
                format!("the {what} database is unavailable; retry later"),
            )
        } else {
            Self::internal(error)
        }
    }

    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        // Prefer the id captured when the error was made; an error built outside any span (rare) falls back
        // to the span current while responding.
        let trace_id = if self.trace_id.chars().all(|c| c == '0') {
            crate::setup::current_trace_id()
        } else {
            self.trace_id.clone()
        };
        let mut response = HttpResponse::build(self.status);
        if let Some(seconds) = self.retry_after {
            response.insert_header((actix_web::http::header::RETRY_AFTER, seconds.to_string()));
        }
        response.json(ErrorBody {
            error: self.code.to_string(),
            message: self.message.clone(),
            trace_id,
        })
    }
}

/// Whether an error is the caller's (answered with a 4xx) or a failure of ours.
pub trait Failure: fmt::Display {
    /// True when the caller is at fault: bad input, bad credentials, a declined card, a conflict.
    fn is_client_error(&self) -> bool;
}

impl Failure for ApiError {
    fn is_client_error(&self) -> bool {
        self.status.is_client_error()
    }
}

/// `outcome`, with its error recorded on the current span as what it is. A failure of ours (5xx) makes the
/// span's status ERROR, with an `exception` event, as `#[instrument(err)]` would. A client error (4xx) is an
/// answer, not a failure: it is logged at INFO and the span's status stays unset, as the HTTP conventions
/// say of server spans (a mistyped token must not look like an outage).
///
/// Use it in place of `#[instrument(err)]` on spans whose errors can be the caller's:
///
/// ```
/// use tracehop_telemetry::http::{ApiError, error::record_failure};
///
/// #[tracing::instrument(name = "session.validate", skip_all)]
/// async fn validate(token: &str) -> Result<u64, ApiError> {
///     record_failure(async {
///         if token.is_empty() {
///             return Err(ApiError::unauthorized("no token"));
///         }
///         Ok(42)
///     }.await)
/// }
/// ```
pub fn record_failure<T, E: Failure>(outcome: Result<T, E>) -> Result<T, E> {
    if let Err(error) = &outcome {
        if error.is_client_error() {
            tracing::info!(error = %error, "answered with a client error");
        } else {
            tracing::error!(error = %error, "failed");
        }
    }
    outcome
}

impl actix_web::Responder for ApiError {
    type Body = actix_web::body::BoxBody;
    fn respond_to(self, _req: &actix_web::HttpRequest) -> HttpResponse<Self::Body> {
        self.error_response()
    }
}
