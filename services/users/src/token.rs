//! Session tokens: 256 random bits, hex on the wire, SHA-256 in the database.

use sha2::{Digest, Sha256};

/// A new random token (64 hex characters).
pub fn generate() -> String {
    let mut bytes = [0_u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    hex::encode(bytes)
}

/// What is stored for a token.
pub fn digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token in an `Authorization: Bearer <token>` header value, if well-formed.
pub fn from_authorization(header: Option<&str>) -> Option<&str> {
    let value = header?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    let well_formed = scheme.eq_ignore_ascii_case("bearer")
        && token.len() == 64
        && token.chars().all(|c| c.is_ascii_hexdigit());
    well_formed.then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_parse_back() {
        let a = generate();
        assert_ne!(a, generate());
        let header = format!("Bearer {a}");
        assert_eq!(from_authorization(Some(&header)), Some(a.as_str()));
        assert_eq!(digest(&a).len(), 64);
        assert_ne!(digest(&a), a);
    }

    #[test]
    fn malformed_headers() {
        for header in [
            "",
            "Bearer",
            "Bearer abc",
            "Basic dXNlcjpwYXNz",
            &format!("Token {}", "a".repeat(64)),
        ] {
            assert_eq!(from_authorization(Some(header)), None, "{header:?}");
        }
        assert_eq!(from_authorization(None), None);
    }
}
