//! `POST /login`: exchange credentials for a bearer token.

use actix_web::{HttpResponse, web};
use tracehop_shared::http::ApiError;

use crate::upstream::Upstreams;

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
    let session: Session = upstreams.call("user-service", "/sessions", request).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "token": session.token })))
}
