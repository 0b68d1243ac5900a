//! W3C Trace Context Level 2, parsed strictly and formatted once.
//!
//! OpenTelemetry's `TraceContextPropagator` is lenient where the specification is not: it accepts a
//! `tracestate` with illegal keys, more than 32 members or duplicate keys, reads only the first of several
//! `traceparent` headers, and drops the level 2 `random` flag. [`TraceContext`] replaces it (it is a
//! [`TextMapPropagator`], installed by [`crate::setup`]) and is what every HTTP hop, every NATS hop and
//! the conformance endpoint use:
//!
//! - `traceparent`: exactly one header; version `00` is exactly 55 characters, a later version at least 55
//!   with a `-` after them; lowercase hex; trace id and parent id not all zeros; version `ff` is invalid.
//!   Anything else restarts the trace.
//! - `tracestate`: every header is combined into one list; optional white space and empty members are
//!   allowed; keys follow Level 2's grammar (a lowercase letter or digit, then up to 255 of lowercase
//!   letters, digits, `_ - * / @`, which covers `tenant@system`); values are printable ASCII without `,`
//!   and `=` and do not end in a space. A duplicate key keeps its first value. A list with an invalid
//!   member or more than [`MAX_TRACESTATE_MEMBERS`] members is dropped whole (the `traceparent` still
//!   counts). At most [`MAX_TRACESTATE_LENGTH`] characters are kept: members longer than 128 characters
//!   go first, then members from the end, as the specification's truncation rules say.
//! - flags: `sampled` (`0x01`) and the level 2 `random` flag (`0x02`) are kept; other bits are not ours to
//!   forward.
//!
//! ```
//! use opentelemetry::propagation::TextMapPropagator;
//! use opentelemetry::trace::TraceContextExt;
//! use std::collections::HashMap;
//! use tracehop_telemetry::propagation::w3c::TraceContext;
//!
//! let mut headers = HashMap::new();
//! headers.insert(
//!     "traceparent".to_owned(),
//!     "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03".to_owned(),
//! );
//! headers.insert("tracestate".to_owned(), "congo=t61rcWkgMzE, ,Rojo=1".to_owned());
//! let context = TraceContext.extract(&headers);
//! let span = context.span().span_context().clone();
//! assert_eq!(span.trace_id().to_string(), "0af7651916cd43dd8448eb211c80319c");
//! assert_eq!(span.trace_flags().to_u8(), 0x03, "sampled and random");
//! // `Rojo` is not a legal key, so the whole tracestate is dropped.
//! assert_eq!(span.trace_state().header(), "");
//! ```

use opentelemetry::Context;
use opentelemetry::propagation::text_map_propagator::FieldIter;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};

/// The `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// The `tracestate` header.
pub const TRACESTATE: &str = "tracestate";
/// Most `tracestate` members kept (the specification's limit).
pub const MAX_TRACESTATE_MEMBERS: usize = 32;
/// Most characters of a combined `tracestate` kept (the least the specification asks vendors to keep).
pub const MAX_TRACESTATE_LENGTH: usize = 512;
/// Members longer than this are the first to go when a `tracestate` is too long.
const LONG_MEMBER: usize = 128;
/// The flags this implementation understands and forwards: `sampled` and level 2's `random`.
const KNOWN_FLAGS: u8 = 0x01 | 0x02;
/// The level 2 `random` trace-id flag.
pub const RANDOM_FLAG: u8 = 0x02;

/// The strict W3C Trace Context propagator (see the module documentation).
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContext;

impl TextMapPropagator for TraceContext {
    fn inject_context(&self, context: &Context, injector: &mut dyn Injector) {
        let Some(traceparent) = traceparent(context) else {
            return;
        };
        injector.set(TRACEPARENT, traceparent);
        let span = context.span();
        let span_context = span.span_context();
        let mut state = span_context.trace_state().header();
        if state.is_empty()
            && let Some(Level2TraceState(level2)) = context.get::<Level2TraceState>()
        {
            state.clone_from(level2);
        }
        if !state.is_empty() {
            injector.set(TRACESTATE, state);
        }
    }

    fn extract_with_context(&self, context: &Context, extractor: &dyn Extractor) -> Context {
        let Some((span_context, level2)) = extract_span_context(extractor) else {
            return context.clone();
        };
        let arrived = ArrivedWith {
            trace_id: span_context.trace_id(),
            random: span_context.trace_flags().to_u8() & RANDOM_FLAG != 0,
        };
        let context = context
            .with_remote_span_context(span_context)
            .with_value(arrived);
        match level2 {
            Some(level2) => context.with_value(level2),
            None => context,
        }
    }

    fn fields(&self) -> FieldIter<'_> {
        // `FieldIter` iterates over `String`s; the names are built once.
        static NAMES: std::sync::OnceLock<[String; 2]> = std::sync::OnceLock::new();
        FieldIter::new(NAMES.get_or_init(|| [TRACEPARENT.to_owned(), TRACESTATE.to_owned()]))
    }
}

/// A valid `tracestate` that OpenTelemetry's `TraceState` refuses to hold (its key check predates Level 2's
/// grammar: it allows one `@` and a system part of at most 14 characters). It travels in the context beside
/// the span context, reaches every child span's context the same way, and is injected when the span
/// context's own `tracestate` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Level2TraceState(String);

/// The remote span context `extractor` carries, if its `traceparent` is valid, and the `tracestate` that
/// only [`Level2TraceState`] can carry.
fn extract_span_context(
    extractor: &dyn Extractor,
) -> Option<(SpanContext, Option<Level2TraceState>)> {
    let traceparents = extractor.get_all(TRACEPARENT)?;
    // Several `traceparent` headers cannot be told apart: restart the trace.
    let [traceparent] = traceparents.as_slice() else {
        return None;
    };
    let (trace_id, span_id, flags) = parse_traceparent(traceparent)?;
    let state = extractor
        .get_all(TRACESTATE)
        .and_then(|values| parse_tracestate(&values))
        .unwrap_or_default();
    let (trace_state, level2) = match state.parse::<TraceState>() {
        Ok(trace_state) => (trace_state, None),
        Err(_) => (TraceState::NONE, Some(Level2TraceState(state))),
    };
    Some((
        SpanContext::new(trace_id, span_id, flags, true, trace_state),
        level2,
    ))
}

/// The `random` flag of a trace as its `traceparent` said when it entered this process. The SDK cannot
/// carry it: it builds a sampled-out span's flags, and a new trace's, from scratch. Child spans' contexts
/// inherit this value like any other context value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ArrivedWith {
    trace_id: TraceId,
    random: bool,
}

/// The `traceparent` naming the span of `context`, `None` when it has no valid span.
///
/// Flags: `sampled` as the span context says; `random` as the trace's `traceparent` said when it arrived,
/// and set for a trace this process started (the SDK's trace ids are random).
pub fn traceparent(context: &Context) -> Option<String> {
    let span = context.span();
    let span_context = span.span_context();
    if !span_context.is_valid() {
        return None;
    }
    let random = match context.get::<ArrivedWith>() {
        Some(arrived) if arrived.trace_id == span_context.trace_id() => arrived.random,
        _ => true,
    };
    let flags = (span_context.trace_flags().to_u8() & TraceFlags::SAMPLED.to_u8())
        | if random { RANDOM_FLAG } else { 0 };
    Some(format_traceparent(span_context, TraceFlags::new(flags)))
}

/// `00-{trace-id}-{parent-id}-{flags}` (only the flags this implementation knows).
pub fn format_traceparent(span_context: &SpanContext, flags: TraceFlags) -> String {
    format!(
        "00-{}-{}-{:02x}",
        span_context.trace_id(),
        span_context.span_id(),
        flags.to_u8() & KNOWN_FLAGS
    )
}

/// Parses one `traceparent` value; `None` when it is not valid (the trace restarts).
pub fn parse_traceparent(value: &str) -> Option<(TraceId, SpanId, TraceFlags)> {
    let value = value.trim_matches([' ', '\t']);
    let bytes = value.as_bytes();
    // ASCII only, so every index below is a character boundary.
    if bytes.len() < 55 || !value.is_ascii() {
        return None;
    }
    let version = lower_hex(&value[..2])?;
    match version {
        0xff => return None,
        // Version 00 is exactly this long; a later version may append fields after a dash.
        0x00 if bytes.len() != 55 => return None,
        _ if bytes.len() > 55 && bytes[55] != b'-' => return None,
        _ => {}
    }
    if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
        return None;
    }
    let trace_id = &value[3..35];
    let span_id = &value[36..52];
    let flags = lower_hex(&value[53..55])?;
    if !is_lower_hex(trace_id) || !is_lower_hex(span_id) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    Some((trace_id, span_id, TraceFlags::new(flags & KNOWN_FLAGS)))
}

/// Combines and parses the `tracestate` header values into the one header to forward (`""` for an empty
/// list); `None` when the list is invalid (it is dropped whole). Over-long lists are truncated as the
/// specification says. The work is bounded by [`MAX_TRACESTATE_MEMBERS`] whatever the header's size.
pub fn parse_tracestate(values: &[&str]) -> Option<String> {
    let mut members: Vec<(&str, &str)> = Vec::new();
    for value in values {
        for member in value.split(',') {
            let member = member.trim_matches([' ', '\t']);
            if member.is_empty() {
                continue;
            }
            let (key, value) = member.split_once('=')?;
            if !is_valid_key(key) || !is_valid_value(value) {
                return None;
            }
            // A duplicate key keeps its first value (the suite requires the list to survive).
            if members.iter().any(|(existing, _)| *existing == key) {
                continue;
            }
            // Past the limit the list is invalid; checking here also bounds the work a huge header costs.
            if members.len() == MAX_TRACESTATE_MEMBERS {
                return None;
            }
            members.push((key, value));
        }
    }
    truncate(&mut members);
    let mut header = String::new();
    for (key, value) in members {
        if !header.is_empty() {
            header.push(',');
        }
        header.push_str(key);
        header.push('=');
        header.push_str(value);
    }
    Some(header)
}

/// Drops members until the combined header fits [`MAX_TRACESTATE_LENGTH`]: first those longer than 128
/// characters (from the end), then from the end.
fn truncate(members: &mut Vec<(&str, &str)>) {
    let length = |members: &[(&str, &str)]| -> usize {
        members
            .iter()
            .map(|(k, v)| k.len() + 1 + v.len())
            .sum::<usize>()
            + members.len().saturating_sub(1)
    };
    while length(members) > MAX_TRACESTATE_LENGTH {
        let long = members
            .iter()
            .rposition(|(k, v)| k.len() + 1 + v.len() > LONG_MEMBER);
        match long {
            Some(index) => {
                members.remove(index);
            }
            None => {
                members.pop();
            }
        }
    }
}

/// `key = ( lcalpha / DIGIT ) 0*255 ( keychar )`, `keychar = lcalpha / DIGIT / "_" / "-" / "*" / "/" / "@"`:
/// Level 2's grammar, in which a multi-tenant `tenant@system` key is one case of the same rule.
fn is_valid_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    (1..=256).contains(&bytes.len())
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|&b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'_' | b'-' | b'*' | b'/' | b'@')
        })
}

/// `value = 0*255(chr) nblk-chr`: printable ASCII except `,` and `=`, not ending in a space.
fn is_valid_value(value: &str) -> bool {
    (1..=256).contains(&value.len())
        && value
            .bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
        && !value.ends_with(' ')
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn lower_hex(s: &str) -> Option<u8> {
    if s.len() == 2 && is_lower_hex(s) {
        u8::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn state(values: &[&str]) -> Option<String> {
        parse_tracestate(values)
    }

    #[test]
    fn traceparent_versions_and_lengths() {
        assert!(parse_traceparent(VALID).is_some());
        assert!(
            parse_traceparent(&format!(" {VALID}\t")).is_some(),
            "optional white space"
        );
        // Version 00 is exactly 55 characters.
        assert!(parse_traceparent(&format!("{VALID}-")).is_none());
        assert!(parse_traceparent(&format!("{VALID}0")).is_none());
        // A later version may carry more fields, after a dash.
        let future = VALID.replacen("00", "cc", 1);
        assert!(parse_traceparent(&future).is_some());
        assert!(parse_traceparent(&format!("{future}-what-the-future-holds")).is_some());
        assert!(parse_traceparent(&format!("{future}x")).is_none());
        assert!(parse_traceparent(&VALID.replacen("00", "ff", 1)).is_none());
        // Fields of the wrong length.
        assert!(
            parse_traceparent(&VALID.replacen("00-", "0-", 1)).is_none(),
            "version too short"
        );
        assert!(
            parse_traceparent(&VALID.replacen("00-", "000-", 1)).is_none(),
            "version too long"
        );
        assert!(
            parse_traceparent(&VALID.replace("-01", "-1")).is_none(),
            "flags too short"
        );
        assert!(
            parse_traceparent(&VALID.replace("-01", "-001")).is_none(),
            "flags too long"
        );
        assert!(parse_traceparent(&VALID.replace("b7ad6b7169203331", "b7ad6b716920333")).is_none());
        assert!(parse_traceparent(&VALID.replace("0af7651916cd43dd", "0af7651916cd43d")).is_none());
        // Case, zeros, separators.
        assert!(parse_traceparent(&VALID.replace("0af7", "0AF7")).is_none());
        assert!(
            parse_traceparent(&VALID.replace("0af7651916cd43dd8448eb211c80319c", &"0".repeat(32)))
                .is_none()
        );
        assert!(parse_traceparent(&VALID.replace("b7ad6b7169203331", &"0".repeat(16))).is_none());
        assert!(parse_traceparent(&VALID.replace('-', "_")).is_none());
        assert!(parse_traceparent("").is_none());
        assert!(parse_traceparent("00-é").is_none());
    }

    #[test]
    fn traceparent_flags_keep_sampled_and_random_only() {
        let flags =
            |f: &str| parse_traceparent(&VALID.replace("-01", f)).map(|(_, _, f)| f.to_u8());
        assert_eq!(flags("-00"), Some(0));
        assert_eq!(flags("-02"), Some(RANDOM_FLAG));
        assert_eq!(flags("-03"), Some(3));
        assert_eq!(flags("-ff"), Some(3));
        assert_eq!(flags("-0g"), None);
    }

    #[test]
    fn several_traceparent_headers_restart_the_trace() {
        struct Two;
        impl Extractor for Two {
            fn get(&self, _: &str) -> Option<&str> {
                Some(VALID)
            }
            fn keys(&self) -> Vec<&str> {
                vec![TRACEPARENT]
            }
            fn get_all(&self, key: &str) -> Option<Vec<&str>> {
                (key == TRACEPARENT).then(|| vec![VALID, VALID])
            }
        }
        assert!(extract_span_context(&Two).is_none());
    }

    #[test]
    fn a_level2_tracestate_survives_a_hop() {
        use std::collections::HashMap;
        let mut incoming = HashMap::new();
        incoming.insert(TRACEPARENT.to_owned(), VALID.to_owned());
        incoming.insert(
            TRACESTATE.to_owned(),
            "foo@@bar=1,t@vvvvvvvvvvvvvvv=2".to_owned(),
        );
        let context = TraceContext.extract(&incoming);
        assert!(context.span().span_context().is_valid());
        let mut outgoing: HashMap<String, String> = HashMap::new();
        TraceContext.inject_context(&context, &mut outgoing);
        assert_eq!(outgoing[TRACESTATE], "foo@@bar=1,t@vvvvvvvvvvvvvvv=2");
        assert_eq!(outgoing[TRACEPARENT], VALID);
    }

    #[test]
    fn the_random_flag_is_what_arrived_and_set_on_our_own_traces() {
        use std::collections::HashMap;
        let hop = |flags: &str| {
            let mut incoming = HashMap::new();
            incoming.insert(TRACEPARENT.to_owned(), VALID.replace("-01", flags));
            traceparent(&TraceContext.extract(&incoming)).unwrap()
        };
        assert!(hop("-02").ends_with("-02"));
        assert!(hop("-03").ends_with("-03"));
        assert!(hop("-01").ends_with("-01"));
        assert!(hop("-00").ends_with("-00"));
        let (trace_id, span_id, _) = parse_traceparent(VALID).unwrap();
        let ours = Context::new().with_remote_span_context(SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        ));
        assert!(traceparent(&ours).unwrap().ends_with("-03"));
    }

    #[test]
    fn tracestate_grammar() {
        assert_eq!(state(&["a=1,b=2"]).as_deref(), Some("a=1,b=2"));
        assert_eq!(
            state(&["a=1", "b=2"]).as_deref(),
            Some("a=1,b=2"),
            "headers combined"
        );
        assert_eq!(
            state(&[" a=1 ,\t, b=2\t"]).as_deref(),
            Some("a=1,b=2"),
            "white space, empty members"
        );
        assert_eq!(
            state(&[""]).as_deref(),
            Some(""),
            "an empty header is an empty list"
        );
        assert_eq!(
            state(&["tenant@system=1"]).as_deref(),
            Some("tenant@system=1")
        );
        assert_eq!(state(&["0tenant@s=1"]).as_deref(), Some("0tenant@s=1"));
        assert_eq!(
            state(&["0a=1"]).as_deref(),
            Some("0a=1"),
            "Level 2: a key may start with a digit"
        );
        assert!(
            state(&["A=1,b=2"]).is_none(),
            "an invalid member drops the list"
        );
        assert!(state(&["foo.bar=1"]).is_none());
        assert!(state(&["foo =1"]).is_none());
        assert!(state(&["@a=1,b=2"]).is_none());
        assert_eq!(state(&["a@=1"]).as_deref(), Some("a@=1"));
        assert_eq!(state(&["a@b@c=1"]).as_deref(), Some("a@b@c=1"));
        assert!(state(&[&format!("{}@{}=1", "t".repeat(241), "v".repeat(14))]).is_some());
        assert!(state(&[&format!("{}=1", "a".repeat(256))]).is_some());
        assert!(state(&[&format!("{}=1", "a".repeat(257))]).is_none());
        assert_eq!(
            state(&["a=1,a=2"]).as_deref(),
            Some("a=1"),
            "a duplicate keeps the first value"
        );
        assert_eq!(state(&["a=1", "a=2,b=3"]).as_deref(), Some("a=1,b=3"));
        assert_eq!(
            state(&[" a= b"]).as_deref(),
            Some("a= b"),
            "a value may start with a space"
        );
        assert!(state(&["a="]).is_none());
        assert!(
            state(&["a=b "]).is_some(),
            "trailing white space of a member is OWS"
        );
        assert!(state(&["a=b c"]).is_some());
        assert!(state(&["a=b\u{7f}"]).is_none());
        assert!(state(&["a=b\tc"]).is_none());
        assert!(state(&["a=é"]).is_none());
        assert!(state(&["a=b=c"]).is_none());
        assert!(state(&["a"]).is_none());
    }

    #[test]
    fn tracestate_limits() {
        let members: Vec<String> = (0..32).map(|i| format!("k{i}=v")).collect();
        assert_eq!(
            state(&[&members.join(",")]).map(|s| s.split(',').count()),
            Some(32)
        );
        let members: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert!(
            state(&[&members.join(",")]).is_none(),
            "more than 32 members"
        );
        // A 2 000-member list costs no more than 33 members' work and is dropped.
        let members: Vec<String> = (0..2000).map(|i| format!("k{i}=v")).collect();
        assert!(state(&[&members.join(",")]).is_none());
        // Too long: the long members go first, then from the end.
        let long = format!("long={}", "x".repeat(200));
        let short: Vec<String> = (0..20)
            .map(|i| format!("key{i:02}={}", "y".repeat(20)))
            .collect();
        let header = format!("{},{long}", short.join(","));
        let kept = state(&[&header]).unwrap();
        assert!(kept.len() <= MAX_TRACESTATE_LENGTH, "{}", kept.len());
        assert!(!kept.contains("long="));
        assert!(kept.starts_with("key00="));
    }

    #[test]
    fn formats_what_it_parses() {
        let (trace_id, span_id, flags) = parse_traceparent(VALID).unwrap();
        let context = SpanContext::new(trace_id, span_id, flags, true, TraceState::NONE);
        assert_eq!(format_traceparent(&context, flags), VALID);
    }
}
