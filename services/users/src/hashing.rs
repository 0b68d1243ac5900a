//! A small fixed pool of threads for password hashing.
//!
//! Argon2id takes ~19 MiB and a core per hash. On the general blocking pool every thread that ever hashed
//! keeps its malloc arena, so a sign-up burst left users at ~800 MiB (BENCHMARKS.md); a pool of one
//! thread per core bounds both the memory and the CPU that hashing can take from everything else.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send>;

/// The pool; cheap to share behind `web::Data`.
pub struct HashingPool {
    jobs: Mutex<mpsc::Sender<Job>>,
}

/// The pool's threads are gone (only at shutdown).
#[derive(Debug, thiserror::Error)]
#[error("password hashing pool stopped")]
pub struct PoolStopped;

impl HashingPool {
    /// Starts `threads` hashing threads.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for index in 0..threads.max(1) {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{index}"))
                .spawn(move || {
                    loop {
                        let job = match receiver.lock() {
                            Ok(receiver) => receiver.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(Self {
            jobs: Mutex::new(sender),
        })
    }

    /// Runs `work` on a hashing thread, inside the caller's span, and awaits its result.
    pub async fn run<T, F>(&self, work: F) -> Result<T, PoolStopped>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let span = tracing::Span::current();
        let job: Job = Box::new(move || {
            let _ = reply.send(span.in_scope(work));
        });
        self.jobs
            .lock()
            .map_err(|_| PoolStopped)?
            .send(job)
            .map_err(|_| PoolStopped)?;
        answer.await.map_err(|_| PoolStopped)
    }
}
