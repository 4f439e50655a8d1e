//! A node's view ([`wgmesh_core::node_config`]) to wire messages. Only conversion lives here:
//! what to send is decided in core ([`next_update`](wgmesh_core::node_config::next_update)).
//! Per-node values (leaving the node out, its per-pair preshared keys) are derived here, while
//! encoding, from entries every node's view shares; each peer's own fields are encoded once
//! ([`EncodedPeer`]).

use prost::Message;
use wgmesh_core::desired::{DesiredPeer, Member};
use wgmesh_core::diff::AllowedIpsChange;
use wgmesh_core::node_config::{NodeConfig, NodeUpdate};

use crate::encoded::EncodedPeer;
use crate::served::{PeerDelta, PeerSnapshot, PeerUpdate, peer_update};
use crate::{MeshSettings, Peer};

/// A peer as the node of `view` programs it.
pub fn peer(peer: &DesiredPeer, view: &NodeConfig<MeshSettings>) -> Peer {
    Peer {
        preshared_key: view
            .preshared_key(peer)
            .map(|k| k.as_bytes().to_vec())
            .unwrap_or_default(),
        ..shared_fields(peer)
    }
}

/// Every field of the peer but the preshared key, which depends on the pair.
fn shared_fields(peer: &DesiredPeer) -> Peer {
    Peer {
        public_key: peer.public_key.as_bytes().to_vec(),
        name: peer.name.clone(),
        endpoint: peer.endpoint.clone().unwrap_or_default(),
        allowed_ips: peer.allowed_ips.iter().map(ToString::to_string).collect(),
        persistent_keepalive: u32::from(peer.persistent_keepalive),
        preshared_key: Vec::new(),
        node: peer.node.clone().unwrap_or_default(),
    }
}

/// [`peer`] as sent: the shared fields encoded the first time the peer is sent, by any
/// stream, then reused; the pair's preshared key added.
pub fn encoded_peer(peer: &DesiredPeer, view: &NodeConfig<MeshSettings>) -> EncodedPeer {
    // The relay as a node behind NAT gets it (without that node's own networks): one peer
    // per such node, encoded for it alone.
    if let std::borrow::Cow::Owned(own) = view.as_sent(peer) {
        let bytes: std::sync::Arc<[u8]> = shared_fields(&own).encode_to_vec().into();
        return EncodedPeer::new(bytes, view.preshared_key(&own).map(|k| *k.as_bytes()));
    }
    let shared = peer
        .encoding
        .get_or_init(|| shared_fields(peer).encode_to_vec());
    // Peers are built anew when they change, never changed in place once sent.
    debug_assert_eq!(
        &*shared,
        &shared_fields(peer).encode_to_vec()[..],
        "the encoding of peer {} is stale",
        peer.name
    );
    EncodedPeer::new(shared, view.preshared_key(peer).map(|k| *k.as_bytes()))
}

/// A change of a peer's allowed IPs on the wire.
fn wire_change(c: &AllowedIpsChange) -> crate::AllowedIpsChange {
    crate::AllowedIpsChange {
        public_key: c.public_key.as_bytes().to_vec(),
        added: c.added.iter().map(ToString::to_string).collect(),
        removed: c.removed.iter().map(ToString::to_string).collect(),
    }
}

/// The changes of allowed IPs a delta carries, none for a snapshot.
fn changes<S>(update: &NodeUpdate<S>) -> &[AllowedIpsChange] {
    match update {
        NodeUpdate::Snapshot => &[],
        NodeUpdate::Delta(d) => &d.allowed_ips_changes,
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

/// A snapshot's fields but its peers.
fn snapshot_fields(view: &NodeConfig<MeshSettings>) -> PeerSnapshot {
    PeerSnapshot {
        peers: Vec::new(),
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
    let (peers, removed) = match update {
        NodeUpdate::Snapshot => (
            view.peers().map(|p| encoded_peer(p, view)).collect(),
            Vec::new(),
        ),
        NodeUpdate::Delta(d) => (
            d.upserted.iter().map(|p| encoded_peer(p, view)).collect(),
            d.removed.iter().map(|k| k.as_bytes().to_vec()).collect(),
        ),
    };
    let changed = changes(update).iter().map(wire_change).collect();
    first_part(epoch, revision, view, update, peers, removed, changed)
}

/// The message of `update` with every field, carrying `peers` (upserted, for a delta) and
/// `removed`: the whole update, or the first of its parts.
fn first_part(
    epoch: &str,
    revision: u64,
    view: &NodeConfig<MeshSettings>,
    update: &NodeUpdate<MeshSettings>,
    peers: Vec<EncodedPeer>,
    removed: Vec<Vec<u8>>,
    changed: Vec<crate::AllowedIpsChange>,
) -> PeerUpdate {
    let member = view.member.as_ref();
    let update = match update {
        NodeUpdate::Snapshot => peer_update::Update::Snapshot(PeerSnapshot {
            peers,
            ..snapshot_fields(view)
        }),
        NodeUpdate::Delta(d) => peer_update::Update::Delta(PeerDelta {
            upserted: peers,
            removed,
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
            changed_allowed_ips: changed,
        }),
    };
    PeerUpdate {
        epoch: epoch.to_owned(),
        revision,
        rotate_key_request: member
            .and_then(|m| m.rotate_key_request.clone())
            .unwrap_or_default(),
        update: Some(update),
        more_parts: false,
    }
}

/// [`peer_update`] in parts of at most `max_peers` peers each (upserted, removed and changed
/// counted apart), made one at a time as the iterator is driven, for agents that accept parts
/// (`WatchPeersRequest.accepts_parts`): a stream's buffers grow to its largest message, and a
/// whole snapshot per stream would make the controller's memory grow with the square of the
/// nodes. The first part carries every field, the others only peers; every part but the last
/// has `more_parts` set. An update that fits is one message, equal to [`peer_update`]'s.
pub fn peer_update_parts<'a>(
    epoch: &'a str,
    revision: u64,
    view: &'a NodeConfig<MeshSettings>,
    update: &'a NodeUpdate<MeshSettings>,
    max_peers: usize,
) -> impl Iterator<Item = PeerUpdate> + 'a {
    let max = max_peers.max(1);
    let (peers, removed): (Vec<&DesiredPeer>, &[wgmesh_core::PublicKey]) = match update {
        NodeUpdate::Snapshot => (view.peers().map(|p| &**p).collect(), &[]),
        NodeUpdate::Delta(d) => (d.upserted.iter().map(|p| &**p).collect(), &d.removed),
    };
    let changed = changes(update);
    let parts = peers
        .len()
        .div_ceil(max)
        .max(removed.len().div_ceil(max))
        .max(changed.len().div_ceil(max))
        .max(1);
    (0..parts).map(move |i| {
        let chunk = |len: usize| (i * max).min(len)..((i + 1) * max).min(len);
        let part_peers: Vec<EncodedPeer> = peers[chunk(peers.len())]
            .iter()
            .map(|p| encoded_peer(p, view))
            .collect();
        let part_removed: Vec<Vec<u8>> = removed[chunk(removed.len())]
            .iter()
            .map(|k| k.as_bytes().to_vec())
            .collect();
        let part_changed: Vec<crate::AllowedIpsChange> = changed[chunk(changed.len())]
            .iter()
            .map(wire_change)
            .collect();
        let mut message = if i == 0 {
            first_part(
                epoch,
                revision,
                view,
                update,
                part_peers,
                part_removed,
                part_changed,
            )
        } else {
            let update = match update {
                NodeUpdate::Snapshot => peer_update::Update::Snapshot(PeerSnapshot {
                    peers: part_peers,
                    ..PeerSnapshot::default()
                }),
                NodeUpdate::Delta(_) => peer_update::Update::Delta(PeerDelta {
                    upserted: part_peers,
                    removed: part_removed,
                    changed_allowed_ips: part_changed,
                    ..PeerDelta::default()
                }),
            };
            PeerUpdate {
                epoch: epoch.to_owned(),
                revision,
                update: Some(update),
                ..PeerUpdate::default()
            }
        };
        message.more_parts = i + 1 < parts;
        message
    })
}
