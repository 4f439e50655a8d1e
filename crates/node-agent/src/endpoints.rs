//! Peers' endpoints as the device gets them: literal addresses as they are, DNS names
//! resolved by the agent (and judged once resolved), reused until they are due again.
//!
//! A name is looked up when its peer is new or has a new endpoint, when its last lookup
//! found nothing usable, and for every peer on the refresh timer (which follows a name
//! whose address changes). A change of the mesh (a node joining) does not look up the
//! names resolved already: that was one lookup per named peer per change on every node.
//! Without the timer (`--endpoint-refresh-seconds 0`) every change looks up every name.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use wgmesh_core::PublicKey;

/// Which peers' DNS names a reconciliation looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookups {
    /// Names without a usable answer yet: new peers, changed endpoints, failed lookups (a
    /// change of the mesh).
    New,
    /// Every name (the refresh timer).
    All,
}

/// What each peer's DNS endpoint resolved to last, by peer.
#[derive(Debug, Default)]
pub struct Resolutions(HashMap<PublicKey, Resolution>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The endpoint as the mesh names it (`host:port`).
    pub endpoint: String,
    /// What it resolved to; `None`: nothing usable.
    pub address: Option<SocketAddr>,
}

/// Whether a peer's DNS endpoint is looked up now rather than taken from `last`.
pub fn lookup_due(endpoint: &str, last: Option<&Resolution>, lookups: Lookups) -> bool {
    match last {
        Some(r) if r.endpoint == endpoint && r.address.is_some() => lookups == Lookups::All,
        _ => true,
    }
}

impl Resolutions {
    /// The endpoint of each of `peers` (key, endpoint as the mesh names it), in order. Due
    /// names are looked up all at once: one after another, a few unreachable names (the
    /// cluster's DNS may be behind tunnels not programmed yet) held every change for their
    /// timeouts added up. `before`: the address each peer that answers lately was last
    /// given, kept while its name still resolves to it.
    pub async fn endpoints(
        &mut self,
        peers: &[(PublicKey, Option<&str>)],
        lookups: Lookups,
        before: &HashMap<&PublicKey, SocketAddr>,
    ) -> Vec<Option<SocketAddr>> {
        let last = &self.0;
        let found = futures::future::join_all(peers.iter().map(|(key, endpoint)| async move {
            let endpoint = (*endpoint)?;
            let previous = last.get(key);
            if is_dns_endpoint(endpoint) && !lookup_due(endpoint, previous, lookups) {
                return previous.and_then(|r| r.address);
            }
            resolve(Some(endpoint), before.get(key).copied()).await
        }))
        .await;
        // Kept for the peers there are now, and only for names.
        self.0 = peers
            .iter()
            .zip(&found)
            .filter_map(|((key, endpoint), address)| {
                let endpoint = endpoint.filter(|e| is_dns_endpoint(e))?;
                Some((
                    *key,
                    Resolution {
                        endpoint: endpoint.to_owned(),
                        address: *address,
                    },
                ))
            })
            .collect();
        found
    }
}

/// An endpoint naming a host (resolved through DNS) rather than an address.
pub fn is_dns_endpoint(endpoint: &str) -> bool {
    endpoint.parse::<SocketAddr>().is_err()
}

/// How long a peer's DNS endpoint may take to resolve before the peer is programmed without
/// it (its packets then teach the device where it is).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);

/// `ip:port` or `[v6]:port` directly; `host:port` through the resolver. Unresolvable: none
/// (the peer is then answered wherever it comes from).
async fn resolve(endpoint: Option<&str>, before: Option<SocketAddr>) -> Option<SocketAddr> {
    let endpoint = endpoint?;
    if let Ok(addr) = endpoint.parse() {
        return Some(addr);
    }
    match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(endpoint)).await {
        Ok(Ok(addrs)) => {
            // The controller judges literal addresses; a name is judged here, once resolved:
            // whoever controls its DNS (or writes `0x7f000001`, which the resolver reads as
            // 127.0.0.1) must not point this host's handshakes at loopback, cloud metadata,
            // multicast or the unspecified address.
            let (usable, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
                addrs.partition(|a| forbidden_resolved_endpoint(a.ip()).is_none());
            if usable.is_empty()
                && let Some(a) = refused.first()
            {
                tracing::warn!(
                    endpoint,
                    address = %a.ip(),
                    range = forbidden_resolved_endpoint(a.ip()).unwrap_or_default(),
                    "a peer endpoint resolves only to addresses no handshake may go to; not using it"
                );
            }
            keep_or_first(&usable, before)
        }
        Ok(Err(e)) => {
            tracing::warn!(endpoint, error = %e, "cannot resolve a peer endpoint");
            None
        }
        Err(_) => {
            tracing::warn!(endpoint, "resolving a peer endpoint timed out");
            None
        }
    }
}

/// The address a name resolved to `before`, while it is still among `resolved`; else the
/// first (the resolver's order).
fn keep_or_first(resolved: &[SocketAddr], before: Option<SocketAddr>) -> Option<SocketAddr> {
    before
        .filter(|b| resolved.contains(b))
        .or_else(|| resolved.first().copied())
}

/// What a resolved endpoint address may not be ([`wgmesh_core::desired::fixed_reserved`]:
/// loopback, link-local and cloud metadata, multicast, unspecified...), described.
fn forbidden_resolved_endpoint(ip: std::net::IpAddr) -> Option<String> {
    wgmesh_core::desired::fixed_reserved()
        .into_iter()
        .find(|r| r.cidr.contains_addr(ip))
        .map(|r| format!("{} ({})", r.cidr, r.what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_resolving_to_loopback_or_metadata_is_not_used() {
        // The resolver reads these as addresses, without asking DNS.
        assert_eq!(
            resolve(Some("0x7f000001:22"), None).await,
            None,
            "127.0.0.1"
        );
        assert_eq!(
            resolve(Some("2852039166:80"), None).await,
            None,
            "169.254.169.254"
        );
        assert_eq!(resolve(Some("localhost:51820"), None).await, None);
        // Literal addresses are the controller's to judge; a usable one resolves.
        assert_eq!(
            resolve(Some("192.0.2.7:51820"), None).await,
            Some("192.0.2.7:51820".parse().unwrap())
        );
        assert!(forbidden_resolved_endpoint("203.0.113.9".parse().unwrap()).is_none());
        assert!(forbidden_resolved_endpoint("fe80::1".parse().unwrap()).is_some());
    }

    #[test]
    fn a_name_keeps_its_address_while_it_still_resolves_to_it() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let (x, y, z) = (
            a("192.0.2.1:51820"),
            a("192.0.2.2:51820"),
            a("[2001:db8::3]:51820"),
        );
        let cases: &[(&[SocketAddr], Option<SocketAddr>, Option<SocketAddr>)] = &[
            (&[x, y], None, Some(x)),
            // Round robin: the other order keeps what was chosen.
            (&[y, x], Some(x), Some(x)),
            (&[z, y, x], Some(y), Some(y)),
            // Gone from the answer: the first.
            (&[y, z], Some(x), Some(y)),
            (&[], Some(x), None),
        ];
        for (resolved, before, want) in cases {
            assert_eq!(
                keep_or_first(resolved, *before),
                *want,
                "{resolved:?} {before:?}"
            );
        }
    }

    #[test]
    fn when_a_name_is_looked_up() {
        let last = Resolution {
            endpoint: "gw.example.com:51820".into(),
            address: Some("192.0.2.1:51820".parse().unwrap()),
        };
        let failed = Resolution {
            address: None,
            ..last.clone()
        };
        let name = "gw.example.com:51820";
        let other = "gw2.example.com:51820";
        // (case, endpoint, last resolution, lookups, looked up)
        let cases: &[(&str, &str, Option<&Resolution>, Lookups, bool)] = &[
            ("a new peer", name, None, Lookups::New, true),
            ("a new endpoint", other, Some(&last), Lookups::New, true),
            (
                "a change of the mesh: the last answer",
                name,
                Some(&last),
                Lookups::New,
                false,
            ),
            ("the refresh", name, Some(&last), Lookups::All, true),
            (
                "a failed lookup, at a change",
                name,
                Some(&failed),
                Lookups::New,
                true,
            ),
            (
                "a failed lookup, at the refresh",
                name,
                Some(&failed),
                Lookups::All,
                true,
            ),
        ];
        for (case, endpoint, last, lookups, want) in cases {
            assert_eq!(lookup_due(endpoint, *last, *lookups), *want, "{case}");
        }
    }

    #[tokio::test]
    async fn names_are_kept_for_the_peers_there_are() {
        let (a, b, c) = (
            wgmesh_core::PrivateKey::from_bytes([1; 32]).public_key(),
            wgmesh_core::PrivateKey::from_bytes([2; 32]).public_key(),
            wgmesh_core::PrivateKey::from_bytes([3; 32]).public_key(),
        );
        let mut resolutions = Resolutions::default();
        let literal = "192.0.2.7:51820";
        // "localhost" resolves without DNS, to an address no handshake may go to: none.
        let peers = [(a, Some(literal)), (b, Some("localhost:51820")), (c, None)];
        let got = resolutions
            .endpoints(&peers, Lookups::New, &HashMap::new())
            .await;
        assert_eq!(got, vec![Some(literal.parse().unwrap()), None, None]);
        assert_eq!(
            resolutions.0.keys().collect::<Vec<_>>(),
            vec![&b],
            "names only"
        );
        // A name's last usable answer is used on a change of the mesh.
        let pinned: SocketAddr = "198.51.100.1:51820".parse().unwrap();
        resolutions.0.get_mut(&b).unwrap().address = Some(pinned);
        let got = resolutions
            .endpoints(&peers[1..2], Lookups::New, &HashMap::new())
            .await;
        assert_eq!(got, vec![Some(pinned)]);
        // Gone peers are forgotten.
        let _ = resolutions
            .endpoints(&peers[..1], Lookups::All, &HashMap::new())
            .await;
        assert!(resolutions.0.is_empty());
    }
}
