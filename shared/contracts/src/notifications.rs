//! notifications's HTTP API: `GET /notifications/{orderId}?orderedAt=<RFC 3339>`, the state of an order's
//! confirmation e-mail (called by the gateway, with its service token, after billing has confirmed the
//! order's owner).

use chrono::{DateTime, Utc};

/// The query of `GET /notifications/{orderId}`: when the order was made, so that an order with no record
/// can be told apart: not yet received (`pending`) or older than the records are kept (`purged`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NotificationQuery {
    pub ordered_at: DateTime<Utc>,
}

/// The confirmation e-mail's state.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NotificationView {
    /// `pending`, `sent`, `failed`, or `purged` (its record is older than the notifications' retention).
    pub status: String,
    pub attempts: i32,
    /// A code (`smtp_rejected`, `injected`, ...), never a message.
    pub last_error: Option<String>,
    pub sent_at: Option<DateTime<Utc>>,
}
