//! Calls to users and billing, and how their failures become gateway errors.
//!
//! Every call carries a service token (`tracehop-identity`) made for the one service it goes to, naming
//! the signed-in user when there is one: that is how users and billing know the call came through here.
//!
//! Each service may run as several replicas ([`Replicas`]: `BILLING_URL=http://a:3002,http://b:3002`).
//! Calls go round-robin; a replica that refuses the connection rests for a few seconds and the call goes to
//! the next one at once. Only a refused connection is retried elsewhere: nothing reached that replica, so
//! even a charge cannot be carried out twice. A timeout or a broken connection is not retried (the request
//! may have been carried out); a checkout then answers 202 with its order and key, as with one replica.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
    pub users: Replicas,
    pub billing: Replicas,
    pub notifications: Replicas,
    pub issuer: Issuer,
}

/// How long a replica that refused a connection is skipped.
const REST: Duration = Duration::from_secs(2);

/// The replicas of one service, called round-robin.
#[derive(Debug)]
pub struct Replicas {
    bases: Vec<String>,
    next: AtomicUsize,
    /// Per replica: until when (ms since `epoch`) it rests after refusing a connection.
    resting_until: Vec<AtomicU64>,
    epoch: Instant,
}

impl Replicas {
    /// A comma-separated list of base URLs (one URL is one replica).
    pub fn parse(list: &str) -> Self {
        let bases: Vec<String> = list
            .split(',')
            .map(|url| url.trim().trim_end_matches('/').to_owned())
            .filter(|url| !url.is_empty())
            .collect();
        let resting_until = bases.iter().map(|_| AtomicU64::new(0)).collect();
        Self {
            bases,
            next: AtomicUsize::new(0),
            resting_until,
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The next replica that is not resting (or simply the next, when all are).
    fn pick(&self) -> &str {
        let count = self.bases.len().max(1);
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let awake = (0..count)
            .map(|offset| (start + offset) % count)
            .find(|index| {
                self.resting_until
                    .get(*index)
                    .is_some_and(|until| until.load(Ordering::Relaxed) <= now)
            })
            .unwrap_or(start % count);
        self.bases
            .get(awake)
            .map(String::as_str)
            .unwrap_or_default()
    }

    /// The replica `url` belongs to.
    fn index_of(&self, url: &str) -> Option<usize> {
        self.bases
            .iter()
            .position(|base| url.starts_with(base.as_str()))
    }

    fn rest(&self, index: usize) {
        if let Some(until) = self.resting_until.get(index) {
            until.store(self.now_ms() + REST.as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// Another replica than `index` that is not resting, if any.
    fn other_than(&self, tried: &[usize]) -> Option<usize> {
        let now = self.now_ms();
        (0..self.bases.len()).find(|index| {
            !tried.contains(index) && self.resting_until[*index].load(Ordering::Relaxed) <= now
        })
    }
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
        let base = self.replicas(upstream).pick();
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
            .send(upstream, url_template, request)
            .await
            .map_err(|error| unreachable_service(service, &error))?;
        Self::read(service, response).await
    }

    fn replicas(&self, upstream: Upstream) -> &Replicas {
        match upstream {
            Upstream::Users => &self.users,
            Upstream::Billing => &self.billing,
            Upstream::Notifications => &self.notifications,
        }
    }

    /// Sends `request`; when its replica refuses the connection, rests that replica and sends the same
    /// request to the next one (each attempt its own CLIENT span).
    async fn send(
        &self,
        upstream: Upstream,
        url_template: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let replicas = self.replicas(upstream);
        let mut tried = Vec::new();
        let mut request = request;
        loop {
            // A copy to resend only when there is another replica to resend it to (the body is copied).
            let spare = (replicas.bases.len() > 1)
                .then(|| request.try_clone())
                .flatten();
            let outcome = self.client.send(url_template, request).await;
            let Err(error) = &outcome else {
                return outcome;
            };
            let Some(spare) = spare.filter(|_| error.kind() == "connect") else {
                return outcome;
            };
            let (client, built) = spare.build_split();
            let Ok(mut built) = built else {
                return outcome;
            };
            let url = built.url().to_string();
            let Some(refused) = replicas.index_of(&url) else {
                return outcome;
            };
            replicas.rest(refused);
            tried.push(refused);
            let Some(next) = replicas.other_than(&tried) else {
                return outcome;
            };
            let rebased = format!(
                "{}{}",
                replicas.bases[next],
                &url[replicas.bases[refused].len()..]
            );
            let Ok(rebased) = reqwest::Url::parse(&rebased) else {
                return outcome;
            };
            tracing::warn!(
                service = upstream.name(),
                refused = %replicas.bases[refused],
                next = %replicas.bases[next],
                "replica refused the connection; sending to the next one"
            );
            *built.url_mut() = rebased;
            request = reqwest::RequestBuilder::from_parts(client, built);
        }
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
        match self.send(upstream, url_template, request).await {
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

#[cfg(test)]
mod replica_tests {
    use super::*;

    #[test]
    fn replicas_take_turns_and_a_resting_one_is_skipped() {
        let replicas = Replicas::parse("http://a:1/, http://b:2,,");
        assert_eq!(replicas.bases, ["http://a:1", "http://b:2"]);
        let turns: Vec<&str> = (0..4).map(|_| replicas.pick()).collect();
        assert_eq!(
            turns,
            ["http://a:1", "http://b:2", "http://a:1", "http://b:2"]
        );
        replicas.rest(0);
        assert!((0..4).all(|_| replicas.pick() == "http://b:2"));
        assert_eq!(replicas.index_of("http://b:2/charge"), Some(1));
        assert_eq!(replicas.other_than(&[1]), None, "a is resting");
        // All resting: still one to try.
        replicas.rest(1);
        assert!(!replicas.pick().is_empty());
    }
}
