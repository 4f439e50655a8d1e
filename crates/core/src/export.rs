//! The wg-quick configs the mesh hands out: an external peer's own config (a laptop's, a
//! remote site's router's), and a node as a `[Peer]` for a remote site or another cluster.
//!
//! An external peer talks to the gateway nodes only ([`crate::desired`]): the config lists
//! every gateway as a peer, with that gateway's own networks (its tunnel addresses and pod
//! CIDRs) so those pods are reached straight through it, and sends everything else through the
//! first gateway: the interior (non-gateway) nodes' networks and the client's own allowed IPs
//! (the service CIDR, `0.0.0.0/0`, ...). The first gateway is the one interior nodes send
//! external traffic to, so both directions take the same path.

use std::collections::BTreeSet;

use ipnet::IpNet;

use crate::wgquick::{Interface, Peer, WgQuickConfig};
use crate::{Cidr, CidrSet, Key, PrivateKey, PublicKey};

/// A member node as the other side of a tunnel sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePeer {
    /// The Node's name.
    pub node: String,
    pub public_key: PublicKey,
    /// Where the node listens (`host:port`), if known.
    pub endpoint: Option<String>,
    /// The node's tunnel addresses.
    pub tunnel_addresses: Vec<std::net::IpAddr>,
    /// The node's pod CIDRs.
    pub pod_cidrs: Vec<Cidr>,
}

impl NodePeer {
    /// The networks that live behind this node: its tunnel addresses and pod CIDRs.
    pub fn networks(&self) -> Vec<Cidr> {
        let hosts = self.tunnel_addresses.iter().map(|a| Cidr::host(*a));
        CidrSet::new(hosts.chain(self.pod_cidrs.iter().copied()))
            .iter()
            .copied()
            .collect()
    }
}

/// Everything an external peer's config is made from.
#[derive(Debug, Clone, Default)]
pub struct ClientInput {
    /// The peer's private key; `None` renders a config without one (to be filled in).
    pub private_key: Option<PrivateKey>,
    /// Interface addresses (the peer's tunnel addresses unless it chose its own).
    pub addresses: Vec<IpNet>,
    pub dns: Vec<String>,
    pub listen_port: Option<u16>,
    pub mtu: Option<u16>,
    /// The gateways, in the mesh's order (the first carries everything else).
    pub gateways: Vec<NodePeer>,
    /// The other member nodes.
    pub interior: Vec<NodePeer>,
    /// What the client sends into the mesh beyond the nodes' networks.
    pub client_allowed_ips: Vec<Cidr>,
    /// Replaces the first gateway's endpoint (a public address in front of it).
    pub endpoint_override: Option<String>,
    pub persistent_keepalive: Option<u16>,
    pub preshared_key: Option<Key>,
}

/// Why no config can be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("the mesh has no gateway node to attach to")]
    NoGateway,
}

/// The external peer's wg-quick config.
pub fn client_config(input: &ClientInput) -> Result<WgQuickConfig, ExportError> {
    if input.gateways.is_empty() {
        return Err(ExportError::NoGateway);
    }
    let direct: Vec<Vec<Cidr>> = input.gateways.iter().map(NodePeer::networks).collect();
    // WireGuard gives an allowed IP listed on two peers to the last one: the first gateway
    // gets only what no other gateway lists exactly.
    let taken: BTreeSet<Cidr> = direct.iter().skip(1).flatten().copied().collect();
    let rest = input
        .interior
        .iter()
        .flat_map(NodePeer::networks)
        .chain(input.client_allowed_ips.iter().copied())
        .filter(|c| !taken.contains(c));

    let peers = input
        .gateways
        .iter()
        .zip(direct.iter())
        .enumerate()
        .map(|(i, (g, own))| {
            let allowed: Vec<Cidr> = if i == 0 {
                CidrSet::new(own.iter().copied().chain(rest.clone()))
                    .iter()
                    .copied()
                    .collect()
            } else {
                own.clone()
            };
            let endpoint = match (i, &input.endpoint_override) {
                (0, Some(e)) => Some(e.clone()),
                _ => g.endpoint.clone(),
            };
            Peer {
                public_key: g.public_key,
                preshared_key: input.preshared_key,
                allowed_ips: allowed,
                endpoint,
                persistent_keepalive: input.persistent_keepalive.filter(|k| *k > 0),
                comment: Some(format!("node {}", g.node)),
            }
        })
        .collect();
    Ok(WgQuickConfig {
        interface: Interface {
            private_key: input.private_key.clone(),
            addresses: input.addresses.clone(),
            listen_port: input.listen_port,
            dns: input.dns.clone(),
            mtu: input.mtu,
            ..Interface::default()
        },
        peers,
    })
}

/// A node as a `[Peer]` section for the other side: its key, endpoint, and the networks behind
/// it plus `extra_allowed_ips` (say, the rest of the cluster it can forward to).
pub fn node_as_peer(node: &NodePeer, extra_allowed_ips: &[Cidr], keepalive: Option<u16>) -> Peer {
    Peer {
        public_key: node.public_key,
        preshared_key: None,
        allowed_ips: CidrSet::new(
            node.networks()
                .into_iter()
                .chain(extra_allowed_ips.iter().copied()),
        )
        .iter()
        .copied()
        .collect(),
        endpoint: node.endpoint.clone(),
        persistent_keepalive: keepalive.filter(|k| *k > 0),
        comment: Some(format!("node {}", node.node)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wgquick::{parse, render};

    fn node(name: &str, n: u8, pods: &str) -> NodePeer {
        NodePeer {
            node: name.into(),
            public_key: PublicKey::from_bytes([n; 32]),
            endpoint: Some(format!("192.168.0.{n}:51820")),
            tunnel_addresses: vec![format!("10.250.0.{n}").parse().unwrap()],
            pod_cidrs: vec![pods.parse().unwrap()],
        }
    }

    fn strings(cidrs: &[Cidr]) -> Vec<String> {
        cidrs.iter().map(ToString::to_string).collect()
    }

    fn input(gateways: Vec<NodePeer>, interior: Vec<NodePeer>, client: &[&str]) -> ClientInput {
        ClientInput {
            private_key: Some(PrivateKey::from_bytes([9; 32])),
            addresses: vec!["10.250.1.5/32".parse().unwrap()],
            gateways,
            interior,
            client_allowed_ips: client.iter().map(|c| c.parse().unwrap()).collect(),
            persistent_keepalive: Some(25),
            ..ClientInput::default()
        }
    }

    #[test]
    fn gateway_table() {
        let a = node("a", 1, "10.244.1.0/24");
        let b = node("b", 2, "10.244.2.0/24");
        let c = node("c", 3, "10.244.3.0/24");
        // name, gateways, interior, client allowed IPs, expected allowed IPs per listed peer
        type Case<'a> = (
            &'a str,
            Vec<NodePeer>,
            Vec<NodePeer>,
            &'a [&'a str],
            Vec<Vec<&'a str>>,
        );
        let cases: Vec<Case> = vec![
            (
                "every node a gateway: each node's pods straight to it, the rest via the first",
                vec![a.clone(), b.clone(), c.clone()],
                vec![],
                &["10.96.0.0/16"],
                vec![
                    vec!["10.96.0.0/16", "10.244.1.0/24", "10.250.0.1/32"],
                    vec!["10.244.2.0/24", "10.250.0.2/32"],
                    vec!["10.244.3.0/24", "10.250.0.3/32"],
                ],
            ),
            (
                "one gateway: interior nodes' networks go through it",
                vec![b.clone()],
                vec![a.clone(), c.clone()],
                &[],
                vec![vec![
                    "10.244.1.0/24",
                    "10.244.2.0/24",
                    "10.244.3.0/24",
                    "10.250.0.1/32",
                    "10.250.0.2/32",
                    "10.250.0.3/32",
                ]],
            ),
            (
                "a default route on the first gateway, longer prefixes win on the others",
                vec![a.clone(), b.clone()],
                vec![c.clone()],
                &["0.0.0.0/0", "::/0"],
                vec![
                    vec![
                        "0.0.0.0/0",
                        "10.244.1.0/24",
                        "10.244.3.0/24",
                        "10.250.0.1/32",
                        "10.250.0.3/32",
                        "::/0",
                    ],
                    vec!["10.244.2.0/24", "10.250.0.2/32"],
                ],
            ),
            (
                "a client allowed IP that equals another gateway's network stays with it",
                vec![a.clone(), b.clone()],
                vec![],
                &["10.244.2.0/24"],
                vec![
                    vec!["10.244.1.0/24", "10.250.0.1/32"],
                    vec!["10.244.2.0/24", "10.250.0.2/32"],
                ],
            ),
        ];
        for (name, gateways, interior, client, want) in cases {
            let cfg = client_config(&input(gateways, interior, client)).unwrap();
            let got: Vec<Vec<String>> = cfg.peers.iter().map(|p| strings(&p.allowed_ips)).collect();
            assert_eq!(got, want, "{name}");
            // Whatever we render parses back to the same config.
            assert_eq!(parse(&render(&cfg)).unwrap(), cfg, "{name}: round trip");
        }
    }

    #[test]
    fn no_gateway_is_an_error() {
        let err = client_config(&input(vec![], vec![node("a", 1, "10.244.1.0/24")], &[]));
        assert_eq!(err.unwrap_err(), ExportError::NoGateway);
    }

    #[test]
    fn endpoint_override_keepalive_and_psk() {
        let mut i = input(
            vec![node("a", 1, "10.244.1.0/24"), node("b", 2, "10.244.2.0/24")],
            vec![],
            &[],
        );
        i.endpoint_override = Some("vpn.example.com:443".into());
        i.preshared_key = Some(Key::from_bytes([7; 32]));
        i.dns = vec!["10.96.0.10".into(), "cluster.local".into()];
        let cfg = client_config(&i).unwrap();
        assert_eq!(
            cfg.peers[0].endpoint.as_deref(),
            Some("vpn.example.com:443")
        );
        assert_eq!(cfg.peers[1].endpoint.as_deref(), Some("192.168.0.2:51820"));
        assert!(cfg.peers.iter().all(|p| p.persistent_keepalive == Some(25)));
        assert!(cfg.peers.iter().all(|p| p.preshared_key.is_some()));
        let text = render(&cfg);
        assert!(text.contains("DNS = 10.96.0.10, cluster.local"), "{text}");
        assert!(text.contains("# node a\n[Peer]"), "{text}");
        assert_eq!(parse(&text).unwrap(), cfg);
    }

    #[test]
    fn node_as_peer_lists_its_networks() {
        let p = node_as_peer(
            &node("a", 1, "10.244.1.0/24"),
            &["10.96.0.0/16".parse().unwrap()],
            Some(0),
        );
        assert_eq!(
            strings(&p.allowed_ips),
            ["10.96.0.0/16", "10.244.1.0/24", "10.250.0.1/32"]
        );
        assert_eq!(p.persistent_keepalive, None);
        let text = crate::wgquick::render_peer(&p);
        assert!(text.starts_with("# node a\n[Peer]\nPublicKey = "), "{text}");
    }
}
