//! Kubernetes objects to the domain inputs of `wgmesh_core::desired`, and back to what the
//! API shows. Everything here is pure.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::ResourceExt;
use wgmesh_api::foreign::{CalicoIpamBlock, CiliumNode};
use wgmesh_api::{PodCidrSource, WireGuardMesh, WireGuardPeer, mesh::SecretKeyRef};
use wgmesh_core::Cidr;
use wgmesh_core::desired::{
    MeshInput, NodeEndpoint, NodeInput, PeerInput, ReservedRange, SecretInput,
};

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
        active_gateway: mesh.status.as_ref().and_then(|s| s.active_gateway.clone()),
        host_encryption: spec.encrypts_hosts(),
        marks_tunnel_packets: spec.fwmark.is_some(),
    }
}

/// The node-level input of a Node for a mesh; `foreign` holds the pod CIDRs other IPAMs
/// assigned, for meshes that read them.
pub fn node_input(node: &Node, mesh: &WireGuardMesh, foreign: &ForeignPodCidrs) -> NodeInput {
    NodeInput {
        name: node.name_any(),
        uid: node.metadata.uid.clone().unwrap_or_default(),
        addresses: node_addresses(node),
        host_addresses: node_addresses_of_type(node, "InternalIP"),
        selected: selector_matches(mesh.spec.node_selector.as_ref(), node.labels()),
        pod_cidrs: pod_cidrs(node, mesh.spec.pod_cidr_source, foreign),
        rotate_key_request: node.annotations().get(ROTATE_KEY_ANNOTATION).cloned(),
        gateway: selector_matches(mesh.spec.gateway_selector.as_ref(), node.labels()),
        endpoint: node_endpoint_choice(node, mesh),
        behind_nat: behind_nat(node),
    }
}

/// A Node annotation saying the node is behind NAT (`"true"`): the mesh publishes it at the
/// endpoint the relay observed and relays between it and the other nodes behind NAT. Its
/// own kubelet may set it; it changes only how that node is reached.
pub const BEHIND_NAT_ANNOTATION: &str = "wgmesh.io/behind-nat";

/// Whether the Node says it is behind NAT; any value but `true` means no.
pub fn behind_nat(node: &Node) -> bool {
    node.annotations()
        .get(BEHIND_NAT_ANNOTATION)
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// A Node annotation overriding where the other members reach the node: an address or a
/// DNS name, optionally with `:port` (`[v6]:port` for an IPv6 address with a port).
pub const ENDPOINT_ANNOTATION: &str = "wgmesh.io/endpoint";

/// The endpoint a node's agent registered, kept on its node peer: `spec.endpoint` shows the
/// endpoint the mesh chose, which may differ (an override, an address type preference).
pub const REGISTERED_ENDPOINT_ANNOTATION: &str = "wgmesh.io/registered-endpoint";

/// The endpoint a node peer's agent last registered ([`REGISTERED_ENDPOINT_ANNOTATION`]).
pub fn registered_endpoint(peer: &WireGuardPeer) -> Option<&str> {
    peer.annotations()
        .get(REGISTERED_ENDPOINT_ANNOTATION)
        .map(String::as_str)
}

/// Where the other members reach a node: the Node's endpoint annotation, else its first
/// address of the mesh's preferred types, else what its agent registered. An annotation that
/// does not parse is ignored with a warning.
pub fn node_endpoint_choice(node: &Node, mesh: &WireGuardMesh) -> NodeEndpoint {
    if let Some(value) = node.annotations().get(ENDPOINT_ANNOTATION) {
        match wgmesh_core::validate::parse_endpoint_host(value) {
            Ok((host, port)) => return NodeEndpoint::Named { host, port },
            Err(e) => {
                tracing::warn!(node = %node.name_any(), annotation = ENDPOINT_ANNOTATION, error = %e, "ignoring the endpoint annotation");
            }
        }
    }
    let addresses = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    mesh.spec
        .endpoint_address_types
        .iter()
        .find_map(|wanted| {
            addresses
                .iter()
                .filter(|a| a.type_ == wanted.as_str())
                .find_map(|a| a.address.parse().ok())
        })
        .map(NodeEndpoint::Address)
        .unwrap_or_default()
}

/// A Node annotation asking the node's agent for a new key; change its value to rotate again.
pub const ROTATE_KEY_ANNOTATION: &str = "wgmesh.io/rotate-key";

/// A Node annotation naming the node's pod CIDRs, separated by commas, for meshes with
/// `podCIDRSource: annotation` (an IPAM that records them nowhere else).
pub const POD_CIDRS_ANNOTATION: &str = "wgmesh.io/pod-cidrs";

/// The pod CIDRs Calico and Cilium assigned, by node name, read from their objects once per
/// computation.
#[derive(Debug, Default)]
pub struct ForeignPodCidrs {
    pub calico: BTreeMap<String, Vec<Cidr>>,
    pub cilium: BTreeMap<String, Vec<Cidr>>,
}

/// A node's pod CIDRs from the mesh's source, in a stable order. Entries that do not parse
/// are left out with a warning: no schema guards an annotation or another project's object,
/// and the desired mesh still judges what is left (overlaps, reserved ranges).
pub fn pod_cidrs(node: &Node, source: PodCidrSource, foreign: &ForeignPodCidrs) -> Vec<Cidr> {
    let name = node.name_any();
    let mut cidrs = match source {
        PodCidrSource::Node => node_spec_pod_cidrs(node),
        PodCidrSource::Annotation => node
            .annotations()
            .get(POD_CIDRS_ANNOTATION)
            .map(|list| parse_cidr_list(&name, POD_CIDRS_ANNOTATION, list.split(',')))
            .unwrap_or_default(),
        PodCidrSource::Calico => foreign.calico.get(&name).cloned().unwrap_or_default(),
        PodCidrSource::Cilium => foreign.cilium.get(&name).cloned().unwrap_or_default(),
    };
    cidrs.sort();
    cidrs.dedup();
    cidrs
}

/// `spec.podCIDRs`, falling back to the older single `spec.podCIDR`.
fn node_spec_pod_cidrs(node: &Node) -> Vec<Cidr> {
    let Some(spec) = &node.spec else {
        return Vec::new();
    };
    let list: Vec<&String> = match (&spec.pod_cidrs, &spec.pod_cidr) {
        (Some(many), _) if !many.is_empty() => many.iter().collect(),
        (_, Some(one)) => vec![one],
        _ => Vec::new(),
    };
    parse_cidr_list(
        &node.name_any(),
        "spec.podCIDRs",
        list.into_iter().map(String::as_str),
    )
}

fn parse_cidr_list<'a>(
    node: &str,
    field: &str,
    list: impl IntoIterator<Item = &'a str>,
) -> Vec<Cidr> {
    list.into_iter()
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .filter_map(|c| match Cidr::parse_masked(c) {
            Ok(cidr) => Some(cidr),
            Err(e) => {
                tracing::warn!(node, field, cidr = c, error = %e, "ignoring a pod CIDR that does not parse");
                None
            }
        })
        .collect()
}

/// The networks of Calico's IPAM blocks by the node they are affine to. Blocks being
/// released (`deleted`) and blocks without a host affinity (`virtual:`, none) belong to no
/// node.
pub fn calico_pod_cidrs<'a>(
    blocks: impl IntoIterator<Item = &'a CalicoIpamBlock>,
) -> BTreeMap<String, Vec<Cidr>> {
    let mut by_node: BTreeMap<String, Vec<Cidr>> = BTreeMap::new();
    for block in blocks {
        let spec = &block.spec;
        let Some(node) = spec
            .affinity
            .as_deref()
            .and_then(|a| a.strip_prefix("host:"))
        else {
            continue;
        };
        if spec.deleted || node.is_empty() {
            continue;
        }
        by_node
            .entry(node.to_owned())
            .or_default()
            .extend(parse_cidr_list(
                node,
                "IPAMBlock spec.cidr",
                [spec.cidr.as_str()],
            ));
    }
    by_node
}

/// The pod CIDRs of Cilium's per-node objects, by node name (a `CiliumNode` is named as its
/// Node).
pub fn cilium_pod_cidrs<'a>(
    nodes: impl IntoIterator<Item = &'a CiliumNode>,
) -> BTreeMap<String, Vec<Cidr>> {
    nodes
        .into_iter()
        .map(|n| {
            let name = n.name_any();
            let cidrs = parse_cidr_list(
                &name,
                "CiliumNode spec.ipam.podCIDRs",
                n.spec.ipam.pod_cidrs.iter().map(String::as_str),
            );
            (name, cidrs)
        })
        .filter(|(_, cidrs)| !cidrs.is_empty())
        .collect()
}

/// The node's addresses of one type (`InternalIP`, `ExternalIP`), in the Node's order.
pub fn node_addresses_of_type(node: &Node, type_: &str) -> Vec<IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == type_)
        .filter_map(|a| a.address.parse().ok())
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
        // A node peer: what its agent registered; the desired mesh decides what to publish.
        endpoint: match &spec.node {
            Some(_) => registered_endpoint(peer)
                .map(str::to_owned)
                .or_else(|| spec.endpoint.as_ref().map(|e| e.0.clone())),
            None => spec.endpoint.as_ref().map(|e| e.0.clone()),
        },
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

    fn node(name: &str, spec_cidrs: &[&str], annotation: Option<&str>) -> Node {
        let mut node = Node::default();
        node.metadata.name = Some(name.into());
        if let Some(a) = annotation {
            node.metadata.annotations = Some(labels(&[(POD_CIDRS_ANNOTATION, a)]));
        }
        node.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            pod_cidrs: Some(spec_cidrs.iter().map(|c| c.to_string()).collect()),
            ..Default::default()
        });
        node
    }

    fn block(cidr: &str, affinity: Option<&str>, deleted: bool) -> CalicoIpamBlock {
        CalicoIpamBlock {
            spec: wgmesh_api::foreign::CalicoIpamBlockSpec {
                cidr: cidr.into(),
                affinity: affinity.map(Into::into),
                deleted,
            },
            ..Default::default()
        }
    }

    fn cilium(name: &str, cidrs: &[&str]) -> CiliumNode {
        let mut n = CiliumNode::default();
        n.metadata.name = Some(name.into());
        n.spec.ipam.pod_cidrs = cidrs.iter().map(|c| c.to_string()).collect();
        n
    }

    #[test]
    fn pod_cidr_sources_table() {
        let blocks = [
            block("192.168.12.64/26", Some("host:n1"), false),
            block("192.168.12.0/26", Some("host:n1"), false),
            block("192.168.13.0/26", Some("host:n2"), false),
            block("192.168.14.0/26", Some("host:n1"), true),
            block("192.168.15.0/26", Some("virtual:vm-1"), false),
            block("192.168.16.0/26", None, false),
            block("not a cidr", Some("host:n1"), false),
        ];
        let foreign = ForeignPodCidrs {
            calico: calico_pod_cidrs(&blocks),
            cilium: cilium_pod_cidrs(&[
                cilium("n1", &["10.0.1.0/24", "fd00:10::/64"]),
                cilium("n3", &[]),
            ]),
        };
        type Case<'a> = (&'a str, Node, PodCidrSource, &'a [&'a str]);
        let cases: Vec<Case> = vec![
            (
                "node spec",
                node("n1", &["10.244.1.0/24"], None),
                PodCidrSource::Node,
                &["10.244.1.0/24"],
            ),
            (
                "node spec ignores the annotation",
                node("n1", &["10.244.1.0/24"], Some("10.9.0.0/24")),
                PodCidrSource::Node,
                &["10.244.1.0/24"],
            ),
            (
                "annotation, spaces and a bad entry",
                node(
                    "n1",
                    &["10.244.1.0/24"],
                    Some(" 10.9.1.0/24, fd00:9::/64,,nope, 10.9.0.0/24"),
                ),
                PodCidrSource::Annotation,
                &["10.9.0.0/24", "10.9.1.0/24", "fd00:9::/64"],
            ),
            (
                "no annotation",
                node("n1", &["10.244.1.0/24"], None),
                PodCidrSource::Annotation,
                &[],
            ),
            (
                "calico: live host blocks only, sorted",
                node("n1", &[], None),
                PodCidrSource::Calico,
                &["192.168.12.0/26", "192.168.12.64/26"],
            ),
            (
                "calico: another node",
                node("n2", &[], None),
                PodCidrSource::Calico,
                &["192.168.13.0/26"],
            ),
            (
                "calico: no block",
                node("n9", &["10.244.9.0/24"], None),
                PodCidrSource::Calico,
                &[],
            ),
            (
                "cilium",
                node("n1", &[], None),
                PodCidrSource::Cilium,
                &["10.0.1.0/24", "fd00:10::/64"],
            ),
            (
                "cilium: empty",
                node("n3", &[], None),
                PodCidrSource::Cilium,
                &[],
            ),
        ];
        for (name, node, source, want) in cases {
            let got: Vec<String> = pod_cidrs(&node, source, &foreign)
                .iter()
                .map(ToString::to_string)
                .collect();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn node_endpoint_choice_table() {
        use k8s_openapi::api::core::v1::{NodeAddress, NodeStatus};
        use wgmesh_api::NodeAddressType::{ExternalIP, InternalIP};
        let with = |annotation: Option<&str>, addrs: &[(&str, &str)]| {
            let mut n = node("n1", &[], None);
            if let Some(a) = annotation {
                n.metadata.annotations = Some(labels(&[(ENDPOINT_ANNOTATION, a)]));
            }
            n.status = Some(NodeStatus {
                addresses: Some(
                    addrs
                        .iter()
                        .map(|(t, a)| NodeAddress {
                            type_: t.to_string(),
                            address: a.to_string(),
                        })
                        .collect(),
                ),
                ..Default::default()
            });
            n
        };
        let mesh_with = |types: Vec<wgmesh_api::NodeAddressType>| {
            let mut m = WireGuardMesh::new("default", Default::default());
            m.spec.endpoint_address_types = types;
            m
        };
        let both = [
            ("InternalIP", "192.168.1.2"),
            ("Hostname", "n1"),
            ("ExternalIP", "203.0.113.2"),
        ];
        let ip = |s: &str| NodeEndpoint::Address(s.parse().unwrap());
        let cases = vec![
            (
                "no preference",
                with(None, &both),
                mesh_with(vec![]),
                NodeEndpoint::Registered,
            ),
            (
                "ExternalIP first",
                with(None, &both),
                mesh_with(vec![ExternalIP, InternalIP]),
                ip("203.0.113.2"),
            ),
            (
                "InternalIP first",
                with(None, &both),
                mesh_with(vec![InternalIP, ExternalIP]),
                ip("192.168.1.2"),
            ),
            (
                "no ExternalIP: the next type",
                with(None, &[("InternalIP", "192.168.1.2")]),
                mesh_with(vec![ExternalIP, InternalIP]),
                ip("192.168.1.2"),
            ),
            (
                "none of the types: registered",
                with(None, &[("InternalIP", "192.168.1.2")]),
                mesh_with(vec![ExternalIP]),
                NodeEndpoint::Registered,
            ),
            (
                "the annotation wins",
                with(Some("n1.example.com:4500"), &both),
                mesh_with(vec![ExternalIP]),
                NodeEndpoint::Named {
                    host: "n1.example.com".into(),
                    port: Some(4500),
                },
            ),
            (
                "an address without port",
                with(Some("198.51.100.9"), &both),
                mesh_with(vec![]),
                NodeEndpoint::Named {
                    host: "198.51.100.9".into(),
                    port: None,
                },
            ),
            (
                "a bad annotation is ignored",
                with(Some("not an endpoint!"), &both),
                mesh_with(vec![ExternalIP]),
                ip("203.0.113.2"),
            ),
        ];
        for (name, node, mesh, want) in cases {
            assert_eq!(node_endpoint_choice(&node, &mesh), want, "{name}");
        }
    }
}
