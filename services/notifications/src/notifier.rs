//! `NotifierActor`: sends one order confirmation and records it, at most once per order.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use actix::{Actor, Addr, Arbiter, Context, Handler, ResponseFuture, Supervised, Supervisor};
use chrono::Utc;
use diesel::prelude::*;
use tracehop_contracts::domain::{Amount, Currency};
use tracehop_contracts::events::OrderCompleted;
use tracehop_contracts::schema::notifications;
use tracehop_telemetry::actor::{Traced, supervised_reply};
use tracehop_telemetry::db::{Database, DbError, RideAlong, Riders, traced};
use tracing::Instrument;

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
    /// Another delivery of this order (a redelivery, another replica) holds the claim and is sending now:
    /// nothing sent here; the message should come back once the claim has run out (`retry_in`), and then
    /// finds the e-mail sent, or takes the claim of a holder that died.
    ClaimedElsewhere {
        retry_in: std::time::Duration,
    },
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
    claims: Claims,
    /// Records sent e-mails: with the next claim, or in a batch of their own after [`SENT_LINGER`].
    sent: RideAlong<uuid::Uuid>,
}

/// The notifier actors: one per core, each on an arbiter (a thread) of its own, so that deliveries use
/// every core; [`Notifiers::next`] spreads them round-robin.
#[derive(Clone)]
pub struct Notifiers {
    actors: Arc<[Addr<NotifierActor>]>,
    next: Arc<AtomicUsize>,
}

impl Notifiers {
    /// Starts `count` supervised actors (at least one). Sent e-mails are recorded with the next claim any
    /// of them makes, or by a writer on the current runtime when no claim comes within [`SENT_LINGER`] or
    /// every one of the consumer's `in_flight` deliveries waits for its record (no claim can come then).
    pub fn start(
        count: usize,
        in_flight: usize,
        database: Database,
        mailer: Arc<Mailer>,
        claims: Claims,
    ) -> Self {
        let sent = RideAlong::start(database.clone(), in_flight, SENT_LINGER, mark_sent);
        let actors = (0..count.max(1))
            .map(|_| {
                let (database, mailer, claims, sent) = (
                    database.clone(),
                    mailer.clone(),
                    claims.clone(),
                    sent.clone(),
                );
                Supervisor::start_in_arbiter(&Arbiter::new().handle(), move |_| NotifierActor {
                    database,
                    mailer,
                    claims,
                    sent,
                })
            })
            .collect();
        Self {
            actors,
            next: Arc::default(),
        }
    }

    /// The actor for the next delivery.
    pub fn next(&self) -> &Addr<NotifierActor> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.actors.len();
        &self.actors[index]
    }
}

/// How long a sent e-mail's record waits for the next claim to carry it before it is written on its own.
/// At load the next claim comes within a few milliseconds (no commit of its own); at rest the record costs
/// this much delay before the delivery is acked, and nothing else.
pub const SENT_LINGER: std::time::Duration = std::time::Duration::from_millis(20);

/// Who this process is when it claims a notification, and for how long a claim holds.
#[derive(Debug, Clone)]
pub struct Claims {
    /// This process: host, pid and a random part (unique across restarts and replicas).
    pub owner: String,
    /// `NOTIFICATIONS_CLAIM_LEASE_MS`: longer than the slowest send. A crashed holder's claim runs out after
    /// it, and the next delivery sends. Compared with this host's clock, so replicas' clocks must agree to
    /// well within it.
    pub lease: std::time::Duration,
}

impl Claims {
    pub fn new(lease: std::time::Duration) -> Self {
        Self {
            owner: tracehop_telemetry::service::instance_id().to_owned(),
            lease,
        }
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
        let claims = self.claims.clone();
        let sent = self.sent.clone();
        supervised_reply(
            message,
            context,
            |SendConfirmation { event }| async move {
                send_confirmation(&database, &mailer, &claims, &sent, event).await
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
    claims: &Claims,
    sent_records: &RideAlong<uuid::Uuid>,
    event: OrderCompleted,
) -> Result<Delivery, NotifyError> {
    let span = tracing::Span::current();
    // Claim before sending: a database we cannot reach means no send (the message is redelivered).
    let claim_event = event.clone();
    let owner = claims.owner.clone();
    let lease = chrono::Duration::from_std(claims.lease).unwrap_or(chrono::Duration::MAX);
    let claimed_at = std::time::Instant::now();
    // The claim carries the records of e-mails sent meanwhile (not this order's: one statement cannot
    // write its row twice), so they cost no commit of their own.
    let riders = sent_records.board(Some(&event.order_id));
    let claim = database
        .run(move |connection, statements| {
            claim(connection, statements, &claim_event, &owner, lease, riders)
        })
        .await?;
    match claim {
        Claim::Claimed => {}
        Claim::Sent => {
            span.record("notification.duplicate", true);
            span.record("otel.status_code", "OK");
            return Ok(Delivery::AlreadySent);
        }
        Claim::HeldElsewhere { until } => {
            span.record("notification.duplicate", true);
            span.record("otel.status_code", "OK");
            let at_least = std::time::Duration::from_millis(100);
            let retry_in = (until - Utc::now())
                .to_std()
                .unwrap_or_default()
                .clamp(at_least, claims.lease.max(at_least));
            return Ok(Delivery::ClaimedElsewhere { retry_in });
        }
    }

    let email = confirmation(&event);
    let sent = mailer.send(&email).await;
    if let Ok(Sent::AlreadyDelivered) = sent {
        span.record("notification.duplicate", true);
    }
    if let Err(error) = sent {
        let code = error.code();
        let recorded = database
            .run(move |connection, statements| record_attempt(connection, statements, &event, code))
            .await;
        if let Err(db_error) = recorded {
            crate::mailer::log_detail("could not record the failed attempt", &db_error.to_string());
            tracing::warn!(
                error = db_error.code(),
                "could not record the failed attempt"
            );
        }
        return Err(error.into());
    }
    // Sent: now it must be recorded, or a later delivery would send again once the claim runs out. Recorded
    // by the next claim of any delivery, or alone after `SENT_LINGER`; a database blip is waited out here,
    // for as long as the claim holds (less a margin), rather than given up on. The delivery is acked only
    // after this.
    //
    // The wait is a span of its own (`notification.record_sent`): at rest it is most of a delivery's time
    // (no claim comes, so the record waits out the linger), and the trace must say so rather than blame the
    // sending.
    let deadline = claimed_at + claims.lease.mul_f64(0.9);
    let record = async {
        let mut pause = std::time::Duration::from_millis(100);
        loop {
            match sent_records.commit(event.order_id).await {
                Ok(()) => return Ok(()),
                Err(error) if std::time::Instant::now() + pause < deadline => {
                    tracing::warn!(error = error.code(), "sent, not recorded yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(std::time::Duration::from_secs(2));
                }
                Err(error) => return Err(error),
            }
        }
    };
    record
        .instrument(tracing::info_span!(
            "notification.record_sent",
            order.id = %event.order_id,
        ))
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

/// The outcome of [`claim`].
enum Claim {
    /// This delivery holds the claim: it may send.
    Claimed,
    /// The e-mail was sent before.
    Sent,
    /// Another delivery holds a claim that runs until `until`.
    HeldElsewhere { until: chrono::DateTime<Utc> },
}

/// Claims the order's notification for `owner` until `lease` from now, in one upsert: the first delivery
/// makes the row (it is notifications' own, made from the event); a later one takes the claim only if the
/// e-mail is not sent and no other claim is still running. Nothing comes back when the claim was not taken,
/// and then one read tells why. The same statement records the e-mails of `sent` as sent ([`mark_sent`]'s
/// update), and tells them whether it committed.
fn claim(
    connection: &mut tracehop_telemetry::db::DbConnection,
    statements: &tracehop_telemetry::db::Statements,
    event: &OrderCompleted,
    owner: &str,
    lease: chrono::Duration,
    sent: Riders<uuid::Uuid>,
) -> Result<Claim, DbError> {
    let now = Utc::now();
    let query = ClaimNotification {
        sent: sent.keys(),
        order_id: event.order_id,
        email: &event.email,
        claimed_by: owner,
        claimed_until: now + lease,
        now,
    };
    let claimed = traced(statements, query, |query| {
        query.get_result::<String>(connection).optional()
    })
    .map_err(DbError::from);
    sent.arrived(claimed.as_ref().map(|_| ()));
    if claimed?.is_some() {
        return Ok(Claim::Claimed);
    }
    let query = notifications::table
        .find(event.order_id)
        .select((notifications::status, notifications::claimed_until));
    let row = traced(statements, query, |query| {
        query
            .first::<(String, Option<chrono::DateTime<Utc>>)>(connection)
            .optional()
    })?;
    Ok(match row {
        Some((status, _)) if status == "sent" => Claim::Sent,
        Some((_, until)) => Claim::HeldElsewhere {
            until: until.unwrap_or(now),
        },
        None => Claim::HeldElsewhere { until: now },
    })
}

/// What recording e-mails as sent means, once for both statements that do it ([`ClaimNotification`]'s CTE and
/// [`mark_sent`]): the row says sent, the attempt counts, the claim is released. Ends where the array of order
/// ids goes, inside `ANY(`.
macro_rules! mark_sent_sql {
    () => {
        "UPDATE notifications SET status = 'sent', attempts = attempts + 1, last_error = NULL, \
         sent_at = CURRENT_TIMESTAMP, updated_at = CURRENT_TIMESTAMP, claimed_by = NULL, \
         claimed_until = NULL WHERE order_id = ANY("
    };
}

/// The statement of [`claim`]: the upsert, after a data-modifying CTE that records the e-mails sent
/// meanwhile (`WITH`, which diesel's query builder lacks). A type of its own, so that diesel prepares it
/// once per connection: its SQL does not change with the number of records it carries (one array).
struct ClaimNotification<'a> {
    sent: Vec<uuid::Uuid>,
    order_id: uuid::Uuid,
    email: &'a str,
    claimed_by: &'a str,
    claimed_until: chrono::DateTime<Utc>,
    now: chrono::DateTime<Utc>,
}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for ClaimNotification<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{Array, Text, Timestamptz, Uuid};
        out.push_sql(concat!("WITH sent AS (", mark_sent_sql!()));
        out.push_bind_param::<Array<Uuid>, _>(&self.sent)?;
        out.push_sql(
            ")) INSERT INTO notifications (order_id, email, status, attempts, claimed_by, claimed_until) \
             VALUES (",
        );
        out.push_bind_param::<Uuid, _>(&self.order_id)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&self.email)?;
        out.push_sql(", 'pending', 0, ");
        out.push_bind_param::<Text, _>(&self.claimed_by)?;
        out.push_sql(", ");
        out.push_bind_param::<Timestamptz, _>(&self.claimed_until)?;
        out.push_sql(
            ") ON CONFLICT (order_id) DO UPDATE SET claimed_by = excluded.claimed_by, \
             claimed_until = excluded.claimed_until WHERE notifications.status <> 'sent' \
             AND (notifications.claimed_until IS NULL OR notifications.claimed_until < ",
        );
        out.push_bind_param::<Timestamptz, _>(&self.now)?;
        out.push_sql(") RETURNING notifications.status");
        Ok(())
    }
}

/// One query type, one SQL text: diesel keys its prepared statement by this.
impl diesel::query_builder::QueryId for ClaimNotification<'_> {
    type QueryId = ClaimNotification<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for ClaimNotification<'_> {
    type SqlType = diesel::sql_types::Text;
}

impl<Connection> diesel::RunQueryDsl<Connection> for ClaimNotification<'_> {}

/// Records a failed attempt on the notification row and releases the claim, in one update (the row exists:
/// the claim made it). A failed attempt never turns a `sent` notification back.
fn record_attempt(
    connection: &mut tracehop_telemetry::db::DbConnection,
    statements: &tracehop_telemetry::db::Statements,
    event: &OrderCompleted,
    error: &str,
) -> Result<(), DbError> {
    let query = diesel::update(
        notifications::table
            .filter(notifications::order_id.eq(event.order_id))
            .filter(notifications::status.ne("sent")),
    )
    .set((
        notifications::attempts.eq(notifications::attempts + 1),
        notifications::last_error.eq(error),
        notifications::updated_at.eq(diesel::dsl::now),
        notifications::claimed_by.eq(None::<String>),
        notifications::claimed_until.eq(None::<chrono::DateTime<Utc>>),
    ));
    traced(statements, query, |query| query.execute(connection))?;
    Ok(())
}

/// Records e-mails as sent and releases their claims, when no claim came to carry them (see [`RideAlong`]):
/// one statement for a batch, untraced because a batch belongs to many orders' traces.
fn mark_sent(
    connection: &mut tracehop_telemetry::db::DbConnection,
    order_ids: &[uuid::Uuid],
) -> Result<(), DbError> {
    diesel::sql_query(concat!(mark_sent_sql!(), "$1)"))
        .bind::<diesel::sql_types::Array<diesel::sql_types::Uuid>, _>(order_ids)
        .execute(connection)?;
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
