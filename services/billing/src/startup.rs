//! Building and running billing: database pool, NATS, the supervised actors, the HTTP server.

use std::sync::Arc;

use actix::Supervisor;
use actix_web::web;
use tracehop_contracts::events::{ORDER_COMPLETED, ORDER_COMPLETED_DEAD_LETTER};
use tracehop_telemetry::db::{Database, Retention, spawn_age_retention};
use tracehop_telemetry::http::server;

use crate::actors::billing::BillingDeps;
use crate::actors::outbox::Relay;
use crate::actors::{BillingActor, OutboxRelay, Reconciler, StripeClientActor};
use crate::configuration::Settings;
use crate::routes;
use crate::store::RelayClaim;

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

        let claim = RelayClaim {
            owner: tracehop_telemetry::service::instance_id().to_owned(),
            lease: settings.outbox_claim_lease,
        };
        let stripe_client = StripeClientActor::new(settings.stripe.clone())?;

        // One reconciler and one sweeping relay per process, on the System thread. A supervised actor keeps
        // its instance across restarts (`Supervised::restarting`), so each closure only hands over the one
        // built here.
        let sweeper = OutboxRelay::new(
            database.clone(),
            jetstream.clone(),
            Some(settings.outbox_sweep),
            settings.outbox_paused,
            claim.clone(),
        );
        let sweeper = Supervisor::start(move |_| sweeper);
        let reconciler_stripe = stripe_client.clone();
        let reconciler = Reconciler::new(
            database.clone(),
            Supervisor::start(move |_| reconciler_stripe),
            Relay {
                address: sweeper,
                claim: claim.clone(),
            },
            settings.reconcile_every,
            settings.reconcile_after,
        );
        Supervisor::start(move |_| reconciler);

        let workers = WorkerActors {
            database: database.clone(),
            stripe: stripe_client,
            jetstream,
            outbox_paused: settings.outbox_paused,
            claim,
            panic_on_amount: settings.panic_on_amount,
        };
        let (listener, port) = server::bind(&settings.host, settings.port)?;
        let verifier = web::Data::new(tracehop_identity::Verifier::from_file(
            &settings.service_token_public_key_file,
            "billing",
        )?);
        let server = actix_web::HttpServer::new(move || {
            // Each HTTP worker (one per core) gets the actors of a checkout on its own thread: billing
            // uses every core, and a checkout's actor hops stay on the thread that took its request.
            let state = web::Data::new(routes::State {
                database: workers.database.clone(),
                billing: workers.start(),
            });
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

/// What each HTTP worker needs to start its own checkout actors.
#[derive(Clone)]
struct WorkerActors {
    database: Database,
    /// Cloned per worker: the clones share one HTTP client and one circuit breaker.
    stripe: StripeClientActor,
    jetstream: async_nats::jetstream::Context,
    outbox_paused: bool,
    claim: RelayClaim,
    panic_on_amount: Option<i64>,
}

impl WorkerActors {
    /// Starts a billing actor, a Stripe client actor and a relay (which does not sweep: the System thread's
    /// relay does) on the current thread's arbiter.
    fn start(&self) -> actix::Addr<BillingActor> {
        let stripe = self.stripe.clone();
        let stripe = Supervisor::start(move |_| stripe);
        let relay = OutboxRelay::new(
            self.database.clone(),
            self.jetstream.clone(),
            None,
            self.outbox_paused,
            self.claim.clone(),
        );
        let relay = Supervisor::start(move |_| relay);
        let deps = Arc::new(BillingDeps {
            database: self.database.clone(),
            stripe,
            relay: Relay {
                address: relay,
                claim: self.claim.clone(),
            },
            panic_on_amount: self.panic_on_amount,
        });
        Supervisor::start(move |_| BillingActor::new(deps))
    }
}
