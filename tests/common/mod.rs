//! Boots a private stack for one test: its own NATS server, its own database on the shared PostgreSQL, free
//! ports, the embedded collector; everything stopped and dropped at the end, even when the test fails.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(dead_code)]

pub mod deployment;
pub mod smtp;

use std::path::PathBuf;
use std::time::Duration;

use tracehop::process::free_port;
use tracehop::stack::{NatsChoice, Ports, Stack, StackOptions, TraceBackend};
use tracehop::trace_view::TraceView;

/// The PostgreSQL server tests use (`DATABASE_URL`, any database name), default the local one.
pub fn database_server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub struct TestStack {
    pub stack: Stack,
    pub database_name: String,
    pub state_dir: PathBuf,
}

impl TestStack {
    pub async fn boot(extra_env: &[(&str, &str)]) -> TestStack {
        Self::boot_with(extra_env, "http/protobuf").await
    }

    pub async fn boot_with(extra_env: &[(&str, &str)], otlp_protocol: &str) -> TestStack {
        Self::boot_custom(extra_env, otlp_protocol, TraceBackend::Embedded).await
    }

    pub async fn boot_custom(
        extra_env: &[(&str, &str)],
        otlp_protocol: &str,
        trace_backend: TraceBackend,
    ) -> TestStack {
        Self::boot_on(
            extra_env,
            otlp_protocol,
            trace_backend,
            database_server_url(),
        )
        .await
    }

    /// Boots against a given PostgreSQL server (the database-outage test brings its own).
    pub async fn boot_on(
        extra_env: &[(&str, &str)],
        otlp_protocol: &str,
        trace_backend: TraceBackend,
        database_server: String,
    ) -> TestStack {
        Self::boot_replicated(
            extra_env,
            otlp_protocol,
            trace_backend,
            database_server,
            1,
            1,
        )
        .await
    }

    /// Boots with `replicas` processes of each of users, billing and notifications, and a NATS cluster of
    /// `nats_nodes` (1: one server).
    pub async fn boot_replicated(
        extra_env: &[(&str, &str)],
        otlp_protocol: &str,
        trace_backend: TraceBackend,
        database_server: String,
        replicas: usize,
        nats_nodes: usize,
    ) -> TestStack {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let database_name = format!("tracehop_test_{}", &id[..12]);
        let state_dir = std::env::temp_dir().join(format!("tracehop-test-{}", &id[..12]));
        let mut env: Vec<(String, String)> = [
            // Short timeouts keep failure tests quick; defaults are documented in the README.
            ("BILLING_STRIPE_ATTEMPT_TIMEOUT_MS", "2000"),
            ("BILLING_STRIPE_BACKOFF_MS", "50"),
            ("NOTIFICATIONS_BACKOFF_MS", "200"),
            ("BILLING_OUTBOX_SWEEP_MS", "500"),
            // A killed notifier's claims run out this fast (the default, 60 s, suits real mail servers).
            ("NOTIFICATIONS_CLAIM_LEASE_MS", "10000"),
            ("RUST_LOG", "info"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let options = StackOptions {
            state_dir: state_dir.clone(),
            ports: Ports::free().expect("free ports"),
            nats: if nats_nodes > 1 {
                NatsChoice::Cluster {
                    ports: (0..nats_nodes)
                        .map(|_| free_port().expect("free port"))
                        .collect(),
                }
            } else {
                NatsChoice::Private {
                    port: free_port().expect("free port"),
                }
            },
            database_server_url: database_server.clone(),
            database_name: database_name.clone(),
            trace_backend,
            otlp_protocol: otlp_protocol.to_owned(),
            extra_env: env,
            replicas,
            bin_dir: None,
            cpus: None,
        };
        let stack = match Stack::start(options).await {
            Ok(stack) => stack,
            Err(error) => {
                let _ =
                    tracehop::infra::drop_database(&database_server_url(), &database_name).await;
                panic!("stack did not start: {error:#}");
            }
        };
        TestStack {
            stack,
            database_name,
            state_dir,
        }
    }

    /// A new customer of this stack, signed up and logged in.
    pub async fn customer(&self) -> tracehop::client::ApiClient {
        let mut customer = tracehop::client::ApiClient::new(&self.stack.gateway_url());
        customer
            .signup_and_login(
                &tracehop::client::unique_email("dani"),
                "correct horse battery",
            )
            .await
            .expect("signup and login");
        customer
    }

    pub fn jaeger(&self) -> String {
        self.stack.jaeger_url.clone().expect("embedded collector")
    }

    /// Waits until the trace satisfies `ready` (spans arrive in batches from four processes).
    pub async fn trace(&self, trace_id: &str, ready: impl Fn(&TraceView) -> bool) -> TraceView {
        TraceView::wait_for(&self.jaeger(), trace_id, Duration::from_secs(30), ready)
            .await
            .unwrap_or_else(|error| panic!("trace {trace_id} not found: {error:#}"))
    }

    /// A connection to this test's database.
    pub fn db(&self) -> diesel::PgConnection {
        use diesel::Connection;
        diesel::PgConnection::establish(&self.stack.database_url).expect("database connection")
    }

    /// The e-mails in the mail sink folder (one file per order).
    pub fn sent_mail(&self) -> Vec<serde_json::Value> {
        std::fs::read_dir(&self.stack.mail_sink)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "json"))
            .filter_map(|entry| std::fs::read_to_string(entry.path()).ok())
            .filter_map(|text| serde_json::from_str(&text).ok())
            .collect()
    }

    pub async fn stripe_charges(&self) -> Vec<serde_json::Value> {
        let body = self.stripe_admin("charges").await;
        body["data"].as_array().cloned().unwrap_or_default()
    }

    /// stripe-sim's current fault settings.
    pub async fn current_stripe_faults(&self) -> serde_json::Value {
        self.stripe_admin("faults").await
    }

    async fn stripe_admin(&self, what: &str) -> serde_json::Value {
        tracehop_telemetry::http::client::plain_client_builder()
            .build()
            .unwrap()
            .get(format!("{}/_admin/{what}", self.stack.stripe_sim_url()))
            .send()
            .await
            .expect("stripe-sim")
            .json()
            .await
            .expect("json")
    }

    pub async fn stripe_faults(&self, faults: serde_json::Value) {
        let response = tracehop_telemetry::http::client::plain_client_builder()
            .build()
            .unwrap_or_default()
            .post(format!("{}/_admin/faults", self.stack.stripe_sim_url()))
            .json(&faults)
            .send()
            .await
            .expect("stripe-sim");
        assert!(response.status().is_success());
    }
}

impl Drop for TestStack {
    fn drop(&mut self) {
        self.stack.stop();
        drop_database(&self.stack.options.database_server_url, &self.database_name);
        if std::env::var_os("TRACEHOP_KEEP_TEST_STATE").is_none() {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }
}

/// Best effort, synchronous (a `Drop` cannot await): removes a test's database.
pub fn drop_database(server_url: &str, name: &str) {
    use diesel::{Connection, RunQueryDsl};
    let admin = tracehop::infra::with_database(server_url, "postgres");
    if let Ok(mut connection) = diesel::PgConnection::establish(&admin) {
        let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut connection);
    }
}

/// The one span called `name` (panics with the span list when there is not exactly one).
pub fn one<'a>(trace: &'a TraceView, name: &str) -> &'a tracehop::trace_view::SpanView {
    let found = trace.named(name);
    assert_eq!(
        found.len(),
        1,
        "expected one span {name:?}, found {}; spans: {:#?}",
        found.len(),
        trace
            .spans
            .iter()
            .map(|s| format!("{} [{}]", s.name, s.service))
            .collect::<Vec<_>>()
    );
    found[0]
}

/// A private PostgreSQL a test can stop and start again (on the same port and data), removed at the end.
pub struct StoppablePostgres {
    dir: std::path::PathBuf,
    port: u16,
    pub url: String,
    server: Option<tracehop::infra::PrivatePostgres>,
}

impl StoppablePostgres {
    pub fn start() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("tracehop-pg-{}", &id[..8]));
        let port = tracehop::process::free_port().unwrap();
        let mut postgres = Self {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            port,
            server: None,
        };
        postgres.start_again();
        postgres
    }

    pub fn start_again(&mut self) {
        self.server = Some(
            tracehop::infra::PrivatePostgres::start(
                &self.dir.join("data"),
                self.port,
                &self.dir.join("logs/postgres.log"),
            )
            .expect("private PostgreSQL"),
        );
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop(&mut self) {
        self.server = None;
    }
}

impl Drop for StoppablePostgres {
    fn drop(&mut self) {
        self.server = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
