//! Property tests of everything parsed from outside: W3C `traceparent`/`tracestate`/`baggage` in HTTP and
//! NATS headers, SQL naming. Whatever arrives, the answer is a value or an error, never a panic; and what is
//! valid round-trips exactly.

use opentelemetry::trace::TraceContextExt;
use proptest::prelude::*;
use tracehop_telemetry::propagation::{HttpHeaderExtractor, NatsHeaderExtractor, extract};

fn install_propagators() {
    opentelemetry::global::set_text_map_propagator(tracehop_telemetry::setup::propagator());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_trace_headers_extract_without_panicking(
        traceparent in "\\PC{0,80}",
        tracestate in "\\PC{0,600}",
        baggage in "\\PC{0,600}",
    ) {
        install_propagators();
        let mut nats = async_nats::HeaderMap::new();
        nats.insert("traceparent", traceparent.as_str());
        nats.insert("tracestate", tracestate.as_str());
        nats.insert("baggage", baggage.as_str());
        let _ = extract(&NatsHeaderExtractor(&nats));
        let mut http = reqwest::header::HeaderMap::new();
        for (name, value) in [("traceparent", &traceparent), ("tracestate", &tracestate), ("baggage", &baggage)] {
            if let Ok(value) = reqwest::header::HeaderValue::from_str(value) {
                http.insert(name, value);
            }
        }
        let _ = extract(&HttpHeaderExtractor(&http));
    }

    #[test]
    fn valid_traceparents_are_honoured(trace in "[0-9a-f]{32}", span in "[0-9a-f]{16}", sampled in any::<bool>()) {
        prop_assume!(trace != "0".repeat(32) && span != "0".repeat(16));
        install_propagators();
        let mut nats = async_nats::HeaderMap::new();
        let flags = if sampled { "01" } else { "00" };
        nats.insert("traceparent", format!("00-{trace}-{span}-{flags}").as_str());
        let context = extract(&NatsHeaderExtractor(&nats));
        let span_context = context.span().span_context().clone();
        prop_assert!(span_context.is_valid());
        prop_assert_eq!(span_context.trace_id().to_string(), trace);
        prop_assert_eq!(span_context.span_id().to_string(), span);
        prop_assert_eq!(span_context.is_sampled(), sampled);
    }

    #[test]
    fn any_sql_is_described_without_panicking(sql in "\\PC{0,200}") {
        let (operation, _table) = tracehop_telemetry::db::describe(&sql);
        prop_assert!(!operation.is_empty());
    }
}

#[test]
fn overlong_trace_headers_are_ignored() {
    install_propagators();
    let mut nats = async_nats::HeaderMap::new();
    nats.insert(
        "traceparent",
        format!("00-{}-{}-01", "a".repeat(32), "b".repeat(16)).as_str(),
    );
    nats.insert("tracestate", "k=v,".repeat(10_000).as_str());
    let context = extract(&NatsHeaderExtractor(&nats));
    // A tracestate beyond the spec's 32 members is dropped, not a reason to fail.
    assert!(context.span().span_context().is_valid());
}
