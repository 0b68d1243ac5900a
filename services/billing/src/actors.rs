//! The billing actors. Each one is started under an actix [`actix::Supervisor`]: if it stops (a failed
//! handler that stops the context), it is restarted and later messages are served.

pub mod billing;
pub mod outbox;
pub mod reconcile;
pub mod stripe;

pub use billing::{BillingActor, Charge, ChargeError, ChargeReceipt};
pub use outbox::{OutboxRelay, RelayEvent};
pub use reconcile::Reconciler;
pub use stripe::{CreateCharge, StripeCharge, StripeClientActor, StripeError};
