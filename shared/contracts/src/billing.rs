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

/// The answer to [`ChargeRequest`]: 200 with status `completed` (a recorded charge, `chargeId` set), or
/// 202 with status `pending` when the charge's outcome is not known yet (the payment provider timed out or
/// failed after the request may have reached it, or the charge was made but could not be recorded): the
/// order stays `pending` until the reconciler settles it with the provider. Retrying with the same key then
/// answers the settled order; nothing is charged twice.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChargeReceipt {
    pub order_id: uuid::Uuid,
    pub charge_id: Option<String>,
    pub status: String,
    /// True when this answer replays an earlier request with the same idempotency key.
    pub replayed: bool,
}

/// The namespace of order ids.
const ORDER_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x7a1c_e40b_5f7e_4b8e_9a55_3c1d_0e2f_6b90);

/// The id of the order a checkout makes: derived from (user, idempotency key), so every retry with the same
/// key names the same order, and the gateway can name it even when billing's answer never arrived.
///
/// ```
/// let user = uuid::Uuid::new_v4();
/// let first = tracehop_contracts::billing::order_id(user, "key-1");
/// assert_eq!(first, tracehop_contracts::billing::order_id(user, "key-1"));
/// assert_ne!(first, tracehop_contracts::billing::order_id(user, "key-2"));
/// ```
pub fn order_id(user_id: uuid::Uuid, idempotency_key: &str) -> uuid::Uuid {
    uuid::Uuid::new_v5(
        &ORDER_ID_NAMESPACE,
        format!("{user_id}:{idempotency_key}").as_bytes(),
    )
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
