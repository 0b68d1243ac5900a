//! `GET /orders/{orderId}`: an order and its notification status, for its owner only (the user named in
//! the gateway's token). Anyone else's order is a 404, as if it did not exist.

use actix_web::{HttpResponse, web};
use tracehop_identity::Authenticated;
use tracehop_telemetry::http::ApiError;

use super::State;
use crate::store;

pub async fn get_order(
    state: web::Data<State>,
    caller: Authenticated,
    order_id: web::Path<uuid::Uuid>,
) -> Result<HttpResponse, ApiError> {
    let Some(owner) = caller.0.user else {
        return Err(ApiError::unauthorized("the service token names no user"));
    };
    let order_id = order_id.into_inner();
    let order = state
        .database
        .run(move |connection, statements| store::order_view(connection, statements, order_id))
        .await
        .map_err(|error| ApiError::from_db(&error, "billing"))?;
    match order {
        Some(order) if order.user_id == owner.user_id => Ok(HttpResponse::Ok().json(order)),
        _ => Err(ApiError::not_found("order_not_found", "no such order")),
    }
}
