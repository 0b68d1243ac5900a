//! `POST /sessions/revoke`: log out. The session row is deleted and the deletion announced to every replica's
//! session cache ([`crate::sessions`]), so the token stops working at once.

use actix_web::{HttpResponse, web};
use diesel::RunQueryDsl;
use tracehop_contracts::users::SessionToken;
use tracehop_telemetry::db::traced;
use tracehop_telemetry::http::ApiError;
use tracehop_telemetry::http::error::record_failure;

use super::State;
use crate::token;

#[tracing::instrument(name = "session.revoke", skip_all)]
pub async fn revoke(
    state: web::Data<State>,
    body: web::Json<SessionToken>,
) -> Result<HttpResponse, ApiError> {
    record_failure(
        async {
            let SessionToken { token } = body.into_inner();
            if !token::well_formed(token.expose()) {
                return Err(ApiError::unauthorized("unknown or expired session"));
            }
            let token_hash = token::digest(token.expose());
            let revoked = token_hash.clone();
            let deleted = state
                .database
                .run(move |connection, statements| {
                    let query = diesel::sql_query(crate::sessions::REVOKE)
                        .bind::<diesel::sql_types::Text, _>(revoked);
                    Ok(traced(statements, query, |query| {
                        query.execute(connection)
                    })?)
                })
                .await
                .map_err(|error| ApiError::from_db(&error, "user"))?;
            // Every replica hears of it through PostgreSQL; this one forgets it before answering.
            state.sessions.forget(&token_hash);
            if deleted == 0 {
                return Err(ApiError::unauthorized("unknown or expired session"));
            }
            Ok(HttpResponse::Ok().json(serde_json::json!({ "revoked": true })))
        }
        .await,
    )
}
