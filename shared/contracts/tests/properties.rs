//! Property tests of the domain types parsed from outside: money, currencies, e-mail addresses. Whatever
//! arrives, the answer is a value or an error, never a panic; and what is valid round-trips exactly.

// Test code: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use tracehop_contracts::domain::{Amount, Currency, Email};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_text_is_a_total_or_an_error(text in "\\PC{0,40}") {
        let _ = Amount::parse(&text, Currency::parse("usd").unwrap());
        let _ = Amount::parse(&text, Currency::parse("jpy").unwrap());
    }

    #[test]
    fn valid_totals_round_trip(whole in 0_i64..1_000_000, cents in 0_i64..100) {
        prop_assume!(whole * 100 + cents > 0);
        let text = format!("{whole}.{cents:02}");
        let amount = Amount::parse(&text, Currency::parse("usd").unwrap()).unwrap();
        prop_assert_eq!(amount.minor_units(), whole * 100 + cents);
        prop_assert_eq!(amount.decimal(), text);
    }

    #[test]
    fn numeric_looking_junk_never_panics(text in "[-+0-9.eE,_ ]{0,30}") {
        let _ = Amount::parse(&text, Currency::parse("eur").unwrap());
    }

    #[test]
    fn any_text_is_a_currency_or_an_error(text in "\\PC{0,8}") {
        if let Ok(currency) = Currency::parse(&text) {
            prop_assert_eq!(currency.code().len(), 3);
        }
    }

    #[test]
    fn accepted_emails_are_sane(text in "\\PC{0,300}") {
        if let Ok(email) = Email::parse(&text) {
            prop_assert_eq!(email.as_str().matches('@').count(), 1);
            prop_assert!(email.as_str().len() <= 254);
            prop_assert!(!email.as_str().chars().any(char::is_whitespace));
        }
    }
}
