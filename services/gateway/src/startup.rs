//! Building and running the gateway.

use actix_web::web;
use tracehop_telemetry::http::{TracedClient, server};

use crate::configuration::Settings;
use crate::routes;
use crate::upstream::{Replicas, Upstreams};

pub struct Application {
    server: actix_web::dev::Server,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let client = TracedClient::new(settings.upstream_timeout)?;
        let issuer = tracehop_identity::Issuer::from_file(&settings.signing_key_file, "gateway")?;
        let upstreams = web::Data::new(Upstreams {
            client,
            users: Replicas::parse(&settings.users_url),
            billing: Replicas::parse(&settings.billing_url),
            notifications: Replicas::parse(&settings.notifications_url),
            issuer,
        });
        let trust = settings.trust;
        let (listener, port) = server::bind(&settings.host, settings.port)?;
        let server = actix_web::HttpServer::new(move || {
            let upstreams = upstreams.clone();
            server::app(trust, move |config| {
                config
                    .app_data(upstreams)
                    .route("/signup", web::post().to(routes::signup::signup))
                    .route("/login", web::post().to(routes::login::login))
                    .route("/logout", web::post().to(routes::logout::logout))
                    .route("/checkout", web::post().to(routes::checkout::checkout))
                    .route(
                        "/orders/{order_id}",
                        web::get().to(routes::orders::get_order),
                    );
            })
        })
        .listen(listener)?
        .shutdown_timeout(30)
        .run();
        tracing::info!(port, "gateway listening");
        Ok(Self { server })
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.server.await?;
        Ok(())
    }
}
