//! The public API's answers (the gateway's), as clients read them.

use chrono::{DateTime, Utc};

/// The answer to `POST /checkout`: 200 with status `completed`, or 202 with status `pending` when the
/// charge's outcome is not known yet. Then do not retry blindly: look the order up, or retry with the same
/// `idempotencyKey`, which never charges twice.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckoutResponse {
    pub order_id: uuid::Uuid,
    pub status: String,
    /// The trace recorded for this checkout.
    pub trace_id: String,
    /// The key this checkout used: the caller's `Idempotency-Key`, or the one the gateway made up (also in
    /// the `Idempotency-Key` response header).
    pub idempotency_key: String,
}

/// The answer to `POST /login`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TokenResponse {
    pub token: crate::domain::Secret,
}

/// The answer to `GET /orders/{orderId}`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderResponse {
    pub order_id: uuid::Uuid,
    /// Decimal text in the currency's minor digits (`"49.99"`).
    pub amount: String,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    pub charge_id: Option<String>,
    pub created_at: DateTime<Utc>,
    /// `pending`, `sent`, `failed`, or `purged` (its record is older than the notifications' retention).
    pub notification: String,
    pub notification_attempts: i32,
    pub notification_error: Option<String>,
    /// The trace of the checkout that created the order (not of the lookup).
    pub checkout_trace_id: String,
}
