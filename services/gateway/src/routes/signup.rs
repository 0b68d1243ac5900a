//! `POST /signup`: create an account (user-service does the checks that need the database).

use actix_web::{HttpResponse, web};
use tracehop_shared::domain::Email;
use tracehop_shared::http::ApiError;

use crate::upstream::Upstreams;

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    pub email: String,
    pub name: String,
    pub password: String,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignupResponse {
    pub user_id: uuid::Uuid,
}

pub async fn signup(
    upstreams: web::Data<Upstreams>,
    body: web::Json<SignupRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    Email::parse(&body.email)
        .map_err(|error| ApiError::bad_request("invalid_email", error.to_string()))?;
    let request = upstreams
        .client
        .request(
            reqwest::Method::POST,
            &format!("{}/users", upstreams.users_url),
        )
        .json(&body);
    let created: SignupResponse = upstreams.call("user-service", "/users", request).await?;
    Ok(HttpResponse::Created().json(created))
}
