//! users's HTTP API: `POST /users`, `POST /sessions`, `POST /sessions/validate`, `POST /sessions/revoke`.
//! Every call carries the gateway's service token (`tracehop-identity`); session tokens travel in bodies.

use crate::domain::Secret;

/// `POST /users` (and the gateway's `POST /signup`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    pub email: String,
    pub name: String,
    pub password: Secret,
}

/// The answer to [`SignupRequest`]: 201.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignupResponse {
    pub user_id: uuid::Uuid,
}

/// `POST /sessions` (and the gateway's `POST /login`). The gateway adds the client's address, for the
/// per-address login throttle.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: Secret,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
}

/// The answer to [`LoginRequest`]: a new session.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoginResponse {
    pub token: Secret,
    pub user_id: uuid::Uuid,
}

/// `POST /sessions/validate` and `POST /sessions/revoke`: a session token, as the client presented it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionToken {
    pub token: Secret,
}

/// The answer to `POST /sessions/validate`: the session's owner.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionUser {
    pub user_id: uuid::Uuid,
    pub email: String,
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let signup = SignupRequest {
            email: "a@example.com".into(),
            name: "A".into(),
            password: Secret::new("hunter2hunter2"),
        };
        let login = LoginRequest {
            email: "a@example.com".into(),
            password: Secret::new("hunter2hunter2"),
            client_address: None,
        };
        let session = LoginResponse {
            token: Secret::new("secret-token"),
            user_id: uuid::Uuid::nil(),
        };
        let validate = SessionToken {
            token: Secret::new("secret-token"),
        };
        let printed = format!("{signup:?}{login:?}{session:?}{validate:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("secret-token"), "{printed}");
        // ... while the wire format stays plain JSON strings.
        let json = serde_json::to_string(&login).unwrap_or_default();
        assert_eq!(
            json,
            r#"{"email":"a@example.com","password":"hunter2hunter2"}"#
        );
    }
}
