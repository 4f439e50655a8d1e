//! What the caches keep of the objects they watch. A real Node weighs 10-50 KB (images,
//! conditions, managed fields, other projects' annotations), and the controller reads a few
//! hundred bytes of it; at 5,000 nodes the difference is the controller's memory. Objects are
//! trimmed as they arrive, before the reflector stores them.

use k8s_openapi::api::core::v1::{Node, NodeStatus};
use kube::ResourceExt;
use wgmesh_api::WireGuardPeer;

/// Our annotations (endpoints, pod CIDRs, key rotation): the only ones the controller reads.
const OUR_ANNOTATIONS: &str = "wgmesh.io/";

/// Keeps what the controller reads of a Node: name, uid, labels (selectors), our
/// annotations, the spec (pod CIDRs, taints) and the addresses. A change to anything else
/// leaves the cached Node as it was but for its resourceVersion, and wakes nothing
/// ([`crate::relevant`]).
pub fn node(node: &mut Node) {
    metadata(node);
    if let Some(status) = node.status.take() {
        node.status = Some(NodeStatus {
            addresses: status.addresses,
            ..NodeStatus::default()
        });
    }
}

/// Keeps a WireGuardPeer whole but for managed fields and other projects' annotations
/// (`kubectl apply`'s copy of the whole object, for one).
pub fn peer(peer: &mut WireGuardPeer) {
    metadata(peer);
}

fn metadata<K: kube::Resource>(object: &mut K) {
    object.managed_fields_mut().clear();
    object
        .annotations_mut()
        .retain(|k, _| k.starts_with(OUR_ANNOTATIONS));
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerImage, NodeAddress, NodeCondition, NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    #[test]
    fn a_node_keeps_what_the_controller_reads() {
        let mut n = Node::default();
        n.metadata.name = Some("n".into());
        n.metadata.uid = Some("u".into());
        n.metadata.resource_version = Some("7".into());
        n.labels_mut().insert("zone".into(), "a".into());
        for (k, v) in [
            ("wgmesh.io/endpoint", "n.example:51820"),
            ("node.alpha.kubernetes.io/ttl", "0"),
            ("kubectl.kubernetes.io/last-applied-configuration", "{...}"),
        ] {
            n.annotations_mut().insert(k.into(), v.into());
        }
        n.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        n.spec = Some(NodeSpec {
            pod_cidrs: Some(vec!["10.244.1.0/24".into()]),
            taints: Some(vec![Taint {
                key: "wgmesh.io/agent-not-ready".into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        let addresses = vec![NodeAddress {
            type_: "InternalIP".into(),
            address: "192.168.0.1".into(),
        }];
        n.status = Some(NodeStatus {
            addresses: Some(addresses.clone()),
            images: Some(vec![ContainerImage::default(); 50]),
            conditions: Some(vec![NodeCondition::default(); 5]),
            ..NodeStatus::default()
        });
        let spec = n.spec.clone();
        node(&mut n);
        assert_eq!(n.name_any(), "n");
        assert_eq!(n.metadata.uid.as_deref(), Some("u"));
        assert_eq!(n.resource_version().as_deref(), Some("7"));
        assert_eq!(n.labels().get("zone").map(String::as_str), Some("a"));
        assert_eq!(
            n.annotations().keys().collect::<Vec<_>>(),
            ["wgmesh.io/endpoint"]
        );
        assert!(n.metadata.managed_fields.as_ref().is_none_or(Vec::is_empty));
        assert_eq!(n.spec, spec);
        let status = n.status.unwrap();
        assert_eq!(status.addresses, Some(addresses));
        assert_eq!(status.images, None);
        assert_eq!(status.conditions, None);
    }

    #[test]
    fn a_peer_loses_only_managed_fields_and_foreign_annotations() {
        let spec = serde_json::from_value(serde_json::json!({
            "mesh": "default",
            "publicKey": wgmesh_core::PublicKey::from_bytes([1; 32]).to_base64(),
        }))
        .unwrap();
        let mut p = WireGuardPeer::new("p", spec);
        p.annotations_mut().insert(
            "wgmesh.io/registered-endpoint".into(),
            "1.2.3.4:51820".into(),
        );
        p.annotations_mut().insert(
            "kubectl.kubernetes.io/last-applied-configuration".into(),
            "{...}".into(),
        );
        p.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        let mut want = p.clone();
        want.annotations_mut()
            .remove("kubectl.kubernetes.io/last-applied-configuration");
        want.metadata.managed_fields = Some(vec![]);
        peer(&mut p);
        assert_eq!(p, want);
    }
}
