//! billing's HTTP API: `POST /charge` and `GET /orders/{orderId}`.

use chrono::{DateTime, Utc};

/// `POST /charge`, sent by the gateway for a checkout. Whom to charge and where to send the receipt are not
/// in the body: they come from the gateway's signed service token (`tracehop-identity`), which a caller
/// cannot write.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChargeRequest {
    pub amount_minor: i64,
    pub currency: String,
    pub idempotency_key: String,
}

/// The answer to [`ChargeRequest`]: a recorded charge.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChargeReceipt {
    pub order_id: uuid::Uuid,
    pub charge_id: String,
    pub status: String,
    /// True when this answer replays an earlier request with the same idempotency key.
    pub replayed: bool,
}

/// The answer to `GET /orders/{orderId}`: an order (its confirmation e-mail is notifications' to tell).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderView {
    pub order_id: uuid::Uuid,
    pub user_id: uuid::Uuid,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    pub charge_id: Option<String>,
    /// The trace of the checkout that created the order.
    pub trace_id: String,
    pub created_at: DateTime<Utc>,
}
