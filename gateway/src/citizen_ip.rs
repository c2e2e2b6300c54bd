//! The citizen's address behind a start, for the per-IP limit (docs/DESIGN.md section 4,
//! *Limits*): where each client's comes from, and how addresses are grouped into limit keys.
//!
//! A frontend calls the gateway from its own servers, so the peer address is the frontend's,
//! shared by every citizen it serves: limiting by it throttles them all together. With clients
//! configured the peer address is therefore never used; each client says where its citizens'
//! addresses are ([`CitizenIpSource`]). Only the anonymous client of local development (no
//! clients configured) falls back to the peer address.

use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName};

use crate::error::ApiError;

/// Where a client's citizen addresses come from (`[[clients]] citizen_ip`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CitizenIpSource {
    /// `"optional"`, the default: the body's `client_ip` when it is sent; a start without it is
    /// not limited per IP (the phone's and the client's limits still hold) and is counted in
    /// `otpgate_starts_without_citizen_ip_total`. Never the frontend's own address.
    Optional,
    /// `"body"`: the body's `client_ip`, required (`400 missing_client_ip` without it).
    Body,
    /// `"header"`: a header that a proxy in front of the gateway sets, read only for this client.
    Header(ForwardedHeader),
    /// `"none"`: no per-IP limit for this client (say, a call centre's operators starting
    /// verifications on citizens' behalf from one office).
    None,
}

/// A header carrying the citizen's address: a comma-separated list of addresses, each proxy
/// appending the one it saw (`X-Forwarded-For`), or a single one (`X-Real-IP`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedHeader {
    pub name: HeaderName,
    /// The proxies of the deployment itself, whose entries are skipped from the right: the
    /// right-most entry that is not one of them is the citizen's (entries further left were
    /// written by the citizen's side and cannot be trusted).
    pub trusted_proxies: Vec<IpBlock>,
}

/// An address block such as `10.0.0.0/8` or `2001:db8::/32`; a bare address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    network: IpAddr,
    prefix_len: u8,
}

/// The citizen address a start is limited by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CitizenIp {
    /// The citizen's address.
    Address(IpAddr),
    /// None came, and the client's source allows that: not limited per IP, and counted.
    Missing,
    /// The client's source is `none`: not limited per IP.
    Unlimited,
}

// === impl CitizenIpSource ===

impl CitizenIpSource {
    /// The citizen address of a start of a client with this source, from the body's
    /// `client_ip` and the request's headers.
    ///
    /// # Errors
    ///
    /// `400 invalid_client_ip` for an address that does not parse (in the body, whatever the
    /// source, or in the header), and `400 missing_client_ip` when the source requires one and
    /// none came.
    pub fn resolve(
        &self,
        body_ip: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<CitizenIp, ApiError> {
        let body_ip = body_ip.map(parse_body_ip).transpose()?;
        match self {
            CitizenIpSource::Optional => Ok(body_ip.map_or(CitizenIp::Missing, CitizenIp::Address)),
            CitizenIpSource::Body => body_ip.map(CitizenIp::Address).ok_or_else(|| {
                ApiError::bad_request(
                    "missing_client_ip",
                    "client_ip: required for this client (its citizen_ip is \"body\")",
                )
            }),
            CitizenIpSource::Header(header) => header.citizen_ip(headers).map(CitizenIp::Address),
            CitizenIpSource::None => Ok(CitizenIp::Unlimited),
        }
    }
}

/// The citizen address of a check, for the caps on wrong codes (`crate::guess_caps`): as for a
/// start, except that no source makes `client_ip` required on a check (checks took the field
/// after starts, and a refused check would lock citizens out of codes they hold), and that the
/// peer address never stands in for it, not even for the anonymous client (`source` `None`):
/// every wrong code of a frontend's citizens would count against the frontend's own address. A
/// check without an address is not capped per address; the client's and the phone's caps hold.
///
/// # Errors
///
/// `400 invalid_client_ip` for an address that does not parse, and for the `header` source, as
/// for a start, `400 missing_client_ip` without its header.
pub fn of_check(
    source: Option<&CitizenIpSource>,
    body_ip: Option<&str>,
    headers: &HeaderMap,
) -> Result<Option<IpAddr>, ApiError> {
    let body_ip = body_ip.map(parse_body_ip).transpose()?;
    match source {
        None | Some(CitizenIpSource::Optional | CitizenIpSource::Body) => Ok(body_ip),
        Some(CitizenIpSource::Header(header)) => header.citizen_ip(headers).map(Some),
        Some(CitizenIpSource::None) => Ok(None),
    }
}

/// The citizen address of the anonymous client (no clients configured: local development):
/// the body's `client_ip`, else the peer address.
///
/// # Errors
///
/// `400 invalid_client_ip` for a `client_ip` that does not parse.
pub fn anonymous(body_ip: Option<&str>, peer: Option<IpAddr>) -> Result<CitizenIp, ApiError> {
    let ip = match body_ip {
        Some(text) => parse_body_ip(text)?,
        None => peer.unwrap_or(IpAddr::from([127, 0, 0, 1])),
    };
    Ok(CitizenIp::Address(ip))
}

/// The key the per-IP limit counts `ip` under: an IPv4 address (an IPv4-mapped IPv6 one
/// included) as it is, and an IPv6 address as its first `ipv6_prefix_len` bits, since one
/// subscriber commonly holds a whole /64 and picks a fresh address in it at will.
pub fn limit_key(ip: IpAddr, ipv6_prefix_len: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & mask(ipv6_prefix_len, 128);
            IpAddr::V6(bits.into())
        }
    }
}

fn parse_body_ip(text: &str) -> Result<IpAddr, ApiError> {
    text.trim().parse::<IpAddr>().map_err(|_| {
        ApiError::bad_request(
            "invalid_client_ip",
            "client_ip: expected an IPv4 or IPv6 address",
        )
    })
}

/// The top `prefix_len` of `width` bits set.
fn mask(prefix_len: u8, width: u32) -> u128 {
    let prefix_len = u32::from(prefix_len).min(width);
    if prefix_len == 0 {
        0
    } else {
        (u128::MAX << (128 - prefix_len)) >> (128 - width)
    }
}

// === impl ForwardedHeader ===

impl ForwardedHeader {
    /// The right-most entry of the header (all its lines, in order) that is not a trusted
    /// proxy; if every entry is one, the left-most.
    fn citizen_ip(&self, headers: &HeaderMap) -> Result<IpAddr, ApiError> {
        let mut entries = Vec::new();
        for value in headers.get_all(&self.name) {
            let text = value.to_str().map_err(|_| self.invalid())?;
            for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                entries.push(parse_forwarded_entry(entry).ok_or_else(|| self.invalid())?);
            }
        }
        let citizen = entries
            .iter()
            .rev()
            .find(|ip| {
                !self
                    .trusted_proxies
                    .iter()
                    .any(|block| block.contains(**ip))
            })
            .or(entries.first());
        citizen.copied().ok_or_else(|| {
            ApiError::bad_request(
                "missing_client_ip",
                format!(
                    "{}: required for this client (its citizen_ip is \"header\")",
                    self.name
                ),
            )
        })
    }

    fn invalid(&self) -> ApiError {
        ApiError::bad_request(
            "invalid_client_ip",
            format!("{}: expected IPv4 or IPv6 addresses", self.name),
        )
    }
}

/// An address as proxies write it: bare, or with a port (`192.0.2.1:4711`, `[2001:db8::1]:80`),
/// or bracketed.
fn parse_forwarded_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|socket| socket.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<IpAddr>()
                .ok()
        })
        .map(|ip| ip.to_canonical())
}

// === impl IpBlock ===

impl IpBlock {
    /// Whether `ip` is in this block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let mask = mask(self.prefix_len, 32);
                u128::from(u32::from(ip)) & mask == u128::from(u32::from(network)) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let mask = mask(self.prefix_len, 128);
                u128::from(ip) & mask == u128::from(network) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpBlock {
    type Err = ();

    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address.
    fn from_str(text: &str) -> Result<IpBlock, ()> {
        let (address, prefix_len) = match text.trim().split_once('/') {
            Some((address, len)) => (address, Some(len.parse::<u8>().map_err(|_| ())?)),
            None => (text.trim(), None),
        };
        let network = address.parse::<IpAddr>().map_err(|_| ())?.to_canonical();
        let width = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len = prefix_len.unwrap_or(width);
        if prefix_len > width {
            return Err(());
        }
        Ok(IpBlock {
            network,
            prefix_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn forwarded(trusted: &[&str]) -> CitizenIpSource {
        CitizenIpSource::Header(ForwardedHeader {
            name: HeaderName::from_static("x-forwarded-for"),
            trusted_proxies: trusted.iter().map(|block| block.parse().unwrap()).collect(),
        })
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(value).unwrap());
        }
        headers
    }

    fn code(result: Result<CitizenIp, ApiError>) -> &'static str {
        result.unwrap_err().code()
    }

    #[test]
    fn ipv6_addresses_are_grouped_by_their_prefix() {
        let key = limit_key(ip("2001:db8:1:2:aaaa::1"), 64);
        assert_eq!(key, ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), 64), key);
        assert_ne!(limit_key(ip("2001:db8:1:3::1"), 64), key);
        assert_eq!(limit_key(ip("2001:db8:1:2::1"), 128), ip("2001:db8:1:2::1"));
        assert_eq!(limit_key(ip("2001:db8:1:2::1"), 48), ip("2001:db8:1::"));
        // IPv4, mapped or not, is one key per address.
        assert_eq!(limit_key(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(limit_key(ip("192.0.2.7"), 64), ip("192.0.2.7"));
    }

    #[test]
    fn the_optional_source_never_falls_back_to_another_address() {
        let source = CitizenIpSource::Optional;
        let none = HeaderMap::new();
        assert_eq!(
            source.resolve(Some(" 192.0.2.1 "), &none).unwrap(),
            CitizenIp::Address(ip("192.0.2.1"))
        );
        assert_eq!(source.resolve(None, &none).unwrap(), CitizenIp::Missing);
        assert_eq!(
            code(source.resolve(Some("nope"), &none)),
            "invalid_client_ip"
        );
    }

    #[test]
    fn the_body_source_requires_client_ip() {
        let none = HeaderMap::new();
        assert_eq!(
            code(CitizenIpSource::Body.resolve(None, &none)),
            "missing_client_ip"
        );
        assert_eq!(
            CitizenIpSource::None.resolve(None, &none).unwrap(),
            CitizenIp::Unlimited
        );
    }

    #[test]
    fn the_header_source_takes_the_right_most_untrusted_entry() {
        let source = forwarded(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        let resolve = |values: &[&str]| source.resolve(None, &headers(values));
        assert_eq!(
            resolve(&["198.51.100.9, 203.0.113.5, 10.1.2.3"]).unwrap(),
            CitizenIp::Address(ip("203.0.113.5"))
        );
        // Several lines are one list; ports and brackets are tolerated.
        assert_eq!(
            resolve(&["198.51.100.9", "[2001:db8::5]:443", "2001:db8:ffff::1"]).unwrap(),
            CitizenIp::Address(ip("2001:db8::5"))
        );
        assert_eq!(
            resolve(&["203.0.113.5:4711"]).unwrap(),
            CitizenIp::Address(ip("203.0.113.5"))
        );
        // Only proxies: the left-most.
        assert_eq!(
            resolve(&["10.0.0.1, 10.0.0.2"]).unwrap(),
            CitizenIp::Address(ip("10.0.0.1"))
        );
        assert_eq!(code(resolve(&[])), "missing_client_ip");
        assert_eq!(code(resolve(&["unknown, 10.0.0.1"])), "invalid_client_ip");
        // The body's client_ip does not stand in for the header.
        assert_eq!(
            code(source.resolve(Some("192.0.2.1"), &HeaderMap::new())),
            "missing_client_ip"
        );
    }

    #[test]
    fn blocks_parse_and_contain() {
        let block: IpBlock = "10.0.0.0/8".parse().unwrap();
        assert!(block.contains(ip("10.255.0.1")));
        assert!(block.contains(ip("::ffff:10.0.0.1")));
        assert!(!block.contains(ip("11.0.0.1")));
        assert!(!block.contains(ip("2001:db8::1")));
        let one: IpBlock = "192.0.2.1".parse().unwrap();
        assert!(one.contains(ip("192.0.2.1")));
        assert!(!one.contains(ip("192.0.2.2")));
        for bad in ["10.0.0.0/33", "2001:db8::/129", "10.0.0.0/x", "nope", ""] {
            assert!(bad.parse::<IpBlock>().is_err(), "{bad}");
        }
    }
}
