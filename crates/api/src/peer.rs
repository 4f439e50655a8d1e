//! `WireGuardPeer`: one member of a mesh. The controller creates one per node; users create
//! one per external peer (a laptop, a phone, a remote site).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::condition::Condition;
use crate::fields::{CidrString, DnsEntry, Endpoint, InterfaceAddress, ObjectName};
use crate::mesh::SecretKeyRef;
use wgmesh_core::validate::check_mesh_endpoint;

/// Most allowed IPs one peer may route; a remote site with more networks should summarise.
pub const MAX_ALLOWED_IPS: u32 = 256;
/// The longest `spec.comment`, in characters.
pub const MAX_COMMENT_LEN: usize = 1024;
/// The most `spec.client.addresses` and `spec.client.dns` entries.
pub const MAX_CLIENT_LIST: usize = 16;

/// A member of a mesh: a node (created by the controller when the node's agent registers) or
/// an external peer (created by a user).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wgmesh.io",
    version = "v1alpha1",
    kind = "WireGuardPeer",
    plural = "wireguardpeers",
    shortname = "wgpeer",
    shortname = "wgpeers",
    category = "wgmesh",
    status = "WireGuardPeerStatus",
    derive = "PartialEq",
    doc = "A member of a WireGuard mesh: a node, or an external peer such as a laptop or a remote site.",
    printcolumn(name = "Mesh", type_ = "string", json_path = ".spec.mesh"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Address", type_ = "string", json_path = ".status.addresses[0]"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Handshake",
        type_ = "date",
        json_path = ".status.lastHandshakeTime"
    ),
    printcolumn(
        name = "Public Key",
        type_ = "string",
        json_path = ".spec.publicKey",
        priority = 1
    ),
    printcolumn(
        name = "Allowed IPs",
        type_ = "string",
        json_path = ".spec.allowedIPs",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WireGuardPeerSpec {
    /// The mesh this peer belongs to.
    #[serde(default = "default_mesh")]
    pub mesh: ObjectName,

    /// The peer's WireGuard public key: 32 bytes in base64, 44 characters ending in `=`
    /// (the output of `wg pubkey`).
    #[schemars(length(min = 44, max = 44))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$')").message("must be a WireGuard public key: 32 bytes of base64, 44 characters ending in '=' (the output of `wg pubkey`)"))]
    pub public_key: String,

    /// Networks routed to this peer, and accepted from it. The controller adds the peer's
    /// tunnel address(es), and for a node its pod CIDRs.
    #[serde(rename = "allowedIPs", default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ALLOWED_IPS))]
    pub allowed_ips: Vec<CidrString>,

    /// Where the mesh sends this peer's packets first. Absent: the peer is reached at
    /// whatever address it last sent from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,

    /// Seconds between keepalive packets the mesh sends to this peer (0 or absent: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub persistent_keepalive: Option<i32>,

    /// A Secret key holding a preshared key (`wg genpsk`) shared with this peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key_secret_ref: Option<SecretKeyRef>,

    /// The mesh only answers this peer and never initiates to it (no endpoint is pushed):
    /// for peers behind NAT that come and go.
    #[serde(default)]
    pub responder: bool,

    /// Remove the peer from every node without deleting the object.
    #[serde(default)]
    pub disabled: bool,

    /// Free text for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_COMMENT_LEN))]
    pub comment: Option<String>,

    /// The Node this peer is. Set by the controller on node peers only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<ObjectName>,

    /// Settings for the peer's own device, used when exporting its wg-quick config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientSpec>,
}

impl WireGuardPeerSpec {
    /// What the schema refuses in a spec built from outside input (a wg-quick file, the CLI's
    /// flags), found before anything is sent, so that a command creating several objects
    /// creates none when one would be refused: list and text limits, and endpoints as
    /// `check_mesh_endpoint` takes them (the rule the CRD and the controller apply). The
    /// API server still has the last word on everything else.
    pub fn check(&self) -> Result<(), String> {
        let too_many = |field: &str, n: usize, max: usize| {
            Err(format!(
                "{field} has {n} entries; at most {max} are allowed"
            ))
        };
        let max_allowed = MAX_ALLOWED_IPS as usize;
        if self.allowed_ips.len() > max_allowed {
            return too_many("spec.allowedIPs", self.allowed_ips.len(), max_allowed);
        }
        if let Some(e) = &self.endpoint {
            check_mesh_endpoint(&e.0).map_err(|why| format!("spec.endpoint: {why}"))?;
        }
        if let Some(c) = &self.comment
            && c.chars().count() > MAX_COMMENT_LEN
        {
            return Err(format!(
                "spec.comment has {} characters; at most {MAX_COMMENT_LEN} are allowed",
                c.chars().count()
            ));
        }
        if let Some(client) = &self.client {
            if client.allowed_ips.len() > max_allowed {
                return too_many(
                    "spec.client.allowedIPs",
                    client.allowed_ips.len(),
                    max_allowed,
                );
            }
            if client.addresses.len() > MAX_CLIENT_LIST {
                return too_many(
                    "spec.client.addresses",
                    client.addresses.len(),
                    MAX_CLIENT_LIST,
                );
            }
            if client.dns.len() > MAX_CLIENT_LIST {
                return too_many("spec.client.dns", client.dns.len(), MAX_CLIENT_LIST);
            }
            if let Some(e) = &client.endpoint {
                check_mesh_endpoint(&e.0).map_err(|why| format!("spec.client.endpoint: {why}"))?;
            }
        }
        Ok(())
    }
}

/// The `[Interface]` side of an external peer's own config, and what it routes into the mesh.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClientSpec {
    /// Addresses of the peer's interface. Absent: the tunnel addresses the controller assigns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CLIENT_LIST))]
    pub addresses: Vec<InterfaceAddress>,

    /// DNS servers and search domains for the peer's device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CLIENT_LIST))]
    pub dns: Vec<DnsEntry>,

    /// Networks the peer's device sends into the mesh.
    #[serde(rename = "allowedIPs", default = "default_client_allowed_ips")]
    #[schemars(length(max = MAX_ALLOWED_IPS))]
    pub allowed_ips: Vec<CidrString>,

    /// Endpoint the peer's device uses to reach the mesh (a gateway's public address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,

    /// UDP port of the peer's device. Absent: chosen by its OS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub listen_port: Option<i32>,

    /// Keepalive interval of the peer's device, in seconds (0 or absent: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 65535))]
    pub persistent_keepalive: Option<i32>,
}

/// What the controller and the agents observed of the peer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WireGuardPeerStatus {
    /// Tunnel addresses allocated to the peer from the mesh's pools.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Latest observations of the peer (`Ready`, with a reason such as `AllowedIPsOverlap`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Address the peer's packets last came from, as seen by the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Most recent handshake any node completed with the peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handshake_time: Option<Time>,
    /// The latest handshake each node reported with this peer, by node name (nodes that
    /// never completed one are left out; of more than 65, the 65 latest, or as many as the
    /// controller's node-peer detail limit plus one). For a node peer, only in a mesh of at
    /// most 65 nodes: above, per-node detail would grow as nodes squared, and `liveSessions`
    /// says how the node is doing instead (the agents' metrics keep each pair's handshake
    /// age).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handshakes: Vec<NodeHandshake>,
    /// For a node peer: how many of the other member nodes it holds a live WireGuard session
    /// with (a handshake in the last 180 s), as its agent last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_sessions: Option<i32>,
    /// Bytes received from the peer, summed over the nodes (for a node peer, only in a mesh
    /// of at most 65 nodes, like `handshakes`).
    #[serde(default)]
    pub rx_bytes: i64,
    /// Bytes sent to the peer, summed over the nodes (as `rxBytes`).
    #[serde(default)]
    pub tx_bytes: i64,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One node's latest handshake with a peer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeHandshake {
    /// The reporting Node.
    pub node: String,
    /// When that node last completed a handshake with the peer.
    pub last_handshake_time: Time,
}

fn default_mesh() -> ObjectName {
    ObjectName("default".to_owned())
}

fn default_client_allowed_ips() -> Vec<CidrString> {
    vec![
        CidrString("0.0.0.0/0".to_owned()),
        CidrString("::/0".to_owned()),
    ]
}
