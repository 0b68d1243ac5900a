//! NATS JetStream with the trace in the message headers.
//!
//! - [`publish`]: a PRODUCER span `publish {subject}`; its context goes into the NATS headers (never the
//!   payload) and the event id into `Nats-Msg-Id`, so JetStream drops a re-published duplicate.
//! - [`process_span`]: a CONSUMER span `process {subject}`, by default a child of the producer span
//!   ([`ConsumerTrace::Parent`]): each message is processed on its own and the whole point is one checkout =
//!   one trace. [`ConsumerTrace::Link`] (`NATS_CONSUMER_TRACE=link`) makes each delivery start a trace of
//!   its own that links to the producer span instead, as the messaging conventions allow, for consumers
//!   whose work should not stretch the producer's trace; `stack why`, `stack where` and `stack trace`
//!   follow the link. Every delivery attempt is its own process span, with
//!   `messaging.nats.delivery_count`.
//!
//! `messaging.system` is `nats`, which is not (yet) a registered value of the semantic conventions.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use opentelemetry::Context;
use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::propagation::{
    NatsHeaderExtractor, NatsHeaderInjector, extract, inject, set_remote_parent,
};
use crate::setup::int_attribute;

/// Where NATS is, which stream to use and its limits: `NATS_URL` (default `nats://127.0.0.1:4222`; a
/// comma-separated list of a cluster's seeds),
/// `NATS_STREAM`, `NATS_STREAM_MAX_AGE_HOURS` (default 168) and `NATS_STREAM_MAX_BYTES` (default 1 GiB).
#[derive(Debug, Clone)]
pub struct NatsSettings {
    pub url: String,
    pub stream: String,
    pub max_age: Duration,
    pub max_bytes: i64,
    /// `NATS_USER` and `NATS_PASSWORD`: who this service is to the NATS server (none: anonymous).
    pub credentials: Option<NatsCredentials>,
    /// `NATS_CONSUMER_TRACE` (`parent`, the default, or `link`): where a consumer's spans go.
    pub consumer_trace: ConsumerTrace,
    /// `NATS_STREAM_REPLICAS` (default 1): copies of the stream in a NATS cluster (3 rides one node's loss).
    pub stream_replicas: usize,
}

/// Where a CONSUMER span goes: under the producer span, or first in a trace of its own that links to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConsumerTrace {
    /// A child of the producer span: one checkout, one trace.
    #[default]
    Parent,
    /// A new trace whose first span links to the producer span.
    Link,
}

impl std::str::FromStr for ConsumerTrace {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "parent" => Ok(Self::Parent),
            "link" => Ok(Self::Link),
            other => Err(format!("{other:?} is neither parent nor link")),
        }
    }
}

/// A NATS user and password. The password never prints.
#[derive(Clone)]
pub struct NatsCredentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for NatsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsCredentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl NatsCredentials {
    /// `NATS_USER` and `NATS_PASSWORD`, when both are set.
    pub fn from_env() -> Option<Self> {
        let user = std::env::var("NATS_USER")
            .ok()
            .filter(|v| !v.trim().is_empty())?;
        let password = std::env::var("NATS_PASSWORD")
            .ok()
            .filter(|v| !v.is_empty())?;
        Some(Self { user, password })
    }
}

impl NatsSettings {
    /// From the environment, with the deployment's default stream name.
    pub fn from_env(default_stream: &str) -> Result<Self, crate::config::ConfigError> {
        Ok(Self {
            url: crate::config::env_or("NATS_URL", "nats://127.0.0.1:4222"),
            stream: crate::config::env_or("NATS_STREAM", default_stream),
            max_age: Duration::from_secs(
                3600 * crate::config::env_parse("NATS_STREAM_MAX_AGE_HOURS", 168_u64)?,
            ),
            max_bytes: crate::config::env_parse("NATS_STREAM_MAX_BYTES", 1 << 30)?,
            credentials: NatsCredentials::from_env(),
            consumer_trace: crate::config::env_parse("NATS_CONSUMER_TRACE", ConsumerTrace::Parent)?,
            stream_replicas: crate::config::env_parse("NATS_STREAM_REPLICAS", 1)?,
        })
    }

    /// Connects as `client_name` and creates (or updates) the stream of `subjects`: the JetStream context
    /// to publish with, and the stream to consume from.
    pub async fn open_stream(
        &self,
        client_name: &str,
        subjects: &[&str],
    ) -> anyhow::Result<(jetstream::Context, stream::Stream)> {
        use anyhow::Context as _;
        let nats = connect(&self.url, client_name, self.credentials.as_ref())
            .await
            .with_context(|| format!("connecting to NATS at {}", self.url))?;
        let jetstream = jetstream::new(nats);
        let settings = StreamSettings {
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            replicas: self.stream_replicas,
            ..StreamSettings::new(&self.stream, subjects)
        };
        let stream = ensure_stream(&jetstream, &settings)
            .await
            .context("creating the JetStream stream")?;
        Ok((jetstream, stream))
    }
}

/// JetStream stream settings, explicit rather than server defaults.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Stream name.
    pub stream: String,
    /// The subjects it stores.
    pub subjects: Vec<String>,
    /// How long JetStream remembers a `Nats-Msg-Id`: longer than a publisher keeps retrying one message.
    pub duplicate_window: Duration,
    /// How long messages are kept.
    pub max_age: Duration,
    /// The most bytes kept. When full the stream refuses new messages (discard policy `new`) rather than
    /// dropping old ones: a refused publish stays in its publisher's outbox and is retried, while an old
    /// message dropped might not have been delivered yet.
    pub max_bytes: i64,
    /// Copies kept by a NATS cluster (1 on a single server).
    pub replicas: usize,
}

impl StreamSettings {
    /// A file-backed stream of `subjects`, remembering message ids for 30 minutes and keeping messages
    /// for 7 days, 1 GiB at most.
    pub fn new(stream: impl Into<String>, subjects: &[&str]) -> Self {
        Self {
            stream: stream.into(),
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            duplicate_window: Duration::from_secs(30 * 60),
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 1 << 30,
            replicas: 1,
        }
    }
}

/// The stream could not be created or read.
#[derive(Debug, thiserror::Error)]
#[error("JetStream stream set-up failed: {0}")]
pub struct SetupError(String);

/// Why a publish was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("JetStream publish failed: {0}")]
    Publish(#[from] jetstream::context::PublishError),
}

/// Connects to NATS as `credentials` (or anonymously), retrying in the background when the server goes away
/// (async-nats reconnects). With credentials, replies come to `_INBOX_<user>.>`, so a server can give each
/// user its own inbox subjects and no user can read another's replies.
pub async fn connect(
    url: &str,
    client_name: &str,
    credentials: Option<&NatsCredentials>,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(client_name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(3));
    if let Some(credentials) = credentials {
        options = options
            .user_and_password(credentials.user.clone(), credentials.password.clone())
            .custom_inbox_prefix(format!("_INBOX_{}", credentials.user));
    }
    // `nats://a:4222,nats://b:4222`: every seed of a cluster, so the client reconnects to another node
    // when one is lost.
    let seeds: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|seed| !seed.is_empty())
        .collect();
    options.connect(seeds.as_slice()).await
}

/// Creates the stream, or updates an existing one to these settings (file storage).
pub async fn ensure_stream(
    context: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<stream::Stream, SetupError> {
    let config = stream::Config {
        name: settings.stream.clone(),
        subjects: settings.subjects.clone(),
        storage: stream::StorageType::File,
        duplicate_window: settings.duplicate_window,
        max_age: settings.max_age,
        max_bytes: settings.max_bytes,
        discard: stream::DiscardPolicy::New,
        num_replicas: settings.replicas.max(1),
        ..Default::default()
    };
    // Create, or bring an existing stream to these settings (a reused store gets today's configuration).
    // JetStream that is not ready yet (a cluster still electing its leader, found when a service starts
    // beside a fresh three-node cluster on a busy machine) is waited for, up to `STREAM_SETUP_PATIENCE`:
    // exiting would only have the supervisor start the service again into the same wait.
    let deadline = tokio::time::Instant::now() + STREAM_SETUP_PATIENCE;
    let mut pause = Duration::from_millis(250);
    loop {
        let outcome = match context.create_or_update_stream(config.clone()).await {
            Ok(_) => {
                return context
                    .get_stream(&settings.stream)
                    .await
                    .map_err(|error| SetupError(error.to_string()));
            }
            Err(error) => error,
        };
        if !jetstream_not_ready(&outcome) || tokio::time::Instant::now() + pause >= deadline {
            return Err(SetupError(outcome.to_string()));
        }
        tracing::warn!(
            error = %outcome,
            retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
            "JetStream is not ready; the stream's set-up is tried again"
        );
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// How long [`ensure_stream`] waits for JetStream to be ready before it gives up.
pub const STREAM_SETUP_PATIENCE: Duration = Duration::from_secs(60);

/// Whether a stream set-up failed because JetStream was not ready (no answer in time, no JetStream yet, a
/// cluster without a leader or without enough peers), rather than because the request was wrong.
fn jetstream_not_ready(error: &jetstream::context::CreateStreamError) -> bool {
    use jetstream::ErrorCode;
    use jetstream::context::CreateStreamErrorKind as Kind;
    match error.kind() {
        Kind::TimedOut | Kind::JetStreamUnavailable => true,
        Kind::JetStream(error) => [
            ErrorCode::CLUSTER_NOT_AVAILABLE,
            ErrorCode::CLUSTER_NO_PEERS,
            ErrorCode::CLUSTER_INCOMPLETE,
            ErrorCode::CLUSTER_NOT_LEADER,
            ErrorCode::CLUSTER_NOT_ACTIVE,
        ]
        .contains(&error.error_code()),
        _ => false,
    }
}

/// Settings of a durable pull consumer.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub durable_name: String,
    /// The subject it consumes.
    pub filter_subject: String,
    /// How long JetStream waits for an ack before redelivering: above the slowest e-mail send. (No server
    /// back-off list is set: NATS would use its first step *instead of* this ack wait. Redelivery delays come
    /// from the consumer's negative acks.)
    pub ack_wait: Duration,
    /// Deliveries the server allows (a consumer that dead-letters does so on its own last attempt).
    pub max_deliver: i64,
}

impl ConsumerSettings {
    /// A consumer of `filter_subject` with a 30 s ack wait and 6 deliveries.
    pub fn new(durable_name: impl Into<String>, filter_subject: impl Into<String>) -> Self {
        Self {
            durable_name: durable_name.into(),
            filter_subject: filter_subject.into(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 6,
        }
    }
}

/// Creates the durable pull consumer, or updates an existing one to these settings.
pub async fn ensure_consumer(
    stream: &stream::Stream,
    settings: &ConsumerSettings,
) -> Result<consumer::PullConsumer, jetstream::stream::ConsumerError> {
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(settings.durable_name.clone()),
            filter_subject: settings.filter_subject.clone(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: settings.ack_wait,
            max_deliver: settings.max_deliver,
            max_ack_pending: 256,
            ..Default::default()
        })
        .await
}

/// Publishes `payload` to `subject` under a PRODUCER span that is a child of `parent`, waits for the
/// JetStream acknowledgement, and returns it. `message_id` becomes `Nats-Msg-Id` (deduplication); the trace
/// context is added to `headers`.
pub async fn publish(
    context: &jetstream::Context,
    subject: &str,
    message_id: &str,
    mut headers: async_nats::HeaderMap,
    payload: Bytes,
    parent: Context,
) -> Result<jetstream::publish::PublishAck, PublishError> {
    let span = publish_span(subject, message_id, payload.len());
    set_remote_parent(&span, parent.clone());
    // Without a tracer (a tool that exports nothing) the span has no context: the parent's still travels,
    // so the consumer stays in the trace.
    let carried = span.context();
    let carried = if carried.span().span_context().is_valid() {
        carried
    } else {
        parent
    };
    inject(&carried, &mut NatsHeaderInjector(&mut headers));
    headers.insert(async_nats::header::NATS_MESSAGE_ID, message_id);
    let outcome = async {
        let ack = context
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await?
            .await?;
        Ok::<_, jetstream::context::PublishError>(ack)
    }
    .instrument(span.clone())
    .await;
    match &outcome {
        Ok(ack) => {
            span.record(
                "messaging.nats.stream.sequence",
                int_attribute(ack.sequence),
            );
            span.record("messaging.nats.duplicate", ack.duplicate);
        }
        Err(error) => {
            span.record("otel.status_code", "ERROR");
            span.record("error.type", "publish_failed");
            span.in_scope(|| tracing::error!(error = %error, "publish failed"));
        }
    }
    Ok(outcome?)
}

/// The `Nats-Msg-Id` of a message, if it has one.
pub fn message_id(message: &jetstream::Message) -> Option<String> {
    header_message_id(message.headers.as_ref()).map(str::to_owned)
}

/// The `Nats-Msg-Id` among `headers`, if any.
fn header_message_id(headers: Option<&async_nats::HeaderMap>) -> Option<&str> {
    headers
        .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|value| value.as_str())
}

/// The PRODUCER span of one publish (messaging semantic conventions), named `publish {subject}`; the
/// acknowledgement's sequence is recorded on it later.
pub fn publish_span(subject: &str, message_id: &str, body_size: usize) -> tracing::Span {
    tracing::info_span!(
        "messaging.publish",
        otel.name = %format!("publish {subject}"),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "nats",
        messaging.destination.name = %subject,
        messaging.operation.name = "publish",
        messaging.operation.type = "send",
        messaging.message.id = %message_id,
        messaging.message.body.size = int_attribute(body_size),
        messaging.nats.stream.sequence = tracing::field::Empty,
        messaging.nats.duplicate = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// The CONSUMER span for one delivery of `message`, placed as `trace` says against the producer span found
/// in its headers.
pub fn process_span(message: &jetstream::Message, trace: ConsumerTrace) -> tracing::Span {
    let (delivery_count, stream_sequence) = message
        .info()
        .map(|info| (info.delivered, info.stream_sequence))
        .unwrap_or((0, 0));
    delivery_span(&Delivery {
        subject: message.subject.as_str(),
        headers: message.headers.as_ref(),
        body_size: message.payload.len(),
        delivery_count,
        stream_sequence,
        trace,
    })
}

/// What a CONSUMER span says about one delivery (the parts of a JetStream message it reads).
pub struct Delivery<'a> {
    pub subject: &'a str,
    pub headers: Option<&'a async_nats::HeaderMap>,
    pub body_size: usize,
    pub delivery_count: i64,
    pub stream_sequence: u64,
    /// Under the producer span, or linked to it.
    pub trace: ConsumerTrace,
}

/// The CONSUMER span for `delivery`, placed against the producer span found in its headers as
/// `delivery.trace` says.
pub fn delivery_span(delivery: &Delivery<'_>) -> tracing::Span {
    let subject = delivery.subject;
    let message_id = header_message_id(delivery.headers).unwrap_or_default();
    let span = tracing::info_span!(
        "messaging.process",
        otel.name = %format!("process {subject}"),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "nats",
        messaging.destination.name = %subject,
        messaging.operation.name = "process",
        messaging.operation.type = "process",
        messaging.message.id = %message_id,
        messaging.message.body.size = int_attribute(delivery.body_size),
        messaging.nats.delivery_count = delivery.delivery_count,
        messaging.nats.stream.sequence = int_attribute(delivery.stream_sequence),
        error.type = tracing::field::Empty,
    );
    if let Some(headers) = delivery.headers {
        let producer = extract(&NatsHeaderExtractor(headers));
        match delivery.trace {
            ConsumerTrace::Parent => set_remote_parent(&span, producer),
            ConsumerTrace::Link => {
                let producer = producer.span().span_context().clone();
                if producer.is_valid() {
                    span.add_link(producer);
                }
            }
        }
    }
    span
}
