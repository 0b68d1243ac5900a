//! Development secrets: the service-token key pair (and, where the stack runs its own NATS, its
//! passwords), made once per state folder and kept there, never committed.
//!
//! `stack up` and every test stack call [`ServiceKeys::ensure`] on `<state>/secrets`; docker compose runs
//! `stack secrets` once into its volumes. In production, make the key pair with
//! `openssl genpkey -algorithm ed25519` (README, "Security model").

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The gateway's private key (PKCS#8 PEM) and its public key (SubjectPublicKeyInfo PEM), as files.
#[derive(Debug, Clone)]
pub struct ServiceKeys {
    pub private_key_file: PathBuf,
    pub public_key_file: PathBuf,
}

impl ServiceKeys {
    pub const PRIVATE_FILE: &'static str = "service-token.key.pem";
    pub const PUBLIC_FILE: &'static str = "service-token.pub.pem";

    /// The key pair in `private_dir` and `public_dir`, made there if either file is missing. The private key
    /// is written readable by its owner only.
    pub fn ensure(private_dir: &Path, public_dir: &Path) -> anyhow::Result<Self> {
        let keys = Self {
            private_key_file: private_dir.join(Self::PRIVATE_FILE),
            public_key_file: public_dir.join(Self::PUBLIC_FILE),
        };
        if keys.private_key_file.exists() && keys.public_key_file.exists() {
            return Ok(keys);
        }
        std::fs::create_dir_all(private_dir)?;
        std::fs::create_dir_all(public_dir)?;
        let (private, public) = tracehop_identity::generate_key_pair()?;
        write_private(&keys.private_key_file, private.expose())?;
        std::fs::write(&keys.public_key_file, public)
            .with_context(|| format!("writing {}", keys.public_key_file.display()))?;
        Ok(keys)
    }
}

/// Writes `text` to `path`, readable by its owner only (0600 from the start, never world-readable).
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_are_made_once_and_the_private_one_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("tracehop-keys-{}", uuid::Uuid::new_v4()));
        let first = ServiceKeys::ensure(&dir.join("private"), &dir.join("public")).unwrap();
        let private = std::fs::read_to_string(&first.private_key_file).unwrap();
        let mode = std::fs::metadata(&first.private_key_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "private key mode {mode:o}");
        let again = ServiceKeys::ensure(&dir.join("private"), &dir.join("public")).unwrap();
        assert_eq!(std::fs::read_to_string(&again.private_key_file).unwrap(), private);
        // The pair works together.
        let issuer =
            tracehop_identity::Issuer::from_file(first.private_key_file.to_str().unwrap(), "gateway")
                .unwrap();
        let verifier =
            tracehop_identity::Verifier::from_file(first.public_key_file.to_str().unwrap(), "users")
                .unwrap();
        assert!(verifier.verify(&issuer.token("users", None).unwrap()).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
