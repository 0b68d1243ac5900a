//! Child processes that never outlive their owner: SIGTERM on drop (so services flush their spans), SIGKILL
//! if they do not exit in time. Output goes to a log file per process.
//!
//! Each child runs in a process group of its own, so a Ctrl-C at the terminal reaches only the owner, which
//! then stops its children in order (the last spans flushed, NATS after the services that use it) instead of
//! everything dying at once. Every live child is registered, so a second Ctrl-C can kill them all at once
//! ([`kill_all`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// The pids of the children alive now (spawned and not yet stopped, killed or reaped).
static LIVE: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn register(pid: u32) {
    if let Ok(mut live) = LIVE.lock() {
        live.push(pid);
    }
}

fn forget(pid: u32) {
    if let Ok(mut live) = LIVE.lock() {
        live.retain(|p| *p != pid);
    }
}

/// SIGKILL to every live child: the forced end of a shutdown that is taking too long (a second Ctrl-C).
/// Their owners still reap them and go on stopping what is left.
pub fn kill_all() {
    let pids: Vec<u32> = LIVE.lock().map(|live| live.clone()).unwrap_or_default();
    for pid in pids {
        signal(pid, "KILL");
    }
}

/// A running child.
pub struct ChildProcess {
    pub name: String,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl ChildProcess {
    /// Starts `command` with stdout and stderr appended to `log_path`.
    pub fn spawn(name: &str, mut command: Command, log_path: &Path) -> anyhow::Result<Self> {
        if let Some(parent) = log_path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        use std::os::unix::process::CommandExt as _;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        register(child.id());
        Ok(Self {
            name: name.to_owned(),
            log_path: log_path.to_owned(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has exited (and with what).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().ok().flatten()?;
        forget(child.id());
        Some(status)
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _reaped = Forget(child.id());
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        signal(child.id(), "TERM");
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILL right away (fault tests: a crash, not a shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            forget(child.id());
        }
    }

    /// The last `lines` lines of the log (for error messages), without backtrace frames: with
    /// `RUST_BACKTRACE` set, a start-up error's frames would otherwise push the error itself out of view.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let all = without_backtraces(&text);
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// The lines of `text` without backtraces (`Stack backtrace:` / `stack backtrace:` and the indented
/// frames after it).
fn without_backtraces(text: &str) -> Vec<&str> {
    let mut in_backtrace = false;
    text.lines()
        .filter(|line| {
            if line.trim().eq_ignore_ascii_case("stack backtrace:") {
                in_backtrace = true;
            } else if !line.starts_with(' ') {
                in_backtrace = false;
            }
            !in_backtrace
        })
        .collect()
}

/// Unregisters a child however its stop ends.
struct Forget(u32);

impl Drop for Forget {
    fn drop(&mut self) {
        forget(self.0);
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}

/// Sends a signal with `kill(1)` (keeps this crate free of `unsafe`).
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Where the workspace's binaries are: `TRACEHOP_BIN_DIR`, else next to the running executable (for test
/// binaries in `target/<profile>/deps`, one level up).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("TRACEHOP_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("executable has no directory"))?;
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of a workspace binary, with a message that says how to build it when missing.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.exists() {
        anyhow::bail!(
            "{} not found: build the workspace first (`cargo build --workspace`, or `./dev up` which does it)",
            path.display()
        );
    }
    Ok(path)
}

/// Finds an executable on `PATH` or in the usual PostgreSQL/NATS locations.
pub fn find_executable(name: &str) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        versions.reverse();
        candidates.extend(versions);
    }
    candidates.push(PathBuf::from("/usr/sbin"));
    candidates
        .into_iter()
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// A port nobody listens on right now, for a process we are about to start, never the same twice in this
/// process.
///
/// The port is only tested (bound and released), so two things could take it before the child binds it:
/// another stack of the same test binary (bind-to-0 hands a released port out again) and any outgoing
/// connection on the machine (`connect` takes its source port from the same ephemeral range as bind-to-0).
/// Either makes a parallel test's service fail to start (CI saw billing exit at start-up). So ports come
/// from *below* the ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), where the kernel never picks
/// one by itself, walked by a process-wide cursor that starts at an offset derived from the process id.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CURSOR: AtomicU32 = AtomicU32::new(u32::MAX);

    let (low, high) = unassigned_port_range();
    let span = u32::from(high - low);
    // The first caller places the cursor; later callers (other threads) continue from there.
    let _ = CURSOR.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span {
        let offset = CURSOR.fetch_add(1, Ordering::Relaxed) % span;
        let port = low + offset as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {low}..{high}")
}

/// Ports the kernel does not hand out by itself: from 10000 up to the start of the ephemeral range (Linux
/// default 32768), or 20000..30000 where that range cannot be read.
fn unassigned_port_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok());
    match ephemeral_low {
        Some(low) if low > 11_000 => (10_000, low),
        _ => (20_000, 30_000),
    }
}

/// Whether something accepts TCP connections on `host:port`.
pub fn port_open(host: &str, port: u16) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(mut addresses) = (host, port).to_socket_addrs() else {
        return false;
    };
    addresses.any(|address| {
        std::net::TcpStream::connect_timeout(&address, Duration::from_millis(300)).is_ok()
    })
}

/// Waits until `url` answers 2xx, or fails with the process's log tail.
pub async fn wait_healthy(
    url: &str,
    timeout: Duration,
    process: Option<&mut ChildProcess>,
) -> anyhow::Result<()> {
    let client = tracehop_telemetry::http::client::plain_client_builder()
        .build()
        .unwrap_or_default();
    let deadline = Instant::now() + timeout;
    let mut process = process;
    loop {
        let healthy = client
            .get(url)
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_ok_and(|response| response.status().is_success());
        if healthy {
            return Ok(());
        }
        if let Some(process) = process.as_deref_mut()
            && let Some(status) = process.exited()
        {
            anyhow::bail!(
                "{} exited ({status}) before becoming healthy; last log lines:\n{}",
                process.name,
                process.log_tail(20)
            );
        }
        if Instant::now() >= deadline {
            let tail = process.map(|p| p.log_tail(20)).unwrap_or_default();
            anyhow::bail!("{url} not healthy after {timeout:?}; last log lines:\n{tail}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_never_repeated_and_never_ephemeral() {
        let (low, high) = unassigned_port_range();
        let ports: Vec<u16> = (0..200).map(|_| free_port().unwrap()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        assert!(ports.iter().all(|port| (low..high).contains(port)));
        // And each one was really free: bindable right now.
        for port in ports.iter().take(20) {
            std::net::TcpListener::bind(("127.0.0.1", *port)).unwrap();
        }
    }

    #[test]
    fn the_log_tail_skips_backtraces_but_keeps_causes() {
        let log = "{\"level\":\"ERROR\"}\nError: creating the stream\n\nCaused by:\n    0: timed out\n\n\
                   Stack backtrace:\n   0: anyhow::error\n             at src/error.rs:1:1\n  43: std::rt\n\
                   note: Some details are omitted";
        assert_eq!(
            without_backtraces(log),
            vec![
                "{\"level\":\"ERROR\"}",
                "Error: creating the stream",
                "",
                "Caused by:",
                "    0: timed out",
                "",
                "note: Some details are omitted"
            ]
        );
    }
}
