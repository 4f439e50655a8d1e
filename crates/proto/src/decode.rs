//! Stream messages back to a node's typed configuration ([`wgmesh_core::agent_config`]): the
//! agent's edge of the wire. Every field is checked here, and an error names the field, so a
//! malformed message is refused whole and changes nothing. The reverse, [`snapshot`], is how
//! the agent saves what it programmed.

use ipnet::IpNet;
use wgmesh_core::agent_config::{AgentChange, AgentConfig, AgentPeer, AgentUpdate, Departure};
use wgmesh_core::diff::AllowedIpsChange;
use wgmesh_core::validate::check_endpoint;
use wgmesh_core::{Cidr, Key, PublicKey};

use crate::{MeshSettings, Peer, PeerSnapshot, PeerUpdate, peer_update};

/// A field of a stream message that does not hold what the API says it must.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Where, such as `delta.upserted[2].allowed_ips[0]`.
    pub field: String,
    pub problem: String,
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

impl std::error::Error for DecodeError {}

fn err(field: impl Into<String>, problem: impl Into<String>) -> DecodeError {
    DecodeError {
        field: field.into(),
        problem: problem.into(),
    }
}

fn key(field: &str, bytes: &[u8]) -> Result<PublicKey, DecodeError> {
    <[u8; 32]>::try_from(bytes)
        .map(PublicKey::from_bytes)
        .map_err(|_| err(field, format!("must be 32 bytes, got {}", bytes.len())))
}

fn peer(field: &str, p: &Peer) -> Result<AgentPeer, DecodeError> {
    let public_key = key(&format!("{field}.public_key"), &p.public_key)?;
    let allowed_ips = cidrs(&format!("{field}.allowed_ips"), &p.allowed_ips)?;
    let endpoint = match p.endpoint.as_str() {
        "" => None,
        e => {
            check_endpoint(e).map_err(|problem| err(format!("{field}.endpoint"), problem))?;
            Some(e.to_owned())
        }
    };
    let preshared_key = match p.preshared_key.len() {
        0 => None,
        32 => Some(Key::from_bytes(
            <[u8; 32]>::try_from(p.preshared_key.as_slice()).expect("length checked"),
        )),
        n => {
            return Err(err(
                format!("{field}.preshared_key"),
                format!("must be empty or 32 bytes, got {n}"),
            ));
        }
    };
    let persistent_keepalive = u16::try_from(p.persistent_keepalive).map_err(|_| {
        err(
            format!("{field}.persistent_keepalive"),
            format!("{} is more than 65535 seconds", p.persistent_keepalive),
        )
    })?;
    Ok(AgentPeer {
        public_key,
        name: p.name.clone(),
        endpoint,
        allowed_ips,
        persistent_keepalive,
        preshared_key,
        node: (!p.node.is_empty()).then(|| p.node.clone()),
    })
}

/// A list of CIDRs, sorted, each once.
fn cidrs(field: &str, list: &[String]) -> Result<Vec<Cidr>, DecodeError> {
    let mut out = list
        .iter()
        .enumerate()
        .map(|(i, c)| {
            Cidr::parse_masked(c).map_err(|e| err(format!("{field}[{i}]"), format!("{c:?}: {e}")))
        })
        .collect::<Result<Vec<Cidr>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// A delta's changes of allowed IPs: each of a peer the delta neither upserts nor removes,
/// each peer once, no network both added and removed.
fn allowed_ips_changes(
    field: &str,
    list: &[crate::AllowedIpsChange],
    upserted: &[AgentPeer],
    removed: &[PublicKey],
) -> Result<Vec<AllowedIpsChange>, DecodeError> {
    let mut seen = std::collections::BTreeSet::new();
    list.iter()
        .enumerate()
        .map(|(i, c)| {
            let field = format!("{field}[{i}]");
            let public_key = key(&format!("{field}.public_key"), &c.public_key)?;
            if !seen.insert(public_key)
                || upserted.iter().any(|p| p.public_key == public_key)
                || removed.contains(&public_key)
            {
                return Err(err(
                    format!("{field}.public_key"),
                    "names a peer the delta already changes",
                ));
            }
            let added = cidrs(&format!("{field}.added"), &c.added)?;
            let removed = cidrs(&format!("{field}.removed"), &c.removed)?;
            if let Some(both) = added.iter().find(|a| removed.binary_search(a).is_ok()) {
                return Err(err(field, format!("{both} is both added and removed")));
            }
            Ok(AllowedIpsChange {
                public_key,
                added,
                removed,
            })
        })
        .collect()
}

fn peers(field: &str, list: &[Peer]) -> Result<Vec<AgentPeer>, DecodeError> {
    list.iter()
        .enumerate()
        .map(|(i, p)| peer(&format!("{field}[{i}]"), p))
        .collect()
}

/// Interface addresses: an address with the pool's prefix (`10.250.0.3/16`).
fn addresses(field: &str, list: &[String]) -> Result<Vec<IpNet>, DecodeError> {
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            a.parse::<IpNet>().map_err(|_| {
                err(
                    format!("{field}[{i}]"),
                    format!("{a:?} is not an address with a prefix"),
                )
            })
        })
        .collect()
}

/// Pod CIDRs: networks (`10.244.1.0/24`), host bits clear.
fn pod_cidrs(field: &str, list: &[String]) -> Result<Vec<IpNet>, DecodeError> {
    list.iter()
        .enumerate()
        .map(|(i, c)| {
            Cidr::parse_strict(c)
                .map(|c| c.net())
                .map_err(|e| err(format!("{field}[{i}]"), format!("{c:?}: {e}")))
        })
        .collect()
}

fn departure(value: i32) -> Departure {
    match crate::Departure::try_from(value) {
        Ok(crate::Departure::MeshDeleted) => Departure::MeshDeleted,
        Ok(crate::Departure::NodeDeleted) => Departure::NodeDeleted,
        Ok(crate::Departure::NodeNotSelected) => Departure::NodeNotSelected,
        Ok(crate::Departure::NotRegistered) => Departure::NotRegistered,
        // A reason this agent does not know (a newer controller): never a reason to leave.
        Ok(crate::Departure::Unspecified) | Err(_) => Departure::Unspecified,
    }
}

/// The wire's value of a departure.
pub fn wire_departure(d: Departure) -> crate::Departure {
    match d {
        Departure::Unspecified => crate::Departure::Unspecified,
        Departure::MeshDeleted => crate::Departure::MeshDeleted,
        Departure::NodeDeleted => crate::Departure::NodeDeleted,
        Departure::NodeNotSelected => crate::Departure::NodeNotSelected,
        Departure::NotRegistered => crate::Departure::NotRegistered,
    }
}

impl TryFrom<&PeerUpdate> for AgentUpdate<MeshSettings> {
    type Error = DecodeError;

    fn try_from(u: &PeerUpdate) -> Result<Self, DecodeError> {
        let change = match &u.update {
            Some(peer_update::Update::Snapshot(s)) => AgentChange::Snapshot {
                peers: peers("snapshot.peers", &s.peers)?,
                settings: s.mesh.clone(),
                addresses: addresses("snapshot.tunnel_addresses", &s.tunnel_addresses)?,
                pod_cidrs: pod_cidrs("snapshot.pod_cidrs", &s.pod_cidrs)?,
                departure: departure(s.departure),
                members: s.members,
            },
            Some(peer_update::Update::Delta(d)) => {
                let upserted = peers("delta.upserted", &d.upserted)?;
                let removed: Vec<PublicKey> = d
                    .removed
                    .iter()
                    .enumerate()
                    .map(|(i, k)| key(&format!("delta.removed[{i}]"), k))
                    .collect::<Result<_, _>>()?;
                let allowed_ips_changes = allowed_ips_changes(
                    "delta.changed_allowed_ips",
                    &d.changed_allowed_ips,
                    &upserted,
                    &removed,
                )?;
                AgentChange::Delta {
                    upserted,
                    removed,
                    allowed_ips_changes,
                    settings: d.mesh.clone(),
                    addresses: (!d.tunnel_addresses.is_empty())
                        .then(|| addresses("delta.tunnel_addresses", &d.tunnel_addresses))
                        .transpose()?,
                    pod_cidrs: (!d.pod_cidrs.is_empty())
                        .then(|| pod_cidrs("delta.pod_cidrs", &d.pod_cidrs))
                        .transpose()?,
                    members: (d.members != 0).then_some(d.members),
                }
            }
            None => return Err(err("update", "carries neither a snapshot nor a delta")),
        };
        Ok(AgentUpdate {
            epoch: u.epoch.clone(),
            revision: u.revision,
            rotate_key_request: (!u.rotate_key_request.is_empty())
                .then(|| u.rotate_key_request.clone()),
            change,
        })
    }
}

/// A peer back on the wire.
fn wire_peer(p: &AgentPeer) -> Peer {
    Peer {
        public_key: p.public_key.as_bytes().to_vec(),
        name: p.name.clone(),
        endpoint: p.endpoint.clone().unwrap_or_default(),
        allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
        persistent_keepalive: u32::from(p.persistent_keepalive),
        preshared_key: p
            .preshared_key
            .map(|k| k.as_bytes().to_vec())
            .unwrap_or_default(),
        node: p.node.clone().unwrap_or_default(),
    }
}

/// Most peers an update joined from parts may carry: far above any mesh we run (5,000 nodes),
/// and a bound on what a stream of endless parts could make an agent hold.
pub const MAX_JOINED_PEERS: usize = 100_000;

/// Joins an update the controller sent in parts (`PeerUpdate.more_parts`) back into one
/// message, which then decodes like any other. Parts of another revision, epoch or kind than
/// the first are a broken stream: refused, and the agent reconnects.
#[derive(Debug, Default)]
pub struct PartsJoiner {
    pending: Option<PeerUpdate>,
}

impl PartsJoiner {
    /// Takes the next stream message: the whole update once its last part arrived.
    pub fn push(&mut self, part: PeerUpdate) -> Result<Option<PeerUpdate>, DecodeError> {
        let more = part.more_parts;
        let joined = match self.pending.take() {
            None => part,
            Some(mut first) => {
                if first.epoch != part.epoch || first.revision != part.revision {
                    return Err(err(
                        "more_parts",
                        format!(
                            "a part of revision {} {} arrived within revision {} {}",
                            part.epoch, part.revision, first.epoch, first.revision
                        ),
                    ));
                }
                match (&mut first.update, part.update) {
                    (
                        Some(peer_update::Update::Snapshot(whole)),
                        Some(peer_update::Update::Snapshot(more)),
                    ) => whole.peers.extend(more.peers),
                    (
                        Some(peer_update::Update::Delta(whole)),
                        Some(peer_update::Update::Delta(more)),
                    ) => {
                        whole.upserted.extend(more.upserted);
                        whole.removed.extend(more.removed);
                        whole.changed_allowed_ips.extend(more.changed_allowed_ips);
                    }
                    _ => return Err(err("more_parts", "a part of another kind of update")),
                }
                first
            }
        };
        let peers = match &joined.update {
            Some(peer_update::Update::Snapshot(s)) => s.peers.len(),
            Some(peer_update::Update::Delta(d)) => {
                d.upserted.len() + d.removed.len() + d.changed_allowed_ips.len()
            }
            None => 0,
        };
        if peers > MAX_JOINED_PEERS {
            return Err(err(
                "more_parts",
                format!("an update of more than {MAX_JOINED_PEERS} peers"),
            ));
        }
        if more {
            self.pending = Some(joined);
            Ok(None)
        } else {
            Ok(Some(PeerUpdate {
                more_parts: false,
                ..joined
            }))
        }
    }
}

/// The whole configuration as one snapshot message: decoding it gives it back.
pub fn snapshot(config: &AgentConfig<MeshSettings>) -> PeerUpdate {
    PeerUpdate {
        epoch: config.epoch.clone(),
        revision: config.revision,
        rotate_key_request: String::new(),
        more_parts: false,
        update: Some(peer_update::Update::Snapshot(PeerSnapshot {
            peers: config.peers.values().map(wire_peer).collect(),
            mesh: config.settings.clone(),
            tunnel_addresses: config.addresses.iter().map(ToString::to_string).collect(),
            pod_cidrs: config.pod_cidrs.iter().map(ToString::to_string).collect(),
            departure: wire_departure(config.departure) as i32,
            members: config.members,
        })),
    }
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
