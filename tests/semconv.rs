//! Semantic conventions checked by a machine, on the spans that reach the collector.
//!
//! The conventions' published registry for the version tracehop targets (1.42.0) is read from two
//! packages generated from it, never written here from memory:
//! - the attribute **types**: the `opentelemetry-semantic-conventions` crate this workspace depends on
//!   (0.32.1, `SCHEMA_URL` 1.42.0); its generator writes every example as a typed literal (`200`,
//!   `"GET"`, `true`, `[...]`), which gives each attribute's type;
//! - the **allowed values** of enum attributes (`messaging.operation.type`, `db.system.name`, ...):
//!   `@opentelemetry/semantic-conventions` 1.42.0 from npm (`tools/semconv`, installed by `./dev test`).
//!
//! The requirement levels per span kind are not in either package; [`REQUIRED`] is taken from the 1.42.0
//! pages on HTTP, database and messaging spans. What tracehop does differently is [`CUSTOM`] and
//! [`CUSTOM_VALUES`], and each entry must be named in the README's "where we deviate" list.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::TestStack;
use serde_json::{Value, json};
use tracehop::trace_view::{SpanView, TraceView};

/// The semantic conventions version tracehop targets (README, "Semantic conventions").
const VERSION: &str = "1.42.0";

/// Attributes (or prefixes ending in `.`) of tracehop's own: not in the registry, each a README deviation.
const CUSTOM: &[&str] = &[
    "actor.",
    "billing.",
    "stripe.",
    "order.",
    "session.valid",
    "session.cached",
    "notification.duplicate",
    "mail.transport",
    "outbox.late",
    "retention.deleted",
    "messaging.nats.",
    "db.client.connection.wait_us",
    "db.client.connection.pool.connections",
    "db.client.connection.pool.idle",
];

/// Values outside an enum's registered list, each a README deviation.
const CUSTOM_VALUES: &[(&str, &str)] = &[("messaging.system", "nats")];

/// Tags the collector adds as Jaeger does (not exported by the services): not checked.
const COLLECTOR_TAGS: &[&str] = &[
    "span.kind",
    "otel.status_code",
    "otel.status_description",
    "error",
    "w3c.tracestate",
];

/// Required (or conditionally required, where the condition holds for tracehop) attributes per span kind,
/// from the 1.42.0 pages "HTTP spans", "Database client spans" and "Messaging spans".
const REQUIRED: &[(SpanClass, &[&str])] = &[
    (
        SpanClass::HttpServer,
        &[
            "http.request.method",
            "url.path",
            "url.scheme",
            "http.route",
            "http.response.status_code",
            "server.port",
            "server.address",
        ],
    ),
    (
        SpanClass::HttpClient,
        &[
            "http.request.method",
            "url.full",
            "server.address",
            "server.port",
        ],
    ),
    (
        SpanClass::Database,
        &[
            "db.system.name",
            "db.namespace",
            "db.operation.name",
            "db.query.text",
        ],
    ),
    (
        SpanClass::Messaging,
        &[
            "messaging.system",
            "messaging.destination.name",
            "messaging.operation.name",
            "messaging.operation.type",
        ],
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpanClass {
    HttpServer,
    HttpClient,
    Database,
    Messaging,
    Internal,
}

fn class(span: &SpanView) -> SpanClass {
    let has = |key: &str| span.tags.contains_key(key);
    match span.kind().as_str() {
        "server" if has("http.request.method") => SpanClass::HttpServer,
        "client" if has("http.request.method") => SpanClass::HttpClient,
        "client" if has("db.system.name") => SpanClass::Database,
        "producer" | "consumer" => SpanClass::Messaging,
        _ => SpanClass::Internal,
    }
}

/// An attribute type as the registry names it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AttributeType {
    String,
    Int,
    Double,
    Boolean,
    Array(Box<AttributeType>),
}

struct Registry {
    types: HashMap<String, AttributeType>,
    /// Allowed values of enum attributes (deprecated values left out), as JSON values.
    values: HashMap<String, Vec<Value>>,
}

impl Registry {
    fn load() -> Registry {
        let crate_dir = semconv_crate_dir();
        let lib = std::fs::read_to_string(crate_dir.join("src/lib.rs")).unwrap();
        assert!(
            lib.contains(&format!("opentelemetry.io/schemas/{VERSION}\"")),
            "opentelemetry-semantic-conventions does not target {VERSION}"
        );
        let attributes = std::fs::read_to_string(crate_dir.join("src/attribute.rs")).unwrap();
        let mut types = types_from_examples(&attributes);

        let npm = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tools/semconv/node_modules/@opentelemetry/semantic-conventions");
        let package: Value = serde_json::from_str(
            &std::fs::read_to_string(npm.join("package.json")).unwrap_or_else(|_| {
                panic!(
                    "{} missing: run `npm ci --prefix tools/semconv` (./dev test does)",
                    npm.display()
                )
            }),
        )
        .unwrap();
        assert_eq!(package["version"], VERSION, "npm registry package version");
        let mut values: HashMap<String, Vec<Value>> = HashMap::new();
        for file in ["stable_attributes.d.ts", "experimental_attributes.d.ts"] {
            let text = std::fs::read_to_string(npm.join("build/src").join(file)).unwrap();
            for (attribute, value) in enum_values(&text) {
                let kind = match value {
                    Value::String(_) => AttributeType::String,
                    _ => AttributeType::Int,
                };
                types.entry(attribute.clone()).or_insert(kind);
                values.entry(attribute).or_default().push(value);
            }
        }
        assert!(
            types.len() > 850,
            "registry read: {} attributes",
            types.len()
        );
        assert!(values.contains_key("messaging.operation.type"));
        Registry { types, values }
    }
}

/// The crate's source folder, as cargo resolved it for this workspace.
fn semconv_crate_dir() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(output.status.success(), "cargo metadata failed");
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    let manifest = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "opentelemetry-semantic-conventions")
        .expect("opentelemetry-semantic-conventions in the dependency graph")["manifest_path"]
        .as_str()
        .unwrap()
        .to_owned();
    PathBuf::from(manifest).parent().unwrap().to_owned()
}

/// `name -> type` from the crate's generated constants: the first example of each attribute.
fn types_from_examples(source: &str) -> HashMap<String, AttributeType> {
    let mut types = HashMap::new();
    let mut docs: Vec<&str> = Vec::new();
    let mut lines = source.lines().peekable();
    while let Some(line) = lines.next() {
        let line = line.trim();
        if let Some(doc) = line.strip_prefix("///") {
            docs.push(doc.strip_prefix(' ').unwrap_or(doc));
            continue;
        }
        if line.starts_with("#[") {
            // An attribute may span lines (`#[deprecated(\n note = ..\n)]`): skip to its end.
            let mut attribute = line.to_owned();
            while !attribute.ends_with(']') {
                match lines.next() {
                    Some(next) => attribute = next.trim().to_owned(),
                    None => break,
                }
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("pub const ") {
            let mut declaration = rest.to_owned();
            while !declaration.ends_with(';') {
                match lines.next() {
                    Some(next) => declaration.push_str(next.trim()),
                    None => break,
                }
            }
            if let Some(name) = declaration.split('"').nth(1)
                && let Some(kind) = first_example_type(&docs)
            {
                types.insert(name.to_owned(), kind);
            }
        }
        docs.clear();
    }
    types
}

fn first_example_type(docs: &[&str]) -> Option<AttributeType> {
    let start = docs.iter().position(|line| *line == "# Examples")?;
    let mut example = String::new();
    for line in &docs[start + 1..] {
        if example.is_empty() {
            if let Some(rest) = line.strip_prefix("- `") {
                example.push_str(rest);
            }
        } else {
            example.push_str(line);
        }
        if !example.is_empty() && example.ends_with('`') {
            break;
        }
    }
    let literal = trailing_commas_removed(example.trim_end_matches('`'));
    let value: Value = serde_json::from_str(&literal).ok()?;
    value_type(&value)
}

fn trailing_commas_removed(text: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = text.chars().collect();
    for (i, c) in chars.iter().enumerate() {
        if *c == ',' && chars[i + 1..].iter().find(|c| !c.is_whitespace()) == Some(&']') {
            continue;
        }
        out.push(*c);
    }
    out
}

fn value_type(value: &Value) -> Option<AttributeType> {
    Some(match value {
        Value::String(_) => AttributeType::String,
        Value::Bool(_) => AttributeType::Boolean,
        Value::Number(n) if n.is_i64() || n.is_u64() => AttributeType::Int,
        Value::Number(_) => AttributeType::Double,
        Value::Array(items) => AttributeType::Array(Box::new(value_type(items.first()?)?)),
        _ => return None,
    })
}

/// `(attribute, value)` for every non-deprecated enum member in a `.d.ts` of the npm package.
fn enum_values(text: &str) -> Vec<(String, Value)> {
    let declarations: Vec<&str> = text.split("export declare const ").collect();
    let mut names: HashMap<&str, String> = HashMap::new();
    for declaration in &declarations[1..] {
        let declaration = declaration.split(';').next().unwrap_or_default();
        if let Some((constant, literal)) = declaration.split_once(": ")
            && constant.starts_with("ATTR_")
        {
            names.insert(constant, literal.trim_matches('"').to_owned());
        }
    }
    let mut values = Vec::new();
    for pair in declarations.windows(2) {
        let doc = pair[0].rsplit("/**").next().unwrap_or_default();
        let Some(link) = doc.split("Enum value ").nth(1) else {
            continue;
        };
        if doc.contains("@deprecated") {
            continue;
        }
        let Some(constant) = link
            .split("{@link ")
            .nth(1)
            .and_then(|rest| rest.split('}').next())
        else {
            continue;
        };
        let declaration = pair[1].split(';').next().unwrap_or_default();
        let Some((_, literal)) = declaration.split_once(": ") else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<Value>(literal.trim()) else {
            continue;
        };
        if let Some(name) = names.get(constant) {
            values.push((name.clone(), value));
        }
    }
    values
}

fn is_custom(key: &str) -> bool {
    CUSTOM.iter().any(|custom| {
        if custom.ends_with('.') {
            key.starts_with(custom)
        } else {
            key == *custom
        }
    })
}

/// Everything wrong with `attributes` against the registry (empty when conformant). `open` allows names the
/// registry does not define (a span event's log fields); those it defines are still checked.
fn attribute_violations(
    registry: &Registry,
    whose: &str,
    attributes: &HashMap<String, Value>,
    open: bool,
) -> Vec<String> {
    let mut violations = Vec::new();
    for (key, value) in attributes {
        if COLLECTOR_TAGS.contains(&key.as_str()) || key == "event" {
            continue;
        }
        if value.as_str().is_some_and(str::is_empty) {
            violations.push(format!("{whose}: {key} is empty (leave it out)"));
        }
        match registry.types.get(key) {
            Some(expected) => {
                let actual = value_type(value);
                if actual.as_ref() != Some(expected) {
                    violations.push(format!(
                        "{whose}: {key} = {value} is {actual:?}, the registry says {expected:?}"
                    ));
                }
                // An enum whose only registered member is `_OTHER` (`error.type`) is open by design: its
                // values are the instrumentation's own (a status code, an error kind).
                if let Some(allowed) = registry.values.get(key)
                    && allowed.iter().any(|v| v != "_OTHER")
                    && !allowed.contains(value)
                    && value != "_OTHER"
                    && !CUSTOM_VALUES
                        .iter()
                        .any(|(k, v)| k == key && value.as_str() == Some(v))
                {
                    violations.push(format!(
                        "{whose}: {key} = {value} is not one of {allowed:?}"
                    ));
                }
            }
            None if open || is_custom(key) => {}
            None => violations.push(format!(
                "{whose}: {key} is in neither the registry nor the documented deviations"
            )),
        }
    }
    violations
}

/// Everything wrong with the spans (and their resources) of one trace's raw Jaeger JSON.
fn violations(registry: &Registry, raw: &Value) -> Vec<String> {
    let trace = TraceView::from_jaeger_json(raw).unwrap();
    let mut found = Vec::new();
    for process in raw["data"][0]["processes"]
        .as_object()
        .into_iter()
        .flat_map(|p| p.values())
    {
        let resource = tag_map(&process["tags"]);
        found.extend(attribute_violations(registry, "resource", &resource, false));
    }
    for span in &trace.spans {
        let whose = format!("{} [{}]", span.name, span.service);
        found.extend(attribute_violations(registry, &whose, &span.tags, false));
        for event in &span.events {
            found.extend(attribute_violations(registry, &whose, event, true));
        }
        let class = class(span);
        for (kind, required) in REQUIRED {
            if *kind != class {
                continue;
            }
            for key in *required {
                if !span.tags.contains_key(*key) {
                    found.push(format!("{whose}: {class:?} span lacks {key}"));
                }
            }
        }
        let status = span
            .tags
            .get("http.response.status_code")
            .and_then(Value::as_i64);
        // `error.type` is conditionally required on HTTP, database and messaging spans that failed.
        let failed = match class {
            SpanClass::HttpServer => status.is_some_and(|s| s >= 500),
            SpanClass::HttpClient => status.is_none_or(|s| s >= 400),
            SpanClass::Database | SpanClass::Messaging => span.is_error(),
            SpanClass::Internal => false,
        };
        if failed && !span.tags.contains_key("error.type") {
            found.push(format!("{whose}: failed without error.type"));
        }
        let operation = span.tag("messaging.operation.type");
        match span.kind().as_str() {
            "producer" if operation.as_deref() != Some("send") => {
                found.push(format!("{whose}: a producer's operation type is send"))
            }
            "consumer" if operation.as_deref() != Some("process") => {
                found.push(format!("{whose}: a consumer's operation type is process"))
            }
            _ => {}
        }
    }
    found
}

fn tag_map(list: &Value) -> HashMap<String, Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| Some((kv["key"].as_str()?.to_owned(), kv["value"].clone())))
        .collect()
}

async fn raw_trace(test: &TestStack, trace_id: &str, ready: impl Fn(&TraceView) -> bool) -> Value {
    test.trace(trace_id, ready).await;
    reqwest::get(format!("{}/api/traces/{trace_id}", test.jaeger()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[test]
fn the_registry_is_read_from_the_published_packages() {
    let registry = Registry::load();
    let t = |name: &str| registry.types.get(name).cloned();
    assert_eq!(t("http.response.status_code"), Some(AttributeType::Int));
    assert_eq!(t("server.port"), Some(AttributeType::Int));
    assert_eq!(t("url.query"), Some(AttributeType::String));
    assert_eq!(t("network.protocol.version"), Some(AttributeType::String));
    assert_eq!(t("messaging.message.body.size"), Some(AttributeType::Int));
    assert_eq!(
        t("http.request.header"),
        Some(AttributeType::Array(Box::new(AttributeType::String)))
    );
    let v = |name: &str| registry.values.get(name).cloned().unwrap_or_default();
    assert!(v("messaging.operation.type").contains(&json!("process")));
    assert!(
        !v("messaging.operation.type").contains(&json!("deliver")),
        "deprecated values are not allowed"
    );
    assert!(v("db.system.name").contains(&json!("postgresql")));
    assert!(!v("messaging.system").contains(&json!("nats")));
    // The checker itself: a status code as text is caught.
    let mut attributes = HashMap::new();
    attributes.insert("http.response.status_code".to_owned(), json!("200"));
    assert_eq!(
        attribute_violations(&registry, "x", &attributes, false).len(),
        1
    );
}

#[test]
fn every_deviation_is_in_the_readme() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("### Semantic conventions, and where we deviate")
        .nth(1)
        .expect("README section")
        .split("\n## ")
        .next()
        .unwrap();
    assert!(section.contains(VERSION), "the README names the version");
    for custom in CUSTOM {
        let named = format!("`{}", custom.trim_end_matches('.'));
        assert!(section.contains(&named), "README deviations lack {custom}");
    }
    for (key, value) in CUSTOM_VALUES {
        assert!(
            section.contains(&format!("`{key} = \"{value}\"`")),
            "README deviations lack {key} = {value}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_spans_follow_the_semantic_conventions() {
    let registry = Registry::load();
    let test = TestStack::boot(&[
        ("NOTIFICATIONS_MAX_DELIVER", "2"),
        ("NOTIFICATIONS_BACKOFF_MS", "100"),
    ])
    .await;
    let customer = test.customer().await;
    let mut found = Vec::new();

    // A full checkout, e-mail included.
    let ok = customer.checkout("49.99", "usd", None).await.unwrap();
    assert_eq!(ok.status, 200, "{}", ok.body);
    let raw = raw_trace(&test, ok.body["traceId"].as_str().unwrap(), |t| {
        !t.named("POST /checkout").is_empty()
            && !t.named("notification.send_confirmation").is_empty()
            && t.spans
                .iter()
                .any(|s| s.name == "INSERT notifications" && s.service.contains("notification"))
    })
    .await;
    found.extend(violations(&registry, &raw));

    // A failed Stripe charge (every attempt answered 500): outcome unknown, 202 pending.
    test.stripe_faults(json!({"failNext": 3})).await;
    let failed = customer.checkout("12.00", "eur", None).await.unwrap();
    assert_eq!(failed.status, 202, "{}", failed.body);
    let raw = raw_trace(&test, failed.body["traceId"].as_str().unwrap(), |t| {
        t.named("POST /v1/charges").len() == 3 && !t.named("POST /checkout").is_empty()
    })
    .await;
    found.extend(violations(&registry, &raw));

    // A dead-lettered e-mail.
    reqwest::Client::new()
        .post(format!("{}/_admin/faults", test.stack.notifications_url()))
        .json(&json!({"failNext": 100}))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    let lost = customer.checkout("5.00", "usd", None).await.unwrap();
    assert_eq!(lost.status, 200, "{}", lost.body);
    let raw = raw_trace(&test, lost.body["traceId"].as_str().unwrap(), |t| {
        !t.named("publish order.completed.dead").is_empty()
    })
    .await;
    found.extend(violations(&registry, &raw));

    // A bad request.
    let bad = customer
        .call(
            reqwest::Method::POST,
            "/checkout",
            Some(json!({"total": "-1", "currency": "usd"})),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(bad.status, 400, "{}", bad.body);
    let raw = raw_trace(&test, bad.body["traceId"].as_str().unwrap(), |t| {
        !t.named("POST /checkout").is_empty()
    })
    .await;
    found.extend(violations(&registry, &raw));

    found.sort();
    found.dedup();
    assert!(
        found.is_empty(),
        "{} violations:\n{}",
        found.len(),
        found.join("\n")
    );
}
