//! One module per route.

pub mod charge;
pub mod orders;

use actix::Addr;
use tracehop_telemetry::db::Database;

use crate::actors::BillingActor;

/// Shared by every handler.
pub struct State {
    pub database: Database,
    pub billing: Addr<BillingActor>,
}
