//! The span spool: spans reach a file before they reach the exporter, so a process killed with SIGKILL (an
//! OOM kill, a crashed node agent, a drill) does not take its last spans with it. Another process of the
//! same host (a sibling replica, or the killed one's successor) finds the spool it left and exports it.
//!
//! Why: with a batch processor in memory, a kill loses up to one batch delay of spans, and the traces of
//! orders that *were* answered lose their middle: a billing span missing under the gateway's call, a
//! notifier's delivery whose parent was never exported. A trace with a hole cannot say what happened.
//!
//! How (`TRACEHOP_SPAN_SPOOL=<directory>` switches it on; [`super::init`]):
//!
//! - **One write per local tree.** A span that ends while its parent (in this process) is still in memory
//!   waits there with it; the span with no local parent left in memory (the request's server span, a
//!   consumer span, a late relay span) is written with everything that waited under it in one `write(2)`.
//!   So the file never holds a child without its parent, and the request path pays one system call per
//!   tree, into the page cache, which survives the process. (Spans wait under one parent for at most
//!   [`MAX_WAITING`] of them and [`MAX_WAIT`]: a parent that lives long does not hold its children back.)
//! - **A span whose context leaves the process is on disk first.** Before a context is injected into an
//!   outgoing request, a NATS message or a stored row ([`expose`]), the span and its local ancestors are
//!   written: an open one as an `Open` record, what it was when it started; an ended one still waiting in
//!   memory as it ended. If the process dies before the open ones end, the successor exports them as ended
//!   at the death, with an error status, so the downstream spans that already exist still hang from their
//!   parent.
//! - **The file is the queue.** This process's export thread reads the spool from where it stopped (a
//!   megabyte at a time, however far behind it is), hands the spans to the exporter in batches
//!   (`OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`) and records how far it got in a small
//!   `exported` file. Segments are rotated at [`SEGMENT_BYTES`] and deleted once exported. With OTLP/HTTP
//!   ([`Direct`]) it writes each export request straight from the records ([`otlp`]): a span is encoded
//!   once, when it ends, and never rebuilt to be exported.
//! - **A dead owner is found by its lock.** Each process holds an exclusive `flock` on its own spool
//!   directory's `lock` file for its whole life; the kernel releases it when the process dies, however it
//!   dies. Every [`ADOPT_EVERY`] the export thread tries the lock of every other spool directory under the
//!   same root: one it can take belongs to a dead process, whose unexported spans it exports under the dead
//!   process's own resource (`service.name`, `service.instance.id`), a batch at a time with the dead
//!   spool's position recorded after each (an adoption cut short resumes there, exporting nothing twice),
//!   then marks it [`ADOPTED`] and removes it (one that cannot be removed is exported no more).
//! - **Bounded.** When the export falls [`MAX_BACKLOG_BYTES`] behind (a collector down for long), new
//!   spans are dropped and counted, as a full batch queue would: never a slower or failed request.
//!
//! What it does not cover: a kill of the machine (the page cache is not synced), and a span whose context
//! never left the process and that had not ended (it is lost with the process, and nothing points to it).
//!
//! What it costs: the writes happen on the thread that ended the span or injected the context, an async
//! worker among them. They go to the page cache and return in microseconds; they would wait for the disk
//! only if the kernel throttled writers for dirty pages (gigabytes behind on this workload's few MB/s). The
//! measured price is in BENCHMARKS.md, section 8.

mod codec;
mod otlp;

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::Context;
use opentelemetry::trace::{SpanId, Status, TraceContextExt};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};

use codec::Kind;

use super::export::ExportCounts;
use super::otlp_http::OtlpHttp;

/// A segment is closed and a new one begun past this size.
pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// How far the export may fall behind the spans written before new spans are dropped.
pub const MAX_BACKLOG_BYTES: u64 = 256 * 1024 * 1024;
/// How much of a segment the export thread reads at a time.
const READ_CHUNK: usize = 1024 * 1024;
/// The file an adoption leaves in a dead spool once all of it is exported, in case the directory cannot be
/// removed: a later adoption then exports nothing more.
const ADOPTED: &str = "adopted";
/// How often the spool directories of other processes are checked for a dead owner.
pub const ADOPT_EVERY: Duration = Duration::from_secs(1);
/// Spans that may wait under one open parent; past it they are written on their own (with their open
/// ancestors as `Open` records), so a span that never ends cannot hold its children back for ever.
const MAX_WAITING: usize = 1024;
/// How long spans may wait under one open parent; past it they are written on their own, as above.
const MAX_WAIT: Duration = Duration::from_secs(10);

/// The span ids' own hasher: they are random already (W3C Trace Context), so their bytes are the hash.
/// (SipHash was 2% of a span's cost in `entries`.)
#[derive(Default)]
struct SpanIdHasher(u64);

impl std::hash::Hasher for SpanIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0_u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(29) ^ u64::from_ne_bytes(word);
        }
    }
}

type SpanIdMap<V> = HashMap<SpanId, V, std::hash::BuildHasherDefault<SpanIdHasher>>;

thread_local! {
    /// Each thread's encoding buffer and list of the spans of a tree, reused from one write to the next.
    /// Both are often more than a kilobyte, and glibc serves such a request outside its per-thread cache
    /// (consolidating its fast bins first): allocating, growing and freeing them per write cost more than the
    /// encoding itself (BENCHMARKS.md, section 16).
    static ENCODE_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static TREE: RefCell<Vec<SpanData>> = const { RefCell::new(Vec::new()) };
}

/// Runs `work` with this thread's kept `Vec` from `key`, empty. One that grew past `keep` elements is
/// given back to the allocator afterwards, so a rare large tree does not stay resident; a re-entrant call (a
/// write while this thread's is out) gets a fresh one.
fn with_kept<T: 'static, R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<T>>>,
    keep: usize,
    work: impl FnOnce(&mut Vec<T>) -> R,
) -> R {
    let mut kept = key
        .try_with(|cell| {
            cell.try_borrow_mut()
                .map(|mut kept| std::mem::take(&mut *kept))
        })
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let outcome = work(&mut kept);
    kept.clear();
    if kept.capacity() <= keep {
        let _ = key.try_with(|cell| cell.try_borrow_mut().map(|mut slot| *slot = kept));
    }
    outcome
}

/// [`with_kept`] for the encoding buffer: up to 16 KiB kept per thread (a tree of a few dozen spans).
fn with_encode_buffer<R>(work: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    with_kept(&ENCODE_BUFFER, 16 * 1024, work)
}

/// The one spool of this process, for [`expose`].
static SPOOL: OnceLock<Arc<Shared>> = OnceLock::new();

/// Call before `context` leaves the process: the span it names, and its open ancestors in this process,
/// are written to the spool (once each), so the spans another process makes beneath it will have a parent
/// even if this process dies first. Does nothing without a spool.
pub(crate) fn expose(context: &Context) {
    if let Some(shared) = SPOOL.get() {
        let span_id = context.span().span_context().span_id();
        shared.expose(span_id);
    }
}

/// A span of this process not yet on disk as ended: open, or ended and waiting for an open ancestor.
struct Entry {
    state: State,
    /// Its descendants that ended before it and wait to be written with it (each still an entry).
    waiting: Vec<SpanId>,
}

enum State {
    /// Started, not ended: the span as it started, and whether it was written as `Open` (its context left
    /// the process).
    Open { start: SpanData, exposed: bool },
    /// Ended, waiting in memory for the ancestor under which it will be written.
    Ended(SpanData),
}

impl Entry {
    /// Whether its children may still wait for it: an open span started less than [`MAX_WAIT`] ago (a span
    /// that lives long, a loop's, must not hold its children back for as long as it lives).
    fn is_young(&self) -> bool {
        match &self.state {
            State::Open { start, .. } => start.start_time.elapsed().is_ok_and(|age| age < MAX_WAIT),
            State::Ended(_) => true,
        }
    }
}

/// Takes `id` and everything that waits under it out of `entries`: the ended spans of that subtree, to be
/// written together.
fn take_tree(entries: &mut SpanIdMap<Entry>, id: SpanId, tree: &mut Vec<SpanData>) {
    let mut next = vec![id];
    while let Some(id) = next.pop() {
        if let Some(entry) = entries.remove(&id) {
            if let State::Ended(span) = entry.state {
                tree.push(span);
            }
            next.extend(entry.waiting);
        }
    }
}

struct Segment {
    number: u64,
    file: File,
    bytes: u64,
}

struct Shared {
    dir: PathBuf,
    root: PathBuf,
    entries: Mutex<SpanIdMap<Entry>>,
    segment: Mutex<Segment>,
    /// Bytes written and bytes the export has passed, over all segments.
    written: AtomicU64,
    passed: AtomicU64,
    /// Ended spans written and not yet handed to the exporter (a full batch wakes the export early).
    pending: AtomicU64,
    /// Spans per export batch.
    batch: u64,
    dropped: AtomicU64,
    control: Mutex<Control>,
    wake: Condvar,
    /// Held (with its `flock`) for the life of the process: the sign that this spool has an owner.
    _lock: File,
}

#[derive(Default)]
struct Control {
    resource: Option<Resource>,
    flush_requested: u64,
    flush_done: u64,
    shutdown: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data behind (every update is one
    // statement), so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Puts `span_id` and its ancestors in this process on disk: an open one as it started (`Open`, once),
    /// an ended one still waiting in memory as it ended (with what waits under it). Stops at the first
    /// already on disk: its own ancestors are too.
    fn expose(&self, span_id: SpanId) {
        with_encode_buffer(|buffer| self.expose_into(buffer, span_id));
    }

    fn expose_into(&self, buffer: &mut Vec<u8>, span_id: SpanId) {
        let (mut opened, mut ended) = (0, Vec::new());
        {
            let mut entries = lock(&self.entries);
            let mut next = span_id;
            while let Some(entry) = entries.get_mut(&next) {
                match &mut entry.state {
                    State::Open { exposed: true, .. } => break,
                    State::Open { start, exposed } => {
                        *exposed = true;
                        codec::push_record(buffer, Kind::Open, start);
                        opened += 1;
                        next = start.parent_span_id;
                    }
                    State::Ended(span) => {
                        let parent = span.parent_span_id;
                        // Written now, so it is no longer in the tree its ancestor will write.
                        take_tree(&mut entries, next, &mut ended);
                        next = parent;
                    }
                }
            }
        }
        for span in &ended {
            codec::push_record(buffer, Kind::Ended, span);
        }
        if !buffer.is_empty() {
            self.write(buffer, opened + ended.len(), ended.len() as u64);
        }
    }

    /// Appends `buffer` (`spans` records, of which `ended` are `Ended`) to the current segment, in one write.
    /// False when the spans were dropped.
    fn write(&self, buffer: &[u8], spans: usize, ended: u64) -> bool {
        let backlog = self
            .written
            .load(Ordering::Relaxed)
            .saturating_sub(self.passed.load(Ordering::Relaxed));
        if backlog > MAX_BACKLOG_BYTES {
            self.dropped.fetch_add(spans as u64, Ordering::Relaxed);
            return false;
        }
        let mut segment = lock(&self.segment);
        if segment.bytes >= SEGMENT_BYTES
            && let Err(error) = self.rotate(&mut segment)
        {
            eprintln!("span spool: could not begin a new segment: {error}");
        }
        // Before the write: the export thread must never see a record it has not been told of.
        self.pending.fetch_add(ended, Ordering::Relaxed);
        match segment.file.write_all(buffer) {
            Ok(()) => {
                segment.bytes += buffer.len() as u64;
                self.written
                    .fetch_add(buffer.len() as u64, Ordering::Relaxed);
                true
            }
            Err(error) => {
                // A write that failed part-way may have left a record cut short: nothing more goes into this
                // segment, whose reader then stops there.
                segment.bytes = SEGMENT_BYTES;
                decrement(&self.pending, ended);
                self.dropped.fetch_add(spans as u64, Ordering::Relaxed);
                eprintln!("span spool: write failed, {spans} span(s) dropped: {error}");
                false
            }
        }
    }

    /// Begins the next segment. The spans already exposed and still open are written into it again, so a
    /// successor that finds only the newer segments still knows them.
    fn rotate(&self, segment: &mut Segment) -> std::io::Result<()> {
        let number = segment.number + 1;
        let file = open_segment(&self.dir, number)?;
        let mut buffer = Vec::new();
        let mut spans = 0;
        for entry in lock(&self.entries).values() {
            if let State::Open {
                start,
                exposed: true,
            } = &entry.state
            {
                codec::push_record(&mut buffer, Kind::Open, start);
                spans += 1;
            }
        }
        *segment = Segment {
            number,
            file,
            bytes: 0,
        };
        if spans > 0 {
            segment.file.write_all(&buffer)?;
            segment.bytes = buffer.len() as u64;
            self.written
                .fetch_add(buffer.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// `counter - by`, never below zero (a write that failed part-way may have had some of its records read).
fn decrement(counter: &AtomicU64, by: u64) {
    let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |value| {
        Some(value.saturating_sub(by))
    });
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:010}.spool"))
}

fn open_segment(dir: &Path, number: u64) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(segment_path(dir, number))
}

/// The spool's span processor. Holds the export thread, which exports this process's spans with the
/// exporter given to [`SpoolProcessor::start`] and a dead process's with one made by `make_exporter`.
pub(crate) struct SpoolProcessor {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for SpoolProcessor {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SpoolProcessor")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

/// Export settings, from the batch processor's standard variables.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) delay: Duration,
    pub(crate) batch: usize,
}

impl Settings {
    pub(crate) fn from_env() -> Self {
        let number = |name: &str| std::env::var(name).ok()?.trim().parse::<u64>().ok();
        Self {
            delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY").unwrap_or(5000)),
            batch: number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE")
                .and_then(|size| usize::try_from(size).ok())
                .filter(|size| *size > 0)
                .unwrap_or(512),
        }
    }
}

/// The export thread's OTLP/HTTP path: this process's spans go out as requests written straight from the
/// spool's records ([`otlp`]), with no span rebuilt on the way. Without it the records are decoded and
/// handed to the span exporter (gRPC, and the tests' and benchmarks' exporters); a dead process's spool is
/// always adopted through the span exporter.
pub(crate) struct Direct {
    pub(crate) http: OtlpHttp,
    pub(crate) counts: Arc<ExportCounts>,
    /// Longest string attribute value, in bytes ([`super::export::value_length_limit`]).
    pub(crate) value_limit: usize,
}

/// [`Direct`] at work: the request being filled, under this process's resource.
struct DirectState {
    direct: Direct,
    request: otlp::Request,
}

impl DirectState {
    /// Sends what the request holds (if anything); the outcome is counted as the span exporter's is, the
    /// spans a collector refused in a partial success as failed, and a partial success that refuses nothing
    /// but says something as a warning.
    fn send(&mut self) {
        let spans = self.request.len();
        if spans == 0 {
            return;
        }
        let (spans, counts) = (spans as u64, &self.direct.counts);
        match self.direct.http.send(self.request.take()) {
            Ok(answer) => {
                let rejected = answer.rejected_spans.min(spans);
                counts.exported(spans - rejected);
                if rejected == 0 && !answer.error_message.is_empty() {
                    counts.warned(&answer.error_message);
                }
                counts.failed(
                    rejected,
                    &format!(
                        "the collector refused {rejected} of {spans} spans: {}",
                        answer.error_message
                    ),
                );
            }
            Err(reason) => counts.failed(spans, &reason),
        }
    }
}

/// Why the spool could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("span spool in {dir}: {source}")]
pub struct SpoolError {
    dir: PathBuf,
    source: std::io::Error,
}

impl SpoolProcessor {
    /// A spool in a directory of its own under `root` (created if missing), named after the service and
    /// this process.
    pub(crate) fn start<E, F>(
        root: &Path,
        service: &str,
        exporter: E,
        make_exporter: F,
        settings: Settings,
        direct: Option<Direct>,
    ) -> Result<Self, SpoolError>
    where
        E: SpanExporter + 'static,
        F: Fn() -> Option<E> + Send + 'static,
    {
        let failed = |dir: &Path| {
            let dir = dir.to_owned();
            move |source| SpoolError { dir, source }
        };
        // One process may run more than one spool (tests do).
        static SPOOLS: AtomicU64 = AtomicU64::new(0);
        let serial = SPOOLS.fetch_add(1, Ordering::Relaxed);
        let name: String = format!("{service}-{}-{serial}", crate::service::instance_id())
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let dir = root.join(&name);
        // Made under a hidden name and renamed once locked, so no other process ever sees it unlocked.
        let making = root.join(format!(".{name}"));
        // Spans can hold what a request said: only the services' own user reads them (siblings run as it).
        fs::create_dir_all(root).map_err(failed(root))?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&making)
            .map_err(failed(&making))?;
        let lock_file = File::create(making.join("lock")).map_err(failed(&making))?;
        lock_file
            .try_lock()
            .map_err(|error| failed(&making)(std::io::Error::other(error.to_string())))?;
        fs::rename(&making, &dir).map_err(failed(&dir))?;
        let file = open_segment(&dir, 0).map_err(failed(&dir))?;
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            root: root.to_owned(),
            entries: Mutex::default(),
            segment: Mutex::new(Segment {
                number: 0,
                file,
                bytes: 0,
            }),
            written: AtomicU64::new(0),
            passed: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            batch: settings.batch as u64,
            dropped: AtomicU64::new(0),
            control: Mutex::default(),
            wake: Condvar::new(),
            _lock: lock_file,
        });
        let worker = shared.clone();
        let runtime = tokio::runtime::Handle::try_current().ok();
        let thread = std::thread::Builder::new()
            .name("span-spool".to_owned())
            .spawn(move || {
                // The gRPC exporter's connection lives on the service's runtime.
                let _entered = runtime.as_ref().map(tokio::runtime::Handle::enter);
                export_loop(&worker, exporter, &make_exporter, settings, direct);
            })
            .map_err(failed(&dir))?;
        // The first spool of the process serves `expose` (tests may build more than one).
        let _ = SPOOL.set(shared.clone());
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// [`SpanProcessor::on_end`] with this thread's kept list for the spans of the tree (empty).
    fn end(&self, span: SpanData, tree: &mut Vec<SpanData>) {
        let shared = &self.shared;
        let id = span.span_context.span_id();
        let parent = span.parent_span_id;
        let parent_in_memory = {
            let mut entries = lock(&shared.entries);
            let waiting = entries.get(&id).map_or(0, |entry| entry.waiting.len());
            match entries.get_mut(&parent) {
                // The parent is still in memory here (open, or ended and itself waiting), has room, and is
                // young: wait with it.
                Some(parent)
                    if parent.waiting.len() + waiting < MAX_WAITING && parent.is_young() =>
                {
                    parent.waiting.push(id);
                    match entries.get_mut(&id) {
                        Some(entry) => entry.state = State::Ended(span),
                        None => {
                            let state = State::Ended(span);
                            let waiting = Vec::new();
                            entries.insert(id, Entry { state, waiting });
                        }
                    }
                    return;
                }
                _ => {}
            }
            take_tree(&mut entries, id, tree);
            tree.push(span);
            // A parent in memory that is full or old: what waits under it goes now too, rather than for as
            // long as it lives.
            match entries.get_mut(&parent) {
                Some(parent) => {
                    for waiting in std::mem::take(&mut parent.waiting) {
                        take_tree(&mut entries, waiting, tree);
                    }
                    true
                }
                None => false,
            }
        };
        // A parent still in memory here (full or old) goes to disk first, so the file never holds a span
        // without its parent. (The usual tree, whose root has no parent here, skips this.)
        if parent_in_memory {
            shared.expose(parent);
        }
        let count = tree.len() as u64;
        let written = with_encode_buffer(|buffer| {
            for span in tree.iter() {
                codec::push_record(buffer, Kind::Ended, span);
            }
            shared.write(buffer, tree.len(), count)
        });
        // The export thread wakes on its own schedule; a full batch wakes it early.
        if written && shared.pending.load(Ordering::Relaxed) >= shared.batch {
            shared.wake.notify_all();
        }
    }

    /// Spans dropped because the export fell too far behind or a write failed.
    pub(crate) fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    fn request(&self, shutdown: bool, timeout: Duration) -> OTelSdkResult {
        let deadline = Instant::now() + timeout;
        let mut control = lock(&self.shared.control);
        control.flush_requested += 1;
        control.shutdown |= shutdown;
        let ticket = control.flush_requested;
        self.shared.wake.notify_all();
        while control.flush_done < ticket {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(OTelSdkError::Timeout(timeout));
            }
            control = self
                .shared
                .wake
                .wait_timeout(control, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }
}

impl SpanProcessor for SpoolProcessor {
    fn on_start(&self, span: &mut Span, _cx: &Context) {
        // The span as it starts, kept in case its context leaves the process before it ends.
        if let Some(start) = span.exported_data() {
            let id = start.span_context.span_id();
            let entry = Entry {
                state: State::Open {
                    start,
                    exposed: false,
                },
                waiting: Vec::new(),
            };
            lock(&self.shared.entries).insert(id, entry);
        }
    }

    fn on_end(&self, span: SpanData) {
        // Up to 32 spans' room kept per thread (about 11 KiB).
        with_kept(&TREE, 32, |tree| self.end(span, tree));
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.request(false, Duration::from_secs(30))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let outcome = self.request(true, timeout);
        if let Some(thread) = lock(&self.thread).take()
            && outcome.is_ok()
        {
            let _ = thread.join();
        }
        let dropped = self.dropped();
        if dropped > 0 {
            eprintln!("span spool: {dropped} span(s) dropped");
        }
        outcome
    }

    fn set_resource(&mut self, resource: &Resource) {
        // Kept beside the spool, so a successor exports a dead process's spans under its own name.
        if let Err(error) = fs::write(self.shared.dir.join("resource"), encode_resource(resource)) {
            eprintln!("span spool: could not record the resource: {error}");
        }
        lock(&self.shared.control).resource = Some(resource.clone());
        self.shared.wake.notify_all();
    }
}

/// Where the export has got to: a segment and the offset in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Position {
    segment: u64,
    offset: u64,
}

impl Position {
    fn read(dir: &Path) -> Self {
        let Ok(bytes) = fs::read(dir.join("exported")) else {
            return Self::default();
        };
        let number = |range: std::ops::Range<usize>| {
            bytes
                .get(range)
                .and_then(|slice| slice.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        Self {
            segment: number(0..8),
            offset: number(8..16),
        }
    }

    fn write(self, file: &File) {
        let mut bytes = [0_u8; 16];
        bytes[..8].copy_from_slice(&self.segment.to_le_bytes());
        bytes[8..].copy_from_slice(&self.offset.to_le_bytes());
        if let Err(error) = file.write_all_at(&bytes, 0) {
            eprintln!("span spool: could not record the export position: {error}");
        }
    }
}

fn export_loop<E, F>(
    shared: &Shared,
    mut exporter: E,
    make_exporter: &F,
    settings: Settings,
    direct: Option<Direct>,
) where
    E: SpanExporter,
    F: Fn() -> Option<E>,
{
    let mark = match OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(shared.dir.join("exported"))
    {
        Ok(file) => Some(file),
        Err(error) => {
            eprintln!("span spool: no export position file: {error}");
            None
        }
    };
    let mut direct = direct.map(|direct| DirectState {
        request: otlp::Request::new(&[], direct.value_limit),
        direct,
    });
    let mut at = Position::default();
    let mut next_export = Instant::now() + settings.delay;
    let mut next_adoption = Instant::now();
    loop {
        let (ticket, flush, shutdown) = {
            let mut control = lock(&shared.control);
            loop {
                let flush = control.flush_done < control.flush_requested;
                let full = shared.pending.load(Ordering::Relaxed) >= settings.batch as u64;
                let left = next_export
                    .min(next_adoption)
                    .saturating_duration_since(Instant::now());
                if control.shutdown || flush || full || left.is_zero() {
                    break;
                }
                control = shared
                    .wake
                    .wait_timeout(control, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if let Some(resource) = control.resource.take() {
                if let Some(direct) = &mut direct {
                    direct.request =
                        otlp::Request::new(&encode_resource(&resource), direct.direct.value_limit);
                }
                exporter.set_resource(&resource);
            }
            let flush = control.flush_done < control.flush_requested;
            (control.flush_requested, flush, control.shutdown)
        };
        let now = Instant::now();
        let full = shared.pending.load(Ordering::Relaxed) >= settings.batch as u64;
        if flush || shutdown || full || now >= next_export {
            drain(
                shared,
                &exporter,
                direct.as_mut(),
                &mut at,
                mark.as_ref(),
                settings.batch,
            );
            next_export = now + settings.delay;
        }
        if !shutdown && now >= next_adoption {
            adopt_orphans(&shared.root, &shared.dir, make_exporter, settings.batch);
            next_adoption = Instant::now() + ADOPT_EVERY;
        }
        {
            let mut control = lock(&shared.control);
            control.flush_done = control.flush_done.max(ticket);
            shared.wake.notify_all();
        }
        if shutdown {
            let _ = exporter.shutdown();
            // Everything was exported: nothing for a successor to find.
            if shared.written.load(Ordering::Relaxed) == shared.passed.load(Ordering::Relaxed) {
                let _ = fs::remove_dir_all(&shared.dir);
            }
            return;
        }
    }
}

/// Exports what this process wrote since `at`, segment after segment, [`READ_CHUNK`] at a time.
fn drain<E: SpanExporter>(
    shared: &Shared,
    exporter: &E,
    mut direct: Option<&mut DirectState>,
    at: &mut Position,
    mark: Option<&File>,
    batch_size: usize,
) {
    loop {
        // Read before looking at the file: a segment the writer has left is complete.
        let writer_segment = lock(&shared.segment).number;
        let path = segment_path(&shared.dir, at.segment);
        match fs::File::open(&path) {
            Ok(file) => drain_segment(
                shared,
                exporter,
                direct.as_deref_mut(),
                at,
                mark,
                batch_size,
                &file,
            ),
            Err(error) => eprintln!("span spool: could not read {}: {error}", path.display()),
        }
        if writer_segment > at.segment {
            // The writer has moved on and this segment is read to its end.
            let _ = fs::remove_file(&path);
            *at = Position {
                segment: at.segment + 1,
                offset: 0,
            };
            if let Some(mark) = mark {
                at.write(mark);
            }
            continue;
        }
        return;
    }
}

/// Exports the whole records of one segment from `at` on, in batches, moving `at` past each batch once it
/// is handed to the exporter. Reads the segment a chunk at a time ([`each_record`]), so the export thread
/// holds at most a batch and a chunk however far behind the writers it is. (It used to read all of the
/// segment's backlog at once: up to a whole segment, [`SEGMENT_BYTES`], when exports are slow, as against a
/// collector that lets each request time out.)
fn drain_segment<E: SpanExporter>(
    shared: &Shared,
    exporter: &E,
    mut direct: Option<&mut DirectState>,
    at: &mut Position,
    mark: Option<&File>,
    batch_size: usize,
    file: &File,
) {
    let mut batch = Vec::new();
    // The offset just past the last record read.
    let mut read_to = at.offset;
    let outcome = each_record(file, at.offset, |kind, payload, end| {
        read_to = end;
        if kind == Some(Kind::Ended) {
            // Counted up before the record was written (under the segment lock).
            decrement(&shared.pending, 1);
            match direct.as_deref_mut() {
                Some(direct) => {
                    direct.request.push(payload);
                }
                None => batch.extend(codec::decode_span(payload)),
            }
        }
        let queued = direct
            .as_deref()
            .map_or(batch.len(), |direct| direct.request.len());
        if queued >= batch_size {
            export(exporter, direct.as_deref_mut(), std::mem::take(&mut batch));
            pass(shared, at, end, mark);
        }
        true
    });
    if let Err(error) = outcome {
        eprintln!("span spool: could not read segment {}: {error}", at.segment);
    }
    export(exporter, direct, batch);
    pass(shared, at, read_to, mark);
}

/// Calls `each` with every whole record of `file` from `offset` on: its kind, its payload, and the offset
/// just past it. Reads [`READ_CHUNK`] at a time (a record longer than that, whole), so a segment's size
/// never decides what is held in memory. Stops at the end of what has been written (a record cut short
/// there is left for later), or when `each` returns false.
fn each_record(
    file: &File,
    mut offset: u64,
    mut each: impl FnMut(Option<Kind>, &[u8], u64) -> bool,
) -> std::io::Result<()> {
    let mut want = READ_CHUNK;
    loop {
        let bytes = read_from(file, offset, want)?;
        let mut consumed = 0;
        while let Some((kind, payload, used)) = codec::next_record(&bytes[consumed..]) {
            consumed += used;
            if !each(kind, payload, offset + consumed as u64) {
                return Ok(());
            }
        }
        offset += consumed as u64;
        if bytes.len() < want {
            // The end of what has been written.
            return Ok(());
        }
        want = match codec::record_length(&bytes[consumed..]) {
            // A record longer than a chunk: read it whole next time.
            Some(length) if consumed == 0 => length.max(READ_CHUNK),
            _ => READ_CHUNK,
        };
    }
}

/// Moves the export position on to `to` in its segment (and records it).
fn pass(shared: &Shared, at: &mut Position, to: u64, mark: Option<&File>) {
    if to <= at.offset {
        return;
    }
    shared.passed.fetch_add(to - at.offset, Ordering::Relaxed);
    at.offset = to;
    if let Some(mark) = mark {
        at.write(mark);
    }
}

/// At most `limit` bytes of `file` from `offset` (fewer at its end).
fn read_from(file: &File, offset: u64, limit: usize) -> std::io::Result<Vec<u8>> {
    let length = file.metadata()?.len().saturating_sub(offset);
    let mut bytes = vec![0; usize::try_from(length).unwrap_or(usize::MAX).min(limit)];
    let mut filled = 0;
    while filled < bytes.len() {
        match file.read_at(&mut bytes[filled..], offset + filled as u64)? {
            0 => break,
            read => filled += read,
        }
    }
    bytes.truncate(filled);
    Ok(bytes)
}

/// Sends what is queued: the direct path's request, or `batch` through the exporter.
fn export<E: SpanExporter>(exporter: &E, direct: Option<&mut DirectState>, batch: Vec<SpanData>) {
    // Failures are counted (by [`DirectState::send`], or by the exporter wrapper
    // [`super::export::GuardedExporter`]) and the batch is dropped, as the batch processor does: a collector
    // that refuses a batch would refuse it again.
    if let Some(direct) = direct {
        direct.send();
    }
    if !batch.is_empty() {
        let _ = futures::executor::block_on(exporter.export(batch));
    }
}

/// A resource's attributes in the records' own encoding (what the spool keeps beside it, and what
/// [`otlp::Request::new`] reads).
fn encode_resource(resource: &Resource) -> Vec<u8> {
    let attributes: Vec<KeyValue> = resource
        .iter()
        .map(|(key, value)| KeyValue::new(key.clone(), value.clone()))
        .collect();
    codec::encode_attributes(&attributes)
}

/// Exports and removes the spools under `root` whose owner has died.
fn adopt_orphans<E, F>(root: &Path, own: &Path, make_exporter: &F, batch_size: usize)
where
    E: SpanExporter,
    F: Fn() -> Option<E>,
{
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if dir == own || hidden || !dir.is_dir() {
            continue;
        }
        let Ok(lock_file) = File::open(dir.join("lock")) else {
            continue;
        };
        // Taken: its owner is gone. (Still held: alive.)
        if lock_file.try_lock().is_err() {
            continue;
        }
        // No resource: another adopter finished it between our open and our lock, or its owner died before
        // it traced anything. Either way there is nothing to export.
        if !dir.join("resource").exists() {
            let _ = fs::remove_dir_all(&dir);
            continue;
        }
        let Some(mut exporter) = make_exporter() else {
            return;
        };
        if adopt(&dir, &mut exporter, batch_size) {
            let _ = fs::remove_dir_all(&dir);
        }
        let _ = exporter.shutdown();
    }
}

/// Exports the unexported spans of the dead process's spool `dir`, and its exposed spans that never ended
/// as ended at its death. True when all of it was exported.
///
/// It streams: each segment is read a chunk at a time ([`each_record`]) and its ended spans are exported a
/// batch at a time, the dead spool's own export position moved past each batch the exporter took. So an
/// adoption that fails part-way (the collector went away) is taken up where it stopped by the next attempt,
/// of this process or another: no span is exported twice and none is skipped. What it holds is a batch, a
/// chunk, and the exposed spans not yet seen ending (few: the dead process's requests in flight).
fn adopt<E: SpanExporter>(dir: &Path, exporter: &mut E, batch_size: usize) -> bool {
    // Everything, the spans ended by the death included, was exported by an earlier adoption whose removal of
    // the directory failed: exporting the unfinished spans again would send them twice.
    if dir.join(ADOPTED).exists() {
        return true;
    }
    let attributes = fs::read(dir.join("resource"))
        .ok()
        .and_then(|bytes| codec::decode_attributes(&bytes))
        .unwrap_or_default();
    exporter.set_resource(
        &Resource::builder_empty()
            .with_attributes(attributes)
            .build(),
    );
    let mark = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("exported"))
        .inspect_err(|error| eprintln!("span spool: no export position in {dir:?}: {error}"))
        .ok();
    let mut at = Position::read(dir);
    let mut segments: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let number = name.strip_suffix(".spool")?.parse().ok()?;
            Some((number, entry.path()))
        })
        .filter(|(number, _)| *number >= at.segment)
        .collect();
    segments.sort();
    let batch_size = batch_size.max(1);
    // Exposed and not (yet) seen ending. An `Ended` record always follows its span's `Open` records: both
    // are written in the order they happen, and a rotation rewrites only spans still open.
    let mut open: HashMap<SpanId, SpanData> = HashMap::new();
    let mut death = SystemTime::UNIX_EPOCH;
    for (number, path) in &segments {
        let Ok(file) = File::open(path) else { continue };
        if let Ok(modified) = file.metadata().and_then(|meta| meta.modified()) {
            death = death.max(modified);
        }
        if *number > at.segment {
            at = Position {
                segment: *number,
                offset: 0,
            };
        }
        // The records before the position were exported already; they are still read for what they say
        // of the exposed spans.
        let exported_to = at.offset;
        let mut batch = Vec::new();
        let mut batch_end = exported_to;
        let mut whole = true;
        let read = each_record(&file, 0, |kind, payload, end| {
            let Some(span) = codec::decode_span(payload) else {
                return true;
            };
            match kind {
                Some(Kind::Open) => {
                    open.insert(span.span_context.span_id(), span);
                }
                Some(Kind::Ended) => {
                    open.remove(&span.span_context.span_id());
                    if end > exported_to {
                        batch.push(span);
                        batch_end = end;
                    }
                }
                None => {}
            }
            if batch.len() >= batch_size {
                whole = export_adopted(exporter, std::mem::take(&mut batch));
                if whole {
                    moved_to(&mut at, batch_end, mark.as_ref());
                }
            }
            whole
        });
        if let Err(error) = read {
            eprintln!("span spool: could not read {}: {error}", path.display());
        }
        if !batch.is_empty() {
            whole &= export_adopted(exporter, batch);
        }
        if !whole {
            return false;
        }
        moved_to(&mut at, batch_end, mark.as_ref());
    }
    // The spans that had gone out and never came back: ended by the death of their process. Exported in one
    // request, so they too are exported once or not at all.
    let mut unfinished: Vec<SpanData> = open
        .into_values()
        .map(|mut span| {
            span.end_time = death.max(span.start_time);
            span.status = Status::error("the process ended before this span did");
            span.attributes
                .push(KeyValue::new("error.type", Value::from("process_exited")));
            span
        })
        .collect();
    unfinished.sort_by_key(|span| span.start_time);
    let done = unfinished.is_empty() || export_adopted(exporter, unfinished);
    if done && let Err(error) = fs::write(dir.join(ADOPTED), b"") {
        eprintln!("span spool: could not mark {dir:?} adopted: {error}");
    }
    done
}

fn export_adopted<E: SpanExporter>(exporter: &E, batch: Vec<SpanData>) -> bool {
    futures::executor::block_on(exporter.export(batch)).is_ok()
}

/// Moves an adopted spool's export position on to `offset` in its segment (and records it).
fn moved_to(at: &mut Position, offset: u64, mark: Option<&File>) {
    if offset > at.offset {
        at.offset = offset;
        if let Some(mark) = mark {
            at.write(mark);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashSet;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    use opentelemetry::trace::{Span as _, TraceContextExt, Tracer, TracerProvider as _};
    use opentelemetry_sdk::trace::SdkTracerProvider;

    use super::*;

    thread_local! {
        static KEPT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    #[test]
    fn a_thread_s_kept_buffer_is_reused_empty_lent_once_and_let_go_when_large() {
        // Reused, and handed out empty.
        with_kept(&KEPT, 64, |buffer| buffer.extend_from_slice(b"first"));
        let (reused, empty) = with_kept(&KEPT, 64, |buffer| {
            (buffer.capacity() >= 5, buffer.is_empty())
        });
        assert!(reused && empty);
        // A call while the buffer is out (a span ended inside a write) gets a fresh one, and the outer
        // one is untouched.
        with_kept(&KEPT, 64, |outer| {
            outer.extend_from_slice(b"outer");
            with_kept(&KEPT, 64, |inner| {
                assert_eq!(inner.capacity(), 0);
                inner.push(1);
            });
            assert_eq!(outer.as_slice(), b"outer");
        });
        // One grown past what is kept is given back to the allocator.
        with_kept(&KEPT, 64, |buffer| buffer.resize(1024, 0));
        assert_eq!(with_kept(&KEPT, 64, |buffer| buffer.capacity()), 0);
    }

    /// Collects what it is given, with the `service.name` it was given.
    #[derive(Debug, Clone, Default)]
    struct Collect {
        spans: Arc<Mutex<Vec<(String, SpanData)>>>,
        service: String,
    }

    impl SpanExporter for Collect {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let mut spans = self.spans.lock().unwrap();
            spans.extend(batch.into_iter().map(|span| (self.service.clone(), span)));
            Ok(())
        }

        fn set_resource(&mut self, resource: &Resource) {
            self.service = resource
                .get(&opentelemetry::Key::new("service.name"))
                .map(|value| value.to_string())
                .unwrap_or_default();
        }
    }

    fn provider(
        root: &Path,
        service: &str,
        exporter: Collect,
        delay: Duration,
    ) -> SdkTracerProvider {
        let make = {
            let exporter = exporter.clone();
            move || Some(exporter.clone())
        };
        let settings = Settings { delay, batch: 512 };
        let processor =
            SpoolProcessor::start(root, service, exporter, make, settings, None).unwrap();
        SdkTracerProvider::builder()
            .with_resource(
                Resource::builder_empty()
                    .with_service_name(service.to_owned())
                    .build(),
            )
            .with_span_processor(processor)
            .build()
    }

    /// Not a test of its own: the process `a_killed_process_s_spans_are_exported_by_a_sibling` kills.
    #[test]
    #[ignore = "run by another test as the process it kills"]
    fn killed_child() {
        let Ok(root) = std::env::var("TRACEHOP_TEST_SPOOL_ROOT") else {
            return;
        };
        // It never exports on its own: everything it leaves is found in its spool.
        let provider = provider(
            Path::new(&root),
            "child",
            Collect::default(),
            Duration::from_secs(3600),
        );
        let tracer = provider.tracer("test");
        let request = Context::new().with_span(tracer.start("request"));
        let call = request.with_span(tracer.start_with_context("call", &request));
        // The call's context leaves the process (into a request or a message).
        expose(&call);
        // Ended under the still-open call: waits for it in memory, and dies with the process.
        tracer.start_with_context("inside", &call).end();
        // A span that ends before its child, whose context then leaves the process (as a relay publishes
        // after the handler returned): the ended parent must reach the disk with it.
        let handler = request.with_span(tracer.start_with_context("handler", &request));
        let publish = handler.with_span(tracer.start_with_context("publish", &handler));
        handler.span().end();
        expose(&publish);
        // A whole local tree: on disk when it ends.
        tracer.start("finished").end();
        println!("ready");
        std::thread::sleep(Duration::from_secs(3600));
    }

    #[test]
    fn a_killed_process_s_spans_are_exported_by_a_sibling() {
        let root = std::env::temp_dir().join(format!("spool-test-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&root).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "setup::spool::tests::killed_child",
                "--ignored",
                "--nocapture",
            ])
            .env("TRACEHOP_TEST_SPOOL_ROOT", &root)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let ready = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("ready"));
        assert!(ready, "the child never got ready");
        // SIGKILL: no shutdown, no flush.
        child.kill().unwrap();
        child.wait().unwrap();

        let collect = Collect::default();
        let provider = provider(&root, "sibling", collect.clone(), Duration::from_millis(50));
        let deadline = Instant::now() + Duration::from_secs(10);
        let found = loop {
            let found: Vec<(String, SpanData)> = collect.spans.lock().unwrap().clone();
            if found.len() >= 5 || Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let named = |name: &str| found.iter().find(|(_, span)| span.name == name);
        // Exported under the dead process's own name.
        assert!(
            found.iter().all(|(service, _)| service == "child"),
            "{found:?}"
        );
        let (_, finished) = named("finished").expect("the ended tree");
        assert_eq!(finished.status, Status::Unset);
        // The exposed spans that never ended: ended by the death, as errors, parent before child.
        let (_, request) = named("request").expect("the exposed parent");
        let (_, call) = named("call").expect("the exposed span");
        assert_eq!(call.parent_span_id, request.span_context.span_id());
        // The ended parent of an exposed span, as it ended.
        let (_, handler) = named("handler").expect("the ended parent");
        assert_eq!(handler.status, Status::Unset);
        assert_eq!(handler.parent_span_id, request.span_context.span_id());
        let (_, publish) = named("publish").expect("the exposed child");
        assert_eq!(publish.parent_span_id, handler.span_context.span_id());
        for span in [request, call, publish] {
            assert!(matches!(span.status, Status::Error { .. }), "{span:?}");
            assert!(span.end_time >= span.start_time);
            assert!(
                span.attributes
                    .iter()
                    .any(|kv| kv.key.as_str() == "error.type"
                        && kv.value.as_str() == "process_exited")
            );
        }
        // Never exposed, never ended, never written: gone, and nothing points to it.
        assert!(named("inside").is_none());
        assert_eq!(found.len(), 5, "{found:?}");
        // The dead process's spool is gone once exported (removed right after the export returns, so
        // looked for until the deadline rather than at once).
        let left = loop {
            let left: Vec<_> = fs::read_dir(&root)
                .unwrap()
                .flatten()
                .map(|entry| entry.file_name())
                .collect();
            if left.len() == 1 || Instant::now() > deadline {
                break left;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(left.len(), 1, "{left:?}");
        provider.shutdown().unwrap();
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_backlog_longer_than_a_read_is_exported_once_each_record_longer_than_a_read_included() {
        let root = std::env::temp_dir().join(format!("spool-test-{}", uuid::Uuid::new_v4()));
        let collect = Collect::default();
        // Nothing is exported until the flush: the whole backlog waits in the segment.
        let provider = provider(&root, "behind", collect.clone(), Duration::from_secs(3600));
        let tracer = provider.tracer("test");
        let padding = "x".repeat(400);
        let spans = 6_000;
        for index in 0..spans {
            let mut span = tracer.start(format!("span {index}"));
            let value = if index == spans / 2 {
                // One record longer than a whole read.
                "y".repeat(READ_CHUNK + READ_CHUNK / 2)
            } else {
                padding.clone()
            };
            span.set_attribute(KeyValue::new("padding", value));
            span.end();
        }
        provider.force_flush().unwrap();
        let found = collect.spans.lock().unwrap().clone();
        let names: HashSet<&str> = found.iter().map(|(_, span)| span.name.as_ref()).collect();
        assert_eq!(found.len(), spans, "every span exactly once");
        assert_eq!(names.len(), spans);
        let long = found
            .iter()
            .find(|(_, span)| span.name == format!("span {}", spans / 2))
            .unwrap();
        assert_eq!(
            long.1.attributes[0].value.as_str().len(),
            READ_CHUNK + READ_CHUNK / 2
        );
        provider.shutdown().unwrap();
        let _ = fs::remove_dir_all(&root);
    }

    /// Fails its `fail_at`-th export (counting from 1), as a collector that goes away would; takes the
    /// others.
    #[derive(Debug, Clone)]
    struct FailOnce {
        inner: Collect,
        calls: Arc<AtomicU64>,
        fail_at: u64,
    }

    impl SpanExporter for FailOnce {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at {
                return Err(OTelSdkError::InternalFailure("collector away".to_owned()));
            }
            self.inner.export(batch).await
        }

        fn set_resource(&mut self, resource: &Resource) {
            self.inner.set_resource(resource);
        }
    }

    #[test]
    fn an_adoption_that_fails_part_way_is_finished_later_with_every_span_exported_once() {
        // Spans as the SDK makes them: a request with 1 300 steps under it.
        let made = Collect::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(made.clone())
            .build();
        let tracer = provider.tracer("test");
        let request = Context::new().with_span(tracer.start("request"));
        for index in 0..1_300 {
            tracer
                .start_with_context(format!("step {index}"), &request)
                .end();
        }
        request.span().end();
        let mut spans: Vec<SpanData> = made
            .spans
            .lock()
            .unwrap()
            .iter()
            .map(|(_, span)| span.clone())
            .collect();
        let request = spans.pop().unwrap();
        assert_eq!(request.name, "request");

        // The spool a process left when it died with the request open (its context had left the process):
        // two segments, each beginning with the request's `Open` record, and the first 100 steps exported.
        let dir = std::env::temp_dir().join(format!("spool-test-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("resource"),
            codec::encode_attributes(&[KeyValue::new("service.name", "dead")]),
        )
        .unwrap();
        let (first, second) = spans.split_at(700);
        for (number, steps) in [(0, first), (1, second)] {
            let mut bytes = Vec::new();
            codec::push_record(&mut bytes, Kind::Open, &request);
            for (index, span) in steps.iter().enumerate() {
                codec::push_record(&mut bytes, Kind::Ended, span);
                if number == 0 && index == 99 {
                    let exported = File::create(dir.join("exported")).unwrap();
                    let offset = bytes.len() as u64;
                    Position { segment: 0, offset }.write(&exported);
                }
            }
            fs::write(segment_path(&dir, number), bytes).unwrap();
        }

        // The second export fails: the adoption stops there, and the next one finishes it.
        let collect = Collect::default();
        let mut exporter = FailOnce {
            inner: collect.clone(),
            calls: Arc::default(),
            fail_at: 2,
        };
        assert!(
            !adopt(&dir, &mut exporter, 512),
            "the failed export is reported"
        );
        assert!(
            adopt(&dir, &mut exporter, 512),
            "the second attempt finishes"
        );

        let found = collect.spans.lock().unwrap().clone();
        let mut times: HashMap<String, usize> = HashMap::new();
        for (service, span) in &found {
            assert_eq!(service, "dead");
            *times.entry(span.name.to_string()).or_default() += 1;
        }
        let twice: Vec<_> = times.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "{} spans exported more than once, among them {:?}",
            twice.len(),
            &twice[..twice.len().min(3)]
        );
        for span in &spans[..100] {
            assert!(
                !times.contains_key(span.name.as_ref()),
                "{} was exported before",
                span.name
            );
        }
        for span in &spans[100..] {
            assert!(
                times.contains_key(span.name.as_ref()),
                "{} is missing",
                span.name
            );
        }
        let (_, unfinished) = found
            .iter()
            .find(|(_, span)| span.name == "request")
            .expect("the open request, ended by the death");
        assert!(matches!(unfinished.status, Status::Error { .. }));
        assert_eq!(found.len(), 1_200 + 1);

        // Adopted again, as when the directory could not be removed after the export: nothing more, the
        // request ended by the death included.
        assert!(adopt(&dir, &mut exporter, 512));
        assert_eq!(collect.spans.lock().unwrap().len(), 1_200 + 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_tree_is_exported_whole_and_the_spool_removed_at_shutdown() {
        let root = std::env::temp_dir().join(format!("spool-test-{}", uuid::Uuid::new_v4()));
        let collect = Collect::default();
        let provider = provider(&root, "alone", collect.clone(), Duration::from_secs(3600));
        let tracer = provider.tracer("test");
        let request = Context::new().with_span(tracer.start("request"));
        for _ in 0..3 {
            tracer.start_with_context("step", &request).end();
        }
        // Nothing of the tree is written before its root ends.
        assert_eq!(
            provider
                .force_flush()
                .map(|()| collect.spans.lock().unwrap().len())
                .unwrap(),
            0
        );
        request.span().end();
        provider.force_flush().unwrap();
        let spans = collect.spans.lock().unwrap().clone();
        assert_eq!(spans.len(), 4);
        assert!(spans.iter().all(|(service, _)| service == "alone"));
        provider.shutdown().unwrap();
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&root);
    }

    /// An OTLP/HTTP receiver on a port of its own: it decodes every request's body (protobuf), keeps the
    /// spans with their resource's `service.name`, and answers `status` with `answer` as the body.
    struct Receiver {
        url: String,
        spans: Arc<Mutex<Vec<(String, opentelemetry_proto::tonic::trace::v1::Span)>>>,
        requests: Arc<AtomicU64>,
    }

    fn receiver(status: u16, answer: Vec<u8>) -> Receiver {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;
        use std::io::Read;

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicU64::new(0));
        let (kept, counted) = (spans.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (kept, counted, answer) = (kept.clone(), counted.clone(), answer.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream);
                    loop {
                        let (mut length, mut line) = (0, String::new());
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        assert!(line.starts_with("POST /v1/traces "), "{line}");
                        loop {
                            line.clear();
                            reader.read_line(&mut line).unwrap();
                            let lower = line.to_ascii_lowercase();
                            if let Some(value) = lower.strip_prefix("content-length:") {
                                length = value.trim().parse().unwrap();
                            }
                            if lower.starts_with("content-type:") {
                                assert_eq!(lower.trim(), "content-type: application/x-protobuf");
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; length];
                        reader.read_exact(&mut body).unwrap();
                        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
                        counted.fetch_add(1, Ordering::Relaxed);
                        if status == 200 {
                            for resource_spans in request.resource_spans {
                                let service = resource_spans
                                    .resource
                                    .iter()
                                    .flat_map(|resource| &resource.attributes)
                                    .find(|attribute| attribute.key == "service.name")
                                    .and_then(|attribute| attribute.value.clone())
                                    .and_then(|value| value.value)
                                    .map(|value| format!("{value:?}"))
                                    .unwrap_or_default();
                                let mut kept = kept.lock().unwrap();
                                for scope in resource_spans.scope_spans {
                                    kept.extend(
                                        scope.spans.into_iter().map(|span| (service.clone(), span)),
                                    );
                                }
                            }
                        }
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
                            answer.len()
                        );
                        reader.get_mut().write_all(head.as_bytes()).unwrap();
                        reader.get_mut().write_all(&answer).unwrap();
                    }
                });
            }
        });
        Receiver {
            url,
            spans,
            requests,
        }
    }

    fn direct_provider(
        root: &Path,
        url: &str,
        counts: &Arc<ExportCounts>,
        batch: usize,
    ) -> SdkTracerProvider {
        let direct = Direct {
            http: OtlpHttp::to(url).unwrap(),
            counts: counts.clone(),
            value_limit: 8,
        };
        let settings = Settings {
            delay: Duration::from_secs(3600),
            batch,
        };
        let exporter = Collect::default();
        let make = || None::<Collect>;
        let processor =
            SpoolProcessor::start(root, "direct", exporter, make, settings, Some(direct)).unwrap();
        SdkTracerProvider::builder()
            .with_resource(
                Resource::builder_empty()
                    .with_service_name("direct")
                    .build(),
            )
            .with_span_processor(processor)
            .build()
    }

    #[test]
    fn the_direct_path_posts_every_span_once_as_otlp_under_the_resource_in_batches() {
        let root = std::env::temp_dir().join(format!("spool-test-{}", uuid::Uuid::new_v4()));
        let receiver = receiver(200, Vec::new());
        let counts = Arc::new(ExportCounts::default());
        let provider = direct_provider(&root, &receiver.url, &counts, 4);
        let tracer = provider.tracer("test");
        let request = Context::new().with_span(tracer.start("request"));
        let request_id = request.span().span_context().span_id();
        for step in 0..9 {
            let mut span = tracer.start_with_context("step", &request);
            span.set_attribute(KeyValue::new(
                "text",
                format!("{step} is longer than eight"),
            ));
            span.end();
        }
        request.span().end();
        provider.force_flush().unwrap();
        let spans = receiver.spans.lock().unwrap().clone();
        assert_eq!(spans.len(), 10);
        // Batches of 4: 10 spans in 3 requests.
        assert_eq!(receiver.requests.load(Ordering::Relaxed), 3);
        assert_eq!(counts.exported.load(Ordering::Relaxed), 10);
        assert!(
            spans
                .iter()
                .all(|(service, _)| service == "StringValue(\"direct\")")
        );
        let ids: HashSet<Vec<u8>> = spans.iter().map(|(_, span)| span.span_id.clone()).collect();
        assert_eq!(ids.len(), 10, "every span once");
        for (_, span) in spans.iter().filter(|(_, span)| span.name == "step") {
            assert_eq!(span.parent_span_id, request_id.to_bytes());
            let text = span.attributes.iter().find(|kv| kv.key == "text").unwrap();
            let value = text.value.clone().unwrap().value.unwrap();
            // Cut at the value length limit (8 here).
            assert!(format!("{value:?}").contains("is lon\""), "{value:?}");
        }
        provider.shutdown().unwrap();
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_refused_request_is_counted_as_failed_spans() {
        let root = std::env::temp_dir().join(format!("spool-test-{}", uuid::Uuid::new_v4()));
        let receiver = receiver(503, Vec::new());
        let counts = Arc::new(ExportCounts::default());
        let provider = direct_provider(&root, &receiver.url, &counts, 512);
        let tracer = provider.tracer("test");
        tracer.start("alone").end();
        tracer.start("alone").end();
        provider.force_flush().unwrap();
        assert_eq!(receiver.requests.load(Ordering::Relaxed), 1);
        assert_eq!(counts.failed.load(Ordering::Relaxed), 2);
        assert_eq!(counts.exported.load(Ordering::Relaxed), 0);
        provider.shutdown().unwrap();
        let _ = fs::remove_dir_all(&root);
    }

    /// Three spans sent in one request to a collector that answers 200 with a partial success of
    /// `rejected_spans` and `error_message`: the counts afterwards (exported, failed, warnings).
    fn three_spans_answered_with(rejected_spans: i64, error_message: &str) -> [u64; 3] {
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTracePartialSuccess, ExportTraceServiceResponse,
        };
        use prost::Message;
        let root = std::env::temp_dir().join(format!("spool-test-{}", uuid::Uuid::new_v4()));
        let answer = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans,
                error_message: error_message.to_owned(),
            }),
        };
        let receiver = receiver(200, answer.encode_to_vec());
        let counts = Arc::new(ExportCounts::default());
        let provider = direct_provider(&root, &receiver.url, &counts, 512);
        let tracer = provider.tracer("test");
        for _ in 0..3 {
            tracer.start("alone").end();
        }
        provider.force_flush().unwrap();
        assert_eq!(receiver.requests.load(Ordering::Relaxed), 1);
        provider.shutdown().unwrap();
        let _ = fs::remove_dir_all(&root);
        [&counts.exported, &counts.failed, &counts.warnings]
            .map(|count| count.load(Ordering::Relaxed))
    }

    #[test]
    fn the_spans_a_collector_refuses_in_a_partial_success_are_counted_as_failed() {
        // exported, failed, warnings
        assert_eq!(
            three_spans_answered_with(2, "span name too long"),
            [1, 2, 0]
        );
    }

    #[test]
    fn a_partial_success_that_refuses_nothing_is_counted_as_a_warning_and_every_span_as_exported() {
        assert_eq!(
            three_spans_answered_with(0, "attribute values truncated"),
            [3, 0, 1]
        );
    }
}
