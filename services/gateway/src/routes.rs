//! One module per route.

pub mod checkout;
pub mod login;
pub mod logout;
pub mod orders;
pub mod signup;

/// The raw `Authorization` header, if any.
pub(crate) fn authorization(request: &actix_web::HttpRequest) -> Option<&str> {
    request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
}
