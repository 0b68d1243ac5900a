//! users binary: see the library for what it does.

use users::configuration::Settings;
use users::startup::Application;

/// mimalloc, not glibc's malloc, here only: Argon2id takes 19 MiB per hash, and glibc kept it in every
/// hashing thread's arena (users held ~376 MiB at load); mimalloc hands it back. The other services measured
/// more memory with mimalloc than with glibc, so they keep glibc's (BENCHMARKS.md, section 6).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    tracehop_telemetry::service::run("users", || async {
        let application = Application::build(Settings::from_env()?).await?;
        application.run_until_stopped().await
    })
    .await
}
