//! `GET /orders/{orderId}`: an order and its notification status.

use actix_web::{HttpResponse, web};
use tracehop_telemetry::http::ApiError;

use super::State;
use crate::store;

pub async fn get_order(
    state: web::Data<State>,
    order_id: web::Path<uuid::Uuid>,
) -> Result<HttpResponse, ApiError> {
    let order_id = order_id.into_inner();
    let order = state
        .database
        .run(move |connection, statements| store::order_view(connection, statements, order_id))
        .await
        .map_err(|error| ApiError::from_db(&error, "billing"))?;
    match order {
        Some(order) => Ok(HttpResponse::Ok().json(order)),
        None => Err(ApiError::not_found("order_not_found", "no such order")),
    }
}
