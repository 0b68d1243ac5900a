//! notifications's HTTP API, for the gateway only (service token checked first, `tracehop-identity`).

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use diesel::{OptionalExtension, QueryDsl, RunQueryDsl};
use tracehop_contracts::notifications::{NotificationQuery, NotificationView};
use tracehop_contracts::schema::notifications;
use tracehop_identity::Authenticated;
use tracehop_telemetry::db::{Database, traced};
use tracehop_telemetry::http::ApiError;

/// Shared by the handlers.
pub struct State {
    pub database: Database,
    /// `NOTIFICATIONS_RETENTION_DAYS`: an order older than this may have had its record deleted.
    pub retention: std::time::Duration,
}

/// `GET /notifications/{orderId}?orderedAt=...`: the state of an order's confirmation e-mail. The gateway
/// asks after billing has confirmed that the order is the caller's; a token that names no user is refused.
pub async fn get_notification(
    state: web::Data<State>,
    caller: Authenticated,
    order_id: web::Path<uuid::Uuid>,
    query: web::Query<NotificationQuery>,
) -> Result<HttpResponse, ApiError> {
    if caller.user.is_none() {
        return Err(ApiError::unauthorized("the service token names no user"));
    }
    let order_id = order_id.into_inner();
    let row = state
        .database
        .run(move |connection, statements| {
            let query = notifications::table.find(order_id).select((
                notifications::status,
                notifications::attempts,
                notifications::last_error,
                notifications::sent_at,
            ));
            Ok(traced(statements, query, |query| {
                query
                    .first::<(String, i32, Option<String>, Option<DateTime<Utc>>)>(connection)
                    .optional()
            })?)
        })
        .await
        .map_err(|error| ApiError::from_db(&error, "notifications"))?;
    let view = match row {
        Some((status, attempts, last_error, sent_at)) => NotificationView {
            status,
            attempts,
            last_error,
            sent_at,
        },
        None => NotificationView {
            status: unrecorded(query.ordered_at, state.retention, Utc::now()).to_owned(),
            attempts: 0,
            last_error: None,
            sent_at: None,
        },
    };
    Ok(HttpResponse::Ok().json(view))
}

/// What an order without a record means: its event is still on its way (`pending`), or the order is older
/// than the records are kept and its record was deleted (`purged`).
fn unrecorded(
    ordered_at: DateTime<Utc>,
    retention: std::time::Duration,
    now: DateTime<Utc>,
) -> &'static str {
    let kept = chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    if now.signed_duration_since(ordered_at) > kept {
        "purged"
    } else {
        "pending"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_record_is_pending_when_recent_and_purged_when_old() {
        let now = Utc::now();
        let thirty_days = std::time::Duration::from_secs(30 * 86_400);
        assert_eq!(unrecorded(now, thirty_days, now), "pending");
        assert_eq!(
            unrecorded(now - chrono::Duration::days(31), thirty_days, now),
            "purged"
        );
    }
}
