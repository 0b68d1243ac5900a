//! Money as integer minor units (cents), never floating point.
//!
//! Totals arrive as a decimal string (`"49.99"`) or a JSON number with at most as many decimals as the
//! currency has minor digits. The JSON number is parsed from its *text* (serde_json's arbitrary precision
//! is not needed: we read the raw token), so `0.1 + 0.2` problems cannot happen.

use std::fmt;

use super::Currency;

/// The largest amount accepted for one checkout, in major units (a guard against absurd totals).
pub const MAX_MAJOR_UNITS: i64 = 1_000_000;

/// A positive amount in a currency's minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Amount {
    minor_units: i64,
    currency: Currency,
}

/// Why a total was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("amount is not a decimal number like \"49.99\"")]
    NotANumber,
    #[error("amount has more than {0} decimal places")]
    TooPrecise(u32),
    #[error("amount must be greater than zero")]
    NotPositive,
    #[error("amount exceeds the maximum of {MAX_MAJOR_UNITS} per checkout")]
    TooLarge,
}

impl Amount {
    /// Parses a decimal text such as `"49.99"`, `"5"` or `"0.50"` in `currency`.
    pub fn parse(text: &str, currency: Currency) -> Result<Self, MoneyError> {
        let text = text.trim();
        if text.is_empty() || text.len() > 32 {
            return Err(MoneyError::NotANumber);
        }
        if let Some(rest) = text.strip_prefix('-') {
            // Check the digits first so "-abc" is NotANumber, "-5" is NotPositive.
            return match Self::parse(rest, currency) {
                Ok(_) => Err(MoneyError::NotPositive),
                Err(MoneyError::NotPositive) => Err(MoneyError::NotPositive),
                Err(other) => Err(other),
            };
        }
        let (whole, fraction) = match text.split_once('.') {
            Some((whole, fraction)) => (whole, fraction),
            None => (text, ""),
        };
        let digits_only = |s: &str| s.chars().all(|c| c.is_ascii_digit());
        if whole.is_empty() || !digits_only(whole) || !digits_only(fraction) {
            return Err(MoneyError::NotANumber);
        }
        if text.contains('.') && fraction.is_empty() {
            return Err(MoneyError::NotANumber);
        }
        let digits = currency.minor_digits();
        let fraction = fraction.trim_end_matches('0');
        if fraction.len() > digits as usize {
            return Err(MoneyError::TooPrecise(digits));
        }
        let whole = whole.trim_start_matches('0');
        if whole.len() > 7 {
            return Err(MoneyError::TooLarge);
        }
        let whole: i64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| MoneyError::NotANumber)?
        };
        if whole > MAX_MAJOR_UNITS {
            return Err(MoneyError::TooLarge);
        }
        let scale = 10_i64.pow(digits);
        let mut fraction_units: i64 = 0;
        for (index, digit) in fraction.chars().enumerate() {
            let value = i64::from(digit.to_digit(10).unwrap_or(0));
            fraction_units += value * 10_i64.pow(digits - 1 - index as u32);
        }
        let minor_units = whole * scale + fraction_units;
        if minor_units <= 0 {
            return Err(MoneyError::NotPositive);
        }
        if minor_units > MAX_MAJOR_UNITS * scale {
            return Err(MoneyError::TooLarge);
        }
        Ok(Self {
            minor_units,
            currency,
        })
    }

    /// Builds an amount from minor units already validated elsewhere (a row, an internal message).
    pub fn from_minor_units(minor_units: i64, currency: Currency) -> Result<Self, MoneyError> {
        let scale = 10_i64.pow(currency.minor_digits());
        if minor_units <= 0 {
            Err(MoneyError::NotPositive)
        } else if minor_units > MAX_MAJOR_UNITS * scale {
            Err(MoneyError::TooLarge)
        } else {
            Ok(Self {
                minor_units,
                currency,
            })
        }
    }

    pub fn minor_units(&self) -> i64 {
        self.minor_units
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }
}

impl Amount {
    /// The amount in major units as decimal text: `49.99` (`500` for yen).
    pub fn decimal(&self) -> String {
        let digits = self.currency.minor_digits();
        if digits == 0 {
            return self.minor_units.to_string();
        }
        let scale = 10_i64.pow(digits);
        format!(
            "{}.{:0width$}",
            self.minor_units / scale,
            self.minor_units % scale,
            width = digits as usize
        )
    }
}

impl fmt::Display for Amount {
    /// `49.99 usd`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.decimal(), self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usd() -> Currency {
        Currency::parse("usd").unwrap()
    }

    #[test]
    fn parses_decimal_text_to_minor_units() {
        assert_eq!(Amount::parse("49.99", usd()).unwrap().minor_units(), 4999);
        assert_eq!(Amount::parse("5", usd()).unwrap().minor_units(), 500);
        assert_eq!(Amount::parse("0.5", usd()).unwrap().minor_units(), 50);
        assert_eq!(Amount::parse("0.50", usd()).unwrap().minor_units(), 50);
        assert_eq!(Amount::parse("10.100", usd()).unwrap().minor_units(), 1010);
        assert_eq!(Amount::parse("007.01", usd()).unwrap().minor_units(), 701);
        let yen = Currency::parse("jpy").unwrap();
        assert_eq!(Amount::parse("500", yen).unwrap().minor_units(), 500);
        assert_eq!(Amount::parse("500.5", yen), Err(MoneyError::TooPrecise(0)));
    }

    #[test]
    fn refuses_bad_totals() {
        assert_eq!(Amount::parse("0", usd()), Err(MoneyError::NotPositive));
        assert_eq!(Amount::parse("0.00", usd()), Err(MoneyError::NotPositive));
        assert_eq!(Amount::parse("-5", usd()), Err(MoneyError::NotPositive));
        assert_eq!(
            Amount::parse("1.001", usd()),
            Err(MoneyError::TooPrecise(2))
        );
        assert_eq!(
            Amount::parse("1000000.01", usd()),
            Err(MoneyError::TooLarge)
        );
        assert_eq!(
            Amount::parse("99999999999999999999999", usd()),
            Err(MoneyError::TooLarge)
        );
        for junk in [
            "", "abc", "1e3", "1,5", ".5", "5.", "NaN", "inf", "+5", " 1 2", "١٢",
        ] {
            assert_eq!(
                Amount::parse(junk, usd()),
                Err(MoneyError::NotANumber),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn displays_in_major_units() {
        assert_eq!(
            Amount::parse("49.9", usd()).unwrap().to_string(),
            "49.90 usd"
        );
    }
}
