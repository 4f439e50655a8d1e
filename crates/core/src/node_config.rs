//! One node's view of a mesh ([`NodeConfig`]), and what to send a node to take it from one
//! view to the next ([`next_update`]): a snapshot, a delta, or nothing.
//!
//! Shaped for thousands of nodes: a view holds the mesh's shared desired state (one
//! reference-counted entry per peer, shared by every node) and only what is the node's own
//! (its membership: key, addresses, pod CIDRs). What differs per node when a message is encoded
//! (leaving itself out, its per-pair preshared keys) is derived then, never stored per node.
//!
//! The settings type is the caller's (the wire's interface settings): core only compares them.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::agent_config::Departure;
use crate::desired::{
    DesiredMesh, DesiredPeer, Member, PresharedKey, View, overlaps_any, own_networks,
    pair_preshared_key, without_own_networks,
};
use crate::diff::{AllowedIpsChange, diff_peer_sets, diff_peer_sets_over, sorted_difference};
use crate::{Cidr, Key, PublicKey};

/// What one node should have of one mesh.
#[derive(Debug, Clone)]
pub struct NodeConfig<S> {
    /// The mesh's interface settings; `None` while the mesh does not exist.
    pub settings: Option<Arc<S>>,
    /// The node's membership; `None` when it is not a member (no peers then).
    pub member: Option<Member>,
    /// The mesh's desired state, shared by every node's view.
    pub desired: Arc<DesiredMesh>,
    /// Why the node is not a member (`Unspecified` for a member): the agent removes its data
    /// path only for the reasons that end a membership.
    pub departure: Departure,
}

static NO_PEERS: BTreeMap<PublicKey, Arc<DesiredPeer>> = BTreeMap::new();

impl<S> NodeConfig<S> {
    /// Node `node`'s view of a mesh's desired state.
    pub fn of(node: &str, settings: Option<Arc<S>>, desired: Arc<DesiredMesh>) -> Self {
        let member = desired.members.get(node).cloned();
        let departure = match (&member, desired.non_members.get(node)) {
            (Some(_), _) => Departure::Unspecified,
            (None, Some(why)) => *why,
            // Computed from a synced cache without this Node: it was deleted.
            (None, None) => Departure::NodeDeleted,
        };
        NodeConfig {
            settings,
            member,
            desired,
            departure,
        }
    }

    /// The view of a node whose mesh is gone (deleted, or absent from a synced cache).
    pub fn mesh_deleted() -> Self {
        NodeConfig {
            settings: None,
            member: None,
            desired: Arc::default(),
            departure: Departure::MeshDeleted,
        }
    }

    /// The node's own public key, when it is a member.
    pub fn own_key(&self) -> Option<PublicKey> {
        self.member.as_ref().map(|m| m.public_key)
    }

    /// The shared peer set the node's peers come from (its own key included, if present):
    /// every peer for gateways, the interior view for the others, none for non-members.
    pub fn shared_peers(&self) -> &BTreeMap<PublicKey, Arc<DesiredPeer>> {
        match &self.member {
            Some(m) => self.desired.visible_to(m),
            None => &NO_PEERS,
        }
    }

    /// The node's peers: the shared set without itself.
    pub fn peers(&self) -> impl Iterator<Item = &Arc<DesiredPeer>> {
        let own = self.own_key();
        self.shared_peers()
            .values()
            .filter(move |p| Some(p.public_key) != own)
    }

    /// How many peers the node has.
    pub fn peer_count(&self) -> usize {
        let shared = self.shared_peers();
        shared.len() - usize::from(self.own_key().is_some_and(|k| shared.contains_key(&k)))
    }

    /// `peer` as this node gets it: as shared, except the relay for a node behind NAT, whose
    /// allowed IPs carry every node behind NAT's networks but never this node's own.
    pub fn as_sent<'a>(&self, peer: &'a DesiredPeer) -> Cow<'a, DesiredPeer> {
        let Some((me, relay_key)) = self.behind_nat_with_relay() else {
            return Cow::Borrowed(peer);
        };
        if relay_key != peer.public_key {
            return Cow::Borrowed(peer);
        }
        let mine = self.desired.peers.get(&me.public_key).map(|p| &**p);
        let allowed_ips = without_own_networks(peer, me, mine);
        if allowed_ips == peer.allowed_ips {
            return Cow::Borrowed(peer);
        }
        // A new peer (its encoding memo starts empty): the shared one's bytes are not ours.
        Cow::Owned(DesiredPeer {
            allowed_ips,
            ..peer.clone()
        })
    }

    /// For a member behind NAT: the relay's key and the member's own networks, which its copy
    /// of the relay leaves out ([`Self::as_sent`]); `None` for every other node.
    fn relay_filter(&self) -> Option<(PublicKey, Vec<Cidr>)> {
        let (me, relay_key) = self.behind_nat_with_relay()?;
        let mine = self.desired.peers.get(&me.public_key).map(|p| &**p);
        Some((relay_key, own_networks(me, mine)))
    }

    /// This node and its relay's key, when the node is a member behind NAT with a relay.
    fn behind_nat_with_relay(&self) -> Option<(&Member, PublicKey)> {
        let me = self.member.as_ref().filter(|m| m.behind_nat)?;
        let relay = self.desired.relay.as_ref()?;
        Some((me, self.desired.members.get(relay)?.public_key))
    }

    /// The preshared key this node uses with `peer`: the peer's own, or the pair's key derived
    /// from the mesh secret (node peers, when the mesh has one), or none.
    pub fn preshared_key(&self, peer: &DesiredPeer) -> Option<Key> {
        match (&peer.preshared_key, &self.member) {
            (PresharedKey::Static(k), _) => Some(*k),
            (PresharedKey::DerivedFromMesh, Some(me)) if peer.node.is_some() => me
                .mesh_secret
                .as_ref()
                .map(|secret| pair_preshared_key(secret, &me.public_key, &peer.public_key)),
            _ => None,
        }
    }
}

/// What changed for a node between two views. Only what changed is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDelta<S> {
    /// Peers to add or replace, whole, sorted by key.
    pub upserted: Vec<Arc<DesiredPeer>>,
    /// Peers to remove, sorted.
    pub removed: Vec<PublicKey>,
    pub settings: Option<Arc<S>>,
    /// The node's interface addresses, when they changed.
    pub addresses_changed: bool,
    /// The node's pod CIDRs, when they changed.
    pub pod_cidrs_changed: bool,
    /// Peers the node holds whose allowed IPs are all that changed, sorted by key: set only
    /// for agents that take such changes ([`NodeDelta::with_allowed_ips_changes`]).
    pub allowed_ips_changes: Vec<AllowedIpsChange>,
}

/// How one upserted peer goes to an agent that takes changes of allowed IPs.
enum Sent {
    Whole,
    Change(AllowedIpsChange),
    /// The peer changed only where this node's copy leaves it out (the relay, in networks
    /// of the node's own): the node's copy is as it was.
    Nothing,
}

impl<S> NodeDelta<S> {
    /// This delta from `sent` to `now` (the views it was computed between) for an agent that
    /// takes changes of allowed IPs (`WatchPeersRequest.accepts_allowed_ips_changes`): an
    /// upserted peer that the node holds with every other field as it is goes as the change
    /// of its allowed IPs instead, when that is shorter than its list. A node behind NAT gets
    /// the change of its own copy of the relay; while its own networks and the relay stay
    /// the same, that is the shared change without its own networks, O(change), not O(list).
    pub fn with_allowed_ips_changes(mut self, sent: &NodeConfig<S>, now: &NodeConfig<S>) -> Self {
        let (before, after) = (sent.relay_filter(), now.relay_filter());
        // The node's copy of the relay is the shared one filtered the same way on both sides.
        let same_filter = (before == after).then_some(after.as_ref()).flatten();
        let filtered = |f: &Option<(PublicKey, Vec<Cidr>)>, key: &PublicKey| {
            f.as_ref().is_some_and(|(relay, _)| relay == key)
        };
        let same_secret = sent
            .member
            .as_ref()
            .map(|m| (&m.public_key, &m.mesh_secret))
            == now.member.as_ref().map(|m| (&m.public_key, &m.mesh_secret));
        let mut upserted = Vec::with_capacity(self.upserted.len());
        for new in std::mem::take(&mut self.upserted) {
            let key = new.public_key;
            let sent_as = match sent.shared_peers().get(&key) {
                Some(old) if same_secret && same_but_allowed_ips(old, &new) => {
                    if !filtered(&before, &key) && !filtered(&after, &key) {
                        let diff = new.allowed_ips_diff.get_or_init(&new, old);
                        change(key, diff.0.clone(), diff.1.clone(), new.allowed_ips.len())
                    } else if let Some((_, own)) = same_filter {
                        let diff = new.allowed_ips_diff.get_or_init(&new, old);
                        let mine = |list: &[Cidr]| -> Vec<Cidr> {
                            list.iter()
                                .filter(|c| !overlaps_any(own, c))
                                .copied()
                                .collect()
                        };
                        // The list's length as shared: at most a few entries longer than the
                        // node's copy, and not worth the O(list) filtering to know.
                        change(key, mine(&diff.0), mine(&diff.1), new.allowed_ips.len())
                    } else {
                        // The node's own networks or the relay moved: compare its copies.
                        let (old_copy, new_copy) = (sent.as_sent(old), now.as_sent(&new));
                        let (added, removed) =
                            sorted_difference(&old_copy.allowed_ips, &new_copy.allowed_ips);
                        change(key, added, removed, new_copy.allowed_ips.len())
                    }
                }
                _ => Sent::Whole,
            };
            match sent_as {
                Sent::Whole => upserted.push(new),
                Sent::Change(c) => self.allowed_ips_changes.push(c),
                Sent::Nothing => {}
            }
        }
        self.upserted = upserted;
        self
    }
}

/// Whether two versions of a peer differ in their allowed IPs alone (the encoding memos
/// aside).
fn same_but_allowed_ips(old: &DesiredPeer, new: &DesiredPeer) -> bool {
    old.public_key == new.public_key
        && old.name == new.name
        && old.endpoint == new.endpoint
        && old.persistent_keepalive == new.persistent_keepalive
        && old.preshared_key == new.preshared_key
        && old.node == new.node
}

/// A change of `added` and `removed`, sent as such only when shorter than the list it
/// changes (`list_len` entries after it).
fn change(key: PublicKey, added: Vec<Cidr>, removed: Vec<Cidr>, list_len: usize) -> Sent {
    if added.is_empty() && removed.is_empty() {
        Sent::Nothing
    } else if added.len() + removed.len() >= list_len {
        Sent::Whole
    } else {
        Sent::Change(AllowedIpsChange {
            public_key: key,
            added,
            removed,
        })
    }
}

/// What to send a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeUpdate<S> {
    /// The whole view (the node's first message, or when a delta would be larger or every
    /// derived key changed).
    Snapshot,
    Delta(NodeDelta<S>),
}

/// The update that takes a node from the view it was last sent (`sent`, `None` before the
/// first message) to `now`, or `None` when nothing it holds changed.
pub fn next_update<S: PartialEq>(
    sent: Option<&NodeConfig<S>>,
    now: &NodeConfig<S>,
) -> Option<NodeUpdate<S>> {
    next_update_within(sent, now, None)
}

/// [`next_update`], told which peers may have changed since `sent` (`changed`: every key
/// whose peer differs between the two desired states, in either shared view), so that only
/// those are compared. `None`: not known, every peer is compared.
pub fn next_update_within<S: PartialEq>(
    sent: Option<&NodeConfig<S>>,
    now: &NodeConfig<S>,
    changed: Option<&BTreeSet<PublicKey>>,
) -> Option<NodeUpdate<S>> {
    let Some(sent) = sent else {
        return Some(NodeUpdate::Snapshot);
    };
    // A membership that ends, or a reason that changes, is said with the whole view.
    if sent.departure != now.departure {
        return Some(NodeUpdate::Snapshot);
    }
    let (before, after) = (sent.member.as_ref(), now.member.as_ref());
    // Our own key or the mesh secret changed: every derived preshared key changes too.
    if before.is_some()
        && before.map(|m| (&m.public_key, &m.mesh_secret))
            != after.map(|m| (&m.public_key, &m.mesh_secret))
    {
        return Some(NodeUpdate::Snapshot);
    }
    let own = now.own_key();
    // The hint covers each shared view's own changes; a node that moved between views (the
    // gateways', the interior nodes', the one behind NAT) compares everything.
    let same_view = before.map(View::of) == after.map(View::of);
    let peers = match changed {
        Some(keys) if same_view => {
            diff_peer_sets_over(sent.shared_peers(), now.shared_peers(), own.as_ref(), keys)
        }
        _ => diff_peer_sets(sent.shared_peers(), now.shared_peers(), own.as_ref()),
    };
    let settings_changed = sent.settings.as_deref() != now.settings.as_deref();
    let addresses_changed =
        before.map(|m| &m.interface_addresses) != after.map(|m| &m.interface_addresses);
    let rotation_changed =
        before.map(|m| &m.rotate_key_request) != after.map(|m| &m.rotate_key_request);
    let pod_cidrs_changed = before.map(|m| &m.pod_cidrs) != after.map(|m| &m.pod_cidrs);
    if peers.is_empty()
        && !settings_changed
        && !addresses_changed
        && !rotation_changed
        && !pod_cidrs_changed
    {
        return None;
    }
    // Far behind: a snapshot is smaller than the delta.
    if peers.upserted.len() + peers.removed.len() > now.peer_count().max(8) {
        return Some(NodeUpdate::Snapshot);
    }
    Some(NodeUpdate::Delta(NodeDelta {
        upserted: peers.upserted,
        removed: peers.removed,
        settings: if settings_changed {
            now.settings.clone()
        } else {
            None
        },
        addresses_changed,
        pod_cidrs_changed,
        allowed_ips_changes: Vec::new(),
    }))
}

#[cfg(test)]
#[path = "node_config_tests.rs"]
mod tests;
