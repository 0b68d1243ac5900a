//! What the deployment files (docker-compose.yml, the Kubernetes manifests) are checked against: the Rust
//! source each binary is built from, and whether that code reads a given environment variable.

use std::path::Path;

/// The Rust source of a binary (its own crate, and the telemetry crate every service uses): `stack` for the
/// one-shot migration step, else a service's name.
pub fn source_text(binary: &str) -> String {
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
    match binary {
        "stack" => walk(&root.join("src"), &mut text),
        service => walk(&root.join("services").join(service).join("src"), &mut text),
    }
    walk(&root.join("shared/telemetry/src"), &mut text);
    text
}

/// Whether `code` reads the environment variable `key`: through the configuration helpers, `std::env::var`
/// or clap's `env = ...`. Documentation that merely names it does not count.
pub fn reads_variable(code: &str, key: &str) -> bool {
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
/// the telemetry crate's log filter (`RUST_LOG`, read by `setup::log_directives`).
pub const LIBRARY_VARIABLES: &[&str] = &[
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
