//! The check at the door of an internal service, for actix-web.

use std::future::{Ready, ready};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use tracehop_telemetry::http::ApiError;

use crate::{Caller, Rejected, Verifier};

/// Middleware (`actix_web::middleware::from_fn(authenticate)`) that lets a request in only with a good
/// service token, checked with the [`Verifier`] in the app's data (`web::Data<Verifier>`); otherwise the
/// request is answered 401 before any handler, body parser or database sees it. The verified [`Caller`]
/// is left in the request for handlers ([`Authenticated`]).
///
/// ```no_run
/// use actix_web::{App, HttpResponse, middleware::from_fn, web};
/// use tracehop_identity::{Authenticated, Verifier, authenticate};
///
/// # fn keys() -> Verifier { unimplemented!() }
/// let app = App::new().app_data(web::Data::new(keys())).service(
///     web::scope("")
///         .wrap(from_fn(authenticate))
///         .route("/charge", web::post().to(|caller: Authenticated| async move {
///             HttpResponse::Ok().body(caller.service.clone())
///         })),
/// );
/// ```
pub async fn authenticate(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let verdict = match request.app_data::<web::Data<Verifier>>() {
        Some(verifier) => bearer(request.request())
            .ok_or(Rejected::Missing)
            .and_then(|token| verifier.verify(token)),
        None => {
            // A service wired without its keys must fail closed, loudly.
            tracing::error!("no service token verifier configured; refusing the request");
            Err(Rejected::Missing)
        }
    };
    match verdict {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.call(request).await
        }
        Err(rejected) => {
            tracing::info!(reason = %rejected, "service token refused");
            Err(refused().into())
        }
    }
}

/// The 401 every refused call gets. Its code, [`SERVICE_UNAUTHORIZED`], tells the gateway that its own
/// token was refused (a key mismatch), not the end user's session.
fn refused() -> ApiError {
    ApiError::new(
        actix_web::http::StatusCode::UNAUTHORIZED,
        SERVICE_UNAUTHORIZED,
        "a valid service token is required",
    )
}

/// The error code of a refused service token.
pub const SERVICE_UNAUTHORIZED: &str = "service_unauthorized";

fn bearer(request: &HttpRequest) -> Option<&str> {
    request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// The verified caller of this request, as a handler argument. Behind [`authenticate`] it is always
/// there; anywhere else the request is refused (401), so a route wired outside the check fails closed.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Caller);

impl std::ops::Deref for Authenticated {
    type Target = Caller;
    fn deref(&self) -> &Caller {
        &self.0
    }
}

impl FromRequest for Authenticated {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        ready(
            request
                .extensions()
                .get::<Caller>()
                .cloned()
                .map(Authenticated)
                .ok_or_else(refused),
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use actix_web::middleware::from_fn;
    use actix_web::{App, HttpResponse, test};

    use super::*;
    use crate::{EndUser, Issuer, generate_key_pair};

    #[actix_rt::test]
    async fn only_a_good_token_gets_in() {
        let (private, public) = generate_key_pair().unwrap();
        let gateway = Issuer::from_pem(private.expose().as_bytes(), "gateway").unwrap();
        let verifier = Verifier::from_pem(public.as_bytes(), "billing").unwrap();
        let app = test::init_service(App::new().app_data(web::Data::new(verifier)).service(
            web::scope("").wrap(from_fn(authenticate)).route(
                "/whoami",
                web::get().to(|caller: Authenticated| async move {
                    HttpResponse::Ok().body(caller.user.as_ref().unwrap().email.clone())
                }),
            ),
        ))
        .await;

        let user = EndUser {
            user_id: uuid::Uuid::new_v4(),
            email: "dani@example.com".into(),
        };
        let good = gateway.token("billing", Some(&user)).unwrap();
        let request = test::TestRequest::get()
            .uri("/whoami")
            .insert_header(("Authorization", format!("Bearer {good}")))
            .to_request();
        let response = test::call_service(&app, request).await;
        assert_eq!(response.status(), 200);
        assert_eq!(test::read_body(response).await, "dani@example.com");

        let wrong_audience = gateway.token("users", Some(&user)).unwrap();
        for header in [
            None,
            Some("Bearer".to_owned()),
            Some(format!("Basic {good}")),
            Some(format!("Bearer {wrong_audience}")),
        ] {
            let mut request = test::TestRequest::get().uri("/whoami");
            if let Some(header) = &header {
                request = request.insert_header(("Authorization", header.as_str()));
            }
            let response = test::try_call_service(&app, request.to_request()).await;
            let status = match response {
                Ok(response) => response.status(),
                Err(error) => error.as_response_error().status_code(),
            };
            assert_eq!(status, 401, "{header:?}");
        }
    }
}
