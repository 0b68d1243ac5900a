//! # tracehop-contracts
//!
//! What tracehop's services agree on, written once so that a change to either side of a contract fails to
//! compile rather than at run time:
//!
//! - [`domain`]: money in minor units, currency codes and e-mail addresses, parsed at the edge.
//! - [`users`], [`billing`], [`notifications`], [`gateway`]: the request and answer bodies of each service's HTTP API, used by
//!   the service that serves them and by the one that calls them.
//! - [`events`]: the `order.completed` event, its subjects, stream and consumer names.
//! - [`schema`]: the diesel tables of `migrations/`.
//!
//! The propagation and telemetry machinery lives apart, in `tracehop-telemetry`, which knows nothing of
//! any of this.

pub mod billing;
pub mod domain;
pub mod events;
pub mod gateway;
pub mod notifications;
pub mod schema;
pub mod users;
