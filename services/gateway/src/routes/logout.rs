//! `POST /logout`: ends the session of the bearer token at once (later requests with it get 401).

use actix_web::{HttpRequest, HttpResponse, web};
use tracehop_contracts::users::SessionToken;
use tracehop_telemetry::http::ApiError;

use super::authorization;
use crate::upstream::{Upstream, Upstreams, session_token};

pub async fn logout(
    upstreams: web::Data<Upstreams>,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let token = session_token(authorization(&request))?;
    let call = upstreams
        .request(
            Upstream::Users,
            reqwest::Method::POST,
            "/sessions/revoke",
            None,
        )?
        .json(&SessionToken { token });
    let _: serde_json::Value = upstreams
        .call(Upstream::Users, "/sessions/revoke", call)
        .await?;
    Ok(HttpResponse::NoContent().finish())
}
