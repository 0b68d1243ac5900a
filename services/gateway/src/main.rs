//! gateway binary: see the library for what it does.

use gateway::configuration::Settings;
use gateway::startup::Application;

/// mimalloc, not glibc's malloc: it hands freed memory back to the system instead of keeping an arena per
/// thread (users' Argon2 hashes took ~360 MiB that way), and costs less CPU per allocation (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    tracehop_telemetry::service::run("gateway", || async {
        let application = Application::build(Settings::from_env()?).await?;
        application.run_until_stopped().await
    })
    .await
}
