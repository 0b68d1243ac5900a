//! Section 6 of BENCHMARKS.md: what a checkout costs, this build against a baseline build (the commit
//! before the performance work, built into a target folder of its own by `./dev bench`), and how this
//! build scales from one core to two.
//!
//! Every run is a fresh stack on a private PostgreSQL cluster that loads `pg_stat_statements` (so that
//! statements can be counted whatever the machine's own server is configured with): closed loop, checkouts
//! only, spans exported to the counting collector; "services on 1 core" starts every service under
//! `taskset -c 0`, so each sizes its thread pools for one core (PostgreSQL, NATS and the load generator keep
//! both). Per checkout it reports the CPU of each service, of
//! PostgreSQL (the cluster's postmaster and its children) and of NATS, from `/proc`; and, for the two-core
//! traced runs, the statements (`pg_stat_statements` calls in the stack's database, without `BEGIN`,
//! `COMMIT` and `ROLLBACK`; the background jobs' included) and commits (`pg_stat_database.xact_commit`,
//! read-only statements included: each is a transaction) per order made. PostgreSQL publishes a busy
//! backend's counters about once a second and an idle one's after ten seconds, so the counters are read
//! with the stack idle, eleven seconds after the sign-ups and after the load, and divided by the orders
//! made in between (warm-up included).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use super::{BenchOptions, ProcessSample, cpu_ticks, sample, service_pids};
use crate::infra::PrivatePostgres;
use crate::load::{self, LoadOptions};
use crate::process::free_port;
use crate::stack::{NatsChoice, Ports, Stack, StackOptions, TraceBackend};

/// One configuration.
#[derive(Debug, Clone, Copy)]
struct Variant {
    label: &'static str,
    baseline: bool,
    traced: bool,
    one_core: bool,
}

const VARIANTS: [Variant; 5] = [
    Variant {
        label: "this build, traced, 2 cores",
        baseline: false,
        traced: true,
        one_core: false,
    },
    Variant {
        label: "baseline, traced, 2 cores",
        baseline: true,
        traced: true,
        one_core: false,
    },
    Variant {
        label: "this build, traced, services on 1 core",
        baseline: false,
        traced: true,
        one_core: true,
    },
    Variant {
        label: "this build, untraced, 2 cores",
        baseline: false,
        traced: false,
        one_core: false,
    },
    Variant {
        label: "this build, untraced, services on 1 core",
        baseline: false,
        traced: false,
        one_core: true,
    },
];

/// Runs every variant `options.rounds` times (the order reversed every other round).
pub async fn run(options: &BenchOptions) -> anyhow::Result<serde_json::Value> {
    let data_dir = options.state_dir.join("compare-postgres");
    let _ = std::fs::remove_dir_all(&data_dir);
    let port = free_port()?;
    let cluster = PrivatePostgres::start_with(
        &data_dir,
        port,
        &options.state_dir.join("logs").join("compare-postgres.log"),
        "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=top \
         -c max_connections=300",
    )?;
    let server_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    sql(
        &server_url,
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
    )
    .await?;
    let postmaster = cluster
        .postmaster_pid()
        .ok_or_else(|| anyhow::anyhow!("no postmaster.pid in {}", data_dir.display()))?;

    let variants: Vec<Variant> = VARIANTS
        .iter()
        .copied()
        .filter(|variant| !variant.baseline || options.baseline_bin_dir.is_some())
        .collect();
    let mut runs = Vec::new();
    for round in 0..options.rounds {
        let mut order = variants.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for variant in order {
            eprintln!("== compare round {} ({})", round + 1, variant.label);
            let run = one_run(options, &server_url, postmaster, variant).await?;
            eprintln!("{}", serde_json::to_string(&run)?);
            runs.push(run);
        }
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(json!({
        "baseline_bin_dir": options.baseline_bin_dir,
        "concurrency": options.compare_concurrency,
        "runs": runs,
    }))
}

async fn one_run(
    options: &BenchOptions,
    server_url: &str,
    postmaster: u32,
    variant: Variant,
) -> anyhow::Result<serde_json::Value> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut extra_env = vec![("RUST_LOG".to_owned(), "warn".to_owned())];
    if !variant.traced {
        extra_env.push(("OTEL_SDK_DISABLED".to_owned(), "true".to_owned()));
    }
    let database = format!("tracehop_compare_{}", &id[..12]);
    let mut stack = Stack::start(StackOptions {
        state_dir: options.state_dir.join(format!("compare-{}", &id[..8])),
        ports: Ports::free()?,
        nats: NatsChoice::Private { port: free_port()? },
        database_server_url: server_url.to_owned(),
        database_name: database.clone(),
        trace_backend: TraceBackend::Counting,
        otlp_protocol: options.otlp_protocol.clone(),
        extra_env,
        replicas: 1,
        bin_dir: if variant.baseline {
            options.baseline_bin_dir.clone()
        } else {
            None
        },
        cpus: variant.one_core.then(|| "0".to_owned()),
    })
    .await?;
    let outcome = measure(options, &mut stack, server_url, postmaster, variant).await;
    stack.stop();
    let _ = crate::infra::drop_database(server_url, &database).await;
    outcome
}

async fn measure(
    options: &BenchOptions,
    stack: &mut Stack,
    server_url: &str,
    postmaster: u32,
    variant: Variant,
) -> anyhow::Result<serde_json::Value> {
    let pids = service_pids(stack);
    let nats_pid = stack.nats.as_ref().and_then(|nats| nats.process.pid());
    let users = load::user_pool(&stack.gateway_url(), 50).await?;
    let database = stack.options.database_name.clone();
    let count_statements = variant.traced && !variant.one_core;
    let before = if count_statements {
        tokio::time::sleep(Duration::from_secs(11)).await;
        sql(server_url, "SELECT pg_stat_statements_reset()").await?;
        Some(counters(server_url, &database).await?)
    } else {
        None
    };
    let load_options = LoadOptions {
        gateway: stack.gateway_url(),
        rate: None,
        concurrency: options.compare_concurrency,
        duration: options.duration,
        warmup: options.warmup,
        users: 50,
        lookup_share: 0.0,
        progress: false,
        slow_stripe: None,
    };
    // CPU is counted from the end of the warm-up, like the checkouts it is divided by.
    let start = tokio::spawn({
        let pids = pids.clone();
        let warmup = options.warmup;
        async move {
            tokio::time::sleep(warmup).await;
            Cpu::take(&pids, postmaster, nats_pid)
        }
    });
    let report = load::run(&load_options, users).await?;
    let end = Cpu::take(&pids, postmaster, nats_pid);
    let start = start.await?;
    let checkouts = report.checkout.count.max(1) as f64;
    // Clock ticks are 1/100 s on Linux.
    let per_checkout = |ticks: u64| ticks as f64 * 10.0 / checkouts;
    let mut cpu: BTreeMap<String, f64> = end
        .services
        .iter()
        .map(|(name, after)| {
            let before = start.services.get(name).copied().unwrap_or_default();
            (
                name.clone(),
                per_checkout(after.cpu_ticks.saturating_sub(before.cpu_ticks)),
            )
        })
        .collect();
    let services_total: f64 = cpu.values().sum();
    cpu.insert("services (sum)".to_owned(), services_total);
    cpu.insert(
        "postgresql".to_owned(),
        per_checkout(end.postgres.saturating_sub(start.postgres)),
    );
    cpu.insert(
        "nats".to_owned(),
        per_checkout(end.nats.saturating_sub(start.nats)),
    );
    let rss_mib: BTreeMap<String, f64> = end
        .services
        .iter()
        .map(|(name, s)| (name.clone(), s.rss_kib as f64 / 1024.0))
        .collect();
    let database_work = match before {
        Some(before) => {
            tokio::time::sleep(Duration::from_secs(11)).await;
            let after = counters(server_url, &database).await?;
            let orders = (after.orders - before.orders).max(1) as f64;
            Some(json!({
                "orders": after.orders - before.orders,
                "statements_per_checkout": (after.statements - before.statements) as f64 / orders,
                "commits_per_checkout": (after.commits - before.commits) as f64 / orders,
                "statements_by_text": statements_by_text(server_url, &database, orders).await?,
            }))
        }
        None => None,
    };
    Ok(json!({
        "variant": variant.label,
        "baseline": variant.baseline,
        "traced": variant.traced,
        "services_on_one_core": variant.one_core,
        "report": report,
        "cpu_ms_per_checkout": cpu,
        "rss_at_load_mib": rss_mib,
        "database": database_work,
    }))
}

/// CPU ticks so far: each service, PostgreSQL, NATS.
struct Cpu {
    services: BTreeMap<String, ProcessSample>,
    postgres: u64,
    nats: u64,
}

impl Cpu {
    fn take(pids: &[(String, u32)], postmaster: u32, nats: Option<u32>) -> Self {
        Self {
            services: pids
                .iter()
                .map(|(name, pid)| (name.clone(), sample(*pid)))
                .collect(),
            postgres: process_tree_ticks(postmaster),
            nats: nats.map_or(0, |pid| cpu_ticks(Path::new(&format!("/proc/{pid}/stat")))),
        }
    }
}

/// CPU ticks of `root` and its children (PostgreSQL's backends are the postmaster's children): the live
/// ones' own, and what the ones that exited left in `root`'s `cutime` and `cstime` when it reaped them.
fn process_tree_ticks(root: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{root}/stat")).unwrap_or_default();
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    // After the command name: utime, stime, cutime, cstime are fields 12 to 15 (counting from state, 0).
    let mut total: u64 = fields.get(11..15).map_or(0, |ticks| ticks.iter().sum());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return total;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // After the `)` of the command name: state, then the parent's pid.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<u32>().ok());
        if parent == Some(root) {
            total += cpu_ticks(&PathBuf::from(format!("/proc/{pid}/stat")));
        }
    }
    total
}

/// Counters of the stack's database.
struct Counters {
    orders: i64,
    statements: i64,
    commits: i64,
}

#[derive(diesel::QueryableByName)]
struct CountersRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    statements: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    commits: i64,
}

#[derive(diesel::QueryableByName)]
struct CountRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

async fn counters(server_url: &str, database: &str) -> anyhow::Result<Counters> {
    let server_url = server_url.to_owned();
    let stack_url = crate::infra::with_database(&server_url, database);
    let database = database.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Counters> {
        use diesel::{Connection, RunQueryDsl};
        let mut server = diesel::PgConnection::establish(&server_url)?;
        let row: CountersRow = diesel::sql_query(
            "SELECT \
               (SELECT coalesce(sum(s.calls), 0)::bigint FROM pg_stat_statements s \
                  JOIN pg_database d ON d.oid = s.dbid \
                 WHERE d.datname = $1 AND upper(s.query) NOT IN ('BEGIN', 'COMMIT', 'ROLLBACK')) \
               AS statements, \
               (SELECT xact_commit FROM pg_stat_database WHERE datname = $1) AS commits",
        )
        .bind::<diesel::sql_types::Text, _>(&database)
        .get_result(&mut server)?;
        let mut stack = diesel::PgConnection::establish(&stack_url)?;
        let orders: CountRow =
            diesel::sql_query("SELECT count(*) AS n FROM transactions").get_result(&mut stack)?;
        Ok(Counters {
            orders: orders.n,
            statements: row.statements,
            commits: row.commits,
        })
    })
    .await?
}

#[derive(diesel::QueryableByName)]
struct StatementRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    query: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    calls: i64,
}

/// The statements since the counters were reset, by text, per order made: what the counts are made of.
async fn statements_by_text(
    server_url: &str,
    database: &str,
    orders: f64,
) -> anyhow::Result<serde_json::Value> {
    let server_url = server_url.to_owned();
    let database = database.to_owned();
    let rows = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<StatementRow>> {
        use diesel::{Connection, RunQueryDsl};
        let mut server = diesel::PgConnection::establish(&server_url)?;
        Ok(diesel::sql_query(
            "SELECT left(regexp_replace(s.query, '\\s+', ' ', 'g'), 120) AS query, \
                    sum(s.calls)::bigint AS calls \
               FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
              WHERE d.datname = $1 GROUP BY 1 ORDER BY 2 DESC LIMIT 20",
        )
        .bind::<diesel::sql_types::Text, _>(&database)
        .load(&mut server)?)
    })
    .await??;
    Ok(rows
        .into_iter()
        .map(|row| json!({"query": row.query, "calls_per_order": row.calls as f64 / orders}))
        .collect())
}

/// Runs one statement on `url`.
async fn sql(url: &str, statement: &'static str) -> anyhow::Result<()> {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        use diesel::{Connection, RunQueryDsl};
        let mut connection = diesel::PgConnection::establish(&url)?;
        diesel::sql_query(statement).execute(&mut connection)?;
        Ok(())
    })
    .await?
}
