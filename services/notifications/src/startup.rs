//! Building and running notifications: database, mailer, NATS consumer, supervised notifier, HTTP.

use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use anyhow::Context as _;
use tokio::sync::watch;
use tracehop_contracts::events::{ORDER_COMPLETED, ORDER_COMPLETED_DEAD_LETTER};
use tracehop_telemetry::db::{Database, Planning, Retention, spawn_age_retention};
use tracehop_telemetry::http::server;
use tracehop_telemetry::messaging::{self, ConsumerSettings};

use crate::configuration::Settings;
use crate::consumer::{self, ConsumerDeps};
use crate::mailer::Mailer;
use crate::notifier::Notifiers;

pub struct Application {
    server: actix_web::dev::Server,
    consumer: tokio::task::JoinHandle<()>,
    shutdown: watch::Sender<bool>,
}

/// The service's routes: the test hook, which exists only with the `fault-injection` feature, then the
/// gateway's routes behind the service-token check.
pub fn routes(config: &mut web::ServiceConfig) {
    #[cfg(feature = "fault-injection")]
    config.route("/_admin/faults", web::post().to(faults::set_faults));
    config.service(
        web::resource("/notifications/{order_id}")
            .wrap(actix_web::middleware::from_fn(
                tracehop_identity::authenticate,
            ))
            .route(web::get().to(crate::routes::get_notification)),
    );
}

#[cfg(feature = "fault-injection")]
mod faults {
    use actix_web::{HttpResponse, web};

    use crate::mailer::Mailer;

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Faults {
        fail_next: u32,
    }

    pub async fn set_faults(mailer: web::Data<Mailer>, faults: web::Json<Faults>) -> HttpResponse {
        mailer.fail_next(faults.fail_next);
        tracing::warn!(fail_next = faults.fail_next, "mail fault injected");
        HttpResponse::Ok().json(serde_json::json!({"failNext": faults.fail_next}))
    }
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Each delivery's claim carries the sent records riding on it as an array of order ids; planned once
        // for a table that was still small, it read the whole table on every claim (`db`'s overview).
        let database = Database::connect_with(
            &settings.database.url,
            settings.database.pool_size,
            Planning::EachExecution,
        )?;
        let http_database = database.clone();
        // Finished notification records (sent or given up on) are kept `NOTIFICATIONS_RETENTION_DAYS`.
        let retention = Retention {
            name: "notifications",
            every: settings.retention_every,
            batch: 1000,
        };
        let finished = "status IN ('sent', 'failed')";
        spawn_age_retention(
            database.clone(),
            retention,
            "notifications",
            "updated_at",
            finished,
            settings.retention,
        )?;
        let (jetstream, stream) = settings
            .nats
            .open_stream(
                "notifications",
                &[ORDER_COMPLETED, ORDER_COMPLETED_DEAD_LETTER],
            )
            .await?;
        let pull = messaging::ensure_consumer(
            &stream,
            &ConsumerSettings {
                durable_name: settings.nats_consumer.clone(),
                filter_subject: ORDER_COMPLETED.to_owned(),
                ack_wait: settings.ack_wait,
                // One more than we use: if we crash during the last attempt, the server still redelivers
                // once more, and that delivery is sent or dead-lettered instead of the message vanishing.
                max_deliver: settings.max_deliver + 1,
            },
        )
        .await
        .context("creating the durable consumer")?;

        let mailer = web::Data::new(Mailer::new(&settings.mail)?);
        let notifier_mailer: Arc<Mailer> = mailer.clone().into_inner();
        let notifier_database = database.clone();
        let claims = crate::notifier::Claims::new(settings.claim_lease);
        let notifiers = Notifiers::start(
            std::thread::available_parallelism().map_or(1, usize::from),
            settings.concurrency,
            notifier_database,
            notifier_mailer,
            claims,
        );

        let (shutdown, shutdown_signal) = watch::channel(false);
        let deps = ConsumerDeps {
            jetstream,
            notifiers,
            database,
            max_deliver: settings.max_deliver,
            backoff: settings.backoff,
            consumer_trace: settings.nats.consumer_trace,
        };
        let consumer = tokio::spawn(consumer::run(
            pull,
            deps,
            settings.concurrency,
            shutdown_signal,
        ));

        let (listener, port) = server::bind(&settings.host, settings.port)?;
        let verifier = web::Data::new(tracehop_identity::Verifier::from_file(
            &settings.service_token_public_key_file,
            "notifications",
        )?);
        let state = web::Data::new(crate::routes::State {
            database: http_database,
            retention: settings.retention,
        });
        let server = actix_web::HttpServer::new(move || {
            let mailer = mailer.clone();
            let verifier = verifier.clone();
            let state = state.clone();
            server::app(server::RequestTrust::INTERNAL, move |config| {
                config
                    .app_data(mailer)
                    .app_data(verifier)
                    .app_data(state)
                    .configure(routes);
            })
        })
        .listen(listener)?
        .shutdown_timeout(10)
        .run();
        tracing::info!(port, "notifications listening");
        Ok(Self {
            server,
            consumer,
            shutdown,
        })
    }

    /// Serves until SIGINT/SIGTERM, then stops pulling and lets in-flight e-mails finish.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let served = self.server.await;
        let _ = self.shutdown.send(true);
        if tokio::time::timeout(Duration::from_secs(20), self.consumer)
            .await
            .is_err()
        {
            tracing::warn!("consumer did not drain in time; unacked messages will be redelivered");
        }
        served?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use actix_web::test;

    use super::*;

    /// The route table as built: with the feature the hook answers (here 500: no mailer in this app),
    /// without it the path does not exist: 404.
    #[actix_rt::test]
    async fn the_fault_hook_exists_only_with_its_feature() {
        let app = test::init_service(server::app(server::RequestTrust::INTERNAL, routes)).await;
        let request = test::TestRequest::post()
            .uri("/_admin/faults")
            .set_json(serde_json::json!({"failNext": 4_294_967_295_u32}))
            .to_request();
        let status = test::call_service(&app, request).await.status().as_u16();
        if cfg!(feature = "fault-injection") {
            assert_ne!(status, 404);
        } else {
            assert_eq!(status, 404, "a production build has no fault hook");
        }
    }
}
