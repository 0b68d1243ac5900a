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
//! A collector that answers 2xx with a partial success (`rejected_spans`, `error_message`) has lost those
//! spans: they are counted as failed, with its message as the reason, and not sent again (OTLP forbids
//! retrying a partial success). One that refuses nothing but carries a message is OTLP's warning: counted
//! (`export_warnings`) and logged the first time and every 1 000th. `opentelemetry-otlp`'s gRPC exporter only logs a partial success (a warning of its own diagnostics), so on
//! the gRPC path such spans still count as exported.
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

    /// Sends one encoded `ExportTraceServiceRequest`. Ok with what the collector refused of a request it
    /// answered 2xx (its partial success); Err with what went wrong when it did not take the request (a
    /// non-2xx answer, a timeout, no connection).
    pub(crate) fn send(&self, body: Vec<u8>) -> Result<PartialSuccess, String> {
        let response = self
            .client
            .post(&self.endpoint)
            .body(body)
            .send()
            .map_err(|error| error.to_string())?;
        let status = response.status();
        // Read to the end, so the connection can carry the next request; an answer is a few bytes (a
        // partial success at most), and no more than 64 KiB of it is read.
        let mut answer = Vec::new();
        let _ = std::io::copy(&mut std::io::Read::take(response, 64 * 1024), &mut answer);
        if status.is_success() {
            Ok(PartialSuccess::decode(&answer))
        } else {
            Err(format!("the collector answered {status}"))
        }
    }
}

/// The `partial_success` of an `ExportTraceServiceResponse`: the spans a collector refused although it
/// answered 2xx, and why (OTLP: such a request is not to be retried, and the refused spans are lost).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct PartialSuccess {
    pub(crate) rejected_spans: u64,
    pub(crate) error_message: String,
}

impl PartialSuccess {
    /// Reads an `ExportTraceServiceResponse` (`partial_success = 1`, in it `rejected_spans = 1` and
    /// `error_message = 2`). An empty answer, or one that is not such a message, is a full success, as
    /// `opentelemetry-otlp` takes it.
    fn decode(answer: &[u8]) -> Self {
        let mut outcome = Self::default();
        let _ = each_field(answer, |field, value| {
            if let (1, Field::Bytes(partial)) = (field, value) {
                each_field(partial, |field, value| {
                    match (field, value) {
                        // An int64: a negative count is nonsense, and counts nothing.
                        (1, Field::Varint(count)) => {
                            outcome.rejected_spans = u64::try_from(count as i64).unwrap_or(0);
                        }
                        (2, Field::Bytes(text)) => {
                            outcome.error_message = String::from_utf8_lossy(text).into_owned();
                        }
                        _ => {}
                    }
                    Some(())
                })?;
            }
            Some(())
        });
        outcome
    }
}

/// A protobuf field's value, as far as [`each_field`] reads it.
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// Calls `each` with every field of the protobuf message in `bytes` (its number and value). None when the
/// bytes are not a message, or `each` gave up.
fn each_field<'a>(
    mut bytes: &'a [u8],
    mut each: impl FnMut(u64, Field<'a>) -> Option<()>,
) -> Option<()> {
    while !bytes.is_empty() {
        let key = varint(&mut bytes)?;
        let value = match key & 7 {
            0 => Field::Varint(varint(&mut bytes)?),
            1 | 5 => {
                let width = if key & 7 == 1 { 8 } else { 4 };
                bytes = bytes.get(width..)?;
                Field::Fixed
            }
            2 => {
                let length = usize::try_from(varint(&mut bytes)?).ok()?;
                let (content, rest) = (bytes.get(..length)?, bytes.get(length..)?);
                bytes = rest;
                Field::Bytes(content)
            }
            _ => return None,
        };
        each(key >> 3, value)?;
    }
    Some(())
}

/// Takes one base-128 varint off the front of `bytes`.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
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
    fn a_partial_success_is_read_and_anything_else_is_a_full_success() {
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTracePartialSuccess, ExportTraceServiceResponse,
        };
        use prost::Message;
        let answer = |rejected_spans: i64, error_message: &str| {
            ExportTraceServiceResponse {
                partial_success: Some(ExportTracePartialSuccess {
                    rejected_spans,
                    error_message: error_message.to_owned(),
                }),
            }
            .encode_to_vec()
        };
        assert_eq!(
            PartialSuccess::decode(&answer(300, "too many attributes")),
            PartialSuccess {
                rejected_spans: 300,
                error_message: "too many attributes".to_owned()
            }
        );
        // A warning: nothing refused, a message.
        assert_eq!(
            PartialSuccess::decode(&answer(0, "slow down")).error_message,
            "slow down"
        );
        // Fields this reader does not know are skipped, wherever they are.
        let mut with_unknown = vec![0x10, 0x96, 0x01, 0x1d, 1, 2, 3, 4];
        with_unknown.extend(answer(7, ""));
        with_unknown.extend([0x19, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(PartialSuccess::decode(&with_unknown).rejected_spans, 7);
        for not_one in [
            &b""[..],
            b"{\"partialSuccess\":{}}",
            &[0x0a, 0x05, 0x08],
            &answer(-1, "negative")[..],
        ] {
            assert_eq!(PartialSuccess::decode(not_one).rejected_spans, 0);
        }
        // Cut at every byte: never a panic.
        let whole = answer(123_456, "reason");
        for end in 0..whole.len() {
            let _ = PartialSuccess::decode(&whole[..end]);
        }
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
