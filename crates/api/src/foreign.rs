//! Other projects' objects the controller reads, trimmed to the fields it uses: the pod
//! CIDRs Calico and Cilium hand out (`WireGuardMesh.spec.podCIDRSource`). Only what is
//! declared here is kept in the controller's caches; every other field is dropped as the
//! object is decoded. Their CRDs belong to those projects: we never generate or install them.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::core::ClusterResourceScope;
use serde::{Deserialize, Serialize};

/// Implements `kube::Resource` for a cluster-scoped object of another project's API.
macro_rules! foreign_resource {
    ($ty:ty, group = $group:literal, version = $version:literal, kind = $kind:literal, plural = $plural:literal) => {
        impl Resource for $ty {
            type DynamicType = ();
            type Scope = ClusterResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// Calico's IPAM block (`crd.projectcalico.org/v1`, `IPAMBlock`): a CIDR Calico's IPAM
/// assigns pod addresses from, affine to one host while `spec.affinity` is `host:<node>`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct CalicoIpamBlock {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: CalicoIpamBlockSpec,
}

/// The fields of an `IPAMBlock`'s spec that say which node's pods it holds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct CalicoIpamBlockSpec {
    /// The block's network, such as `192.168.12.64/26`.
    #[serde(default)]
    pub cidr: String,
    /// `host:<node name>` for a block affine to a node; absent or another kind (`virtual:`)
    /// otherwise.
    #[serde(default)]
    pub affinity: Option<String>,
    /// Set while Calico releases the block.
    #[serde(default)]
    pub deleted: bool,
}

foreign_resource!(
    CalicoIpamBlock,
    group = "crd.projectcalico.org",
    version = "v1",
    kind = "IPAMBlock",
    plural = "ipamblocks"
);

/// Cilium's per-node object (`cilium.io/v2`, `CiliumNode`), named as its Node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct CiliumNode {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: CiliumNodeSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct CiliumNodeSpec {
    #[serde(default)]
    pub ipam: CiliumNodeIpam,
}

/// `spec.ipam` of a `CiliumNode`: in Cilium's `cluster-pool` and `kubernetes` IPAM modes,
/// the node's pod CIDRs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct CiliumNodeIpam {
    #[serde(rename = "podCIDRs", default)]
    pub pod_cidrs: Vec<String>,
}

foreign_resource!(
    CiliumNode,
    group = "cilium.io",
    version = "v2",
    kind = "CiliumNode",
    plural = "ciliumnodes"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_calico_block_keeps_only_what_we_read() {
        let block: CalicoIpamBlock = serde_json::from_value(serde_json::json!({
            "apiVersion": "crd.projectcalico.org/v1",
            "kind": "IPAMBlock",
            "metadata": {"name": "192-168-12-64-26"},
            "spec": {
                "cidr": "192.168.12.64/26",
                "affinity": "host:node-1",
                "allocations": [0, null, 1],
                "attributes": [{"handle_id": "ipip-tunnel-addr-node-1", "secondary": {"node": "node-1"}}],
                "unallocated": [2, 3],
                "strictAffinity": false,
                "sequenceNumber": 7
            }
        }))
        .unwrap();
        assert_eq!(block.spec.cidr, "192.168.12.64/26");
        assert_eq!(block.spec.affinity.as_deref(), Some("host:node-1"));
        assert!(!block.spec.deleted);
        assert_eq!(
            CalicoIpamBlock::url_path(&(), None),
            "/apis/crd.projectcalico.org/v1/ipamblocks"
        );
    }

    #[test]
    fn a_cilium_node_keeps_only_its_pod_cidrs() {
        let node: CiliumNode = serde_json::from_value(serde_json::json!({
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNode",
            "metadata": {"name": "node-1"},
            "spec": {
                "addresses": [{"type": "InternalIP", "ip": "172.18.0.2"}],
                "ipam": {"podCIDRs": ["10.0.1.0/24"], "pools": {}},
                "health": {"ipv4": "10.0.1.12"}
            },
            "status": {"ipam": {"operator-status": {}}}
        }))
        .unwrap();
        assert_eq!(node.spec.ipam.pod_cidrs, ["10.0.1.0/24"]);
        assert_eq!(
            CiliumNode::url_path(&(), None),
            "/apis/cilium.io/v2/ciliumnodes"
        );
    }
}
