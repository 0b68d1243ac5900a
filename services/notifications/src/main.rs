//! notifications binary: see the library for what it does.

use notifications::configuration::Settings;
use notifications::startup::Application;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    tracehop_telemetry::service::run("notifications", || async {
        let application = Application::build(Settings::from_env()?).await?;
        application.run_until_stopped().await
    })
    .await
}
