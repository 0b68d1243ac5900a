//! `db::RideAlong` against a real PostgreSQL (`DATABASE_URL`, default the local server's `postgres`
//! database): a key is written by the statement that boards it, or alone after the linger, and never lost
//! when the boarding statement does not run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use diesel::RunQueryDsl;
use diesel::sql_types::{Array, Int4};
use tracehop_telemetry::db::{Database, DbConnection, DbError, RideAlong, Riders};

/// A table of its own for one test, dropped at the end.
struct Table {
    database: Database,
    name: String,
}

impl Table {
    async fn create() -> Self {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let database = Database::connect(&url, 4).expect("pool");
        let name = format!("ride_along_{}", uuid::Uuid::new_v4().simple());
        let statement =
            format!("CREATE TABLE {name} (id int PRIMARY KEY, sent bool NOT NULL DEFAULT false)");
        database
            .run(move |connection, _| {
                diesel::sql_query(statement).execute(connection)?;
                Ok(())
            })
            .await
            .expect("create table");
        Self { database, name }
    }

    async fn insert(&self, ids: &[i32]) {
        let statement = format!("INSERT INTO {} (id) SELECT unnest($1)", self.name);
        let ids = ids.to_vec();
        self.database
            .run(move |connection, _| {
                diesel::sql_query(statement)
                    .bind::<Array<Int4>, _>(ids)
                    .execute(connection)?;
                Ok(())
            })
            .await
            .expect("insert");
    }

    /// The write both paths run: marks `ids` sent.
    fn mark(
        &self,
    ) -> impl Fn(&mut DbConnection, &[i32]) -> Result<(), DbError> + Clone + Send + Sync + 'static
    {
        let statement = format!("UPDATE {} SET sent = true WHERE id = ANY($1)", self.name);
        move |connection, ids| {
            diesel::sql_query(statement.clone())
                .bind::<Array<Int4>, _>(ids)
                .execute(connection)?;
            Ok(())
        }
    }

    async fn sent(&self) -> Vec<i32> {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = Int4)]
            id: i32,
        }
        let statement = format!("SELECT id FROM {} WHERE sent ORDER BY id", self.name);
        self.database
            .run(move |connection, _| Ok(diesel::sql_query(statement).load::<Row>(connection)?))
            .await
            .expect("select")
            .into_iter()
            .map(|row| row.id)
            .collect()
    }

    async fn remove(self) {
        let statement = format!("DROP TABLE {}", self.name);
        let _ = self
            .database
            .run(move |connection, _| Ok(diesel::sql_query(statement).execute(connection)?))
            .await;
    }
}

/// `mark`, counting how often the writer of last resort runs it.
#[allow(clippy::type_complexity)] // two `impl Fn`s of one signature, spelled out
fn counted(
    mark: impl Fn(&mut DbConnection, &[i32]) -> Result<(), DbError> + Clone + Send + Sync + 'static,
) -> (
    Arc<AtomicUsize>,
    impl Fn(&mut DbConnection, &[i32]) -> Result<(), DbError> + Clone + Send + Sync + 'static,
) {
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    (runs, move |connection: &mut DbConnection, ids: &[i32]| {
        counter.fetch_add(1, Ordering::SeqCst);
        mark(connection, ids)
    })
}

/// Hands each of `ids` over on a task of its own, as concurrent deliveries do.
fn commit_each(
    along: &RideAlong<i32>,
    ids: &[i32],
) -> Vec<tokio::task::JoinHandle<Result<(), DbError>>> {
    ids.iter()
        .map(|&id| {
            let along = along.clone();
            tokio::spawn(async move { along.commit(id).await })
        })
        .collect()
}

/// Boards until at least `count` keys are taken (the committing tasks hand theirs over concurrently).
async fn board_at_least(along: &RideAlong<i32>, count: usize, except: Option<&i32>) -> Riders<i32> {
    for _ in 0..500 {
        let riders = along.board(except);
        if riders.keys().len() >= count {
            return riders;
        }
        drop(riders);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("fewer than {count} keys were waiting");
}

#[tokio::test]
async fn a_key_nobody_takes_is_written_alone_after_the_linger() {
    let table = Table::create().await;
    table.insert(&[1, 2]).await;
    let (runs, mark) = counted(table.mark());
    let along = RideAlong::start(table.database.clone(), 100, Duration::from_millis(20), mark);
    let handed_over = std::time::Instant::now();

    along.commit(1).await.expect("written");

    assert!(
        handed_over.elapsed() >= Duration::from_millis(20),
        "written before the linger"
    );
    assert_eq!(table.sent().await, vec![1]);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    table.remove().await;
}

#[tokio::test]
async fn a_key_keeps_its_own_linger_when_an_older_one_is_written_alone() {
    let table = Table::create().await;
    table.insert(&[1, 2]).await;
    let (runs, mark) = counted(table.mark());
    let linger = Duration::from_millis(400);
    let along = RideAlong::start(table.database.clone(), 100, linger, mark);
    let first = commit_each(&along, &[1]);
    tokio::time::sleep(linger / 2).await;
    let second = commit_each(&along, &[2]);

    // The first key's linger runs out; the second, handed over half a linger later, must stay behind for a
    // statement to carry (at load, the next claim), not be swept along with the first.
    for task in first {
        task.await.expect("task").expect("written alone");
    }
    assert_eq!(table.sent().await, vec![1]);
    let riders = along.board(None);
    assert_eq!(
        riders.keys(),
        vec![2],
        "the younger key was written alone early"
    );
    drop(riders);

    // Not taken after all: it is written alone once its own linger has run.
    for task in second {
        task.await.expect("task").expect("written alone");
    }
    assert_eq!(table.sent().await, vec![1, 2]);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    table.remove().await;
}

#[tokio::test]
async fn boarded_keys_ride_on_the_boarding_statement_and_are_not_written_again() {
    let table = Table::create().await;
    table.insert(&[1, 2, 3]).await;
    let (runs, mark) = counted(table.mark());
    // A linger far longer than the test: only the boarding statement can write the keys.
    let along = RideAlong::start(table.database.clone(), 100, Duration::from_secs(600), mark);
    let committing = commit_each(&along, &[1, 2]);

    let riders = board_at_least(&along, 2, None).await;
    let ids = riders.keys();
    let write = table.mark();
    table
        .database
        .run(move |connection, _| {
            let outcome = write(connection, &ids);
            riders.arrived(outcome.as_ref().map(|_| ()));
            outcome
        })
        .await
        .expect("the boarding statement");

    for task in committing {
        task.await
            .expect("task")
            .expect("written by the boarding statement");
    }
    assert_eq!(table.sent().await, vec![1, 2]);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "the writer of last resort ran"
    );
    table.remove().await;
}

#[tokio::test]
async fn the_excepted_key_stays_behind_and_riders_never_carried_wait_again() {
    let table = Table::create().await;
    table.insert(&[1, 2]).await;
    let (runs, mark) = counted(table.mark());
    // Long enough that the boarding below comes first, short enough to wait for.
    let along = RideAlong::start(table.database.clone(), 100, Duration::from_secs(2), mark);
    let committing = commit_each(&along, &[1, 2]);
    board_at_least(&along, 2, None).await; // both are waiting (and go back when dropped)

    let riders = along.board(Some(&1));
    assert_eq!(riders.keys(), vec![2], "the excepted key was taken");
    // The statement that boarded them never ran: dropped, they wait again and the linger's writer takes them.
    drop(riders);

    for task in committing {
        task.await.expect("task").expect("written after all");
    }
    assert_eq!(table.sent().await, vec![1, 2]);
    assert!(runs.load(Ordering::SeqCst) >= 1);
    table.remove().await;
}

#[tokio::test]
async fn a_failed_boarding_statement_fails_its_riders() {
    let table = Table::create().await;
    let along = RideAlong::start(
        table.database.clone(),
        100,
        Duration::from_secs(600),
        table.mark(),
    );
    let committing = {
        let along = along.clone();
        tokio::spawn(async move { along.commit(7).await })
    };
    let riders = board_at_least(&along, 1, None).await;

    riders.arrived(Err(&DbError::Task("the statement failed".to_owned())));

    let outcome = committing.await.expect("task");
    assert!(matches!(outcome, Err(DbError::Batch(_))), "{outcome:?}");
    table.remove().await;
}

#[tokio::test]
async fn a_full_batch_is_written_without_waiting_for_the_linger() {
    let table = Table::create().await;
    table.insert(&[1, 2]).await;
    let (runs, mark) = counted(table.mark());
    // Batches of two, a linger longer than the test: only a full batch can be written.
    let along = RideAlong::start(table.database.clone(), 2, Duration::from_secs(600), mark);
    let (first, second) = tokio::join!(along.commit(1), along.commit(2));

    first.expect("written");
    second.expect("written");
    assert_eq!(table.sent().await, vec![1, 2]);
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "one statement for the batch"
    );
    table.remove().await;
}
