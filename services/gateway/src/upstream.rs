//! Calls to users and billing, and how their failures become gateway errors.
//!
//! Every call carries a service token (`tracehop-identity`) made for the one service it goes to, naming
//! the signed-in user when there is one: that is how users and billing know the call came through here.

use actix_web::http::StatusCode;
use tracehop_contracts::domain::Secret;
use tracehop_contracts::users::{SessionToken, SessionUser};
use tracehop_identity::{EndUser, Issuer};
use tracehop_telemetry::http::client::ClientError;
use tracehop_telemetry::http::error::ErrorBody;
use tracehop_telemetry::http::{ApiError, TracedClient};

/// An internal service the gateway calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    Users,
    Billing,
    Notifications,
}

impl Upstream {
    /// The service's name: the audience of its tokens, and what errors name.
    pub fn name(self) -> &'static str {
        match self {
            Upstream::Users => "users",
            Upstream::Billing => "billing",
            Upstream::Notifications => "notifications",
        }
    }
}

/// Where the internal services are, the one client (connection pool) used to reach them, and the key that
/// signs the gateway's service tokens.
pub struct Upstreams {
    pub client: TracedClient,
    pub users_url: String,
    pub billing_url: String,
    pub notifications_url: String,
    pub issuer: Issuer,
}

impl Upstreams {
    /// A request to `path` of `upstream`, carrying a service token for it (on behalf of `user`, if given).
    pub fn request(
        &self,
        upstream: Upstream,
        method: reqwest::Method,
        path: &str,
        user: Option<&EndUser>,
    ) -> Result<reqwest::RequestBuilder, ApiError> {
        let base = match upstream {
            Upstream::Users => &self.users_url,
            Upstream::Billing => &self.billing_url,
            Upstream::Notifications => &self.notifications_url,
        };
        let token = self
            .issuer
            .token(upstream.name(), user)
            .map_err(ApiError::internal)?;
        Ok(self
            .client
            .request(method, &format!("{base}{path}"))
            .bearer_auth(token))
    }

    /// Who does `authorization` (the client's raw header) belong to? 401 when nobody.
    pub async fn validate_session(
        &self,
        authorization: Option<&str>,
    ) -> Result<SessionUser, ApiError> {
        let token = session_token(authorization)?;
        let request = self
            .request(
                Upstream::Users,
                reqwest::Method::POST,
                "/sessions/validate",
                None,
            )?
            .json(&SessionToken { token });
        self.call(Upstream::Users, "/sessions/validate", request)
            .await
    }

    /// Calls an internal service and reads its JSON answer. Unreachable: 503. An error answer: passed on
    /// with its status and code. An unreadable answer: 502.
    pub async fn call<T: serde::de::DeserializeOwned>(
        &self,
        upstream: Upstream,
        url_template: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ApiError> {
        let service = upstream.name();
        let response = self
            .client
            .send(url_template, request)
            .await
            .map_err(|error| unreachable_service(service, &error))?;
        Self::read(service, response).await
    }

    /// Like [`Upstreams::call`], for a call that changes something (a charge): a request that was sent
    /// but whose answer never came (timed out, or the connection was cut) may have been carried out, so it
    /// is [`Delivery::Lost`], not an error. A request that never left (connection refused) is still a 503.
    pub async fn call_once<T: serde::de::DeserializeOwned>(
        &self,
        upstream: Upstream,
        url_template: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<Delivery<T>, ApiError> {
        let service = upstream.name();
        match self.client.send(url_template, request).await {
            Ok(response) => Self::read(service, response).await.map(Delivery::Answered),
            Err(error) if matches!(error.kind(), "timeout" | "transport") => {
                tracing::warn!(service, error = %error, "no answer to a request that may have been carried out");
                Ok(Delivery::Lost)
            }
            Err(error) => Err(unreachable_service(service, &error)),
        }
    }

    async fn read<T: serde::de::DeserializeOwned>(
        service: &'static str,
        response: reqwest::Response,
    ) -> Result<T, ApiError> {
        if !response.status().is_success() {
            return Err(relay_error(service, response).await);
        }
        response.json::<T>().await.map_err(|error| {
            tracing::error!(service, error = %error, "unreadable upstream answer");
            ApiError::bad_gateway(
                "bad_upstream_response",
                format!("{service} answered something unreadable"),
            )
        })
    }
}

/// What became of a call made with [`Upstreams::call_once`].
#[derive(Debug)]
pub enum Delivery<T> {
    /// The service answered (2xx).
    Answered(T),
    /// Sent, but no answer came: it may or may not have been carried out.
    Lost,
}

/// The session token of `Authorization: Bearer <token>`; 401 without one.
pub fn session_token(authorization: Option<&str>) -> Result<Secret, ApiError> {
    authorization
        .and_then(|header| header.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty() && token.len() <= 256)
        .map(Secret::new)
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))
}

/// A service that could not be reached: 503, with which one (the cause stays in the log: it names
/// internal addresses).
fn unreachable_service(service: &str, error: &ClientError) -> ApiError {
    tracing::error!(service, error = %error, "upstream unreachable");
    ApiError::unavailable(
        "upstream_unavailable",
        format!("{service} is unavailable ({}); retry later", error.kind()),
    )
}

/// An upstream error answer, passed on with its status and code (they are already meant for clients);
/// anything unreadable becomes a 502. A 401 from an internal service means the gateway's own service token
/// was refused, a misconfiguration of ours, not the client's fault.
async fn relay_error(service: &str, response: reqwest::Response) -> ApiError {
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<u64>().ok());
    let error = match response.json::<ErrorBody>().await {
        Ok(body) if body.error == tracehop_identity::SERVICE_UNAUTHORIZED => {
            tracing::error!(
                service,
                "the service token was refused: check SERVICE_TOKEN_* keys"
            );
            ApiError::bad_gateway("upstream_refused", format!("{service} refused the gateway"))
        }
        Ok(body) => ApiError::new(status, body.error, body.message),
        Err(_) => ApiError::bad_gateway(
            "bad_upstream_response",
            format!("{service} answered {status} without an error body"),
        ),
    };
    match retry_after {
        Some(seconds) => error.with_retry_after(seconds),
        None => error,
    }
}
