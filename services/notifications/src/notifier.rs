//! `NotifierActor`: sends one order confirmation and records it, at most once per order.

use std::sync::Arc;

use actix::{Actor, Context, Handler, ResponseFuture, Supervised};
use chrono::Utc;
use diesel::prelude::*;
use tracehop_contracts::domain::{Amount, Currency};
use tracehop_contracts::events::OrderCompleted;
use tracehop_contracts::schema::notifications;
use tracehop_telemetry::actor::{Traced, supervised_reply};
use tracehop_telemetry::db::{Database, DbError, traced};

use crate::mailer::{Email, MailError, Mailer, Sent};

/// Send the confirmation for this order.
#[derive(Debug, Clone, actix::Message)]
#[rtype(result = "Result<Delivery, NotifyError>")]
pub struct SendConfirmation {
    pub event: OrderCompleted,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sent,
    /// A redelivery of an order whose e-mail was already sent: nothing sent again.
    AlreadySent,
}

/// Why the confirmation was not sent (the message will be redelivered). Displayed as its [`code`]: the
/// details (SQL errors, panic messages) stay in the log.
///
/// [`code`]: NotifyError::code
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("{0}")]
    Mail(#[from] MailError),
    #[error("{}", .0.code())]
    Database(#[from] DbError),
    #[error("notifier_panicked")]
    Panicked(String),
}

impl NotifyError {
    /// The stable code stored in `notifications.last_error`, dead-letter reasons and span status.
    pub fn code(&self) -> &'static str {
        match self {
            NotifyError::Mail(error) => error.code(),
            NotifyError::Database(error) => error.code(),
            NotifyError::Panicked(_) => "notifier_panicked",
        }
    }
}

/// Sends confirmation e-mails. Like billing's actor it holds no state beyond its handles: it is an actor for
/// the traced, supervised hop (a panicking send fails one delivery, which JetStream redelivers, and the
/// actor restarts), not for what it keeps.
pub struct NotifierActor {
    database: Database,
    mailer: Arc<Mailer>,
}

impl NotifierActor {
    pub fn new(database: Database, mailer: Arc<Mailer>) -> Self {
        Self { database, mailer }
    }
}

impl Actor for NotifierActor {
    type Context = Context<Self>;
}

impl Supervised for NotifierActor {
    fn restarting(&mut self, _: &mut Self::Context) {
        tracing::warn!(actor = "NotifierActor", "actor restarting");
    }
}

impl Handler<Traced<SendConfirmation>> for NotifierActor {
    type Result = ResponseFuture<Result<Delivery, NotifyError>>;

    fn handle(
        &mut self,
        message: Traced<SendConfirmation>,
        context: &mut Self::Context,
    ) -> Self::Result {
        let database = self.database.clone();
        let mailer = self.mailer.clone();
        supervised_reply(
            message,
            context,
            |SendConfirmation { event }| async move {
                send_confirmation(&database, &mailer, event).await
            },
            |panic| Err(NotifyError::Panicked(panic)),
        )
    }
}

tracehop_telemetry::restart_on_request!(NotifierActor);

#[tracing::instrument(
    name = "notification.send_confirmation",
    skip_all,
    fields(
        order.id = %event.order_id,
        user.id = %event.user_id,
        otel.status_code = tracing::field::Empty,
        notification.duplicate = tracing::field::Empty,
    ),
    err(Display)
)]
async fn send_confirmation(
    database: &Database,
    mailer: &Mailer,
    event: OrderCompleted,
) -> Result<Delivery, NotifyError> {
    let span = tracing::Span::current();
    let order_id = event.order_id;
    let status = database
        .run(move |connection, statements| {
            let query = notifications::table
                .find(order_id)
                .select(notifications::status);
            Ok(traced(statements, query, |query| {
                query.first::<String>(connection).optional()
            })?)
        })
        .await?;
    if status.as_deref() == Some("sent") {
        span.record("notification.duplicate", true);
        span.record("otel.status_code", "OK");
        return Ok(Delivery::AlreadySent);
    }

    let email = confirmation(&event);
    let sent = mailer.send(&email).await;
    if let Ok(Sent::AlreadyDelivered) = sent {
        span.record("notification.duplicate", true);
    }
    if let Err(error) = sent {
        let code = error.code();
        let recorded = database
            .run(move |connection, statements| {
                record_attempt(connection, statements, &event, "pending", Some(code))
            })
            .await;
        if let Err(db_error) = recorded {
            crate::mailer::log_detail("could not record the failed attempt", &db_error.to_string());
            tracing::warn!(error = db_error.code(), "could not record the failed attempt");
        }
        return Err(error.into());
    }
    database
        .run(move |connection, statements| {
            record_attempt(connection, statements, &event, "sent", None)
        })
        .await?;
    span.record("otel.status_code", "OK");
    Ok(Delivery::Sent)
}

fn confirmation(event: &OrderCompleted) -> Email {
    let amount = Currency::parse(&event.currency)
        .ok()
        .and_then(|currency| Amount::from_minor_units(event.amount_minor, currency).ok())
        .map(|amount| amount.to_string())
        .unwrap_or_else(|| format!("{} {} (minor units)", event.amount_minor, event.currency));
    Email {
        to: event.email.clone(),
        subject: "Order confirmed".to_owned(),
        body: format!(
            "Your order {} for {amount} is confirmed (charge {}).",
            event.order_id, event.charge_id
        ),
        order_id: event.order_id,
        trace_id: tracehop_telemetry::setup::current_trace_id(),
    }
}

/// Records one more attempt and its outcome on the notification row, in one upsert: the first attempt
/// makes the row (it is notifications' own, made from the event), a later one counts on it. A failed
/// attempt never turns a `sent` notification back (a concurrent delivery may have sent it).
fn record_attempt(
    connection: &mut tracehop_telemetry::db::DbConnection,
    statements: &tracehop_telemetry::db::Statements,
    event: &OrderCompleted,
    status: &str,
    error: Option<&str>,
) -> Result<(), DbError> {
    let sent_at = (status == "sent").then(Utc::now);
    let insert = diesel::insert_into(notifications::table).values((
        notifications::order_id.eq(event.order_id),
        notifications::email.eq(&event.email),
        notifications::status.eq(status),
        notifications::attempts.eq(1),
        notifications::last_error.eq(error),
        notifications::sent_at.eq(sent_at),
    ));
    let changes = (
        notifications::status.eq(status),
        notifications::attempts.eq(notifications::attempts + 1),
        notifications::last_error.eq(error),
        notifications::sent_at.eq(sent_at),
        notifications::updated_at.eq(diesel::dsl::now),
    );
    if status == "sent" {
        let query = insert
            .on_conflict(notifications::order_id)
            .do_update()
            .set(changes);
        traced(statements, query, |query| query.execute(connection))?;
    } else {
        let upsert = insert
            .on_conflict(notifications::order_id)
            .do_update()
            .set(changes);
        let query = diesel::query_dsl::methods::FilterDsl::filter(
            upsert,
            notifications::status.ne("sent"),
        );
        traced(statements, query, |query| query.execute(connection))?;
    }
    Ok(())
}

/// Marks a notification as given up on (after the last delivery), unless it was sent meanwhile.
pub fn mark_failed(
    connection: &mut tracehop_telemetry::db::DbConnection,
    statements: &tracehop_telemetry::db::Statements,
    order_id: uuid::Uuid,
    reason: &str,
) -> Result<(), DbError> {
    let query = diesel::update(
        notifications::table
            .filter(notifications::order_id.eq(order_id))
            .filter(notifications::status.ne("sent")),
    )
    .set((
        notifications::status.eq("failed"),
        notifications::last_error.eq(reason),
        notifications::updated_at.eq(diesel::dsl::now),
    ));
    traced(statements, query, |query| query.execute(connection))?;
    Ok(())
}
