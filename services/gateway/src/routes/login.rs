//! `POST /login`: exchange credentials for a bearer token.

use actix_web::{HttpResponse, web};
use tracehop_shared::http::ApiError;

use crate::upstream::{Upstreams, relay_error, unreachable_service};

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Session {
    token: String,
}

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
    let response = upstreams
        .client
        .send("/sessions", request)
        .await
        .map_err(|error| unreachable_service("user-service", &error))?;
    if !response.status().is_success() {
        return Err(relay_error("user-service", response).await);
    }
    let session: Session = response
        .json()
        .await
        .map_err(|error| ApiError::bad_gateway("bad_upstream_response", error.to_string()))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "token": session.token })))
}
