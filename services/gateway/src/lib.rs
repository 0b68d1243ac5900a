//! # gateway
//!
//! The public JSON API. It owns no data: it validates input at the edge, asks users who the bearer
//! token belongs to, and asks billing to charge.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /signup` | `{email, name, password}` -> 201 `{userId}` |
//! | `POST /login` | `{email, password}` -> 200 `{token}` |
//! | `POST /checkout` | bearer token, `{total, currency}`, optional `Idempotency-Key` -> 200 `{orderId, status, traceId}` |
//! | `GET /orders/{orderId}` | bearer token; the owner only -> amount, currency, charge id, notification status |
//! | `GET /healthz` | liveness |

#![forbid(unsafe_code)]

pub mod configuration;
pub mod routes;
pub mod startup;
pub mod upstream;
