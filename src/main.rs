//! `stack`: run tracehop locally, look at traces, replay the seed's stories.
//!
//! ```text
//! stack up [--no-demo]             everything, in the foreground, supervised, until Ctrl-C
//! stack status                     every process of a running `stack up`: health, pid, restarts, uptime
//! stack trace <trace-id>           a terminal waterfall from any Jaeger query API
//! stack why <trace-id>             what the trace waited on: critical path, shares, one line that blames
//! stack demo <scenario>            checkout | slow-stripe | lost-email, against a running stack
//! stack migrate                    create the database and apply migrations/ (what docker compose runs)
//! stack prepare                    make sure PostgreSQL and nats-server are available (used by ./dev test)
//! stack load                       drive a running gateway (open/closed loop, HDR percentiles)
//! stack bench                      the benchmarks of BENCHMARKS.md (prints JSON)
//! stack replay-dead-letters        publish dead-lettered notifications again
//! stack collector                  only the embedded OTLP collector + Jaeger UI
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tracehop::client::{ApiClient, unique_email};
use tracehop::collector::sampling::TailPolicy;
use tracehop::collector::{Collector, CollectorAddresses, Storage};
use tracehop::infra::{self, PrivatePostgres};
use tracehop::process::{find_executable, port_open};
use tracehop::stack::{NatsChoice, Ports, Stack, StackOptions, TraceBackend};
use tracehop::supervise::Interrupt;
use tracehop::trace_view::TraceView;

use tracehop_contracts::schema::DEFAULT_DATABASE_URL;
const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
const DEFAULT_JAEGER: &str = "http://127.0.0.1:16686";

#[derive(Parser)]
#[command(name = "stack", about = "Run tracehop and read its traces", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the whole stack in the foreground; Ctrl-C stops everything cleanly.
    Up {
        /// Do not run the demo checkout.
        #[arg(long)]
        no_demo: bool,
        /// Where logs, the NATS store, a private PostgreSQL and the mail sink live.
        #[arg(long, default_value = ".tracehop")]
        state_dir: PathBuf,
        /// The embedded collector's OTLP/gRPC port (the services' ports are their `*_PORT` variables).
        #[arg(long, default_value_t = 4317)]
        otlp_grpc_port: u16,
        #[arg(long, default_value_t = 4318)]
        otlp_http_port: u16,
        /// The Jaeger UI's port.
        #[arg(long, default_value_t = 16686)]
        ui_port: u16,
        /// Processes of each of users, billing and notifications (the gateway balances over them; replicas
        /// beyond the first listen on free ports, listed by `stack status`).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        replicas: u16,
        /// Start a private NATS cluster of this many nodes (on free ports; the stream replicated on up to
        /// 5 of them) instead of using or starting one server.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=5))]
        nats_cluster: Option<u16>,
    },
    /// Every process of a running `stack up`: state, health, pid, restarts, uptime.
    Status {
        #[arg(long, default_value = ".tracehop")]
        state_dir: PathBuf,
    },
    /// Draw a trace as a terminal waterfall.
    Trace {
        trace_id: String,
        #[arg(long, default_value = DEFAULT_JAEGER, env = "JAEGER_URL")]
        jaeger: String,
    },
    /// What a trace waited on: its critical path, each service's share, and one line that blames.
    Why {
        trace_id: String,
        #[arg(long, default_value = DEFAULT_JAEGER, env = "JAEGER_URL")]
        jaeger: String,
    },
    /// The slowest checkouts of a recent window, each with its `why` line, grouped by the hop to blame.
    Slow {
        /// How far back: `90s`, `10m`, `2h`.
        #[arg(long, default_value = "10m")]
        since: String,
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Traces read from the collector at most.
        #[arg(long, default_value_t = 2000)]
        scan: usize,
        #[arg(long, default_value = DEFAULT_JAEGER, env = "JAEGER_URL")]
        jaeger: String,
    },
    /// The failed traces of a recent window, each with what failed first, grouped by the hop to blame.
    Errors {
        #[arg(long, default_value = "10m")]
        since: String,
        #[arg(long, default_value_t = 20)]
        top: usize,
        #[arg(long, default_value_t = 2000)]
        scan: usize,
        #[arg(long, default_value = DEFAULT_JAEGER, env = "JAEGER_URL")]
        jaeger: String,
    },
    /// Everything known about one order (by order id or trace id), ending in where its e-mail is.
    Where {
        /// An order id (UUID) or a checkout's trace id (32 hex digits).
        id: String,
        #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
        database_url: String,
        #[arg(long, env = "NATS_URL", default_value = DEFAULT_NATS_URL)]
        nats_url: String,
        /// A `stack up` state folder, for its NATS operator password (when NATS_USER is not set).
        #[arg(long, default_value = ".tracehop")]
        state_dir: PathBuf,
        #[arg(long, default_value = DEFAULT_JAEGER, env = "JAEGER_URL")]
        jaeger: String,
    },
    /// Reproduce one of the seed's stories against a running stack.
    Demo {
        scenario: Scenario,
        #[arg(long, default_value = "http://127.0.0.1:3000")]
        gateway: String,
        #[arg(long, default_value = DEFAULT_JAEGER, env = "JAEGER_URL")]
        jaeger: String,
        #[arg(long, default_value = "http://127.0.0.1:12111")]
        stripe_sim: String,
        #[arg(long, default_value = "http://127.0.0.1:3003")]
        notifications: String,
    },
    /// Create the database if needed and apply the migrations.
    Migrate {
        #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
        database_url: String,
    },
    /// Make sure PostgreSQL answers (starting a private cluster if not) and nats-server is installed.
    Prepare {
        #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
        database_url: String,
        #[arg(long, default_value = ".tracehop")]
        state_dir: PathBuf,
    },
    /// Drive a running gateway with real users (open or closed loop) and report latency percentiles.
    Load {
        #[arg(long, default_value = "http://127.0.0.1:3000")]
        gateway: String,
        /// Open loop at this many requests per second (omit for a closed loop).
        #[arg(long)]
        rate: Option<f64>,
        /// Closed loop: concurrent clients. Open loop: the most requests in flight.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 30)]
        duration_s: u64,
        #[arg(long, default_value_t = 5)]
        warmup_s: u64,
        #[arg(long, default_value_t = 50)]
        users: usize,
        /// Share of order look-ups among the requests.
        #[arg(long, default_value_t = 0.2)]
        lookup_share: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Share of charges (0.0 to 1.0) that stripe-sim answers slowly during the run: the seed's slow
        /// Stripe, so the latency tail is realistic.
        #[arg(long)]
        slow_stripe_share: Option<f64>,
        /// Delay of each slowed charge, in ms (below billing's 10 s attempt timeout: slow, not failed).
        #[arg(long, default_value_t = 2000)]
        slow_stripe_ms: u64,
        #[arg(long, default_value = "http://127.0.0.1:12111")]
        stripe_sim: String,
    },
    /// Run the benchmarks of BENCHMARKS.md on fresh stacks of release binaries; prints JSON.
    Bench {
        #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
        database_url: String,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 20)]
        duration_s: u64,
        #[arg(long, default_value_t = 5)]
        warmup_s: u64,
        /// Traced/untraced pairs; the order alternates between rounds.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// The completeness run's length, at most (shortened so that every trace fits in the collector).
        #[arg(long, default_value_t = 60)]
        completeness_s: u64,
        /// The completeness run's rate (req/s) with `--only completeness`; with every part, 80% of the best
        /// traced throughput of the overhead runs.
        #[arg(long)]
        completeness_rate: Option<f64>,
        /// Open-loop rate (req/s) of the fixed-rate overhead runs.
        #[arg(long, default_value_t = 300.0)]
        fixed_rate: f64,
        #[arg(long, default_value = ".tracehop/bench")]
        state_dir: PathBuf,
        /// Run one part only: `overhead` (sections 1 and 4), `hops` (NATS hops at rest), `compare`
        /// (section 6) or `completeness` (section 2, at `--completeness-rate`).
        #[arg(long, value_enum)]
        only: Option<tracehop::bench::BenchPart>,
        /// The baseline build's binaries for section 6 (`./dev bench` builds them).
        #[arg(long)]
        baseline_bin_dir: Option<PathBuf>,
        /// Closed-loop clients of section 6's runs.
        #[arg(long, default_value_t = 32)]
        compare_concurrency: usize,
        /// `KEY=VALUE` added to the services' environment in the overhead runs (repeatable), e.g.
        /// `TRACEHOP_SPAN_SPOOL=` for the batch span processor instead of the span spool.
        #[arg(long, value_parser = parse_key_value)]
        service_env: Vec<(String, String)>,
        /// How every service of every run exports its spans to the collector: `grpc` or `http/protobuf`.
        #[arg(long, default_value = "http/protobuf", value_parser = ["grpc", "http/protobuf"])]
        otlp_protocol: String,
    },
    /// Publish dead-lettered notifications again (after fixing what made them fail).
    ReplayDeadLetters {
        #[arg(long, env = "NATS_URL", default_value = DEFAULT_NATS_URL)]
        nats_url: String,
        #[arg(long, env = "NATS_STREAM", default_value = "ORDERS")]
        stream: String,
    },
    /// Make the service-token key pair (once: existing keys are kept). Docker compose runs it into its
    /// volumes; `stack up` and the tests make their own under their state folder.
    Secrets {
        /// Where the gateway's private key goes (`service-token.key.pem`, mode 0600).
        #[arg(long, default_value = ".tracehop/secrets")]
        private_dir: PathBuf,
        /// Where the public key for users and billing goes (`service-token.pub.pem`).
        #[arg(long, default_value = ".tracehop/secrets")]
        public_dir: PathBuf,
    },
    /// Run only the embedded collector (OTLP in, Jaeger UI out).
    Collector {
        #[arg(long, default_value_t = 4317)]
        otlp_grpc_port: u16,
        #[arg(long, default_value_t = 4318)]
        otlp_http_port: u16,
        #[arg(long, default_value_t = 16686)]
        ui_port: u16,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Scenario {
    /// One ordinary checkout.
    Checkout,
    /// The first Stripe attempt hangs 11.4 s; the client times out and retries.
    SlowStripe,
    /// Every e-mail attempt fails; the notification ends up dead-lettered and `failed`.
    LostEmail,
}

/// `--since` and the counts as a window.
fn window(since: &str, top: usize, scan: usize) -> anyhow::Result<tracehop::diagnose::Window> {
    let us = tracehop::collector::search::parse_duration_us(since).ok_or_else(|| {
        anyhow::anyhow!("--since {since:?} is not a duration such as 90s, 10m or 2h")
    })?;
    Ok(tracehop::diagnose::Window {
        since: std::time::Duration::from_micros(us),
        top,
        scan,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracehop_telemetry::http::client::install_crypto_provider();
    match Cli::parse().command {
        Command::Up {
            no_demo,
            state_dir,
            otlp_grpc_port,
            otlp_http_port,
            ui_port,
            replicas,
            nats_cluster,
        } => {
            let ports = Ports::from_env(otlp_grpc_port, otlp_http_port, ui_port)?;
            let scale = Scale {
                replicas: usize::from(replicas),
                nats_cluster: nats_cluster.map(usize::from),
            };
            up(no_demo, state_dir, ports, scale).await
        }
        Command::Status { state_dir } => tracehop::supervise::print_status(&state_dir).await,
        Command::Trace { trace_id, jaeger } => {
            let trace = TraceView::fetch_joined(&jaeger, &trace_id).await?;
            print!("{}", trace.waterfall(color()));
            Ok(())
        }
        Command::Why { trace_id, jaeger } => {
            let trace = TraceView::fetch_joined(&jaeger, &trace_id).await?;
            print!("{}", tracehop::why::Why::of(&trace).report());
            Ok(())
        }
        Command::Slow {
            since,
            top,
            scan,
            jaeger,
        } => {
            let window = window(&since, top, scan)?;
            print!(
                "{}",
                tracehop::diagnose::slow(&jaeger, &window).await?.render()
            );
            Ok(())
        }
        Command::Errors {
            since,
            top,
            scan,
            jaeger,
        } => {
            let window = window(&since, top, scan)?;
            print!(
                "{}",
                tracehop::diagnose::errors(&jaeger, &window).await?.render()
            );
            Ok(())
        }
        Command::Where {
            id,
            database_url,
            nats_url,
            state_dir,
            jaeger,
        } => {
            let subject = tracehop::whereabouts::Subject::parse(&id)?;
            // As the operator: NATS_USER / NATS_PASSWORD, else the `stack up` state folder's.
            let credentials =
                tracehop_telemetry::messaging::NatsCredentials::from_env().or_else(|| {
                    let file = state_dir
                        .join("secrets")
                        .join(tracehop::secrets::NatsUsers::FILE);
                    let text = std::fs::read_to_string(file).ok()?;
                    serde_json::from_str::<tracehop::secrets::NatsUsers>(&text)
                        .ok()?
                        .credentials("operator")
                });
            let nats = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                tracehop_telemetry::messaging::connect(
                    &nats_url,
                    "stack-where",
                    credentials.as_ref(),
                ),
            )
            .await
            .ok()
            .and_then(Result::ok);
            let sources =
                tracehop::whereabouts::Sources::new(&database_url, nats, Some(jaeger.as_str()));
            let found = tracehop::whereabouts::locate(&sources, &subject).await;
            print!("{}", found.render());
            Ok(())
        }
        Command::Demo {
            scenario,
            gateway,
            jaeger,
            stripe_sim,
            notifications,
        } => demo(scenario, &gateway, &jaeger, &stripe_sim, &notifications).await,
        Command::Secrets {
            private_dir,
            public_dir,
        } => {
            let keys = tracehop::secrets::ServiceKeys::ensure(&private_dir, &public_dir)?;
            println!(
                "service-token keys: {} (private), {} (public)",
                keys.private_key_file.display(),
                keys.public_key_file.display()
            );
            Ok(())
        }
        Command::Migrate { database_url } => {
            let name = tracehop_telemetry::db::database_name(&database_url);
            infra::create_database(&database_url, &name).await?;
            let applied = infra::migrate(&database_url).await?;
            println!("database {name}: {} migration(s) applied", applied.len());
            Ok(())
        }
        Command::Prepare {
            database_url,
            state_dir,
        } => prepare(&database_url, &state_dir).await,
        Command::Load {
            gateway,
            rate,
            concurrency,
            duration_s,
            warmup_s,
            users,
            lookup_share,
            json,
            slow_stripe_share,
            slow_stripe_ms,
            stripe_sim,
        } => {
            let options = tracehop::load::LoadOptions {
                gateway: gateway.clone(),
                rate,
                concurrency,
                duration: Duration::from_secs(duration_s),
                warmup: Duration::from_secs(warmup_s),
                users,
                lookup_share,
                progress: true,
                slow_stripe: slow_stripe_share.map(|share| tracehop::load::SlowStripe {
                    stripe_sim: stripe_sim.clone(),
                    share,
                    delay_ms: slow_stripe_ms,
                }),
            };
            say(&format!("signing up {users} users"));
            let pool = tracehop::load::user_pool(&gateway, users).await?;
            let report = tracehop::load::run(&options, pool).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        Command::Bench {
            database_url,
            concurrency,
            duration_s,
            warmup_s,
            rounds,
            completeness_s,
            completeness_rate,
            fixed_rate,
            state_dir,
            only,
            baseline_bin_dir,
            compare_concurrency,
            service_env,
            otlp_protocol,
        } => {
            std::fs::create_dir_all(&state_dir)?;
            let results = tracehop::bench::run(tracehop::bench::BenchOptions {
                database_server_url: database_url,
                state_dir: std::fs::canonicalize(&state_dir)?,
                concurrency,
                duration: Duration::from_secs(duration_s),
                warmup: Duration::from_secs(warmup_s),
                rounds,
                completeness_duration: Duration::from_secs(completeness_s),
                completeness_rate,
                fixed_rate,
                only,
                baseline_bin_dir: baseline_bin_dir.map(std::fs::canonicalize).transpose()?,
                compare_concurrency,
                service_env,
                otlp_protocol,
            })
            .await?;
            println!("{}", serde_json::to_string_pretty(&results)?);
            Ok(())
        }
        Command::ReplayDeadLetters { nats_url, stream } => {
            // The replay's PRODUCER spans go to the collector (OTEL_EXPORTER_OTLP_ENDPOINT, the embedded one
            // by default) like any service's.
            let telemetry = tracehop_telemetry::init("stack")?;
            // As the operator: NATS_USER / NATS_PASSWORD (a `stack up` NATS: `operator` in
            // .tracehop/secrets/nats-users.json).
            let credentials = tracehop_telemetry::messaging::NatsCredentials::from_env();
            let client =
                tracehop_telemetry::messaging::connect(&nats_url, "stack", credentials.as_ref())
                    .await?;
            let report = tracehop::dead_letters::replay(client, &stream).await;
            telemetry.shutdown().await;
            let report = report?;
            println!(
                "replayed {} dead letter(s); left {} malformed one(s) alone",
                report.replayed, report.skipped
            );
            Ok(())
        }
        Command::Collector {
            otlp_grpc_port,
            otlp_http_port,
            ui_port,
        } => {
            let any = |port| std::net::SocketAddr::from(([0, 0, 0, 0], port));
            let collector = Collector::start(
                CollectorAddresses {
                    otlp_grpc: any(otlp_grpc_port),
                    otlp_http: any(otlp_http_port),
                    ui: any(ui_port),
                },
                Storage::Keep(TailPolicy::from_lookup(|name| std::env::var(name).ok())?),
            )
            .await?;
            println!(
                "collector: OTLP gRPC {}, OTLP HTTP {}, Jaeger UI http://localhost:{}",
                collector.addresses.otlp_grpc, collector.addresses.otlp_http, ui_port
            );
            shutdown_signal().await;
            Ok(())
        }
    }
}

fn color() -> bool {
    std::env::var_os("NO_COLOR").is_none() && std::io::IsTerminal::is_terminal(&std::io::stdout())
}

fn say(what: &str) {
    if color() {
        println!("\x1b[1;34m==>\x1b[0m {what}");
    } else {
        println!("==> {what}");
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// PostgreSQL at `database_url`, or a private cluster under `state_dir` on the same port.
async fn ensure_postgres(
    database_url: &str,
    state_dir: &std::path::Path,
) -> anyhow::Result<Option<PrivatePostgres>> {
    if infra::postgres_reachable(database_url).await {
        say(&format!("PostgreSQL: using {}", redact(database_url)));
        return Ok(None);
    }
    let (host, port) = infra::host_port(database_url, 5432);
    anyhow::ensure!(
        host == "127.0.0.1" || host == "localhost",
        "PostgreSQL at {} does not answer, and a private cluster can only be started on this machine",
        redact(database_url)
    );
    anyhow::ensure!(
        !port_open("127.0.0.1", port),
        "port {port} is in use but does not answer as PostgreSQL for {}: set DATABASE_URL to a reachable server",
        redact(database_url)
    );
    say(&format!(
        "PostgreSQL: none at {}; starting a private cluster in {}",
        redact(database_url),
        state_dir.join("postgres").display()
    ));
    let cluster = PrivatePostgres::start(
        &std::fs::canonicalize(state_dir)?.join("postgres"),
        port,
        &std::fs::canonicalize(state_dir)?.join("logs/postgres.log"),
    )?;
    Ok(Some(cluster))
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if url[scheme + 3..at].contains(':') => {
            let user_end = url[scheme + 3..at]
                .find(':')
                .map(|i| scheme + 3 + i)
                .unwrap_or(at);
            format!("{}:***{}", &url[..user_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}

async fn prepare(database_url: &str, state_dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(state_dir.join("logs"))?;
    anyhow::ensure!(
        find_executable("nats-server").is_some(),
        "nats-server is not installed (Debian: apt-get install nats-server)"
    );
    if let Some(cluster) = ensure_postgres(database_url, state_dir).await? {
        // Leave it running for the test run that follows; `./dev test` and later runs reuse it.
        cluster.detach();
    }
    say("ready: PostgreSQL answers and nats-server is installed");
    Ok(())
}

/// How many of each: service replicas and NATS nodes.
struct Scale {
    replicas: usize,
    nats_cluster: Option<usize>,
}

async fn up(no_demo: bool, state_dir: PathBuf, ports: Ports, scale: Scale) -> anyhow::Result<()> {
    // Listening from the first moment: a Ctrl-C or SIGTERM during any phase stops what was started so far.
    let interrupt = Interrupt::install()?;
    std::fs::create_dir_all(state_dir.join("logs"))?;
    let state_dir = std::fs::canonicalize(&state_dir)?;

    let external_otlp = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|v| !v.is_empty());
    let trace_backend = match external_otlp {
        Some(endpoint) => {
            say(&format!(
                "traces: exporting to {endpoint} (OTEL_EXPORTER_OTLP_ENDPOINT)"
            ));
            TraceBackend::External {
                otlp_endpoint: endpoint,
                jaeger_url: std::env::var("JAEGER_URL").ok(),
            }
        }
        None => TraceBackend::Embedded,
    };
    let mut needed = vec![
        (ports.gateway, "gateway"),
        (ports.users, "users"),
        (ports.billing, "billing"),
        (ports.notifications, "notifications"),
        (ports.stripe_sim, "stripe-sim"),
    ];
    if matches!(trace_backend, TraceBackend::Embedded) {
        needed.extend([
            (ports.otlp_grpc, "OTLP gRPC"),
            (ports.otlp_http, "OTLP HTTP"),
            (ports.jaeger_ui, "Jaeger UI"),
        ]);
    }
    let busy: Vec<String> = needed
        .iter()
        .filter(|(port, _)| port_open("127.0.0.1", *port))
        .map(|(port, what)| format!("{port} ({what})"))
        .collect();
    anyhow::ensure!(
        busy.is_empty(),
        "port(s) already in use: {}.\nStop whatever listens there (`ss -ltnp` shows it; an earlier `./dev up` \
         still running?) and try again. Nothing was started.",
        busy.join(", ")
    );

    let nats_url = std::env::var("NATS_URL").unwrap_or_else(|_| DEFAULT_NATS_URL.to_owned());
    let (nats_host, nats_port) = infra::host_port(&nats_url, 4222);
    let nats = if let Some(nodes) = scale.nats_cluster {
        let mut ports = Vec::new();
        for _ in 0..nodes {
            ports.push(tracehop::process::free_port()?);
        }
        say(&format!(
            "NATS: starting a cluster of {nodes} nats-server nodes on ports {ports:?}, stores in {}/nats-*",
            state_dir.display()
        ));
        NatsChoice::Cluster { ports }
    } else if port_open(&nats_host, nats_port) {
        say(&format!("NATS: using {nats_url}"));
        NatsChoice::Existing(nats_url)
    } else {
        say(&format!(
            "NATS: none at {nats_url}; starting nats-server -js with its store in {}",
            state_dir.join("nats").display()
        ));
        NatsChoice::Private { port: nats_port }
    };

    let database_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
    let postgres = interrupt
        .run(
            "starting PostgreSQL",
            ensure_postgres(&database_url, &state_dir),
        )
        .await?;

    say("starting collector, stripe-sim, users, billing, notifications, gateway");
    let started = Stack::start(StackOptions {
        state_dir: state_dir.clone(),
        ports,
        nats,
        database_server_url: database_url.clone(),
        database_name: tracehop_telemetry::db::database_name(&database_url),
        trace_backend,
        otlp_protocol: std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL")
            .unwrap_or_else(|_| "http/protobuf".to_owned()),
        extra_env: Vec::new(),
        replicas: scale.replicas,
        bin_dir: None,
        cpus: None,
    });
    let mut stack = interrupt
        .run("starting the stack", started)
        .await
        .context("the stack did not start (everything started so far has been stopped)")?;

    println!();
    println!(
        "  gateway                http://localhost:{}",
        ports.gateway
    );
    println!("  users                  http://localhost:{}", ports.users);
    println!(
        "  billing                http://localhost:{}",
        ports.billing
    );
    println!(
        "  notifications          http://localhost:{}",
        ports.notifications
    );
    println!(
        "  stripe-sim             http://localhost:{}",
        ports.stripe_sim
    );
    if let Some(jaeger) = &stack.jaeger_url {
        println!(
            "  Jaeger UI              {}",
            jaeger.replace("127.0.0.1", "localhost")
        );
    }
    println!(
        "  logs                   {}",
        state_dir.join("logs").display()
    );
    println!("  sent e-mail            {}", stack.mail_sink.display());
    println!();

    if !no_demo {
        let demo = async {
            demo_checkout(&stack.gateway_url(), stack.jaeger_url.as_deref()).await?;
            Ok(())
        };
        if let Err(error) = interrupt.run("running the demo checkout", demo).await {
            eprintln!("demo checkout: {error:#}");
        }
    }
    let status = tracehop::supervise::status_path(&state_dir);
    if !interrupt.heard() {
        say("running; press Ctrl-C to stop (`stack status` from another terminal)");
        tracehop::supervise::supervise(&mut stack, &interrupt, &status).await;
    }
    say("stopping services (they flush their spans), NATS and the collector");
    drop(stack);
    drop(postgres);
    let _ = std::fs::remove_file(&status);
    say("stopped");
    Ok(())
}

async fn demo_checkout(gateway: &str, jaeger: Option<&str>) -> anyhow::Result<String> {
    let mut customer = ApiClient::new(gateway);
    customer
        .signup_and_login(&unique_email("dani"), "correct horse battery")
        .await?;
    let checkout = customer.checkout("49.99", "usd", None).await?;
    say(&format!(
        "POST /checkout -> {} {}",
        checkout.status, checkout.body
    ));
    let trace_id = checkout.body["traceId"]
        .as_str()
        .map(str::to_owned)
        .or(checkout.trace_id)
        .ok_or_else(|| anyhow::anyhow!("no trace id in the answer"))?;
    show_trace(&trace_id, jaeger, |trace| {
        trace
            .spans
            .iter()
            .any(|s| s.name == "notification.send_confirmation")
    })
    .await;
    Ok(trace_id)
}

async fn show_trace(trace_id: &str, jaeger: Option<&str>, ready: impl Fn(&TraceView) -> bool) {
    println!("trace id: {trace_id}");
    let Some(jaeger) = jaeger else {
        return;
    };
    println!(
        "Jaeger UI: {}/trace/{trace_id}",
        jaeger.replace("127.0.0.1", "localhost")
    );
    match TraceView::wait_for(jaeger, trace_id, Duration::from_secs(30), ready).await {
        Ok(trace) => {
            // A moment more for the last batch (the notifier's final statements).
            tokio::time::sleep(Duration::from_millis(800)).await;
            let trace = TraceView::fetch(jaeger, trace_id).await.unwrap_or(trace);
            print!("{}", trace.waterfall(color()));
        }
        Err(error) => eprintln!("could not fetch the trace: {error:#}"),
    }
}

async fn demo(
    scenario: Scenario,
    gateway: &str,
    jaeger: &str,
    stripe_sim: &str,
    notifications: &str,
) -> anyhow::Result<()> {
    let http = tracehop_telemetry::http::client::plain_client_builder().build()?;
    match scenario {
        Scenario::Checkout => {
            demo_checkout(gateway, Some(jaeger)).await?;
        }
        Scenario::SlowStripe => {
            say(
                "stripe-sim: the next charge request hangs for 11.4 s (billing gives each attempt 10 s)",
            );
            http.post(format!("{stripe_sim}/_admin/faults"))
                .json(&serde_json::json!({"hangNext": 1, "hangMs": 11_400}))
                .send()
                .await?
                .error_for_status()?;
            let started = std::time::Instant::now();
            let trace_id = demo_checkout(gateway, Some(jaeger)).await?;
            say(&format!(
                "checkout took {:.1} s; trace {trace_id}: one slow attempt (timeout) and one quick retry under stripe.create_charge",
                started.elapsed().as_secs_f64()
            ));
        }
        Scenario::LostEmail => {
            say("notifications: every e-mail attempt fails for a while");
            http.post(format!("{notifications}/_admin/faults"))
                .json(&serde_json::json!({"failNext": 1000}))
                .send()
                .await?
                .error_for_status()?;
            let mut customer = ApiClient::new(gateway);
            customer
                .signup_and_login(&unique_email("dani"), "correct horse battery")
                .await?;
            let checkout = customer.checkout("19.99", "usd", None).await?;
            say(&format!(
                "POST /checkout -> {} {}",
                checkout.status, checkout.body
            ));
            let order_id = checkout.body["orderId"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let trace_id = checkout.body["traceId"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            say("waiting for the redeliveries to run out (about 20 s with the default back-off)");
            let deadline = std::time::Instant::now() + Duration::from_secs(90);
            loop {
                let order = customer.order(&order_id).await?;
                if order.body["notification"] == "failed" || std::time::Instant::now() > deadline {
                    say(&format!(
                        "GET /orders/{order_id} -> notification {}",
                        order.body["notification"]
                    ));
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            http.post(format!("{notifications}/_admin/faults"))
                .json(&serde_json::json!({"failNext": 0}))
                .send()
                .await?;
            show_trace(&trace_id, Some(jaeger), |trace| {
                trace
                    .spans
                    .iter()
                    .any(|s| s.name == "publish order.completed.dead")
            })
            .await;
        }
    }
    Ok(())
}

/// `KEY=VALUE` (the value may be empty).
fn parse_key_value(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("{text:?}: an empty name"));
    }
    Ok((key.to_owned(), value.to_owned()))
}
