//! `POST /signup`: create an account (users does the checks that need the database).

use actix_web::{HttpResponse, web};
use tracehop_contracts::domain::Email;
use tracehop_contracts::users::{SignupRequest, SignupResponse};
use tracehop_telemetry::http::ApiError;

use crate::upstream::{Upstream, Upstreams};

pub async fn signup(
    upstreams: web::Data<Upstreams>,
    body: web::Json<SignupRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    Email::parse(&body.email)
        .map_err(|error| ApiError::bad_request("invalid_email", error.to_string()))?;
    let request = upstreams
        .request(Upstream::Users, reqwest::Method::POST, "/users", None)?
        .json(&body);
    let created: SignupResponse = upstreams.call(Upstream::Users, "/users", request).await?;
    Ok(HttpResponse::Created().json(created))
}
