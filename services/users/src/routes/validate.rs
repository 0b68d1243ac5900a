//! `POST /sessions/validate`: who does this session token belong to?

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
    fields(user.id = tracing::field::Empty, session.valid = tracing::field::Empty)
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
            let now = chrono::Utc::now();
            let user = state
                .database
                .run(move |connection, statements| {
                    let query = sessions::table
                        .inner_join(users::table)
                        .filter(sessions::token_hash.eq(token_hash))
                        .filter(sessions::expires_at.gt(now))
                        .select((users::id, users::email, users::name));
                    Ok(traced(statements, query, |query| {
                        query
                            .first::<(uuid::Uuid, String, String)>(connection)
                            .optional()
                    })?)
                })
                .await
                .map_err(ValidateError::from)?;
            let span = tracing::Span::current();
            span.record("session.valid", user.is_some());
            let Some((user_id, email, name)) = user else {
                return Err(ValidateError::Unknown.into());
            };
            span.record("user.id", tracing::field::display(user_id));
            Ok(HttpResponse::Ok().json(SessionUser {
                user_id,
                email,
                name,
            }))
        }
        .await,
    )
}
