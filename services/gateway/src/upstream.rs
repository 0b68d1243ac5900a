//! Calls to users and billing, and how their failures become gateway errors.

use actix_web::http::StatusCode;
use tracehop_contracts::users::SessionUser;
use tracehop_telemetry::http::client::ClientError;
use tracehop_telemetry::http::error::ErrorBody;
use tracehop_telemetry::http::{ApiError, TracedClient};

/// Where the internal services are, and the one client (connection pool) used to reach them.
pub struct Upstreams {
    pub client: TracedClient,
    pub users_url: String,
    pub billing_url: String,
}

impl Upstreams {
    /// Who does `authorization` (the raw header) belong to? 401 when nobody.
    pub async fn validate_session(
        &self,
        authorization: Option<&str>,
    ) -> Result<SessionUser, ApiError> {
        let Some(authorization) = authorization else {
            return Err(ApiError::unauthorized(
                "missing Authorization: Bearer <token>",
            ));
        };
        let request = self
            .client
            .request(
                reqwest::Method::POST,
                &format!("{}/sessions/validate", self.users_url),
            )
            .header(reqwest::header::AUTHORIZATION, authorization);
        self.call("users", "/sessions/validate", request).await
    }

    /// Calls an internal service and reads its JSON answer. Unreachable: 503. An error answer: passed on
    /// with its status and code. An unreadable answer: 502.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        service: &'static str,
        url_template: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ApiError> {
        let response = self
            .client
            .send(url_template, request)
            .await
            .map_err(|error| unreachable_service(service, &error))?;
        if !response.status().is_success() {
            return Err(relay_error(service, response).await);
        }
        response.json::<T>().await.map_err(|error| {
            ApiError::bad_gateway("bad_upstream_response", format!("{service}: {error}"))
        })
    }
}

/// A service that could not be reached: 503, with which one.
fn unreachable_service(service: &str, error: &ClientError) -> ApiError {
    tracing::error!(service, error = %error, "upstream unreachable");
    ApiError::unavailable(
        "upstream_unavailable",
        format!("{service} is unavailable ({})", error.kind()),
    )
}

/// An upstream error answer, passed on with its status and code (they are already meant for clients);
/// anything unreadable becomes a 502.
async fn relay_error(service: &str, response: reqwest::Response) -> ApiError {
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    match response.json::<ErrorBody>().await {
        Ok(body) => ApiError::new(status, body.error, body.message),
        Err(_) => ApiError::bad_gateway(
            "bad_upstream_response",
            format!("{service} answered {status} without an error body"),
        ),
    }
}
