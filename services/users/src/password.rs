//! Argon2id password hashing.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use tracehop_contracts::domain::Secret;

/// A password as typed, checked for length only: at least 12 characters (OWASP ASVS 2.1.1), at most 128
/// (2.1.2); longer is better and we impose no character classes (2.1.9). Never prints.
pub struct Password(Secret);

/// Why a password was refused.
#[derive(Debug, thiserror::Error)]
#[error("password must be 12 to 128 characters")]
pub struct InvalidPassword;

impl Password {
    pub fn parse(input: Secret) -> Result<Self, InvalidPassword> {
        let length = input.expose().chars().count();
        if (12..=128).contains(&length) {
            Ok(Self(input))
        } else {
            Err(InvalidPassword)
        }
    }
}

/// Hashing failed (it only does on a broken random source or absurd parameters).
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

/// Hashes with a fresh salt; CPU-bound, call it on the hashing pool ([`crate::hashing`]).
pub fn hash(password: &Password) -> Result<String, HashError> {
    let mut salt_bytes = [0_u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt_bytes);
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|error| HashError(error.to_string()))?;
    Argon2::default()
        .hash_password(password.0.expose().as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| HashError(error.to_string()))
}

/// Whether `password` matches the stored PHC string (false for a malformed hash).
pub fn verify(password: &str, stored: &str) -> bool {
    PasswordHash::new(stored)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash to verify against when the user does not exist, so "no such user" and "wrong password" take the
/// same time.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let placeholder = Password(Secret::new(crate::token::generate()));
        hash(&placeholder).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let password = Password::parse(Secret::new("correct horse battery")).unwrap();
        let stored = hash(&password).unwrap();
        assert!(stored.starts_with("$argon2id$"));
        assert!(verify("correct horse battery", &stored));
        assert!(!verify("wrong horse battery", &stored));
        assert!(!verify("anything", "not a hash"));
    }

    #[test]
    fn length_rules() {
        assert!(Password::parse(Secret::new("short")).is_err());
        assert!(Password::parse(Secret::new("12345678901")).is_err());
        assert!(Password::parse(Secret::new("x".repeat(129))).is_err());
        assert!(Password::parse(Secret::new("123456789012")).is_ok());
    }
}
