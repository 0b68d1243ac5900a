//! The `order.completed` event: what billing publishes once a charge is recorded, and what notifications
//! consumes to send the confirmation e-mail.

/// The subject billing publishes to.
pub const ORDER_COMPLETED: &str = "order.completed";
/// Where a message goes after its last failed delivery, or when it cannot be read at all.
pub const ORDER_COMPLETED_DEAD_LETTER: &str = "order.completed.dead";
/// The JetStream stream holding both subjects (default of `NATS_STREAM`).
pub const ORDERS_STREAM: &str = "ORDERS";
/// The notifier's durable consumer (default of `NATS_CONSUMER`).
pub const NOTIFICATIONS_CONSUMER: &str = "notifications";

/// Payload of [`ORDER_COMPLETED`] (JSON). Its `event_id` is also the message's `Nats-Msg-Id`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCompleted {
    pub event_id: uuid::Uuid,
    pub order_id: uuid::Uuid,
    pub user_id: uuid::Uuid,
    pub email: String,
    pub amount_minor: i64,
    pub currency: String,
    pub charge_id: String,
}

impl OrderCompleted {
    /// The event id of an order's `order.completed`: derived from the order (UUID v5), so however often a
    /// charge is recorded, its event has one id, one outbox row and one `Nats-Msg-Id`.
    pub fn event_id_of(order_id: uuid::Uuid) -> uuid::Uuid {
        uuid::Uuid::new_v5(&order_id, ORDER_COMPLETED.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_order_has_one_event_id() {
        let order = uuid::Uuid::new_v4();
        assert_eq!(
            OrderCompleted::event_id_of(order),
            OrderCompleted::event_id_of(order)
        );
        assert_ne!(
            OrderCompleted::event_id_of(order),
            OrderCompleted::event_id_of(uuid::Uuid::new_v4())
        );
    }

    proptest! {
        #[test]
        fn any_bytes_parse_or_fail_cleanly(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = serde_json::from_slice::<OrderCompleted>(&payload);
        }
    }
}
