//! `POST /login`: exchange credentials for a bearer token.

use actix_web::{HttpRequest, HttpResponse, web};
use tracehop_contracts::gateway::TokenResponse;
use tracehop_contracts::users::{LoginRequest, LoginResponse};
use tracehop_telemetry::http::ApiError;
use tracehop_telemetry::http::server::client_address;

use crate::upstream::{Upstream, Upstreams};

pub async fn login(
    upstreams: web::Data<Upstreams>,
    request: HttpRequest,
    body: web::Json<LoginRequest>,
) -> Result<HttpResponse, ApiError> {
    // The client's address as the edge policy knows it (never a client-sent field): users throttles
    // failed logins per address as well as per account.
    let body = LoginRequest {
        client_address: client_address(&request),
        ..body.into_inner()
    };
    let call = upstreams
        .request(Upstream::Users, reqwest::Method::POST, "/sessions", None)?
        .json(&body);
    let session: LoginResponse = upstreams.call(Upstream::Users, "/sessions", call).await?;
    Ok(HttpResponse::Ok().json(TokenResponse {
        token: session.token,
    }))
}
