//! Statements that carry an array of keys, against a real PostgreSQL (`DATABASE_URL`, default the local
//! server's `postgres` database): however much the table grew since a statement was first prepared, an
//! execution reads its own rows, not the table.
//!
//! The scenario is the notifier's at start-up: a table that starts small, a prepared statement run often
//! enough for PostgreSQL to keep a generic plan (five executions), then the table grows. The test runs it
//! three times: with PostgreSQL's default planning, to show the scenario still makes the sequential scan
//! this guards against; on a pool planned at each execution; and through `planned_each_time`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use diesel::RunQueryDsl;
use diesel::pg::Pg;
use diesel::query_builder::{AstPass, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Text, Uuid};
use tracehop_telemetry::db::{Database, DbConnection, Planning, planned_each_time};

/// Rows the table holds after it grew.
const GROWN: i64 = 30_000;
/// Executions after the growth.
const EXECUTIONS: i64 = 20;

/// The notifier's claim, on a table of the same shape (`notifications`): an upsert after a data-modifying
/// CTE that marks the rows of an array of ids. diesel keeps it prepared (a static query id, a fixed text).
struct Claim {
    table: String,
    riders: Vec<uuid::Uuid>,
    id: uuid::Uuid,
}

impl QueryFragment<Pg> for Claim {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> diesel::QueryResult<()> {
        out.push_sql("WITH ridden AS (UPDATE ");
        out.push_identifier(&self.table)?;
        out.push_sql(" SET status = 'sent', attempts = attempts + 1 WHERE id = ANY(");
        out.push_bind_param::<Array<Uuid>, _>(&self.riders)?;
        out.push_sql(")) INSERT INTO ");
        out.push_identifier(&self.table)?;
        out.push_sql(" AS claimed (id, email, status, claimed_by, claimed_until) VALUES (");
        out.push_bind_param::<Uuid, _>(&self.id)?;
        out.push_sql(
            ", 'someone@example.com', 'pending', 'test', now()) ON CONFLICT (id) DO UPDATE SET \
             claimed_by = excluded.claimed_by, claimed_until = excluded.claimed_until \
             WHERE claimed.status <> 'sent' AND (claimed.claimed_until IS NULL OR claimed.claimed_until < now()) \
             RETURNING claimed.status",
        );
        Ok(())
    }
}

impl QueryId for Claim {
    type QueryId = Claim;
    const HAS_STATIC_QUERY_ID: bool = true;
}

impl diesel::query_builder::Query for Claim {
    type SqlType = Text;
}

impl<C> RunQueryDsl<C> for Claim {}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

fn url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// How the statement is sent in one run.
#[derive(Clone, Copy, Debug)]
enum Sending {
    /// Prepared once, on a pool planned as given.
    Prepared(Planning),
    /// Through [`planned_each_time`], on a default pool.
    EachTime,
}

/// Rows read by sequential scans of a fresh table during the executions after its growth.
async fn rows_scanned(sending: Sending) -> i64 {
    let planning = match sending {
        Sending::Prepared(planning) => planning,
        Sending::EachTime => Planning::Auto,
    };
    // One connection, so that every execution meets the same prepared statement.
    let database = Database::connect_with(&url(), 1, planning).expect("pool");
    let table = format!("plans_{}", uuid::Uuid::new_v4().simple());
    database
        .run(move |connection, _| {
            let claim = |connection: &mut DbConnection, riders: Vec<uuid::Uuid>| {
                let query = Claim {
                    table: table.clone(),
                    riders,
                    id: uuid::Uuid::new_v4(),
                };
                match sending {
                    Sending::Prepared(_) => query.load::<String>(connection),
                    Sending::EachTime => planned_each_time(query).load::<String>(connection),
                }
            };
            diesel::sql_query(format!(
                "CREATE TABLE \"{table}\" (id uuid PRIMARY KEY, email text NOT NULL, status text NOT NULL, \
                 attempts int NOT NULL DEFAULT 0, last_error text, sent_at timestamptz, \
                 updated_at timestamptz NOT NULL DEFAULT now(), claimed_by text, claimed_until timestamptz)"
            ))
            .execute(connection)?;
            // Claims while the table is small, as at start-up: PostgreSQL settles on a plan.
            let mut claimed = Vec::new();
            for _ in 0..10 {
                claim(connection, claimed.clone())?;
                claimed.push(uuid::Uuid::new_v4());
            }
            diesel::sql_query(format!(
                "INSERT INTO \"{table}\" (id, email, status) \
                 SELECT gen_random_uuid(), 'someone@example.com', 'sent' FROM generate_series(1, {GROWN})"
            ))
            .execute(connection)?;
            let before = seq_tup_read(connection, &table)?;
            for _ in 0..EXECUTIONS {
                claim(connection, vec![uuid::Uuid::new_v4(), uuid::Uuid::new_v4()])?;
            }
            let after = seq_tup_read(connection, &table)?;
            diesel::sql_query(format!("DROP TABLE \"{table}\"")).execute(connection)?;
            Ok(after - before)
        })
        .await
        .expect("statements")
}

/// Rows read by sequential scans of `table`, with this session's counts published first.
fn seq_tup_read(connection: &mut DbConnection, table: &str) -> diesel::QueryResult<i64> {
    // PostgreSQL 15 publishes a session's counts when it goes idle, at most once a second unless asked to;
    // asked, they are published as this statement ends and read fresh by the next one.
    diesel::sql_query("SELECT pg_stat_force_next_flush()").execute(connection)?;
    let row: Count = diesel::sql_query(format!(
        "SELECT coalesce(seq_tup_read, 0) AS n FROM pg_stat_user_tables WHERE relname = '{table}'"
    ))
    .get_result(connection)?;
    Ok(row.n)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_planned_each_execution_reads_its_rows_not_the_grown_table() {
    let stale = rows_scanned(Sending::Prepared(Planning::Auto)).await;
    assert!(
        stale >= EXECUTIONS * GROWN / 2,
        "the control no longer reproduces a stale generic plan ({stale} rows scanned): PostgreSQL plans \
         this scenario differently, and the test needs a new one"
    );
    let each_execution = rows_scanned(Sending::Prepared(Planning::EachExecution)).await;
    assert!(
        each_execution < GROWN,
        "a pool planned at each execution still scanned {each_execution} rows in {EXECUTIONS} executions"
    );
    let each_time = rows_scanned(Sending::EachTime).await;
    eprintln!(
        "rows scanned in {EXECUTIONS} claims on {GROWN} rows: default planning {stale}, each execution \
         {each_execution}, planned_each_time {each_time}"
    );
    assert!(
        each_time < GROWN,
        "planned_each_time still scanned {each_time} rows in {EXECUTIONS} executions"
    );
}
