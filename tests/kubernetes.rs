//! No Kubernetes cluster runs where the tests run, so deploy/kubernetes is checked two ways offline:
//! every manifest against the Kubernetes API's own schemas by kubernetes-validate (strict, Kubernetes 1.30
//! and 1.37; `./dev test` installs it into .tracehop/venv from tools/kubernetes/requirements.txt), and
//! against the code, docker-compose.yml and the README: the five services' Deployments (replicas, probes on
//! /healthz at the container port, resources, security contexts), a PodDisruptionBudget for each replicated
//! one, only variables the README's Configuration table documents and the code reads, secrets only by
//! reference, the private signing key mounted by the gateway alone, the NATS chart's values agreeing with
//! deploy/nats, and kustomizations that list exactly the files there are.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::deployment::{LIBRARY_VARIABLES, reads_variable, source_text};
use serde::Deserialize;
use serde_yaml::Value;
use tracehop::secrets::ServiceKeys;
use tracehop::stack::{Ports, SERVICES};

const KUBERNETES_DIR: &str = "deploy/kubernetes";
/// Helm values for the NATS and PostgreSQL charts: YAML, but not Kubernetes objects.
const HELM_VALUES_DIR: &str = "deploy/kubernetes/helm";
const KUBERNETES_README: &str = "deploy/kubernetes/README.md";
/// Installed by `./dev test` (tools/kubernetes/requirements.txt).
const VALIDATOR: &str = ".tracehop/venv/bin/kubernetes-validate";
/// The oldest Kubernetes the manifests claim, and the newest the pinned validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
const NAMESPACE: &str = "tracehop";
const PRIVATE_KEY_SECRET: &str = "tracehop-token-private";
const PUBLIC_KEY_SECRET: &str = "tracehop-token-public";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Every YAML file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", relative(dir)));
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    files.sort();
    files
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|name| name == "kustomization.yaml" || name == "kustomization.yml")
}

/// The files of Kubernetes objects: every YAML file under deploy/kubernetes but the kustomizations and the
/// Helm values.
fn manifest_files() -> Vec<PathBuf> {
    let helm = root().join(HELM_VALUES_DIR);
    yaml_files(&root().join(KUBERNETES_DIR))
        .into_iter()
        .filter(|path| !is_kustomization(path) && !path.starts_with(&helm))
        .collect()
}

/// The documents of a YAML file (`---` between them), empty ones left out.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", relative(path)));
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| {
            Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", relative(path)))
        })
        .filter(|value| !value.is_null())
        .collect()
}

/// A file of one YAML document, parsed.
fn yaml_file(relative_path: &str) -> Value {
    let mut values = documents(&root().join(relative_path));
    assert_eq!(values.len(), 1, "{relative_path}: one YAML document");
    values.remove(0)
}

/// One Kubernetes object, and the file it is in.
struct Resource {
    file: String,
    value: Value,
}

impl Resource {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
}

fn resources() -> Vec<Resource> {
    let mut all = Vec::new();
    for path in manifest_files() {
        let file = relative(&path);
        for value in documents(&path) {
            all.push(Resource {
                file: file.clone(),
                value,
            });
        }
    }
    assert!(!all.is_empty(), "no manifests under {KUBERNETES_DIR}");
    all
}

fn find<'a>(resources: &'a [Resource], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Resource> = resources
        .iter()
        .filter(|r| r.kind() == kind && r.name() == name)
        .collect();
    assert_eq!(found.len(), 1, "{kind} {name}: one under {KUBERNETES_DIR}");
    let resource: &'a Resource = found[0];
    &resource.value
}

fn of_kind<'a>(resources: &'a [Resource], kind: &'a str) -> impl Iterator<Item = &'a Resource> {
    resources.iter().filter(move |r| r.kind() == kind)
}

/// A scalar as text (`"3000"`, `3000` and `true` alike).
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn sequence(value: &Value) -> Vec<Value> {
    value.as_sequence().cloned().unwrap_or_default()
}

fn strings(value: &Value) -> Vec<String> {
    sequence(value).iter().filter_map(scalar).collect()
}

/// Each service: its binary (and Deployment, Service, container), its port, the prefix of its settings.
fn services() -> [(&'static str, u16, &'static str); 5] {
    let ports = Ports::DEFAULT;
    [
        ("gateway", ports.gateway, "GATEWAY"),
        ("users", ports.users, "USERS"),
        ("billing", ports.billing, "BILLING"),
        ("notifications", ports.notifications, "NOTIFICATIONS"),
        ("stripe-sim", ports.stripe_sim, "STRIPE_SIM"),
    ]
}

/// The services that run as two replicas: all but the test double, whose ledger is in its memory.
const REPLICATED: [&str; 4] = ["gateway", "users", "billing", "notifications"];

/// The pod template of a Deployment or a Job.
fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn pod_labels(workload: &Value) -> BTreeMap<String, String> {
    labels(&workload["spec"]["template"]["metadata"]["labels"])
}

fn labels(map: &Value) -> BTreeMap<String, String> {
    map.as_mapping()
        .map(|map| {
            map.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), scalar(v)?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a label selector (`matchLabels` only) selects pods with `pod` labels.
fn selects(selector: &Value, pod: &BTreeMap<String, String>) -> bool {
    assert!(
        selector["matchExpressions"].is_null(),
        "selectors here use matchLabels only: {selector:?}"
    );
    let wanted = labels(&selector["matchLabels"]);
    !wanted.is_empty() && wanted.iter().all(|(k, v)| pod.get(k) == Some(v))
}

fn containers(workload: &Value) -> Vec<Value> {
    sequence(&pod_spec(workload)["containers"])
}

fn container(workload: &Value, name: &str) -> Value {
    containers(workload)
        .into_iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// Every Deployment and Job (the workloads whose containers run tracehop's binaries).
fn workloads(resources: &[Resource]) -> Vec<&Resource> {
    resources
        .iter()
        .filter(|r| matches!(r.kind(), "Deployment" | "Job"))
        .collect()
}

/// Where a container's variable comes from.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    /// Written in the manifest (in `env`, or in a ConfigMap named by `envFrom`).
    Literal(String),
    /// `valueFrom.secretKeyRef`: the Secret and its key.
    Secret(String, String),
    /// Any other `valueFrom` (a field of the pod, a ConfigMap key).
    Elsewhere,
}

/// A container's environment: every `env` entry, and every key of the ConfigMaps its `envFrom` names.
fn environment(resources: &[Resource], container: &Value) -> BTreeMap<String, Source> {
    let mut variables = BTreeMap::new();
    for from in sequence(&container["envFrom"]) {
        assert!(
            from["secretRef"].is_null(),
            "envFrom a Secret hides which variables a container gets: name each with secretKeyRef"
        );
        let name = from["configMapRef"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("envFrom without configMapRef: {from:?}"));
        let config_map = find(resources, "ConfigMap", name);
        for (key, value) in config_map["data"].as_mapping().cloned().unwrap_or_default() {
            let key = key.as_str().expect("a ConfigMap key").to_owned();
            let value = scalar(&value).unwrap_or_else(|| panic!("ConfigMap {name}: {key}"));
            variables.insert(key, Source::Literal(value));
        }
    }
    // `env` comes after `envFrom`: Kubernetes lets it win, and so does this.
    for entry in sequence(&container["env"]) {
        let name = entry["name"].as_str().expect("an env name").to_owned();
        let source = if let Some(value) = scalar(&entry["value"]) {
            Source::Literal(value)
        } else if entry["valueFrom"]["secretKeyRef"].is_mapping() {
            let reference = &entry["valueFrom"]["secretKeyRef"];
            Source::Secret(
                reference["name"].as_str().unwrap_or_default().to_owned(),
                reference["key"].as_str().unwrap_or_default().to_owned(),
            )
        } else {
            Source::Elsewhere
        };
        variables.insert(name, source);
    }
    variables
}

fn literal(variables: &BTreeMap<String, Source>, name: &str) -> Option<String> {
    match variables.get(name) {
        Some(Source::Literal(value)) => Some(value.clone()),
        _ => None,
    }
}

/// The variable names the README's Configuration table lists (its first column, in backticks). A name
/// ending in `*` stands for every name it begins (`OTEL_BSP_*`).
fn documented_variables() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("README.md: a section ## Configuration");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut names = BTreeSet::new();
    for line in section.lines().filter(|line| line.starts_with("| `")) {
        let first_column = line
            .trim_start_matches('|')
            .split('|')
            .next()
            .unwrap_or_default();
        for (i, piece) in first_column.split('`').enumerate() {
            if i % 2 == 1 && is_variable_name(piece) {
                names.insert(piece.to_owned());
            }
        }
    }
    assert!(
        names.len() > 50,
        "README.md's Configuration table not found where expected: {names:?}"
    );
    names
}

fn is_variable_name(text: &str) -> bool {
    let name = text.strip_suffix('*').unwrap_or(text);
    name.starts_with(|c: char| c.is_ascii_uppercase())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn documented(names: &BTreeSet<String>, variable: &str) -> bool {
    names.iter().any(|name| match name.strip_suffix('*') {
        Some(prefix) => variable.starts_with(prefix),
        None => name == variable,
    })
}

/// A variable whose value is a credential, or carries one (a URL with a password).
fn is_secret_variable(name: &str) -> bool {
    matches!(name, "DATABASE_URL" | "SMTP_URL" | "STRIPE_SECRET_KEY") || name.ends_with("_PASSWORD")
}

/// Every string in a YAML value, keys included.
fn all_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Sequence(items) => items.iter().for_each(|item| all_strings(item, out)),
        Value::Mapping(map) => {
            for (key, item) in map {
                all_strings(key, out);
                all_strings(item, out);
            }
        }
        Value::Tagged(tagged) => all_strings(&tagged.value, out),
        _ => {}
    }
}

/// Whether a text holds a URL with a password in it (`postgres://user:password@host`).
fn has_url_credentials(text: &str) -> bool {
    text.split("://").skip(1).any(|rest| {
        let authority = rest
            .split(|c: char| matches!(c, '/' | '?' | '#' | ',') || c.is_whitespace())
            .next()
            .unwrap_or_default();
        authority
            .rsplit_once('@')
            .is_some_and(|(userinfo, _)| userinfo.contains(':'))
    })
}

/// The Secrets a pod uses: (volume name or variable, Secret name), from secret volumes, projected volumes and
/// secretKeyRef variables of any of its containers.
fn secrets_used(workload: &Value) -> Vec<(String, String)> {
    let mut used = Vec::new();
    for volume in sequence(&pod_spec(workload)["volumes"]) {
        let volume_name = volume["name"].as_str().unwrap_or_default().to_owned();
        if let Some(secret) = volume["secret"]["secretName"].as_str() {
            used.push((volume_name.clone(), secret.to_owned()));
        }
        for source in sequence(&volume["projected"]["sources"]) {
            if let Some(secret) = source["secret"]["name"].as_str() {
                used.push((volume_name.clone(), secret.to_owned()));
            }
        }
    }
    for container in containers(workload)
        .iter()
        .chain(sequence(&pod_spec(workload)["initContainers"]).iter())
    {
        for entry in sequence(&container["env"]) {
            if let Some(secret) = entry["valueFrom"]["secretKeyRef"]["name"].as_str() {
                let variable = entry["name"].as_str().unwrap_or_default().to_owned();
                used.push((variable, secret.to_owned()));
            }
        }
    }
    used
}

/// Where a container mounts the volume that holds Secret `secret`, checked read-only.
fn secret_mount_path(workload: &Value, container: &Value, secret: &str) -> String {
    let volume = sequence(&pod_spec(workload)["volumes"])
        .into_iter()
        .find(|v| v["secret"]["secretName"].as_str() == Some(secret))
        .unwrap_or_else(|| panic!("no volume of Secret {secret}"));
    let volume_name = volume["name"].as_str().unwrap_or_default();
    let mount = sequence(&container["volumeMounts"])
        .into_iter()
        .find(|m| m["name"].as_str() == Some(volume_name))
        .unwrap_or_else(|| panic!("volume {volume_name} (Secret {secret}) is not mounted"));
    assert_eq!(
        mount["readOnly"].as_bool(),
        Some(true),
        "Secret {secret} mounted read-only"
    );
    mount["mountPath"].as_str().expect("mountPath").to_owned()
}

/// docker-compose.yml, with its merge keys applied.
fn compose() -> Value {
    let text =
        std::fs::read_to_string(root().join("docker-compose.yml")).expect("docker-compose.yml");
    let mut value: Value = serde_yaml::from_str(&text).expect("valid YAML");
    value.apply_merge().expect("merge keys");
    value
}

#[test]
fn every_manifest_passes_kubernetes_validate_in_strict_mode() {
    let validator = root().join(VALIDATOR);
    assert!(
        validator.is_file(),
        "{} is missing: run ./dev test, which installs kubernetes-validate \
         (tools/kubernetes/requirements.txt) into .tracehop/venv",
        validator.display()
    );
    let files = manifest_files();
    let mut command = Command::new(&validator);
    command.arg("--strict");
    for version in KUBERNETES_VERSIONS {
        command.arg("--kubernetes-version").arg(version);
    }
    command.args(&files);
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", validator.display()));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "kubernetes-validate failed ({}):\n{report}",
        output.status
    );
    // A kind the validator has no schema for is only a warning (and nothing checked): none allowed.
    for word in ["WARN", "ERROR", "FATAL"] {
        assert!(
            !report.lines().any(|line| line.starts_with(word)),
            "kubernetes-validate:\n{report}"
        );
    }
    let objects: usize = files.iter().map(|file| documents(file).len()).sum();
    for version in KUBERNETES_VERSIONS {
        let minor = version.rsplit_once('.').map_or(version, |(minor, _)| minor);
        let passed = report
            .lines()
            .filter(|line| {
                line.starts_with("INFO ")
                    && line.contains(" passed for resource ")
                    && line.ends_with(&format!(" against version {minor}"))
            })
            .count();
        assert_eq!(
            passed,
            objects,
            "every object of {} files validated against Kubernetes {minor}:\n{report}",
            files.len()
        );
    }
}

#[test]
fn each_service_runs_its_binary_on_its_port_with_probes_resources_and_a_locked_down_pod() {
    let resources = resources();
    for binary in SERVICES {
        assert!(
            services().iter().any(|(service, _, _)| *service == binary),
            "{binary} has no Deployment checked here"
        );
    }
    for (service, port, prefix) in services() {
        let deployment = find(&resources, "Deployment", service);
        let replicas = deployment["spec"]["replicas"].as_u64();
        if REPLICATED.contains(&service) {
            assert_eq!(replicas, Some(2), "{service} runs two replicas");
        } else {
            // stripe-sim keeps its ledger and idempotency keys in memory: two would not agree.
            assert_eq!(replicas, Some(1), "{service}: one replica");
            assert_eq!(
                deployment["spec"]["strategy"]["type"].as_str(),
                Some("Recreate"),
                "{service}: never two at once"
            );
        }
        assert!(
            selects(&deployment["spec"]["selector"], &pod_labels(deployment)),
            "{service}: the selector selects the pod template"
        );

        let container = container(deployment, service);
        assert_eq!(strings(&container["command"]), vec![service.to_owned()]);
        let image = container["image"].as_str().unwrap_or_default();
        let tag = image
            .strip_prefix("tracehop:")
            .unwrap_or_else(|| panic!("{service}: image {image} is not tracehop:<tag>"));
        assert!(
            !tag.is_empty() && tag != "latest",
            "{service}: image {image}"
        );

        // The port it listens on, named, and the probes on /healthz there.
        let ports = sequence(&container["ports"]);
        let declared = ports
            .iter()
            .find(|p| p["containerPort"].as_u64() == Some(u64::from(port)))
            .unwrap_or_else(|| panic!("{service}: containerPort {port}"));
        let port_name = declared["name"].as_str().unwrap_or_default().to_owned();
        let variables = environment(&resources, &container);
        assert_eq!(
            literal(&variables, &format!("{prefix}_PORT")),
            Some(port.to_string()),
            "{service}: {prefix}_PORT"
        );
        assert_eq!(
            literal(&variables, &format!("{prefix}_HOST")).as_deref(),
            Some("0.0.0.0"),
            "{service} must listen beyond loopback in a pod"
        );
        for probe in ["readinessProbe", "livenessProbe"] {
            let get = &container[probe]["httpGet"];
            assert_eq!(
                get["path"].as_str(),
                Some("/healthz"),
                "{service}: {probe} on /healthz"
            );
            let at_port = match &get["port"] {
                Value::Number(n) => n.as_u64() == Some(u64::from(port)),
                Value::String(name) => !port_name.is_empty() && *name == port_name,
                _ => false,
            };
            assert!(
                at_port,
                "{service}: {probe} on port {:?}, not the container's {port}",
                get["port"]
            );
        }

        // Resources: requests, and a memory limit.
        let resources_of = &container["resources"];
        for request in ["cpu", "memory"] {
            assert!(
                scalar(&resources_of["requests"][request]).is_some(),
                "{service}: resources.requests.{request}"
            );
        }
        assert!(
            scalar(&resources_of["limits"]["memory"]).is_some(),
            "{service}: resources.limits.memory"
        );

        // Non-root (by number: the image's USER is a name the kubelet cannot check), a read-only root
        // filesystem, no privilege escalation, no capabilities, no API token, no service links.
        let pod = pod_spec(deployment);
        let security = &container["securityContext"];
        let pod_security = &pod["securityContext"];
        assert!(
            security["runAsNonRoot"].as_bool() == Some(true)
                || (security["runAsNonRoot"].is_null()
                    && pod_security["runAsNonRoot"].as_bool() == Some(true)),
            "{service}: runAsNonRoot"
        );
        let uid = security["runAsUser"]
            .as_u64()
            .or_else(|| pod_security["runAsUser"].as_u64());
        assert!(
            uid.is_some_and(|uid| uid > 0),
            "{service}: runAsUser, a number other than 0"
        );
        assert_eq!(
            security["readOnlyRootFilesystem"].as_bool(),
            Some(true),
            "{service}: readOnlyRootFilesystem"
        );
        assert_eq!(
            security["allowPrivilegeEscalation"].as_bool(),
            Some(false),
            "{service}: allowPrivilegeEscalation"
        );
        assert!(
            strings(&security["capabilities"]["drop"]).contains(&"ALL".to_owned()),
            "{service}: capabilities.drop [ALL]"
        );
        assert!(
            security["capabilities"]["add"].is_null(),
            "{service}: no capability added"
        );
        assert_eq!(
            pod["automountServiceAccountToken"].as_bool(),
            Some(false),
            "{service}: no Kubernetes API token"
        );
        // Service links would set e.g. USERS_PORT=tcp://10.0.0.1:3001 in every pod of the namespace.
        assert_eq!(
            pod["enableServiceLinks"].as_bool(),
            Some(false),
            "{service}: enableServiceLinks: false"
        );

        // Its Service: named after it (the URLs the others use), selecting its pods, on its port.
        let kubernetes_service = find(&resources, "Service", service);
        let selector = labels(&kubernetes_service["spec"]["selector"]);
        let pods = pod_labels(deployment);
        assert!(
            !selector.is_empty() && selector.iter().all(|(k, v)| pods.get(k) == Some(v)),
            "Service {service} selects the Deployment's pods"
        );
        let service_ports = sequence(&kubernetes_service["spec"]["ports"]);
        assert!(
            service_ports.iter().any(|p| {
                p["port"].as_u64() == Some(u64::from(port))
                    && (p["targetPort"].as_u64() == Some(u64::from(port))
                        || p["targetPort"].as_str() == Some(port_name.as_str()))
            }),
            "Service {service}: port {port} to the container's"
        );
        assert!(
            matches!(
                kubernetes_service["spec"]["type"].as_str(),
                None | Some("ClusterIP")
            ),
            "Service {service} is internal (the Ingress is the way in)"
        );
    }
}

#[test]
fn a_disruption_budget_keeps_one_pod_of_each_replicated_service() {
    let resources = resources();
    let budgets: Vec<&Resource> = of_kind(&resources, "PodDisruptionBudget").collect();
    for (service, _, _) in services() {
        let pods = pod_labels(find(&resources, "Deployment", service));
        let selecting: Vec<&&Resource> = budgets
            .iter()
            .filter(|b| selects(&b.value["spec"]["selector"], &pods))
            .collect();
        if REPLICATED.contains(&service) {
            assert_eq!(
                selecting.len(),
                1,
                "one PodDisruptionBudget selects {service}"
            );
            let spec = &selecting[0].value["spec"];
            assert_eq!(
                scalar(&spec["minAvailable"]).as_deref(),
                Some("1"),
                "{service}: minAvailable 1"
            );
        } else {
            // minAvailable 1 of a single pod would block every node drain.
            assert!(selecting.is_empty(), "{service}: no PodDisruptionBudget");
        }
    }
    // Each budget selects one Deployment's pods.
    for budget in &budgets {
        let selected: Vec<&str> = of_kind(&resources, "Deployment")
            .filter(|d| selects(&budget.value["spec"]["selector"], &pod_labels(&d.value)))
            .map(Resource::name)
            .collect();
        assert_eq!(
            selected.len(),
            1,
            "PodDisruptionBudget {} ({}) selects {selected:?}",
            budget.name(),
            budget.file
        );
    }
}

#[test]
fn every_variable_is_documented_in_the_readme_and_read_by_the_code() {
    let resources = resources();
    let documented_names = documented_variables();
    let mut seen = 0;
    for workload in workloads(&resources) {
        for container in containers(&workload.value) {
            let binary = strings(&container["command"])
                .first()
                .cloned()
                .unwrap_or_default();
            let code = source_text(&binary);
            for name in environment(&resources, &container).keys() {
                seen += 1;
                assert!(
                    documented(&documented_names, name),
                    "{} {} ({}): {name} is not in README.md's Configuration table",
                    workload.kind(),
                    workload.name(),
                    workload.file
                );
                // `listen_address("USERS", ..)` reads USERS_HOST and USERS_PORT.
                let via_listen_address = name
                    .strip_suffix("_HOST")
                    .or_else(|| name.strip_suffix("_PORT"))
                    .is_some_and(|prefix| code.contains(&format!("listen_address(\"{prefix}\"")));
                assert!(
                    reads_variable(&code, name)
                        || LIBRARY_VARIABLES.contains(&name.as_str())
                        || via_listen_address,
                    "{} {} sets {name}, which {binary}'s code does not read",
                    workload.kind(),
                    workload.name()
                );
            }
        }
    }
    assert!(seen > 20, "only {seen} variables found");
}

#[test]
fn secrets_come_only_from_secrets() {
    let resources = resources();
    for resource in &resources {
        assert_ne!(
            resource.kind(),
            "Secret",
            "{}: Secrets are made on the cluster (deploy/kubernetes/README.md), never committed",
            resource.file
        );
        let mut texts = Vec::new();
        all_strings(&resource.value, &mut texts);
        for text in texts {
            assert!(
                !text.contains("PRIVATE KEY"),
                "{}: a key in a manifest",
                resource.file
            );
            assert!(
                !has_url_credentials(&text),
                "{}: a URL with a password: {text}",
                resource.file
            );
            assert!(
                !text.contains("sk_live_") && !text.contains("sk_test_"),
                "{}: a Stripe key in a manifest",
                resource.file
            );
        }
    }
    // Every credential a container gets is a secretKeyRef, never written in the manifest or a ConfigMap.
    let readme = std::fs::read_to_string(root().join(KUBERNETES_README)).expect(KUBERNETES_README);
    let mut credentials = 0;
    for workload in workloads(&resources) {
        for container in containers(&workload.value) {
            for (name, source) in environment(&resources, &container) {
                if !is_secret_variable(&name) {
                    continue;
                }
                credentials += 1;
                match source {
                    Source::Secret(secret, key) => {
                        // The README says how to make each one.
                        assert!(
                            readme.contains(&secret) && readme.contains(&format!("{key}=")),
                            "{name} of {} comes from Secret {secret} key {key}, which \
                             {KUBERNETES_README} does not say how to make",
                            workload.name()
                        );
                    }
                    other => panic!(
                        "{} {}: {name} must come from a Secret (secretKeyRef), not {other:?}",
                        workload.kind(),
                        workload.name()
                    ),
                }
            }
        }
        for (_, secret) in secrets_used(&workload.value) {
            assert!(
                readme.contains(&secret),
                "{} uses Secret {secret}, which {KUBERNETES_README} does not say how to make",
                workload.name()
            );
        }
    }
    assert!(credentials >= 8, "only {credentials} credentials found");
}

#[test]
fn only_the_gateway_mounts_the_private_signing_key() {
    let resources = resources();
    for workload in workloads(&resources) {
        let name = workload.name();
        let private: Vec<String> = secrets_used(&workload.value)
            .into_iter()
            .filter(|(_, secret)| secret == PRIVATE_KEY_SECRET)
            .map(|(used_as, _)| used_as)
            .collect();
        let signing_key = containers(&workload.value).iter().find_map(|c| {
            literal(
                &environment(&resources, c),
                "SERVICE_TOKEN_SIGNING_KEY_FILE",
            )
        });
        if workload.kind() == "Deployment" && name == "gateway" {
            assert_eq!(
                private.len(),
                1,
                "the gateway mounts {PRIVATE_KEY_SECRET} once"
            );
            let gateway = container(&workload.value, "gateway");
            let mount = secret_mount_path(&workload.value, &gateway, PRIVATE_KEY_SECRET);
            assert_eq!(
                signing_key,
                Some(format!("{mount}/{}", ServiceKeys::PRIVATE_FILE)),
                "SERVICE_TOKEN_SIGNING_KEY_FILE: the file `stack secrets` makes, where it is mounted"
            );
            let mode = workload.value["spec"]["template"]["spec"]["volumes"]
                .as_sequence()
                .and_then(|volumes| {
                    volumes
                        .iter()
                        .find(|v| v["secret"]["secretName"].as_str() == Some(PRIVATE_KEY_SECRET))
                })
                .and_then(|v| v["secret"]["defaultMode"].as_u64());
            assert!(
                mode.is_some_and(|mode| (mode & 0o007) == 0),
                "the private key is not readable by others: defaultMode {mode:?}"
            );
        } else {
            assert!(
                private.is_empty(),
                "{} {name} uses {PRIVATE_KEY_SECRET} ({private:?}): only the gateway may",
                workload.kind()
            );
            assert_eq!(
                signing_key, None,
                "{name} sets SERVICE_TOKEN_SIGNING_KEY_FILE"
            );
        }
    }
    // The callees verify with the public key, mounted where their variable says.
    for service in ["users", "billing", "notifications"] {
        let deployment = find(&resources, "Deployment", service);
        let callee = container(deployment, service);
        let mount = secret_mount_path(deployment, &callee, PUBLIC_KEY_SECRET);
        assert_eq!(
            literal(
                &environment(&resources, &callee),
                "SERVICE_TOKEN_PUBLIC_KEY_FILE"
            ),
            Some(format!("{mount}/{}", ServiceKeys::PUBLIC_FILE)),
            "{service}: SERVICE_TOKEN_PUBLIC_KEY_FILE"
        );
    }
}

#[test]
fn only_the_gateway_is_reachable_from_outside() {
    let resources = resources();
    let ingresses: Vec<&Resource> = of_kind(&resources, "Ingress").collect();
    assert_eq!(ingresses.len(), 1, "one Ingress");
    let spec = &ingresses[0].value["spec"];
    assert!(
        !sequence(&spec["tls"]).is_empty(),
        "TLS ends at the Ingress"
    );
    let mut backends = BTreeSet::new();
    for rule in sequence(&spec["rules"]) {
        for path in sequence(&rule["http"]["paths"]) {
            backends.insert(
                path["backend"]["service"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    assert!(
        spec["defaultBackend"].is_null(),
        "no default backend beside the rules"
    );
    assert_eq!(backends, BTreeSet::from(["gateway".to_owned()]));
    for service in of_kind(&resources, "Service") {
        assert!(
            matches!(
                service.value["spec"]["type"].as_str(),
                None | Some("ClusterIP")
            ),
            "Service {} is exposed beyond the cluster",
            service.name()
        );
    }
}

#[test]
fn the_migration_job_runs_stack_migrate_as_docker_compose_does() {
    let resources = resources();
    let jobs: Vec<&Resource> = of_kind(&resources, "Job").collect();
    assert_eq!(jobs.len(), 1, "one Job");
    let job = &jobs[0].value;
    let compose = compose();
    let migrate = &compose["services"]["migrate"];
    let containers = containers(job);
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    assert_eq!(strings(&container["command"]), strings(&migrate["command"]));
    assert_eq!(strings(&container["command"]), vec!["stack", "migrate"]);
    let variables = environment(&resources, container);
    let wanted: BTreeSet<String> = migrate["environment"]
        .as_mapping()
        .expect("compose migrate environment")
        .keys()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect();
    let given: BTreeSet<String> = variables.keys().cloned().collect();
    assert_eq!(given, wanted, "the variables docker compose gives migrate");
    assert!(matches!(
        pod_spec(job)["restartPolicy"].as_str(),
        Some("Never" | "OnFailure")
    ));
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert!(strings(&security["capabilities"]["drop"]).contains(&"ALL".to_owned()));
    assert_eq!(
        pod_spec(job)["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );
}

#[test]
fn the_nats_chart_values_agree_with_deploy_nats_and_the_services() {
    let resources = resources();
    let values = yaml_file("deploy/kubernetes/helm/nats-values.yaml");
    let config = &values["config"];
    assert_eq!(config["cluster"]["enabled"].as_bool(), Some(true));
    let nodes = config["cluster"]["replicas"]
        .as_u64()
        .expect("cluster.replicas");
    assert_eq!(nodes, 3, "three NATS nodes");
    assert_eq!(config["jetstream"]["enabled"].as_bool(), Some(true));
    assert!(
        config["merge"]
            .as_mapping()
            .expect("config.merge")
            .iter()
            .any(|(k, v)| k.as_str().is_some_and(|k| k.ends_with("$include"))
                && v.as_str() == Some("auth.conf")),
        "nats.conf includes auth.conf"
    );
    // auth.conf is deploy/nats/nats-server.conf itself, as the README's helm command gives it.
    let readme = std::fs::read_to_string(root().join(KUBERNETES_README)).expect(KUBERNETES_README);
    assert!(
        readme
            .contains(r"--set-file 'configMap.merge.data.auth\.conf=deploy/nats/nats-server.conf'"),
        "{KUBERNETES_README}: the helm command that gives the chart deploy/nats/nats-server.conf"
    );
    // The same minor version of nats-server as docker compose.
    let compose = compose();
    let compose_image = compose["services"]["nats"]["image"]
        .as_str()
        .unwrap_or_default();
    let compose_minor = compose_image
        .strip_prefix("nats:")
        .and_then(|tag| tag.split('-').next())
        .unwrap_or_else(|| panic!("compose nats image {compose_image}"));
    let tag = values["container"]["image"]["tag"]
        .as_str()
        .unwrap_or_default();
    assert!(
        tag.starts_with(&format!("{compose_minor}.")),
        "nats image tag {tag}: docker compose runs {compose_image}"
    );

    // Every password variable nats-server.conf reads is given, from a Secret.
    let conf = std::fs::read_to_string(root().join("deploy/nats/nats-server.conf")).unwrap();
    let variables: BTreeSet<String> = conf
        .split("password: $")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect::<String>()
        })
        .collect();
    assert_eq!(variables.len(), 3, "{variables:?}");
    let env = &values["container"]["env"];
    let reference = |variable: &str| -> (String, String) {
        let reference = &env[variable]["valueFrom"]["secretKeyRef"];
        (
            reference["name"]
                .as_str()
                .unwrap_or_else(|| panic!("{variable}: no secretKeyRef"))
                .to_owned(),
            reference["key"].as_str().unwrap_or_default().to_owned(),
        )
    };
    for variable in &variables {
        let (secret, key) = reference(variable.as_str());
        assert!(!secret.is_empty() && !key.is_empty(), "{variable}");
    }

    // billing and notifications log in as their users, with the passwords the server has, to every node.
    for service in ["billing", "notifications"] {
        let variables_of = environment(
            &resources,
            &container(find(&resources, "Deployment", service), service),
        );
        assert_eq!(
            literal(&variables_of, "NATS_USER").as_deref(),
            Some(service)
        );
        assert!(
            conf.contains(&format!("user: \"{service}\"")),
            "deploy/nats has the user {service}"
        );
        let password_variable = format!("NATS_{}_PASSWORD", service.to_uppercase());
        let server_side = reference(password_variable.as_str());
        assert_eq!(
            variables_of.get("NATS_PASSWORD"),
            Some(&Source::Secret(server_side.0, server_side.1)),
            "{service}: NATS_PASSWORD is the password nats-server is given"
        );
        assert_eq!(
            literal(&variables_of, "NATS_STREAM_REPLICAS"),
            Some(nodes.to_string()),
            "{service}: the stream on every node"
        );
        let url = literal(&variables_of, "NATS_URL").unwrap_or_default();
        let seeds: Vec<&str> = url.split(',').collect();
        let wanted: Vec<String> = (0..nodes)
            .map(|node| format!("nats://nats-{node}.nats-headless:4222"))
            .collect();
        assert_eq!(seeds, wanted, "{service}: every node a seed");
    }
}

#[test]
fn the_postgresql_cluster_values_pin_postgresql_16_as_docker_compose_runs() {
    let values = yaml_file("deploy/kubernetes/helm/postgres-values.yaml");
    let cluster = &values["cluster"];
    assert_eq!(cluster["instances"].as_u64(), Some(3));
    let compose = compose();
    let compose_image = compose["services"]["postgres"]["image"]
        .as_str()
        .unwrap_or_default();
    let major = compose_image
        .strip_prefix("postgres:")
        .and_then(|tag| tag.split('-').next())
        .unwrap_or_else(|| panic!("compose postgres image {compose_image}"));
    let image = cluster["imageName"].as_str().unwrap_or_default();
    let tag = image
        .rsplit_once(':')
        .map(|(_, tag)| tag)
        .unwrap_or_default();
    let version = tag.split('-').next().unwrap_or_default();
    let parts: Vec<&str> = version.split('.').collect();
    assert!(
        parts.len() == 2 && parts[0] == major && parts[1].chars().all(|c| c.is_ascii_digit()),
        "an exact PostgreSQL {major} image: {image}"
    );
    let superuser = cluster["superuserSecret"].as_str().unwrap_or_default();
    let readme = std::fs::read_to_string(root().join(KUBERNETES_README)).expect(KUBERNETES_README);
    assert!(
        !superuser.is_empty() && readme.contains(superuser),
        "the superuser's Secret {superuser:?} is made as the README says"
    );
    let primary = format!(
        "{}-rw",
        values["fullnameOverride"].as_str().unwrap_or_default()
    );
    assert!(
        readme.contains(&format!("@{primary}:5432/")),
        "the services' URLs name the primary's Service {primary}"
    );
}

#[test]
fn kustomizations_list_exactly_the_files_there_are() {
    let kubernetes = root().join(KUBERNETES_DIR);
    let kustomizations: Vec<PathBuf> = yaml_files(&kubernetes)
        .into_iter()
        .filter(|path| is_kustomization(path))
        .collect();
    assert!(
        kustomizations.contains(&kubernetes.join("base/kustomization.yaml")),
        "base/kustomization.yaml"
    );
    for kustomization in &kustomizations {
        let file = relative(kustomization);
        let dir = kustomization.parent().expect("a folder");
        let value = yaml_file(&file);
        assert!(
            matches!(value["kind"].as_str(), Some("Kustomization" | "Component")),
            "{file}: kind"
        );
        let mut listed: Vec<String> = strings(&value["resources"]);
        listed.extend(strings(&value["components"]));
        listed.extend(strings(&value["patchesStrategicMerge"]));
        listed.extend(
            sequence(&value["patches"])
                .iter()
                .filter_map(|patch| patch["path"].as_str().map(str::to_owned)),
        );
        assert!(!listed.is_empty(), "{file} lists nothing");
        // Everything listed exists: a file, or a folder with a kustomization of its own.
        for entry in &listed {
            let path = dir.join(entry);
            assert!(
                path.is_file() || (path.is_dir() && path.join("kustomization.yaml").is_file()),
                "{file} lists {entry}, which does not exist"
            );
        }
        // Every manifest beside it is listed.
        for sibling in std::fs::read_dir(dir).unwrap().flatten() {
            let path = sibling.path();
            let name = sibling.file_name().to_string_lossy().into_owned();
            if path.is_file()
                && (name.ends_with(".yaml") || name.ends_with(".yml"))
                && !is_kustomization(&path)
            {
                assert!(
                    listed.contains(&name),
                    "{} is not listed in {file}",
                    relative(&path)
                );
            }
        }
    }
    // Every manifest has a kustomization beside it, so none is left out of every build.
    for manifest in manifest_files() {
        let dir = manifest.parent().expect("a folder");
        assert!(
            dir.join("kustomization.yaml").is_file(),
            "{} has no kustomization.yaml beside it",
            relative(&manifest)
        );
    }
    // Everything in the one namespace the base makes.
    let base = yaml_file(&format!("{KUBERNETES_DIR}/base/kustomization.yaml"));
    assert_eq!(base["namespace"].as_str(), Some(NAMESPACE));
    let resources = resources();
    find(&resources, "Namespace", NAMESPACE);
    for resource in &resources {
        let namespace = resource.value["metadata"]["namespace"].as_str();
        assert!(
            namespace.is_none() || namespace == Some(NAMESPACE),
            "{} {} is in namespace {namespace:?}",
            resource.kind(),
            resource.name()
        );
    }
}
