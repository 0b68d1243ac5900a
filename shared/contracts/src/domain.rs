//! Domain types parsed at the edge: once a value has one of these types it is known to be valid.

pub mod currency;
pub mod email;
pub mod idempotency;
pub mod money;
pub mod secret;

pub use currency::Currency;
pub use email::Email;
pub use idempotency::{IdempotencyKey, InvalidIdempotencyKey};
pub use money::{Amount, MoneyError};
pub use secret::Secret;
