//! Only the gateway is public, against the running stack: internal routes (users, billing, notifications)
//! refuse calls without the
//! gateway's service token (missing, garbage, signed by another key, expired, meant for another service),
//! billing takes the customer from the token and serves an order to its owner only, logout ends a session at
//! once, and login holds up under a flood (429s for the attacked account, other users unaffected).

// Test code, helpers included: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::TestStack;
use futures::StreamExt;
use serde_json::{Value, json};
use tracehop::client::{ApiClient, unique_email};
use tracehop_identity::{EndUser, Issuer};

fn http() -> reqwest::Client {
    tracehop_telemetry::http::client::plain_client_builder()
        .build()
        .unwrap()
}

/// A token signed with the stack's own key but already expired, in the shape the gateway makes.
fn expired_token(private_key_file: &str, key_id: &str, audience: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({
        "iss": "gateway", "aud": audience, "iat": now - 600, "exp": now - 300,
        "jti": uuid::Uuid::new_v4(), "sub": uuid::Uuid::new_v4(), "email": "a@example.com",
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some(key_id.to_owned());
    let key =
        jsonwebtoken::EncodingKey::from_ed_pem(&std::fs::read(private_key_file).unwrap()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[tokio::test]
async fn internal_routes_refuse_calls_that_did_not_come_through_the_gateway() {
    let test = TestStack::boot(&[]).await;
    let ports = test.stack.options.ports;
    let users = format!("http://127.0.0.1:{}", ports.users);
    let billing = format!("http://127.0.0.1:{}", ports.billing);
    let notifications = format!("http://127.0.0.1:{}", ports.notifications);
    let private_key = test.stack.keys.private_key_file.display().to_string();
    let gateway = Issuer::from_file(&private_key, "gateway").unwrap();
    let (other_private, _) = tracehop_identity::generate_key_pair().unwrap();
    let impostor = Issuer::from_pem(other_private.expose().as_bytes(), "gateway").unwrap();
    let someone = EndUser {
        user_id: uuid::Uuid::new_v4(),
        email: "victim@example.com".into(),
    };

    let routes: Vec<(&str, reqwest::Method, String, Option<Value>)> = vec![
        (
            "users",
            reqwest::Method::POST,
            format!("{users}/users"),
            Some(json!({"email": "x@example.com", "name": "X", "password": "long enough pass"})),
        ),
        (
            "users",
            reqwest::Method::POST,
            format!("{users}/sessions"),
            Some(json!({"email": "x@example.com", "password": "long enough pass"})),
        ),
        (
            "users",
            reqwest::Method::POST,
            format!("{users}/sessions/validate"),
            Some(json!({"token": "a".repeat(64)})),
        ),
        (
            "users",
            reqwest::Method::POST,
            format!("{users}/sessions/revoke"),
            Some(json!({"token": "a".repeat(64)})),
        ),
        (
            "billing",
            reqwest::Method::POST,
            format!("{billing}/charge"),
            Some(json!({"amountMinor": 4999, "currency": "usd", "idempotencyKey": "k1"})),
        ),
        (
            "billing",
            reqwest::Method::GET,
            format!("{billing}/orders/{}", uuid::Uuid::new_v4()),
            None,
        ),
        (
            "notifications",
            reqwest::Method::GET,
            format!(
                "{notifications}/notifications/{}?orderedAt=2026-11-26T00:00:00Z",
                uuid::Uuid::new_v4()
            ),
            None,
        ),
    ];
    for (service, method, url, body) in &routes {
        let other_service = if *service == "users" {
            "billing"
        } else {
            "users"
        };
        let credentials = [
            ("no token", None),
            ("garbage", Some("not-a-jwt".to_owned())),
            (
                "signed by another key",
                Some(impostor.token(service, Some(&someone)).unwrap()),
            ),
            (
                "expired",
                Some(expired_token(&private_key, gateway.key_id(), service)),
            ),
            (
                "meant for another service",
                Some(gateway.token(other_service, Some(&someone)).unwrap()),
            ),
        ];
        for (what, token) in credentials {
            let mut request = http().request(method.clone(), url);
            if let Some(token) = &token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{method} {url} with {what}");
            let error: Value = response.json().await.unwrap();
            assert_eq!(error["error"], "service_unauthorized", "{error}");
            let trace_id = error["traceId"].as_str().unwrap();
            assert!(
                trace_id.len() == 32 && trace_id.chars().any(|c| c != '0'),
                "{error}"
            );
        }
    }
    // Nothing got in: no user, no charge.
    assert!(test.stripe_charges().await.is_empty());
    {
        use diesel::RunQueryDsl;
        let mut db = test.db();
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let users: Count = diesel::sql_query("SELECT count(*) AS n FROM users")
            .get_result(&mut db)
            .unwrap();
        assert_eq!(users.n, 0);
    }

    // The body cannot choose whom to charge: customer fields are not part of the contract.
    let good = gateway.token("billing", Some(&someone)).unwrap();
    let response = http()
        .post(format!("{billing}/charge"))
        .bearer_auth(&good)
        .json(
            &json!({"amountMinor": 4999, "currency": "usd", "idempotencyKey": "k2",
                      "userId": uuid::Uuid::new_v4(), "email": "attacker@example.com"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn billing_serves_an_order_to_its_owner_only() {
    let test = TestStack::boot(&[]).await;
    let owner = test.customer().await;
    let stranger = test.customer().await;
    let checkout = owner.checkout("49.99", "usd", None).await.unwrap();
    assert_eq!(checkout.status, 200, "{}", checkout.body);
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();

    // Through the gateway.
    assert_eq!(owner.order(&order_id).await.unwrap().status, 200);
    let refused = stranger.order(&order_id).await.unwrap();
    assert_eq!(refused.status, 404, "{}", refused.body);

    // And billing itself, asked with a good token that names someone else.
    let gateway = Issuer::from_file(
        &test.stack.keys.private_key_file.display().to_string(),
        "gateway",
    )
    .unwrap();
    let url = format!(
        "http://127.0.0.1:{}/orders/{order_id}",
        test.stack.options.ports.billing
    );
    let someone_else = EndUser {
        user_id: uuid::Uuid::new_v4(),
        email: "someone@example.com".into(),
    };
    let response = http()
        .get(&url)
        .bearer_auth(gateway.token("billing", Some(&someone_else)).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    // A token that names no user is not enough either.
    let response = http()
        .get(&url)
        .bearer_auth(gateway.token("billing", None).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn logout_ends_the_session_at_once_and_short_passwords_are_refused() {
    let test = TestStack::boot(&[]).await;
    let customer = test.customer().await;
    assert_eq!(
        customer.checkout("5.00", "usd", None).await.unwrap().status,
        200
    );
    let logout = customer
        .call(reqwest::Method::POST, "/logout", None, &[])
        .await
        .unwrap();
    assert_eq!(logout.status, 204, "{}", logout.body);
    let after = customer.checkout("5.00", "usd", None).await.unwrap();
    assert_eq!(after.status, 401, "{}", after.body);
    let again = customer
        .call(reqwest::Method::POST, "/logout", None, &[])
        .await
        .unwrap();
    assert_eq!(again.status, 401);

    let short = ApiClient::new(&test.stack.gateway_url())
        .call(
            reqwest::Method::POST,
            "/signup",
            Some(json!({"email": unique_email("short"), "name": "S", "password": "elevenchars"})),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(short.status, 400, "{}", short.body);
    assert!(short.body["message"].as_str().unwrap().contains("12"));
}

// Several threads: the flood's 50 clients, the bystander and the embedded collector share this process,
// and the bystander's time must be the stack's, not this runtime's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_flood_is_throttled_while_other_users_log_in() {
    // The gateway believes X-Forwarded-For here, so the test can speak from several addresses.
    let test = TestStack::boot(&[
        ("GATEWAY_TRUST_FORWARDED_HEADERS", "true"),
        ("USERS_LOGIN_FAILURES_PER_ADDRESS", "20"),
    ])
    .await;
    let gateway = test.stack.gateway_url();
    let victim = unique_email("victim");
    let bystander = unique_email("bystander");
    let password = "correct horse battery";
    for email in [&victim, &bystander] {
        let mut client = ApiClient::new(&gateway);
        client.signup_and_login(email, password).await.unwrap();
    }
    let attacker = "198.51.100.7";

    // 200 wrong-password logins for one account, 50 in flight at once, from one address ...
    let flood = {
        let gateway = gateway.clone();
        let victim = victim.clone();
        tokio::spawn(async move {
            futures::stream::iter(0..200)
                .map(|attempt| {
                    let client = ApiClient::new(&gateway);
                    let victim = victim.clone();
                    async move {
                        let body = json!({"email": victim, "password": format!("wrong password {attempt}")});
                        let answer = client
                            .call(
                                reqwest::Method::POST,
                                "/login",
                                Some(body),
                                &[("X-Forwarded-For", attacker)],
                            )
                            .await
                            .unwrap();
                        answer.status
                    }
                })
                .buffer_unordered(50)
                .collect::<Vec<u16>>()
                .await
        })
    };
    // ... while another user logs in from the same address.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let bystander_login = ApiClient::new(&gateway)
        .call(
            reqwest::Method::POST,
            "/login",
            Some(json!({"email": bystander, "password": password})),
            &[("X-Forwarded-For", attacker)],
        )
        .await
        .unwrap();
    let took = started.elapsed();
    let statuses = flood.await.unwrap();
    assert_eq!(bystander_login.status, 200, "{}", bystander_login.body);
    if took >= Duration::from_secs(1) {
        let trace_id = bystander_login.trace_id.clone().unwrap();
        let trace = test.trace(&trace_id, |t| t.spans.len() >= 4).await;
        eprintln!("{}", tracehop::why::Why::of(&trace).report());
        eprintln!("{}", trace.waterfall(false));
    }
    assert!(
        took < Duration::from_secs(1),
        "the bystander waited {took:?}"
    );

    let count = |status: u16| statuses.iter().filter(|s| **s == status).count();
    assert_eq!(
        count(401) + count(429),
        200,
        "only 401s and 429s: {statuses:?}"
    );
    assert!(
        count(401) <= 5,
        "at most the per-account limit was checked: {statuses:?}"
    );
    assert!(count(429) >= 195, "{statuses:?}");
    // The right password is refused too while the account is locked: the attacker learns nothing from it.
    let locked = http()
        .post(format!("{gateway}/login"))
        .header("X-Forwarded-For", "203.0.113.9")
        .json(&json!({"email": victim, "password": password}))
        .send()
        .await
        .unwrap();
    assert_eq!(locked.status(), 429);
    let retry_after: u64 = locked.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=900).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    let body: Value = locked.json().await.unwrap();
    assert_eq!(body["error"], "too_many_attempts", "{body}");

    // Per address: failures spread over many accounts lock the address, not the accounts.
    let sprayer = "198.51.100.99";
    let mut refused_at = None;
    for attempt in 0..25 {
        let answer = ApiClient::new(&gateway)
            .call(
                reqwest::Method::POST,
                "/login",
                Some(json!({"email": unique_email("nobody"), "password": "wrong password here"})),
                &[("X-Forwarded-For", sprayer)],
            )
            .await
            .unwrap();
        if answer.status == 429 {
            refused_at = Some(attempt);
            break;
        }
        assert_eq!(answer.status, 401);
    }
    assert_eq!(
        refused_at,
        Some(20),
        "the 21st failure from one address is refused"
    );
    let elsewhere = ApiClient::new(&gateway)
        .call(
            reqwest::Method::POST,
            "/login",
            Some(json!({"email": bystander, "password": password})),
            &[("X-Forwarded-For", "198.51.100.100")],
        )
        .await
        .unwrap();
    assert_eq!(elsewhere.status, 200);
}

#[tokio::test]
async fn nats_refuses_anonymous_clients_and_keeps_each_service_to_its_subjects() {
    use async_nats::jetstream;
    let test = TestStack::boot(&[]).await;
    let url = test.stack.nats_url.clone();

    // Anonymous: refused by the server, so nobody off the street can forge an order.completed.
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(3))
        .connect(&url)
        .await;
    assert!(anonymous.is_err(), "an anonymous client connected");

    let users = test.stack.nats_users.clone().unwrap();
    let as_user = |user: &str| {
        let credentials = users.credentials(user).unwrap();
        let url = url.clone();
        async move {
            tracehop_telemetry::messaging::connect(&url, "security-test", Some(&credentials))
                .await
                .unwrap()
        }
    };
    let before = jetstream::new(test.stack.nats_client().await.unwrap())
        .get_stream("ORDERS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;

    // notifications may not publish order.completed: the server refuses, JetStream never stores it.
    let notifications = jetstream::new(as_user("notifications").await);
    let event = json!({"eventId": uuid::Uuid::new_v4(), "orderId": uuid::Uuid::new_v4(),
                       "email": "attacker@example.com", "amountMinor": 1, "currency": "usd"});
    let forged = async {
        notifications
            .publish("order.completed", event.to_string().into())
            .await?
            .await
    };
    let forged = tokio::time::timeout(Duration::from_secs(10), forged).await;
    assert!(
        !matches!(forged, Ok(Ok(_))),
        "notifications published order.completed"
    );

    // billing may publish, but not read the stream through a consumer of its own.
    let billing = jetstream::new(as_user("billing").await);
    let stream = billing.get_stream("ORDERS").await.unwrap();
    let reader = tokio::time::timeout(
        Duration::from_secs(10),
        stream.create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("snoop".into()),
            ..Default::default()
        }),
    )
    .await;
    assert!(!matches!(reader, Ok(Ok(_))), "billing created a consumer");

    let after = jetstream::new(test.stack.nats_client().await.unwrap())
        .get_stream("ORDERS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(before, after, "nothing forged reached the stream");

    // And the services, each with its own user, still do their work end to end.
    let customer = test.customer().await;
    let checkout = customer.checkout("10.00", "usd", None).await.unwrap();
    assert_eq!(checkout.status, 200, "{}", checkout.body);
    let order_id = checkout.body["orderId"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let order = customer.order(&order_id).await.unwrap();
        if order.body["notification"] == "sent" {
            break;
        }
        assert!(Instant::now() < deadline, "e-mail not sent: {}", order.body);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn each_service_role_reaches_its_own_tables_only() {
    use diesel::{Connection, RunQueryDsl};
    let test = TestStack::boot(&[]).await;
    // The services run as their roles: a checkout works end to end under them.
    let customer = test.customer().await;
    assert_eq!(
        customer.checkout("3.00", "usd", None).await.unwrap().status,
        200
    );
    let own: &[(&str, &[&str])] = &[
        ("users", &["users", "sessions", "login_failures"]),
        ("billing", &["transactions", "outbox"]),
        ("notifications", &["notifications"]),
    ];
    let all = [
        "users",
        "sessions",
        "login_failures",
        "transactions",
        "outbox",
        "notifications",
    ];
    for (service, tables) in own {
        let role = tracehop::infra::service_role(service).unwrap();
        let url = tracehop::infra::with_role(&test.stack.database_url, role);
        assert!(url.contains(role), "{url}");
        let mut db = diesel::PgConnection::establish(&url).unwrap();
        for table in all {
            let read = diesel::sql_query(format!("SELECT 1 FROM {table} LIMIT 1")).execute(&mut db);
            if tables.contains(&table) {
                assert!(read.is_ok(), "{role} cannot read its own {table}: {read:?}");
            } else {
                let error = read.expect_err(&format!("{role} read {table}"));
                assert!(
                    error.to_string().contains("permission denied"),
                    "{role} on {table}: {error}"
                );
            }
        }
        // Nor may it change the schema.
        let create = diesel::sql_query("CREATE TABLE intruder (id INT)").execute(&mut db);
        assert!(create.is_err(), "{role} created a table");
    }
    // The services' own processes log in as those roles.
    for service in ["users", "billing", "notifications"] {
        let env = test.stack.service_env(service);
        let url = env
            .iter()
            .find(|(key, _)| key == "DATABASE_URL")
            .map(|(_, value)| value.clone())
            .unwrap();
        assert!(
            url.contains(tracehop::infra::service_role(service).unwrap()),
            "{service}: {url}"
        );
    }
}
