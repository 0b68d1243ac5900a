//! NATS JetStream and PostgreSQL: reuse what is reachable, otherwise start a private one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use diesel::{Connection, PgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::process::{ChildProcess, find_executable, port_open};

/// The same folder `diesel migration run` applies.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// `host` and `port` of a `scheme://[user@]host:port[/...]` URL.
pub fn host_port(url: &str, default_port: u16) -> (String, u16) {
    let rest = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    match host_port.rsplit_once(':') {
        Some((host, port)) => (host.to_owned(), port.parse().unwrap_or(default_port)),
        None => (host_port.to_owned(), default_port),
    }
}

/// The PostgreSQL role each service logs in as (`migrations/..._a_role_per_service`).
pub fn service_role(service: &str) -> Option<&'static str> {
    match service {
        "users" => Some("tracehop_users"),
        "billing" => Some("tracehop_billing"),
        "notifications" => Some("tracehop_notifications"),
        _ => None,
    }
}

/// `url` logging in as `role` instead, when `url` carries no password (trust or peer authentication, as
/// `./dev up` and the tests use). A URL with a password is returned unchanged: the role's own password is
/// not known here, so the service uses the URL's role (docker compose gives each service its own URL).
pub fn with_role(url: &str, role: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host = match authority.rsplit_once('@') {
        Some((userinfo, _)) if userinfo.contains(':') => return url.to_owned(),
        Some((_, host)) => host,
        None => authority,
    };
    format!("{scheme}://{role}@{host}{path}")
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// A `nats-server -js` we started.
pub struct PrivateNats {
    pub url: String,
    pub port: u16,
    pub store_dir: PathBuf,
    pub process: ChildProcess,
    log_path: PathBuf,
    /// The server's configuration file (users and their permissions), when it has one.
    config: Option<PathBuf>,
}

impl PrivateNats {
    /// Starts JetStream on `port` with its file store in `store_dir`, open to anonymous clients (the
    /// benchmarks' bare NATS hops).
    pub async fn start(port: u16, store_dir: &Path, log_path: &Path) -> anyhow::Result<Self> {
        Self::start_with(port, store_dir, log_path, None).await
    }

    /// Starts JetStream on `port` with `users` and their permissions for `stream`, and no anonymous access.
    /// The configuration is written beside the store, readable by its owner only.
    pub async fn start_with_users(
        port: u16,
        store_dir: &Path,
        log_path: &Path,
        users: &crate::secrets::NatsUsers,
        stream: &str,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(store_dir)?;
        let config = store_dir.join("nats-server.conf");
        crate::secrets::write_private(&config, &users.server_config(stream))?;
        Self::start_with(port, store_dir, log_path, Some(config)).await
    }

    /// Starts one node of a local cluster: `node` of `client_ports.len()`, its route listener on
    /// `route_ports[node]`, routes to every other node, JetStream under `store_dir`, the same users.
    pub async fn start_cluster_node(
        node: usize,
        client_ports: &[u16],
        route_ports: &[u16],
        store_dir: &Path,
        log_path: &Path,
        users: &crate::secrets::NatsUsers,
        stream: &str,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(store_dir)?;
        let routes: Vec<String> = route_ports
            .iter()
            .map(|port| format!("\"nats-route://127.0.0.1:{port}\""))
            .collect();
        let route_port = route_ports
            .get(node)
            .ok_or_else(|| anyhow::anyhow!("no route port for node {node}"))?;
        let config_text = format!(
            "{}\nserver_name: \"tracehop-{}\"\ncluster {{\n  name: \"tracehop\"\n  listen: \"127.0.0.1:{route_port}\"\n  routes: [{}]\n}}\n",
            users.server_config(stream),
            node + 1,
            routes.join(", ")
        );
        let config = store_dir.join("nats-server.conf");
        crate::secrets::write_private(&config, &config_text)?;
        let port = *client_ports
            .get(node)
            .ok_or_else(|| anyhow::anyhow!("no client port for node {node}"))?;
        Self::start_with(port, store_dir, log_path, Some(config)).await
    }

    /// SIGKILL: a node lost, store and all in-flight state as it was (drills).
    pub fn kill(&mut self) {
        self.process.kill();
    }

    async fn start_with(
        port: u16,
        store_dir: &Path,
        log_path: &Path,
        config: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let binary = find_executable("nats-server").ok_or_else(|| {
            anyhow::anyhow!("nats-server not found: install it (Debian: apt-get install nats-server) or set NATS_URL")
        })?;
        std::fs::create_dir_all(store_dir)?;
        let mut command = Command::new(binary);
        if let Some(config) = &config {
            command.arg("-c").arg(config);
        }
        command
            .arg("-js")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .arg("-sd")
            .arg(store_dir);
        let process = ChildProcess::spawn("nats-server", command, log_path)?;
        let mut nats = Self {
            url: format!("nats://127.0.0.1:{port}"),
            port,
            store_dir: store_dir.to_owned(),
            process,
            log_path: log_path.to_owned(),
            config,
        };
        nats.wait_ready().await?;
        Ok(nats)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !port_open("127.0.0.1", self.port) {
            if let Some(status) = self.process.exited() {
                anyhow::bail!(
                    "nats-server exited ({status}):\n{}",
                    self.process.log_tail(20)
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!("nats-server did not listen on {} in time", self.port);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Stops the server (a clean shutdown: JetStream flushes its store).
    pub fn stop(&mut self) {
        self.process.stop(Duration::from_secs(10));
    }

    /// Starts it again on the same port and store (fault tests).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let restarted = Self::start_with(
            self.port,
            &self.store_dir,
            &self.log_path,
            self.config.clone(),
        )
        .await?;
        *self = restarted;
        Ok(())
    }
}

/// Waits until JetStream answers through `url` (a cluster has elected its meta leader), at most 30 s.
pub async fn wait_for_jetstream(
    url: &str,
    credentials: Option<&tracehop_telemetry::messaging::NatsCredentials>,
) -> anyhow::Result<()> {
    let client = tracehop_telemetry::messaging::connect(url, "stack", credentials).await?;
    let jetstream = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Listing the streams answers once the meta leader is elected (an error before).
        let listed = futures::StreamExt::next(&mut jetstream.stream_names()).await;
        match listed.transpose() {
            Ok(_) => return Ok(()),
            Err(error) if Instant::now() > deadline => {
                anyhow::bail!("JetStream did not become ready at {url}: {error}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// A PostgreSQL cluster we initialised and started (`initdb` + `pg_ctl`), stopped on drop.
pub struct PrivatePostgres {
    data_dir: PathBuf,
    as_postgres_user: bool,
}

impl PrivatePostgres {
    /// Initialises `data_dir` if needed and starts a server on `port` (trust auth, user `postgres`).
    pub fn start(data_dir: &Path, port: u16, log_path: &Path) -> anyhow::Result<Self> {
        Self::start_with(data_dir, port, log_path, "")
    }

    /// [`PrivatePostgres::start`] with more server options (`-c name=value ...`).
    pub fn start_with(
        data_dir: &Path,
        port: u16,
        log_path: &Path,
        server_options: &str,
    ) -> anyhow::Result<Self> {
        let initdb = find_executable("initdb").ok_or_else(|| {
            anyhow::anyhow!("initdb not found: install PostgreSQL (Debian: apt-get install postgresql) or set DATABASE_URL")
        })?;
        let pg_ctl =
            find_executable("pg_ctl").ok_or_else(|| anyhow::anyhow!("pg_ctl not found"))?;
        // PostgreSQL refuses to run as root; use the `postgres` system user the Debian package creates.
        let as_postgres_user = running_as_root();
        std::fs::create_dir_all(data_dir)?;
        if let Some(parent) = log_path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if as_postgres_user {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(data_dir))?;
            if let Some(parent) = log_path.parent() {
                run(Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(parent))?;
            }
        }
        let cluster = Self {
            data_dir: data_dir.to_owned(),
            as_postgres_user,
        };
        if !data_dir.join("PG_VERSION").exists() {
            let mut command = cluster.command(&initdb);
            command.arg("-D").arg(data_dir).args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ]);
            run(&mut command).context("initdb failed")?;
        }
        let mut command = cluster.command(&pg_ctl);
        command
            .arg("-D")
            .arg(data_dir)
            .arg("-l")
            .arg(log_path)
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                "-p {port} -c listen_addresses=127.0.0.1 -k /tmp {server_options}"
            ))
            .arg("start");
        run(&mut command)
            .with_context(|| format!("pg_ctl start failed; see {}", log_path.display()))?;
        Ok(cluster)
    }

    fn command(&self, program: &Path) -> Command {
        if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }

    /// The postmaster's process id (first line of `postmaster.pid`).
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data_dir.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Leaves the server running after this handle is gone (`stack prepare`).
    pub fn detach(self) {
        std::mem::forget(self);
    }

    /// `pg_ctl stop -m fast`.
    pub fn stop(&self) {
        if let Some(pg_ctl) = find_executable("pg_ctl") {
            let mut command = self.command(&pg_ctl);
            command
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "fast", "-w", "stop"]);
            let _ = command.output();
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        anyhow::bail!(
            "{command:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Whether a PostgreSQL server answers at `url`.
pub async fn postgres_reachable(url: &str) -> bool {
    let url = with_database(url, "postgres");
    tokio::task::spawn_blocking(move || PgConnection::establish(&url).is_ok())
        .await
        .unwrap_or(false)
}

/// Creates `database` on the server of `server_url` unless it exists.
pub async fn create_database(server_url: &str, database: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        database
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "database name {database:?} must be letters, digits and underscores"
    );
    let admin_url = with_database(server_url, "postgres");
    let database = database.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut connection = PgConnection::establish(&admin_url)
            .with_context(|| format!("connecting to PostgreSQL at {admin_url}"))?;
        #[derive(diesel::QueryableByName)]
        struct Exists {
            #[diesel(sql_type = diesel::sql_types::Bool)]
            exists: bool,
        }
        let found: Exists = diesel::sql_query(
            "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS exists",
        )
        .bind::<diesel::sql_types::Text, _>(&database)
        .get_result(&mut connection)?;
        if !found.exists {
            diesel::sql_query(format!("CREATE DATABASE \"{database}\""))
                .execute(&mut connection)?;
        }
        Ok(())
    })
    .await?
}

/// Drops `database` (tests clean up after themselves).
pub async fn drop_database(server_url: &str, database: &str) -> anyhow::Result<()> {
    let admin_url = with_database(server_url, "postgres");
    let database = database.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut connection = PgConnection::establish(&admin_url)?;
        diesel::sql_query(format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .execute(&mut connection)?;
        Ok(())
    })
    .await?
}

/// Gives each service's role the password in `POSTGRES_{USERS,BILLING,NOTIFICATIONS}_PASSWORD`, where set
/// (docker compose); a server with trust authentication needs none.
fn set_role_passwords(connection: &mut PgConnection) -> anyhow::Result<()> {
    let passwords = [
        ("tracehop_users", std::env::var("POSTGRES_USERS_PASSWORD")),
        (
            "tracehop_billing",
            std::env::var("POSTGRES_BILLING_PASSWORD"),
        ),
        (
            "tracehop_notifications",
            std::env::var("POSTGRES_NOTIFICATIONS_PASSWORD"),
        ),
    ];
    for (role, password) in passwords {
        let Ok(password) = password else {
            continue;
        };
        anyhow::ensure!(
            !password.is_empty() && password.chars().all(|c| c.is_ascii_alphanumeric()),
            "the password of {role} must be letters and digits only (it goes into a URL)"
        );
        diesel::sql_query(format!("ALTER ROLE {role} PASSWORD '{password}'"))
            .execute(connection)?;
    }
    Ok(())
}

/// Applies pending migrations to `database_url`, then sets the service roles' passwords from the
/// environment (see [`set_role_passwords`]); returns the versions applied.
pub async fn migrate(database_url: &str) -> anyhow::Result<Vec<String>> {
    let url = database_url.to_owned();
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let mut connection =
            PgConnection::establish(&url).with_context(|| format!("connecting to {url}"))?;
        let applied: Vec<String> = connection
            .run_pending_migrations(MIGRATIONS)
            .map_err(|error| anyhow::anyhow!("migration failed: {error}"))?
            .into_iter()
            .map(|version| version.to_string())
            .collect();
        set_role_passwords(&mut connection)?;
        Ok(applied)
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_helpers() {
        assert_eq!(
            host_port("postgres://postgres@127.0.0.1:5433/tracehop", 5432),
            ("127.0.0.1".into(), 5433)
        );
        assert_eq!(
            host_port("nats://localhost", 4222),
            ("localhost".into(), 4222)
        );
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/tracehop", "postgres"),
            "postgres://postgres@127.0.0.1:5432/postgres"
        );
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h:1/db?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(
            with_role("postgres://postgres@127.0.0.1:5432/db", "tracehop_users"),
            "postgres://tracehop_users@127.0.0.1:5432/db"
        );
        assert_eq!(
            with_role("postgres://127.0.0.1/db?sslmode=disable", "r"),
            "postgres://r@127.0.0.1/db?sslmode=disable"
        );
        assert_eq!(
            with_role("postgres://postgres:secret@h/db", "r"),
            "postgres://postgres:secret@h/db"
        );
    }
}
