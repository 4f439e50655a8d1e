//! One node's configuration as its agent holds it ([`AgentConfig`]): what the controller's
//! messages built, every value typed and checked at the wire's edge (`wgmesh_proto::decode`),
//! the per-pair preshared keys already resolved. The controller's side of the same view is
//! [`crate::node_config::NodeConfig`], which shares its peer entries between nodes; this one
//! is self-contained, so that it can be saved on the node and programmed again after a
//! restart. And the agent's one judgement of a new view: program it, leave, or refuse it
//! ([`verdict`]).

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::diff::AllowedIpsChange;
use crate::{Cidr, Key, PublicKey};

/// Why a node is not a member of a mesh. Only the mesh ends a membership: the first three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum Departure {
    /// A member, or the reason is unknown (an older controller).
    #[default]
    Unspecified,
    MeshDeleted,
    NodeDeleted,
    NodeNotSelected,
    /// No membership yet (registration pending or refused): not an instruction to leave.
    NotRegistered,
}

impl Departure {
    /// Whether the node is to remove its data path.
    pub fn ends_membership(self) -> bool {
        matches!(
            self,
            Departure::MeshDeleted | Departure::NodeDeleted | Departure::NodeNotSelected
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Departure::Unspecified => "Unspecified",
            Departure::MeshDeleted => "MeshDeleted",
            Departure::NodeDeleted => "NodeDeleted",
            Departure::NodeNotSelected => "NodeNotSelected",
            Departure::NotRegistered => "NotRegistered",
        }
    }
}

/// A peer as this node programs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPeer {
    pub public_key: PublicKey,
    /// The WireGuardPeer's name, for logs and metrics.
    pub name: String,
    /// `ip:port`, `[v6]:port`, or `host:port` for the agent to resolve; `None`: answered
    /// wherever it comes from.
    pub endpoint: Option<String>,
    /// Sorted, without duplicates.
    pub allowed_ips: Vec<Cidr>,
    /// Seconds; 0 is off.
    pub persistent_keepalive: u16,
    /// The key for this pair (the peer's own, or derived for two nodes).
    pub preshared_key: Option<Key>,
    /// The Node this peer is; `None` for an external peer.
    pub node: Option<String>,
}

/// Everything the node should have of one mesh. `S` is the wire's interface settings type:
/// core only carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig<S> {
    /// The controller process that numbered the revisions, and the revision.
    pub epoch: String,
    pub revision: u64,
    /// The mesh's interface settings; `None` before the first message.
    pub settings: Option<S>,
    /// The interface addresses (`10.250.0.3/16`); empty when not a member.
    pub addresses: Vec<IpNet>,
    /// The Node's pod CIDRs (network addresses).
    pub pod_cidrs: Vec<IpNet>,
    pub peers: BTreeMap<PublicKey, AgentPeer>,
    /// Why the node is not a member, from the last snapshot.
    pub departure: Departure,
    /// How many nodes are members of the mesh (0: not said).
    pub members: u32,
}

impl<S> Default for AgentConfig<S> {
    fn default() -> Self {
        AgentConfig {
            epoch: String::new(),
            revision: 0,
            settings: None,
            addresses: Vec::new(),
            pod_cidrs: Vec::new(),
            peers: BTreeMap::new(),
            departure: Departure::Unspecified,
            members: 0,
        }
    }
}

/// One stream message, checked and typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUpdate<S> {
    pub epoch: String,
    pub revision: u64,
    /// The Node's key rotation request, when it carries one.
    pub rotate_key_request: Option<String>,
    pub change: AgentChange<S>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentChange<S> {
    /// The whole view: replaces everything.
    Snapshot {
        peers: Vec<AgentPeer>,
        settings: Option<S>,
        addresses: Vec<IpNet>,
        pod_cidrs: Vec<IpNet>,
        departure: Departure,
        members: u32,
    },
    /// What changed; `None` and empty lists leave a value as it is.
    Delta {
        upserted: Vec<AgentPeer>,
        removed: Vec<PublicKey>,
        settings: Option<S>,
        addresses: Option<Vec<IpNet>>,
        pod_cidrs: Option<Vec<IpNet>>,
        members: Option<u32>,
        /// Peers held whose allowed IPs alone change, none of them upserted or removed.
        allowed_ips_changes: Vec<AllowedIpsChange>,
    },
}

impl<S> AgentConfig<S> {
    /// Whether `update` applies to this state: a snapshot always; a delta only to the state
    /// it was computed from, of its epoch and at its revision or before (a resumed stream's
    /// first delta may carry only the settings, at the revision the agent has), and whose
    /// changes of allowed IPs fit the peers held. A delta to anything else would leave a mix
    /// of two states.
    pub fn follows(&self, update: &AgentUpdate<S>) -> bool {
        match &update.change {
            AgentChange::Snapshot { .. } => true,
            AgentChange::Delta {
                allowed_ips_changes,
                ..
            } => {
                !self.epoch.is_empty()
                    && update.epoch == self.epoch
                    && update.revision >= self.revision
                    && allowed_ips_changes.iter().all(|c| {
                        self.peers
                            .get(&c.public_key)
                            .is_some_and(|p| c.fits(&p.allowed_ips))
                    })
            }
        }
    }

    /// Applies one (already checked) message.
    pub fn apply(&mut self, update: AgentUpdate<S>) {
        match update.change {
            AgentChange::Snapshot {
                peers,
                settings,
                addresses,
                pod_cidrs,
                departure,
                members,
            } => {
                self.peers = peers.into_iter().map(|p| (p.public_key, p)).collect();
                self.settings = settings;
                self.addresses = addresses;
                self.pod_cidrs = pod_cidrs;
                self.departure = departure;
                self.members = members;
            }
            AgentChange::Delta {
                upserted,
                removed,
                settings,
                addresses,
                pod_cidrs,
                members,
                allowed_ips_changes,
            } => {
                for key in &removed {
                    self.peers.remove(key);
                }
                self.peers
                    .extend(upserted.into_iter().map(|p| (p.public_key, p)));
                for change in &allowed_ips_changes {
                    if let Some(peer) = self.peers.get_mut(&change.public_key) {
                        peer.allowed_ips = change.applied_to(&peer.allowed_ips);
                    }
                }
                if settings.is_some() {
                    self.settings = settings;
                }
                if let Some(a) = addresses {
                    self.addresses = a;
                }
                if let Some(c) = pod_cidrs {
                    self.pod_cidrs = c;
                }
                if let Some(m) = members {
                    self.members = m;
                }
            }
        }
        self.epoch = update.epoch;
        self.revision = update.revision;
    }

    /// Whether the node is a member: it has tunnel addresses.
    pub fn is_member(&self) -> bool {
        !self.addresses.is_empty()
    }

    /// Every network routed into the interface: all peers' allowed IPs, sorted, once each.
    pub fn routes(&self) -> Vec<IpNet> {
        let mut nets: Vec<IpNet> = self
            .peers
            .values()
            .flat_map(|p| p.allowed_ips.iter().map(Cidr::net))
            .collect();
        nets.sort();
        nets.dedup();
        nets
    }
}

/// What the agent does with a new view of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Program it on the node.
    Program,
    /// The mesh says this node leaves it: remove the data path (interface, routes, guards,
    /// rules, CNI configuration, saved configuration). The key stays.
    Leave(Departure),
    /// Keep what is programmed: the view would wipe the data plane without the mesh saying
    /// so (a controller bug, a cache emptied by an API blip). Reported, never applied.
    Refuse(String),
}

/// Whether the agent may take the node from `programmed` to `next`. Only the mesh ends a
/// membership (mesh deleted, Node deleted, Node deselected); a view that drops it for any
/// other reason, or that leaves a member with no peers while other members exist, is refused.
pub fn verdict<S>(programmed: &AgentConfig<S>, next: &AgentConfig<S>) -> Verdict {
    if !next.is_member() {
        if next.departure.ends_membership() {
            return Verdict::Leave(next.departure);
        }
        if programmed.is_member() {
            return Verdict::Refuse(format!(
                "revision {}: would end this node's membership, but the mesh gives no reason to leave ({})",
                next.revision,
                next.departure.as_str()
            ));
        }
        return Verdict::Program;
    }
    if next.peers.is_empty() && !programmed.peers.is_empty() && next.members > 1 {
        return Verdict::Refuse(format!(
            "revision {}: would remove all {} peers while {} members exist",
            next.revision,
            programmed.peers.len(),
            next.members
        ));
    }
    Verdict::Program
}

#[cfg(test)]
#[path = "agent_config_tests.rs"]
mod tests;
