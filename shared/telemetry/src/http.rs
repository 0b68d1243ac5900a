//! HTTP on both sides of a hop: the server root span, the traced client and the JSON error body.

pub mod client;
pub mod error;
pub mod server;

pub use client::TracedClient;
pub use error::ApiError;
