//! Text that must never be printed: passwords and session tokens.

use std::fmt;

/// A password or a token. `Debug` and `Display` print `<redacted>`, so a secret cannot leak through a log
/// line, a span field or a panic message; the text is reached only through [`Secret::expose`], which is
/// easy to find in review. On the wire it is a plain JSON string.
///
/// ```
/// use tracehop_contracts::domain::Secret;
///
/// let password = Secret::new("correct horse battery");
/// assert_eq!(format!("{password:?} {password}"), "<redacted> <redacted>");
/// assert_eq!(password.expose(), "correct horse battery");
/// ```
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    /// The secret's text, for the one place that needs it (hashing, a header, a lookup digest).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}
