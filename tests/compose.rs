//! No Docker engine runs where the tests run, so docker-compose.yml is checked against the code instead:
//! every service, port, variable and dependency the code expects is there, and nothing it names is unknown.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

use serde_yaml::Value;
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

/// The Rust source a compose service runs (its own crate, and the telemetry crate every service uses), to
/// check that a variable the compose file sets is read by that code.
fn source_text(service: &str) -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut text = String::new();
    match service {
        // The one-shot migration step runs the `stack` binary.
        "migrate" => walk(&root.join("src"), &mut text),
        service => walk(&root.join("services").join(service).join("src"), &mut text),
    }
    walk(&root.join("shared/telemetry/src"), &mut text);
    text
}

/// Whether `code` reads the environment variable `key`: through the configuration helpers, `std::env::var`
/// or clap's `env = ...`. Documentation that merely names it does not count.
fn reads_variable(code: &str, key: &str) -> bool {
    // rustfmt may break a call after its opening parenthesis.
    let code = code
        .split('(')
        .map(str::trim_start)
        .collect::<Vec<_>>()
        .join("(");
    [
        format!("env_or(\"{key}\""),
        format!("env_parse(\"{key}\""),
        format!("var(\"{key}\")"),
        format!("env = \"{key}\""),
        format!("required(\"{key}\""),
    ]
    .iter()
    .any(|call| code.contains(call.as_str()))
}

/// Variables the libraries read themselves: the OpenTelemetry SDK (the standard environment) and
/// tracing-subscriber (`RUST_LOG`, through `EnvFilter::try_from_default_env`).
const LIBRARY_VARIABLES: &[&str] = &[
    "RUST_LOG",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
];

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
    for infra in ["jaeger", "nats", "postgres", "migrate", "mailpit"] {
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
        let code = source_text(service);
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
            Some("http://jaeger:4317"),
            "{service} exports to Jaeger over OTLP gRPC"
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
fn only_the_gateway_the_jaeger_ui_and_the_inbox_are_published_and_only_on_loopback() {
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
        assert_eq!(
            mounts(service),
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
