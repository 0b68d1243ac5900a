//! E-mail addresses: a pragmatic check (one `@`, a dotted domain, sane length), normalised to lowercase.

use std::fmt;

/// A syntactically plausible e-mail address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Email(String);

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid e-mail address: {0}")]
pub struct InvalidEmail(&'static str);

/// RFC 5321 limits a path to 254 characters.
const MAX_LEN: usize = 254;

impl Email {
    pub fn parse(input: &str) -> Result<Self, InvalidEmail> {
        let candidate = input.trim();
        if candidate.is_empty() {
            return Err(InvalidEmail("empty"));
        }
        if candidate.len() > MAX_LEN {
            return Err(InvalidEmail("longer than 254 characters"));
        }
        if candidate
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';'))
        {
            return Err(InvalidEmail("contains spaces or forbidden characters"));
        }
        let Some((local, domain)) = candidate.split_once('@') else {
            return Err(InvalidEmail("missing @"));
        };
        if local.is_empty() || local.len() > 64 {
            return Err(InvalidEmail("local part must be 1 to 64 characters"));
        }
        if domain.contains('@') {
            return Err(InvalidEmail("more than one @"));
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2
            || labels.iter().any(|label| {
                label.is_empty()
                    || label.starts_with('-')
                    || label.ends_with('-')
                    || !label.chars().all(|c| c.is_alphanumeric() || c == '-')
            })
        {
            return Err(InvalidEmail("domain must be like example.com"));
        }
        Ok(Self(candidate.to_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_normalises() {
        assert_eq!(
            Email::parse(" Dani@Example.COM ").unwrap().as_str(),
            "dani@example.com"
        );
        assert!(Email::parse("a.b+tag@mail.example.co.uk").is_ok());
    }

    #[test]
    fn rejects_bad_addresses() {
        let long = format!("{}@example.com", "a".repeat(250));
        for input in [
            "",
            "dani",
            "@example.com",
            "dani@",
            "dani@localhost",
            "dani@@example.com",
            "dani@exa mple.com",
            "dani@-example.com",
            "dani@example..com",
            "<dani@example.com>",
            long.as_str(),
        ] {
            assert!(Email::parse(input).is_err(), "{input:?} accepted");
        }
    }
}
