//! billing binary: see the library for what it does.

use billing::configuration::Settings;
use billing::startup::Application;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    tracehop_telemetry::service::run("billing", || async {
        let application = Application::build(Settings::from_env()?).await?;
        application.run_until_stopped().await
    })
    .await
}
