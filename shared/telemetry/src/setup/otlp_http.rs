//! OTLP/HTTP with protobuf bodies, for the span spool's export thread: it sends the requests
//! [`super::spool`] writes straight from its records, so a span is never rebuilt to be exported.
//!
//! It reads the standard exporter environment as `opentelemetry-otlp`'s HTTP exporter does (the batch
//! processor's path still uses that one, and a dead process's spool is adopted through it):
//!
//! | variable | effect |
//! | --- | --- |
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | the URL requests go to, as given |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | else this base URL with `/v1/traces` appended; else `http://localhost:4318/v1/traces` |
//! | `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TRACES_HEADERS` | extra headers, `key=value,...` (values percent-decoded; the traces variable wins for a key both name) |
//! | `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`, else `OTEL_EXPORTER_OTLP_TIMEOUT` | milliseconds a request may take (default 10 000) |
//!
//! Compression is not offered, by either exporter: `opentelemetry-otlp` is built without it, and refuses to
//! start when `OTEL_EXPORTER_OTLP_COMPRESSION` asks for it.

use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, USER_AGENT};

/// The default when no endpoint variable is set (the specification's).
const DEFAULT_ENDPOINT: &str = "http://localhost:4318/v1/traces";
/// The default request timeout (the specification's).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the OTLP/HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("could not build the OTLP/HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("building the OTLP/HTTP client panicked")]
    Panicked,
}

/// A blocking OTLP/HTTP client for trace export requests. Used on the spool's export thread only.
#[derive(Debug, Clone)]
pub(crate) struct OtlpHttp {
    client: reqwest::blocking::Client,
    endpoint: String,
}

impl OtlpHttp {
    /// The client the `OTEL_EXPORTER_OTLP_*` environment describes.
    pub(crate) fn from_env() -> Result<Self, BuildError> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .filter(|value| !value.trim().is_empty())
        };
        let endpoint = endpoint(
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").as_deref(),
            var("OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
        );
        let mut headers = HeaderMap::new();
        for variable in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(list) = var(variable) {
                for (name, value) in parse_headers(&list) {
                    headers.insert(name, value);
                }
            }
        }
        let timeout = [
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ]
        .iter()
        .find_map(|name| var(name)?.trim().parse().ok())
        .map_or(DEFAULT_TIMEOUT, Duration::from_millis);
        Self::build(endpoint, headers, timeout)
    }

    /// A client for `endpoint` (the full URL, `.../v1/traces`), with the default timeout: for tests and
    /// benchmarks that start their own receiver.
    pub(crate) fn to(endpoint: &str) -> Result<Self, BuildError> {
        Self::build(endpoint.to_owned(), HeaderMap::new(), DEFAULT_TIMEOUT)
    }

    fn build(
        endpoint: String,
        mut headers: HeaderMap,
        timeout: Duration,
    ) -> Result<Self, BuildError> {
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("tracehop-span-spool/", env!("CARGO_PKG_VERSION"))),
        );
        crate::http::client::install_crypto_provider();
        // Built on a thread of its own: building waits for the client's runtime thread, which a blocking
        // client may not do from inside an async runtime (the services call `init` from theirs).
        let client = std::thread::spawn(move || {
            reqwest::blocking::Client::builder()
                .default_headers(headers)
                .timeout(timeout)
                .build()
        })
        .join()
        .map_err(|_| BuildError::Panicked)??;
        Ok(Self { client, endpoint })
    }

    /// Sends one encoded `ExportTraceServiceRequest`. Err with what went wrong when the collector did not
    /// take it (a non-2xx answer, a timeout, no connection).
    pub(crate) fn send(&self, body: Vec<u8>) -> Result<(), String> {
        let response = self
            .client
            .post(&self.endpoint)
            .body(body)
            .send()
            .map_err(|error| error.to_string())?;
        let status = response.status();
        // Read to the end, so the connection can carry the next request; an answer is a few bytes (a
        // partial success at most), and no more than 64 KiB of it is read.
        let _ = std::io::copy(
            &mut std::io::Read::take(response, 64 * 1024),
            &mut std::io::sink(),
        );
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the collector answered {status}"))
        }
    }
}

/// The URL to post to: the traces endpoint as given, else the base endpoint with `/v1/traces` appended (one
/// slash between them), else the default.
fn endpoint(traces: Option<&str>, base: Option<&str>) -> String {
    match (traces, base) {
        (Some(traces), _) => traces.trim().to_owned(),
        (None, Some(base)) => format!("{}/v1/traces", base.trim().trim_end_matches('/')),
        (None, None) => DEFAULT_ENDPOINT.to_owned(),
    }
}

/// `key=value,key2=value2`, values percent-decoded and both sides trimmed. An entry that is not a valid
/// header is left out.
fn parse_headers(list: &str) -> Vec<(HeaderName, HeaderValue)> {
    list.split(',')
        .filter_map(|entry| {
            let (name, value) = entry.split_once('=')?;
            let name = HeaderName::from_bytes(name.trim().as_bytes()).ok()?;
            let value = HeaderValue::from_bytes(&percent_decode(value.trim())).ok()?;
            Some((name, value))
        })
        .collect()
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let hex = |offset: usize| {
            bytes
                .get(at + offset)
                .and_then(|digit| char::from(*digit).to_digit(16))
        };
        match (bytes[at], hex(1), hex(2)) {
            (b'%', Some(high), Some(low)) => {
                decoded.push((high * 16 + low) as u8);
                at += 3;
            }
            (byte, _, _) => {
                decoded.push(byte);
                at += 1;
            }
        }
    }
    decoded
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_client_is_built_from_inside_an_async_runtime_as_the_services_build_it() {
        // A blocking client built on the runtime's own thread panics in debug builds (the services call
        // `init` from their async `main`).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let client = runtime.block_on(async { OtlpHttp::to("http://127.0.0.1:9/v1/traces") });
        assert!(client.is_ok());
        // And it is usable (and dropped) off the runtime, as on the spool's export thread.
        assert!(client.unwrap().send(Vec::new()).is_err());
    }

    #[test]
    fn the_endpoint_is_the_traces_one_as_given_else_the_base_one_with_the_traces_path() {
        assert_eq!(
            endpoint(Some("http://c:4318/custom"), Some("http://other:4318")),
            "http://c:4318/custom"
        );
        assert_eq!(
            endpoint(None, Some("http://c:4318")),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            endpoint(None, Some("http://c:4318/prefix/")),
            "http://c:4318/prefix/v1/traces"
        );
        assert_eq!(endpoint(None, None), "http://localhost:4318/v1/traces");
    }

    #[test]
    fn headers_are_parsed_trimmed_and_percent_decoded_and_bad_entries_left_out() {
        let headers = parse_headers(" api-key = secret%20value ,bad header=x,novalue, x-b=1%2C2 ");
        let pairs: Vec<(String, String)> = headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    value.to_str().unwrap_or("?").to_owned(),
                )
            })
            .collect();
        assert_eq!(
            pairs,
            [
                ("api-key".to_owned(), "secret value".to_owned()),
                ("x-b".to_owned(), "1,2".to_owned())
            ]
        );
        assert_eq!(percent_decode("100%"), b"100%");
        assert_eq!(percent_decode("%zz%41"), b"%zzA");
    }
}
