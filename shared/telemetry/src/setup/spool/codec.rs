//! The spool's record format: a span as the SDK hands it to a processor ([`SpanData`]), written so that it
//! reads back whole, and the framing that lets a reader tell a whole record from one a kill cut short.
//!
//! A record is `[length: u32 LE][kind: u8][payload: length bytes]`. The payload is the span, field after
//! field, little-endian; strings and lists carry their length first. Nothing is compressed or shared
//! between records: a record is written by one `write(2)` and read on its own.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A span that has ended: to be exported.
    Ended = 1,
    /// A span that has not ended yet but whose context left the process: what it looked like when it
    /// started, so that a successor can export it (as ended by the process's death) if no `Ended` follows.
    Open = 2,
}

/// Appends one framed record.
pub(super) fn push_record(buffer: &mut Vec<u8>, kind: Kind, span: &SpanData) {
    let start = buffer.len();
    buffer.extend_from_slice(&[0; 4]);
    buffer.push(kind as u8);
    encode_span(buffer, span);
    let length = u32::try_from(buffer.len() - start - 5).unwrap_or(u32::MAX);
    buffer[start..start + 4].copy_from_slice(&length.to_le_bytes());
}

/// The next whole record in `bytes`: its kind, its payload and the bytes it took. `None` when `bytes` holds
/// no whole record (the end of what was written, or a record cut short).
pub(super) fn next_record(bytes: &[u8]) -> Option<(Option<Kind>, &[u8], usize)> {
    let length = record_length(bytes)?;
    let kind = match *bytes.get(4)? {
        1 => Some(Kind::Ended),
        2 => Some(Kind::Open),
        _ => None,
    };
    let payload = bytes.get(5..length)?;
    Some((kind, payload, length))
}

/// The bytes the record starting `bytes` takes (header included), once its header is there.
pub(super) fn record_length(bytes: &[u8]) -> Option<usize> {
    Some(u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize + 5)
}

/// Key-value lists (a resource's attributes) in the same encoding.
pub(super) fn encode_attributes(attributes: &[KeyValue]) -> Vec<u8> {
    let mut buffer = Vec::new();
    put_attributes(&mut buffer, attributes.iter());
    buffer
}

pub(super) fn decode_attributes(bytes: &[u8]) -> Option<Vec<KeyValue>> {
    Reader { bytes, at: 0 }.attributes()
}

fn encode_span(out: &mut Vec<u8>, span: &SpanData) {
    put_span_context(out, &span.span_context);
    out.extend_from_slice(&span.parent_span_id.to_bytes());
    out.push(u8::from(span.parent_span_is_remote));
    out.push(match span.span_kind {
        SpanKind::Client => 1,
        SpanKind::Server => 2,
        SpanKind::Producer => 3,
        SpanKind::Consumer => 4,
        SpanKind::Internal => 0,
    });
    put_str(out, &span.name);
    put_time(out, span.start_time);
    put_time(out, span.end_time);
    put_attributes(out, span.attributes.iter());
    put_u32(out, span.dropped_attributes_count);
    put_len(out, span.events.events.len());
    for event in &span.events.events {
        put_str(out, &event.name);
        put_time(out, event.timestamp);
        put_attributes(out, event.attributes.iter());
        put_u32(out, event.dropped_attributes_count);
    }
    put_u32(out, span.events.dropped_count);
    put_len(out, span.links.links.len());
    for link in &span.links.links {
        put_span_context(out, &link.span_context);
        put_attributes(out, link.attributes.iter());
        put_u32(out, link.dropped_attributes_count);
    }
    put_u32(out, span.links.dropped_count);
    match &span.status {
        Status::Unset => out.push(0),
        Status::Ok => out.push(1),
        Status::Error { description } => {
            out.push(2);
            put_str(out, description);
        }
    }
    let scope = &span.instrumentation_scope;
    put_str(out, scope.name());
    put_optional_str(out, scope.version());
    put_optional_str(out, scope.schema_url());
    let scope_attributes: Vec<&KeyValue> = scope.attributes().collect();
    put_attributes(out, scope_attributes.into_iter());
}

pub(super) fn decode_span(bytes: &[u8]) -> Option<SpanData> {
    let mut reader = Reader { bytes, at: 0 };
    let span_context = reader.span_context()?;
    let parent_span_id = SpanId::from_bytes(reader.array()?);
    let parent_span_is_remote = reader.u8()? != 0;
    let span_kind = match reader.u8()? {
        1 => SpanKind::Client,
        2 => SpanKind::Server,
        3 => SpanKind::Producer,
        4 => SpanKind::Consumer,
        _ => SpanKind::Internal,
    };
    let name = Cow::Owned(reader.string()?);
    let start_time = reader.time()?;
    let end_time = reader.time()?;
    let attributes = reader.attributes()?;
    let dropped_attributes_count = reader.u32()?;
    let mut events = SpanEvents::default();
    for _ in 0..reader.u32()? {
        let name = reader.string()?;
        let timestamp = reader.time()?;
        let attributes = reader.attributes()?;
        let dropped = reader.u32()?;
        events
            .events
            .push(Event::new(name, timestamp, attributes, dropped));
    }
    events.dropped_count = reader.u32()?;
    let mut links = SpanLinks::default();
    for _ in 0..reader.u32()? {
        let span_context = reader.span_context()?;
        let attributes = reader.attributes()?;
        let dropped = reader.u32()?;
        links
            .links
            .push(Link::new(span_context, attributes, dropped));
    }
    links.dropped_count = reader.u32()?;
    let status = match reader.u8()? {
        1 => Status::Ok,
        2 => Status::error(reader.string()?),
        _ => Status::Unset,
    };
    let mut scope = InstrumentationScope::builder(reader.string()?);
    if let Some(version) = reader.optional_string()? {
        scope = scope.with_version(version);
    }
    if let Some(schema_url) = reader.optional_string()? {
        scope = scope.with_schema_url(schema_url);
    }
    let instrumentation_scope = scope.with_attributes(reader.attributes()?).build();
    Some(SpanData {
        span_context,
        parent_span_id,
        parent_span_is_remote,
        span_kind,
        name,
        start_time,
        end_time,
        attributes,
        dropped_attributes_count,
        events,
        links,
        status,
        instrumentation_scope,
    })
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_len(out: &mut Vec<u8>, length: usize) {
    put_u32(out, u32::try_from(length).unwrap_or(u32::MAX));
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    put_len(out, text.len());
    out.extend_from_slice(text.as_bytes());
}

fn put_optional_str(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(text) => {
            out.push(1);
            put_str(out, text);
        }
        None => out.push(0),
    }
}

fn put_time(out: &mut Vec<u8>, time: SystemTime) {
    let nanos = time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    });
    out.extend_from_slice(&nanos.to_le_bytes());
}

fn put_span_context(out: &mut Vec<u8>, context: &SpanContext) {
    out.extend_from_slice(&context.trace_id().to_bytes());
    out.extend_from_slice(&context.span_id().to_bytes());
    out.push(context.trace_flags().to_u8());
    out.push(u8::from(context.is_remote()));
    put_str(out, &context.trace_state().header());
}

fn put_attributes<'a>(out: &mut Vec<u8>, attributes: impl ExactSizeIterator<Item = &'a KeyValue>) {
    put_len(out, attributes.len());
    for KeyValue { key, value, .. } in attributes {
        put_str(out, key.as_str());
        match value {
            Value::Bool(value) => {
                out.push(0);
                out.push(u8::from(*value));
            }
            Value::I64(value) => {
                out.push(1);
                out.extend_from_slice(&value.to_le_bytes());
            }
            Value::F64(value) => {
                out.push(2);
                out.extend_from_slice(&value.to_le_bytes());
            }
            Value::Array(Array::Bool(values)) => {
                out.push(4);
                put_len(out, values.len());
                out.extend(values.iter().map(|value| u8::from(*value)));
            }
            Value::Array(Array::I64(values)) => {
                out.push(5);
                put_len(out, values.len());
                values
                    .iter()
                    .for_each(|value| out.extend_from_slice(&value.to_le_bytes()));
            }
            Value::Array(Array::F64(values)) => {
                out.push(6);
                put_len(out, values.len());
                values
                    .iter()
                    .for_each(|value| out.extend_from_slice(&value.to_le_bytes()));
            }
            Value::Array(Array::String(values)) => {
                out.push(7);
                put_len(out, values.len());
                values.iter().for_each(|value| put_str(out, value.as_str()));
            }
            Value::String(value) => {
                out.push(3);
                put_str(out, value.as_str());
            }
            // A kind of value added to the API after this was written travels as its text.
            other => {
                out.push(3);
                put_str(out, &other.to_string());
            }
        }
    }
}

/// A span with something of every kind a record holds (every value type, long values, an event, a link),
/// for the tests of the record format and of what it becomes.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(super) fn test_span(
    name: &'static str,
    scope: &'static str,
    kind: SpanKind,
    status: Status,
) -> SpanData {
    let context = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        false,
        "congo=t61rcWkgMzE".parse().unwrap(),
    );
    let mut events = SpanEvents::default();
    events.events.push(Event::new(
        "exception",
        UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
        vec![
            KeyValue::new("exception.message", "boom"),
            KeyValue::new("zero", 0_i64),
        ],
        1,
    ));
    events.dropped_count = 2;
    let mut links = SpanLinks::default();
    let remote = SpanContext::new(
        TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
        SpanId::from_hex("b7ad6b7169203331").unwrap(),
        TraceFlags::default(),
        true,
        Default::default(),
    );
    links
        .links
        .push(Link::new(remote, vec![KeyValue::new("n", -3_i64)], 0));
    SpanData {
        span_context: context,
        parent_span_id: SpanId::from_hex("b7ad6b7169203331").unwrap(),
        parent_span_is_remote: true,
        span_kind: kind,
        name: Cow::Borrowed(name),
        start_time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_001),
        end_time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_200_000_002),
        attributes: vec![
            KeyValue::new("b", true),
            KeyValue::new("f", false),
            KeyValue::new("i", -7_i64),
            KeyValue::new("d", 0.25),
            KeyValue::new("s", "text é"),
            KeyValue::new("empty", ""),
            // Longer than 127 bytes: its length takes two bytes, 17 000 three.
            KeyValue::new("long", "é".repeat(100)),
            KeyValue::new("longer", "x".repeat(17_000)),
            KeyValue::new("ab", Value::Array(Array::Bool(vec![true, false]))),
            KeyValue::new("ai", Value::Array(Array::I64(vec![1, -2, 0]))),
            KeyValue::new("af", Value::Array(Array::F64(vec![1.5]))),
            KeyValue::new(
                "as",
                Value::Array(Array::String(vec!["x".into(), "".into()])),
            ),
        ],
        dropped_attributes_count: 4,
        events,
        links,
        status,
        instrumentation_scope: InstrumentationScope::builder(scope)
            .with_version("1.2.3")
            .with_attributes([KeyValue::new("scope.attr", "v")])
            .build(),
    }
}

/// Reads a payload field after field; every read checks what is left (a damaged record fails, never panics).
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) at: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        let taken = self.bytes.get(self.at..self.at.checked_add(count)?)?;
        self.at += count;
        Some(taken)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(super) fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    pub(super) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> Option<String> {
        let length = self.u32()? as usize;
        String::from_utf8(self.take(length)?.to_vec()).ok()
    }

    fn optional_string(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            _ => Some(Some(self.string()?)),
        }
    }

    fn time(&mut self) -> Option<SystemTime> {
        UNIX_EPOCH.checked_add(Duration::from_nanos(u64::from_le_bytes(self.array()?)))
    }

    fn span_context(&mut self) -> Option<SpanContext> {
        let trace_id = TraceId::from_bytes(self.array()?);
        let span_id = SpanId::from_bytes(self.array()?);
        let flags = TraceFlags::new(self.u8()?);
        let remote = self.u8()? != 0;
        let state = self.string()?;
        let state = state.parse::<TraceState>().unwrap_or_default();
        Some(SpanContext::new(trace_id, span_id, flags, remote, state))
    }

    /// A count, then that many items. The count never sizes an allocation: a damaged record must not ask
    /// for gigabytes.
    fn list<T>(&mut self, mut item: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        let count = self.u32()? as usize;
        let mut items = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            items.push(item(self)?);
        }
        Some(items)
    }

    fn attributes(&mut self) -> Option<Vec<KeyValue>> {
        self.list(|reader| {
            let key = reader.string()?;
            Some(KeyValue::new(key, reader.value()?))
        })
    }

    fn value(&mut self) -> Option<Value> {
        Some(match self.u8()? {
            0 => Value::Bool(self.u8()? != 0),
            1 => Value::I64(i64::from_le_bytes(self.array()?)),
            2 => Value::F64(f64::from_le_bytes(self.array()?)),
            3 => Value::String(StringValue::from(self.string()?)),
            4 => Value::Array(Array::Bool(self.list(|r| Some(r.u8()? != 0))?)),
            5 => Value::Array(Array::I64(
                self.list(|r| Some(i64::from_le_bytes(r.array()?)))?,
            )),
            6 => Value::Array(Array::F64(
                self.list(|r| Some(f64::from_le_bytes(r.array()?)))?,
            )),
            7 => Value::Array(Array::String(
                self.list(|r| Some(StringValue::from(r.string()?)))?,
            )),
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sample() -> SpanData {
        test_span(
            "process order.completed",
            "tracehop",
            SpanKind::Consumer,
            Status::error("it broke"),
        )
    }

    #[test]
    fn a_span_reads_back_as_it_was_written() {
        let span = sample();
        let mut buffer = Vec::new();
        push_record(&mut buffer, Kind::Ended, &span);
        push_record(&mut buffer, Kind::Open, &span);
        let (kind, payload, used) = next_record(&buffer).unwrap();
        assert_eq!(kind, Some(Kind::Ended));
        assert_eq!(decode_span(payload).unwrap(), span);
        let (kind, payload, rest) = next_record(&buffer[used..]).unwrap();
        assert_eq!(kind, Some(Kind::Open));
        assert_eq!(decode_span(payload).unwrap(), span);
        assert_eq!(used + rest, buffer.len());
    }

    #[test]
    fn a_record_cut_short_is_not_a_record() {
        let mut buffer = Vec::new();
        push_record(&mut buffer, Kind::Ended, &sample());
        for cut in 0..buffer.len() {
            assert!(next_record(&buffer[..cut]).is_none(), "cut at {cut}");
        }
    }

    #[test]
    fn damaged_payloads_are_refused_not_trusted() {
        let mut buffer = Vec::new();
        push_record(&mut buffer, Kind::Ended, &sample());
        let payload = &buffer[5..];
        for cut in 0..payload.len() {
            assert!(decode_span(&payload[..cut]).is_none(), "cut at {cut}");
        }
        // A huge attribute count in a short payload fails without allocating for it.
        assert!(decode_attributes(&[0xff, 0xff, 0xff, 0xff]).is_none());
    }
}
