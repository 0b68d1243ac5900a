//! Small helpers for reading service configuration from the environment.

use std::str::FromStr;

/// Reads `name` from the environment, falling back to `default` when unset or empty.
pub fn env_or(name: &str, default: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => value,
        _ => default.to_owned(),
    }
}

/// Reads and parses `name`, falling back to `default` when unset; a value that does not parse is an error
/// (a typo in a port number should stop start-up, not be silently replaced).
pub fn env_parse<T: FromStr>(name: &str, default: T) -> Result<T, ConfigError> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => {
            value.trim().parse().map_err(|_| ConfigError::Invalid {
                name: name.to_owned(),
                value,
            })
        }
        _ => Ok(default),
    }
}

/// Reads `name`, which must be set: keys and credentials have no safe default.
pub fn required(name: &str) -> Result<String, ConfigError> {
    match std::env::var(name) {
        Ok(value) if !value.trim().is_empty() => Ok(value.trim().to_owned()),
        _ => Err(ConfigError::Missing {
            name: name.to_owned(),
        }),
    }
}

/// Configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {name} has an invalid value {value:?}")]
    Invalid { name: String, value: String },
    #[error("environment variable {name} must be set (README, \"Configuration\")")]
    Missing { name: String },
}

/// `HOST`/`PORT`-style listen address for a service: `{PREFIX}_HOST` (default 127.0.0.1) and `{PREFIX}_PORT`.
pub fn listen_address(prefix: &str, default_port: u16) -> Result<(String, u16), ConfigError> {
    let host = env_or(&format!("{prefix}_HOST"), "127.0.0.1");
    let port = env_parse(&format!("{prefix}_PORT"), default_port)?;
    Ok((host, port))
}
