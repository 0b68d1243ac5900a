//! `stack where <order-id | trace-id>`: everything known about one order, in the order it happened, and
//! one last line that answers the seed's question: was the e-mail sent, is it waiting, or was it lost?
//!
//! It reads three sources and says which it could not reach:
//! - **PostgreSQL**: the transaction (billing), the outbox event (billing; its id is the message's
//!   `Nats-Msg-Id`), the notification (notifications: attempts, last error code, the claim);
//! - **JetStream**: the message itself (found by its `Nats-Msg-Id` from the time it was published), the
//!   notifier's durable consumer (what it has delivered and acknowledged, how many wait, whether anyone is
//!   pulling), and the dead letter with its reason;
//! - **the trace** (any Jaeger query API, consumer traces joined through their span links): when the
//!   checkout answered, and each delivery (`process order.completed`, its delivery count and error).
//!
//! The verdict is the most advanced fact: sent beats dead-lettered beats delivered-but-unacknowledged
//! beats waiting in JetStream beats unpublished beats no charge.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tracehop_contracts::events::{
    NOTIFICATIONS_CONSUMER, ORDER_COMPLETED, ORDER_COMPLETED_DEAD_LETTER, ORDERS_STREAM,
    OrderCompleted,
};

use crate::trace_view::{SpanView, TraceView};

/// Where to look.
#[derive(Debug, Clone)]
pub struct Sources {
    /// PostgreSQL with read access to billing's and notifications' tables (the owner, or an operator).
    pub database_url: String,
    /// NATS as a user that may read the stream and the consumer's state (the operator).
    pub nats: Option<async_nats::Client>,
    pub stream: String,
    pub consumer: String,
    /// A Jaeger query API (the embedded collector or real Jaeger).
    pub jaeger: Option<String>,
}

impl Sources {
    pub fn new(database_url: &str, nats: Option<async_nats::Client>, jaeger: Option<&str>) -> Self {
        Self {
            database_url: database_url.to_owned(),
            nats,
            stream: ORDERS_STREAM.to_owned(),
            consumer: NOTIFICATIONS_CONSUMER.to_owned(),
            jaeger: jaeger.map(str::to_owned),
        }
    }
}

/// One thing that happened, or one fact, with its time when known.
#[derive(Debug, Clone)]
pub struct Event {
    pub at: Option<DateTime<Utc>>,
    pub what: String,
}

/// The answer: the timeline and the last line.
#[derive(Debug, Clone)]
pub struct Whereabouts {
    pub order_id: Option<uuid::Uuid>,
    pub trace_id: Option<String>,
    pub events: Vec<Event>,
    /// Sources that could not be read, and why.
    pub unavailable: Vec<String>,
    /// The last line.
    pub verdict: String,
}

#[derive(Debug, Clone)]
struct TransactionRow {
    id: uuid::Uuid,
    amount_minor: i64,
    currency: String,
    status: String,
    charge_id: Option<String>,
    trace_id: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
struct OutboxRow {
    id: uuid::Uuid,
    created_at: DateTime<Utc>,
    published_at: Option<DateTime<Utc>>,
    attempts: i32,
    last_error: Option<String>,
}

#[derive(Debug, Clone)]
struct NotificationRow {
    status: String,
    attempts: i32,
    last_error: Option<String>,
    sent_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    claimed_by: Option<String>,
    claimed_until: Option<DateTime<Utc>>,
}

#[derive(Debug, Default)]
struct Rows {
    transaction: Option<TransactionRow>,
    outbox: Option<OutboxRow>,
    notification: Option<NotificationRow>,
}

/// An order id (a UUID) or a trace id (32 hex digits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    Order(uuid::Uuid),
    Trace(String),
}

impl Subject {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        if text.len() == 32 && text.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(Self::Trace(text.to_ascii_lowercase()));
        }
        uuid::Uuid::parse_str(text).map(Self::Order).map_err(|_| {
            anyhow::anyhow!("{text:?} is neither an order id (UUID) nor a trace id (32 hex digits)")
        })
    }
}

fn read_rows(database_url: &str, subject: &Subject) -> anyhow::Result<Rows> {
    use diesel::prelude::*;
    use tracehop_contracts::schema::{notifications, outbox, transactions};
    let mut connection = PgConnection::establish(database_url)
        .with_context(|| format!("connecting to {}", redact(database_url)))?;
    type TransactionTuple = (
        uuid::Uuid,
        i64,
        String,
        String,
        Option<String>,
        String,
        DateTime<Utc>,
        DateTime<Utc>,
    );
    let columns = (
        transactions::id,
        transactions::amount_minor,
        transactions::currency,
        transactions::status,
        transactions::charge_id,
        transactions::trace_id,
        transactions::created_at,
        transactions::updated_at,
    );
    let found: Option<TransactionTuple> = match subject {
        Subject::Order(id) => transactions::table
            .find(*id)
            .select(columns)
            .first(&mut connection)
            .optional()?,
        Subject::Trace(trace) => transactions::table
            .filter(transactions::trace_id.eq(trace))
            .select(columns)
            .first(&mut connection)
            .optional()?,
    };
    let transaction = found.map(
        |(id, amount_minor, currency, status, charge_id, trace_id, created_at, updated_at)| {
            TransactionRow {
                id,
                amount_minor,
                currency,
                status,
                charge_id,
                trace_id,
                created_at,
                updated_at,
            }
        },
    );
    let order_id = match (&transaction, subject) {
        (Some(row), _) => row.id,
        (None, Subject::Order(id)) => *id,
        (None, Subject::Trace(_)) => return Ok(Rows::default()),
    };
    let outbox = outbox::table
        .find(OrderCompleted::event_id_of(order_id))
        .select((
            outbox::id,
            outbox::created_at,
            outbox::published_at,
            outbox::attempts,
            outbox::last_error,
        ))
        .first::<(
            uuid::Uuid,
            DateTime<Utc>,
            Option<DateTime<Utc>>,
            i32,
            Option<String>,
        )>(&mut connection)
        .optional()?
        .map(
            |(id, created_at, published_at, attempts, last_error)| OutboxRow {
                id,
                created_at,
                published_at,
                attempts,
                last_error,
            },
        );
    let notification = notifications::table
        .find(order_id)
        .select((
            notifications::status,
            notifications::attempts,
            notifications::last_error,
            notifications::sent_at,
            notifications::updated_at,
            notifications::claimed_by,
            notifications::claimed_until,
        ))
        .first::<(
            String,
            i32,
            Option<String>,
            Option<DateTime<Utc>>,
            DateTime<Utc>,
            Option<String>,
            Option<DateTime<Utc>>,
        )>(&mut connection)
        .optional()?
        .map(
            |(status, attempts, last_error, sent_at, updated_at, claimed_by, claimed_until)| {
                NotificationRow {
                    status,
                    attempts,
                    last_error,
                    sent_at,
                    updated_at,
                    claimed_by,
                    claimed_until,
                }
            },
        );
    Ok(Rows {
        transaction,
        outbox,
        notification,
    })
}

/// A database URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A message found in the stream.
#[derive(Debug, Clone)]
struct Stored {
    sequence: u64,
    published: DateTime<Utc>,
    reason: Option<String>,
}

/// What the notifier's consumer says.
#[derive(Debug, Clone)]
struct ConsumerState {
    delivered_sequence: u64,
    ack_floor: u64,
    last_ack: Option<DateTime<Utc>>,
    num_pending: u64,
    num_ack_pending: usize,
    num_waiting: usize,
}

fn to_chrono(time: time::OffsetDateTime) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(time.unix_timestamp_nanos() as i64)
}

fn to_time(time: DateTime<Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(
        time.timestamp_nanos_opt().unwrap_or_default(),
    ))
    .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Scans `subject` from `since` for the message whose `Nats-Msg-Id` is `message_id` (at most 20 000
/// messages or 10 s: a diagnostic must not read a whole stream).
async fn find_message(
    stream: &jetstream::stream::Stream,
    subject: &str,
    message_id: &str,
    since: DateTime<Utc>,
) -> anyhow::Result<Option<Stored>> {
    let reader = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: subject.to_owned(),
            deliver_policy: consumer::DeliverPolicy::ByStartTime {
                start_time: to_time(since),
            },
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut read = 0;
    while read < 20_000 && tokio::time::Instant::now() < deadline {
        let mut batch = reader
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        let mut in_batch = 0;
        while let Some(message) = batch.next().await {
            let Ok(message) = message else { break };
            in_batch += 1;
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .map(|v| v.as_str().to_owned());
            if id.as_deref() == Some(message_id) {
                let info = message.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                let reason = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Tracehop-Dead-Letter-Reason"))
                    .map(|v| v.as_str().to_owned());
                return Ok(Some(Stored {
                    sequence: info.stream_sequence,
                    published: to_chrono(info.published),
                    reason,
                }));
            }
        }
        read += in_batch;
        if in_batch == 0 {
            break; // the end of the stream
        }
    }
    Ok(None)
}

async fn consumer_state(
    stream: &jetstream::stream::Stream,
    name: &str,
) -> anyhow::Result<ConsumerState> {
    let mut consumer: consumer::PullConsumer = stream
        .get_consumer(name)
        .await
        .map_err(|error| anyhow::anyhow!("no consumer {name}: {error}"))?;
    let info = consumer.info().await?;
    Ok(ConsumerState {
        delivered_sequence: info.delivered.stream_sequence,
        ack_floor: info.ack_floor.stream_sequence,
        last_ack: info.ack_floor.last_active.map(to_chrono),
        num_pending: info.num_pending,
        num_ack_pending: info.num_ack_pending,
        num_waiting: info.num_waiting,
    })
}

fn clock(at: DateTime<Utc>) -> String {
    at.format("%H:%M:%S").to_string()
}

fn ordinal(n: i64) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

fn span_time(us: u64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us as i64)
}

fn ago(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    let secs = (now - then).num_seconds().max(0);
    format!("{secs} s")
}

/// Gathers everything about `subject` and decides the last line.
pub async fn locate(sources: &Sources, subject: &Subject) -> Whereabouts {
    let now = Utc::now();
    let mut unavailable = Vec::new();
    let mut events = Vec::new();

    let rows = {
        let url = sources.database_url.clone();
        let which = subject.clone();
        match tokio::task::spawn_blocking(move || read_rows(&url, &which)).await {
            Ok(Ok(rows)) => Some(rows),
            Ok(Err(error)) => {
                unavailable.push(format!("PostgreSQL: {error:#}"));
                None
            }
            Err(error) => {
                unavailable.push(format!("PostgreSQL: {error}"));
                None
            }
        }
    };
    let transaction = rows.as_ref().and_then(|r| r.transaction.clone());
    let order_id = transaction.as_ref().map(|t| t.id).or(match subject {
        Subject::Order(id) => Some(*id),
        Subject::Trace(_) => None,
    });
    let trace_id = transaction
        .as_ref()
        .map(|t| t.trace_id.clone())
        .or(match subject {
            Subject::Trace(id) => Some(id.clone()),
            Subject::Order(_) => None,
        });

    // The trace: the checkout's answer and every delivery.
    let mut trace: Option<TraceView> = None;
    if let (Some(jaeger), Some(id)) = (&sources.jaeger, &trace_id) {
        match TraceView::fetch_joined(jaeger, id).await {
            Ok(view) => trace = Some(view),
            Err(error) => unavailable.push(format!("trace {id}: {error:#}")),
        }
    }

    let Some(transaction) = transaction else {
        let verdict = match (subject, &rows) {
            (_, None) => "unknown: PostgreSQL could not be read".to_owned(),
            (Subject::Order(id), Some(_)) => {
                format!(
                    "unknown order: billing has no transaction {id} (never charged, or a mistyped id)"
                )
            }
            (Subject::Trace(id), Some(_)) => format!(
                "no order: trace {id} is not a checkout billing recorded{}",
                if trace.is_some() {
                    " (the trace exists: see stack why)"
                } else {
                    ""
                }
            ),
        };
        return Whereabouts {
            order_id,
            trace_id,
            events,
            unavailable,
            verdict,
        };
    };
    let rows = rows.unwrap_or_default();

    if let Some(trace) = &trace
        && let Some(root) = trace.roots().into_iter().min_by_key(|s| s.start_us)
    {
        let status = root
            .tag("http.response.status_code")
            .unwrap_or_else(|| "?".to_owned());
        events.push(Event {
            at: span_time(root.start_us),
            what: format!(
                "{} › {} answered {status} in {:.0} ms (trace {})",
                root.service,
                root.name,
                root.duration_us as f64 / 1e3,
                trace.trace_id
            ),
        });
    }
    events.push(Event {
        at: Some(transaction.created_at),
        what: format!(
            "transaction {}: {} {:.2} {}, charge {} (last change {})",
            transaction.id,
            transaction.status,
            transaction.amount_minor as f64 / 100.0,
            transaction.currency,
            transaction.charge_id.as_deref().unwrap_or("none"),
            clock(transaction.updated_at)
        ),
    });
    if let Some(outbox) = &rows.outbox {
        let published = match outbox.published_at {
            Some(at) => format!("published {}", clock(at)),
            None => format!(
                "NOT published yet ({} attempt(s){})",
                outbox.attempts,
                outbox
                    .last_error
                    .as_ref()
                    .map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            ),
        };
        events.push(Event {
            at: Some(outbox.created_at),
            what: format!(
                "outbox event {} (Nats-Msg-Id) written; {published}",
                outbox.id
            ),
        });
    }

    // JetStream: the message, the consumer, a dead letter.
    let mut stored: Option<Stored> = None;
    let mut dead: Option<Stored> = None;
    let mut consumer: Option<ConsumerState> = None;
    if let (Some(client), Some(outbox)) = (&sources.nats, &rows.outbox) {
        let context = jetstream::new(client.clone());
        match context.get_stream(&sources.stream).await {
            Ok(stream) => {
                let since =
                    outbox.published_at.unwrap_or(outbox.created_at) - chrono::Duration::seconds(2);
                let id = outbox.id.to_string();
                match find_message(&stream, ORDER_COMPLETED, &id, since).await {
                    Ok(found) => stored = found,
                    Err(error) => unavailable.push(format!("JetStream message: {error:#}")),
                }
                let dead_since = rows
                    .notification
                    .as_ref()
                    .map(|n| n.updated_at - chrono::Duration::seconds(60))
                    .unwrap_or(since);
                match find_message(
                    &stream,
                    ORDER_COMPLETED_DEAD_LETTER,
                    &format!("{id}-dead"),
                    dead_since.min(since),
                )
                .await
                {
                    Ok(found) => dead = found,
                    Err(error) => unavailable.push(format!("JetStream dead letters: {error:#}")),
                }
                match consumer_state(&stream, &sources.consumer).await {
                    Ok(state) => consumer = Some(state),
                    Err(error) => unavailable.push(format!("JetStream consumer: {error:#}")),
                }
            }
            Err(error) => unavailable.push(format!("JetStream stream {}: {error}", sources.stream)),
        }
    } else if sources.nats.is_none() {
        unavailable.push("JetStream: not connected".to_owned());
    }
    if let Some(message) = &stored {
        let state = match &consumer {
            Some(c) if message.sequence <= c.ack_floor => "acknowledged".to_owned(),
            Some(c) if message.sequence > c.delivered_sequence => {
                format!(
                    "not delivered yet ({} waiting for the consumer)",
                    c.num_pending
                )
            }
            Some(_) => "delivered, not acknowledged yet".to_owned(),
            None => "consumer state unknown".to_owned(),
        };
        events.push(Event {
            at: Some(message.published),
            what: format!(
                "JetStream {} sequence {} ({ORDER_COMPLETED}): {state}",
                sources.stream, message.sequence
            ),
        });
    }

    // Each delivery, from the trace.
    let deliveries: Vec<&SpanView> = trace
        .as_ref()
        .map(|t| {
            t.spans
                .iter()
                .filter(|s| {
                    s.kind() == "consumer" && s.name == format!("process {ORDER_COMPLETED}")
                })
                .collect()
        })
        .unwrap_or_default();
    for delivery in &deliveries {
        let count = delivery
            .tag("messaging.nats.delivery_count")
            .unwrap_or_else(|| "?".to_owned());
        let outcome = if delivery.is_error() {
            format!(
                "failed ({})",
                delivery
                    .tag("error.type")
                    .unwrap_or_else(|| "error".to_owned())
            )
        } else {
            "ok".to_owned()
        };
        events.push(Event {
            at: span_time(delivery.start_us),
            what: format!("delivery {count} to {}: {outcome}", delivery.service),
        });
    }
    if let Some(letter) = &dead {
        events.push(Event {
            at: Some(letter.published),
            what: format!(
                "dead letter {ORDER_COMPLETED_DEAD_LETTER} sequence {}: {}",
                letter.sequence,
                letter.reason.as_deref().unwrap_or("no reason given")
            ),
        });
    }
    if let Some(n) = &rows.notification {
        let mut what = format!("notification {}: {} attempt(s)", n.status, n.attempts);
        if let Some(error) = &n.last_error {
            let _ = write!(what, ", last error {error}");
        }
        if let (Some(by), Some(until)) = (&n.claimed_by, n.claimed_until)
            && until > now
        {
            let _ = write!(what, ", claimed by {by} until {}", clock(until));
        }
        if n.status == "sent" {
            let _ = write!(
                what,
                "; e-mail Message-ID <order-{}@tracehop>",
                transaction.id
            );
        }
        events.push(Event {
            at: Some(n.sent_at.unwrap_or(n.updated_at)),
            what,
        });
    }
    events.sort_by_key(|e| e.at);

    let verdict = verdict(
        now,
        &transaction,
        &rows,
        stored.as_ref(),
        dead.as_ref(),
        consumer.as_ref(),
        &deliveries,
    );
    Whereabouts {
        order_id: Some(transaction.id),
        trace_id: Some(transaction.trace_id.clone()),
        events,
        unavailable,
        verdict,
    }
}

fn verdict(
    now: DateTime<Utc>,
    transaction: &TransactionRow,
    rows: &Rows,
    stored: Option<&Stored>,
    dead: Option<&Stored>,
    consumer: Option<&ConsumerState>,
    deliveries: &[&SpanView],
) -> String {
    match transaction.status.as_str() {
        "charged" => {}
        "pending" => {
            return "no e-mail yet: the charge's outcome is pending; billing's reconciler settles it (the client retries with the same Idempotency-Key)".to_owned();
        }
        other => return format!("no e-mail: the charge is {other}"),
    }
    let notification = rows.notification.as_ref();
    if let Some(n) = notification.filter(|n| n.status == "sent") {
        // The delivery that sent it: the last successful one in the trace, else the attempt count.
        let delivery = deliveries
            .iter()
            .filter(|d| !d.is_error())
            .filter_map(|d| d.tag("messaging.nats.delivery_count")?.parse::<i64>().ok())
            .max()
            .unwrap_or(i64::from(n.attempts.max(1)));
        let at = n.sent_at.map(clock).unwrap_or_else(|| "?".to_owned());
        return format!("e-mail sent {at} ({} delivery)", ordinal(delivery));
    }
    if let Some(letter) = dead {
        return format!(
            "dead-lettered: {}; replay with stack replay-dead-letters",
            letter.reason.as_deref().unwrap_or("no reason given")
        );
    }
    let Some(outbox) = &rows.outbox else {
        return "no event: the charge succeeded but billing's outbox has no order.completed for it"
            .to_owned();
    };
    let Some(published_at) = outbox.published_at else {
        return format!(
            "not published: in billing's outbox for {} ({} attempt(s){}); billing's relay retries it",
            ago(now, outbox.created_at),
            outbox.attempts,
            outbox
                .last_error
                .as_ref()
                .map(|e| format!(", last error {e}"))
                .unwrap_or_default()
        );
    };
    let (Some(message), Some(consumer)) = (stored, consumer) else {
        if let Some(n) = notification.filter(|n| n.status == "failed") {
            return format!(
                "failed: {}; no dead letter left (replayed, or expired)",
                n.last_error.as_deref().unwrap_or("no error recorded")
            );
        }
        return format!(
            "published {} ago, but JetStream could not be asked (message or consumer not found)",
            ago(now, published_at)
        );
    };
    let last_ack = consumer
        .last_ack
        .map(|at| format!("last ack {} ago", ago(now, at)))
        .unwrap_or_else(|| "no ack yet".to_owned());
    let nobody = if consumer.num_waiting == 0 {
        ", nobody pulling (notification-service down?)"
    } else {
        ""
    };
    if message.sequence > consumer.delivered_sequence {
        return format!(
            "waiting in JetStream for {}: consumer has {} pending, {last_ack}{nobody}",
            ago(now, message.published),
            consumer.num_pending
        );
    }
    if message.sequence <= consumer.ack_floor {
        let n = notification
            .map(|n| format!("notification {}", n.status))
            .unwrap_or_else(|| "no notification row".to_owned());
        return format!(
            "acknowledged but not sent: {n} (a malformed message is dead-lettered; see above)"
        );
    }
    let tried = notification
        .map(|n| {
            format!(
                ", {} attempt(s){}",
                n.attempts,
                n.last_error
                    .as_ref()
                    .map(|e| format!(", last error {e}"))
                    .unwrap_or_default()
            )
        })
        .unwrap_or_default();
    format!(
        "delivered, not acknowledged{tried}: being sent, or waiting for its redelivery after the ack wait ({} unacknowledged in the consumer, {last_ack}{nobody})",
        consumer.num_ack_pending
    )
}

impl Whereabouts {
    /// What `stack where` prints: the timeline, what could not be read, then the answer.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "order {}  trace {}",
            self.order_id
                .map(|id| id.to_string())
                .unwrap_or_else(|| "?".into()),
            self.trace_id.as_deref().unwrap_or("?")
        );
        for event in &self.events {
            let at = event
                .at
                .map(|at| at.format("%H:%M:%S%.3f").to_string())
                .unwrap_or_else(|| "            ".into());
            let _ = writeln!(out, "  {at}  {}", event.what);
        }
        for missing in &self.unavailable {
            let _ = writeln!(out, "  (not read: {missing})");
        }
        let _ = writeln!(out, "{}", self.verdict);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_ordinals() {
        assert_eq!(
            Subject::parse("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            Subject::Trace("4bf92f3577b34da6a3ce929d0e0e4736".into())
        );
        assert!(matches!(
            Subject::parse("5f0c7c1e-8d2a-4c11-9a55-3d1d0b9e2f10").unwrap(),
            Subject::Order(_)
        ));
        assert!(Subject::parse("order-12").is_err());
        assert_eq!(ordinal(1), "1st");
        assert_eq!(ordinal(2), "2nd");
        assert_eq!(ordinal(3), "3rd");
        assert_eq!(ordinal(11), "11th");
        assert_eq!(ordinal(22), "22nd");
        assert_eq!(
            redact("postgres://tracehop_billing:s3cret@db:5432/tracehop"),
            "postgres://tracehop_billing:***@db:5432/tracehop"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/x"),
            "postgres://postgres@127.0.0.1/x"
        );
    }
}
