//! stripe-sim binary: see the library.

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let settings = stripe_sim::Settings::from_env()?;
    let server = stripe_sim::build(settings)?;
    tracing::info!(port = server.port, "stripe-sim listening");
    server.server.await
}
