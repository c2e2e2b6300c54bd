//! What lets a phone fill the code in by itself: the host of the WebOTP origin line, and the
//! Android SMS Retriever app hash. Both are checked here before they go into an SMS.

/// Why a web origin cannot be used for WebOTP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    #[error("web origin: scheme must be https (http only for localhost and 127.0.0.1)")]
    NotHttps,
    #[error("web origin: must not contain user info")]
    UserInfo,
    #[error("web origin: must not have a path, not even a trailing '/'")]
    Path,
    #[error("web origin: must not have a query or fragment")]
    QueryOrFragment,
    #[error("web origin: empty host")]
    EmptyHost,
    #[error("web origin: host is {len} characters, over the limit of 253")]
    HostTooLong { len: usize },
    #[error(
        "web origin: host must be an ASCII domain name or IPv4 address (use the xn-- form for international names)"
    )]
    InvalidHost,
    #[error("web origin: port must be a number from 1 to 65535")]
    InvalidPort,
}

/// Turns a web origin into the host the WebOTP origin line names.
///
/// `https://portal.example.it` gives `portal.example.it` and `https://a.b:8443` gives `a.b:8443`.
/// The host is lowercased and a default port (443, or 80 for http) is dropped, as browsers do.
///
/// # Errors
///
/// Returns an [`OriginError`] unless `origin` is `https://` (or `http://` for `localhost` and
/// `127.0.0.1`) followed by a host of at most 253 characters and an optional port, with no
/// user info, path, query or fragment.
pub fn web_otp_host(origin: &str) -> Result<String, OriginError> {
    let (scheme, rest) = origin.split_once("://").ok_or(OriginError::NotHttps)?;
    let is_https = scheme.eq_ignore_ascii_case("https");
    if !is_https && !scheme.eq_ignore_ascii_case("http") {
        return Err(OriginError::NotHttps);
    }

    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    if authority.contains('@') {
        return Err(OriginError::UserInfo);
    }
    if tail.starts_with('/') {
        return Err(OriginError::Path);
    }
    if !tail.is_empty() {
        return Err(OriginError::QueryOrFragment);
    }

    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    };
    if host.is_empty() {
        return Err(OriginError::EmptyHost);
    }
    if host.len() > MAX_HOST_LEN {
        return Err(OriginError::HostTooLong { len: host.len() });
    }
    if !is_valid_domain(host) {
        return Err(OriginError::InvalidHost);
    }
    let host = host.to_ascii_lowercase();
    let port = port.map(parse_port).transpose()?;

    if !is_https && host != "localhost" && host != "127.0.0.1" {
        return Err(OriginError::NotHttps);
    }
    let default_port = if is_https { 443 } else { 80 };
    match port {
        Some(port) if port != default_port => Ok(format!("{host}:{port}")),
        _ => Ok(host),
    }
}

/// Whether `s` is an Android SMS Retriever app hash: exactly 11 characters of `[A-Za-z0-9+/]`.
pub fn is_valid_app_hash(s: &str) -> bool {
    s.len() == APP_HASH_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

// === private ===

const MAX_HOST_LEN: usize = 253;

const MAX_LABEL_LEN: usize = 63;

const APP_HASH_LEN: usize = 11;

/// Whether `host` is a dot-separated ASCII domain name (an IPv4 address is one too).
fn is_valid_domain(host: &str) -> bool {
    host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

fn parse_port(port: &str) -> Result<u16, OriginError> {
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(OriginError::InvalidPort);
    }
    match port.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(OriginError::InvalidPort),
    }
}

/// Checks `host` as [`web_otp_host`] checks an origin's host, so that it is safe to put in the SMS.
pub(crate) fn checked_web_otp_host(host: &str) -> Option<String> {
    web_otp_host(&format!("https://{host}")).ok()
}

/// The web origins and app hashes a client's SMS may bind a code to (`[[clients]] web_origins`,
/// `app_hashes`). A caller-chosen origin or hash would let anyone with the client's API key make
/// SMS that bind the code to their own site or app (and lengthen them into more segments), so a
/// start may name only the client's own; naming none takes the client's only one, if it has
/// exactly one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientAutofill {
    pub web_origin_hosts: Vec<String>,
    pub app_hashes: Vec<String>,
}

/// Why a start's web origin or app hash was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAllowed {
    WebOrigin,
    AppHash,
}

impl ClientAutofill {
    /// The web origin host and app hash a start of this client gets, from what it named.
    pub fn choose(
        &self,
        web_origin_host: Option<String>,
        app_hash: Option<String>,
    ) -> Result<(Option<String>, Option<String>), NotAllowed> {
        let pick = |named: Option<String>, allowed: &[String], refusal| match named {
            Some(named) if allowed.contains(&named) => Ok(Some(named)),
            Some(_) => Err(refusal),
            None if allowed.len() == 1 => Ok(allowed.first().cloned()),
            None => Ok(None),
        };
        Ok((
            pick(
                web_origin_host,
                &self.web_origin_hosts,
                NotAllowed::WebOrigin,
            )?,
            pick(app_hash, &self.app_hashes, NotAllowed::AppHash)?,
        ))
    }
}
