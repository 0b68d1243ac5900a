//! billing-service binary: see the library for what it does.

use billing::configuration::Settings;
use billing::startup::Application;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = tracehop_shared::telemetry::init("billing-service")?;
    let outcome = async {
        let settings = Settings::from_env()?;
        let application = Application::build(settings).await?;
        application.run_until_stopped().await
    }
    .await;
    if let Err(error) = &outcome {
        tracing::error!(
            error = format!("{error:#}"),
            "billing-service stopped with an error"
        );
    }
    telemetry.shutdown().await;
    outcome
}
