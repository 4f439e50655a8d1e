//! Kubernetes objects to the domain inputs of `wgmesh_core::desired`, and back to what the
//! API shows. Everything here is pure.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use wgmesh_api::{WireGuardMesh, WireGuardPeer, mesh::SecretKeyRef};
use wgmesh_core::Cidr;
use wgmesh_core::desired::{MeshInput, NodeInput, PeerInput, ReservedRange, SecretInput};

/// Secret values the controller has looked up, by reference.
pub type Secrets = BTreeMap<SecretKeyRef, SecretInput>;

/// The mesh-level input of a `WireGuardMesh`; `reserved` are the cluster's ranges no peer may
/// claim (Service CIDRs, the API server), beyond the fixed ones and the nodes' addresses.
pub fn mesh_input(
    mesh: &WireGuardMesh,
    secrets: &Secrets,
    reserved: &[ReservedRange],
) -> MeshInput {
    let spec = &mesh.spec;
    MeshInput {
        name: mesh.name_any(),
        // The CRD schema has validated the CIDRs; anything unparseable is skipped.
        tunnel_pools: spec
            .tunnel_cidrs
            .iter()
            .filter_map(|c| Cidr::parse_masked(c.as_str()).ok())
            .collect(),
        persistent_keepalive: clamp_u16(spec.persistent_keepalive),
        preshared_key: spec.preshared_key.as_ref().map(|r| secret(r, secrets)),
        reserved: reserved.to_vec(),
    }
}

/// The node-level input of a Node for a mesh.
pub fn node_input(node: &Node, mesh: &WireGuardMesh) -> NodeInput {
    NodeInput {
        name: node.name_any(),
        uid: node.metadata.uid.clone().unwrap_or_default(),
        addresses: node_addresses(node),
        selected: selector_matches(mesh.spec.node_selector.as_ref(), node.labels()),
        pod_cidrs: pod_cidrs(node),
        rotate_key_request: node.annotations().get(ROTATE_KEY_ANNOTATION).cloned(),
        gateway: selector_matches(mesh.spec.gateway_selector.as_ref(), node.labels()),
    }
}

/// A Node annotation asking the node's agent for a new key; change its value to rotate again.
pub const ROTATE_KEY_ANNOTATION: &str = "wgmesh.io/rotate-key";

/// `spec.podCIDRs`, falling back to the older single `spec.podCIDR`.
pub fn pod_cidrs(node: &Node) -> Vec<Cidr> {
    let Some(spec) = &node.spec else {
        return Vec::new();
    };
    let list: Vec<&String> = match (&spec.pod_cidrs, &spec.pod_cidr) {
        (Some(many), _) if !many.is_empty() => many.iter().collect(),
        (_, Some(one)) => vec![one],
        _ => Vec::new(),
    };
    list.into_iter()
        .filter_map(|c| Cidr::parse_masked(c).ok())
        .collect()
}

/// The node's addresses, InternalIP first, for the endpoint when the agent names none.
pub fn node_addresses(node: &Node) -> Vec<IpAddr> {
    let mut addrs: Vec<(u8, IpAddr)> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let rank = match a.type_.as_str() {
                "InternalIP" => 0,
                "ExternalIP" => 1,
                _ => return None,
            };
            a.address.parse().ok().map(|ip| (rank, ip))
        })
        .collect();
    addrs.sort_by_key(|(rank, _)| *rank);
    addrs.into_iter().map(|(_, ip)| ip).collect()
}

/// The peer-level input of a `WireGuardPeer`, or why it cannot be used at all.
pub fn peer_input(
    peer: &WireGuardPeer,
    secrets: &Secrets,
    seniority: u64,
) -> Result<PeerInput, String> {
    let spec = &peer.spec;
    let public_key = spec
        .public_key
        .parse()
        .map_err(|e| format!("spec.publicKey: {e}"))?;
    let allowed_ips = spec
        .allowed_ips
        .iter()
        .map(|c| Cidr::parse_masked(c.as_str()).map_err(|e| format!("spec.allowedIPs: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let status = peer.status.as_ref();
    Ok(PeerInput {
        name: peer.name_any(),
        created: peer
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(i64::MAX),
        previously_programmed: is_programmed(peer),
        seniority,
        public_key,
        allowed_ips,
        endpoint: spec.endpoint.as_ref().map(|e| e.0.clone()),
        last_seen_endpoint: status.and_then(|s| s.endpoint.clone()),
        persistent_keepalive: spec.persistent_keepalive.map(|k| clamp_u16(Some(k))),
        preshared_key: spec
            .preshared_key_secret_ref
            .as_ref()
            .map(|r| secret(r, secrets)),
        responder: spec.responder,
        disabled: spec.disabled,
        node: spec.node.as_ref().map(|n| n.0.clone()),
        node_owner_uid: node_owner_uid(peer),
        tunnel_addresses: status
            .map(|s| s.addresses.iter().filter_map(|a| a.parse().ok()).collect())
            .unwrap_or_default(),
    })
}

/// Whether the peer was programmed when last judged (its `Ready` condition is `True`).
pub fn is_programmed(peer: &WireGuardPeer) -> bool {
    peer.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == wgmesh_api::condition::READY && c.status == "True")
    })
}

/// The UID of the Node that owns a node peer: its ownerReference to the Node its `spec.node`
/// names (the controller sets it on the peers it creates).
pub fn node_owner_uid(peer: &WireGuardPeer) -> Option<String> {
    let node = peer.spec.node.as_ref()?;
    peer.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.api_version == "v1" && o.kind == "Node" && o.name == node.0)
        .map(|o| o.uid.clone())
}

/// Whether `peer` is the controller's own peer of `node`: the only kind the controller keeps
/// in sync with its Node (and deletes when the Node leaves).
pub fn is_owned_node_peer(peer: &WireGuardPeer, node: Option<&Node>) -> bool {
    match (
        node_owner_uid(peer),
        node.and_then(|n| n.metadata.uid.as_deref()),
    ) {
        (Some(owner), Some(uid)) => owner == uid,
        // The Node is gone: a peer that was owned by a Node of that name is ours to clean.
        (Some(_), None) => true,
        (None, _) => false,
    }
}

fn secret(reference: &SecretKeyRef, secrets: &Secrets) -> SecretInput {
    secrets.get(reference).cloned().unwrap_or_else(|| {
        SecretInput::Missing(format!(
            "Secret {}/{} (key {}) has not been read yet",
            reference.namespace, reference.name.0, reference.key
        ))
    })
}

fn clamp_u16(v: Option<i32>) -> u16 {
    v.unwrap_or(0).clamp(0, i32::from(u16::MAX)) as u16
}

/// Whether `labels` match a Kubernetes label selector; no selector matches everything.
pub fn selector_matches(
    selector: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> bool {
    let Some(selector) = selector else {
        return true;
    };
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            // An unknown operator selects nothing rather than everything.
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(list: &[(&str, &str)]) -> BTreeMap<String, String> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn selector_table() {
        let edge = labels(&[("wgmesh.io/edge", "true"), ("zone", "a")]);
        let plain = labels(&[("zone", "b")]);
        let by_label = LabelSelector {
            match_labels: Some(labels(&[("wgmesh.io/edge", "true")])),
            match_expressions: None,
        };
        type Case<'a> = (
            &'a str,
            Option<LabelSelector>,
            &'a BTreeMap<String, String>,
            bool,
        );
        let cases: Vec<Case> = vec![
            ("no selector", None, &plain, true),
            (
                "empty selector",
                Some(LabelSelector::default()),
                &plain,
                true,
            ),
            ("matchLabels hit", Some(by_label.clone()), &edge, true),
            ("matchLabels miss", Some(by_label), &plain, false),
            (
                "In",
                Some(LabelSelector {
                    match_expressions: Some(vec![expr("zone", "In", &["a", "c"])]),
                    ..Default::default()
                }),
                &edge,
                true,
            ),
            (
                "NotIn",
                Some(LabelSelector {
                    match_expressions: Some(vec![expr("zone", "NotIn", &["a"])]),
                    ..Default::default()
                }),
                &edge,
                false,
            ),
            (
                "Exists",
                Some(LabelSelector {
                    match_expressions: Some(vec![expr("wgmesh.io/edge", "Exists", &[])]),
                    ..Default::default()
                }),
                &plain,
                false,
            ),
            (
                "DoesNotExist",
                Some(LabelSelector {
                    match_expressions: Some(vec![expr("wgmesh.io/edge", "DoesNotExist", &[])]),
                    ..Default::default()
                }),
                &plain,
                true,
            ),
            (
                "unknown operator",
                Some(LabelSelector {
                    match_expressions: Some(vec![expr("zone", "Near", &["a"])]),
                    ..Default::default()
                }),
                &edge,
                false,
            ),
        ];
        for (name, selector, labels, want) in cases {
            assert_eq!(selector_matches(selector.as_ref(), labels), want, "{name}");
        }
    }
}
