//! `stack up` as a supervisor: signals at any moment, crashed services reported and restarted, and a status
//! file that `stack status` reads from another terminal.
//!
//! - [`Interrupt`] listens for Ctrl-C and SIGTERM from the first moment. Every phase of `stack up` (the
//!   private PostgreSQL, the stack's start-up, the demo, running) races against it, so a signal at any
//!   moment stops what was started so far, in reverse order. A second signal kills every child at once
//!   (the stop then goes on without waiting for graceful exits).
//! - [`supervise`] watches every service: an exit is reported at once (which service, its exit status or
//!   signal, the last lines of its log without backtraces), and the service is started again after a
//!   back-off of 1, 2, 4, 8, 16 s. A service that crashes more than [`MAX_CRASHES`] times in
//!   [`CRASH_WINDOW`] is given up on, loudly, and left down.
//! - The status file (`<state dir>/status.json`) says, for every process: pid, state, restarts, and since
//!   when it runs.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::process::kill_all;
use crate::stack::Stack;

/// More crashes than this within [`CRASH_WINDOW`] and a service is given up on.
pub const MAX_CRASHES: usize = 5;
/// The window [`MAX_CRASHES`] is counted in.
pub const CRASH_WINDOW: Duration = Duration::from_secs(60);
/// The longest back-off before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(16);

/// Ctrl-C and SIGTERM, heard from the moment it is installed.
#[derive(Clone)]
pub struct Interrupt {
    stopping: watch::Receiver<bool>,
}

impl Interrupt {
    /// Starts listening. The first signal asks every phase to stop; the second kills every child process.
    pub fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let (sender, stopping) = watch::channel(false);
        tokio::spawn(async move {
            let mut heard = 0;
            loop {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
                heard += 1;
                if heard == 1 {
                    say("stopping everything started so far (again to force)");
                    let _ = sender.send(true);
                } else {
                    say("forcing: killing every process now");
                    kill_all();
                }
            }
        });
        Ok(Self { stopping })
    }

    /// Whether a signal has been heard.
    pub fn heard(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Waits for the first signal.
    pub async fn wait(&self) {
        let mut stopping = self.stopping.clone();
        let _ = stopping.wait_for(|stopping| *stopping).await;
    }

    /// `phase`, unless a signal comes first: then the phase's future is dropped (which stops whatever it
    /// had started) and the answer is an error naming the phase.
    pub async fn run<T>(
        &self,
        phase: &str,
        work: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        tokio::select! {
            biased;
            () = self.wait() => anyhow::bail!("interrupted while {phase}"),
            outcome = work => outcome,
        }
    }
}

/// How one supervised process is doing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessStatus {
    pub name: String,
    pub pid: Option<u32>,
    /// `running`, `restarting` or `given up`.
    pub state: String,
    pub restarts: u32,
    /// Seconds since the epoch when the current process started.
    pub since: u64,
    /// Its health check.
    pub health_url: String,
}

struct Watched {
    restarts: u32,
    crashes: VecDeque<Instant>,
    since: SystemTime,
    given_up: bool,
    restarting: bool,
}

/// Watches the stack's services until a signal: reports and restarts those that exit, and keeps
/// `status_path` current.
pub async fn supervise(stack: &mut Stack, interrupt: &Interrupt, status_path: &Path) {
    let instances = stack.instances();
    let mut watched: BTreeMap<String, Watched> = instances
        .iter()
        .map(|name| {
            let state = Watched {
                restarts: 0,
                crashes: VecDeque::new(),
                since: SystemTime::now(),
                given_up: false,
                restarting: false,
            };
            (name.clone(), state)
        })
        .collect();
    write_status(stack, &watched, status_path);
    say(&status_line(&watched));
    while !interrupt.heard() {
        tokio::select! {
            () = interrupt.wait() => return,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        for name in &instances {
            let name = name.as_str();
            let Some(record) = watched.get_mut(name) else {
                continue;
            };
            if record.given_up {
                continue;
            }
            let Some(process) = stack.service(name) else {
                continue;
            };
            let Some(status) = process.exited() else {
                continue;
            };
            eprintln!(
                "\n!!! {name} exited ({status}); the last lines of {}:\n{}\n",
                process.log_path.display(),
                process.log_tail(12)
            );
            let now = Instant::now();
            record.crashes.push_back(now);
            while record
                .crashes
                .front()
                .is_some_and(|at| now.duration_since(*at) > CRASH_WINDOW)
            {
                record.crashes.pop_front();
            }
            if record.crashes.len() > MAX_CRASHES {
                record.given_up = true;
                eprintln!(
                    "!!! giving up on {name}: {} crashes in {} s. It stays down; fix it and restart the stack.",
                    record.crashes.len(),
                    CRASH_WINDOW.as_secs()
                );
                write_status(stack, &watched, status_path);
                say(&status_line(&watched));
                continue;
            }
            let exponent =
                u32::try_from(record.crashes.len().saturating_sub(1)).unwrap_or(u32::MAX);
            let backoff = Duration::from_secs(1)
                .saturating_mul(2_u32.saturating_pow(exponent))
                .min(MAX_BACKOFF);
            record.restarting = true;
            say(&format!("restarting {name} in {} s", backoff.as_secs()));
            write_status(stack, &watched, status_path);
            say(&status_line(&watched));
            tokio::select! {
                () = interrupt.wait() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            let started = tokio::select! {
                () = interrupt.wait() => return,
                started = stack.start_service(name) => started,
            };
            let Some(record) = watched.get_mut(name) else {
                continue;
            };
            record.restarting = false;
            let back = match started {
                Ok(()) => {
                    record.restarts += 1;
                    record.since = SystemTime::now();
                    let pid = stack
                        .service(name)
                        .and_then(|p| p.pid())
                        .unwrap_or_default();
                    Some(format!(
                        "{name} is back (pid {pid}, restart {})",
                        record.restarts
                    ))
                }
                // Its exit is seen again on the next round and counted as one more crash.
                Err(error) => {
                    eprintln!("!!! {name} did not come back: {error:#}");
                    None
                }
            };
            // The status file first: whoever reads "is back" and then asks `stack status` sees it running
            // (it used to see "restarting" for the moment in between).
            write_status(stack, &watched, status_path);
            if let Some(back) = back {
                say(&back);
            }
            say(&status_line(&watched));
        }
    }
}

/// `status: gateway up · users up · billing restarting · ...`
fn status_line(watched: &BTreeMap<String, Watched>) -> String {
    let parts: Vec<String> = watched
        .keys()
        .filter_map(|name| {
            let record = watched.get(name)?;
            let state = if record.given_up {
                "GIVEN UP"
            } else if record.restarting {
                "restarting"
            } else {
                "up"
            };
            Some(format!("{name} {state}"))
        })
        .collect();
    format!("status: {}", parts.join(" · "))
}

fn write_status(stack: &mut Stack, watched: &BTreeMap<String, Watched>, path: &Path) {
    let mut statuses = Vec::new();
    for name in stack.instances() {
        let name = name.as_str();
        let Some(record) = watched.get(name) else {
            continue;
        };
        let pid = stack.service(name).and_then(|p| p.pid());
        let state = if record.given_up {
            "given up"
        } else if record.restarting {
            "restarting"
        } else {
            "running"
        };
        statuses.push(ProcessStatus {
            name: name.to_owned(),
            pid,
            state: state.to_owned(),
            restarts: record.restarts,
            since: record
                .since
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default(),
            health_url: stack.health_url(name),
        });
    }
    if let Ok(json) = serde_json::to_vec_pretty(&statuses) {
        // Written whole, then renamed: a reader never sees half a file.
        let partial = path.with_extension("json.partial");
        if std::fs::write(&partial, json).is_ok() {
            let _ = std::fs::rename(&partial, path);
        }
    }
}

/// The status file of the stack whose state is in `state_dir`.
pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

/// `stack status`: every process of the stack running from `state_dir`, with its health.
pub async fn print_status(state_dir: &Path) -> anyhow::Result<()> {
    let path = status_path(state_dir);
    let text = std::fs::read_to_string(&path).map_err(|error| {
        anyhow::anyhow!(
            "no stack status at {} ({error}): is `stack up` running with this state folder?",
            path.display()
        )
    })?;
    let statuses: Vec<ProcessStatus> = serde_json::from_str(&text)?;
    let http = tracehop_telemetry::http::client::plain_client_builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    println!(
        "{:<15} {:<11} {:<8} {:>8} {:>9}",
        "process", "state", "health", "pid", "uptime"
    );
    for status in statuses {
        let healthy = http
            .get(&status.health_url)
            .send()
            .await
            .is_ok_and(|response| response.status().is_success());
        let uptime = now.saturating_sub(status.since);
        println!(
            "{:<15} {:<11} {:<8} {:>8} {:>8}s{}",
            status.name,
            status.state,
            if healthy { "ok" } else { "DOWN" },
            status
                .pid
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            uptime,
            if status.restarts > 0 {
                format!("  ({} restarts)", status.restarts)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn say(what: &str) {
    println!("==> {what}");
}
