//! `GET /orders/{orderId}`: an order (from billing) and whether its confirmation e-mail went out (from
//! notifications). Owner only: another user's order is a 404, so ids cannot be probed.

use actix_web::{HttpRequest, HttpResponse, web};
use tracehop_contracts::billing::OrderView;
use tracehop_contracts::domain::{Amount, Currency};
use tracehop_contracts::gateway::OrderResponse;
use tracehop_contracts::notifications::{NotificationQuery, NotificationView};
use tracehop_identity::EndUser;
use tracehop_telemetry::http::ApiError;
use tracehop_telemetry::http::error::record_failure;

use super::authorization;
use crate::upstream::{Upstream, Upstreams};

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
            // billing checks the owner itself (from the token's user); the check here is the second lock.
            let customer = EndUser {
                user_id: user.user_id,
                email: user.email.clone(),
            };
            let lookup = upstreams.request(
                Upstream::Billing,
                reqwest::Method::GET,
                &format!("/orders/{order_id}"),
                Some(&customer),
            )?;
            let order: OrderView = upstreams
                .call(Upstream::Billing, "/orders/{order_id}", lookup)
                .await?;
            if order.user_id != user.user_id {
                return Err(ApiError::not_found("order_not_found", "no such order"));
            }
            let amount = Currency::parse(&order.currency)
                .ok()
                .and_then(|currency| Amount::from_minor_units(order.amount_minor, currency).ok())
                .map(|amount| amount.decimal())
                .unwrap_or_else(|| order.amount_minor.to_string());
            // The e-mail is notifications' to tell; asked only now that the order is known to be the
            // caller's.
            let lookup = upstreams
                .request(
                    Upstream::Notifications,
                    reqwest::Method::GET,
                    &format!("/notifications/{order_id}"),
                    Some(&customer),
                )?
                .query(&NotificationQuery {
                    ordered_at: order.created_at,
                });
            let notification: NotificationView = upstreams
                .call(Upstream::Notifications, "/notifications/{order_id}", lookup)
                .await?;
            Ok(HttpResponse::Ok().json(OrderResponse {
                order_id: order.order_id,
                amount,
                amount_minor: order.amount_minor,
                currency: order.currency,
                status: order.status,
                charge_id: order.charge_id,
                created_at: order.created_at,
                notification: notification.status,
                notification_attempts: notification.attempts,
                notification_error: notification.last_error,
                checkout_trace_id: order.trace_id,
            }))
        }
        .await,
    )
}
