//! The login throttle against a real PostgreSQL (`DATABASE_URL`, default the local server's `postgres`
//! database; each test makes a database of its own with the migration's table): two throttles stand for two
//! replicas of users, and count against the same rows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::{Connection, RunQueryDsl};
use tracehop_telemetry::db::Database;
use users::throttle::{LoginThrottle, Throttled};

const MIGRATION: &str = include_str!("../../../migrations/2026-11-28-000007_login_failures/up.sql");

/// A database of its own with `login_failures`, dropped at the end.
struct Scratch {
    admin: String,
    name: String,
    url: String,
    database: Database,
}

impl Scratch {
    fn create() -> Self {
        let admin = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!("throttle_{}", uuid::Uuid::new_v4().simple());
        let mut connection = diesel::PgConnection::establish(&admin).unwrap();
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut connection)
            .unwrap();
        let url = match admin.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => unreachable!("a database URL has a path"),
        };
        let mut connection = diesel::PgConnection::establish(&url).unwrap();
        // The role the migration grants to, made as the earlier migration makes it (`a_role_per_service`,
        // with LOGIN: the services log in as it) when this server has none yet.
        diesel::sql_query(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tracehop_users') \
             THEN CREATE ROLE tracehop_users LOGIN; END IF; END $$",
        )
        .execute(&mut connection)
        .unwrap();
        connection.batch_execute(MIGRATION).unwrap();
        let database = Database::connect(&url, 8).unwrap();
        Self {
            admin,
            name,
            url,
            database,
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Ok(mut connection) = diesel::PgConnection::establish(&self.admin) {
            let _ = diesel::sql_query(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .execute(&mut connection);
        }
    }
}

#[tokio::test]
async fn two_replicas_count_one_account_together() {
    let scratch = Scratch::create();
    // Two throttles with the same limits: two replicas of users.
    let replicas = [LoginThrottle::new(3, 100, Duration::from_secs(60)); 2];
    let mut answers = Vec::new();
    for attempt in 0..6 {
        let replica = &replicas[attempt % 2];
        let answer = replica
            .begin(&scratch.database, "victim@example.com", Some("10.0.0.1"))
            .await
            .unwrap();
        answers.push(answer);
    }
    assert!(answers[..3].iter().all(Result::is_ok), "{answers:?}");
    for refused in &answers[3..] {
        assert!(
            matches!(refused, Err(Throttled { retry_after }) if (1..=60).contains(retry_after)),
            "{answers:?}"
        );
    }
    // Another account from the same address: let in; the refused attempts did not count against it.
    let other = replicas[1]
        .begin(&scratch.database, "other@example.com", Some("10.0.0.1"))
        .await
        .unwrap();
    assert_eq!(other, Ok(()));
    // A success on one replica clears the account for both.
    replicas[0]
        .succeeded(&scratch.database, "victim@example.com", Some("10.0.0.1"))
        .await
        .unwrap();
    let after = replicas[1]
        .begin(&scratch.database, "victim@example.com", Some("10.0.0.1"))
        .await
        .unwrap();
    assert_eq!(after, Ok(()));
}

#[tokio::test]
async fn a_concurrent_burst_lets_in_exactly_the_limit() {
    let scratch = Scratch::create();
    // Two throttles with the same limits: two replicas of users.
    let replicas = [LoginThrottle::new(5, 1000, Duration::from_secs(60)); 2];
    let answers = burst(
        &scratch,
        replicas,
        40,
        |_| "burst@example.com".to_owned(),
        "10.0.0.2",
    )
    .await;
    let admitted = answers.iter().filter(|(_, answer)| answer.is_ok()).count();
    assert_eq!(admitted, 5);
}

#[tokio::test]
async fn an_address_is_locked_across_accounts_and_only_that_address() {
    let scratch = Scratch::create();
    let throttle = LoginThrottle::new(100, 5, Duration::from_secs(60));
    let database = &scratch.database;
    for index in 0..5 {
        let email = format!("user{index}@example.com");
        let answer = throttle.begin(database, &email, Some("10.0.0.9")).await;
        assert_eq!(answer.unwrap(), Ok(()));
    }
    let refused = throttle
        .begin(database, "fresh@example.com", Some("10.0.0.9"))
        .await
        .unwrap();
    assert!(refused.is_err(), "{refused:?}");
    for (email, address) in [
        ("fresh@example.com", Some("10.0.0.8")),
        ("fresh2@example.com", None),
    ] {
        let answer = throttle.begin(database, email, address).await.unwrap();
        assert_eq!(answer, Ok(()), "{email} from {address:?}");
    }
}

#[tokio::test]
async fn the_window_ends() {
    let scratch = Scratch::create();
    let throttle = LoginThrottle::new(1, 1, Duration::from_millis(300));
    let database = &scratch.database;
    assert_eq!(
        throttle.begin(database, "a", Some("b")).await.unwrap(),
        Ok(())
    );
    assert!(
        throttle
            .begin(database, "a", Some("b"))
            .await
            .unwrap()
            .is_err()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        throttle.begin(database, "a", Some("b")).await.unwrap(),
        Ok(())
    );
}

#[tokio::test]
async fn a_concurrent_burst_from_one_address_lets_in_exactly_its_limit() {
    // One address trying many accounts at once (credential stuffing): each attempt is the first for its
    // account, so only the address's limit stands in the way, and attempts racing at it must not slip by.
    let scratch = Scratch::create();
    // Two throttles with the same limits: two replicas of users.
    let replicas = [LoginThrottle::new(100, 5, Duration::from_secs(60)); 2];
    let answers = burst(
        &scratch,
        replicas,
        40,
        |attempt| format!("stuffed{attempt}@example.com"),
        "10.0.0.3",
    )
    .await;
    let admitted = answers.iter().filter(|(_, answer)| answer.is_ok()).count();
    assert_eq!(admitted, 5);
    let refused: Vec<String> = answers
        .into_iter()
        .filter(|(_, answer)| answer.is_err())
        .map(|(account, _)| account)
        .collect();
    // A refused attempt counted against neither: each of those accounts still has its whole allowance from
    // another address.
    for account in refused.iter().take(3) {
        let answer = replicas[0]
            .begin(&scratch.database, account, Some("10.0.0.4"))
            .await
            .unwrap();
        assert_eq!(answer, Ok(()), "{account}");
    }
    let counted: Vec<i32> = {
        use diesel::sql_types::Int4;
        #[derive(diesel::QueryableByName)]
        struct Failures {
            #[diesel(sql_type = Int4)]
            failures: i32,
        }
        let keys: Vec<String> = refused
            .iter()
            .take(3)
            .map(|a| format!("account:{a}"))
            .collect();
        let mut connection = diesel::PgConnection::establish(&scratch.url).unwrap();
        diesel::sql_query("SELECT failures FROM login_failures WHERE key = ANY($1) ORDER BY key")
            .bind::<diesel::sql_types::Array<diesel::sql_types::Text>, _>(keys)
            .load::<Failures>(&mut connection)
            .unwrap()
            .into_iter()
            .map(|row| row.failures)
            .collect()
    };
    // Only the attempt just made from the other address counts.
    assert_eq!(counted, vec![1, 1, 1]);
}

/// `attempts` login attempts at once, alternating between the two throttles (two replicas), attempt `n` on
/// the account `account(n)` from `address`: each account with its answer.
async fn burst(
    scratch: &Scratch,
    replicas: [LoginThrottle; 2],
    attempts: usize,
    account: impl Fn(usize) -> String,
    address: &'static str,
) -> Vec<(String, Result<(), Throttled>)> {
    // Every attempt waits until all are ready, so they reach the database together.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(attempts));
    let tasks: Vec<_> = (0..attempts)
        .map(|attempt| {
            let replica = replicas[attempt % 2];
            let database = scratch.database.clone();
            let account = account(attempt);
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let answer = replica
                    .begin(&database, &account, Some(address))
                    .await
                    .unwrap();
                (account, answer)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}
