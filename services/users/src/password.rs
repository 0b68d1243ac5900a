//! Argon2id password hashing, in memory the hashing thread owns.
//!
//! New hashes use OWASP's Argon2id configuration of 7 MiB, five passes, one lane ([`PARAMS`]): the Password
//! Storage Cheat Sheet lists it beside 19 MiB and two passes (the `argon2` crate's default, used before)
//! as giving the same defence, the difference being only memory against CPU. Each hashing thread lends one
//! [`HashMemory`] to every hash it makes or checks, and gives it back to the operating system once the thread
//! has been idle for a moment ([`crate::hashing`]): users holds 7 MiB per hashing thread during a burst of
//! logins and sign-ups, and none between them (it once held 19 MiB per thread that had ever hashed,
//! BENCHMARKS.md section 6). A stored hash made with other parameters (the older 19 MiB ones) is still checked
//! with its own, in memory taken for that check alone.

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{ARGON2ID_IDENT, Algorithm, Argon2, Block, Params, Version};
use tracehop_contracts::domain::Secret;

/// The parameters of new hashes: Argon2id, m = 7 MiB (7168 blocks of 1 KiB), t = 5, p = 1, 32 bytes.
pub const PARAMS: Params = match Params::new(7 * 1024, 5, 1, Some(32)) {
    Ok(params) => params,
    Err(_) => panic!("OWASP's Argon2id parameters are valid"),
};

/// The most memory a stored hash may ask for to be checked (64 MiB): a hash asking for more is refused, not
/// allocated.
const MAX_CHECK_BLOCKS: u32 = 64 * 1024;

/// A hashing thread's Argon2 working memory, reused by every hash it makes or checks with [`PARAMS`] until
/// released by the thread that owns it, after [`crate::hashing::IDLE_RELEASE`] without a job.
#[derive(Default)]
pub struct HashMemory(Vec<Block>);

/// The blocks reserved whenever the memory is allocated: more than glibc's largest dynamic mmap threshold
/// (32 MiB on 64-bit, mallopt(3)), so that malloc always maps the reservation on its own and `free` always
/// unmaps it. A 7 MiB allocation would be mapped only the first time: freeing it raises the threshold to its
/// size, and the next one comes from the thread's arena, which keeps it when it is freed. Only the blocks a
/// hash uses are ever touched, so the rest of the reservation costs address space, not memory.
const RESERVED_BLOCKS: usize = 33 * 1024;

impl HashMemory {
    /// The first `count` blocks, allocated on first use.
    fn blocks(&mut self, count: usize) -> &mut [Block] {
        if self.0.len() < count {
            if self.0.capacity() < count {
                self.0 = Vec::with_capacity(count.max(RESERVED_BLOCKS));
            }
            self.0.resize(count, Block::default());
        }
        &mut self.0[..count]
    }

    /// Gives the memory back to the operating system; the next hash allocates it again.
    pub(crate) fn release(&mut self) {
        self.0 = Vec::new();
    }

    /// Whether memory is held now.
    pub(crate) fn is_held(&self) -> bool {
        self.0.capacity() > 0
    }
}

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

/// Hashes with a fresh salt into a PHC string (`$argon2id$v=19$m=7168,t=5,p=1$...`); CPU-bound, call it on
/// the hashing pool ([`crate::hashing`]), which lends its thread's `memory`.
pub fn hash(password: &Password, memory: &mut HashMemory) -> Result<String, HashError> {
    let failed = |error: &dyn std::fmt::Display| HashError(error.to_string());
    let mut salt_bytes = [0_u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt_bytes);
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|error| failed(&error))?;
    let mut out = [0_u8; 32];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, PARAMS)
        .hash_password_into_with_memory(
            password.0.expose().as_bytes(),
            &salt_bytes,
            &mut out,
            memory.blocks(PARAMS.block_count()),
        )
        .map_err(|error| failed(&error))?;
    let phc = PasswordHash {
        algorithm: ARGON2ID_IDENT,
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&PARAMS).map_err(|error| failed(&error))?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(|error| failed(&error))?),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the stored PHC string (false for a malformed hash, or one that is not Argon2 or
/// asks for more than 64 MiB), checked with the parameters the string names.
pub fn verify(password: &str, stored: &str, memory: &mut HashMemory) -> bool {
    check(password, stored, memory).unwrap_or(false)
}

fn check(password: &str, stored: &str, memory: &mut HashMemory) -> Option<bool> {
    let parsed = PasswordHash::new(stored).ok()?;
    let algorithm = Algorithm::try_from(parsed.algorithm).ok()?;
    let version = parsed
        .version
        .map_or(Ok(Version::V0x13), Version::try_from)
        .ok()?;
    let params = Params::try_from(&parsed).ok()?;
    if params.m_cost() > MAX_CHECK_BLOCKS {
        return None;
    }
    let expected = parsed.hash?;
    let mut salt = [0_u8; 64];
    let salt = parsed.salt?.decode_b64(&mut salt).ok()?;
    let mut out = vec![0_u8; expected.len()];
    let argon2 = Argon2::new(algorithm, version, params.clone());
    let count = params.block_count();
    let hashed = if count <= PARAMS.block_count() {
        argon2.hash_password_into_with_memory(
            password.as_bytes(),
            salt,
            &mut out,
            memory.blocks(count),
        )
    } else {
        // An older hash asking for more than the thread keeps: memory for this check only.
        argon2.hash_password_into(password.as_bytes(), salt, &mut out)
    };
    hashed.ok()?;
    // `Output`'s comparison takes the same time whatever the bytes.
    Some(Output::new(&out).ok()? == expected)
}

/// A hash to verify against when the user does not exist, so "no such user" and "wrong password" take the
/// same time.
pub fn dummy_hash(memory: &mut HashMemory) -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(dummy) = DUMMY.get() {
        return dummy;
    }
    let placeholder = Password(Secret::new(crate::token::generate()));
    DUMMY.get_or_init(|| hash(&placeholder, memory).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

    #[test]
    fn hash_then_verify() {
        let mut memory = HashMemory::default();
        let password = Password::parse(Secret::new("correct horse battery")).unwrap();
        let stored = hash(&password, &mut memory).unwrap();
        assert!(
            stored.starts_with("$argon2id$v=19$m=7168,t=5,p=1$"),
            "{stored}"
        );
        assert!(verify("correct horse battery", &stored, &mut memory));
        assert!(!verify("wrong horse battery", &stored, &mut memory));
        assert!(!verify("anything", "not a hash", &mut memory));
        // Salted: the same password never hashes the same twice.
        assert_ne!(hash(&password, &mut memory).unwrap(), stored);
        // The memory is the thread's 7 MiB, kept for the next hash until released.
        assert_eq!(memory.0.len(), PARAMS.block_count());
        memory.release();
        assert!(!memory.is_held());
        assert!(verify("correct horse battery", &stored, &mut memory));
        assert!(memory.is_held());
    }

    #[test]
    fn our_hashes_and_the_standard_ones_check_each_other() {
        let mut memory = HashMemory::default();
        let password = Password::parse(Secret::new("correct horse battery")).unwrap();
        // Ours, checked by the argon2 crate's own verifier.
        let ours = hash(&password, &mut memory).unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse battery", &parsed)
                .is_ok()
        );
        // A hash of the earlier default (19 MiB, t = 2), checked by ours with its own parameters.
        let salt = SaltString::encode_b64(&[7_u8; 16]).unwrap();
        let older = Argon2::default()
            .hash_password(b"correct horse battery", &salt)
            .unwrap()
            .to_string();
        assert!(older.contains("m=19456,t=2,p=1"), "{older}");
        assert!(verify("correct horse battery", &older, &mut memory));
        assert!(!verify("wrong horse battery", &older, &mut memory));
        // The thread's memory did not grow for it.
        assert_eq!(memory.0.len(), PARAMS.block_count());
    }

    #[test]
    fn a_hash_asking_for_too_much_memory_is_refused_unchecked() {
        let mut memory = HashMemory::default();
        let greedy = "$argon2id$v=19$m=4194304,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$\
                      AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        // A well-formed hash with valid parameters: refused for the memory it asks, not for its form.
        let parsed = PasswordHash::new(greedy).unwrap();
        assert_eq!(Params::try_from(&parsed).unwrap().m_cost(), 4 * 1024 * 1024);
        assert!(!verify("anything", greedy, &mut memory));
        assert!(memory.0.is_empty());
    }

    #[test]
    fn length_rules() {
        assert!(Password::parse(Secret::new("short")).is_err());
        assert!(Password::parse(Secret::new("12345678901")).is_err());
        assert!(Password::parse(Secret::new("x".repeat(129))).is_err());
        assert!(Password::parse(Secret::new("123456789012")).is_ok());
    }
}
