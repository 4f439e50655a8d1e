//! `WireGuardMesh`: the interface-level settings of one mesh (usually the one named `default`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::fields::{CidrString, ObjectName};

pub const DEFAULT_INTERFACE_NAME: &str = "wgmesh0";
pub const DEFAULT_LISTEN_PORT: i32 = 51820;
pub const DEFAULT_TUNNEL_CIDR: &str = "10.250.0.0/16";

/// The interface-level settings of a mesh: interface name, port, MTU, backend, the pools
/// tunnel addresses come from, and which nodes join.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wgmesh.io",
    version = "v1alpha1",
    kind = "WireGuardMesh",
    plural = "wireguardmeshes",
    shortname = "wgmesh",
    shortname = "wgmeshes",
    category = "wgmesh",
    status = "WireGuardMeshStatus",
    derive = "PartialEq",
    doc = "A WireGuard mesh: the interface settings every member node uses and the pools tunnel addresses come from.",
    printcolumn(
        name = "Interface",
        type_ = "string",
        json_path = ".spec.interfaceName"
    ),
    printcolumn(name = "Port", type_ = "integer", json_path = ".spec.listenPort"),
    printcolumn(name = "Backend", type_ = "string", json_path = ".spec.backend"),
    printcolumn(
        name = "Tunnel CIDRs",
        type_ = "string",
        json_path = ".spec.tunnelCIDRs"
    ),
    printcolumn(name = "Nodes", type_ = "integer", json_path = ".status.nodes"),
    printcolumn(name = "Peers", type_ = "integer", json_path = ".status.peers"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.hostEncryption) || !self.hostEncryption || has(self.fwmark)").message("hostEncryption needs spec.fwmark: the mark keeps the tunnel's own packets, sent to node addresses, out of the tunnel"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.mtu) || self.mtu >= 1280 || !has(self.tunnelCIDRs) || !self.tunnelCIDRs.exists(c, isCIDR(c) && cidr(c).ip().family() == 6)").message("an IPv6 tunnel pool needs spec.mtu of at least 1280 (Linux turns IPv6 off on a link with less)"))]
pub struct WireGuardMeshSpec {
    /// Name of the WireGuard interface on every node: 1-15 characters of letters, digits, `_`,
    /// `.` and `-`, starting with a letter or digit. It cannot change (the nodes would keep
    /// the interface of the old name): create another mesh instead.
    #[serde(default = "default_interface_name")]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("interfaceName cannot change (the nodes would keep the old interface); create another mesh"))]
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    )]
    pub interface_name: String,

    /// UDP port the mesh listens on, on every node.
    #[serde(default = "default_listen_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port: i32,

    /// MTU of the interface. Absent means automatic: the underlay MTU minus 80 bytes of
    /// WireGuard, UDP and IPv6 overhead, where the underlay is the link of the default route
    /// the tunnel's packets take (in the `fwmark` table if it has one, else the main
    /// table). At most 65,475: a packet of that size encrypted (32
    /// bytes more) is the largest a UDP datagram carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 576, max = 65475))]
    pub mtu: Option<i32>,

    /// Which WireGuard implementation the agents use. `auto` prefers the kernel module and
    /// falls back to the userspace device.
    #[serde(default)]
    pub backend: Backend,

    /// Pools that tunnel addresses of nodes and external peers are allocated from: at most one
    /// IPv4 and one IPv6 network.
    #[serde(rename = "tunnelCIDRs", default = "default_tunnel_cidrs")]
    #[schemars(length(min = 1, max = 2))]
    #[x_kube(validation = kube::core::Rule::new("self.filter(c, isCIDR(c) && cidr(c).ip().family() == 4).size() <= 1 && self.filter(c, isCIDR(c) && cidr(c).ip().family() == 6).size() <= 1").message("tunnelCIDRs holds at most one IPv4 and one IPv6 network"))]
    #[x_kube(validation = kube::core::Rule::new("self.all(c, !isCIDR(c) || cidr(c).prefixLength() <= (cidr(c).ip().family() == 4 ? 30 : 126))").message("a tunnel pool needs room for two nodes at least: /30 (IPv4) or /126 (IPv6), or larger"))]
    pub tunnel_cidrs: Vec<CidrString>,

    /// Seconds between keepalive packets sent to every peer (0 or absent: off). Useful when
    /// nodes sit behind NAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub persistent_keepalive: Option<i32>,

    /// Nodes that join the mesh. Absent: every node. A node is in one mesh at a time: a mesh
    /// selecting a node of an older mesh is held (`MeshConflict`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'] && ((e.operator in ['In', 'NotIn']) == (has(e.values) && e.values.size() > 0)))").message("matchExpressions operators are In and NotIn (with values) or Exists and DoesNotExist (without)"))]
    pub node_selector: Option<LabelSelector>,

    /// Member nodes that external peers attach to (gateways). Absent: every member node.
    /// Other nodes reach external peers through the first gateway (by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'] && ((e.operator in ['In', 'NotIn']) == (has(e.values) && e.values.size() > 0)))").message("matchExpressions operators are In and NotIn (with values) or Exists and DoesNotExist (without)"))]
    pub gateway_selector: Option<LabelSelector>,

    /// A Secret holding a mesh-wide secret from which a preshared key is derived for every
    /// pair of nodes (post-quantum resistance for the node-to-node links).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key: Option<SecretKeyRef>,

    /// Firewall mark put on the encrypted UDP packets, and the routing table they use, so
    /// tunnel traffic follows the underlay routes and never loops into the tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwmark: Option<FwmarkSpec>,

    /// Stop programming this mesh. Agents keep their interfaces as they are until it is
    /// enabled again or deleted.
    #[serde(default)]
    pub disabled: bool,

    /// Strict mode (the default): pod traffic to mesh destinations is dropped, never sent in
    /// plaintext, whenever the tunnel cannot carry it (the agent starting, stopped, crashed or
    /// upgrading; a peer not yet programmed). `false` lets such traffic fall back to the
    /// node's other routes unencrypted: for add-on users who prefer plaintext over an outage.
    #[serde(default = "default_strict")]
    pub strict: bool,

    /// The cluster's pod networks (the `--cluster-cidr` of kube-controller-manager, or your
    /// CNI's pools). In strict mode an address in them that no peer covers yet, such as a
    /// node's that joined before every agent got the update, is dropped rather than sent in
    /// plaintext. Each node's own pod CIDRs stay local. Absent: only known peers' networks are
    /// protected.
    #[serde(
        rename = "clusterCIDRs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 8))]
    pub cluster_cidrs: Vec<CidrString>,

    /// Where each node's pod CIDRs come from: the IPAM that hands out pod addresses.
    /// `node` (the default): the Node's `spec.podCIDRs`, as kube-controller-manager allocates
    /// them. `annotation`: the Node's `wgmesh.io/pod-cidrs` annotation, CIDRs separated by
    /// commas. `calico`: Calico's `IPAMBlock` objects affine to the node (`host:<node>`).
    /// `cilium`: the node's `CiliumNode` (`spec.ipam.podCIDRs`). The controller then needs
    /// read access to that CRD (the chart grants it for the source it is given).
    #[serde(rename = "podCIDRSource", default)]
    pub pod_cidr_source: PodCidrSource,

    /// Which of a Node's addresses the other members send to, in order of preference, such
    /// as `[ExternalIP, InternalIP]` for nodes in different networks. Absent: the address
    /// the node's agent registers (its InternalIP). A Node's `wgmesh.io/endpoint` annotation
    /// (an address or DNS name, optionally with `:port`) overrides both.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    #[x_kube(validation = kube::core::Rule::new("self.size() < 2 || self[0] != self[1]").message("endpointAddressTypes names each type once"))]
    pub endpoint_address_types: Vec<NodeAddressType>,

    /// Encrypt traffic between the member nodes' own addresses too (their InternalIPs), so
    /// host-network pods and node traffic (kubelets, node exporters) cross the tunnel. Needs
    /// `fwmark`: the tunnel's own UDP packets go to the same addresses and are kept out of
    /// the tunnel by their mark. Addresses the nodes must reach directly stay on the underlay
    /// (the API server's, the controller's, a node's gateways), as do addresses two Nodes
    /// both list. Off by default.
    #[serde(default)]
    pub host_encryption: bool,

    /// Free text for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub comment: Option<String>,
}

fn default_strict() -> bool {
    true
}

/// A key of a Secret. Our objects are cluster-scoped, so the namespace is always explicit.
#[derive(
    KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Namespace of the Secret.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub namespace: String,
    /// Name of the Secret.
    pub name: ObjectName,
    /// Key within the Secret's data.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// The firewall mark and routing table of the encrypted UDP socket.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct FwmarkSpec {
    /// Mark set on every encrypted packet (SO_MARK), 1 to 2^32-1. Packets carrying exactly
    /// this mark skip the tunnel: choose one no other component on the nodes sets (not
    /// kube-proxy's 0x4000 or 0x8000, nor the CNI's bits).
    #[schemars(range(min = 1, max = 4294967295u32))]
    pub mark: i64,
    /// Routing table the marked packets are routed by. Absent: the main table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4294967295u32))]
    #[x_kube(validation = kube::core::Rule::new("self != 253 && self != 255").message("tables 253 (default) and 255 (local) are reserved"))]
    pub table: Option<i64>,
}

/// The WireGuard implementation agents use.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The kernel module where the kernel has it, else the userspace device.
    #[default]
    Auto,
    /// The kernel module only; agents report an error where it is missing.
    Kernel,
    /// wgmesh's own userspace device on a TUN interface.
    Userspace,
}

/// A type of Node address (`status.addresses[].type`).
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeAddressType {
    InternalIP,
    ExternalIP,
}

impl NodeAddressType {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeAddressType::InternalIP => "InternalIP",
            NodeAddressType::ExternalIP => "ExternalIP",
        }
    }
}

/// The IPAM a mesh reads nodes' pod CIDRs from.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum PodCidrSource {
    /// The Node's `spec.podCIDRs` (kube-controller-manager's `--allocate-node-cidrs`).
    #[default]
    Node,
    /// The Node's `wgmesh.io/pod-cidrs` annotation.
    Annotation,
    /// Calico's `IPAMBlock` objects (`crd.projectcalico.org/v1`) with affinity `host:<node>`.
    Calico,
    /// Cilium's `CiliumNode` objects (`cilium.io/v2`), `spec.ipam.podCIDRs`.
    Cilium,
}

/// What the controller observed of the mesh.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WireGuardMeshStatus {
    /// Nodes selected by the mesh whose agent registered.
    #[serde(default)]
    pub nodes: i32,
    /// Of those, the nodes whose peer is Ready.
    #[serde(default)]
    pub ready_nodes: i32,
    /// External peers of the mesh.
    #[serde(default)]
    pub peers: i32,
    /// Of those, the peers that are Ready.
    #[serde(default)]
    pub ready_peers: i32,
    /// Gateway nodes, in order: external peers' configs list them all and send what no
    /// gateway owns through the active one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// The gateway that carries the traffic between external peers and the other nodes: the
    /// first gateway until its agent goes silent, then the next live one (it stays there
    /// when the first comes back). External peers' configs follow it when exported again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_gateway: Option<String>,
    /// Latest observations of the mesh's state (`Ready`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

fn default_interface_name() -> String {
    DEFAULT_INTERFACE_NAME.to_owned()
}

fn default_listen_port() -> i32 {
    DEFAULT_LISTEN_PORT
}

fn default_tunnel_cidrs() -> Vec<CidrString> {
    vec![CidrString(DEFAULT_TUNNEL_CIDR.to_owned())]
}

pub(crate) fn default_secret_key() -> String {
    "presharedKey".to_owned()
}

impl WireGuardMeshSpec {
    /// Whether host traffic is encrypted: `hostEncryption` with the `fwmark` it needs (the
    /// schema requires one; without it the tunnel's own packets would loop).
    pub fn encrypts_hosts(&self) -> bool {
        self.host_encryption && self.fwmark.is_some()
    }
}

impl Default for WireGuardMeshSpec {
    fn default() -> Self {
        WireGuardMeshSpec {
            interface_name: default_interface_name(),
            listen_port: default_listen_port(),
            mtu: None,
            backend: Backend::Auto,
            tunnel_cidrs: default_tunnel_cidrs(),
            persistent_keepalive: None,
            node_selector: None,
            gateway_selector: None,
            preshared_key: None,
            fwmark: None,
            disabled: false,
            strict: true,
            cluster_cidrs: Vec::new(),
            pod_cidr_source: PodCidrSource::Node,
            endpoint_address_types: Vec::new(),
            host_encryption: false,
            comment: None,
        }
    }
}
