//! Building and running billing: database pool, NATS, the supervised actors, the HTTP server.

use std::sync::Arc;

use actix::Supervisor;
use actix_web::web;
use tracehop_contracts::events::{ORDER_COMPLETED, ORDER_COMPLETED_DEAD_LETTER};
use tracehop_telemetry::db::{Database, Retention, spawn_age_retention};
use tracehop_telemetry::http::server;

use crate::actors::billing::BillingDeps;
use crate::actors::{BillingActor, OutboxRelay, Reconciler, StripeClientActor};
use crate::configuration::Settings;
use crate::routes;

pub struct Application {
    server: actix_web::dev::Server,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let database = Database::connect(&settings.database.url, settings.database.pool_size)?;
        // Published outbox events are kept `BILLING_OUTBOX_RETENTION_HOURS`, then deleted; an unpublished
        // one is never deleted.
        let retention = Retention {
            name: "outbox",
            every: settings.retention_every,
            batch: 1000,
        };
        let published = "published_at IS NOT NULL";
        spawn_age_retention(
            database.clone(),
            retention,
            "outbox",
            "published_at",
            published,
            settings.outbox_retention,
        )?;
        let (jetstream, _) = settings
            .nats
            .open_stream("billing", &[ORDER_COMPLETED, ORDER_COMPLETED_DEAD_LETTER])
            .await?;

        // A supervised actor keeps its instance across restarts (`Supervised::restarting`), so the closure
        // only hands over the one built here.
        let stripe_client = StripeClientActor::new(settings.stripe.clone())?;
        let stripe = Supervisor::start(move |_| stripe_client);
        let relay = OutboxRelay::new(
            database.clone(),
            jetstream,
            settings.outbox_sweep,
            settings.outbox_paused,
            crate::store::RelayClaim {
                owner: tracehop_telemetry::service::instance_id().to_owned(),
                lease: settings.outbox_claim_lease,
            },
        );
        let relay = Supervisor::start(move |_| relay);
        let reconciler = Reconciler::new(
            database.clone(),
            stripe.clone(),
            relay.clone(),
            settings.reconcile_every,
            settings.reconcile_after,
        );
        Supervisor::start(move |_| reconciler);
        let deps = Arc::new(BillingDeps {
            database: database.clone(),
            stripe,
            relay,
            panic_on_amount: settings.panic_on_amount,
        });
        let billing = Supervisor::start(move |_| BillingActor::new(deps));

        let (listener, port) = server::bind(&settings.host, settings.port)?;
        let state = web::Data::new(routes::State { database, billing });
        let verifier = web::Data::new(tracehop_identity::Verifier::from_file(
            &settings.service_token_public_key_file,
            "billing",
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
                        .route("/charge", web::post().to(routes::charge::charge))
                        .route(
                            "/orders/{order_id}",
                            web::get().to(routes::orders::get_order),
                        ),
                );
            })
        })
        .listen(listener)?
        .shutdown_timeout(30)
        .run();
        tracing::info!(port, "billing listening");
        Ok(Self { server })
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.server.await?;
        Ok(())
    }
}
