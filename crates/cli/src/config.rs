//! From the objects the cluster shows to the inputs of `wgmesh_core::export`. Pure.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::Result;
use ipnet::IpNet;
use kube::ResourceExt;
use wgmesh_api::condition::READY;
use wgmesh_api::{WireGuardMesh, WireGuardPeer};
use wgmesh_core::export::{ClientInput, NodePeer};
use wgmesh_core::{Cidr, Key, PrivateKey};

use crate::exit::{self, err};

/// Whether an object's Ready condition is True.
pub fn is_ready(peer: &WireGuardPeer) -> bool {
    ready_condition(peer).is_some_and(|c| c.status == "True")
}

pub fn ready_condition(peer: &WireGuardPeer) -> Option<&wgmesh_api::condition::Condition> {
    peer.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
}

pub fn tunnel_addresses(peer: &WireGuardPeer) -> Vec<IpAddr> {
    peer.status
        .as_ref()
        .map(|s| s.addresses.iter().filter_map(|a| a.parse().ok()).collect())
        .unwrap_or_default()
}

/// The programmed node peers of a mesh, by Node name. A node peer's `spec.allowedIPs` are its
/// tunnel addresses and pod CIDRs (the controller keeps them so).
pub fn node_peers(peers: &[WireGuardPeer]) -> BTreeMap<String, NodePeer> {
    peers
        .iter()
        .filter(|p| is_ready(p))
        .filter_map(|p| {
            let node = p.spec.node.as_ref()?.0.clone();
            Some((
                node.clone(),
                NodePeer {
                    node,
                    public_key: p.spec.public_key.parse().ok()?,
                    endpoint: p.spec.endpoint.as_ref().map(|e| e.0.clone()),
                    tunnel_addresses: tunnel_addresses(p),
                    pod_cidrs: p
                        .spec
                        .allowed_ips
                        .iter()
                        .filter_map(|c| Cidr::parse_masked(c.as_str()).ok())
                        .collect(),
                },
            ))
        })
        .collect()
}

/// The gateways (the active one first, then the mesh's order) and the interior nodes.
pub fn gateways_and_interior(
    mesh: &WireGuardMesh,
    peers: &[WireGuardPeer],
) -> (Vec<NodePeer>, Vec<NodePeer>) {
    let mut nodes = node_peers(peers);
    let status = mesh.status.clone().unwrap_or_default();
    let active = status
        .active_gateway
        .filter(|a| status.gateways.contains(a));
    let order = active.iter().chain(
        status
            .gateways
            .iter()
            .filter(|g| Some(*g) != active.as_ref()),
    );
    let gateways = order.filter_map(|g| nodes.remove(g)).collect();
    (gateways, nodes.into_values().collect())
}

/// Everything the external peer's config is made of.
pub fn client_input(
    mesh: &WireGuardMesh,
    peers: &[WireGuardPeer],
    peer: &WireGuardPeer,
    private_key: Option<PrivateKey>,
    preshared_key: Option<Key>,
) -> Result<ClientInput> {
    let (gateways, interior) = gateways_and_interior(mesh, peers);
    let client = peer.spec.client.clone().unwrap_or_else(|| {
        serde_json::from_value(serde_json::json!({})).expect("ClientSpec defaults")
    });
    let addresses: Vec<IpNet> = if client.addresses.is_empty() {
        tunnel_addresses(peer)
            .into_iter()
            .map(IpNet::from)
            .collect()
    } else {
        client
            .addresses
            .iter()
            .map(|a| a.as_str().parse::<IpNet>())
            .collect::<Result<_, _>>()
            .map_err(|e| err(exit::INVALID_INPUT, format!("spec.client.addresses: {e}")))?
    };
    if addresses.is_empty() {
        // A refused peer is given no address (it keeps one it held): say why it is refused.
        let why = match ready_condition(peer) {
            Some(c) if c.status == "False" => format!(
                ": it is not Ready ({}: {}); it gets one once it is programmed",
                c.reason, c.message
            ),
            _ => " yet (is the controller running?)".to_owned(),
        };
        return Err(err(
            exit::NOT_READY,
            format!(
                "WireGuardPeer {} has no tunnel address{why}",
                peer.name_any()
            ),
        ));
    }
    let client_allowed_ips = client
        .allowed_ips
        .iter()
        .map(|c| Cidr::parse_masked(c.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|e| err(exit::INVALID_INPUT, format!("spec.client.allowedIPs: {e}")))?;
    Ok(ClientInput {
        private_key,
        addresses,
        dns: client.dns.iter().map(|d| d.0.clone()).collect(),
        listen_port: client.listen_port.and_then(|p| u16::try_from(p).ok()),
        mtu: mesh.spec.mtu.and_then(|m| u16::try_from(m).ok()),
        gateways,
        interior,
        client_allowed_ips,
        endpoint_override: client.endpoint.map(|e| e.0),
        persistent_keepalive: client
            .persistent_keepalive
            .and_then(|k| u16::try_from(k).ok()),
        preshared_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgmesh_api::condition::Condition;
    use wgmesh_api::{
        WireGuardMeshSpec, WireGuardMeshStatus, WireGuardPeerSpec, WireGuardPeerStatus,
    };
    use wgmesh_core::PublicKey;

    fn key(n: u8) -> String {
        PublicKey::from_bytes([n; 32]).to_base64()
    }

    fn ready() -> Vec<Condition> {
        vec![Condition {
            type_: READY.into(),
            status: "True".into(),
            reason: wgmesh_api::condition::Reason::Programmed.as_str().into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::UNIX_EPOCH,
            ),
        }]
    }

    fn peer(name: &str, n: u8, node: Option<&str>, allowed: &[&str], ok: bool) -> WireGuardPeer {
        let mut spec: WireGuardPeerSpec = serde_json::from_value(serde_json::json!({
            "publicKey": key(n),
            "allowedIPs": allowed,
        }))
        .unwrap();
        spec.node = node.map(Into::into);
        if node.is_some() {
            spec.endpoint = Some(format!("192.168.0.{n}:51820").into());
        }
        let mut p = WireGuardPeer::new(name, spec);
        p.status = Some(WireGuardPeerStatus {
            addresses: vec![format!("10.250.0.{n}")],
            conditions: if ok { ready() } else { vec![] },
            ..Default::default()
        });
        p
    }

    #[test]
    fn gateways_follow_the_mesh_status_and_skip_unready_nodes() {
        let mut mesh = WireGuardMesh::new("default", WireGuardMeshSpec::default());
        mesh.status = Some(WireGuardMeshStatus {
            gateways: vec!["b".into(), "c".into()],
            ..Default::default()
        });
        let peers = vec![
            peer(
                "node-a",
                1,
                Some("a"),
                &["10.244.1.0/24", "10.250.0.1/32"],
                true,
            ),
            peer(
                "node-b",
                2,
                Some("b"),
                &["10.244.2.0/24", "10.250.0.2/32"],
                true,
            ),
            peer("node-c", 3, Some("c"), &["10.244.3.0/24"], false),
            peer("laptop", 9, None, &[], true),
        ];
        let (g, i) = gateways_and_interior(&mesh, &peers);
        assert_eq!(g.iter().map(|n| n.node.as_str()).collect::<Vec<_>>(), ["b"]);
        let mut failed_over = mesh.clone();
        failed_over.status = Some(WireGuardMeshStatus {
            gateways: vec!["a".into(), "b".into()],
            active_gateway: Some("b".into()),
            ..Default::default()
        });
        let (g2, i2) = gateways_and_interior(&failed_over, &peers);
        let names = |v: &[NodePeer]| v.iter().map(|n| n.node.clone()).collect::<Vec<_>>();
        assert_eq!(names(&g2), ["b", "a"], "the active gateway first");
        assert!(i2.is_empty());
        assert_eq!(i.iter().map(|n| n.node.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(g[0].endpoint.as_deref(), Some("192.168.0.2:51820"));

        let input = client_input(&mesh, &peers, &peers[3], None, None).unwrap();
        assert_eq!(input.addresses, ["10.250.0.9/32".parse::<IpNet>().unwrap()]);
        assert_eq!(
            input.client_allowed_ips.len(),
            2,
            "no client spec: the CRD default 0.0.0.0/0 and ::/0"
        );
    }
}
