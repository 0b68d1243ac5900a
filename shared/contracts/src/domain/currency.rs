//! ISO 4217 currency codes, with the number of minor units each uses.

use std::fmt;

/// A currency tracehop can charge in. Lowercase on the wire, like Stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: &'static str,
    minor_digits: u32,
}

/// The currencies accepted (a deliberately short list: each one must be supported by the payment provider).
const SUPPORTED: &[(&str, u32)] = &[
    ("usd", 2),
    ("eur", 2),
    ("gbp", 2),
    ("chf", 2),
    ("cad", 2),
    ("aud", 2),
    ("sek", 2),
    ("nok", 2),
    ("dkk", 2),
    ("jpy", 0),
];

/// Not a supported ISO 4217 code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown currency {0:?}: expected one of usd, eur, gbp, chf, cad, aud, sek, nok, dkk, jpy")]
pub struct UnknownCurrency(pub String);

impl Currency {
    /// Parses a three-letter code, case-insensitively.
    pub fn parse(input: &str) -> Result<Self, UnknownCurrency> {
        let trimmed = input.trim();
        SUPPORTED
            .iter()
            .find(|(code, _)| trimmed.len() == 3 && code.eq_ignore_ascii_case(trimmed))
            .map(|&(code, minor_digits)| Self { code, minor_digits })
            .ok_or_else(|| UnknownCurrency(truncate(input)))
    }

    /// Lowercase code, as Stripe wants it.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// Digits after the decimal point (2 for usd, 0 for jpy).
    pub fn minor_digits(&self) -> u32 {
        self.minor_digits
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

fn truncate(input: &str) -> String {
    input.chars().take(16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_codes_case_insensitively() {
        assert_eq!(Currency::parse("USD").unwrap().code(), "usd");
        assert_eq!(Currency::parse(" eur ").unwrap().code(), "eur");
        assert_eq!(Currency::parse("jpy").unwrap().minor_digits(), 0);
    }

    #[test]
    fn rejects_unknown_and_garbage() {
        for input in ["", "us", "usdd", "xxx", "€", "u\u{0}d", "🇺🇸"] {
            assert!(Currency::parse(input).is_err(), "{input:?} accepted");
        }
    }
}
