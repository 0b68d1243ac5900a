//! No Docker engine runs where the tests run, so docker-compose.yml is checked against the code instead:
//! every service, port, variable and dependency the code expects is there, and nothing it names is unknown.
//! The OpenTelemetry Collector's and Prometheus's configurations (deploy/) are checked the same way: every
//! pipeline complete, span metrics counted before tail sampling, the embedded collector's names, buckets
//! and sampling settings, and Prometheus scraping what the collector serves.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::deployment::{LIBRARY_VARIABLES, reads_variable, source_text};
use serde_yaml::Value;
use tracehop::collector::metrics::BUCKETS_MS;
use tracehop::collector::sampling::TailPolicy;
use tracehop::stack::{Ports, SERVICES};

fn compose() -> Value {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docker-compose.yml"))
            .expect("docker-compose.yml");
    let mut value: Value = serde_yaml::from_str(&text).expect("valid YAML");
    value.apply_merge().expect("merge keys");
    // Merge keys nested one level down (environment: <<: *otel).
    if let Some(services) = value.get_mut("services").and_then(Value::as_mapping_mut) {
        for (_, service) in services.iter_mut() {
            if let Some(environment) = service.get_mut("environment") {
                environment.apply_merge().expect("merge keys");
            }
        }
    }
    value
}

fn env_of(service: &Value) -> Vec<(String, String)> {
    service
        .get("environment")
        .and_then(Value::as_mapping)
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| {
                    let value = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        _ => return None,
                    };
                    Some((k.as_str()?.to_owned(), value))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn env_value(service: &Value, key: &str) -> Option<String> {
    env_of(service)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn ports_of(service: &Value) -> Vec<String> {
    service
        .get("ports")
        .and_then(Value::as_sequence)
        .map(|ports| {
            ports
                .iter()
                .filter_map(|p| p.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn depends(service: &Value, on: &str) -> Option<String> {
    service
        .get("depends_on")
        .and_then(|d| d.get(on))
        .and_then(|d| d.get("condition"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// docker compose's OpenTelemetry Collector configuration, and its Prometheus configuration.
const COLLECTOR_CONFIG: &str = "deploy/otel-collector/config.yaml";
const PROMETHEUS_CONFIG: &str = "deploy/prometheus/prometheus.yml";

/// A YAML file of the repository, parsed.
fn yaml_file(relative: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{relative}: {e}"));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"))
}

fn collector_config() -> Value {
    yaml_file(COLLECTOR_CONFIG)
}

/// A collector component's type: `otlp/jaeger` is an `otlp` named `jaeger`. Also a pipeline's
/// signal: `traces/sampled` is a `traces` pipeline.
fn component_type(id: &str) -> &str {
    id.split('/').next().unwrap_or(id)
}

/// The ids one section of the collector's configuration (`receivers`, `processors`, `exporters`,
/// `connectors`) defines.
fn defined(config: &Value, section: &str) -> BTreeSet<String> {
    config
        .get(section)
        .and_then(Value::as_mapping)
        .map(|map| {
            map.keys()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// One of the collector's pipelines: its receivers, processors (in order) and exporters.
struct Pipeline {
    id: String,
    receivers: Vec<String>,
    processors: Vec<String>,
    exporters: Vec<String>,
}

impl Pipeline {
    /// `traces`, `metrics` or `logs`.
    fn signal(&self) -> &str {
        component_type(&self.id)
    }

    /// Where the first processor of this type is, if any.
    fn processor_position(&self, kind: &str) -> Option<usize> {
        self.processors
            .iter()
            .position(|id| component_type(id) == kind)
    }
}

fn collector_pipelines(config: &Value) -> Vec<Pipeline> {
    fn ids(pipeline: &Value, key: &str) -> Vec<String> {
        pipeline
            .get(key)
            .and_then(Value::as_sequence)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| id.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }
    config["service"]["pipelines"]
        .as_mapping()
        .expect("service.pipelines")
        .iter()
        .map(|(id, pipeline)| Pipeline {
            id: id.as_str().expect("a pipeline id").to_owned(),
            receivers: ids(pipeline, "receivers"),
            processors: ids(pipeline, "processors"),
            exporters: ids(pipeline, "exporters"),
        })
        .collect()
}

/// The span metrics connector's id: `spanmetrics` (which newer collectors may also spell `span_metrics`).
fn span_metrics_connector(config: &Value) -> String {
    let ids: Vec<String> = defined(config, "connectors")
        .into_iter()
        .filter(|id| matches!(component_type(id), "span_metrics" | "spanmetrics"))
        .collect();
    assert_eq!(ids.len(), 1, "one span metrics connector: {ids:?}");
    ids[0].clone()
}

/// The collector's exporters that send to Jaeger's OTLP gRPC port on the compose network.
fn jaeger_exporters(config: &Value) -> Vec<String> {
    defined(config, "exporters")
        .into_iter()
        .filter(|id| config["exporters"][id.as_str()]["endpoint"].as_str() == Some("jaeger:4317"))
        .collect()
}

/// A collector setting read from the environment, `${env:NAME:-default}` (followed by nothing): the name
/// and the default.
fn env_reference(value: &str) -> (String, String) {
    let inner = value
        .strip_prefix("${env:")
        .and_then(|rest| rest.strip_suffix('}'))
        .unwrap_or_else(|| panic!("{value:?} is not ${{env:NAME:-default}}"));
    let (name, default) = inner
        .split_once(":-")
        .unwrap_or_else(|| panic!("{value:?} has no default"));
    (name.to_owned(), default.to_owned())
}

/// A duration as the collector writes it (`2ms`, `1s`), in milliseconds.
fn duration_ms(duration: &str) -> f64 {
    if let Some(ms) = duration.strip_suffix("ms") {
        ms.parse().unwrap_or_else(|_| panic!("{duration}"))
    } else if let Some(s) = duration.strip_suffix('s') {
        s.parse::<f64>().unwrap_or_else(|_| panic!("{duration}")) * 1000.0
    } else {
        panic!("{duration} is not in ms or s")
    }
}

/// An image tag that names one release (`0.159.0`, `v3.14.0`), not a moving one (`latest`, `3`).
fn is_exact_version(tag: &str) -> bool {
    let parts: Vec<&str> = tag.trim_start_matches('v').split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_digit()))
}

/// A compose service's `volumes` entries, as written.
fn volumes_of(service: &Value) -> Vec<String> {
    service["volumes"]
        .as_sequence()
        .map(|v| {
            v.iter()
                .filter_map(|m| m.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A compose service's `command`, as a list.
fn command_of(service: &Value) -> Vec<String> {
    service["command"]
        .as_sequence()
        .map(|c| {
            c.iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_names_every_service_with_its_port() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    // Compose services are named after their binaries.
    for binary in SERVICES {
        assert!(
            names.contains(binary),
            "service {binary} missing from compose"
        );
    }
    for infra in [
        "jaeger",
        "otel-collector",
        "prometheus",
        "nats",
        "postgres",
        "migrate",
        "mailpit",
    ] {
        assert!(names.contains(infra), "{infra} missing");
    }
    let ports = Ports::DEFAULT;
    let expected = [
        ("gateway", ports.gateway, "GATEWAY"),
        ("users", ports.users, "USERS"),
        ("billing", ports.billing, "BILLING"),
        ("notifications", ports.notifications, "NOTIFICATIONS"),
        ("stripe-sim", ports.stripe_sim, "STRIPE_SIM"),
    ];
    for (service, port, prefix) in expected {
        let definition = &compose["services"][service];
        assert_eq!(
            env_value(definition, &format!("{prefix}_PORT")),
            Some(port.to_string()),
            "{service} port variable"
        );
        assert_eq!(
            env_value(definition, &format!("{prefix}_HOST")).as_deref(),
            Some("0.0.0.0"),
            "{service} must listen beyond loopback in a container"
        );
        let health = format!("{:?}", definition["healthcheck"]["test"]);
        assert!(
            health.contains(&format!("localhost:{port}/healthz")),
            "{service} health check: {health}"
        );
        assert_eq!(
            definition["restart"].as_str(),
            Some("on-failure"),
            "{service} restarts on failure"
        );
    }
    assert!(
        compose["services"]["jaeger"]["image"]
            .as_str()
            .unwrap_or_default()
            .contains("jaegertracing/jaeger:2"),
        "Jaeger v2 image (OTLP built in)"
    );
}

#[test]
fn compose_gives_each_service_the_variables_the_code_reads() {
    let compose = compose();
    let required: &[(&str, &[&str])] = &[
        ("users", &["DATABASE_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"]),
        (
            "billing",
            &[
                "DATABASE_URL",
                "NATS_URL",
                "STRIPE_API_BASE",
                "STRIPE_SECRET_KEY",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ],
        ),
        (
            "notifications",
            &["DATABASE_URL", "NATS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"],
        ),
        (
            "gateway",
            &[
                "USERS_URL",
                "BILLING_URL",
                "NOTIFICATIONS_URL",
                "SERVICE_TOKEN_SIGNING_KEY_FILE",
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ],
        ),
        ("migrate", &["DATABASE_URL"]),
    ];
    for (service, variables) in required {
        // The one-shot migration step runs the `stack` binary.
        let code = source_text(if *service == "migrate" {
            "stack"
        } else {
            service
        });
        let definition = &compose["services"][*service];
        for variable in *variables {
            assert!(
                env_value(definition, variable).is_some(),
                "{service} lacks {variable}"
            );
        }
        for (key, _) in env_of(definition) {
            // `listen_address("USERS", ..)` reads USERS_HOST and USERS_PORT.
            let via_listen_address = key
                .strip_suffix("_HOST")
                .or_else(|| key.strip_suffix("_PORT"))
                .is_some_and(|prefix| code.contains(&format!("listen_address(\"{prefix}\"")));
            assert!(
                reads_variable(&code, &key)
                    || LIBRARY_VARIABLES.contains(&key.as_str())
                    || via_listen_address,
                "{service} sets {key}, which its code does not read"
            );
        }
    }
    // URLs point at services that exist, on the ports they listen on.
    let gateway = &compose["services"]["gateway"];
    assert_eq!(
        env_value(gateway, "USERS_URL").as_deref(),
        Some("http://users:3001")
    );
    assert_eq!(
        env_value(gateway, "BILLING_URL").as_deref(),
        Some("http://billing:3002")
    );
    assert_eq!(
        env_value(&compose["services"]["billing"], "STRIPE_API_BASE").as_deref(),
        Some("http://stripe-sim:12111")
    );
    for service in ["users", "billing", "notifications", "gateway"] {
        assert_eq!(
            env_value(&compose["services"][service], "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
            Some("http://otel-collector:4318"),
            "{service} exports to the OpenTelemetry Collector over OTLP/HTTP"
        );
        assert_eq!(
            env_value(&compose["services"][service], "OTEL_EXPORTER_OTLP_PROTOCOL").as_deref(),
            Some("http/protobuf"),
            "{service} exports protobuf over HTTP, as the endpoint's port says"
        );
    }
    let database = env_value(&compose["services"]["billing"], "DATABASE_URL").unwrap_or_default();
    assert!(database.contains("@postgres:5432/"), "{database}");
    let smtp = env_value(&compose["services"]["notifications"], "SMTP_URL").unwrap_or_default();
    assert_eq!(smtp, "smtp://mailpit:1025");
}

#[test]
fn compose_starts_things_in_dependency_order() {
    let compose = compose();
    let services = &compose["services"];
    assert_eq!(
        depends(&services["migrate"], "postgres").as_deref(),
        Some("service_healthy")
    );
    assert_eq!(
        services["migrate"]["command"],
        serde_yaml::from_str::<Value>("[stack, migrate]").unwrap()
    );
    for service in ["users", "billing", "notifications"] {
        assert_eq!(
            depends(&services[service], "migrate").as_deref(),
            Some("service_completed_successfully"),
            "{service} waits for the migrations"
        );
    }
    for service in ["billing", "notifications"] {
        assert_eq!(
            depends(&services[service], "nats").as_deref(),
            Some("service_healthy"),
            "{service} waits for NATS"
        );
    }
    assert_eq!(
        depends(&services["billing"], "stripe-sim").as_deref(),
        Some("service_healthy")
    );
    for upstream in ["users", "billing"] {
        assert_eq!(
            depends(&services["gateway"], upstream).as_deref(),
            Some("service_healthy"),
            "gateway waits for {upstream}"
        );
    }
    let nats_command = format!("{:?}", services["nats"]["command"]);
    assert!(
        nats_command.contains("-js"),
        "JetStream enabled: {nats_command}"
    );
    assert!(services["postgres"]["healthcheck"].is_mapping());
    let volumes = compose["volumes"].as_mapping().expect("volumes");
    assert!(volumes.contains_key("nats-data") && volumes.contains_key("pg-data"));
}

#[test]
fn only_the_gateway_the_jaeger_ui_prometheus_and_the_inbox_are_published_and_only_on_loopback() {
    let compose = compose();
    let mut published: Vec<(String, String)> = Vec::new();
    for (name, definition) in compose["services"].as_mapping().expect("services") {
        for port in ports_of(definition) {
            published.push((name.as_str().unwrap_or_default().to_owned(), port));
        }
    }
    published.sort();
    let expected: Vec<(String, String)> = [
        ("gateway", "127.0.0.1:3000:3000"),
        ("jaeger", "127.0.0.1:16686:16686"),
        ("mailpit", "127.0.0.1:8025:8025"),
        ("prometheus", "127.0.0.1:9090:9090"),
    ]
    .iter()
    .map(|(name, port)| ((*name).to_owned(), (*port).to_owned()))
    .collect();
    assert_eq!(published, expected);
}

#[test]
fn no_secret_is_committed_and_the_services_run_unprivileged() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let compose = compose();
    let services = &compose["services"];
    assert_eq!(
        env_value(&services["postgres"], "POSTGRES_PASSWORD").as_deref(),
        Some("${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env (see .env.example)}"),
        "the password comes from .env"
    );
    // Each service logs in as its own role, with its password from .env; only the migration is the owner.
    for (name, definition) in services.as_mapping().expect("services") {
        let name = name.as_str().unwrap_or_default();
        if let Some(url) = env_value(definition, "DATABASE_URL") {
            let expected = match tracehop::infra::service_role(name) {
                Some(role) => format!(
                    "postgres://{role}:${{POSTGRES_{}_PASSWORD}}@postgres:5432/tracehop",
                    name.to_uppercase()
                ),
                None => {
                    "postgres://postgres:${POSTGRES_PASSWORD}@postgres:5432/tracehop".to_owned()
                }
            };
            assert_eq!(url, expected, "{name} DATABASE_URL");
        }
    }
    for service in ["USERS", "BILLING", "NOTIFICATIONS"] {
        let variable = format!("POSTGRES_{service}_PASSWORD");
        assert_eq!(
            env_value(&services["migrate"], &variable),
            Some(format!(
                "${{{variable}:?set {variable} in .env (see .env.example)}}"
            )),
        );
        let example = std::fs::read_to_string(root.join(".env.example")).unwrap();
        assert!(
            example.contains(&format!("{variable}=")),
            "{variable} in .env.example"
        );
    }
    let ignored = std::fs::read_to_string(root.join(".gitignore")).unwrap();
    assert!(
        ignored.lines().any(|line| line == "/.env"),
        ".env is not ignored"
    );
    let example = std::fs::read_to_string(root.join(".env.example")).unwrap();
    assert!(example.contains("POSTGRES_PASSWORD="));
    let tracked = std::process::Command::new("git")
        .args(["ls-files", ".env"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(tracked.stdout.is_empty(), ".env is committed");
    // The services: read-only root filesystem, and the image's non-root user.
    for service in SERVICES.iter().chain(["migrate"].iter()) {
        assert_eq!(
            services[*service]["read_only"].as_bool(),
            Some(true),
            "{service} root filesystem"
        );
    }
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(dockerfile.lines().any(|line| line == "USER tracehop"));
}

#[test]
fn the_dockerfile_builds_every_binary_compose_runs() {
    let compose = compose();
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
            .expect("Dockerfile");
    for (name, service) in compose["services"].as_mapping().unwrap() {
        if service.get("build").is_none() {
            continue;
        }
        let binary = service["command"][0]
            .as_str()
            .unwrap_or_else(|| panic!("{name:?} has a command"));
        assert!(
            dockerfile.contains(&format!("target/release/{binary}")),
            "Dockerfile does not build {binary}"
        );
        let workspace_binary = binary == "stack" || SERVICES.contains(&binary);
        assert!(workspace_binary, "{binary} is not a workspace binary");
    }
}

#[test]
fn nats_in_compose_has_the_stacks_users_and_permissions_and_no_anonymous_access() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let committed = std::fs::read_to_string(root.join("deploy/nats/nats-server.conf")).unwrap();
    let expected = tracehop::secrets::NatsUsers::server_config_template("ORDERS");
    assert!(
        committed == expected,
        "deploy/nats/nats-server.conf differs from the stack's template; it should be:\n{expected}"
    );
    let compose = compose();
    let services = &compose["services"];
    let nats = &services["nats"];
    let command: Vec<&str> = nats["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        command
            .windows(2)
            .any(|w| w == ["-c", "/etc/nats/nats-server.conf"]),
        "{command:?}"
    );
    for user in ["BILLING", "NOTIFICATIONS", "OPERATOR"] {
        let variable = format!("NATS_{user}_PASSWORD");
        assert_eq!(
            env_value(nats, &variable),
            Some(format!(
                "${{{variable}:?set {variable} in .env (see .env.example)}}"
            )),
        );
    }
    for (service, user) in [("billing", "billing"), ("notifications", "notifications")] {
        assert_eq!(
            env_value(&services[service], "NATS_USER").as_deref(),
            Some(user)
        );
        assert_eq!(
            env_value(&services[service], "NATS_PASSWORD"),
            Some(format!("${{NATS_{}_PASSWORD}}", user.to_uppercase()))
        );
    }
    let example = std::fs::read_to_string(root.join(".env.example")).unwrap();
    for variable in [
        "NATS_BILLING_PASSWORD=",
        "NATS_NOTIFICATIONS_PASSWORD=",
        "NATS_OPERATOR_PASSWORD=",
    ] {
        assert!(
            example.contains(variable),
            "{variable} missing from .env.example"
        );
    }
}

#[test]
fn service_tokens_in_compose_keep_the_private_key_with_the_gateway() {
    let compose = compose();
    let services = &compose["services"];
    let mounts = |service: &str| -> Vec<String> {
        services[service]["volumes"]
            .as_sequence()
            .map(|v| {
                v.iter()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        env_value(&services["gateway"], "SERVICE_TOKEN_SIGNING_KEY_FILE").as_deref(),
        Some("/secrets/private/service-token.key.pem")
    );
    assert!(mounts("gateway").contains(&"token-private:/secrets/private:ro".to_owned()));
    for service in ["users", "billing", "notifications"] {
        assert_eq!(
            env_value(&services[service], "SERVICE_TOKEN_PUBLIC_KEY_FILE").as_deref(),
            Some("/secrets/public/service-token.pub.pem"),
            "{service}"
        );
        let token_mounts: Vec<String> = mounts(service)
            .into_iter()
            .filter(|mount| mount.starts_with("token-"))
            .collect();
        assert_eq!(
            token_mounts,
            vec!["token-public:/secrets/public:ro".to_owned()],
            "{service}"
        );
        assert_eq!(
            depends(&services[service], "secrets").as_deref(),
            Some("service_completed_successfully")
        );
    }
    assert_eq!(
        depends(&services["gateway"], "secrets").as_deref(),
        Some("service_completed_successfully")
    );
    // Nothing else sees the private key.
    for (name, definition) in services.as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        if name == "gateway" || name == "secrets" {
            continue;
        }
        let mounts: Vec<String> = definition["volumes"]
            .as_sequence()
            .map(|v| {
                v.iter()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            !mounts.iter().any(|m| m.starts_with("token-private")),
            "{name} mounts the private key"
        );
    }
    // The production image is built without the test hooks.
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("cargo build --release --workspace --bins --no-default-features"),
        "the Dockerfile must build without the fault-injection feature"
    );
}

#[test]
fn the_collectors_pipelines_use_only_components_it_defines() {
    let config = collector_config();
    let receivers = defined(&config, "receivers");
    let processors = defined(&config, "processors");
    let exporters = defined(&config, "exporters");
    let connectors = defined(&config, "connectors");
    let pipelines = collector_pipelines(&config);
    assert!(!pipelines.is_empty(), "{COLLECTOR_CONFIG}: no pipeline");
    for pipeline in &pipelines {
        let id = &pipeline.id;
        assert!(
            ["traces", "metrics", "logs"].contains(&pipeline.signal()),
            "pipeline {id}: unknown signal"
        );
        assert!(
            !pipeline.receivers.is_empty() && !pipeline.exporters.is_empty(),
            "pipeline {id} needs receivers and exporters"
        );
        for receiver in &pipeline.receivers {
            assert!(
                receivers.contains(receiver) || connectors.contains(receiver),
                "pipeline {id} receives from {receiver}, which is not defined"
            );
        }
        for processor in &pipeline.processors {
            assert!(
                processors.contains(processor),
                "pipeline {id} uses processor {processor}, which is not defined"
            );
        }
        for exporter in &pipeline.exporters {
            assert!(
                exporters.contains(exporter) || connectors.contains(exporter),
                "pipeline {id} exports to {exporter}, which is not defined"
            );
        }
    }
    // A connector joins two pipelines: the end of one, the start of another.
    for connector in &connectors {
        assert!(
            pipelines.iter().any(|p| p.exporters.contains(connector)),
            "connector {connector} is no pipeline's exporter"
        );
        assert!(
            pipelines.iter().any(|p| p.receivers.contains(connector)),
            "connector {connector} is no pipeline's receiver"
        );
    }
    // Nothing defined and left out of every pipeline (the collector would ignore it without a word).
    for id in receivers.iter().chain(&processors).chain(&exporters) {
        assert!(
            pipelines.iter().any(|p| p.receivers.contains(id)
                || p.processors.contains(id)
                || p.exporters.contains(id)),
            "{id} is defined but in no pipeline"
        );
    }
}

#[test]
fn span_metrics_count_every_span_before_tail_sampling_as_the_embedded_collector_does() {
    let config = collector_config();
    let receivers = defined(&config, "receivers");
    let pipelines = collector_pipelines(&config);
    let span_metrics = span_metrics_connector(&config);
    // Fed by a traces pipeline straight from the services, with no sampling on the way.
    let feeding: Vec<&Pipeline> = pipelines
        .iter()
        .filter(|p| p.exporters.contains(&span_metrics))
        .collect();
    assert!(!feeding.is_empty(), "no pipeline exports to {span_metrics}");
    for pipeline in &feeding {
        let id = &pipeline.id;
        assert_eq!(pipeline.signal(), "traces", "pipeline {id}");
        assert_eq!(
            pipeline.processor_position("tail_sampling"),
            None,
            "pipeline {id} samples before the span metrics count"
        );
        assert!(
            pipeline
                .receivers
                .iter()
                .all(|r| receivers.contains(r) && component_type(r) == "otlp"),
            "pipeline {id} must take the services' OTLP directly, not another pipeline's output: {:?}",
            pipeline.receivers
        );
    }
    // Read by a metrics pipeline that serves them to Prometheus.
    let reading: Vec<&Pipeline> = pipelines
        .iter()
        .filter(|p| p.receivers.contains(&span_metrics))
        .collect();
    assert!(
        !reading.is_empty(),
        "no pipeline receives from {span_metrics}"
    );
    for pipeline in &reading {
        let id = &pipeline.id;
        assert_eq!(pipeline.signal(), "metrics", "pipeline {id}");
        assert!(
            pipeline
                .exporters
                .iter()
                .any(|e| component_type(e) == "prometheus"),
            "pipeline {id} does not export to Prometheus"
        );
    }
    // The names and buckets the embedded collector uses (src/collector/metrics.rs): the Prometheus names
    // traces_span_metrics_calls_total and traces_span_metrics_duration_milliseconds_*, the default labels.
    let connector = &config["connectors"][span_metrics.as_str()];
    assert_eq!(connector["namespace"].as_str(), Some("traces.span.metrics"));
    assert_eq!(connector["histogram"]["unit"].as_str(), Some("ms"));
    assert_eq!(
        connector["dimensions"].as_sequence().map_or(0, Vec::len),
        0,
        "only the default dimensions (service.name, span.name, span.kind, status.code)"
    );
    let buckets: Vec<String> = connector["histogram"]["explicit"]["buckets"]
        .as_sequence()
        .expect("histogram.explicit.buckets")
        .iter()
        .map(|b| b.as_str().expect("a duration").to_owned())
        .collect();
    assert_eq!(
        buckets,
        [
            "2ms", "4ms", "6ms", "8ms", "10ms", "50ms", "100ms", "200ms", "400ms", "800ms", "1s",
            "1400ms", "2s", "5s", "10s", "15s"
        ]
    );
    let buckets_ms: Vec<f64> = buckets.iter().map(|b| duration_ms(b)).collect();
    assert_eq!(
        buckets_ms,
        BUCKETS_MS.to_vec(),
        "the embedded collector's buckets"
    );
}

#[test]
fn the_collector_tail_samples_with_the_embedded_collectors_settings_before_jaeger() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = collector_config();
    let pipelines = collector_pipelines(&config);
    let connectors = defined(&config, "connectors");
    let span_metrics = span_metrics_connector(&config);
    let tail = &config["processors"]["tail_sampling"];
    assert!(tail.is_mapping(), "{COLLECTOR_CONFIG}: no tail_sampling");

    // The three policies: every error, every slow trace, a share of the rest.
    let policies = tail["policies"]
        .as_sequence()
        .expect("tail_sampling.policies");
    let kinds: BTreeSet<&str> = policies.iter().filter_map(|p| p["type"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["latency", "probabilistic", "status_code"]),
        "tail_sampling policies"
    );
    assert_eq!(policies.len(), 3, "one policy of each type");
    let policy = |kind: &str| -> Value {
        policies
            .iter()
            .find(|p| p["type"].as_str() == Some(kind))
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} policy"))
    };
    assert_eq!(
        policy("status_code")["status_code"]["status_codes"],
        serde_yaml::from_str::<Value>("[ERROR]").unwrap(),
        "every trace with an error"
    );

    // Each setting from the environment under the embedded collector's name, with its default
    // (src/collector/sampling.rs), and given by docker compose from .env with the same default.
    let defaults = TailPolicy::default();
    let decision_wait = tail["decision_wait"].as_str().unwrap_or_default();
    let settings = [
        (
            decision_wait
                .strip_suffix("ms")
                .unwrap_or_else(|| panic!("decision_wait {decision_wait:?} is not in ms")),
            "COLLECTOR_TAIL_DECISION_WAIT_MS",
            defaults.decision_wait.as_millis() as f64,
        ),
        (
            policy("latency")["latency"]["threshold_ms"]
                .as_str()
                .unwrap_or_default(),
            "COLLECTOR_TAIL_SLOW_MS",
            defaults.slow.as_millis() as f64,
        ),
        (
            policy("probabilistic")["probabilistic"]["sampling_percentage"]
                .as_str()
                .unwrap_or_default(),
            "COLLECTOR_TAIL_SAMPLING_PERCENT",
            defaults.percent,
        ),
    ]
    .map(|(value, name, default)| (value.to_owned(), name, default));
    let compose = compose();
    let collector = &compose["services"]["otel-collector"];
    let example = std::fs::read_to_string(root.join(".env.example")).unwrap();
    for (value, name, default) in settings {
        let (variable, written_default) = env_reference(&value);
        assert_eq!(variable, name, "{value}");
        assert_eq!(
            written_default.parse::<f64>().ok(),
            Some(default),
            "{name}: the embedded collector's default"
        );
        assert_eq!(
            env_value(collector, name),
            Some(format!("${{{name}:-{written_default}}}")),
            "docker compose gives the collector {name} from .env"
        );
        assert!(
            example
                .lines()
                .any(|line| line == format!("{name}={written_default}")),
            "{name} missing from .env.example"
        );
    }

    // Sampling, then batching, then Jaeger; and only what the span metrics have already counted.
    let jaeger = jaeger_exporters(&config);
    let to_jaeger: Vec<&Pipeline> = pipelines
        .iter()
        .filter(|p| p.exporters.iter().any(|e| jaeger.contains(e)))
        .collect();
    assert!(!to_jaeger.is_empty(), "no pipeline exports to Jaeger");
    for pipeline in &to_jaeger {
        let id = &pipeline.id;
        assert_eq!(pipeline.signal(), "traces", "pipeline {id}");
        let sampled = pipeline
            .processor_position("tail_sampling")
            .unwrap_or_else(|| panic!("pipeline {id} exports to Jaeger without tail sampling"));
        let batched = pipeline
            .processor_position("batch")
            .unwrap_or_else(|| panic!("pipeline {id}: no batch processor"));
        assert!(
            sampled < batched,
            "pipeline {id}: tail_sampling, then batch"
        );
        for receiver in &pipeline.receivers {
            assert!(
                connectors.contains(receiver),
                "pipeline {id} takes {receiver} directly, not the spans the span metrics counted"
            );
            assert!(
                pipelines
                    .iter()
                    .any(|p| p.exporters.contains(receiver) && p.exporters.contains(&span_metrics)),
                "pipeline {id}: {receiver} is not fed by the pipeline that feeds {span_metrics}"
            );
        }
    }
}

#[test]
fn every_service_exports_to_the_collector_and_only_the_collector_to_jaeger() {
    let compose = compose();
    let services = &compose["services"];
    let collector = &services["otel-collector"];
    let image = collector["image"].as_str().unwrap_or_default();
    let tag = image
        .strip_prefix("otel/opentelemetry-collector-contrib:")
        .unwrap_or_else(|| panic!("collector image {image}"));
    assert!(is_exact_version(tag), "collector image pinned: {image}");
    let command = command_of(collector);
    let config_path = command
        .iter()
        .find_map(|arg| arg.strip_prefix("--config="))
        .unwrap_or_else(|| panic!("collector command without --config=: {command:?}"));
    assert!(
        volumes_of(collector).contains(&format!("./{COLLECTOR_CONFIG}:{config_path}:ro")),
        "{COLLECTOR_CONFIG} mounted read-only at {config_path}"
    );
    assert_eq!(collector["read_only"].as_bool(), Some(true));
    assert_eq!(collector["restart"].as_str(), Some("unless-stopped"));
    assert_eq!(
        depends(collector, "jaeger").as_deref(),
        Some("service_started")
    );

    // Every service sends its spans to the collector, and waits for it; none goes round it to Jaeger.
    let mut exporting = Vec::new();
    for (name, definition) in services.as_mapping().unwrap() {
        let name = name.as_str().unwrap_or_default();
        if let Some(endpoint) = env_value(definition, "OTEL_EXPORTER_OTLP_ENDPOINT") {
            assert_eq!(endpoint, "http://otel-collector:4318", "{name}");
            assert_eq!(
                depends(definition, "otel-collector").as_deref(),
                Some("service_started"),
                "{name} waits for the collector"
            );
            exporting.push(name.to_owned());
        }
        for (key, value) in env_of(definition) {
            assert!(
                !value.contains("jaeger:"),
                "{name} {key}={value} goes round the collector"
            );
        }
    }
    for service in ["gateway", "users", "billing", "notifications"] {
        assert!(
            exporting.iter().any(|s| s == service),
            "{service} exports no spans"
        );
    }

    // The collector listens where they send, and sends on to Jaeger over OTLP gRPC.
    let config = collector_config();
    let otlp = &config["receivers"]["otlp"]["protocols"];
    assert_eq!(otlp["grpc"]["endpoint"].as_str(), Some("0.0.0.0:4317"));
    assert_eq!(otlp["http"]["endpoint"].as_str(), Some("0.0.0.0:4318"));
    let jaeger = jaeger_exporters(&config);
    assert!(
        !jaeger.is_empty(),
        "the collector does not export to jaeger:4317"
    );
    for id in &jaeger {
        assert!(
            matches!(component_type(id), "otlp_grpc" | "otlp"),
            "{id} is not the OTLP gRPC exporter"
        );
        assert_eq!(
            config["exporters"][id.as_str()]["tls"]["insecure"].as_bool(),
            Some(true),
            "{id}: plain gRPC on the compose network"
        );
        assert!(
            collector_pipelines(&config)
                .iter()
                .any(|p| p.exporters.contains(id)),
            "{id} is in no pipeline"
        );
    }
}

#[test]
fn prometheus_scrapes_the_collectors_span_metrics() {
    let config = collector_config();
    let exporters: Vec<String> = defined(&config, "exporters")
        .into_iter()
        .filter(|id| component_type(id) == "prometheus")
        .collect();
    assert_eq!(exporters.len(), 1, "one Prometheus exporter: {exporters:?}");
    let endpoint = config["exporters"][exporters[0].as_str()]["endpoint"]
        .as_str()
        .unwrap_or_default();
    let (host, port) = endpoint
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("prometheus exporter endpoint {endpoint:?}"));
    assert_eq!(host, "0.0.0.0", "reachable from the prometheus container");

    let prometheus = yaml_file(PROMETHEUS_CONFIG);
    let jobs = prometheus["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs");
    let job = jobs
        .iter()
        .find(|job| job["job_name"].as_str() == Some("spanmetrics"))
        .unwrap_or_else(|| panic!("{PROMETHEUS_CONFIG}: no job spanmetrics"));
    let interval = job["scrape_interval"]
        .as_str()
        .or_else(|| prometheus["global"]["scrape_interval"].as_str());
    assert_eq!(interval, Some("15s"));
    let targets: Vec<String> = job["static_configs"]
        .as_sequence()
        .expect("static_configs")
        .iter()
        .flat_map(|c| c["targets"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        targets,
        vec![format!("otel-collector:{port}")],
        "Prometheus scrapes the collector's prometheus exporter"
    );

    // The service: a pinned image, the file mounted read-only where --config.file points, its data in a
    // named volume, the UI on 127.0.0.1 only (checked with every port above).
    let compose = compose();
    let service = &compose["services"]["prometheus"];
    let image = service["image"].as_str().unwrap_or_default();
    let tag = image
        .strip_prefix("prom/prometheus:")
        .unwrap_or_else(|| panic!("prometheus image {image}"));
    assert!(is_exact_version(tag), "prometheus image pinned: {image}");
    let command = command_of(service);
    let config_path = command
        .iter()
        .find_map(|arg| arg.strip_prefix("--config.file="))
        .unwrap_or("/etc/prometheus/prometheus.yml");
    let volumes = volumes_of(service);
    assert!(
        volumes.contains(&format!("./{PROMETHEUS_CONFIG}:{config_path}:ro")),
        "{PROMETHEUS_CONFIG} mounted read-only at {config_path}: {volumes:?}"
    );
    let data = volumes
        .iter()
        .find_map(|v| v.strip_suffix(":/prometheus"))
        .unwrap_or_else(|| panic!("no volume for /prometheus: {volumes:?}"));
    assert!(
        compose["volumes"]
            .as_mapping()
            .expect("volumes")
            .contains_key(data),
        "{data} is not a named volume"
    );
    assert_eq!(ports_of(service), vec!["127.0.0.1:9090:9090".to_owned()]);
    assert_eq!(service["read_only"].as_bool(), Some(true));
}

/// Every traced service spools its spans on the one `spans` volume, where the variable points: a container
/// SIGKILLed and restarted (or a sibling) exports what it had not (README, "Spans that survive a kill").
#[test]
fn traced_services_share_the_span_spool_volume() {
    let compose = compose();
    let services = &compose["services"];
    assert!(
        compose["volumes"].get("spans").is_some(),
        "the spans volume is declared"
    );
    for service in ["gateway", "users", "billing", "notifications"] {
        let spool = env_value(&services[service], "TRACEHOP_SPAN_SPOOL")
            .unwrap_or_else(|| panic!("{service}: TRACEHOP_SPAN_SPOOL"));
        let mounted = services[service]["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|mount| mount.as_str())
            .any(|mount| mount == format!("spans:{spool}"));
        assert!(mounted, "{service}: the spans volume at {spool}");
    }
    // The image makes the mount point for its user, so a new named volume is writable by it.
    let dockerfile = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"),
    )
    .unwrap();
    assert!(
        dockerfile.contains("chown tracehop /secrets/private /secrets/public /var/spool/tracehop")
    );
}
