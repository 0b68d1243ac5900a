//! `GET /orders/{orderId}`: an order and whether its confirmation e-mail went out. Owner only: another
//! user's order is a 404, so ids cannot be probed.

use actix_web::{HttpRequest, HttpResponse, web};
use tracehop_shared::domain::{Amount, Currency};
use tracehop_shared::http::ApiError;
use tracehop_shared::http::error::record_failure;

use super::authorization;
use crate::upstream::Upstreams;

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct BillingOrder {
    order_id: uuid::Uuid,
    user_id: uuid::Uuid,
    amount_minor: i64,
    currency: String,
    status: String,
    charge_id: Option<String>,
    trace_id: String,
    created_at: String,
    notification: Option<BillingNotification>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct BillingNotification {
    status: String,
    attempts: i32,
    last_error: Option<String>,
}

#[tracing::instrument(name = "order.lookup", skip_all, fields(order.id = %order_id, user.id = tracing::field::Empty))]
pub async fn get_order(
    upstreams: web::Data<Upstreams>,
    request: HttpRequest,
    order_id: web::Path<uuid::Uuid>,
) -> Result<HttpResponse, ApiError> {
    record_failure(
        async {
            let order_id = order_id.into_inner();
            let user = upstreams.validate_session(authorization(&request)).await?;
            tracing::Span::current().record("user.id", tracing::field::display(user.user_id));
            let lookup = upstreams.client.request(
                reqwest::Method::GET,
                &format!("{}/orders/{order_id}", upstreams.billing_url),
            );
            let order: BillingOrder = upstreams
                .call("billing-service", "/orders/{order_id}", lookup)
                .await?;
            if order.user_id != user.user_id {
                return Err(ApiError::not_found("order_not_found", "no such order"));
            }
            let amount = Currency::parse(&order.currency)
                .ok()
                .and_then(|currency| Amount::from_minor_units(order.amount_minor, currency).ok())
                .map(|amount| amount.decimal())
                .unwrap_or_else(|| order.amount_minor.to_string());
            let notification = order.notification.as_ref();
            Ok(HttpResponse::Ok().json(serde_json::json!({
                "orderId": order.order_id,
                "amount": amount,
                "amountMinor": order.amount_minor,
                "currency": order.currency,
                "status": order.status,
                "chargeId": order.charge_id,
                "createdAt": order.created_at,
                "notification": notification.map(|n| n.status.as_str()).unwrap_or("pending"),
                "notificationAttempts": notification.map(|n| n.attempts).unwrap_or(0),
                "notificationError": notification.and_then(|n| n.last_error.clone()),
                // The trace of the checkout that created the order (not of this lookup).
                "checkoutTraceId": order.trace_id,
            })))
        }
        .await,
    )
}
