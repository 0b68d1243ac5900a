//! users binary: see the library for what it does.

use users::configuration::Settings;
use users::startup::Application;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    tracehop_telemetry::service::run("users", || async {
        let application = Application::build(Settings::from_env()?).await?;
        application.run_until_stopped().await
    })
    .await
}
