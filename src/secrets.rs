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

/// The NATS users of a stack the stack runs itself, with their passwords (random, made once per state
/// folder, kept in `nats-users.json`, mode 0600) and what each may do.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct NatsUsers {
    /// Publishes `order.completed` (and keeps the stream's settings).
    pub billing: String,
    /// Consumes `order.completed` through its durable consumer and publishes the dead letters.
    pub notifications: String,
    /// The operator: `stack` itself, its tools and the tests (replays, inspection). Everything.
    pub operator: String,
}

impl std::fmt::Debug for NatsUsers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsUsers { <redacted> }")
    }
}

impl NatsUsers {
    pub const FILE: &'static str = "nats-users.json";

    /// The users in `dir`, made there if missing.
    pub fn ensure(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(Self::FILE);
        if let Ok(text) = std::fs::read_to_string(&path) {
            return serde_json::from_str(&text)
                .with_context(|| format!("reading {}", path.display()));
        }
        std::fs::create_dir_all(dir)?;
        let password = || {
            let mut bytes = [0_u8; 24];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        };
        let users = Self {
            billing: password(),
            notifications: password(),
            operator: password(),
        };
        write_private(&path, &serde_json::to_string_pretty(&users)?)?;
        Ok(users)
    }

    /// The credentials of one user (`billing`, `notifications` or `operator`).
    pub fn credentials(
        &self,
        user: &str,
    ) -> Option<tracehop_telemetry::messaging::NatsCredentials> {
        let password = match user {
            "billing" => &self.billing,
            "notifications" => &self.notifications,
            "operator" => &self.operator,
            _ => return None,
        };
        Some(tracehop_telemetry::messaging::NatsCredentials {
            user: user.to_owned(),
            password: password.clone(),
        })
    }

    /// A nats-server `authorization` block with these passwords: no anonymous clients, and each user only
    /// the subjects its work needs on `stream` (JetStream's API subjects included). `order.completed` can be
    /// published by billing (and the operator) only, and read only through notifications' durable consumer.
    pub fn server_config(&self, stream: &str) -> String {
        let quoted = |password: &str| format!("\"{password}\"");
        authorization(
            stream,
            [
                &quoted(&self.billing),
                &quoted(&self.notifications),
                &quoted(&self.operator),
            ],
        )
    }

    /// The same block with the passwords left to nats-server's environment variables
    /// (`$NATS_BILLING_PASSWORD`, `$NATS_NOTIFICATIONS_PASSWORD`, `$NATS_OPERATOR_PASSWORD`): what
    /// `deploy/nats/nats-server.conf` holds for docker compose (tests/compose.rs checks it is this text).
    pub fn server_config_template(stream: &str) -> String {
        authorization(
            stream,
            [
                "$NATS_BILLING_PASSWORD",
                "$NATS_NOTIFICATIONS_PASSWORD",
                "$NATS_OPERATOR_PASSWORD",
            ],
        )
    }
}

/// The `authorization` block, passwords given as nats-server config values (quoted text or `$VARIABLE`).
fn authorization(stream: &str, [billing, notifications, operator]: [&str; 3]) -> String {
    let quote = |subjects: &[String]| {
        subjects
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let stream_admin = [
        "$JS.API.INFO".to_owned(),
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.STREAM.CREATE.{stream}"),
        format!("$JS.API.STREAM.UPDATE.{stream}"),
    ];
    let mut billing_publish = vec!["order.completed".to_owned()];
    billing_publish.extend(stream_admin.iter().cloned());
    let consumer = "notifications";
    let mut notifications_publish = vec!["order.completed.dead".to_owned()];
    notifications_publish.extend(stream_admin.iter().cloned());
    notifications_publish.extend([
        format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.{consumer}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>"),
        format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{consumer}"),
        format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
        format!("$JS.ACK.{stream}.{consumer}.>"),
    ]);
    let user = |name: &str, password: &str, publish: Option<&[String]>| match publish {
        Some(publish) => format!(
            "    {{ user: \"{name}\", password: {password}, permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [\"_INBOX_{name}.>\"] }} }} }}\n",
            quote(publish)
        ),
        None => format!("    {{ user: \"{name}\", password: {password} }}\n"),
    };
    format!(
        "# nats-server users and permissions, made by `stack` (src/secrets.rs). No anonymous clients.\n\
         authorization {{\n  users = [\n{}{}{}  ]\n}}\n",
        user("billing", billing, Some(&billing_publish)),
        user("notifications", notifications, Some(&notifications_publish)),
        user("operator", operator, None),
    )
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
        assert_eq!(
            std::fs::read_to_string(&again.private_key_file).unwrap(),
            private
        );
        // The pair works together.
        let issuer = tracehop_identity::Issuer::from_file(
            first.private_key_file.to_str().unwrap(),
            "gateway",
        )
        .unwrap();
        let verifier = tracehop_identity::Verifier::from_file(
            first.public_key_file.to_str().unwrap(),
            "users",
        )
        .unwrap();
        assert!(
            verifier
                .verify(&issuer.token("users", None).unwrap())
                .is_ok()
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
