//! # stripe-sim
//!
//! The part of the Stripe API that billing uses, spoken over real HTTP so the billing service's client,
//! timeouts and retries are exercised for real. It is a test double for a third party we cannot reach from
//! here; it is deliberately *not* traced (Stripe does not send us its spans either).
//!
//! - `POST /v1/charges` (form-encoded `amount`, `currency`, `customer`, `description`, `metadata[...]`),
//!   `Authorization: Bearer sk_test_...`, `Idempotency-Key` replay (same key and parameters -> the same
//!   charge with `Idempotent-Replayed: true`; same key, other parameters -> 400 `idempotency_error`).
//! - `GET /v1/charges/{id}`, and `GET /v1/charges/search?query=metadata['order_id']:'...'` (reconciliation).
//! - Faults, from the environment at start (`STRIPE_SIM_LATENCY_MS`, `STRIPE_SIM_FAIL_RATE`) or at any time
//!   through `POST /_admin/faults` with `{"latencyMs", "failRate", "failNext", "failStatus", "hangNext",
//!   "hangMs", "declineNext", "slowShare", "slowMs"}`; `DELETE /_admin/faults` resets; `GET /_admin/charges`
//!   lists every charge (tests count them); `GET /_admin/trace-headers` lists the W3C headers
//!   (`traceparent`, `tracestate`, `baggage`) of every charge request, as a third party would see them.
//!
//! A "hang" sleeps *before* the charge is created, like a request stuck in a load balancer: a client that
//! times out and retries with the same idempotency key gets exactly one charge.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, web};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Start-up settings.
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub faults: Faults,
}

impl Settings {
    pub fn from_env() -> std::io::Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let invalid = |name: &str| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("invalid {name}"))
        };
        let port = match var("STRIPE_SIM_PORT") {
            Some(port) => port
                .trim()
                .parse()
                .map_err(|_| invalid("STRIPE_SIM_PORT"))?,
            None => 12111,
        };
        let mut faults = Faults::default();
        if let Some(latency) = var("STRIPE_SIM_LATENCY_MS") {
            faults.latency_ms = latency
                .trim()
                .parse()
                .map_err(|_| invalid("STRIPE_SIM_LATENCY_MS"))?;
        }
        if let Some(rate) = var("STRIPE_SIM_FAIL_RATE") {
            faults.fail_rate = rate
                .trim()
                .parse()
                .map_err(|_| invalid("STRIPE_SIM_FAIL_RATE"))?;
        }
        Ok(Self {
            host: var("STRIPE_SIM_HOST").unwrap_or_else(|| "127.0.0.1".into()),
            port,
            faults,
        })
    }
}

/// Injected faults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Faults {
    /// Added to every charge request.
    pub latency_ms: u64,
    /// Share of charge requests answered with `fail_status` (0.0 to 1.0).
    pub fail_rate: f64,
    /// The next N charge requests fail with `fail_status`.
    pub fail_next: u32,
    /// Status for injected failures (default 500).
    pub fail_status: Option<u16>,
    /// The next N charge requests sleep `hang_ms` before being processed.
    pub hang_next: u32,
    pub hang_ms: u64,
    /// The next N charge requests are declined (402 `card_declined`).
    pub decline_next: u32,
    /// Share of charge requests (0.0 to 1.0) delayed by `slow_ms`: a provider that is sometimes slow, for
    /// realistic latency tails under load (`stack load --slow-stripe-share`).
    pub slow_share: f64,
    pub slow_ms: u64,
}

/// A created charge, as Stripe returns it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Charge {
    pub id: String,
    pub object: String,
    pub amount: i64,
    pub currency: String,
    pub customer: Option<String>,
    pub description: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub status: String,
    pub paid: bool,
    pub captured: bool,
    pub livemode: bool,
    pub created: i64,
}

struct Stored {
    fingerprint: String,
    charge: Charge,
}

#[derive(Default)]
struct Ledger {
    charges: Vec<Charge>,
    by_idempotency_key: HashMap<String, Stored>,
}

struct State {
    faults: Mutex<Faults>,
    ledger: Mutex<Ledger>,
    /// The trace headers of each charge request, in order of arrival (the most recent 10 000).
    trace_headers: Mutex<std::collections::VecDeque<TraceHeaders>>,
}

/// The W3C headers one request carried.
#[derive(Debug, Clone, Serialize)]
struct TraceHeaders {
    traceparent: Option<String>,
    tracestate: Option<String>,
    baggage: Option<String>,
}

/// A bound server.
pub struct Running {
    pub port: u16,
    pub server: actix_web::dev::Server,
}

/// Binds and starts the simulator (port 0 picks a free port).
pub fn build(settings: Settings) -> std::io::Result<Running> {
    let listener = std::net::TcpListener::bind((settings.host.as_str(), settings.port))?;
    let port = listener.local_addr()?.port();
    let state = web::Data::new(State {
        faults: Mutex::new(settings.faults),
        ledger: Mutex::new(Ledger::default()),
        trace_headers: Mutex::default(),
    });
    let server = actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(state.clone())
            .app_data(web::FormConfig::default().limit(16 * 1024))
            .route(
                "/healthz",
                web::get()
                    .to(|| async { HttpResponse::Ok().json(serde_json::json!({"status": "ok"})) }),
            )
            .route("/v1/charges", web::post().to(create_charge))
            .route("/v1/charges/search", web::get().to(search_charges))
            .route("/v1/charges/{id}", web::get().to(get_charge))
            .configure(admin_routes)
    })
    .listen(listener)?
    .shutdown_timeout(2)
    .run();
    Ok(Running { port, server })
}

/// The test hooks under `/_admin`: only with the `fault-injection` feature (a production image has none).
fn admin_routes(config: &mut web::ServiceConfig) {
    #[cfg(feature = "fault-injection")]
    config
        .route("/_admin/faults", web::get().to(get_faults))
        .route("/_admin/faults", web::post().to(set_faults))
        .route("/_admin/faults", web::delete().to(reset_faults))
        .route("/_admin/charges", web::get().to(list_charges))
        .route("/_admin/trace-headers", web::get().to(list_trace_headers));
    #[cfg(not(feature = "fault-injection"))]
    let _ = config;
}

fn stripe_error(status: u16, kind: &str, code: Option<&str>, message: &str) -> HttpResponse {
    let status = actix_web::http::StatusCode::from_u16(status)
        .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status).json(serde_json::json!({
        "error": {"type": kind, "code": code, "message": message}
    }))
}

/// Stripe's answer to a request without a test secret key (`Bearer sk_test_...`): 401; `None` when the
/// key is there.
fn refuse_without_test_key(request: &HttpRequest) -> Option<HttpResponse> {
    let has_test_key = request
        .headers()
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .is_some_and(|key| key.starts_with("sk_test_") && key.len() > "sk_test_".len());
    (!has_test_key).then(|| {
        stripe_error(
            401,
            "invalid_request_error",
            None,
            "Invalid API Key provided.",
        )
    })
}

enum Injected {
    None,
    Fail(u16),
    Decline,
}

/// Applies latency and hangs (sleeping), and decides whether this request fails.
async fn apply_faults(state: &State) -> Injected {
    let (delay, injected) = {
        let Ok(mut faults) = state.faults.lock() else {
            return Injected::Fail(500);
        };
        let mut delay = Duration::from_millis(faults.latency_ms);
        if faults.hang_next > 0 {
            faults.hang_next -= 1;
            delay += Duration::from_millis(faults.hang_ms);
        }
        if faults.slow_share > 0.0 && rand::rng().random_bool(faults.slow_share.clamp(0.0, 1.0)) {
            delay += Duration::from_millis(faults.slow_ms);
        }
        let status = faults.fail_status.unwrap_or(500);
        let injected = if faults.fail_next > 0 {
            faults.fail_next -= 1;
            Injected::Fail(status)
        } else if faults.decline_next > 0 {
            faults.decline_next -= 1;
            Injected::Decline
        } else if faults.fail_rate > 0.0
            && rand::rng().random_bool(faults.fail_rate.clamp(0.0, 1.0))
        {
            Injected::Fail(status)
        } else {
            Injected::None
        };
        (delay, injected)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    injected
}

fn new_charge_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..24)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("ch_{suffix}")
}

async fn create_charge(
    state: web::Data<State>,
    request: HttpRequest,
    form: web::Form<Vec<(String, String)>>,
) -> HttpResponse {
    if let Some(refused) = refuse_without_test_key(&request) {
        return refused;
    }
    record_trace_headers(&state, &request);
    let params: BTreeMap<String, String> = form.into_inner().into_iter().collect();
    let Some(amount) = params
        .get("amount")
        .and_then(|a| a.parse::<i64>().ok())
        .filter(|a| *a > 0)
    else {
        return stripe_error(
            400,
            "invalid_request_error",
            Some("parameter_invalid_integer"),
            "amount must be a positive integer",
        );
    };
    let Some(currency) = params.get("currency").filter(|c| c.len() == 3).cloned() else {
        return stripe_error(
            400,
            "invalid_request_error",
            Some("parameter_missing"),
            "currency must be a three-letter code",
        );
    };
    let idempotency_key = request
        .headers()
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let fingerprint = format!("{params:?}");

    let injected = apply_faults(&state).await;
    if let Injected::Fail(status) = injected {
        return stripe_error(status, "api_error", None, "injected failure (stripe-sim)");
    }

    let Ok(mut ledger) = state.ledger.lock() else {
        return stripe_error(500, "api_error", None, "ledger unavailable");
    };
    if let Some(key) = &idempotency_key
        && let Some(stored) = ledger.by_idempotency_key.get(key)
    {
        if stored.fingerprint != fingerprint {
            return stripe_error(
                400,
                "idempotency_error",
                None,
                "Keys for idempotent requests can only be used with the same parameters they were first used with.",
            );
        }
        // Stripe replays the first answer for a key, a decline included.
        if stored.charge.status == "failed" {
            return declined(&stored.charge.id);
        }
        return HttpResponse::Ok()
            .insert_header(("Idempotent-Replayed", "true"))
            .json(&stored.charge);
    }
    let declining = matches!(injected, Injected::Decline);
    let metadata = params
        .iter()
        .filter_map(|(key, value)| {
            key.strip_prefix("metadata[")
                .and_then(|rest| rest.strip_suffix(']'))
                .map(|name| (name.to_owned(), value.clone()))
        })
        .collect();
    let charge = Charge {
        id: new_charge_id(),
        object: "charge".into(),
        amount,
        currency: currency.to_lowercase(),
        customer: params.get("customer").cloned(),
        description: params.get("description").cloned(),
        metadata,
        // As real Stripe does, a declined charge is kept (status `failed`), and a search finds it.
        status: if declining { "failed" } else { "succeeded" }.into(),
        paid: !declining,
        captured: !declining,
        livemode: false,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or_default(),
    };
    ledger.charges.push(charge.clone());
    if let Some(key) = idempotency_key {
        ledger.by_idempotency_key.insert(
            key,
            Stored {
                fingerprint,
                charge: charge.clone(),
            },
        );
    }
    if declining {
        tracing::info!(charge = %charge.id, amount, currency = %charge.currency, "charge declined");
        return declined(&charge.id);
    }
    tracing::info!(charge = %charge.id, amount, currency = %charge.currency, "charge created");
    HttpResponse::Ok().json(charge)
}

/// Stripe's 402 for a declined card, naming the failed charge it kept.
fn declined(charge_id: &str) -> HttpResponse {
    HttpResponse::PaymentRequired().json(serde_json::json!({
        "error": {
            "type": "card_error",
            "code": "card_declined",
            "decline_code": "generic_decline",
            "message": "Your card was declined.",
            "charge": charge_id,
        }
    }))
}

async fn get_charge(
    state: web::Data<State>,
    request: HttpRequest,
    id: web::Path<String>,
) -> HttpResponse {
    if let Some(refused) = refuse_without_test_key(&request) {
        return refused;
    }
    let Ok(ledger) = state.ledger.lock() else {
        return stripe_error(500, "api_error", None, "ledger unavailable");
    };
    match ledger.charges.iter().find(|charge| charge.id == *id) {
        Some(charge) => HttpResponse::Ok().json(charge),
        None => stripe_error(
            404,
            "invalid_request_error",
            Some("resource_missing"),
            "No such charge",
        ),
    }
}

#[derive(Deserialize)]
struct SearchQuery {
    query: String,
}

/// `GET /v1/charges/search?query=metadata['order_id']:'<id>'`: the one search form billing uses to
/// reconcile (Stripe's search query language, reduced to a metadata equality).
async fn search_charges(
    state: web::Data<State>,
    request: HttpRequest,
    query: web::Query<SearchQuery>,
) -> HttpResponse {
    if let Some(refused) = refuse_without_test_key(&request) {
        return refused;
    }
    let parsed = query
        .query
        .strip_prefix("metadata['")
        .and_then(|rest| rest.split_once("']:'"))
        .and_then(|(key, value)| {
            value
                .strip_suffix('\'')
                .map(|value| (key.to_owned(), value.to_owned()))
        });
    let Some((key, value)) = parsed else {
        return stripe_error(
            400,
            "invalid_request_error",
            Some("parameter_invalid"),
            "unsupported search query",
        );
    };
    let Ok(ledger) = state.ledger.lock() else {
        return stripe_error(500, "api_error", None, "ledger unavailable");
    };
    let found: Vec<&Charge> = ledger
        .charges
        .iter()
        .filter(|charge| charge.metadata.get(&key) == Some(&value))
        .collect();
    HttpResponse::Ok().json(serde_json::json!({"object": "search_result", "data": found}))
}

#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
async fn get_faults(state: web::Data<State>) -> HttpResponse {
    match state.faults.lock() {
        Ok(faults) => HttpResponse::Ok().json(&*faults),
        Err(_) => HttpResponse::InternalServerError().finish(),
    }
}

#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
async fn set_faults(state: web::Data<State>, faults: web::Json<Faults>) -> HttpResponse {
    match state.faults.lock() {
        Ok(mut current) => {
            *current = faults.into_inner();
            tracing::info!(faults = ?*current, "faults set");
            HttpResponse::Ok().json(&*current)
        }
        Err(_) => HttpResponse::InternalServerError().finish(),
    }
}

#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
async fn reset_faults(state: web::Data<State>) -> HttpResponse {
    match state.faults.lock() {
        Ok(mut current) => {
            *current = Faults::default();
            HttpResponse::Ok().json(&*current)
        }
        Err(_) => HttpResponse::InternalServerError().finish(),
    }
}

#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
async fn list_charges(state: web::Data<State>) -> HttpResponse {
    match state.ledger.lock() {
        Ok(ledger) => HttpResponse::Ok().json(serde_json::json!({
            "object": "list",
            "data": ledger.charges,
        })),
        Err(_) => HttpResponse::InternalServerError().finish(),
    }
}

fn record_trace_headers(state: &State, request: &HttpRequest) {
    let header = |name: &str| {
        let values: Vec<&str> = request
            .headers()
            .get_all(name)
            .filter_map(|value| value.to_str().ok())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    };
    let seen = TraceHeaders {
        traceparent: header("traceparent"),
        tracestate: header("tracestate"),
        baggage: header("baggage"),
    };
    if let Ok(mut log) = state.trace_headers.lock() {
        if log.len() == 10_000 {
            log.pop_front();
        }
        log.push_back(seen);
    }
}

#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
async fn list_trace_headers(state: web::Data<State>) -> HttpResponse {
    match state.trace_headers.lock() {
        Ok(log) => HttpResponse::Ok().json(serde_json::json!({"data": *log})),
        Err(_) => HttpResponse::InternalServerError().finish(),
    }
}

#[cfg(test)]
mod tests {
    use actix_web::{App, test, web};

    use super::*;

    /// As real Stripe: a declined charge is kept with status `failed`, found by the reconciler's search, and
    /// a retry with the same idempotency key gets the same decline.
    #[actix_rt::test]
    async fn a_declined_charge_is_kept_found_and_replayed() {
        let state = web::Data::new(State {
            faults: Mutex::new(Faults {
                decline_next: 1,
                ..Faults::default()
            }),
            ledger: Mutex::new(Ledger::default()),
            trace_headers: Mutex::default(),
        });
        let app = test::init_service(
            App::new()
                .app_data(state)
                .route("/v1/charges", web::post().to(create_charge))
                .route("/v1/charges/search", web::get().to(search_charges)),
        )
        .await;
        let charge = || {
            test::TestRequest::post()
                .uri("/v1/charges")
                .insert_header(("authorization", "Bearer sk_test_x"))
                .insert_header(("idempotency-key", "key-1"))
                .insert_header(("content-type", "application/x-www-form-urlencoded"))
                .set_payload("amount=1234&currency=eur&metadata[order_id]=order-7")
                .to_request()
        };
        let first = test::call_service(&app, charge()).await;
        assert_eq!(first.status().as_u16(), 402);
        let first: serde_json::Value = test::read_body_json(first).await;
        let charge_id = first["error"]["charge"].as_str().unwrap().to_owned();
        let again: serde_json::Value =
            test::read_body_json(test::call_service(&app, charge()).await).await;
        assert_eq!(
            again["error"]["charge"],
            charge_id.as_str(),
            "the same decline"
        );
        let search = test::TestRequest::get()
            .uri("/v1/charges/search?query=metadata%5B%27order_id%27%5D%3A%27order-7%27")
            .insert_header(("authorization", "Bearer sk_test_x"))
            .to_request();
        let found: serde_json::Value =
            test::read_body_json(test::call_service(&app, search).await).await;
        assert_eq!(found["data"][0]["id"], charge_id.as_str());
        assert_eq!(found["data"][0]["status"], "failed");
        assert_eq!(found["data"][0]["paid"], false);
    }

    /// The `/_admin` test hooks exist only with the `fault-injection` feature: a production build answers
    /// 404 on every one of them (`./dev test` runs this without default features too).
    #[actix_rt::test]
    async fn admin_routes_exist_only_with_their_feature() {
        let state = web::Data::new(State {
            faults: Mutex::new(Faults::default()),
            ledger: Mutex::new(Ledger::default()),
            trace_headers: Mutex::default(),
        });
        let app = test::init_service(App::new().app_data(state).configure(admin_routes)).await;
        for (method, path) in [
            (actix_web::http::Method::GET, "/_admin/faults"),
            (actix_web::http::Method::POST, "/_admin/faults"),
            (actix_web::http::Method::DELETE, "/_admin/faults"),
            (actix_web::http::Method::GET, "/_admin/charges"),
            (actix_web::http::Method::GET, "/_admin/trace-headers"),
        ] {
            let request = test::TestRequest::default()
                .method(method.clone())
                .uri(path)
                .set_json(serde_json::json!({}))
                .to_request();
            let status = test::call_service(&app, request).await.status().as_u16();
            if cfg!(feature = "fault-injection") {
                assert_ne!(status, 404, "{method} {path}");
            } else {
                assert_eq!(status, 404, "{method} {path} in a production build");
            }
        }
    }
}
