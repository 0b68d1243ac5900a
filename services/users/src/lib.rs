//! # users
//!
//! Users and sessions in PostgreSQL. Passwords are hashed with Argon2id (on a hashing pool of its own, one thread
//! per core, behind a bounded queue: hashing is deliberately slow); session tokens are 256 random bits, handed
//! out once and stored only as SHA-256. Failed logins are throttled per account and per client address, counted in
//! PostgreSQL so that every replica applies one limit.
//!
//! Every route but `/healthz` takes only the gateway's calls: `Authorization: Bearer <service token>`
//! (`tracehop-identity`), checked before anything else; anything else gets 401.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /users` | sign up `{email, name, password}` -> 201 `{userId}` |
//! | `POST /sessions` | log in `{email, password, clientAddress?}` -> 200 `{token, userId}`; 429 when throttled |
//! | `POST /sessions/validate` | `{token}` -> 200 `{userId, email, name}` (span `session.validate`) |
//! | `POST /sessions/revoke` | `{token}` -> 200 `{revoked}`: log out, at once |
//! | `GET /healthz` | liveness |

#![forbid(unsafe_code)]

pub mod configuration;
pub mod hashing;
pub mod password;
pub mod routes;
pub mod sessions;
pub mod startup;
pub mod throttle;
pub mod token;
