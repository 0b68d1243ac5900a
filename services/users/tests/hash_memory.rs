//! The hashing pool's memory goes back to the operating system between bursts, every time: measured as the
//! process's resident anonymous memory (`/proc/self/status`), what an operator's RSS graph shows. Alone in its
//! test binary so that no other test allocates beside it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tracehop_contracts::domain::Secret;
use users::hashing::{HashingPool, IDLE_RELEASE};
use users::password::{Password, hash};

/// Argon2's 7 MiB, less slack for what else moves.
const HASH_MEMORY_KIB: i64 = 6 * 1024;

fn resident_anonymous_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("RssAnon:"))
        .expect("RssAnon in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn hashing_memory_is_returned_after_each_burst() {
    let pool = HashingPool::new(1, 4).unwrap();
    // Three bursts: glibc maps the first allocation on its own whatever its size; the later ones are where
    // it would serve a 7 MiB one from an arena and keep it.
    for burst in 1..=3 {
        let before = resident_anonymous_kib();
        for _ in 0..2 {
            let password = Password::parse(Secret::new("correct horse battery")).unwrap();
            let stored = pool.run(move |memory| hash(&password, memory)).await;
            assert!(stored.unwrap().unwrap().starts_with("$argon2id$"));
        }
        let during = resident_anonymous_kib();
        assert!(
            during - before >= HASH_MEMORY_KIB,
            "burst {burst}: the hash memory is held while hashing ({before} -> {during} KiB)"
        );
        tokio::time::sleep(IDLE_RELEASE + Duration::from_millis(500)).await;
        let after = resident_anonymous_kib();
        assert!(
            during - after >= HASH_MEMORY_KIB,
            "burst {burst}: the hash memory went back to the system after {IDLE_RELEASE:?} idle \
             ({during} -> {after} KiB)"
        );
    }
}
