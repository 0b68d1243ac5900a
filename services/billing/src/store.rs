//! Billing's rows: transactions (one per order) and the outbox. (The notification row is notifications'.)
//!
//! Every function takes a connection from [`tracehop_telemetry::db::Database::run`] (so it runs on the blocking
//! pool) and wraps each statement in [`traced`].

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use tracehop_contracts::billing::OrderView;
use tracehop_contracts::schema::{outbox, transactions};
use tracehop_telemetry::db::{DbConnection, DbError, Statements, planned_each_time, traced};

/// A transaction row.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = transactions)]
pub struct Transaction {
    pub id: uuid::Uuid,
    pub user_id: uuid::Uuid,
    pub email: String,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    pub charge_id: Option<String>,
    pub idempotency_key: String,
    pub request_fingerprint: String,
    pub trace_id: String,
    pub created_at: DateTime<Utc>,
}

/// A charge about to be attempted.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = transactions)]
pub struct PendingTransaction {
    pub id: uuid::Uuid,
    pub user_id: uuid::Uuid,
    pub email: String,
    pub amount_minor: i64,
    pub currency: String,
    pub status: String,
    pub idempotency_key: String,
    pub request_fingerprint: String,
    pub trace_id: String,
}

/// The outcome of claiming an idempotency key.
#[derive(Debug)]
pub enum Claim {
    /// This request owns the key and must charge.
    Claimed,
    /// Someone already used the key (boxed: the common outcome, `Claimed`, stays small).
    Existing(Box<Transaction>),
    /// Someone held the key and released it between our insert and our read: try again.
    Vanished,
}

/// Inserts a `pending` row unless the idempotency key is taken; the unique index makes concurrent claims of
/// one key safe (exactly one wins).
pub fn claim(
    connection: &mut DbConnection,
    statements: &Statements,
    pending: PendingTransaction,
) -> Result<Claim, DbError> {
    // The order id is derived from (user, key), so the primary key is the claim.
    let order_id = pending.id;
    let query = diesel::insert_into(transactions::table)
        .values(pending)
        .on_conflict_do_nothing();
    let inserted = traced(statements, query, |query| query.execute(connection))?;
    if inserted == 1 {
        return Ok(Claim::Claimed);
    }
    let query = transactions::table
        .find(order_id)
        .select(Transaction::as_select());
    let existing = traced(statements, query, |query| {
        query.first(connection).optional()
    })?;
    Ok(existing.map_or(Claim::Vanished, |existing| {
        Claim::Existing(Box::new(existing))
    }))
}

/// Reads one transaction by id.
pub fn transaction(
    connection: &mut DbConnection,
    statements: &Statements,
    order_id: uuid::Uuid,
) -> Result<Option<Transaction>, DbError> {
    let query = transactions::table
        .find(order_id)
        .select(Transaction::as_select());
    Ok(traced(statements, query, |query| {
        query.first(connection).optional()
    })?)
}

/// `pending` transactions created before `cutoff`: charges whose outcome billing lost track of. Untraced
/// (a periodic poll, see [`unpublished_events`]).
pub fn stale_pending(
    connection: &mut DbConnection,
    cutoff: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<Transaction>, DbError> {
    Ok(transactions::table
        .filter(transactions::status.eq("pending"))
        .filter(transactions::created_at.lt(cutoff))
        .order(transactions::created_at.asc())
        .limit(limit)
        .select(Transaction::as_select())
        .load(connection)?)
}

/// Gives the key back after a charge that certainly did not happen (declined, or never reached Stripe), so
/// the client may retry with the same key.
pub fn release(
    connection: &mut DbConnection,
    statements: &Statements,
    order_id: uuid::Uuid,
) -> Result<(), DbError> {
    let query = diesel::delete(
        transactions::table
            .filter(transactions::id.eq(order_id))
            .filter(transactions::status.eq("pending")),
    );
    traced(statements, query, |query| query.execute(connection))?;
    Ok(())
}

/// An event to relay.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = outbox)]
pub struct OutboxEvent {
    pub id: uuid::Uuid,
    pub subject: String,
    pub payload: String,
    pub trace_context: String,
}

/// Records a successful charge in one statement (so one round trip and one commit): the transaction goes
/// from `pending` to `charged` and the `order.completed` event goes into the outbox, already claimed by this
/// replica's relay (`claim`), which publishes it from memory right away without reading it back. (The
/// notification is notifications' own row, made from the event.)
///
/// Recording is idempotent, whoever records (the checkout, a retry after a database blip, the reconciler):
/// only a `pending` transaction changes, and the event's id is derived from the order, so a second record
/// adds no second event (which would carry a second `Nats-Msg-Id` that JetStream does not deduplicate).
/// Returns whether this call recorded it.
pub fn save_charged(
    connection: &mut DbConnection,
    statements: &Statements,
    order_id: uuid::Uuid,
    charge_id: &str,
    event: &OutboxEvent,
    claim: &RelayClaim,
) -> Result<bool, DbError> {
    let query = SaveCharged {
        order_id,
        charge_id,
        event,
        claimed_by: &claim.owner,
        claimed_until: claim.until(),
    };
    let inserted = traced(statements, query, |query| query.execute(connection))?;
    Ok(inserted == 1)
}

/// The statement of [`save_charged`]: the event row is inserted only if the update changed a row, a
/// data-modifying CTE, because diesel's query builder has no `WITH`. A type of its own rather than
/// `sql_query`, so that diesel prepares it once per connection (its SQL never changes) instead of having
/// PostgreSQL parse and plan it for every checkout.
struct SaveCharged<'a> {
    order_id: uuid::Uuid,
    charge_id: &'a str,
    event: &'a OutboxEvent,
    claimed_by: &'a str,
    claimed_until: DateTime<Utc>,
}

impl diesel::query_builder::QueryFragment<diesel::pg::Pg> for SaveCharged<'_> {
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, diesel::pg::Pg>,
    ) -> QueryResult<()> {
        use diesel::sql_types::{Text, Timestamptz, Uuid};
        out.push_sql("WITH charged AS (UPDATE transactions SET status = 'charged', charge_id = ");
        out.push_bind_param::<Text, _>(&self.charge_id)?;
        out.push_sql(", updated_at = now() WHERE id = ");
        out.push_bind_param::<Uuid, _>(&self.order_id)?;
        out.push_sql(
            " AND status = 'pending' RETURNING id) \
             INSERT INTO outbox (id, subject, payload, trace_context, claimed_by, claimed_until) SELECT ",
        );
        out.push_bind_param::<Uuid, _>(&self.event.id)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&self.event.subject)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&self.event.payload)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&self.event.trace_context)?;
        out.push_sql(", ");
        out.push_bind_param::<Text, _>(&self.claimed_by)?;
        out.push_sql(", ");
        out.push_bind_param::<Timestamptz, _>(&self.claimed_until)?;
        out.push_sql(" FROM charged ON CONFLICT (id) DO NOTHING");
        Ok(())
    }
}

/// One query type, one SQL text: diesel keys its prepared statement by this.
impl diesel::query_builder::QueryId for SaveCharged<'_> {
    type QueryId = SaveCharged<'static>;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl<Connection> diesel::RunQueryDsl<Connection> for SaveCharged<'_> {}

/// Who claims outbox events, and for how long.
#[derive(Debug, Clone)]
pub struct RelayClaim {
    /// This replica ([`tracehop_telemetry::service::instance_id`]).
    pub owner: String,
    /// `BILLING_OUTBOX_CLAIM_LEASE_MS`: longer than a publish takes; a dead holder's events wait this long.
    pub lease: std::time::Duration,
}

impl RelayClaim {
    fn until(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::from_std(self.lease).unwrap_or(chrono::Duration::seconds(30))
    }
}

/// Marks events as acknowledged by JetStream and releases their claims: one statement for a batch (see
/// [`tracehop_telemetry::db::GroupCommit`]), untraced because a batch belongs to many checkouts. Planned for
/// its ids each time: a generic plan made while the outbox was small scanned the whole table, once a second,
/// for as long as the connection lived ([`tracehop_telemetry::db::planned_each_time`]).
pub fn mark_published(
    connection: &mut DbConnection,
    event_ids: &[uuid::Uuid],
) -> Result<(), DbError> {
    let query = diesel::update(outbox::table.filter(outbox::id.eq_any(event_ids))).set((
        outbox::published_at.eq(diesel::dsl::now),
        outbox::attempts.eq(outbox::attempts + 1),
        outbox::last_error.eq(None::<String>),
        outbox::claimed_by.eq(None::<String>),
        outbox::claimed_until.eq(None::<DateTime<Utc>>),
    ));
    planned_each_time(query).execute(connection)?;
    Ok(())
}

/// Records a failed publish (the sweep will try again).
pub fn mark_publish_failed(
    connection: &mut DbConnection,
    statements: &Statements,
    event_id: uuid::Uuid,
    error: &str,
) -> Result<(), DbError> {
    let query = diesel::update(outbox::table.find(event_id)).set((
        outbox::attempts.eq(outbox::attempts + 1),
        outbox::last_error.eq(error),
        outbox::claimed_by.eq(None::<String>),
        outbox::claimed_until.eq(None::<DateTime<Utc>>),
    ));
    traced(statements, query, |query| query.execute(connection))?;
    Ok(())
}

/// Claims up to `limit` events still waiting, oldest first, that no relay holds a live claim on. Rows
/// another replica's sweep is claiming at this moment are skipped (`FOR UPDATE SKIP LOCKED`), not waited
/// for, so two sweeps never take the same event. Deliberately *not* traced: the sweep runs every few
/// seconds outside any request and would otherwise fill the trace store with one-span traces; the events
/// it finds are published under their own checkout's trace. Both statements are planned each time, as
/// [`mark_published`] is: the outbox only grows.
pub fn claim_unpublished(
    connection: &mut DbConnection,
    created_before: DateTime<Utc>,
    limit: i64,
    claim: &RelayClaim,
) -> Result<Vec<OutboxEvent>, DbError> {
    use diesel::Connection as _;
    let events = connection.transaction(|connection| {
        let waiting = outbox::table
            .filter(outbox::published_at.is_null())
            .filter(outbox::created_at.lt(created_before))
            .filter(
                outbox::claimed_until
                    .is_null()
                    .or(outbox::claimed_until.lt(diesel::dsl::now)),
            )
            .order(outbox::created_at.asc())
            .limit(limit)
            .select(outbox::id)
            .for_update()
            .skip_locked();
        let ids: Vec<uuid::Uuid> = planned_each_time(waiting).load(connection)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let claimed = diesel::update(outbox::table.filter(outbox::id.eq_any(&ids)))
            .set((
                outbox::claimed_by.eq(&claim.owner),
                outbox::claimed_until.eq(claim.until()),
            ))
            .returning(OutboxEvent::as_returning());
        planned_each_time(claimed).get_results(connection)
    })?;
    Ok(events)
}

/// An order, as its owner sees it.
pub fn order_view(
    connection: &mut DbConnection,
    statements: &Statements,
    order_id: uuid::Uuid,
) -> Result<Option<OrderView>, DbError> {
    let query = transactions::table
        .find(order_id)
        .select(Transaction::as_select());
    let row = traced(statements, query, |query| {
        query.first::<Transaction>(connection).optional()
    })?;
    Ok(row.map(|transaction| OrderView {
        order_id: transaction.id,
        user_id: transaction.user_id,
        amount_minor: transaction.amount_minor,
        currency: transaction.currency,
        status: transaction.status,
        charge_id: transaction.charge_id,
        trace_id: transaction.trace_id,
        created_at: transaction.created_at,
    }))
}
