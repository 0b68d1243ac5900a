//! The whole stack, started in dependency order and stopped in reverse.
//!
//! trace backend -> NATS -> PostgreSQL (created, migrated) -> stripe-sim -> users -> billing ->
//! notifications -> gateway, each service awaited on `/healthz`. Stopping goes the other way and ends with
//! the collector, so the services' last spans (flushed on SIGTERM) still arrive.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::collector::sampling::TailPolicy;
use crate::collector::{Collector, CollectorAddresses, Storage};
use crate::infra::{self, PrivateNats};
use crate::process::{ChildProcess, wait_healthy, workspace_binary};
use crate::secrets::{NatsUsers, ServiceKeys};
use tracehop_telemetry::messaging::{self, NatsCredentials};

/// The services' binaries, in start order.
pub const SERVICES: [&str; 5] = ["stripe-sim", "users", "billing", "notifications", "gateway"];

/// The services that run as several processes with `--replicas N` (the gateway balances over them). The
/// gateway itself scales behind any load balancer, and stripe-sim stands in for one third party.
pub const REPLICATED: [&str; 3] = ["users", "billing", "notifications"];

/// The service an instance belongs to: `billing-2` is a replica of `billing`.
pub fn service_of(instance: &str) -> &str {
    match instance.rsplit_once('-') {
        Some((service, number))
            if REPLICATED.contains(&service)
                && !number.is_empty()
                && number.chars().all(|c| c.is_ascii_digit()) =>
        {
            service
        }
        _ => instance,
    }
}

/// Ports of everything the stack listens on.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub gateway: u16,
    pub users: u16,
    pub billing: u16,
    pub notifications: u16,
    pub stripe_sim: u16,
    pub otlp_grpc: u16,
    pub otlp_http: u16,
    pub jaeger_ui: u16,
}

impl Ports {
    /// The documented defaults (README, docker-compose.yml).
    pub const DEFAULT: Ports = Ports {
        gateway: 3000,
        users: 3001,
        billing: 3002,
        notifications: 3003,
        stripe_sim: 12111,
        otlp_grpc: 4317,
        otlp_http: 4318,
        jaeger_ui: 16686,
    };

    /// The defaults, or the services' own `*_PORT` variables where set (the collector's from the
    /// arguments given).
    pub fn from_env(otlp_grpc: u16, otlp_http: u16, jaeger_ui: u16) -> anyhow::Result<Ports> {
        let port = |name: &str, default: u16| -> anyhow::Result<u16> {
            match std::env::var(name) {
                Ok(value) if !value.trim().is_empty() => value
                    .trim()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{name} is not a port: {value:?}")),
                _ => Ok(default),
            }
        };
        let defaults = Self::DEFAULT;
        Ok(Ports {
            gateway: port("GATEWAY_PORT", defaults.gateway)?,
            users: port("USERS_PORT", defaults.users)?,
            billing: port("BILLING_PORT", defaults.billing)?,
            notifications: port("NOTIFICATIONS_PORT", defaults.notifications)?,
            stripe_sim: port("STRIPE_SIM_PORT", defaults.stripe_sim)?,
            otlp_grpc,
            otlp_http,
            jaeger_ui,
        })
    }

    /// Free ports for a test stack.
    pub fn free() -> anyhow::Result<Ports> {
        use crate::process::free_port;
        Ok(Ports {
            gateway: free_port()?,
            users: free_port()?,
            billing: free_port()?,
            notifications: free_port()?,
            stripe_sim: free_port()?,
            otlp_grpc: 0,
            otlp_http: 0,
            jaeger_ui: 0,
        })
    }
}

/// Which NATS to use.
#[derive(Debug, Clone)]
pub enum NatsChoice {
    /// Reuse a running server.
    Existing(String),
    /// Start `nats-server -js` on this port, store under the state folder.
    Private { port: u16 },
    /// Start a cluster of `nats-server -js` nodes on these client ports (routes on free ports), the
    /// stream replicated on every node (`NATS_STREAM_REPLICAS`), services given every seed.
    Cluster { ports: Vec<u16> },
}

/// Where spans go.
#[derive(Debug, Clone)]
pub enum TraceBackend {
    /// The in-process collector (Jaeger UI on `Ports::jaeger_ui`).
    Embedded,
    /// The in-process collector receiving and counting spans without storing them (benchmarks).
    Counting,
    /// Someone else's: an OTLP endpoint, and the Jaeger query URL if there is one.
    External {
        otlp_endpoint: String,
        jaeger_url: Option<String>,
    },
}

/// How to start a stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Logs, NATS store, mail sink folder.
    pub state_dir: PathBuf,
    pub ports: Ports,
    pub nats: NatsChoice,
    /// A reachable PostgreSQL server (any database name; it is replaced by `database_name`).
    pub database_server_url: String,
    pub database_name: String,
    pub trace_backend: TraceBackend,
    /// `grpc` or `http/protobuf`.
    pub otlp_protocol: String,
    /// Extra environment for every service (applied last, so it wins).
    pub extra_env: Vec<(String, String)>,
    /// Processes of each of [`REPLICATED`] (1: one each). Replica `k` of `billing` is the instance
    /// `billing-k` on a free port; the first keeps the service's own name and port.
    pub replicas: usize,
    /// Where the services' binaries are (`None`: this build's, [`crate::process::bin_dir`]). The
    /// benchmark runs a baseline build this way.
    pub bin_dir: Option<PathBuf>,
    /// Run the services on these CPUs only (`taskset -c <list>`, from their start, so that they size
    /// their thread pools for them); `None`: wherever the system puts them.
    pub cpus: Option<String>,
}

/// A running stack; everything stops when it is dropped.
pub struct Stack {
    pub options: StackOptions,
    pub database_url: String,
    pub nats_url: String,
    pub jaeger_url: Option<String>,
    pub otlp_endpoint: String,
    pub mail_sink: PathBuf,
    /// The service-token key pair (`<state>/secrets`).
    pub keys: ServiceKeys,
    /// The NATS users of a private NATS (`None` for an existing server: its credentials are the operator's).
    pub nats_users: Option<NatsUsers>,
    /// The ports of the replicas beyond the first (`billing-2`, ...).
    replica_ports: std::collections::BTreeMap<String, u16>,
    // Field order is drop order: services first, then NATS, then the collector.
    services: Vec<ChildProcess>,
    pub nats: Option<PrivateNats>,
    /// The other nodes of a private cluster ([`NatsChoice::Cluster`]), in node order after `nats`.
    pub nats_peers: Vec<PrivateNats>,
    pub collector: Option<Collector>,
}

impl Stack {
    /// Starts everything, or stops whatever was started and reports what failed.
    pub async fn start(options: StackOptions) -> anyhow::Result<Self> {
        std::fs::create_dir_all(options.state_dir.join("logs"))?;
        let (collector, otlp_endpoint, jaeger_url) = match &options.trace_backend {
            TraceBackend::Embedded | TraceBackend::Counting => {
                let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
                let storage = match options.trace_backend {
                    // COLLECTOR_TAIL_* from the stack's variables, else from this process's environment.
                    TraceBackend::Embedded => Storage::Keep(TailPolicy::from_lookup(|name| {
                        options
                            .extra_env
                            .iter()
                            .rev()
                            .find(|(key, _)| key == name)
                            .map(|(_, value)| value.clone())
                            .or_else(|| std::env::var(name).ok())
                    })?),
                    _ => Storage::Count,
                };
                let collector = Collector::start(
                    CollectorAddresses {
                        otlp_grpc: local(options.ports.otlp_grpc),
                        otlp_http: local(options.ports.otlp_http),
                        ui: local(options.ports.jaeger_ui),
                    },
                    storage,
                )
                .await?;
                let endpoint = if options.otlp_protocol == "http/protobuf" {
                    format!("http://{}", collector.addresses.otlp_http)
                } else {
                    format!("http://{}", collector.addresses.otlp_grpc)
                };
                let ui = collector.ui_url();
                (Some(collector), endpoint, Some(ui))
            }
            TraceBackend::External {
                otlp_endpoint,
                jaeger_url,
            } => (None, otlp_endpoint.clone(), jaeger_url.clone()),
        };

        let secrets = options.state_dir.join("secrets");
        let mut nats_peers = Vec::new();
        let (nats, nats_url, nats_users) = match &options.nats {
            NatsChoice::Existing(url) => (None, url.clone(), None),
            NatsChoice::Cluster { ports } => {
                let users = NatsUsers::ensure(&secrets)?;
                let mut route_ports = Vec::new();
                for _ in ports {
                    route_ports.push(crate::process::free_port()?);
                }
                let mut nodes = Vec::new();
                for node in 0..ports.len() {
                    nodes.push(
                        PrivateNats::start_cluster_node(
                            node,
                            ports,
                            &route_ports,
                            &options.state_dir.join(format!("nats-{}", node + 1)),
                            &options
                                .state_dir
                                .join(format!("logs/nats-server-{}.log", node + 1)),
                            &users,
                            tracehop_contracts::events::ORDERS_STREAM,
                        )
                        .await?,
                    );
                }
                let url = nodes
                    .iter()
                    .map(|node| node.url.clone())
                    .collect::<Vec<_>>()
                    .join(",");
                let operator = users.credentials("operator");
                infra::wait_for_jetstream(&url, operator.as_ref()).await?;
                let first = (!nodes.is_empty()).then(|| nodes.remove(0));
                nats_peers = nodes;
                (first, url, Some(users))
            }
            NatsChoice::Private { port } => {
                let users = NatsUsers::ensure(&secrets)?;
                let nats = PrivateNats::start_with_users(
                    *port,
                    &options.state_dir.join("nats"),
                    &options.state_dir.join("logs/nats-server.log"),
                    &users,
                    tracehop_contracts::events::ORDERS_STREAM,
                )
                .await?;
                let url = nats.url.clone();
                (Some(nats), url, Some(users))
            }
        };

        infra::create_database(&options.database_server_url, &options.database_name).await?;
        let database_url =
            infra::with_database(&options.database_server_url, &options.database_name);
        infra::migrate(&database_url).await?;

        let mail_sink = options.state_dir.join("mail");
        let keys = ServiceKeys::ensure(&secrets, &secrets)?;
        let mut replica_ports = std::collections::BTreeMap::new();
        for service in REPLICATED {
            for k in 2..=options.replicas {
                replica_ports.insert(format!("{service}-{k}"), crate::process::free_port()?);
            }
        }
        let mut stack = Self {
            replica_ports,
            options,
            database_url,
            nats_url,
            jaeger_url,
            otlp_endpoint,
            mail_sink,
            keys,
            nats_users,
            services: Vec::new(),
            nats,
            nats_peers,
            collector,
        };
        for instance in stack.instances() {
            stack.start_service(&instance).await?;
        }
        Ok(stack)
    }

    /// Every process of the stack, in start order: each service, and its replicas after it.
    pub fn instances(&self) -> Vec<String> {
        let mut instances = Vec::new();
        for service in SERVICES {
            instances.push(service.to_owned());
            if REPLICATED.contains(&service) {
                for k in 2..=self.options.replicas {
                    instances.push(format!("{service}-{k}"));
                }
            }
        }
        instances
    }

    /// The port an instance listens on.
    pub fn instance_port(&self, instance: &str) -> u16 {
        if let Some(port) = self.replica_ports.get(instance) {
            return *port;
        }
        let ports = self.options.ports;
        match instance {
            "stripe-sim" => ports.stripe_sim,
            "users" => ports.users,
            "billing" => ports.billing,
            "notifications" => ports.notifications,
            _ => ports.gateway,
        }
    }

    /// The base URLs of every instance of `service`, comma-separated (what the gateway balances over).
    fn urls_of(&self, service: &str) -> String {
        self.instances()
            .iter()
            .filter(|instance| service_of(instance) == service)
            .map(|instance| format!("http://127.0.0.1:{}", self.instance_port(instance)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The environment of one instance (`billing`, or a replica such as `billing-2`).
    pub fn service_env(&self, instance: &str) -> Vec<(String, String)> {
        let name = service_of(instance);
        let ports = self.options.ports;
        let mut env: Vec<(String, String)> = vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                self.otlp_endpoint.clone(),
            ),
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL".into(),
                self.options.otlp_protocol.clone(),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "500".into()),
            // Sized so that nothing is dropped at full load on the benchmark machine (BENCHMARKS.md).
            ("OTEL_BSP_MAX_QUEUE_SIZE".into(), "32768".into()),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE".into(), "2048".into()),
            // One spool directory for every process of the stack: a killed process's spans are exported by
            // a sibling (README, "Spans that survive a kill").
            (
                "TRACEHOP_SPAN_SPOOL".into(),
                self.options.state_dir.join("spool").display().to_string(),
            ),
            // Each service as its own role, with rights on its own tables only.
            (
                "DATABASE_URL".into(),
                match infra::service_role(name) {
                    Some(role) => infra::with_role(&self.database_url, role),
                    None => self.database_url.clone(),
                },
            ),
            ("NATS_URL".into(), self.nats_url.clone()),
            (
                "NATS_STREAM_REPLICAS".into(),
                match &self.options.nats {
                    NatsChoice::Cluster { ports } => ports.len().min(5).to_string(),
                    _ => "1".into(),
                },
            ),
            ("GATEWAY_PORT".into(), ports.gateway.to_string()),
            ("USERS_PORT".into(), ports.users.to_string()),
            ("BILLING_PORT".into(), ports.billing.to_string()),
            ("NOTIFICATIONS_PORT".into(), ports.notifications.to_string()),
            ("STRIPE_SIM_PORT".into(), ports.stripe_sim.to_string()),
            ("USERS_URL".into(), self.urls_of("users")),
            ("BILLING_URL".into(), self.urls_of("billing")),
            ("NOTIFICATIONS_URL".into(), self.urls_of("notifications")),
            (
                "STRIPE_API_BASE".into(),
                format!("http://127.0.0.1:{}", ports.stripe_sim),
            ),
            ("STRIPE_SECRET_KEY".into(), "sk_test_tracehop".into()),
            ("MAIL_SINK".into(), self.mail_sink.display().to_string()),
        ];
        // Only the gateway signs service tokens; users, billing and notifications check them.
        match name {
            "gateway" => env.push((
                "SERVICE_TOKEN_SIGNING_KEY_FILE".into(),
                self.keys.private_key_file.display().to_string(),
            )),
            "users" | "billing" | "notifications" => env.push((
                "SERVICE_TOKEN_PUBLIC_KEY_FILE".into(),
                self.keys.public_key_file.display().to_string(),
            )),
            _ => {}
        }
        // Each NATS client as its own user, with only its own subjects.
        if let Some(credentials) = self
            .nats_users
            .as_ref()
            .and_then(|users| users.credentials(name))
        {
            env.push(("NATS_USER".into(), credentials.user));
            env.push(("NATS_PASSWORD".into(), credentials.password));
        }
        env.retain(|(key, _)| !(name == "stripe-sim" && key.starts_with("OTEL_")));
        // A replica listens on its own port (set after the service's, so it wins).
        if instance != name {
            let variable = format!("{}_PORT", name.to_ascii_uppercase().replace('-', "_"));
            env.push((variable, self.instance_port(instance).to_string()));
        }
        env.extend(self.options.extra_env.iter().cloned());
        env
    }

    /// The `/healthz` URL of an instance.
    pub fn health_url(&self, instance: &str) -> String {
        format!("http://127.0.0.1:{}/healthz", self.instance_port(instance))
    }

    /// Starts (or starts again) one instance and waits for its `/healthz`.
    pub async fn start_service(&mut self, name: &str) -> anyhow::Result<()> {
        let program = match &self.options.bin_dir {
            Some(dir) => dir.join(service_of(name)),
            None => workspace_binary(service_of(name))?,
        };
        let mut command = match &self.options.cpus {
            // taskset execs the service: same process, so the pid is the service's.
            Some(cpus) => {
                let mut command = Command::new("taskset");
                command.args(["-c", cpus.as_str()]).arg(program);
                command
            }
            None => Command::new(program),
        };
        command.envs(self.service_env(name));
        let log_path = self
            .options
            .state_dir
            .join("logs")
            .join(format!("{name}.log"));
        let mut process = ChildProcess::spawn(name, command, &log_path)?;
        wait_healthy(
            &self.health_url(name),
            Duration::from_secs(30),
            Some(&mut process),
        )
        .await?;
        self.services.retain(|existing| existing.name != name);
        self.services.push(process);
        Ok(())
    }

    /// The process of a service (fault tests kill and restart them).
    pub fn service(&mut self, name: &str) -> Option<&mut ChildProcess> {
        self.services
            .iter_mut()
            .find(|process| process.name == name)
    }

    /// Every node of a private NATS (one, or a cluster's), in node order.
    pub fn nats_nodes(&mut self) -> Vec<&mut PrivateNats> {
        self.nats
            .iter_mut()
            .chain(self.nats_peers.iter_mut())
            .collect()
    }

    /// The operator's NATS credentials (`None` against an existing server).
    pub fn nats_operator(&self) -> Option<NatsCredentials> {
        self.nats_users
            .as_ref()
            .and_then(|users| users.credentials("operator"))
    }

    /// A NATS client as the operator (tests, replays, inspection).
    pub async fn nats_client(&self) -> anyhow::Result<async_nats::Client> {
        Ok(messaging::connect(&self.nats_url, "stack", self.nats_operator().as_ref()).await?)
    }

    pub fn gateway_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.options.ports.gateway)
    }

    pub fn stripe_sim_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.options.ports.stripe_sim)
    }

    pub fn notifications_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.options.ports.notifications)
    }

    /// Stops the services (reverse order, SIGTERM so they flush), then NATS, then the collector.
    pub fn stop(&mut self) {
        while let Some(mut process) = self.services.pop() {
            process.stop(Duration::from_secs(15));
        }
        for peer in &mut self.nats_peers {
            peer.stop();
        }
        self.nats_peers.clear();
        if let Some(nats) = &mut self.nats {
            nats.stop();
        }
        self.nats = None;
        self.collector = None;
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}
