//! [`ConfigError`], and the checks that more than one part of the configuration shares.

use std::path::PathBuf;
use std::time::Duration;

/// A configuration that cannot be used, naming where it went wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: cannot read it")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config key {key}: {message}")]
    Invalid { key: String, message: String },
}

/// The error for `key`, whose value is wrong for the reason `message` gives.
pub(crate) fn invalid<T>(
    key: impl Into<String>,
    message: impl Into<String>,
) -> Result<T, ConfigError> {
    Err(ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    })
}

/// `value` seconds (`default` when unset) as a duration, if between `min` and `max`.
pub(crate) fn secs(
    key: &str,
    value: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
) -> Result<Duration, ConfigError> {
    let value = value.unwrap_or(default);
    if !(min..=max).contains(&value) {
        return invalid(key, format!("must be between {min} and {max}"));
    }
    Ok(Duration::from_secs(value))
}

/// Whether `text` is an absolute `http://` or `https://` URL with a host.
pub(crate) fn is_absolute_http(text: &str) -> bool {
    text.parse::<http::Uri>().is_ok_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https"))
            && uri.host().is_some_and(|host| !host.is_empty())
    })
}

/// An absolute `http://` or `https://` URL with a host, for `key`.
pub(crate) fn http_url(key: String, url: &str) -> Result<http::Uri, ConfigError> {
    match url.parse::<http::Uri>() {
        Ok(parsed) if is_absolute_http(url) => Ok(parsed),
        _ => invalid(key, "must be an absolute http:// or https:// URL"),
    }
}

/// A carrier's or client's name, for `key`: 1 to 32 of a-z, 0-9, '-' and '_'.
pub(crate) fn check_name(key: String, name: &str) -> Result<(), ConfigError> {
    let valid = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !valid {
        return invalid(key, "must be 1 to 32 of a-z, 0-9, '-' and '_'");
    }
    Ok(())
}
