//! One JSON object per log line, with the OpenTelemetry `trace_id` and `span_id` of the current span, so
//! `grep <trace id>` over every service's log finds every line of one request.
//!
//! A line looks like this (keys in this order; `fields` only when the event has fields besides its message,
//! `span` and the ids only inside a span, the ids only when the span has a valid context):
//!
//! ```text
//! {"timestamp":"2026-11-28T14:20:17.123456Z","level":"INFO","target":"tracehop_telemetry::http::server","fields":{"status":200},"message":"request finished","span":"HTTP request","trace_id":"…","span_id":"…"}
//! ```
//!
//! Values keep their JSON types (numbers, booleans; `null` for a float that is not finite); 128-bit integers
//! and everything recorded with `?` or `%` are strings. `span` is the span the line was written in, whatever
//! `RUST_LOG` says of that span's level (the logs see every span the trace may have); the ids are its
//! context, or, when it is not traced (a sampled-out trace, a debug span), its nearest traced ancestor's.
//!
//! Every service writes one such line per request, traced or not, so the line is written straight into the
//! fmt layer's buffer: values escaped as they are formatted, no map of values built and serialised, no
//! `String` per key or value (BENCHMARKS.md, section 22).

use std::fmt::{self, Write as _};

use opentelemetry::trace::TraceContextExt;
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Subscriber};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

pub(super) struct JsonWithTraceIds;

impl<S, N> FormatEvent<S, N> for JsonWithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        writer.write_str("{\"timestamp\":\"")?;
        timestamp(&mut writer, chrono::Utc::now())?;
        write!(writer, "\",\"level\":\"{}\",\"target\":", metadata.level())?;
        string(&mut writer, metadata.target())?;
        // The fields other than the message go into `"fields":{…}` as they are visited, straight into the
        // line; the message (usually one `format_args!`) is kept aside and written after them.
        let mut fields = Fields {
            writer: &mut writer,
            message: None,
            opened: false,
            result: Ok(()),
        };
        event.record(&mut fields);
        let Fields {
            message,
            opened,
            result,
            ..
        } = fields;
        result?;
        if opened {
            writer.write_char('}')?;
        }
        match message {
            // Already escaped (`Fields::member`).
            Some(Message::Text(text)) => write!(writer, ",\"message\":\"{text}\"")?,
            Some(Message::Raw(raw)) => write!(writer, ",\"message\":{raw}")?,
            None => {}
        }
        if let Some(span) = ctx.lookup_current() {
            writer.write_str(",\"span\":")?;
            string(&mut writer, span.name())?;
            let otel = crate::propagation::context_of(&tracing::Span::current());
            let otel = otel.span();
            let span_context = otel.span_context();
            if span_context.is_valid() {
                write!(
                    writer,
                    ",\"trace_id\":\"{}\",\"span_id\":\"{}\"",
                    span_context.trace_id(),
                    span_context.span_id()
                )?;
            }
        }
        writer.write_str("}\n")
    }
}

/// `directives` (`RUST_LOG`) as [`Targets`], when they are only targets and levels (`info,h2=warn`,
/// `billing=debug`, `off`) that `Targets` reads exactly as `EnvFilter` does. `None` for anything else: span
/// and field directives (`[request]=debug`, which `Targets` would take for a target name), empty pieces
/// (`info,`, which `Targets` would read as `error`), a target without its level (`billing=`), spaces.
pub(super) fn simple_targets(directives: &str) -> Option<Targets> {
    use std::str::FromStr;
    let target = |text: &str| {
        !text.is_empty()
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
    };
    let level = |text: &str| !text.is_empty() && LevelFilter::from_str(text).is_ok();
    let simple = directives
        .split(',')
        .all(|piece| match piece.split_once('=') {
            Some((name, value)) => target(name) && level(value),
            None => target(piece) || level(piece),
        });
    if simple {
        directives.parse().ok()
    } else {
        None
    }
}

/// Span fields for the fmt layer: none. [`JsonWithTraceIds`] writes the span's name and ids only, so the
/// fields the fmt layer would otherwise pre-format for every span on creation are never read.
pub(super) struct NoSpanFields;

impl<'writer> FormatFields<'writer> for NoSpanFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        _: Writer<'writer>,
        _: R,
    ) -> fmt::Result {
        Ok(())
    }
}

/// Writes an event's fields into the line as they are visited: `message` aside, every other field as a
/// member of `"fields":{…}`, opened at the first.
struct Fields<'a, 'writer> {
    writer: &'a mut Writer<'writer>,
    message: Option<Message>,
    opened: bool,
    /// The first write that failed (`Visit` cannot return one).
    result: fmt::Result,
}

/// The event's message, kept aside until its fields are written: a string's text (escaped), or a number,
/// boolean or `null` as it is written in JSON.
enum Message {
    Text(String),
    Raw(String),
}

impl Fields<'_, '_> {
    /// Writes `"name":` after the right separator and answers true, for the caller to write the value; for
    /// the message, keeps what `value` writes (escaped when `quoted`) aside instead and answers false.
    fn member(
        &mut self,
        field: &Field,
        quoted: bool,
        value: impl FnOnce(&mut dyn fmt::Write) -> fmt::Result,
    ) -> bool {
        if field.name() == "message" {
            let mut text = String::new();
            self.result = self.result.and_then(|()| {
                if quoted {
                    value(&mut Escaped(&mut text))
                } else {
                    value(&mut text)
                }
            });
            self.message = Some(if quoted {
                Message::Text(text)
            } else {
                Message::Raw(text)
            });
            return false;
        }
        let separator = if self.opened { "," } else { ",\"fields\":{" };
        self.opened = true;
        self.result = self.result.and_then(|()| {
            self.writer.write_str(separator)?;
            string(self.writer, field.name())?;
            self.writer.write_char(':')
        });
        true
    }

    /// A number, boolean or `null`: written as it is.
    fn raw(&mut self, field: &Field, value: impl fmt::Display) {
        if self.member(field, false, |message| write!(message, "{value}")) {
            self.result = self.result.and_then(|()| write!(self.writer, "{value}"));
        }
    }

    /// Anything else: a JSON string.
    fn text(&mut self, field: &Field, value: impl fmt::Display) {
        if self.member(field, true, |message| write!(message, "{value}")) {
            self.result = self.result.and_then(|()| {
                self.writer.write_char('"')?;
                write!(Escaped(&mut *self.writer), "{value}")?;
                self.writer.write_char('"')
            });
        }
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.text(field, value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.raw(field, value);
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.raw(field, value);
    }
    // 128-bit integers stay strings (`record_debug`, the default): JSON readers would turn them into floats.
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.raw(field, value);
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinity: `null`, as serde_json writes them. `{:?}` keeps a whole float's
        // `.0` (`1.0`, as serde_json writes it) and writes large and small ones with an exponent (`1e21`).
        if value.is_finite() {
            self.raw(field, format_args!("{value:?}"));
        } else {
            self.raw(field, "null");
        }
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.text(field, value);
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.text(field, format_args!("{value:?}"));
    }
}

/// `now` in RFC 3339, UTC, to the microsecond (`2026-11-28T14:20:17.123456Z`), from its parts: chrono's
/// `format` parses its pattern at every call, the largest single part of a line's cost (BENCHMARKS.md,
/// section 22).
fn timestamp(writer: &mut impl fmt::Write, now: chrono::DateTime<chrono::Utc>) -> fmt::Result {
    use chrono::{Datelike, Timelike};
    write!(
        writer,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        now.year(),
        now.month(),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        // chrono keeps a leap second as nanoseconds past 10^9 of second 59: written within second 59.
        now.nanosecond() % 1_000_000_000 / 1_000,
    )
}

/// `text` as a JSON string, quoted and escaped.
fn string(writer: &mut impl fmt::Write, text: &str) -> fmt::Result {
    writer.write_char('"')?;
    Escaped(&mut *writer).write_str(text)?;
    writer.write_char('"')
}

/// Escapes what is written through it for the inside of a JSON string: `"`, `\` and the control characters
/// (RFC 8259, section 7), as serde_json does.
struct Escaped<'a, W: fmt::Write + ?Sized>(&'a mut W);

impl<W: fmt::Write + ?Sized> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut clean = 0;
        for (at, byte) in text.bytes().enumerate() {
            let escape = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x00..=0x1f => "",
                _ => continue,
            };
            // Every byte matched above is ASCII, so `at` is a character boundary.
            self.0.write_str(&text[clean..at])?;
            if escape.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            clean = at + 1;
        }
        self.0.write_str(&text[clean..])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use serde_json::{Value, json};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Where the lines go: a buffer the test reads back.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        /// Every line written, each parsed as JSON (a line that is not JSON fails the test).
        fn parsed(&self) -> Vec<Value> {
            let bytes = self.0.lock().unwrap().clone();
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
                .collect()
        }
    }

    fn json_layer<S>(lines: &Lines) -> impl tracing_subscriber::Layer<S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let lines = lines.clone();
        tracing_subscriber::fmt::layer()
            .event_format(JsonWithTraceIds)
            .fmt_fields(NoSpanFields)
            .with_writer(move || lines.clone())
    }

    #[derive(Debug)]
    struct Odd;

    impl fmt::Display for Odd {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an \"odd\" error\\")
        }
    }

    impl std::error::Error for Odd {}

    #[test]
    fn every_value_type_is_written_as_json_and_text_is_escaped() {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::registry().with(json_layer(&lines));
        tracing::subscriber::with_default(subscriber, || {
            let error = Odd;
            tracing::warn!(
                text = "quote \" backslash \\ newline \n tab \t bell \u{7} é ✓",
                negative = -3_i64,
                unsigned = 18_446_744_073_709_551_615_u64,
                wide = 170_141_183_460_469_231_731_687_303_715_884_105_727_i128,
                yes = true,
                ratio = 0.25_f64,
                whole = 1.0_f64,
                not_a_number = f64::NAN,
                debugged = ?vec!["a\"b"],
                displayed = %"c\\d",
                error = &error as &(dyn std::error::Error + 'static),
                "a message with \"quotes\" and {}", "arguments\n"
            );
            tracing::info!("no fields");
            tracing::info!(message = 5_i64);
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains(r#""whole":1.0,"#),
            "a whole float keeps its .0: {text}"
        );
        let lines = lines.parsed();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2]["message"], 5, "a message keeps its JSON type");
        let line = &lines[0];
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["target"], module_path!());
        assert_eq!(line["message"], "a message with \"quotes\" and arguments\n");
        assert_eq!(
            line["fields"],
            json!({
                "text": "quote \" backslash \\ newline \n tab \t bell \u{7} é ✓",
                "negative": -3,
                "unsigned": 18_446_744_073_709_551_615_u64,
                "wide": "170141183460469231731687303715884105727",
                "yes": true,
                "ratio": 0.25,
                "whole": 1.0,
                "not_a_number": null,
                "debugged": "[\"a\\\"b\"]",
                "displayed": "c\\d",
                "error": "an \"odd\" error\\",
            })
        );
        assert!(line.get("span").is_none() && line.get("trace_id").is_none());
        let timestamp = line["timestamp"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(timestamp).is_ok() && timestamp.ends_with('Z'),
            "{timestamp}"
        );
        assert_eq!(timestamp.len(), "2026-11-28T14:20:17.123456Z".len());
        assert_eq!(
            lines[1].as_object().unwrap().keys().collect::<Vec<_>>(),
            ["level", "message", "target", "timestamp"],
            "no empty `fields`"
        );
    }

    #[test]
    fn targets_filter_the_lines_by_target_and_level_and_never_the_spans() {
        let lines = Lines::default();
        let kept = crate::testing::Keep::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(kept.clone())
            .build();
        // The services' filter for the JSON lines, with the directives read as `Targets`.
        assert!(simple_targets("info,noisy=warn").is_some());
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::Layer::with_filter(
                json_layer(&lines),
                super::super::json_log_filter("info,noisy=warn"),
            ))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let (work, noisy) = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("work");
            let _entered = span.enter();
            // A span below its target's log level: the logs' filter must not switch it off, and the lines
            // inside it name it.
            let noisy = tracing::info_span!(target: "noisy", "noisy.work");
            noisy.in_scope(|| {
                tracing::info!("kept");
                tracing::debug!("below the level");
                tracing::info!(target: "noisy", "below noisy's level");
                tracing::warn!(target: "noisy", "noisy but loud enough");
            });
            let ids = |span| {
                let context = crate::propagation::context_of(span);
                let context = context.span();
                let ids = context.span_context();
                (ids.trace_id().to_string(), ids.span_id().to_string())
            };
            (ids(&span), ids(&noisy))
        });
        let lines = lines.parsed();
        let messages: Vec<_> = lines.iter().map(|line| line["message"].clone()).collect();
        assert_eq!(messages, [json!("kept"), json!("noisy but loud enough")]);
        assert_eq!(work.0, noisy.0, "one trace");
        for line in &lines {
            // The span the line was written in, and its ids.
            assert_eq!(line["span"], "noisy.work");
            assert_eq!(line["trace_id"], noisy.0.as_str());
            assert_eq!(line["span_id"], noisy.1.as_str());
        }
        let spans = kept.0.lock().unwrap();
        let mut names: Vec<_> = spans.iter().map(|span| span.name.to_string()).collect();
        names.sort();
        assert_eq!(names, ["noisy.work", "work"], "both spans are exported");
    }

    #[test]
    fn only_targets_and_levels_are_read_as_targets() {
        for simple in [
            "info,h2=warn,hyper=warn,tonic=warn,tower=warn,opentelemetry=warn",
            "debug",
            "off",
            "billing=debug",
            "warn,billing::store=trace,my-target=INFO",
            "billing",
        ] {
            assert!(simple_targets(simple).is_some(), "{simple}");
        }
        for not_simple in [
            "",
            "info,",
            "info,,hyper=warn",
            "billing=",
            "=debug",
            "info, hyper=warn",
            "[request]=debug",
            "gateway[request]=trace",
            "[span{field=1}]=debug",
            "billing=loud",
        ] {
            assert!(simple_targets(not_simple).is_none(), "{not_simple:?}");
        }
    }

    #[test]
    fn the_timestamp_is_rfc_3339_in_utc_to_the_microsecond() {
        use chrono::TimeZone;
        let at = |seconds, nanos| {
            let mut text = String::new();
            timestamp(
                &mut text,
                chrono::Utc.timestamp_opt(seconds, nanos).unwrap(),
            )
            .unwrap();
            text
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            at(1_796_135_217, 123_456_789),
            "2026-12-01T14:26:57.123456Z"
        );
        assert_eq!(at(951_782_400, 999_999), "2000-02-29T00:00:00.000999Z");
        let now = chrono::Utc::now();
        let mut text = String::new();
        timestamp(&mut text, now).unwrap();
        assert_eq!(text, now.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string());
    }

    #[test]
    fn a_line_inside_a_traced_span_names_the_span_and_its_ids() {
        let lines = Lines::default();
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_simple_exporter(crate::testing::Keep::default())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(json_layer(&lines))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let (trace_id, span_id) = tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("checkout.process");
            let _entered = span.enter();
            tracing::info!(status = 200_u16, "request finished");
            let context = crate::propagation::context_of(&span);
            let context = context.span();
            let ids = context.span_context();
            (ids.trace_id().to_string(), ids.span_id().to_string())
        });
        let lines = lines.parsed();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["span"], "checkout.process");
        assert_eq!(lines[0]["trace_id"], trace_id.as_str());
        assert_eq!(lines[0]["span_id"], span_id.as_str());
        assert_eq!(lines[0]["fields"], json!({"status": 200}));
        assert_eq!(lines[0]["message"], "request finished");
    }
}
