//! `POST /sessions/validate`: who does this session token belong to? Answered from the session cache
//! ([`crate::sessions`]) when it was confirmed in the last few seconds and not revoked since.

use actix_web::{HttpResponse, web};
use diesel::{ExpressionMethods, OptionalExtension, QueryDsl, RunQueryDsl};
use tracehop_contracts::schema::{sessions, users};
use tracehop_contracts::users::{SessionToken, SessionUser};
use tracehop_telemetry::db::{DbError, traced};
use tracehop_telemetry::http::ApiError;
use tracehop_telemetry::http::error::record_failure;

use super::State;
use crate::token;

/// What can go wrong when validating a session.
#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error("malformed session token")]
    Malformed,
    #[error("unknown or expired session")]
    Unknown,
    #[error(transparent)]
    Database(#[from] DbError),
}

impl From<ValidateError> for ApiError {
    fn from(error: ValidateError) -> Self {
        match error {
            ValidateError::Malformed | ValidateError::Unknown => {
                ApiError::unauthorized(error.to_string())
            }
            ValidateError::Database(error) => ApiError::from_db(&error, "user"),
        }
    }
}

#[tracing::instrument(
    name = "session.validate",
    skip_all,
    fields(
        user.id = tracing::field::Empty,
        session.valid = tracing::field::Empty,
        session.cached = tracing::field::Empty,
    )
)]
pub async fn validate(
    state: web::Data<State>,
    body: web::Json<SessionToken>,
) -> Result<HttpResponse, ApiError> {
    record_failure(
        async {
            let SessionToken { token } = body.into_inner();
            if !token::well_formed(token.expose()) {
                tracing::Span::current().record("session.valid", false);
                return Err(ValidateError::Malformed.into());
            }
            let token_hash = token::digest(token.expose());
            let span = tracing::Span::current();
            if let Some(user) = state.sessions.lookup(&token_hash) {
                span.record("session.valid", true);
                span.record("session.cached", true);
                span.record("user.id", tracing::field::display(user.user_id));
                return Ok(HttpResponse::Ok().json(user));
            }
            let generation = state.sessions.generation();
            let now = chrono::Utc::now();
            let key = token_hash.clone();
            let user = state
                .database
                .run(move |connection, statements| {
                    let query = sessions::table
                        .inner_join(users::table)
                        .filter(sessions::token_hash.eq(key))
                        .filter(sessions::expires_at.gt(now))
                        .select((users::id, users::email, users::name, sessions::expires_at));
                    Ok(traced(statements, query, |query| {
                        query
                            .first::<(uuid::Uuid, String, String, chrono::DateTime<chrono::Utc>)>(
                                connection,
                            )
                            .optional()
                    })?)
                })
                .await
                .map_err(ValidateError::from)?;
            span.record("session.valid", user.is_some());
            span.record("session.cached", false);
            let Some((user_id, email, name, expires_at)) = user else {
                return Err(ValidateError::Unknown.into());
            };
            span.record("user.id", tracing::field::display(user_id));
            let user = SessionUser {
                user_id,
                email,
                name,
            };
            let expires_in = (expires_at - now).to_std().unwrap_or_default();
            state
                .sessions
                .remember(generation, token_hash, user.clone(), expires_in);
            Ok(HttpResponse::Ok().json(user))
        }
        .await,
    )
}
