//! `StripeClientActor`: charges a card through a Stripe-compatible HTTP API.
//!
//! - Every attempt has its own timeout and is its own HTTP CLIENT span (`http.request.resend_count` on
//!   retries), under one `stripe.create_charge` span: a slow first attempt and a quick retry are both visible.
//! - Retries with exponential back-off and jitter on timeouts, connection errors, 409 (a request with this
//!   key in flight), 429 and 5xx; never on a decline or another 4xx.
//! - All attempts reuse one `Idempotency-Key`, so Stripe charges at most once however many attempts reach it.
//! - A circuit breaker fails fast after repeated failures (`stripe.circuit.state` on the span).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, ResponseFuture, Supervised};
use rand::Rng;
use tracehop_telemetry::actor::{Traced, supervised_reply};
use tracehop_telemetry::http::TracedClient;
use tracehop_telemetry::http::client::ClientError;

use crate::configuration::StripeSettings;

/// Charge `amount_minor` of `currency` for an order.
#[derive(Debug, Clone, actix::Message)]
#[rtype(result = "Result<StripeCharge, StripeError>")]
pub struct CreateCharge {
    pub order_id: uuid::Uuid,
    pub user_id: uuid::Uuid,
    pub amount_minor: i64,
    pub currency: String,
    /// The same for every attempt of this order.
    pub idempotency_key: String,
}

/// Look up the charge made for an order, if any (reconciliation after an unknown outcome).
#[derive(Debug, Clone, actix::Message)]
#[rtype(result = "Result<Option<StripeCharge>, StripeError>")]
pub struct FindCharge {
    pub order_id: uuid::Uuid,
}

/// The parts of Stripe's charge object billing keeps.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct StripeCharge {
    pub id: String,
    pub amount: i64,
    pub currency: String,
    pub status: String,
}

/// Why no charge was made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StripeError {
    #[error("card declined: {0}")]
    Declined(String),
    #[error("payment provider rejected the request ({status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("payment provider unavailable after {attempts} attempts: {last_error}")]
    Unavailable { attempts: u32, last_error: String },
    #[error("payment provider circuit is open (too many recent failures); not calling it")]
    CircuitOpen,
}

impl StripeError {
    /// Whether Stripe certainly made no charge. After timeouts or 5xx (`Unavailable`) it may have: such a
    /// charge stays `pending` until the reconciler asks Stripe.
    pub fn certainly_not_charged(&self) -> bool {
        matches!(
            self,
            Self::Declined(_) | Self::Rejected { .. } | Self::CircuitOpen
        )
    }
}

/// Talks to Stripe; cheap to clone into handler futures. Clones share one HTTP client and one breaker.
#[derive(Clone)]
pub struct StripeClientActor {
    client: Arc<StripeClient>,
}

impl StripeClientActor {
    pub fn new(settings: StripeSettings) -> Result<Self, reqwest::Error> {
        // The per-attempt timeout is set on each request; this is only a backstop.
        // A third party: it gets `traceparent`, never our `tracestate` or `baggage`.
        let http =
            TracedClient::new(settings.attempt_timeout + Duration::from_secs(5))?.third_party();
        let breaker = Breaker::new(settings.breaker_threshold, settings.breaker_cooldown);
        Ok(Self {
            client: Arc::new(StripeClient {
                http,
                settings,
                breaker,
            }),
        })
    }
}

impl Actor for StripeClientActor {
    type Context = Context<Self>;
}

impl Supervised for StripeClientActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        tracing::warn!(actor = "StripeClientActor", "actor restarting");
    }
}

impl Handler<Traced<CreateCharge>> for StripeClientActor {
    type Result = ResponseFuture<Result<StripeCharge, StripeError>>;

    fn handle(
        &mut self,
        message: Traced<CreateCharge>,
        context: &mut Self::Context,
    ) -> Self::Result {
        let client = self.client.clone();
        let failed = self.client.clone();
        supervised_reply(
            message,
            context,
            |charge| async move { client.create_charge(charge).await },
            move |panic| {
                // Count it, so a half-open trial that panicked does not hold the circuit open.
                failed.breaker.on_failure();
                Err(StripeError::Unavailable {
                    attempts: 0,
                    last_error: format!("Stripe client actor failed: {panic}"),
                })
            },
        )
    }
}

tracehop_telemetry::restart_on_request!(StripeClientActor);

impl Handler<Traced<FindCharge>> for StripeClientActor {
    type Result = ResponseFuture<Result<Option<StripeCharge>, StripeError>>;

    fn handle(&mut self, message: Traced<FindCharge>, context: &mut Self::Context) -> Self::Result {
        let client = self.client.clone();
        supervised_reply(
            message,
            context,
            |FindCharge { order_id }| async move { client.find_charge(order_id).await },
            |panic| {
                Err(StripeError::Unavailable {
                    attempts: 0,
                    last_error: format!("Stripe client actor failed: {panic}"),
                })
            },
        )
    }
}

struct StripeClient {
    http: TracedClient,
    settings: StripeSettings,
    breaker: Breaker,
}

/// What one attempt came to.
enum Attempt {
    Charged(StripeCharge),
    Final(StripeError),
    Retryable(String),
}

impl StripeClient {
    #[tracing::instrument(
        name = "stripe.create_charge",
        skip_all,
        fields(
            otel.kind = "internal",
            order.id = %charge.order_id,
            billing.amount = charge.amount_minor,
            billing.currency = %charge.currency,
            stripe.idempotency_key = %charge.idempotency_key,
            stripe.circuit.state = tracing::field::Empty,
            stripe.attempts = tracing::field::Empty,
            stripe.charge_id = tracing::field::Empty,
        ),
        err(Display)
    )]
    async fn create_charge(&self, charge: CreateCharge) -> Result<StripeCharge, StripeError> {
        let span = tracing::Span::current();
        let state = self.breaker.admit();
        span.record("stripe.circuit.state", state.name());
        if state == BreakerState::Open {
            return Err(StripeError::CircuitOpen);
        }
        let url = format!(
            "{}/v1/charges",
            self.settings.api_base.trim_end_matches('/')
        );
        let params = [
            ("amount", charge.amount_minor.to_string()),
            ("currency", charge.currency.clone()),
            ("customer", charge.user_id.to_string()),
            ("description", format!("tracehop order {}", charge.order_id)),
            ("metadata[order_id]", charge.order_id.to_string()),
        ];
        let mut last_error = String::new();
        let max_attempts = self.settings.max_attempts.max(1);
        for attempt in 1..=max_attempts {
            span.record("stripe.attempts", i64::from(attempt));
            if attempt > 1 {
                tokio::time::sleep(self.backoff(attempt)).await;
            }
            let request = self
                .http
                .request(reqwest::Method::POST, &url)
                .bearer_auth(&self.settings.secret_key)
                .header("Idempotency-Key", &charge.idempotency_key)
                .timeout(self.settings.attempt_timeout)
                .form(&params);
            let outcome = self
                .http
                .send_attempt("/v1/charges", request, attempt - 1)
                .await;
            match classify(outcome).await {
                Attempt::Charged(created) => {
                    self.breaker.on_success();
                    span.record("stripe.charge_id", created.id.as_str());
                    return Ok(created);
                }
                Attempt::Final(error) => {
                    // The provider answered: it is up, whatever it said.
                    self.breaker.on_success();
                    return Err(error);
                }
                Attempt::Retryable(error) => {
                    tracing::warn!(attempt, error = %error, "Stripe attempt failed, will retry if budget allows");
                    last_error = error;
                }
            }
        }
        self.breaker.on_failure();
        Err(StripeError::Unavailable {
            attempts: max_attempts,
            last_error,
        })
    }

    /// Searches the charges by `metadata[order_id]`.
    #[tracing::instrument(
        name = "stripe.find_charge",
        skip_all,
        fields(order.id = %order_id, stripe.charge_id = tracing::field::Empty),
        err(Display)
    )]
    async fn find_charge(&self, order_id: uuid::Uuid) -> Result<Option<StripeCharge>, StripeError> {
        let url = format!(
            "{}/v1/charges/search",
            self.settings.api_base.trim_end_matches('/')
        );
        let request = self
            .http
            .request(reqwest::Method::GET, &url)
            .bearer_auth(&self.settings.secret_key)
            .timeout(self.settings.attempt_timeout)
            .query(&[("query", format!("metadata['order_id']:'{order_id}'"))]);
        let unavailable = |error: String| StripeError::Unavailable {
            attempts: 1,
            last_error: error,
        };
        let response = self
            .http
            .send("/v1/charges/search", request)
            .await
            .map_err(|error| unavailable(error.to_string()))?;
        if !response.status().is_success() {
            return Err(unavailable(format!(
                "search answered {}",
                response.status()
            )));
        }
        #[derive(serde::Deserialize)]
        struct SearchResult {
            data: Vec<StripeCharge>,
        }
        let found = response
            .json::<SearchResult>()
            .await
            .map_err(|error| unavailable(error.to_string()))?
            .data
            .into_iter()
            // Stripe keeps declined charges too: a succeeded one, if there is one, is the answer.
            .max_by_key(|charge| charge.status == "succeeded");
        if let Some(charge) = &found {
            tracing::Span::current().record("stripe.charge_id", charge.id.as_str());
        }
        Ok(found)
    }

    /// `backoff * 2^(attempt-2)` plus up to 50% jitter, so synchronized clients spread out.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.settings.backoff * 2_u32.saturating_pow(attempt.saturating_sub(2));
        let jitter = rand::rng().random_range(0.0..0.5);
        base.mul_f64(1.0 + jitter)
    }
}

async fn classify(outcome: Result<reqwest::Response, ClientError>) -> Attempt {
    let response = match outcome {
        Ok(response) => response,
        Err(error) => return Attempt::Retryable(error.to_string()),
    };
    let status = response.status();
    if status.is_success() {
        return match response.json::<StripeCharge>().await {
            Ok(charge) => Attempt::Charged(charge),
            Err(error) => Attempt::Retryable(format!("unreadable charge: {error}")),
        };
    }
    let message = response
        .json::<serde_json::Value>()
        .await
        .ok()
        .and_then(|body| body["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| status.to_string());
    match status.as_u16() {
        402 => Attempt::Final(StripeError::Declined(message)),
        409 | 429 => Attempt::Retryable(format!("{status}: {message}")),
        code if status.is_server_error() => Attempt::Retryable(format!("{code}: {message}")),
        code => Attempt::Final(StripeError::Rejected {
            status: code,
            message,
        }),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    fn name(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// Opens after `threshold` consecutive failed charges; after `cooldown` lets calls through again
/// (half-open) and closes on the first success.
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    inner: Mutex<BreakerInner>,
}

#[derive(Default)]
struct BreakerInner {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    /// Half-open: one trial call is out; everyone else still fails fast until it answers.
    trial_in_flight: bool,
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cooldown,
            inner: Mutex::new(BreakerInner::default()),
        }
    }

    fn admit(&self) -> BreakerState {
        let Ok(mut inner) = self.inner.lock() else {
            return BreakerState::Closed;
        };
        match inner.open_until {
            Some(until) if Instant::now() < until => BreakerState::Open,
            Some(_) if inner.trial_in_flight => BreakerState::Open,
            Some(_) => {
                inner.trial_in_flight = true;
                BreakerState::HalfOpen
            }
            None => BreakerState::Closed,
        }
    }

    fn on_success(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            *inner = BreakerInner::default();
        }
    }

    fn on_failure(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.consecutive_failures += 1;
            inner.trial_in_flight = false;
            if inner.consecutive_failures >= self.threshold {
                inner.open_until = Some(Instant::now() + self.cooldown);
                tracing::warn!(
                    failures = inner.consecutive_failures,
                    "Stripe circuit opened"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_threshold_and_half_opens_after_cooldown() {
        let breaker = Breaker::new(2, Duration::from_millis(30));
        assert_eq!(breaker.admit(), BreakerState::Closed);
        breaker.on_failure();
        assert_eq!(breaker.admit(), BreakerState::Closed);
        breaker.on_failure();
        assert_eq!(breaker.admit(), BreakerState::Open);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(breaker.admit(), BreakerState::HalfOpen);
        assert_eq!(
            breaker.admit(),
            BreakerState::Open,
            "one trial call at a time"
        );
        breaker.on_failure();
        assert_eq!(
            breaker.admit(),
            BreakerState::Open,
            "a failed trial reopens"
        );
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(breaker.admit(), BreakerState::HalfOpen);
        breaker.on_success();
        assert_eq!(breaker.admit(), BreakerState::Closed);
    }
}
