//! # users
//!
//! Users and sessions in PostgreSQL. Passwords are hashed with Argon2id (on a hashing pool of its own, one thread
//! per core: hashing is deliberately slow); session tokens are 256 random bits, handed out once and stored only as SHA-256.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /users` | sign up `{email, name, password}` -> 201 `{userId}` |
//! | `POST /sessions` | log in `{email, password}` -> 200 `{token, userId}` |
//! | `POST /sessions/validate` | `Authorization: Bearer <token>` -> 200 `{userId, email, name}` (span `session.validate`) |
//! | `GET /healthz` | liveness |

#![forbid(unsafe_code)]

pub mod configuration;
pub mod hashing;
pub mod password;
pub mod routes;
pub mod startup;
pub mod token;
