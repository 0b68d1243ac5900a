//! `POST /users`: sign up.

use actix_web::{HttpResponse, web};
use diesel::RunQueryDsl;
use tracehop_contracts::domain::Email;
use tracehop_contracts::schema::users;
use tracehop_telemetry::db::{DbError, traced};
use tracehop_telemetry::http::ApiError;
use tracehop_telemetry::http::error::record_failure;

use tracehop_contracts::users::{SignupRequest, SignupResponse};

use super::State;
use crate::password::{self, Password};

/// What can go wrong when signing up.
#[derive(Debug, thiserror::Error)]
pub enum SignupError {
    #[error("{0}")]
    Invalid(String),
    #[error("an account with this e-mail already exists")]
    EmailTaken,
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("{0}")]
    Hash(#[from] password::HashError),
}

impl From<SignupError> for ApiError {
    fn from(error: SignupError) -> Self {
        match error {
            SignupError::Invalid(message) => ApiError::bad_request("invalid_request", message),
            SignupError::EmailTaken => ApiError::conflict("email_taken", error.to_string()),
            SignupError::Database(error) => ApiError::from_db(&error, "user"),
            SignupError::Hash(error) => ApiError::internal(error),
        }
    }
}

#[derive(diesel::Insertable)]
#[diesel(table_name = users)]
struct NewUser {
    id: uuid::Uuid,
    email: String,
    name: String,
    password_hash: String,
}

#[tracing::instrument(name = "user.signup", skip_all, fields(user.id = tracing::field::Empty))]
pub async fn signup(
    state: web::Data<State>,
    body: web::Json<SignupRequest>,
) -> Result<HttpResponse, ApiError> {
    record_failure(
        async {
            let SignupRequest {
                email,
                name,
                password,
            } = body.into_inner();
            let email =
                Email::parse(&email).map_err(|error| SignupError::Invalid(error.to_string()))?;
            let name = name.trim().to_owned();
            if name.is_empty() || name.chars().count() > 100 {
                return Err(SignupError::Invalid("name must be 1 to 100 characters".into()).into());
            }
            let password = Password::parse(password)
                .map_err(|error| SignupError::Invalid(error.to_string()))?;
            let password_hash = state
                .hashing
                .run(move |memory| password::hash(&password, memory))
                .await?
                .map_err(SignupError::from)?;

            let user = NewUser {
                id: uuid::Uuid::new_v4(),
                email: email.as_str().to_owned(),
                name,
                password_hash,
            };
            let user_id = user.id;
            let inserted = state
                .database
                .run(move |connection, statements| {
                    let query = diesel::insert_into(users::table).values(user);
                    Ok(traced(statements, query, |query| {
                        query.execute(connection)
                    })?)
                })
                .await;
            match inserted {
                Ok(_) => {}
                Err(error) if error.is_unique_violation() => {
                    return Err(SignupError::EmailTaken.into());
                }
                Err(error) => return Err(SignupError::from(error).into()),
            }
            tracing::Span::current().record("user.id", tracing::field::display(user_id));
            Ok(HttpResponse::Created().json(SignupResponse { user_id }))
        }
        .await,
    )
}
