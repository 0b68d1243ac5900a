//! user-service binary: see the library for what it does.

use users::configuration::Settings;
use users::startup::Application;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = tracehop_shared::telemetry::init("user-service")?;
    let outcome = async {
        let settings = Settings::from_env()?;
        let application = Application::build(settings).await?;
        application.run_until_stopped().await
    }
    .await;
    if let Err(error) = &outcome {
        tracing::error!(
            error = format!("{error:#}"),
            "user-service stopped with an error"
        );
    }
    telemetry.shutdown().await;
    outcome
}
