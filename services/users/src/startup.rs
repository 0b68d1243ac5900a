//! Building and running the HTTP server.

use actix_web::web;
use tracehop_telemetry::db::{Database, Retention, spawn_age_retention};
use tracehop_telemetry::http::server;

use crate::configuration::Settings;
use crate::routes;

/// A bound, not yet running, users.
pub struct Application {
    server: actix_web::dev::Server,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let database = Database::connect(&settings.database.url, settings.database.pool_size)?;
        // Expired sessions are deleted, a batch per statement.
        let retention = Retention {
            name: "sessions",
            every: settings.retention_every,
            batch: 1000,
        };
        spawn_age_retention(
            database.clone(),
            retention,
            "sessions",
            "expires_at",
            "TRUE",
            std::time::Duration::ZERO,
        )?;
        // Failed-login counts whose window has ended (`crate::throttle`).
        spawn_age_retention(
            database.clone(),
            Retention {
                name: "login_failures",
                every: settings.retention_every,
                batch: 1000,
            },
            "login_failures",
            "window_ends",
            "TRUE",
            std::time::Duration::ZERO,
        )?;
        let (listener, port) = server::bind(&settings.host, settings.port)?;
        let sessions =
            crate::sessions::SessionCache::start(database.clone(), settings.session_cache);
        let state = web::Data::new(routes::State {
            database,
            sessions,
            session_ttl: chrono::Duration::hours(settings.session_ttl_hours),
            hashing: crate::hashing::HashingPool::new(
                std::thread::available_parallelism().map_or(2, |cores| cores.get()),
                settings.hashing_queue,
            )?,
            throttle: crate::throttle::LoginThrottle::new(
                settings.login_failures_per_account,
                settings.login_failures_per_address,
                settings.login_throttle_window,
            ),
        });
        let verifier = web::Data::new(tracehop_identity::Verifier::from_file(
            &settings.service_token_public_key_file,
            "users",
        )?);
        let server = actix_web::HttpServer::new(move || {
            let state = state.clone();
            let verifier = verifier.clone();
            server::app(server::RequestTrust::INTERNAL, move |config| {
                config.app_data(state).app_data(verifier).service(
                    // Only the gateway's calls get in (tracehop-identity), before any body is read.
                    web::scope("")
                        .wrap(actix_web::middleware::from_fn(
                            tracehop_identity::authenticate,
                        ))
                        .route("/users", web::post().to(routes::signup::signup))
                        .route("/sessions", web::post().to(routes::login::login))
                        .route(
                            "/sessions/validate",
                            web::post().to(routes::validate::validate),
                        )
                        .route("/sessions/revoke", web::post().to(routes::revoke::revoke)),
                );
            })
        })
        .listen(listener)?
        .shutdown_timeout(10)
        .run();
        tracing::info!(port, "users listening");
        Ok(Self { server })
    }

    /// Serves until SIGINT/SIGTERM, then drains in-flight requests.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.server.await?;
        Ok(())
    }
}
