//! PostgreSQL through diesel and an r2d2 pool, never on an async worker.
//!
//! [`Database::run`] moves the closure to Tokio's blocking pool together with the current span, so spans
//! created inside stay in the request's trace. Waiting for a pooled connection is recorded on a
//! `db.pool.acquire` span when it takes longer than a millisecond (a starved pool shows up in the trace).
//! Inside the closure, wrap each statement in [`traced`]: it becomes a CLIENT span named
//! `{operation} {table}` with the database conventions and the SQL text (placeholders only, never values).
//!
//! **Plans that go stale.** diesel prepares a statement once per connection, and after five executions
//! PostgreSQL may keep one *generic* plan for it, made for whatever size the table had then. For a lookup by
//! one key that plan stays an index scan. For a statement that carries an array of keys (`= ANY($1)`) into a
//! table that started empty, it was a sequential scan, kept while the table grew: in a 30 s load on a fresh
//! database the notifier's claims read 124 million rows, and the cost of each grew with the table. Such
//! statements are planned for their own values at every execution instead: a whole service's with
//! [`Planning::EachExecution`], or one statement with [`planned_each_time`] (BENCHMARKS.md, section 19:
//! PostgreSQL's CPU per checkout a fifth lower in a 30 s run).

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel::pg::{Pg, PgConnection};
use diesel::query_builder::{QueryFragment, QueryId};
use diesel::r2d2::{ConnectionManager, Pool, PooledConnection};
use tracing::{Instrument, Span};

/// The pool type every service uses.
pub type DbPool = Pool<PgManager>;
/// A connection checked out of [`DbPool`].
pub type DbConnection = PooledConnection<PgManager>;

/// The pool's connection manager: diesel's, except for the check made before a connection is handed out.
/// diesel's sends `SELECT 1` and waits for it, a round trip and a transaction on every checkout: in
/// BENCHMARKS.md's first run of section 6 that was half of all the statements PostgreSQL ran. This one reads
/// only what the socket already holds, without waiting: a server that went away (restarted, shut down,
/// killed) closed the connection, libpq sees the end of the stream, and the connection is replaced before
/// anyone uses it. A connection that dies silently (a network cut) is found by its first statement, which
/// fails; the pool then drops it.
#[derive(Debug)]
pub struct PgManager {
    manager: ConnectionManager<PgConnection>,
    planning: Planning,
}

/// How PostgreSQL plans a pool's prepared statements (see the module's overview).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Planning {
    /// PostgreSQL's default (`plan_cache_mode = auto`): after five executions a statement may keep a
    /// generic plan. Right for statements that find rows by one key.
    #[default]
    Auto,
    /// Every execution is planned for its values (`plan_cache_mode = force_custom_plan`): for a service
    /// whose statements on its request path carry arrays of keys. Planning costs PostgreSQL tens of
    /// microseconds per statement; a stale sequential scan costs a read of the whole table.
    EachExecution,
}

impl diesel::r2d2::ManageConnection for PgManager {
    type Connection = PgConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<PgConnection, Self::Error> {
        use diesel::RunQueryDsl as _;
        let mut connection = self.manager.connect()?;
        if self.planning == Planning::EachExecution {
            diesel::sql_query("SET plan_cache_mode = force_custom_plan")
                .execute(&mut connection)
                .map_err(diesel::r2d2::Error::QueryError)?;
        }
        Ok(connection)
    }

    fn is_valid(&self, connection: &mut PgConnection) -> Result<(), Self::Error> {
        // Pool connections never LISTEN, so anything read here is the server's farewell, the end of the
        // stream, or an error. Read twice: a server that shut down (`pg_ctl stop -m fast`, a restart) sends
        // a FATAL message and then closes, and libpq takes the message on one read (as a notice, without
        // error) and sees the end of the stream only on the next. With a single read every pooled
        // connection passed this check once more after a restart, and failed its request's first
        // statement (`after_a_database_restart_no_request_fails`). A live connection's second read finds
        // nothing waiting and returns at once.
        for _ in 0..2 {
            if let Some(Err(error)) = connection.notifications_iter().next() {
                return Err(diesel::r2d2::Error::QueryError(error));
            }
        }
        Ok(())
    }

    fn has_broken(&self, connection: &mut PgConnection) -> bool {
        self.manager.has_broken(connection)
    }
}

/// A pool plus what the spans need to know about it.
#[derive(Clone)]
pub struct Database {
    pool: DbPool,
    namespace: String,
    /// For connections of their own ([`Database::try_advisory_lock`]).
    url: String,
}

diesel::define_sql_function! {
    /// PostgreSQL's `pg_try_advisory_lock(bigint)`.
    fn pg_try_advisory_lock(key: diesel::sql_types::BigInt) -> diesel::sql_types::Bool;
}

/// A PostgreSQL session-level advisory lock, held by a connection of its own for as long as this lives.
/// Dropping it closes that connection, which releases the lock; so does the death of the process, since
/// PostgreSQL ends the session: a dead holder never keeps the lock.
pub struct AdvisoryLock {
    connection: Option<PgConnection>,
}

impl AdvisoryLock {
    /// Releases the lock (closing the connection on the blocking pool, not on an async worker).
    pub async fn release(mut self) {
        if let Some(connection) = self.connection.take() {
            let _ = tokio::task::spawn_blocking(move || drop(connection)).await;
        }
    }
}

impl Drop for AdvisoryLock {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            // Not released explicitly (a panic, a cancelled future): close it off the async worker when
            // there is a runtime to do it on (at shutdown there may be none; closing inline is then fine).
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(connection))),
                Err(_) => drop(connection),
            }
        }
    }
}

/// Where the database is and how many connections to keep: `DATABASE_URL` and `DATABASE_POOL_SIZE`, read the
/// same way by every service.
#[derive(Debug, Clone)]
pub struct DatabaseSettings {
    pub url: String,
    pub pool_size: u32,
}

impl DatabaseSettings {
    /// From the environment, with a service's defaults.
    pub fn from_env(
        default_url: &str,
        default_pool_size: u32,
    ) -> Result<Self, crate::config::ConfigError> {
        Ok(Self {
            url: crate::config::env_or("DATABASE_URL", default_url),
            pool_size: crate::config::env_parse("DATABASE_POOL_SIZE", default_pool_size)?,
        })
    }
}

/// Why a database call failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database unavailable: {0}")]
    Unavailable(#[from] r2d2::Error),
    #[error("database connection lost: {0}")]
    ConnectionLost(String),
    #[error("query failed: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("database task failed: {0}")]
    Task(String),
    /// A [`GroupCommit`] batch or a [`RideAlong`] statement this item was part of failed (the error is
    /// shared by all of its items).
    #[error("batched write failed: {0}")]
    Batch(String),
}

impl DbError {
    /// A stable code for records and telemetry, without the driver's text (which can quote SQL and values).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unavailable(_) | Self::ConnectionLost(_) => "database_unavailable",
            Self::Query(_) | Self::Batch(_) => "database_error",
            Self::Task(_) => "database_task_failed",
        }
    }

    /// Whether the database itself is unreachable (answer 503), as opposed to a query that failed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::ConnectionLost(_))
    }

    /// A query error that really means the server went away (shut down, restarted, network).
    fn from_query(error: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error};
        let lost = match &error {
            Error::DatabaseError(DatabaseErrorKind::ClosedConnection, _)
            | Error::DatabaseError(DatabaseErrorKind::UnableToSendCommand, _) => true,
            Error::DatabaseError(_, info) => {
                let message = info.message();
                message.contains("terminating connection")
                    || message.contains("server closed the connection")
                    || message.contains("the database system is shutting down")
                    || message.contains("the database system is starting up")
            }
            _ => false,
        };
        if lost {
            Self::ConnectionLost(error.to_string())
        } else {
            Self::Query(error)
        }
    }

    /// Whether this is a unique-constraint violation (a duplicate insert).
    pub fn is_unique_violation(&self) -> bool {
        matches!(
            self,
            Self::Query(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _
            ))
        )
    }
}

impl Database {
    /// Builds a pool of `max_size` connections. Does not fail when PostgreSQL is down (connections are opened
    /// lazily): a service starts, answers 503 while the database is away, and recovers by itself.
    pub fn connect(url: &str, max_size: u32) -> Result<Self, DbError> {
        Self::connect_with(url, max_size, Planning::Auto)
    }

    /// [`Database::connect`], with the pool's statements planned as `planning` says.
    pub fn connect_with(url: &str, max_size: u32, planning: Planning) -> Result<Self, DbError> {
        let manager = PgManager {
            manager: ConnectionManager::<PgConnection>::new(url),
            planning,
        };
        let pool = Pool::builder()
            .max_size(max_size)
            .min_idle(Some(1))
            .connection_timeout(Duration::from_secs(3))
            .build_unchecked(manager);
        let namespace = database_name(url);
        Ok(Self {
            pool,
            namespace,
            url: url.to_owned(),
        })
    }

    /// Opens a connection of its own, outside the pool (for `LISTEN`, say). Blocking: call it off the async
    /// workers.
    pub fn dedicated_connection(&self) -> Result<PgConnection, DbError> {
        use diesel::Connection as _;
        // TCP keepalives, so that a connection whose server or network is gone is noticed within about
        // 25 s even while it only listens (libpq's defaults leave that to the kernel: hours).
        let separator = if self.url.contains('?') { '&' } else { '?' };
        let url = format!(
            "{}{separator}keepalives=1&keepalives_idle=10&keepalives_interval=5&keepalives_count=3",
            self.url
        );
        PgConnection::establish(&url)
            .map_err(|error| DbError::ConnectionLost(format!("dedicated connection: {error}")))
    }

    /// Takes the session-level advisory lock `key` on a connection of its own, if no other session holds
    /// it (`pg_try_advisory_lock`): `None` when another holds it. Makes a singleton among replicas, with
    /// the lock released when the holder's session ends.
    pub async fn try_advisory_lock(&self, key: i64) -> Result<Option<AdvisoryLock>, DbError> {
        use diesel::{Connection as _, RunQueryDsl as _};
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = PgConnection::establish(&url)
                .map_err(|error| DbError::Task(format!("advisory lock connection: {error}")))?;
            let locked = diesel::select(pg_try_advisory_lock(key))
                .get_result::<bool>(&mut connection)
                .map_err(DbError::from_query)?;
            Ok(locked.then_some(AdvisoryLock {
                connection: Some(connection),
            }))
        })
        .await
        .map_err(|error| DbError::Task(error.to_string()))?
    }

    /// The database name, recorded as `db.namespace`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Runs `work` with a pooled connection on the blocking pool, inside the caller's span.
    pub async fn run<T, F>(&self, work: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection, &Statements) -> Result<T, DbError> + Send + 'static,
    {
        let pool = self.pool.clone();
        let statements = Statements {
            namespace: self.namespace.clone(),
        };
        let parent = Span::current();
        // The OpenTelemetry context travels too: in a sampled-out trace the parent has none of its own, and
        // the statements' spans must still know they belong to it (`setup::note_sampling`).
        let context = crate::propagation::context_of(&parent);
        tokio::task::spawn_blocking(move || {
            let _context = context.attach();
            let _entered = parent.enter();
            let waiting_since = Instant::now();
            let connection = pool.get();
            let waited = waiting_since.elapsed();
            if waited > Duration::from_millis(1) || connection.is_err() {
                // Work outside any request (a batch, a timer's poll) gets no span: it would be a trace
                // of one span. A failure is still logged.
                if parent.is_none() {
                    if let Err(error) = &connection {
                        crate::setup::log_detail("no database connection", error);
                    }
                } else {
                    record_pool_wait(waited, &pool, connection.as_ref().err());
                }
            }
            let mut connection = connection?;
            match work(&mut connection, &statements) {
                Err(DbError::Query(error)) => Err(DbError::from_query(error)),
                other => other,
            }
        })
        .await
        .map_err(|error| DbError::Task(error.to_string()))?
    }
}

/// A span for a slow or failed pool checkout. `tracing` spans cannot be back-dated, so the wait itself is
/// the `db.client.connection.wait_us` attribute.
fn record_pool_wait(waited: Duration, pool: &DbPool, error: Option<&r2d2::Error>) {
    let state = pool.state();
    let span = tracing::info_span!(
        "db.pool.acquire",
        otel.kind = "internal",
        otel.status_code = tracing::field::Empty,
        db.client.connection.wait_us = i64::try_from(waited.as_micros()).unwrap_or(i64::MAX),
        db.client.connection.pool.connections = i64::from(state.connections),
        db.client.connection.pool.idle = i64::from(state.idle_connections),
    );
    if let Some(error) = error {
        span.record("otel.status_code", "ERROR");
        span.in_scope(|| {
            crate::setup::log_detail("no database connection", &error);
            tracing::error!(error = "database_unavailable", "no database connection");
        });
    }
}

/// What [`traced`] needs to describe a statement; handed to every [`Database::run`] closure.
pub struct Statements {
    namespace: String,
}

impl Statements {
    /// Statements against the database `namespace` (its name, the `db.namespace` attribute).
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
        }
    }
}

/// Runs one diesel statement inside a CLIENT span named after its operation and table.
///
/// The crate's README has a complete example (compiled as a doc test).
pub fn traced<Q, R>(
    statements: &Statements,
    query: Q,
    run: impl FnOnce(Q) -> diesel::QueryResult<R>,
) -> diesel::QueryResult<R>
where
    Q: QueryFragment<Pg> + QueryId,
{
    let statement = Statement::of(&query);
    let span = tracing::info_span!(
        "db.query",
        otel.name = statement.name.as_str(),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        db.system.name = "postgresql",
        db.namespace = statements.namespace.as_str(),
        db.operation.name = statement.operation.as_str(),
        db.collection.name = tracing::field::Empty,
        db.query.text = statement.text.as_str(),
        error.type = tracing::field::Empty,
    );
    if let Some(table) = &statement.table {
        span.record("db.collection.name", table.as_str());
    }
    let _entered = span.enter();
    let outcome = run(query);
    if let Err(error) = &outcome {
        // "Not found" is an answer, not a failure of the database.
        if !matches!(error, diesel::result::Error::NotFound) {
            span.record("otel.status_code", "ERROR");
            span.record("error.type", error_type(error));
            // The driver's text can quote values: it goes to the log, the span gets the type.
            crate::setup::log_detail("query failed", error);
            tracing::error!(error = error_type(error), "query failed");
        }
    }
    outcome
}

fn error_type(error: &diesel::result::Error) -> &'static str {
    use diesel::result::{DatabaseErrorKind, Error};
    match error {
        Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => "unique_violation",
        Error::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _) => "foreign_key_violation",
        Error::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => "serialization_failure",
        Error::DatabaseError(DatabaseErrorKind::ClosedConnection, _) => "closed_connection",
        Error::DatabaseError(..) => "database_error",
        Error::NotFound => "not_found",
        Error::RollbackTransaction => "rollback",
        _ => "diesel_error",
    }
}

/// `query`, planned by PostgreSQL for its own values at every execution: diesel sends it as an unnamed
/// statement and keeps no prepared statement for it (two round trips instead of one). For a statement off the
/// request path that carries an array of keys into a table that grows (see the module's overview).
///
/// ```no_run
/// use diesel::prelude::*;
/// # diesel::table! { outbox (id) { id -> Uuid, attempts -> Int4 } }
/// # fn example(connection: &mut PgConnection, ids: &[uuid::Uuid]) -> QueryResult<usize> {
/// let query = diesel::update(outbox::table.filter(outbox::id.eq_any(ids)))
///     .set(outbox::attempts.eq(outbox::attempts + 1));
/// tracehop_telemetry::db::planned_each_time(query).execute(connection)
/// # }
/// ```
pub fn planned_each_time<Q>(query: Q) -> PlannedEachTime<Q> {
    PlannedEachTime(query)
}

/// A statement that is never kept prepared ([`planned_each_time`]).
#[derive(Debug, Clone)]
pub struct PlannedEachTime<Q>(Q);

impl<Q: QueryFragment<Pg>> QueryFragment<Pg> for PlannedEachTime<Q> {
    fn walk_ast<'b>(
        &'b self,
        mut pass: diesel::query_builder::AstPass<'_, 'b, Pg>,
    ) -> diesel::QueryResult<()> {
        pass.unsafe_to_cache_prepared();
        self.0.walk_ast(pass.reborrow())
    }
}

impl<Q> QueryId for PlannedEachTime<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: diesel::query_builder::Query> diesel::query_builder::Query for PlannedEachTime<Q> {
    type SqlType = Q::SqlType;
}

impl<Q, C> diesel::RunQueryDsl<C> for PlannedEachTime<Q> {}

/// What a statement's span says about it: the SQL text, operation, table and span name.
struct Statement {
    text: String,
    operation: String,
    table: Option<String>,
    name: String,
}

thread_local! {
    /// Descriptions of the queries this thread has run, by diesel query type: a query whose SQL does not
    /// depend on its values is rendered and parsed once per thread, not once per execution. Diesel says so
    /// twice: with a static `QueryId`, and by marking the query safe to cache as a prepared statement (a
    /// type with a static id can still render other SQL for other values, such as an `IN` list or a batch
    /// insert; diesel marks those unsafe to cache).
    static DESCRIBED: std::cell::RefCell<std::collections::HashMap<std::any::TypeId, std::rc::Rc<Statement>>> =
        std::cell::RefCell::default();
}

impl Statement {
    fn of<Q: QueryFragment<Pg> + QueryId>(query: &Q) -> std::rc::Rc<Self> {
        let fixed_sql = query.is_safe_to_cache_prepared(&Pg).unwrap_or(false);
        let (Some(type_id), true) = (Q::query_id(), fixed_sql) else {
            return std::rc::Rc::new(Self::describe(query));
        };
        DESCRIBED.with_borrow_mut(|described| {
            described
                .entry(type_id)
                .or_insert_with(|| std::rc::Rc::new(Self::describe(query)))
                .clone()
        })
    }

    fn describe<Q: QueryFragment<Pg>>(query: &Q) -> Self {
        let text = statement_text(query);
        let (operation, table) = describe(&text);
        let name = match &table {
            Some(table) => format!("{operation} {table}"),
            None => operation.clone(),
        };
        Self {
            text,
            operation,
            table,
            name,
        }
    }
}

/// The SQL diesel will send, with bind placeholders (`$1`) and without the values.
pub fn statement_text<Q: QueryFragment<Pg>>(query: &Q) -> String {
    use diesel::query_builder::QueryBuilder;
    let mut builder = diesel::pg::PgQueryBuilder::default();
    match query.to_sql(&mut builder, &Pg) {
        Ok(()) => builder.finish().trim().to_owned(),
        Err(error) => format!("<statement could not be rendered: {error}>"),
    }
}

/// Operation keyword and target table of a statement (`INSERT INTO "orders" ...` -> `INSERT`, `orders`).
/// A statement with common table expressions (`WITH a AS (...) INSERT INTO ...`) is described by its
/// main statement, the one after them.
pub fn describe(sql: &str) -> (String, Option<String>) {
    if let Some(main) = after_common_table_expressions(sql) {
        return describe(main);
    }
    let mut words = sql.split_whitespace();
    let operation = words.next().unwrap_or("QUERY").to_uppercase();
    let keyword = match operation.as_str() {
        "INSERT" => "INTO",
        "UPDATE" => "UPDATE",
        _ => "FROM",
    };
    let table = if keyword == "UPDATE" {
        sql.split_whitespace().nth(1)
    } else {
        let mut tokens = sql.split_whitespace();
        tokens
            .by_ref()
            .find(|token| token.eq_ignore_ascii_case(keyword));
        tokens.next()
    };
    let table = table.map(|name| {
        name.trim_matches(|c: char| c == '"' || c == '(' || c == ')' || c == ',')
            .rsplit('.')
            .next()
            .unwrap_or(name)
            .trim_matches('"')
            .to_owned()
    });
    (operation, table.filter(|name| !name.is_empty()))
}

/// The main statement of `WITH name AS (...), ... <statement>`: what follows the first definition's closing
/// parenthesis (at depth zero) that is not followed by a comma. `None` when `sql` does not start with `WITH`
/// or its parentheses do not balance.
fn after_common_table_expressions(sql: &str) -> Option<&str> {
    let trimmed = sql.trim_start();
    if !trimmed.get(..5)?.eq_ignore_ascii_case("WITH ") {
        return None;
    }
    let mut depth = 0_usize;
    for (index, character) in trimmed.char_indices() {
        match character {
            '(' => depth += 1,
            ')' => {
                depth = depth.checked_sub(1)?;
                let rest = trimmed[index + 1..].trim_start();
                if depth == 0 && !rest.starts_with(',') {
                    return Some(rest).filter(|rest| !rest.is_empty());
                }
            }
            _ => {}
        }
    }
    None
}

/// The database name in a `postgres://` URL (the part after the last `/`, before any `?`).
pub fn database_name(url: &str) -> String {
    url.rsplit('/')
        .next()
        .and_then(|tail| tail.split('?').next())
        .filter(|name| !name.is_empty() && !name.contains('@'))
        .unwrap_or("postgres")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_diesel_statements() {
        assert_eq!(
            describe(r#"INSERT INTO "transactions" ("id", "amount") VALUES ($1, $2)"#),
            ("INSERT".into(), Some("transactions".into()))
        );
        assert_eq!(
            describe(
                r#"SELECT "users"."id", "users"."email" FROM "users" WHERE ("users"."email" = $1)"#
            ),
            ("SELECT".into(), Some("users".into()))
        );
        assert_eq!(
            describe(
                r#"UPDATE "notifications" SET "status" = $1 WHERE ("notifications"."order_id" = $2)"#
            ),
            ("UPDATE".into(), Some("notifications".into()))
        );
        assert_eq!(describe("SELECT 1"), ("SELECT".into(), None));
        assert_eq!(
            describe(
                "WITH charged AS (UPDATE transactions SET status = 'charged' WHERE (id = $1) RETURNING id) \
                 INSERT INTO outbox (id) SELECT $2 FROM charged"
            ),
            ("INSERT".into(), Some("outbox".into()))
        );
        assert_eq!(
            describe("with a as (select 1), b as not materialized (select 2) select * from a, b"),
            ("SELECT".into(), Some("a".into()))
        );
    }

    #[test]
    fn database_name_from_url() {
        assert_eq!(
            database_name("postgres://postgres@127.0.0.1:5432/tracehop"),
            "tracehop"
        );
        assert_eq!(database_name("postgres://u@h/db?sslmode=disable"), "db");
        assert_eq!(database_name("postgres://u@h"), "postgres");
    }
}

/// A retention rule: what a service deletes, how often, and how much per statement.
#[derive(Debug, Clone)]
pub struct Retention {
    /// Names the job's spans: `retention {name}`.
    pub name: &'static str,
    /// How often a round runs.
    pub every: Duration,
    /// Rows per `DELETE` (a round repeats it until fewer are deleted).
    pub batch: i64,
}

/// Deletes, on `retention`'s schedule, the rows of `table` whose `age_column` is older than `keep` and that
/// match `condition` (SQL, `TRUE` for all): the usual rule, on top of [`spawn_retention`]. `table`,
/// `age_column` and `condition` are the service's own constants, never outside input.
pub fn spawn_age_retention(
    database: Database,
    retention: Retention,
    table: &'static str,
    age_column: &'static str,
    condition: &'static str,
    keep: Duration,
) -> Result<(), chrono::OutOfRangeError> {
    let keep = chrono::Duration::from_std(keep)?;
    // PostgreSQL's DELETE has no LIMIT: the batch is chosen by a sub-select on `ctid`.
    let sql = format!(
        "DELETE FROM {table} WHERE ctid IN (SELECT ctid FROM {table} \
         WHERE ({condition}) AND {age_column} < $1 LIMIT $2)"
    );
    spawn_retention(database, retention, move |connection, statements, batch| {
        use diesel::RunQueryDsl;
        let query = diesel::sql_query(sql.as_str())
            .bind::<diesel::sql_types::Timestamptz, _>(chrono::Utc::now() - keep)
            .bind::<diesel::sql_types::BigInt, _>(batch);
        Ok(traced(statements, query, |query| {
            query.execute(connection)
        })?)
    });
    Ok(())
}

/// Runs `purge` every `retention.every` until the process ends: each round is a span `retention {name}`
/// (INTERNAL, `retention.deleted` = rows deleted), and each batch one statement, a child span.
/// `purge(connection, statements, batch)` deletes at most `batch` rows and says how many it did.
///
/// ```no_run
/// use std::time::Duration;
/// use diesel::RunQueryDsl;
/// use diesel::sql_types::{BigInt, Timestamptz};
/// use tracehop_telemetry::db::{Database, Retention, traced, spawn_retention};
///
/// # async fn run(database: Database) {
/// let rule = Retention { name: "events", every: Duration::from_secs(600), batch: 1000 };
/// spawn_retention(database, rule, |connection, statements, batch| {
///     // PostgreSQL's DELETE has no LIMIT: the batch is chosen by a sub-select on `ctid`.
///     let query = diesel::sql_query(
///         "DELETE FROM events WHERE ctid IN \
///          (SELECT ctid FROM events WHERE created_at < $1 LIMIT $2)",
///     )
///     .bind::<Timestamptz, _>(chrono::Utc::now() - chrono::Duration::days(7))
///     .bind::<BigInt, _>(batch);
///     Ok(traced(statements, query, |q| q.execute(connection))?)
/// });
/// # }
/// ```
pub fn spawn_retention<F>(database: Database, retention: Retention, purge: F)
where
    F: Fn(&mut DbConnection, &Statements, i64) -> Result<usize, DbError>
        + Clone
        + Send
        + Sync
        + 'static,
{
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(retention.every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let span = tracing::info_span!(
                "db.retention",
                otel.name = %format!("retention {}", retention.name),
                otel.kind = "internal",
                otel.status_code = tracing::field::Empty,
                retention.deleted = tracing::field::Empty,
            );
            let mut deleted = 0_usize;
            loop {
                let purge = purge.clone();
                let batch = retention.batch;
                let round = database
                    .run(move |connection, statements| purge(connection, statements, batch))
                    .instrument(span.clone())
                    .await;
                match round {
                    Ok(count) => {
                        deleted += count;
                        if i64::try_from(count).unwrap_or(i64::MAX) < retention.batch {
                            break;
                        }
                    }
                    Err(error) => {
                        span.record("otel.status_code", "ERROR");
                        span.in_scope(|| {
                            crate::setup::log_detail("retention round failed", &error);
                            tracing::warn!(error = error.code(), "retention round failed");
                        });
                        break;
                    }
                }
            }
            span.record(
                "retention.deleted",
                i64::try_from(deleted).unwrap_or(i64::MAX),
            );
            if deleted > 0 {
                span.in_scope(|| tracing::info!(deleted, "retention: old rows deleted"));
            }
        }
    });
}

/// One statement for many small writes: a group commit.
///
/// Work that finishes often and needs one small write each (an event published, an e-mail sent) hands its
/// key here, and a task writes the keys that have gathered with one statement per batch instead of one per
/// item. The first key handed over while the writer is idle is written at once, alone; keys that arrive while
/// a batch is being written wait for the next one. So batches grow with the load and nothing waits for a
/// timer: at rest an item costs what a statement of its own would, at load a fraction of it. Keys nobody
/// waits for can be held longer, for fewer and larger batches: [`GroupCommit::start_lingering`].
///
/// [`GroupCommit::commit`] waits for its batch and reports its outcome (the caller decides whether to retry);
/// [`GroupCommit::submit`] does not wait, and a failed batch's submitted keys are written again a second
/// later, until they succeed. The batches are written outside any trace (they belong to many), so `write`
/// should run plain diesel statements, not [`traced`] ones, which would each become a trace of one span.
///
/// ```no_run
/// use diesel::prelude::*;
/// use tracehop_telemetry::db::{Database, GroupCommit};
///
/// diesel::table! { events (id) { id -> Uuid, sent -> Bool } }
///
/// # async fn run(database: Database, id: uuid::Uuid) -> Result<(), tracehop_telemetry::db::DbError> {
/// let sent = GroupCommit::start(database, 500, |connection, ids: &[uuid::Uuid]| {
///     diesel::update(events::table.filter(events::id.eq_any(ids)))
///         .set(events::sent.eq(true))
///         .execute(connection)?;
///     Ok(())
/// });
/// sent.commit(id).await?; // written, alone or with whatever else finished meanwhile
/// # Ok(())
/// # }
/// ```
pub struct GroupCommit<K> {
    queue: tokio::sync::mpsc::UnboundedSender<Batched<K>>,
}

impl<K> Clone for GroupCommit<K> {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
        }
    }
}

struct Batched<K> {
    key: K,
    /// `None` for [`GroupCommit::submit`]: written again until it succeeds.
    done: Option<tokio::sync::oneshot::Sender<Result<(), DbError>>>,
}

impl<K: Clone + Send + 'static> GroupCommit<K> {
    /// Starts the writer on the current Tokio runtime. It stops when every handle is dropped (after
    /// writing what it holds). `write` gets at most `max_batch` keys at a time.
    pub fn start<F>(database: Database, max_batch: usize, write: F) -> Self
    where
        F: Fn(&mut DbConnection, &[K]) -> Result<(), DbError> + Clone + Send + Sync + 'static,
    {
        Self::start_lingering(database, max_batch, Duration::ZERO, write)
    }

    /// [`GroupCommit::start`], with each batch written `linger` after its first key arrived rather than at
    /// once: for keys nobody waits for ([`GroupCommit::submit`]), where one statement a second instead of
    /// one per few keys is worth the delay (billing's published events: BENCHMARKS.md, section 7).
    pub fn start_lingering<F>(
        database: Database,
        max_batch: usize,
        linger: Duration,
        write: F,
    ) -> Self
    where
        F: Fn(&mut DbConnection, &[K]) -> Result<(), DbError> + Clone + Send + Sync + 'static,
    {
        let (queue, mut incoming) = tokio::sync::mpsc::unbounded_channel::<Batched<K>>();
        let max_batch = max_batch.max(1);
        tokio::spawn(async move {
            let mut again: Vec<Batched<K>> = Vec::new();
            loop {
                let mut batch = std::mem::take(&mut again);
                if batch.is_empty() {
                    match incoming.recv().await {
                        Some(first) => batch.push(first),
                        None => break,
                    }
                    if !linger.is_zero() {
                        tokio::time::sleep(linger).await;
                    }
                }
                while batch.len() < max_batch {
                    match incoming.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let keys: Vec<K> = batch.iter().map(|item| item.key.clone()).collect();
                let write = write.clone();
                let outcome = database
                    .run(move |connection, _| write(connection, &keys))
                    .instrument(Span::none())
                    .await;
                match outcome {
                    Ok(()) => {
                        for item in batch {
                            if let Some(done) = item.done {
                                let _ = done.send(Ok(()));
                            }
                        }
                    }
                    Err(error) => {
                        crate::setup::log_detail("batched write failed", &error);
                        tracing::warn!(
                            error = error.code(),
                            keys = batch.len(),
                            "batched write failed"
                        );
                        for item in batch {
                            match item.done {
                                Some(done) => {
                                    let _ = done.send(Err(shared_error(&error)));
                                }
                                None => again.push(item),
                            }
                        }
                        if !again.is_empty() {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        });
        Self { queue }
    }

    /// Writes `key` with the next batch and waits for the outcome.
    pub async fn commit(&self, key: K) -> Result<(), DbError> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        self.queue
            .send(Batched {
                key,
                done: Some(done),
            })
            .map_err(|_| DbError::Task("the batch writer has stopped".to_owned()))?;
        outcome
            .await
            .map_err(|_| DbError::Task("the batch writer has stopped".to_owned()))?
    }

    /// Writes `key` with the next batch, and again after a failure, without waiting.
    pub fn submit(&self, key: K) {
        if self.queue.send(Batched { key, done: None }).is_err() {
            tracing::warn!("the batch writer has stopped; a write was dropped");
        }
    }
}

/// Small writes that ride on another statement's commit: the commit another piece of work makes anyway
/// carries them, so they add no commit of their own.
///
/// Work that finishes often (an e-mail sent) hands its key over with [`RideAlong::commit`] and waits. The
/// next statement that is about to be written anyway (the next delivery's claim) takes what waits with
/// [`RideAlong::board`], writes those keys in the same statement, and reports the outcome with
/// [`Riders::arrived`]. At load a key waits for about one such statement, and commits per item fall by one.
/// At rest nothing comes to take the keys: a task writes each on its own `linger` after it arrived (one
/// statement for all whose linger has run), so a key never waits longer than that plus one statement, and
/// a key that arrived just before an older one's linger ran out keeps its own chance to ride. A full batch is
/// written at once: when the keys come from work that holds back the next item until its key is written
/// (a consumer with so many deliveries in flight), the batch size is that many, and a full batch means
/// no statement is coming to take them.
///
/// [`GroupCommit`] is for keys with no statement to ride on; this is for keys that have one.
///
/// ```no_run
/// use diesel::prelude::*;
/// use tracehop_telemetry::db::{Database, RideAlong};
///
/// diesel::table! { events (id) { id -> Uuid, sent -> Bool } }
///
/// # async fn run(database: Database, id: uuid::Uuid) -> Result<(), tracehop_telemetry::db::DbError> {
/// let mark = |connection: &mut tracehop_telemetry::db::DbConnection, ids: &[uuid::Uuid]| {
///     diesel::update(events::table.filter(events::id.eq_any(ids)))
///         .set(events::sent.eq(true))
///         .execute(connection)?;
///     Ok(())
/// };
/// let sent = RideAlong::start(database.clone(), 1000, std::time::Duration::from_millis(20), mark);
///
/// // Where a statement is written anyway: take the waiting keys and write them with it.
/// let riders = sent.board(None);
/// let ids = riders.keys();
/// database
///     .run(move |connection, _| {
///         let outcome = mark(connection, &ids); // in the real thing: one statement with its own work
///         riders.arrived(outcome.as_ref().map(|_| ()));
///         outcome
///     })
///     .await?;
///
/// // Where an item finishes: wait until its key is written, by a statement like the one above or alone.
/// sent.commit(id).await?;
/// # Ok(())
/// # }
/// ```
pub struct RideAlong<K> {
    shared: Arc<RideShared<K>>,
    max_batch: usize,
}

impl<K> Clone for RideAlong<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            max_batch: self.max_batch,
        }
    }
}

struct RideShared<K> {
    waiting: std::sync::Mutex<Vec<Ride<K>>>,
    /// Wakes the writer of last resort (its own handle, so it can wait while holding no strong reference).
    arrived: Arc<tokio::sync::Notify>,
    /// Cuts the writer's linger short: a full batch waits.
    full: Arc<tokio::sync::Notify>,
}

impl<K> Drop for RideShared<K> {
    fn drop(&mut self) {
        // The last handle is gone: the writer wakes, finds nothing to upgrade, and stops.
        self.arrived.notify_one();
    }
}

struct Ride<K> {
    key: K,
    done: tokio::sync::oneshot::Sender<Result<(), DbError>>,
    /// When it was handed over: its linger runs from here (and keeps running while it is boarded by a
    /// statement that never ran).
    since: Instant,
}

impl<K> RideShared<K> {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<Ride<K>>> {
        // Every update under this lock is one push or one drain: a panic elsewhere leaves it consistent.
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Keys taken by [`RideAlong::board`], to be written with the taker's statement. Report the outcome with
/// [`Riders::arrived`]; dropped without it (the statement never ran), they wait for the next one again.
pub struct Riders<K> {
    rides: Vec<Ride<K>>,
    shared: Arc<RideShared<K>>,
}

impl<K: Clone> Riders<K> {
    /// The keys to write (empty when nothing waited).
    pub fn keys(&self) -> Vec<K> {
        self.rides.iter().map(|ride| ride.key.clone()).collect()
    }

    /// Reports whether the statement that carried the keys committed: each waiting [`RideAlong::commit`]
    /// returns `Ok`, or the error (whose callers decide whether to try again).
    pub fn arrived(mut self, outcome: Result<(), &DbError>) {
        for ride in std::mem::take(&mut self.rides) {
            let _ = ride.done.send(match outcome {
                Ok(()) => Ok(()),
                Err(error) => Err(shared_error(error)),
            });
        }
    }
}

impl<K> Drop for Riders<K> {
    fn drop(&mut self) {
        if !self.rides.is_empty() {
            self.shared.waiting().append(&mut self.rides);
            self.shared.arrived.notify_one();
        }
    }
}

/// The error a batch's or a ride's items each get: whether the database was unreachable, and its text.
fn shared_error(error: &DbError) -> DbError {
    if error.is_unavailable() {
        DbError::ConnectionLost(error.to_string())
    } else {
        DbError::Batch(error.to_string())
    }
}

impl<K: Clone + PartialEq + Send + 'static> RideAlong<K> {
    /// Starts the writer of last resort on the current Tokio runtime: a key nobody took within `linger` of
    /// its own hand-over, or any key as soon as `max_batch` of them wait, is written by `write`, at most
    /// `max_batch` at a time (the most [`RideAlong::board`] hands out too). A key handed over just before
    /// another one's linger ran out keeps its own chance to ride. It stops when every handle is dropped.
    pub fn start<F>(database: Database, max_batch: usize, linger: Duration, write: F) -> Self
    where
        F: Fn(&mut DbConnection, &[K]) -> Result<(), DbError> + Clone + Send + Sync + 'static,
    {
        let arrived = Arc::new(tokio::sync::Notify::new());
        let full = Arc::new(tokio::sync::Notify::new());
        let shared = Arc::new(RideShared {
            waiting: std::sync::Mutex::default(),
            arrived: arrived.clone(),
            full: full.clone(),
        });
        let max_batch = max_batch.max(1);
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            loop {
                arrived.notified().await;
                // Batch after batch, what has waited its linger (or, when a full batch waits, whatever
                // waits), until nothing is left; then sleep until the next hand-over.
                loop {
                    let Some(shared) = weak.upgrade() else { return };
                    let oldest = shared.waiting().iter().map(|ride| ride.since).min();
                    drop(shared);
                    let Some(oldest) = oldest else { break };
                    tokio::select! {
                        () = tokio::time::sleep_until((oldest + linger).into()) => {}
                        () = full.notified() => {}
                    }
                    let Some(shared) = weak.upgrade() else { return };
                    // What is taken now had no statement to ride on.
                    let riders = Self { shared, max_batch }.board_overdue(linger);
                    if riders.rides.is_empty() {
                        continue;
                    }
                    let keys = riders.keys();
                    let write = write.clone();
                    let outcome = database
                        .run(move |connection, _| write(connection, &keys))
                        .instrument(Span::none())
                        .await;
                    if let Err(error) = &outcome {
                        crate::setup::log_detail("batched write failed", error);
                        tracing::warn!(
                            error = error.code(),
                            keys = riders.rides.len(),
                            "batched write failed"
                        );
                    }
                    riders.arrived(outcome.as_ref().map(|_| ()));
                }
            }
        });
        Self { shared, max_batch }
    }

    /// Waits until `key` is written: by a statement that took it ([`RideAlong::board`]), or on its own after
    /// the linger.
    pub async fn commit(&self, key: K) -> Result<(), DbError> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let waiting = {
            let mut waiting = self.shared.waiting();
            waiting.push(Ride {
                key,
                done,
                since: Instant::now(),
            });
            waiting.len()
        };
        self.shared.arrived.notify_one();
        if waiting >= self.max_batch {
            self.shared.full.notify_one();
        }
        outcome
            .await
            .map_err(|_| DbError::Task("the ride-along writer has stopped".to_owned()))?
    }

    /// Takes the keys waiting now (at most the batch size), to be written with the caller's statement;
    /// `except` stays behind (a statement that writes that key's row itself cannot update it a second
    /// time).
    pub fn board(&self, except: Option<&K>) -> Riders<K> {
        let mut waiting = self.shared.waiting();
        let mut rides = Vec::new();
        let mut index = 0;
        while index < waiting.len() && rides.len() < self.max_batch {
            if except.is_some_and(|except| *except == waiting[index].key) {
                index += 1;
            } else {
                rides.push(waiting.swap_remove(index));
            }
        }
        drop(waiting);
        Riders {
            rides,
            shared: self.shared.clone(),
        }
    }

    /// The writer of last resort's boarding: the keys that have waited `linger` or longer, or, when a full
    /// batch waits, any (at most the batch size either way).
    fn board_overdue(&self, linger: Duration) -> Riders<K> {
        let now = Instant::now();
        let mut waiting = self.shared.waiting();
        let full = waiting.len() >= self.max_batch;
        let mut rides = Vec::new();
        let mut index = 0;
        while index < waiting.len() && rides.len() < self.max_batch {
            if full || now.duration_since(waiting[index].since) >= linger {
                rides.push(waiting.swap_remove(index));
            } else {
                index += 1;
            }
        }
        drop(waiting);
        Riders {
            rides,
            shared: self.shared.clone(),
        }
    }
}
