//! A small client of the public API (signup, login, checkout, order), used by the demo, the tests and load.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};

/// A response: status, body, and the `traceresponse` trace id.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Value,
    /// Trace id from the `traceresponse` header, if present.
    pub trace_id: Option<String>,
}

/// A logged-in (or not yet) customer.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    pub token: Option<String>,
}

impl ApiClient {
    pub fn new(base: &str) -> Self {
        Self {
            http: tracehop_telemetry::http::client::plain_client_builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap_or_default(),
            base: base.trim_end_matches('/').to_owned(),
            token: None,
        }
    }

    /// Sends a request and reads the answer, whatever its status.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<ApiResponse> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("calling {path}"))?;
        let status = response.status().as_u16();
        let trace_id = response
            .headers()
            .get("traceresponse")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split('-').nth(1))
            .map(str::to_owned);
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok(ApiResponse {
            status,
            body,
            trace_id,
        })
    }

    /// Signs up and logs in a new user; returns the user id.
    pub async fn signup_and_login(
        &mut self,
        email: &str,
        password: &str,
    ) -> anyhow::Result<String> {
        let signup = self
            .call(
                reqwest::Method::POST,
                "/signup",
                Some(json!({"email": email, "name": "Dani", "password": password})),
                &[],
            )
            .await?;
        anyhow::ensure!(
            signup.status == 201,
            "signup answered {}: {}",
            signup.status,
            signup.body
        );
        let login = self
            .call(
                reqwest::Method::POST,
                "/login",
                Some(json!({"email": email, "password": password})),
                &[],
            )
            .await?;
        anyhow::ensure!(
            login.status == 200,
            "login answered {}: {}",
            login.status,
            login.body
        );
        self.token = login.body["token"].as_str().map(str::to_owned);
        Ok(signup.body["userId"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// `POST /checkout`.
    pub async fn checkout(
        &self,
        total: &str,
        currency: &str,
        idempotency_key: Option<&str>,
    ) -> anyhow::Result<ApiResponse> {
        let headers: Vec<(&str, &str)> = idempotency_key
            .map(|key| vec![("Idempotency-Key", key)])
            .unwrap_or_default();
        self.call(
            reqwest::Method::POST,
            "/checkout",
            Some(json!({"total": total, "currency": currency})),
            &headers,
        )
        .await
    }

    /// `GET /orders/{id}`.
    pub async fn order(&self, order_id: &str) -> anyhow::Result<ApiResponse> {
        self.call(
            reqwest::Method::GET,
            &format!("/orders/{order_id}"),
            None,
            &[],
        )
        .await
    }
}

/// A unique e-mail address for demo and test users.
pub fn unique_email(prefix: &str) -> String {
    format!("{prefix}-{}@example.com", uuid::Uuid::new_v4().simple())
}
