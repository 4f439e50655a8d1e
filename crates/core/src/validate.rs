//! Validators shared by everything that takes names and endpoints from outside: the CLI's
//! flags, wg-quick files and the agents' gRPC requests. One definition each, so a value one
//! of them accepts is not refused by another.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// A Kubernetes object name (RFC 1123 subdomain), what Node, mesh and peer names must be:
/// the API server's own rule (`[a-z0-9]([-a-z0-9]*[a-z0-9])?` labels joined by dots, at most
/// 253 bytes; unlike a host name, a label may be longer than 63).
pub fn is_object_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.split('.')
            .all(|label| !label.is_empty() && !label.starts_with('-') && !label.ends_with('-'))
}

/// A host name as resolvers take it: labels of 1-63 letters, digits, `-` or `_` (SRV-style
/// names exist in the wild), at most 253 bytes, an optional trailing dot.
pub fn is_host_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A WireGuard endpoint: `ipv4:port`, `host.name:port` or `[ipv6]:port` (with an optional
/// `%zone`), port 1-65535. The error says what is wrong, quoting the input.
pub fn check_endpoint(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("empty Endpoint: expected host:port".to_owned());
    }
    let port = if let Some(rest) = s.strip_prefix('[') {
        let Some((addr, after)) = rest.split_once(']') else {
            return Err(format!("invalid Endpoint {}: unclosed '['", show(s)));
        };
        let Some(port) = after.strip_prefix(':') else {
            return Err(format!(
                "Endpoint {} has no port: expected [address]:port",
                show(s)
            ));
        };
        let (ip, zone) = match addr.split_once('%') {
            Some((ip, zone)) => (ip, Some(zone)),
            None => (addr, None),
        };
        let zone_ok = zone.is_none_or(|z| !z.is_empty() && z.bytes().all(is_name_byte));
        if ip.parse::<Ipv6Addr>().is_err() || !zone_ok {
            return Err(format!(
                "invalid Endpoint {}: {} is not an IPv6 address",
                show(s),
                show(addr)
            ));
        }
        port
    } else {
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(format!(
                "Endpoint {} has no port: expected host:port",
                show(s)
            ));
        };
        if host.contains(':') {
            return Err(format!(
                "invalid Endpoint {}: an IPv6 endpoint is written [address]:port",
                show(s)
            ));
        }
        // Digits and dots are an IPv4 address or a mistake, never a host name.
        let host_ok = if looks_numeric(host) {
            host.parse::<Ipv4Addr>().is_ok()
        } else {
            is_host_name(host)
        };
        if !host_ok {
            return Err(format!(
                "invalid Endpoint {}: {} is not an IP address or host name",
                show(s),
                show(host)
            ));
        }
        port
    };
    // At most five digits, as the CRD's rule reads it: `065535` is refused there too.
    match parse_digits::<u16>(port).filter(|_| port.len() <= 5) {
        Some(p) if p != 0 => Ok(()),
        _ => Err(format!(
            "invalid Endpoint {}: port {} is not 1-65535",
            show(s),
            show(port)
        )),
    }
}

/// The longest endpoint a `WireGuardPeer` may name: a 253-byte host name and `:65535`, or a
/// bracketed IPv6 address and its port (the CRD's `maxLength`).
pub const MAX_MESH_ENDPOINT_LEN: usize = 261;

/// An endpoint the mesh publishes to its agents (a `WireGuardPeer`'s `spec.endpoint`, a node's
/// endpoint): what [`check_endpoint`] takes, narrowed to what the CRD accepts and what means
/// the same on every node. An IPv4 address, `[IPv6]` without a zone (a zone names an
/// interface of one host), or a DNS name of RFC 1123 labels (letters, digits and inner
/// hyphens, 1-63 bytes each, no trailing dot), then `:port`.
///
/// Agents refuse a whole stream message with an endpoint [`check_endpoint`] refuses, so the
/// controller publishes nothing this refuses: one peer's typo must not stop every gateway.
pub fn check_mesh_endpoint(s: &str) -> Result<(), String> {
    check_endpoint(s)?;
    if s.len() > MAX_MESH_ENDPOINT_LEN {
        return Err(format!(
            "invalid Endpoint {}: longer than {MAX_MESH_ENDPOINT_LEN} bytes",
            show(s)
        ));
    }
    // `check_endpoint` took it, so there is a ':' before the port.
    let host = s.rsplit_once(':').map_or(s, |(host, _)| host);
    if let Some(addr) = host.strip_prefix('[') {
        if addr.contains('%') {
            return Err(format!(
                "invalid Endpoint {}: an IPv6 zone names an interface of one host, not an \
                 address other nodes can reach",
                show(s)
            ));
        }
        return Ok(());
    }
    if looks_numeric(host) || is_dns_name(host) {
        return Ok(());
    }
    Err(format!(
        "invalid Endpoint {}: {} is not an IP address or DNS name (labels of letters, digits \
         and inner hyphens)",
        show(s),
        show(host)
    ))
}

/// An RFC 1123 DNS name: labels of 1-63 letters, digits and hyphens, neither first nor last
/// a hyphen, at most 253 bytes, no trailing dot.
fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// An endpoint whose port may be left out (the peer's listen port is then used): anything
/// [`check_endpoint`] takes, or a bare IPv4 or IPv6 address or host name. Returns the host
/// (an IPv6 address without brackets) and the port if given.
pub fn parse_endpoint_host(s: &str) -> Result<(String, Option<u16>), String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok((ip.to_string(), None));
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']'))
        && let Ok(ip) = inner.parse::<Ipv6Addr>()
    {
        return Ok((ip.to_string(), None));
    }
    if s.is_empty() {
        return Err(
            "empty endpoint: expected an address or host name, and an optional port".into(),
        );
    }
    if !s.contains(':') {
        if !looks_numeric(s) && is_dns_name(s) {
            return Ok((s.to_owned(), None));
        }
        return Err(format!(
            "invalid endpoint {}: not an IP address or host name",
            show(s)
        ));
    }
    check_mesh_endpoint(s)?;
    let (host, port) = s.rsplit_once(':').expect("a checked endpoint has a port");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = parse_digits::<u16>(port).expect("a checked endpoint's port is a number");
    Ok((host.to_owned(), Some(port)))
}

/// A byte of a name the kernel knows a thing by: an interface (an IPv6 zone) or a routing table.
pub(crate) fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.'
}

/// Looks like an attempt at an IPv4 address (digits and dots only).
pub(crate) fn looks_numeric(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// Unsigned decimal digits only (`str::parse` would also take a leading `+`).
pub(crate) fn parse_digits<T: FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Quotes a piece of input for an error message, cut short if long.
pub(crate) fn show(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_port_has_at_most_five_digits_as_the_crd_says() {
        assert!(check_endpoint("node:51820").is_ok());
        assert!(check_endpoint("node:05182").is_ok());
        let e = check_endpoint("node:065535").unwrap_err();
        assert!(e.contains("not 1-65535"), "{e}");
    }

    #[test]
    fn endpoint_hosts_with_and_without_port() {
        type Want<'a> = Result<(&'a str, Option<u16>), &'a str>;
        let cases: &[(&str, Want)] = &[
            ("192.0.2.7", Ok(("192.0.2.7", None))),
            ("192.0.2.7:51821", Ok(("192.0.2.7", Some(51821)))),
            ("fd00::7", Ok(("fd00::7", None))),
            ("[fd00::7]", Ok(("fd00::7", None))),
            ("[fd00::7]:51821", Ok(("fd00::7", Some(51821)))),
            ("node-1.example.com", Ok(("node-1.example.com", None))),
            (
                " node-1.example.com:4500 ",
                Ok(("node-1.example.com", Some(4500))),
            ),
            ("", Err("empty")),
            ("192.0.2", Err("not an IP address or host name")),
            ("node:0", Err("not 1-65535")),
            ("fd00::7:51820:x", Err("an IPv6 endpoint is written")),
            ("bad name!", Err("not an IP address or host name")),
            ("[fd00::7", Err("unclosed")),
            ("[fe80::1%eth0]:51820", Err("zone")),
            ("[fe80::1%eth0]", Err("no port")),
            ("fe80::1%eth0", Err("an IPv6 endpoint is written")),
            ("_srv.example.com", Err("not an IP address or host name")),
            ("a..b:51820", Err("not an IP address or host name")),
            (
                "_srv.example.com:51820",
                Err("not an IP address or DNS name"),
            ),
        ];
        for (input, want) in cases {
            let got = parse_endpoint_host(input);
            match (want, &got) {
                (Ok((host, port)), Ok((h, p))) => {
                    assert_eq!((h.as_str(), *p), (*host, *port), "{input:?}")
                }
                (Err(part), Err(e)) => assert!(e.contains(part), "{input:?}: {e}"),
                _ => panic!("{input:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[derive(Clone, Copy)]
    enum Kind {
        ObjectName,
        HostName,
        Endpoint,
        MeshEndpoint,
    }
    use Kind::*;

    fn accepts(kind: Kind, s: &str) -> bool {
        match kind {
            ObjectName => is_object_name(s),
            HostName => is_host_name(s),
            Endpoint => check_endpoint(s).is_ok(),
            MeshEndpoint => check_mesh_endpoint(s).is_ok(),
        }
    }

    #[test]
    fn validator_table() {
        let long_label = "a".repeat(64);
        let long_name = "a".repeat(253);
        let too_long_name = "a".repeat(254);
        let cases: &[(Kind, &str, bool)] = &[
            (ObjectName, "worker-1", true),
            (ObjectName, "node.example.com", true),
            (ObjectName, "a", true),
            (ObjectName, &long_label, true),
            (ObjectName, &long_name, true),
            (ObjectName, &too_long_name, false),
            (ObjectName, "", false),
            (ObjectName, "Worker", false),
            (ObjectName, "-worker", false),
            (ObjectName, "worker-", false),
            (ObjectName, "a..b", false),
            (ObjectName, "a.", false),
            (ObjectName, "a_b", false),
            (ObjectName, "../etc", false),
            (ObjectName, "a\nb", false),
            (HostName, "vpn.example.com", true),
            (HostName, "vpn.example.com.", true),
            (HostName, "_srv.Example.com", true),
            (HostName, &long_label, false),
            (HostName, "", false),
            (HostName, ".", false),
            (HostName, "a..b", false),
            (HostName, "a b", false),
            (MeshEndpoint, "203.0.113.10:51820", true),
            (MeshEndpoint, "vpn.example.com:51820", true),
            (MeshEndpoint, "[fd00::1]:51820", true),
            (MeshEndpoint, "[::ffff:192.0.2.1]:51820", true),
            (MeshEndpoint, "a-1.b:1", true),
            (
                MeshEndpoint,
                &format!("{long_label}.example.com:51820"),
                false,
            ),
            (MeshEndpoint, &format!("{}:51820", "a".repeat(63)), true),
            (MeshEndpoint, "a..b:51820", false),
            (MeshEndpoint, "[fe80::1%eth0]:51820", false),
            (MeshEndpoint, "[192.0.2.1]:51820", false),
            (MeshEndpoint, "_srv.example.com:51820", false),
            (MeshEndpoint, "vpn.example.com.:51820", false),
            (MeshEndpoint, "-vpn.example.com:51820", false),
            (MeshEndpoint, "vpn-.example.com:51820", false),
            (MeshEndpoint, "300.1.1.1:51820", false),
            (MeshEndpoint, "host:0", false),
            (MeshEndpoint, "", false),
            (
                MeshEndpoint,
                &format!("{}:51820", "a.".repeat(127) + "a"),
                false,
            ),
            (Endpoint, "203.0.113.10:51820", true),
            (Endpoint, "vpn.example.com:51820", true),
            (Endpoint, "[fd00::1]:51820", true),
            (Endpoint, "[fe80::1%eth0]:51820", true),
            (Endpoint, "localhost:1", true),
            (Endpoint, "", false),
            (Endpoint, "no-port", false),
            (Endpoint, "fd00::1:51820", false),
            (Endpoint, "[fd00::1]", false),
            (Endpoint, "[fd00::1:51820", false),
            (Endpoint, "[not-v6]:51820", false),
            (Endpoint, "[fe80::1%]:51820", false),
            (Endpoint, "300.1.1.1:51820", false),
            (Endpoint, "host:0", false),
            (Endpoint, "host:65536", false),
            (Endpoint, "host:+1", false),
            (Endpoint, ":51820", false),
            (Endpoint, "a b:51820", false),
        ];
        for &(kind, s, want) in cases {
            assert_eq!(accepts(kind, s), want, "{s:?}");
        }
    }

    #[test]
    fn endpoint_errors_quote_the_input_cut_short() {
        let long = format!("{}:0", "a".repeat(100));
        let e = check_endpoint(&long).unwrap_err();
        assert!(e.contains("...") && e.len() < 200, "{e}");
    }
}
