//! `POST /charge`: charge a user (called by the gateway).

use actix_web::{HttpResponse, web};
use tracehop_contracts::billing::{ChargeReceipt, ChargeRequest};
use tracehop_contracts::domain::{Amount, Currency, Email, IdempotencyKey};
use tracehop_identity::Authenticated;
use tracehop_telemetry::actor::Traced;
use tracehop_telemetry::http::ApiError;

use super::State;
use crate::actors::{Charge, ChargeError, StripeError};

impl From<ChargeError> for ApiError {
    fn from(error: ChargeError) -> Self {
        let message = error.to_string();
        match error {
            ChargeError::IdempotencyKeyReused => ApiError::new(
                actix_web::http::StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                message,
            ),
            ChargeError::InProgress => ApiError::conflict("checkout_in_progress", message),
            ChargeError::Payment(StripeError::Declined(_)) => ApiError::new(
                actix_web::http::StatusCode::PAYMENT_REQUIRED,
                "payment_declined",
                message,
            ),
            ChargeError::Payment(StripeError::CircuitOpen) => {
                ApiError::unavailable("payment_provider_unavailable", message)
            }
            // The provider's own text (and its address) stays in the trace and the log.
            ChargeError::Payment(StripeError::Rejected { .. }) => ApiError::bad_gateway(
                "payment_provider_error",
                "the payment provider refused the charge",
            ),
            ChargeError::Payment(StripeError::Unavailable { attempts, .. }) => {
                ApiError::bad_gateway(
                    "payment_provider_error",
                    format!(
                        "the payment provider is unavailable after {attempts} attempts; retry later"
                    ),
                )
            }
            ChargeError::Database(error) => ApiError::from_db(&error, "billing"),
            ChargeError::Internal(_) => ApiError::internal(message),
            // Answered 202 by the handler; this arm only keeps the conversion total.
            ChargeError::OutcomeUnknown { .. } => {
                ApiError::unavailable("charge_outcome_unknown", message)
            }
        }
    }
}

pub async fn charge(
    state: web::Data<State>,
    caller: Authenticated,
    body: web::Json<ChargeRequest>,
) -> Result<HttpResponse, ApiError> {
    // The customer comes from the gateway's signed token, never from the body.
    let Some(customer) = caller.0.user else {
        return Err(ApiError::unauthorized("the service token names no user"));
    };
    let request = body.into_inner();
    let currency = Currency::parse(&request.currency)
        .map_err(|error| ApiError::bad_request("invalid_currency", error.to_string()))?;
    let amount = Amount::from_minor_units(request.amount_minor, currency)
        .map_err(|error| ApiError::bad_request("invalid_amount", error.to_string()))?;
    let email = Email::parse(&customer.email)
        .map_err(|error| ApiError::bad_request("invalid_email", error.to_string()))?;
    let key = IdempotencyKey::parse(&request.idempotency_key)
        .map_err(|error| ApiError::bad_request("invalid_idempotency_key", error.to_string()))?;
    let outcome = state
        .billing
        .send(Traced::new(Charge {
            user_id: customer.user_id,
            email: email.as_str().to_owned(),
            amount_minor: amount.minor_units(),
            currency: currency.code().to_owned(),
            idempotency_key: key.into_string(),
        }))
        .await
        .map_err(|error| ApiError::unavailable("billing_unavailable", error.to_string()))?;
    match outcome {
        Ok(receipt) => Ok(HttpResponse::Ok().json(receipt)),
        // Not known yet: 202 with the order id, so the caller can look it up or retry with the same key.
        Err(ChargeError::OutcomeUnknown { order_id, .. }) => {
            Ok(HttpResponse::Accepted().json(ChargeReceipt {
                order_id,
                charge_id: None,
                status: "pending".into(),
                replayed: false,
            }))
        }
        Err(error) => Err(error.into()),
    }
}
