//! # tracehop (stack)
//!
//! The orchestration behind `./dev up` and the end-to-end tests, in Rust so it is testable:
//!
//! - [`collector`]: an embedded OTLP collector (gRPC 4317, HTTP/protobuf 4318) that keeps traces in memory
//!   and serves the real Jaeger UI and its query API (16686).
//! - [`infra`]: NATS JetStream and PostgreSQL, reused when reachable, otherwise started privately; the
//!   database created and migrated with the same `migrations/` that `diesel migration run` applies.
//! - [`process`]: child processes that are always stopped (SIGTERM, then SIGKILL), logs to files.
//! - [`stack`]: the whole stack in dependency order, each service awaited on `/healthz`.
//! - [`supervise`]: `stack up` as a supervisor: signals at any moment, crashed services restarted, status.
//! - [`secrets`]: development secrets (the service-token key pair), made once per state folder.
//! - [`dead_letters`]: replaying dead-lettered notifications once their cause is fixed.
//! - [`client`]: a small API client (signup, login, checkout, order) for demos, tests and load.
//! - [`bench`]: the benchmark session behind BENCHMARKS.md.
//! - [`load`]: the load generator (open and closed loop, HDR histograms).
//! - [`trace_view`]: a trace from any Jaeger query API, as a tree and as a terminal waterfall.
//! - [`why`]: a trace's critical path, each service's share of it, and one line that blames.
//! - [`diagnose`]: `stack slow` and `stack errors`, the window's slowest and failed checkouts grouped by
//!   the hop to blame.
//! - [`whereabouts`]: `stack where`, everything known about one order from PostgreSQL, JetStream and the
//!   trace, ending in the answer to "where is my e-mail?".

#![forbid(unsafe_code)]

pub mod bench;
pub mod client;
pub mod collector;
pub mod dead_letters;
pub mod diagnose;
pub mod infra;
pub mod load;
pub mod process;
pub mod secrets;
pub mod stack;
pub mod supervise;
pub mod trace_view;
pub mod whereabouts;
pub mod why;
