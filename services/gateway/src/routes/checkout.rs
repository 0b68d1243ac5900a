//! `POST /checkout`: the heart of tracehop. One call here is one trace across all four services.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::value::RawValue;
use tracehop_contracts::billing::{ChargeReceipt, ChargeRequest};
use tracehop_contracts::domain::{Amount, Currency, IdempotencyKey};
use tracehop_contracts::gateway::CheckoutResponse;
use tracehop_identity::EndUser;
use tracehop_telemetry::http::ApiError;
use tracehop_telemetry::http::error::record_failure;

use super::authorization;
use crate::upstream::{Delivery, Upstream, Upstreams};

/// `{"total": "49.99" | 49.99, "currency": "usd"}`. The total is kept as raw JSON text so that a JSON number
/// is never rounded through a float.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutRequest {
    total: Box<RawValue>,
    currency: String,
}

/// What is wrong with a checkout body.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutInputError {
    #[error("total must be a decimal string like \"49.99\" or a JSON number")]
    TotalType,
    #[error("invalid total: {0}")]
    Total(#[from] tracehop_contracts::domain::MoneyError),
    #[error("{0}")]
    Currency(#[from] tracehop_contracts::domain::currency::UnknownCurrency),
    #[error("Idempotency-Key must be 1 to 255 printable ASCII characters")]
    IdempotencyKey,
}

impl From<CheckoutInputError> for ApiError {
    fn from(error: CheckoutInputError) -> Self {
        let code = match error {
            CheckoutInputError::TotalType | CheckoutInputError::Total(_) => "invalid_total",
            CheckoutInputError::Currency(_) => "invalid_currency",
            CheckoutInputError::IdempotencyKey => "invalid_idempotency_key",
        };
        ApiError::bad_request(code, error.to_string())
    }
}

/// Parses the total from its raw JSON text: a string or a plain number, never `1e3`.
fn parse_total(raw: &RawValue, currency: Currency) -> Result<Amount, CheckoutInputError> {
    let text = raw.get().trim();
    let decimal = if text.starts_with('"') {
        serde_json::from_str::<String>(text).map_err(|_| CheckoutInputError::TotalType)?
    } else if text.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
        text.to_owned()
    } else {
        return Err(CheckoutInputError::TotalType);
    };
    Ok(Amount::parse(&decimal, currency)?)
}

fn idempotency_key(request: &HttpRequest) -> Result<IdempotencyKey, CheckoutInputError> {
    match request.headers().get("idempotency-key") {
        None => Ok(IdempotencyKey::generate()),
        Some(value) => value
            .to_str()
            .ok()
            .and_then(|key| IdempotencyKey::parse(key).ok())
            .ok_or(CheckoutInputError::IdempotencyKey),
    }
}

pub async fn checkout(
    upstreams: web::Data<Upstreams>,
    request: HttpRequest,
    body: web::Json<CheckoutRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let currency = Currency::parse(&body.currency).map_err(CheckoutInputError::from)?;
    let amount = parse_total(&body.total, currency)?;
    let key = idempotency_key(&request)?;
    let key_text = key.as_str().to_owned();
    let response = process(&upstreams, authorization(&request), amount, key).await?;
    // The key used (the caller's, or the one made up for it) always comes back: it is what makes a retry
    // safe, above all when the outcome is not known yet (202, status "pending").
    let mut answer = if response.status == "pending" {
        HttpResponse::Accepted()
    } else {
        HttpResponse::Ok()
    };
    Ok(answer
        .insert_header(("Idempotency-Key", key_text))
        .json(response))
}

#[tracing::instrument(
    name = "checkout.process",
    skip_all,
    fields(
        user.id = tracing::field::Empty,
        order.total = %amount.decimal(),
        order.total_minor = amount.minor_units(),
        order.currency = %amount.currency(),
        order.id = tracing::field::Empty,
    )
)]
async fn process(
    upstreams: &Upstreams,
    authorization: Option<&str>,
    amount: Amount,
    idempotency_key: IdempotencyKey,
) -> Result<CheckoutResponse, ApiError> {
    record_failure(
        async {
            let span = tracing::Span::current();
            let user = upstreams.validate_session(authorization).await?;
            span.record("user.id", tracing::field::display(user.user_id));
            let key = idempotency_key.into_string();

            // Whom to charge travels in the signed service token, not in the body.
            let customer = EndUser {
                user_id: user.user_id,
                email: user.email,
            };
            let request = upstreams
                .request(
                    Upstream::Billing,
                    reqwest::Method::POST,
                    "/charge",
                    Some(&customer),
                )?
                .json(&ChargeRequest {
                    amount_minor: amount.minor_units(),
                    currency: amount.currency().code().to_owned(),
                    idempotency_key: key.clone(),
                });
            let order_id = tracehop_contracts::billing::order_id(user.user_id, &key);
            let receipt = match upstreams
                .call_once::<ChargeReceipt>(Upstream::Billing, "/charge", request)
                .await?
            {
                Delivery::Answered(receipt) => receipt,
                // billing may have charged: the order is the one this key names, its outcome unknown.
                Delivery::Lost => ChargeReceipt {
                    order_id,
                    charge_id: None,
                    status: "pending".into(),
                    replayed: false,
                },
            };
            span.record("order.id", tracing::field::display(receipt.order_id));
            let status = if receipt.status == "pending" {
                "pending"
            } else {
                "completed"
            };
            Ok(CheckoutResponse {
                order_id: receipt.order_id,
                status: status.into(),
                trace_id: tracehop_telemetry::setup::current_trace_id(),
                idempotency_key: key,
            })
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(json: &str) -> Result<i64, CheckoutInputError> {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        parse_total(&raw, Currency::parse("usd").unwrap()).map(|a| a.minor_units())
    }

    #[test]
    fn totals_from_strings_and_numbers() {
        assert_eq!(total(r#""49.99""#).unwrap(), 4999);
        assert_eq!(total("49.99").unwrap(), 4999);
        assert_eq!(total("12").unwrap(), 1200);
        assert!(total("1e3").is_err());
        assert!(total("-1").is_err());
        assert!(total("0").is_err());
        assert!(total("true").is_err());
        assert!(total("null").is_err());
        assert!(total(r#"{"a":1}"#).is_err());
        assert!(total("0.001").is_err());
    }
}
