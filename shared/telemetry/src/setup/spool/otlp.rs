//! The spool's records written straight into an OTLP export request (`ExportTraceServiceRequest`, protobuf),
//! for the export thread's OTLP/HTTP path ([`super::super::otlp_http`]).
//!
//! Why: the other path decodes each record into the SDK's `SpanData`, which `opentelemetry-otlp` converts
//! into its generated protobuf types and encodes, and then frees both. At load that was about 5% of billing's
//! CPU (BENCHMARKS.md, section 16) for bytes that go from one encoding to another. Here a record is read
//! field by field and the protobuf is written as it is read: no span is built, nothing is allocated per span.
//!
//! The request has one `ResourceSpans` (the spool's resource) and one `ScopeSpans` per run of records with
//! the same instrumentation scope. Field numbers are those of `opentelemetry/proto/trace/v1/trace.proto`
//! and `common/v1/common.proto`; what comes out is what `opentelemetry-proto`'s conversion of the same spans
//! decodes to (the test below compares the two), with every string attribute value and the status message
//! cut at the attribute value length limit, as [`super::super::export::limit_values`] does on the other path.

use super::codec::Reader;

/// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// `SpanFlags`: the context's `is_remote` is known, and the parent's is remote.
const HAS_IS_REMOTE: u32 = 0x100;
const IS_REMOTE: u32 = 0x200;

/// An export request being built, a record at a time, in one buffer: nothing of it is kept between requests
/// but the resource (the export thread holds at most the batch being filled).
pub(crate) struct Request {
    /// The `Resource` field every request begins with (its key, length and attributes).
    resource: Vec<u8>,
    /// The `ResourceSpans` content so far: the resource, then the `ScopeSpans` fields.
    body: Vec<u8>,
    /// Where the open `ScopeSpans`' content begins in `body` (a one-byte length placeholder just before it),
    /// and its scope's encoding and schema URL, which the next record's are compared with.
    open_scope: Option<usize>,
    scope: Vec<u8>,
    schema_url: Vec<u8>,
    /// Scratch: the record being read's span, scope and schema URL.
    span: Vec<u8>,
    next_scope: Vec<u8>,
    next_schema_url: Vec<u8>,
    spans: usize,
    value_limit: usize,
}

impl Request {
    /// An empty request under the resource whose attributes `resource` holds (in the spool's own encoding,
    /// [`super::codec::encode_attributes`]).
    pub(crate) fn new(resource: &[u8], value_limit: usize) -> Self {
        let mut reader = Reader {
            bytes: resource,
            at: 0,
        };
        let mut attributes = Vec::new();
        // A resource that does not read back is exported without attributes rather than not at all.
        if put_attributes(&mut attributes, &mut reader, 1, usize::MAX).is_none() {
            attributes.clear();
        }
        let mut field = Vec::new();
        put_bytes(&mut field, 1, &attributes);
        Self {
            body: field.clone(),
            resource: field,
            open_scope: None,
            scope: Vec::new(),
            schema_url: Vec::new(),
            span: Vec::new(),
            next_scope: Vec::new(),
            next_schema_url: Vec::new(),
            spans: 0,
            value_limit,
        }
    }

    /// Spans added so far.
    pub(crate) fn len(&self) -> usize {
        self.spans
    }

    /// Adds the span an `Ended` record's payload holds. False (and nothing added) when the payload does not
    /// read as a span.
    pub(crate) fn push(&mut self, payload: &[u8]) -> bool {
        self.span.clear();
        self.next_scope.clear();
        self.next_schema_url.clear();
        let mut reader = Reader {
            bytes: payload,
            at: 0,
        };
        let read = put_span(
            &mut self.span,
            &mut self.next_scope,
            &mut self.next_schema_url,
            &mut reader,
            self.value_limit,
        );
        if read.is_none() {
            return false;
        }
        if self.open_scope.is_none()
            || self.next_scope != self.scope
            || self.next_schema_url != self.schema_url
        {
            self.close_scope();
            std::mem::swap(&mut self.scope, &mut self.next_scope);
            std::mem::swap(&mut self.schema_url, &mut self.next_schema_url);
            put_key(&mut self.body, 2, LEN);
            self.body.push(0);
            self.open_scope = Some(self.body.len());
            put_bytes(&mut self.body, 1, &self.scope);
        }
        put_bytes(&mut self.body, 2, &self.span);
        self.spans += 1;
        true
    }

    fn close_scope(&mut self) {
        if let Some(start) = self.open_scope.take() {
            if !self.schema_url.is_empty() {
                put_bytes(&mut self.body, 3, &self.schema_url);
            }
            set_length(&mut self.body, start - 1);
        }
    }

    /// The encoded `ExportTraceServiceRequest`; the request starts again empty, under the same resource.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        self.close_scope();
        self.spans = 0;
        let mut body = std::mem::replace(&mut self.body, self.resource.clone());
        // The `ResourceSpans` field's key and length in front. With the `ScopeSpans` length put in front of
        // its content by `close_scope`, that is two moves of the batch per request, none per span.
        body.splice(0..0, [(1 << 3) | LEN, 0]);
        set_length(&mut body, 1);
        body
    }
}

/// Writes the length of what follows the one-byte placeholder at `at` (to the end of `out`) into it, moving
/// that content along when the length takes more than one byte.
fn set_length(out: &mut Vec<u8>, at: usize) {
    let length = out.len() - at - 1;
    if length < 0x80 {
        out[at] = length as u8;
        return;
    }
    let mut prefix = [0_u8; 10];
    let mut used = 0;
    let mut rest = length as u64;
    while rest >= 0x80 {
        prefix[used] = (rest as u8 & 0x7f) | 0x80;
        rest >>= 7;
        used += 1;
    }
    prefix[used] = rest as u8;
    out.splice(at..=at, prefix[..=used].iter().copied());
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, LEN);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_fixed64(out: &mut Vec<u8>, field: u32, value: u64) {
    put_key(out, field, FIXED64);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_uint(out: &mut Vec<u8>, field: u32, value: u64) {
    if value != 0 {
        put_key(out, field, VARINT);
        put_varint(out, value);
    }
}

/// A length-delimited field whose content `write` appends; its length is put in front once known. One byte
/// is kept for it, enough for the usual content (under 128 bytes: a key-value, a value); a longer content is
/// moved along to make room ([`set_length`]).
fn put_message(
    out: &mut Vec<u8>,
    field: u32,
    write: impl FnOnce(&mut Vec<u8>) -> Option<()>,
) -> Option<()> {
    put_key(out, field, LEN);
    let at = out.len();
    out.push(0);
    write(out)?;
    set_length(out, at);
    Some(())
}

/// A string of the record (a `u32` length, then UTF-8), cut at `limit` bytes at a character boundary.
fn read_str<'a>(reader: &mut Reader<'a>, limit: usize) -> Option<&'a str> {
    let length = reader.u32()? as usize;
    let bytes = reader.take(length)?;
    let text = std::str::from_utf8(bytes).ok()?;
    let mut end = limit.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Some(&text[..end])
}

fn put_str(out: &mut Vec<u8>, field: u32, text: &str) {
    if !text.is_empty() {
        put_bytes(out, field, text.as_bytes());
    }
}

/// A span context of the record: trace id, span id, flags, whether remote, trace state.
struct Context<'a> {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
    remote: bool,
    state: &'a str,
}

fn read_context<'a>(reader: &mut Reader<'a>) -> Option<Context<'a>> {
    Some(Context {
        trace_id: reader.array()?,
        span_id: reader.array()?,
        flags: reader.u8()?,
        remote: reader.u8()? != 0,
        state: read_str(reader, usize::MAX)?,
    })
}

fn put_span(
    out: &mut Vec<u8>,
    scope: &mut Vec<u8>,
    schema_url: &mut Vec<u8>,
    reader: &mut Reader<'_>,
    limit: usize,
) -> Option<()> {
    let context = read_context(reader)?;
    put_bytes(out, 1, &context.trace_id);
    put_bytes(out, 2, &context.span_id);
    put_str(out, 3, context.state);
    let parent: [u8; 8] = reader.array()?;
    if parent != [0; 8] {
        put_bytes(out, 4, &parent);
    }
    let parent_is_remote = reader.u8()? != 0;
    let flags =
        u32::from(context.flags) | HAS_IS_REMOTE | if parent_is_remote { IS_REMOTE } else { 0 };
    put_key(out, 16, FIXED32);
    out.extend_from_slice(&flags.to_le_bytes());
    // The record's kinds (0 internal, 1 client, 2 server, 3 producer, 4 consumer) as OTLP's `SpanKind`.
    let kind = match reader.u8()? {
        1 => 3,
        2 => 2,
        3 => 4,
        4 => 5,
        _ => 1,
    };
    put_uint(out, 6, kind);
    put_str(out, 5, read_str(reader, usize::MAX)?);
    put_fixed64(out, 7, u64::from_le_bytes(reader.array()?));
    put_fixed64(out, 8, u64::from_le_bytes(reader.array()?));
    put_attributes(out, reader, 9, limit)?;
    put_uint(out, 10, u64::from(reader.u32()?));
    for _ in 0..reader.u32()? {
        put_message(out, 11, |event| {
            let name = read_str(reader, usize::MAX)?;
            put_fixed64(event, 1, u64::from_le_bytes(reader.array()?));
            put_str(event, 2, name);
            put_attributes(event, reader, 3, limit)?;
            put_uint(event, 4, u64::from(reader.u32()?));
            Some(())
        })?;
    }
    put_uint(out, 12, u64::from(reader.u32()?));
    for _ in 0..reader.u32()? {
        put_message(out, 13, |link| {
            let context = read_context(reader)?;
            put_bytes(link, 1, &context.trace_id);
            put_bytes(link, 2, &context.span_id);
            put_str(link, 3, context.state);
            put_attributes(link, reader, 4, limit)?;
            put_uint(link, 5, u64::from(reader.u32()?));
            let flags = u32::from(context.flags)
                | HAS_IS_REMOTE
                | if context.remote { IS_REMOTE } else { 0 };
            put_key(link, 6, FIXED32);
            link.extend_from_slice(&flags.to_le_bytes());
            Some(())
        })?;
    }
    put_uint(out, 14, u64::from(reader.u32()?));
    // Always present, as the SDK's conversion has it: code 0 (unset), 1 (ok) or 2 (error).
    put_message(out, 15, |status| {
        let code = reader.u8()?;
        if code == 2 {
            put_str(status, 2, read_str(reader, limit)?);
        }
        put_uint(status, 3, u64::from(code.min(2)));
        Some(())
    })?;
    // The instrumentation scope: name, version, schema URL (its `ScopeSpans`'), attributes.
    put_str(scope, 1, read_str(reader, usize::MAX)?);
    if reader.u8()? != 0 {
        put_str(scope, 2, read_str(reader, usize::MAX)?);
    }
    if reader.u8()? != 0 {
        schema_url.extend_from_slice(read_str(reader, usize::MAX)?.as_bytes());
    }
    // Scope (and resource) attributes are not cut: the SDK's path does not cut them either.
    put_attributes(scope, reader, 3, usize::MAX)
}

/// A list of key-values of the record, each as a `KeyValue` in `field`.
fn put_attributes(
    out: &mut Vec<u8>,
    reader: &mut Reader<'_>,
    field: u32,
    limit: usize,
) -> Option<()> {
    for _ in 0..reader.u32()? {
        put_message(out, field, |key_value| {
            put_str(key_value, 1, read_str(reader, usize::MAX)?);
            put_message(key_value, 2, |value| put_value(value, reader, limit))
        })?;
    }
    Some(())
}

/// One value of the record as an `AnyValue`'s content: a scalar (kinds 0 to 3) or an array of them (4 to 7,
/// the scalar's kind plus 4).
fn put_value(out: &mut Vec<u8>, reader: &mut Reader<'_>, limit: usize) -> Option<()> {
    match reader.u8()? {
        kind @ 0..=3 => put_scalar(out, kind, reader, limit),
        kind @ 4..=7 => put_message(out, 5, |array| {
            for _ in 0..reader.u32()? {
                put_message(array, 1, |item| put_scalar(item, kind - 4, reader, limit))?;
            }
            Some(())
        }),
        _ => None,
    }
}

/// A scalar of the record's `kind` (0 bool, 1 int, 2 double, 3 string) as an `AnyValue`'s content. The field
/// is written even when its value is the default (`false`, `0`, `""`): it is a `oneof`, whose presence is
/// the value's type.
fn put_scalar(out: &mut Vec<u8>, kind: u8, reader: &mut Reader<'_>, limit: usize) -> Option<()> {
    match kind {
        0 => {
            put_key(out, 2, VARINT);
            put_varint(out, u64::from(reader.u8()? != 0));
        }
        1 => {
            put_key(out, 3, VARINT);
            // int64: two's complement, as ten bytes when negative.
            put_varint(out, i64::from_le_bytes(reader.array()?) as u64);
        }
        2 => {
            put_key(out, 4, FIXED64);
            out.extend_from_slice(&reader.array::<8>()?);
        }
        _ => put_bytes(out, 1, read_str(reader, limit)?.as_bytes()),
    }
    Some(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use opentelemetry::trace::{SpanKind, Status};
    use opentelemetry::{Array, KeyValue, Value};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SpanData;
    use prost::Message;

    use super::super::codec::{self, Kind, test_span};
    use super::*;

    fn resource() -> Resource {
        Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", "billing"),
                KeyValue::new("service.instance.id", "billing-1"),
            ])
            .build()
    }

    fn transcoded(spans: &[SpanData], limit: usize) -> ExportTraceServiceRequest {
        let attributes: Vec<KeyValue> = resource()
            .iter()
            .map(|(key, value)| KeyValue::new(key.clone(), value.clone()))
            .collect();
        let mut request = Request::new(&codec::encode_attributes(&attributes), limit);
        for span in spans {
            let mut record = Vec::new();
            codec::push_record(&mut record, Kind::Ended, span);
            let (_, payload, _) = codec::next_record(&record).unwrap();
            assert!(request.push(payload));
        }
        assert_eq!(request.len(), spans.len());
        let body = request.take();
        assert_eq!(request.len(), 0);
        sorted(ExportTraceServiceRequest::decode(body.as_slice()).unwrap())
    }

    fn expected(spans: Vec<SpanData>) -> ExportTraceServiceRequest {
        let resource = ResourceAttributesWithSchema::from(&resource());
        sorted(ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(spans, &resource),
        })
    }

    /// The resource's attributes in one order: a `Resource` keeps them in a map, so each reading of it may
    /// list them in another.
    fn sorted(mut request: ExportTraceServiceRequest) -> ExportTraceServiceRequest {
        for resource_spans in &mut request.resource_spans {
            if let Some(resource) = &mut resource_spans.resource {
                resource.attributes.sort_by(|a, b| a.key.cmp(&b.key));
            }
        }
        request
    }

    #[test]
    fn a_record_becomes_what_the_sdk_s_own_conversion_of_its_span_decodes_to() {
        let kinds = [
            (SpanKind::Internal, Status::Unset),
            (SpanKind::Server, Status::Ok),
            (SpanKind::Client, Status::error("it broke")),
            (SpanKind::Producer, Status::Unset),
            (SpanKind::Consumer, Status::error("")),
        ];
        for (kind, status) in kinds {
            let spans = vec![test_span("one", "tracehop", kind, status)];
            assert_eq!(transcoded(&spans, usize::MAX), expected(spans));
        }
    }

    #[test]
    fn spans_of_one_scope_share_a_scope_spans_and_the_request_starts_again_empty() {
        let unset = || Status::Unset;
        let spans = vec![
            test_span("a", "tracehop", SpanKind::Server, unset()),
            test_span("b", "tracehop", SpanKind::Client, unset()),
        ];
        let request = transcoded(&spans, usize::MAX);
        assert_eq!(request, expected(spans));
        assert_eq!(request.resource_spans[0].scope_spans.len(), 1);

        // Two scopes, in runs: one `ScopeSpans` per run, in order.
        let spans = vec![
            test_span("a", "tracehop", SpanKind::Server, unset()),
            test_span("b", "other", SpanKind::Client, unset()),
            test_span("c", "other", SpanKind::Client, unset()),
        ];
        let request = transcoded(&spans, usize::MAX);
        let scopes: Vec<(&str, usize)> = request.resource_spans[0]
            .scope_spans
            .iter()
            .map(|scope| {
                (
                    scope.scope.as_ref().unwrap().name.as_str(),
                    scope.spans.len(),
                )
            })
            .collect();
        assert_eq!(scopes, [("tracehop", 1), ("other", 2)]);
        let resource = request.resource_spans[0].resource.as_ref().unwrap();
        assert_eq!(resource.attributes.len(), 2);
    }

    #[test]
    fn string_values_and_the_status_message_are_cut_at_the_limit() {
        let mut long = test_span("a", "tracehop", SpanKind::Server, Status::error("éééé"));
        long.attributes = vec![
            KeyValue::new("s", "ééé"),
            KeyValue::new("as", Value::Array(Array::String(vec!["abcdef".into()]))),
            KeyValue::new("i", 123456789_i64),
        ];
        let request = transcoded(std::slice::from_ref(&long), 5);
        let mut cut = long.clone();
        super::super::super::export::limit_values(&mut cut, 5);
        assert_eq!(request, expected(vec![cut]));
        let span = &request.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.status.as_ref().unwrap().message, "éé");
    }

    #[test]
    fn a_damaged_record_is_refused_and_leaves_the_request_as_it_was() {
        let mut record = Vec::new();
        codec::push_record(
            &mut record,
            Kind::Ended,
            &test_span("a", "tracehop", SpanKind::Server, Status::Unset),
        );
        let (_, payload, _) = codec::next_record(&record).unwrap();
        let mut request = Request::new(&[], usize::MAX);
        for cut in 0..payload.len() {
            assert!(!request.push(&payload[..cut]), "cut at {cut}");
        }
        assert_eq!(request.len(), 0);
        assert!(request.push(payload));
        let body = request.take();
        let decoded = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        assert_eq!(decoded.resource_spans[0].scope_spans[0].spans.len(), 1);
    }
}
