//! Idempotency keys: the client's (the `Idempotency-Key` header) or one the gateway makes up.

use std::fmt;

/// A valid idempotency key: 1 to 255 characters of printable ASCII (spaces allowed inside), trimmed.
/// The gateway checks a client's key with it, and billing checks what the gateway sends with it again:
/// one rule on both sides.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why a text is not an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an idempotency key is 1 to 255 printable ASCII characters")]
pub struct InvalidIdempotencyKey;

impl IdempotencyKey {
    /// The longest key accepted.
    pub const MAX_LENGTH: usize = 255;

    /// Checks `text` (surrounding white space is dropped).
    ///
    /// ```
    /// use tracehop_contracts::domain::IdempotencyKey;
    /// assert_eq!(IdempotencyKey::parse(" order-42 ").unwrap().as_str(), "order-42");
    /// assert!(IdempotencyKey::parse("").is_err());
    /// assert!(IdempotencyKey::parse("line\nbreak").is_err());
    /// assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    /// ```
    pub fn parse(text: &str) -> Result<Self, InvalidIdempotencyKey> {
        let key = text.trim();
        let printable = key.chars().all(|c| c.is_ascii_graphic() || c == ' ');
        if key.is_empty() || key.len() > Self::MAX_LENGTH || !printable {
            return Err(InvalidIdempotencyKey);
        }
        Ok(Self(key.to_owned()))
    }

    /// A new random key (a UUID), for a checkout whose client sent none.
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
