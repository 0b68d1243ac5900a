//! Whatever bytes arrive on `order.completed` (payload and header values), the consumer's path answers with
//! an event or a readable reason, and the dead letter it builds from that reason is a valid NATS message:
//! never a panic (async-nats panics on a header value with a line break).

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use notifications::consumer::{
    DEAD_LETTER_REASON, MAX_EVENT_BYTES, Malformed, dead_letter_headers, parse_delivery,
};
use proptest::prelude::*;

fn some_headers() -> async_nats::HeaderMap {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "event-1");
    headers
}

fn assert_valid_dead_letter(reason: &str, subject: &str, size: usize) {
    let headers = dead_letter_headers(reason, subject, Some(7), size);
    let written = headers.get(DEAD_LETTER_REASON).expect("reason header");
    assert!(!written.as_str().contains(['\r', '\n', '\0']));
    assert!(written.as_str().len() <= 512);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_payload_is_an_event_or_a_clean_reason(payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
        match parse_delivery(Some(&some_headers()), &payload) {
            Ok(_) => {}
            Err(malformed) => assert_valid_dead_letter(&malformed.to_string(), "order.completed", payload.len()),
        }
    }

    #[test]
    fn any_text_makes_valid_dead_letter_headers(reason in any::<String>(), subject in any::<String>()) {
        assert_valid_dead_letter(&reason, &subject, 10);
    }

    #[test]
    fn an_order_id_with_control_characters_is_dead_lettered_cleanly(junk in "[\\x00-\\x1f\\x7f]{1,8}") {
        let payload = format!(
            r#"{{"eventId":"00000000-0000-0000-0000-000000000001","orderId":"{junk}","userId":"00000000-0000-0000-0000-000000000002","email":"a@example.com","amountMinor":1,"currency":"usd","chargeId":"ch_1"}}"#
        );
        let malformed = parse_delivery(Some(&some_headers()), payload.as_bytes()).unwrap_err();
        assert_valid_dead_letter(&malformed.to_string(), "order.completed", payload.len());
    }
}

#[test]
fn a_reason_never_quotes_the_payload() {
    let payload = br#"{"eventId":"not-a-uuid\nsecret@example.com"}"#;
    let reason = parse_delivery(Some(&some_headers()), payload)
        .unwrap_err()
        .to_string();
    assert!(!reason.contains("secret"), "{reason}");
    assert!(reason.starts_with("malformed message:"), "{reason}");
}

#[test]
fn headerless_and_oversized_messages_are_malformed() {
    assert_eq!(parse_delivery(None, b"{}"), Err(Malformed::NoHeaders));
    let big = vec![b' '; MAX_EVENT_BYTES + 1];
    assert_eq!(
        parse_delivery(Some(&some_headers()), &big),
        Err(Malformed::TooLarge(MAX_EVENT_BYTES + 1))
    );
    let headers = dead_letter_headers("too large", "order.completed", Some(3), 1_000_000);
    assert_eq!(
        headers
            .get("Tracehop-Payload-Truncated-From")
            .map(|v| v.as_str()),
        Some("1000000")
    );
}
