//! `POST /sessions`: log in, get a bearer token.

use actix_web::{HttpResponse, web};
use diesel::{ExpressionMethods, OptionalExtension, QueryDsl, RunQueryDsl};
use tracehop_contracts::schema::{sessions, users};
use tracehop_telemetry::db::{DbError, traced};
use tracehop_telemetry::http::ApiError;
use tracehop_telemetry::http::error::record_failure;

use tracehop_contracts::domain::Secret;
use tracehop_contracts::users::{LoginRequest, LoginResponse};

use super::State;
use crate::throttle::Throttled;
use crate::{password, token};

/// What can go wrong when logging in.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("wrong e-mail or password")]
    BadCredentials,
    #[error("too many failed logins; retry later")]
    Throttled(Throttled),
    #[error(transparent)]
    Database(#[from] DbError),
}

impl From<LoginError> for ApiError {
    fn from(error: LoginError) -> Self {
        match error {
            LoginError::BadCredentials => ApiError::unauthorized(error.to_string()),
            LoginError::Throttled(throttled) => ApiError::too_many_requests(
                "too_many_attempts",
                error.to_string(),
                throttled.retry_after,
            ),
            LoginError::Database(error) => ApiError::from_db(&error, "user"),
        }
    }
}

#[tracing::instrument(name = "user.login", skip_all, fields(user.id = tracing::field::Empty))]
pub async fn login(
    state: web::Data<State>,
    body: web::Json<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    record_failure(
        async {
            let LoginRequest {
                email,
                password,
                client_address,
            } = body.into_inner();
            if email.len() > 254 || password.expose().len() > 512 {
                return Err(LoginError::BadCredentials.into());
            }
            let email = email.trim().to_lowercase();
            let address = client_address.as_deref();
            // Before any other database work and any hashing: a flood against one account costs one short
            // statement per attempt.
            state
                .throttle
                .begin(&state.database, &email, address)
                .await
                .map_err(LoginError::from)?
                .map_err(LoginError::Throttled)?;
            let account = email.clone();
            let found = state
                .database
                .run(move |connection, statements| {
                    let query = users::table
                        .filter(users::email.eq(email))
                        .select((users::id, users::password_hash));
                    Ok(traced(statements, query, |query| {
                        query.first::<(uuid::Uuid, String)>(connection).optional()
                    })?)
                })
                .await
                .map_err(LoginError::from)?;

            let stored = found.as_ref().map(|(_, hash)| hash.clone());
            // (The dummy hash is computed once, lazily: on the hashing pool too.)
            let matches = state
                .hashing
                .run(move |memory| {
                    let stored = match stored.as_deref() {
                        Some(stored) => stored,
                        None => password::dummy_hash(memory),
                    };
                    password::verify(password.expose(), stored, memory)
                })
                .await?;
            let user_id = match (found, matches) {
                (Some((user_id, _)), true) => user_id,
                _ => return Err(LoginError::BadCredentials.into()),
            };
            state
                .throttle
                .succeeded(&state.database, &account, address)
                .await
                .map_err(LoginError::from)?;

            let token = token::generate();
            let token_hash = token::digest(&token);
            let expires_at = chrono::Utc::now() + state.session_ttl;
            state
                .database
                .run(move |connection, statements| {
                    let query = diesel::insert_into(sessions::table).values((
                        sessions::token_hash.eq(token_hash),
                        sessions::user_id.eq(user_id),
                        sessions::expires_at.eq(expires_at),
                    ));
                    Ok(traced(statements, query, |query| {
                        query.execute(connection)
                    })?)
                })
                .await
                .map_err(LoginError::from)?;
            tracing::Span::current().record("user.id", tracing::field::display(user_id));
            Ok(HttpResponse::Ok().json(LoginResponse {
                token: Secret::new(token),
                user_id,
            }))
        }
        .await,
    )
}
