//! A small fixed pool of threads for password hashing, with a bounded queue.
//!
//! Argon2id takes a core and 7 MiB per hash ([`crate::password::PARAMS`]). On the general blocking pool every
//! thread that ever hashed kept its malloc arena, so a sign-up burst left users at ~800 MiB (BENCHMARKS.md);
//! a pool of one thread per core bounds both the memory (one [`HashMemory`] of 7 MiB per thread, lent to every
//! job) and the CPU that hashing can take from everything else. A thread that has had no job for
//! [`IDLE_RELEASE`] gives its memory back to the operating system, so between bursts of logins and sign-ups
//! users holds none of it (BENCHMARKS.md section 14).
//!
//! The queue in front of it is bounded too: when it is full a login or sign-up is refused at once with
//! [`HashingError::Busy`] (answered 503 with `Retry-After`) instead of waiting behind a flood until the gateway's timeout.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::password::HashMemory;

type Job = Box<dyn FnOnce(&mut HashMemory) + Send>;

/// How long a hashing thread keeps its memory without a job. Long enough that a burst reuses it (allocating
/// and faulting in 7 MiB costs about a millisecond), short enough that it is gone soon after.
pub const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// The pool; cheap to share behind `web::Data`.
pub struct HashingPool {
    jobs: Sender<Job>,
}

/// Why a hash did not run.
#[derive(Debug, thiserror::Error)]
pub enum HashingError {
    /// The queue is full: try again in a moment.
    #[error("password hashing is busy")]
    Busy,
    /// The pool's threads are gone (only at shutdown).
    #[error("password hashing pool stopped")]
    Stopped,
}

impl From<HashingError> for tracehop_telemetry::http::ApiError {
    fn from(error: HashingError) -> Self {
        match error {
            HashingError::Busy => tracehop_telemetry::http::ApiError::unavailable(
                "busy",
                "too many logins and sign-ups in progress; retry shortly",
            )
            .with_retry_after(1),
            HashingError::Stopped => tracehop_telemetry::http::ApiError::internal(error),
        }
    }
}

impl HashingPool {
    /// Starts `threads` hashing threads behind a queue of `queue` waiting jobs.
    pub fn new(threads: usize, queue: usize) -> std::io::Result<Self> {
        let (sender, receiver) = crossbeam_channel::bounded::<Job>(queue);
        for index in 0..threads.max(1) {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{index}"))
                .spawn(move || work(&receiver))?;
        }
        Ok(Self { jobs: sender })
    }

    /// Runs `work` on a hashing thread with that thread's memory, inside the caller's span, and awaits its
    /// result; [`HashingError::Busy`] at once when the queue is full.
    pub async fn run<T, F>(&self, work: F) -> Result<T, HashingError>
    where
        T: Send + 'static,
        F: FnOnce(&mut HashMemory) -> T + Send + 'static,
    {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let span = tracing::Span::current();
        let job: Job = Box::new(move |memory| {
            let _ = reply.send(span.in_scope(|| work(memory)));
        });
        self.jobs.try_send(job).map_err(|error| match error {
            TrySendError::Full(_) => HashingError::Busy,
            TrySendError::Disconnected(_) => HashingError::Stopped,
        })?;
        answer.await.map_err(|_| HashingError::Stopped)
    }
}

/// A hashing thread: jobs until the pool is dropped, its memory released whenever it idles.
fn work(jobs: &Receiver<Job>) {
    let mut memory = HashMemory::default();
    loop {
        let job = if memory.is_held() {
            match jobs.recv_timeout(IDLE_RELEASE) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    memory.release();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            }
        };
        job(&mut memory);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn a_full_queue_says_busy_at_once() {
        let pool = HashingPool::new(1, 1);
        let pool = Arc::new(pool.unwrap());
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let wait = Arc::new(Mutex::new(wait));
        // One job running (blocked), one waiting: the queue is full.
        let running = {
            let pool = pool.clone();
            let wait = wait.clone();
            tokio::spawn(async move { pool.run(move |_| wait.lock().unwrap().recv().ok()).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let queued = {
            let pool = pool.clone();
            let wait = wait.clone();
            tokio::spawn(async move { pool.run(move |_| wait.lock().unwrap().recv().ok()).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(matches!(pool.run(|_| ()).await, Err(HashingError::Busy)));
        release.send(()).unwrap();
        release.send(()).unwrap();
        assert!(running.await.unwrap().is_ok());
        assert!(queued.await.unwrap().is_ok());
        assert!(pool.run(|_| 7).await.is_ok());
    }
}
