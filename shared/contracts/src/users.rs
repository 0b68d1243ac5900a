//! users's HTTP API: `POST /users`, `POST /sessions`, `POST /sessions/validate`.

use std::fmt;

/// `POST /users` (and the gateway's `POST /signup`).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    pub email: String,
    pub name: String,
    pub password: String,
}

/// Never prints the password.
impl fmt::Debug for SignupRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignupRequest")
            .field("email", &self.email)
            .field("name", &self.name)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The answer to [`SignupRequest`]: 201.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignupResponse {
    pub user_id: uuid::Uuid,
}

/// `POST /sessions` (and the gateway's `POST /login`).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

/// Never prints the password.
impl fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest")
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The answer to [`LoginRequest`]: a new session.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoginResponse {
    pub token: String,
    pub user_id: uuid::Uuid,
}

/// Never prints the token.
impl fmt::Debug for LoginResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginResponse")
            .field("token", &"<redacted>")
            .field("user_id", &self.user_id)
            .finish()
    }
}

/// The answer to `POST /sessions/validate` (bearer token in `Authorization`): the session's owner.
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
            password: "hunter2hunter2".into(),
        };
        let login = LoginRequest {
            email: "a@example.com".into(),
            password: "hunter2hunter2".into(),
        };
        let session = LoginResponse {
            token: "secret-token".into(),
            user_id: uuid::Uuid::nil(),
        };
        let printed = format!("{signup:?}{login:?}{session:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("secret-token"), "{printed}");
    }
}
