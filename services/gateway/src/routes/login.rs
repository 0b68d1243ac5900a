//! `POST /login`: exchange credentials for a bearer token.

use actix_web::{HttpResponse, web};
use tracehop_contracts::gateway::TokenResponse;
use tracehop_contracts::users::{LoginRequest, LoginResponse};
use tracehop_telemetry::http::ApiError;

use crate::upstream::Upstreams;

pub async fn login(
    upstreams: web::Data<Upstreams>,
    body: web::Json<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    let request = upstreams
        .client
        .request(
            reqwest::Method::POST,
            &format!("{}/sessions", upstreams.users_url),
        )
        .json(&body.into_inner());
    let session: LoginResponse = upstreams.call("users", "/sessions", request).await?;
    Ok(HttpResponse::Ok().json(TokenResponse {
        token: session.token,
    }))
}
