//! A node's view ([`wgmesh_core::node_config`]) to wire messages. Only conversion lives here:
//! what to send is decided in core ([`next_update`](wgmesh_core::node_config::next_update)).
//! Per-node values (leaving the node out, its per-pair preshared keys) are derived here, while
//! encoding, from entries every node's view shares.

use wgmesh_core::desired::{DesiredPeer, Member};
use wgmesh_core::node_config::{NodeConfig, NodeUpdate};

use crate::{MeshSettings, Peer, PeerDelta, PeerSnapshot, PeerUpdate, peer_update};

/// A peer as the node of `view` programs it.
pub fn peer(peer: &DesiredPeer, view: &NodeConfig<MeshSettings>) -> Peer {
    Peer {
        public_key: peer.public_key.as_bytes().to_vec(),
        name: peer.name.clone(),
        endpoint: peer.endpoint.clone().unwrap_or_default(),
        allowed_ips: peer.allowed_ips.iter().map(ToString::to_string).collect(),
        persistent_keepalive: u32::from(peer.persistent_keepalive),
        preshared_key: view
            .preshared_key(peer)
            .map(|k| k.as_bytes().to_vec())
            .unwrap_or_default(),
        node: peer.node.clone().unwrap_or_default(),
    }
}

/// The member's interface addresses (`10.250.0.3/16`), none for a non-member.
pub fn tunnel_addresses(member: Option<&Member>) -> Vec<String> {
    member
        .map(|m| {
            m.interface_addresses
                .iter()
                .map(ToString::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The member's Node's pod CIDRs, none for a non-member.
pub fn pod_cidrs(member: Option<&Member>) -> Vec<String> {
    member
        .map(|m| m.pod_cidrs.iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

/// The whole view as a snapshot.
pub fn snapshot(view: &NodeConfig<MeshSettings>) -> PeerSnapshot {
    PeerSnapshot {
        peers: view.peers().map(|p| peer(p, view)).collect(),
        mesh: view.settings.as_deref().cloned(),
        tunnel_addresses: tunnel_addresses(view.member.as_ref()),
        pod_cidrs: pod_cidrs(view.member.as_ref()),
        departure: crate::decode::wire_departure(view.departure) as i32,
        members: members(view),
    }
}

/// How many nodes are members of the mesh at this view's revision.
fn members(view: &NodeConfig<MeshSettings>) -> u32 {
    u32::try_from(view.desired.members.len()).unwrap_or(u32::MAX)
}

/// The stream message for `update`, taking the node to `view`.
pub fn peer_update(
    epoch: &str,
    revision: u64,
    view: &NodeConfig<MeshSettings>,
    update: &NodeUpdate<MeshSettings>,
) -> PeerUpdate {
    let member = view.member.as_ref();
    let update = match update {
        NodeUpdate::Snapshot => peer_update::Update::Snapshot(snapshot(view)),
        NodeUpdate::Delta(d) => peer_update::Update::Delta(PeerDelta {
            upserted: d.upserted.iter().map(|p| peer(p, view)).collect(),
            removed: d.removed.iter().map(|k| k.as_bytes().to_vec()).collect(),
            mesh: d.settings.as_deref().cloned(),
            tunnel_addresses: if d.addresses_changed {
                tunnel_addresses(member)
            } else {
                Vec::new()
            },
            pod_cidrs: if d.pod_cidrs_changed {
                pod_cidrs(member)
            } else {
                Vec::new()
            },
            members: members(view),
        }),
    };
    PeerUpdate {
        epoch: epoch.to_owned(),
        revision,
        rotate_key_request: member
            .and_then(|m| m.rotate_key_request.clone())
            .unwrap_or_default(),
        update: Some(update),
    }
}
