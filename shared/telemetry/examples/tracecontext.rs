//! A W3C Trace Context test-suite endpoint, built on tracehop's shared HTTP middleware and client.
//!
//! `cargo run -p tracehop-telemetry --example tracecontext -- 7777` listens on 127.0.0.1:7777 and answers
//! `POST /test` with a JSON array of `{"url": ..., "arguments": [...]}`: for each entry, in order, it POSTs
//! `arguments` as JSON to `url` with the propagated `traceparent`/`tracestate`, then answers 200. That is the
//! protocol of <https://github.com/w3c/trace-context/tree/main/test>, so the public suite can be pointed at
//! it (`STRICT_LEVEL=1 python3 test.py http://127.0.0.1:7777/test`).

use std::time::Duration;

use actix_web::{HttpResponse, web};
use tracehop_telemetry::http::{ApiError, TracedClient, server};

#[derive(serde::Deserialize)]
struct Case {
    url: String,
    arguments: serde_json::Value,
}

async fn test(
    client: web::Data<TracedClient>,
    cases: web::Json<Vec<Case>>,
) -> Result<HttpResponse, ApiError> {
    for case in cases.into_inner() {
        let request = client
            .request(reqwest::Method::POST, &case.url)
            .json(&case.arguments);
        client
            .send("/test", request)
            .await
            .map_err(|error| ApiError::bad_gateway("forward_failed", error.to_string()))?;
    }
    Ok(HttpResponse::Ok().finish())
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .as_deref()
        .unwrap_or("7777")
        .parse()?;
    let telemetry = tracehop_telemetry::setup::init("tracecontext-test-endpoint")?;
    let client = web::Data::new(TracedClient::new(Duration::from_secs(10))?);
    let (listener, port) = server::bind("127.0.0.1", port)?;
    tracing::info!(port, "trace context test endpoint listening");
    actix_web::HttpServer::new(move || {
        let client = client.clone();
        server::app(server::RequestTrust::INTERNAL, move |config| {
            config.app_data(client).route("/test", web::post().to(test));
        })
    })
    .listen(listener)?
    .run()
    .await?;
    telemetry.shutdown().await;
    Ok(())
}
