//! api-gateway binary: see the library for what it does.

use gateway::configuration::Settings;
use gateway::startup::Application;

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let telemetry = tracehop_shared::telemetry::init("api-gateway")?;
    let outcome = async {
        let settings = Settings::from_env()?;
        let application = Application::build(settings).await?;
        application.run_until_stopped().await
    }
    .await;
    if let Err(error) = &outcome {
        tracing::error!(
            error = format!("{error:#}"),
            "api-gateway stopped with an error"
        );
    }
    telemetry.shutdown().await;
    outcome
}
