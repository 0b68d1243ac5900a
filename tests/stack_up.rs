//! `stack up` as a user runs it, as a real process: a SIGKILLed service is reported and back within
//! seconds, checkouts work again, `stack status` shows the restart; Ctrl-C or SIGTERM during start-up,
//! during the demo or while running leaves no process and no listening port behind.

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracehop::process::{bin_dir, free_port, port_open, signal};

/// One `stack up` with its own ports, state folder, private NATS and database.
struct Up {
    child: Child,
    output: PathBuf,
    state_dir: PathBuf,
    ports: Vec<u16>,
    gateway: u16,
    database: String,
}

impl Up {
    fn start(demo: bool) -> Up {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let state_dir = std::env::temp_dir().join(format!("tracehop-up-{}", &id[..12]));
        std::fs::create_dir_all(&state_dir).unwrap();
        let output = state_dir.join("stack-up.out");
        let ports: Vec<u16> = (0..9).map(|_| free_port().unwrap()).collect();
        let database = format!("tracehop_up_{}", &id[..12]);
        let server = common::database_server_url();
        let database_url = tracehop::infra::with_database(&server, &database);
        // One file for both streams, as a terminal shows them.
        let printed = std::fs::File::create(&output).unwrap();
        let mut command = Command::new(bin_dir().unwrap().join("stack"));
        command
            .arg("up")
            .arg("--state-dir")
            .arg(&state_dir)
            .args(["--otlp-grpc-port", &ports[5].to_string()])
            .args(["--otlp-http-port", &ports[6].to_string()])
            .args(["--ui-port", &ports[7].to_string()])
            .env("GATEWAY_PORT", ports[0].to_string())
            .env("USERS_PORT", ports[1].to_string())
            .env("BILLING_PORT", ports[2].to_string())
            .env("NOTIFICATIONS_PORT", ports[3].to_string())
            .env("STRIPE_SIM_PORT", ports[4].to_string())
            // Nothing listens there: `stack up` starts a private nats-server, which must go too.
            .env("NATS_URL", format!("nats://127.0.0.1:{}", ports[8]))
            .env("DATABASE_URL", &database_url)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(printed.try_clone().unwrap())
            .stderr(printed);
        if !demo {
            command.arg("--no-demo");
        }
        let child = command.spawn().unwrap();
        Up {
            child,
            output,
            state_dir,
            gateway: ports[0],
            ports,
            database,
        }
    }

    fn printed(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Waits until `stack up` has printed `needle` (panics with its output after `timeout`).
    async fn wait_for(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.printed().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "`stack up` never printed {needle:?}:\n{}",
                self.printed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn signal(&self, name: &str) {
        signal(self.child.id(), name);
    }

    async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "`stack up` did not stop:\n{}",
                self.printed()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Processes started by this `stack up` (they all carry its state folder, in their command line or
    /// their environment) and ports still listening.
    fn leftovers(&self) -> Vec<String> {
        let mut found: Vec<String> = self
            .processes()
            .into_iter()
            .map(|(pid, command_line)| format!("process {pid}: {command_line}"))
            .collect();
        for port in &self.ports {
            if port_open("127.0.0.1", *port) {
                found.push(format!("port {port} still listening"));
            }
        }
        found
    }

    /// `(pid, command line)` of every process that carries this stack's state folder.
    fn processes(&self) -> Vec<(u32, String)> {
        let marker = self.state_dir.display().to_string();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            let read = |what: &str| {
                String::from_utf8_lossy(&std::fs::read(entry.path().join(what)).unwrap_or_default())
                    .replace('\0', " ")
            };
            let command_line = read("cmdline");
            if command_line.contains(&marker) || read("environ").contains(&marker) {
                found.push((pid, command_line));
            }
        }
        found
    }

    fn status(&self) -> Vec<tracehop::supervise::ProcessStatus> {
        let text =
            std::fs::read_to_string(tracehop::supervise::status_path(&self.state_dir)).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for Up {
    /// Even when the test failed: `stack up` is asked to stop (so it stops its children), then killed, and
    /// whatever still carries its state folder is killed too. A SIGKILL alone would leave its services
    /// running: they are in process groups of their own.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal(self.child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(30);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for (pid, _) in self.processes() {
            signal(pid, "KILL");
        }
        common::drop_database(&common::database_server_url(), &self.database);
        if std::env::var_os("TRACEHOP_KEEP_TEST_STATE").is_none() {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_service_is_reported_restarted_and_checkouts_work_again() {
    let mut up = Up::start(false);
    up.wait_for("running; press Ctrl-C", Duration::from_secs(90))
        .await;
    let billing = up
        .status()
        .into_iter()
        .find(|s| s.name == "billing")
        .unwrap();
    assert_eq!(billing.state, "running");
    signal(billing.pid.unwrap(), "KILL");

    up.wait_for("!!! billing exited (signal: 9", Duration::from_secs(10))
        .await;
    up.wait_for("billing is back", Duration::from_secs(30))
        .await;
    let printed = up.printed();
    assert!(printed.contains("restarting billing in 1 s"), "{printed}");
    let billing = up
        .status()
        .into_iter()
        .find(|s| s.name == "billing")
        .unwrap();
    assert_eq!((billing.state.as_str(), billing.restarts), ("running", 1));

    // Checkouts succeed again.
    let mut customer =
        tracehop::client::ApiClient::new(&format!("http://127.0.0.1:{}", up.gateway));
    customer
        .signup_and_login(
            &tracehop::client::unique_email("dani"),
            "correct horse battery",
        )
        .await
        .unwrap();
    let checkout = customer.checkout("10.00", "usd", None).await.unwrap();
    assert_eq!(checkout.status, 200, "{}", checkout.body);

    // `stack status` from another terminal.
    let status = Command::new(bin_dir().unwrap().join("stack"))
        .args(["status", "--state-dir"])
        .arg(&up.state_dir)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    let line = status
        .lines()
        .find(|l| l.starts_with("billing"))
        .unwrap_or_default();
    assert!(
        line.contains("running") && line.contains(" ok ") && line.contains("(1 restarts)"),
        "{status}"
    );

    up.signal("INT");
    assert!(
        up.wait_exit(Duration::from_secs(60)).await.success(),
        "{}",
        up.printed()
    );
    assert_eq!(up.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_at_any_phase_leaves_no_process_and_no_port() {
    // (phase, what `stack up` prints when it is in that phase, the demo on, the signal)
    let phases = [
        ("start-up", "starting collector", false, "INT"),
        ("demo", "POST /checkout ->", true, "INT"),
        ("running", "running; press Ctrl-C", false, "TERM"),
    ];
    for (phase, marker, demo, name) in phases {
        let mut up = Up::start(demo);
        up.wait_for(marker, Duration::from_secs(90)).await;
        up.signal(name);
        up.wait_exit(Duration::from_secs(60)).await;
        let printed = up.printed();
        assert!(
            printed.contains("stopping everything started so far"),
            "{phase}: {printed}"
        );
        assert!(
            !printed.contains("running; press Ctrl-C") || phase == "running",
            "{phase}: {printed}"
        );
        assert_eq!(up.leftovers(), Vec::<String>::new(), "{phase}: {printed}");
    }
}
