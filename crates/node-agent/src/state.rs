//! The agent's view of what the controller wants (applied from the stream), and the pure
//! decision of what to change on the device to get there.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use ipnet::IpNet;
use wgmesh_core::{Cidr, Key, PublicKey};
use wgmesh_proto as pb;

use wgmesh_device::{BackendKind, DeviceChange, DeviceState, PeerConfig, Requested};

/// WireGuard's customary port, used until the mesh says otherwise.
pub const DEFAULT_LISTEN_PORT: u32 = 51820;

/// What the controller has sent so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    pub epoch: String,
    pub revision: u64,
    pub settings: Option<pb::MeshSettings>,
    /// Interface addresses, such as `10.250.0.3/16`.
    pub addresses: Vec<IpNet>,
    /// The Node's pod CIDRs (used in CNI mode).
    pub pod_cidrs: Vec<IpNet>,
    pub peers: BTreeMap<PublicKey, pb::Peer>,
    /// Why the node is not a member, from the last snapshot (unspecified while it is one).
    pub departure: pb::Departure,
    /// How many nodes are members of the mesh (0: not said).
    pub members: u32,
}

/// What the agent does with a new view of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Program it on the node.
    Program,
    /// The mesh says this node leaves it: remove the data path (interface, routes, rules,
    /// CNI configuration, saved configuration). The key stays.
    Leave(pb::Departure),
    /// Keep what is programmed: the view would wipe the data plane without the mesh saying
    /// so (a controller bug, a cache emptied by an API blip). Reported, never applied.
    Refuse(String),
}

/// Whether the agent may take the node from `programmed` to `next`. Only the mesh ends a
/// membership (mesh deleted, Node deleted, Node deselected); a view that drops it for any
/// other reason, or that leaves a member with no peers while other members exist, is refused.
pub fn verdict(programmed: &Desired, next: &Desired) -> Verdict {
    use pb::Departure as D;
    if !next.is_member() {
        if matches!(
            next.departure,
            D::MeshDeleted | D::NodeDeleted | D::NodeNotSelected
        ) {
            return Verdict::Leave(next.departure);
        }
        if programmed.is_member() {
            return Verdict::Refuse(format!(
                "revision {}: would end this node's membership, but the mesh gives no reason to leave ({})",
                next.revision,
                next.departure.as_str_name()
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

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UpdateError {
    #[error("peer {name:?}: public key must be 32 bytes, got {len}")]
    Key { name: String, len: usize },
    #[error("removed key must be 32 bytes, got {0}")]
    RemovedKey(usize),
    #[error("tunnel address {0:?} is not an address with a prefix")]
    Address(String),
    #[error("pod CIDR {0:?} is not a CIDR")]
    PodCidr(String),
    #[error("the update carries neither a snapshot nor a delta")]
    Empty,
}

fn key_of(bytes: &[u8]) -> Option<PublicKey> {
    <[u8; 32]>::try_from(bytes).ok().map(PublicKey::from_bytes)
}

impl Desired {
    /// Applies one stream message. A malformed message changes nothing.
    pub fn apply(&mut self, update: &pb::PeerUpdate) -> Result<(), UpdateError> {
        let mut next = self.clone();
        match &update.update {
            Some(pb::peer_update::Update::Snapshot(s)) => {
                next.peers = keyed(&s.peers)?;
                next.settings = s.mesh.clone();
                next.addresses = parse_addresses(&s.tunnel_addresses)?;
                next.pod_cidrs = parse_pod_cidrs(&s.pod_cidrs)?;
                next.departure = s.departure();
                next.members = s.members;
            }
            Some(pb::peer_update::Update::Delta(d)) => {
                for key in &d.removed {
                    let key = key_of(key).ok_or(UpdateError::RemovedKey(key.len()))?;
                    next.peers.remove(&key);
                }
                next.peers.extend(keyed(&d.upserted)?);
                if d.mesh.is_some() {
                    next.settings = d.mesh.clone();
                }
                if !d.tunnel_addresses.is_empty() {
                    next.addresses = parse_addresses(&d.tunnel_addresses)?;
                }
                if !d.pod_cidrs.is_empty() {
                    next.pod_cidrs = parse_pod_cidrs(&d.pod_cidrs)?;
                }
                if d.members != 0 {
                    next.members = d.members;
                }
            }
            None => return Err(UpdateError::Empty),
        }
        next.epoch = update.epoch.clone();
        next.revision = update.revision;
        *self = next;
        Ok(())
    }

    /// Whether the node is a member: it has tunnel addresses.
    pub fn is_member(&self) -> bool {
        !self.addresses.is_empty()
    }

    /// The whole view as one stream message: what the agent saves on the node, and reads
    /// back with [`Desired::apply`] after a restart.
    pub fn to_snapshot(&self) -> pb::PeerUpdate {
        pb::PeerUpdate {
            epoch: self.epoch.clone(),
            revision: self.revision,
            rotate_key_request: String::new(),
            update: Some(pb::peer_update::Update::Snapshot(pb::PeerSnapshot {
                peers: self.peers.values().cloned().collect(),
                mesh: self.settings.clone(),
                tunnel_addresses: self.addresses.iter().map(ToString::to_string).collect(),
                pod_cidrs: self.pod_cidrs.iter().map(ToString::to_string).collect(),
                departure: self.departure as i32,
                members: self.members,
            })),
        }
    }

    /// The mesh's listen port as far as we know (the WireGuard default before the first
    /// registration answers).
    pub fn listen_port(&self) -> u32 {
        self.settings
            .as_ref()
            .map(|s| s.listen_port)
            .unwrap_or(DEFAULT_LISTEN_PORT)
    }

    /// Every network routed into the interface: all peers' allowed IPs.
    pub fn routes(&self) -> Vec<IpNet> {
        let set: BTreeSet<IpNet> = self
            .peers
            .values()
            .flat_map(|p| p.allowed_ips.iter())
            .filter_map(|c| Cidr::parse_masked(c).ok())
            .map(|c| c.net())
            .collect();
        set.into_iter().collect()
    }
}

fn keyed(peers: &[pb::Peer]) -> Result<BTreeMap<PublicKey, pb::Peer>, UpdateError> {
    peers
        .iter()
        .map(|p| {
            key_of(&p.public_key)
                .map(|k| (k, p.clone()))
                .ok_or_else(|| UpdateError::Key {
                    name: p.name.clone(),
                    len: p.public_key.len(),
                })
        })
        .collect()
}

fn parse_addresses(list: &[String]) -> Result<Vec<IpNet>, UpdateError> {
    list.iter()
        .map(|a| a.parse().map_err(|_| UpdateError::Address(a.clone())))
        .collect()
}

/// Pod CIDRs as the controller sends them (network addresses, such as `10.244.1.0/24`).
pub fn parse_pod_cidrs(list: &[String]) -> Result<Vec<IpNet>, UpdateError> {
    list.iter()
        .map(|c| {
            Cidr::parse_strict(c)
                .map(|c| c.net())
                .map_err(|_| UpdateError::PodCidr(c.clone()))
        })
        .collect()
}

/// A peer as the device should have it. `endpoint` is the resolved `pb::Peer::endpoint`
/// (`None` when it is empty or does not resolve).
/// The backend to open: the agent's `--backend` when given, else the mesh's (the CRD's
/// `backend` as the controller sends it; unspecified is `auto`). The one place the wire's
/// backend becomes the device's.
pub fn requested_backend(cli: Option<Requested>, mesh: pb::Backend) -> Requested {
    cli.unwrap_or(match mesh {
        pb::Backend::Kernel => Requested::Kernel,
        pb::Backend::Userspace => Requested::Userspace,
        pb::Backend::Unspecified => Requested::Auto,
    })
}

/// The backend the agent reports on registration: the one running, if the device is open.
pub fn wire_backend(running: Option<BackendKind>) -> pb::Backend {
    match running {
        Some(BackendKind::Kernel) => pb::Backend::Kernel,
        Some(BackendKind::Userspace) => pb::Backend::Userspace,
        None => pb::Backend::Unspecified,
    }
}

pub fn peer_config(peer: &pb::Peer, key: PublicKey, endpoint: Option<SocketAddr>) -> PeerConfig {
    let mut allowed_ips: Vec<Cidr> = peer
        .allowed_ips
        .iter()
        .filter_map(|c| Cidr::parse_masked(c).ok())
        .collect();
    allowed_ips.sort();
    allowed_ips.dedup();
    PeerConfig {
        public_key: key,
        endpoint,
        allowed_ips,
        persistent_keepalive: u16::try_from(peer.persistent_keepalive).unwrap_or(u16::MAX),
        preshared_key: <[u8; 32]>::try_from(peer.preshared_key.as_slice())
            .ok()
            .map(Key::from_bytes),
    }
}

/// The changes that turn the observed device into the wanted peer set: remove what is not
/// wanted, upsert what differs, leave the rest (and its session) alone. An unset endpoint
/// never overrides where a roaming peer was last seen.
pub fn device_changes(observed: &DeviceState, wanted: &[PeerConfig]) -> Vec<DeviceChange> {
    let have: BTreeMap<PublicKey, &PeerConfig> = observed
        .peers
        .iter()
        .map(|p| (p.config.public_key, &p.config))
        .collect();
    let want: BTreeMap<PublicKey, &PeerConfig> = wanted.iter().map(|p| (p.public_key, p)).collect();
    let mut changes = Vec::new();
    for key in have.keys().filter(|k| !want.contains_key(k)) {
        changes.push(DeviceChange::RemovePeer(*key));
    }
    for (key, w) in &want {
        let differs = match have.get(key) {
            None => true,
            Some(h) => {
                let mut h_allowed = h.allowed_ips.clone();
                h_allowed.sort();
                h_allowed != w.allowed_ips
                    || h.persistent_keepalive != w.persistent_keepalive
                    || h.preshared_key != w.preshared_key
                    || (w.endpoint.is_some() && h.endpoint != w.endpoint)
            }
        };
        if differs {
            changes.push(DeviceChange::UpsertPeer((*w).clone()));
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    /// `--backend` wins when given (`auto` included); else the mesh's, unspecified as `auto`.
    /// What runs is reported as it is, and nothing before the device is open.
    #[test]
    fn backend_conversions() {
        use pb::Backend as W;
        use wgmesh_device::{BackendKind, Requested as R};
        for (cli, mesh, want) in [
            (None, W::Unspecified, R::Auto),
            (None, W::Kernel, R::Kernel),
            (None, W::Userspace, R::Userspace),
            (Some(R::Auto), W::Kernel, R::Auto),
            (Some(R::Kernel), W::Userspace, R::Kernel),
            (Some(R::Userspace), W::Kernel, R::Userspace),
            (Some(R::Userspace), W::Unspecified, R::Userspace),
        ] {
            assert_eq!(
                super::requested_backend(cli, mesh),
                want,
                "{cli:?} {mesh:?}"
            );
        }
        assert_eq!(super::wire_backend(None), W::Unspecified);
        assert_eq!(super::wire_backend(Some(BackendKind::Kernel)), W::Kernel);
        assert_eq!(
            super::wire_backend(Some(BackendKind::Userspace)),
            W::Userspace
        );
    }

    use super::*;
    use wgmesh_device::PeerState;

    fn peer(n: u8, endpoint: &str, allowed: &[&str]) -> pb::Peer {
        pb::Peer {
            public_key: vec![n; 32],
            name: format!("p{n}"),
            endpoint: endpoint.into(),
            allowed_ips: allowed.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn config(n: u8, endpoint: Option<&str>, allowed: &[&str]) -> PeerConfig {
        let p = peer(n, "", allowed);
        peer_config(
            &p,
            PublicKey::from_bytes([n; 32]),
            endpoint.map(|e| e.parse().unwrap()),
        )
    }

    fn observed(peers: Vec<PeerConfig>) -> DeviceState {
        DeviceState {
            public_key: PublicKey::from_bytes([0; 32]),
            listen_port: 51820,
            fwmark: 0,
            peers: peers
                .into_iter()
                .map(|config| PeerState {
                    current_endpoint: config.endpoint,
                    config,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                })
                .collect(),
        }
    }

    fn summary(changes: &[DeviceChange]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                DeviceChange::UpsertPeer(p) => format!("+{}", p.public_key.as_bytes()[0]),
                DeviceChange::RemovePeer(k) => format!("-{}", k.as_bytes()[0]),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn verdict_table() {
        use pb::Departure as D;
        let view = |peers: &[u8], member: bool, departure: D, members: u32| Desired {
            revision: 9,
            addresses: if member {
                vec!["10.250.0.1/16".parse().unwrap()]
            } else {
                vec![]
            },
            peers: peers
                .iter()
                .map(|&n| (PublicKey::from_bytes([n; 32]), peer(n, "", &[])))
                .collect(),
            departure,
            members,
            ..Default::default()
        };
        let member3 = view(&[2, 3], true, D::Unspecified, 3);
        let nothing = Desired::default();
        let empty_member = view(&[], true, D::Unspecified, 3);
        let leave = |d| Verdict::Leave(d);
        let refuse = Verdict::Refuse;
        // name, programmed, next, expected
        let cases: Vec<(&str, &Desired, Desired, Verdict)> = vec![
            (
                "a member's change",
                &member3,
                view(&[2, 4], true, D::Unspecified, 3),
                Verdict::Program,
            ),
            (
                "the first snapshot",
                &nothing,
                view(&[2, 3], true, D::Unspecified, 3),
                Verdict::Program,
            ),
            (
                "not registered yet, nothing programmed",
                &nothing,
                view(&[], false, D::NotRegistered, 3),
                Verdict::Program,
            ),
            (
                "mesh deleted",
                &member3,
                view(&[], false, D::MeshDeleted, 0),
                leave(D::MeshDeleted),
            ),
            (
                "node deleted",
                &member3,
                view(&[], false, D::NodeDeleted, 2),
                leave(D::NodeDeleted),
            ),
            (
                "node deselected",
                &member3,
                view(&[], false, D::NodeNotSelected, 2),
                leave(D::NodeNotSelected),
            ),
            (
                "a departure after a restart with nothing programmed still cleans up",
                &nothing,
                view(&[], false, D::MeshDeleted, 0),
                leave(D::MeshDeleted),
            ),
            (
                "membership lost without a reason",
                &member3,
                view(&[], false, D::NotRegistered, 3),
                refuse(
                    "revision 9: would end this node's membership, but the mesh gives no \
                     reason to leave (DEPARTURE_NOT_REGISTERED)"
                        .into(),
                ),
            ),
            (
                "membership lost, from an older controller",
                &member3,
                view(&[], false, D::Unspecified, 0),
                refuse(
                    "revision 9: would end this node's membership, but the mesh gives no \
                     reason to leave (DEPARTURE_UNSPECIFIED)"
                        .into(),
                ),
            ),
            (
                "every peer gone while others are members",
                &member3,
                view(&[], true, D::Unspecified, 3),
                refuse("revision 9: would remove all 2 peers while 3 members exist".into()),
            ),
            (
                "every peer gone, and this node is the last member",
                &member3,
                view(&[], true, D::Unspecified, 1),
                Verdict::Program,
            ),
            (
                "no peers before either",
                &empty_member,
                view(&[], true, D::Unspecified, 3),
                Verdict::Program,
            ),
        ];
        for (name, programmed, next, want) in cases {
            assert_eq!(verdict(programmed, &next), want, "{name}");
        }
    }

    #[test]
    fn a_view_survives_its_snapshot() {
        let mut d = Desired::default();
        d.apply(&pb::PeerUpdate {
            epoch: "e".into(),
            revision: 4,
            rotate_key_request: String::new(),
            update: Some(pb::peer_update::Update::Snapshot(pb::PeerSnapshot {
                peers: vec![peer(1, "a:1", &["10.0.1.0/24"])],
                mesh: Some(pb::MeshSettings::default()),
                tunnel_addresses: vec!["10.250.0.1/16".into()],
                pod_cidrs: vec!["10.244.1.0/24".into()],
                departure: 0,
                members: 2,
            })),
        })
        .unwrap();
        let mut again = Desired::default();
        again.apply(&d.to_snapshot()).unwrap();
        assert_eq!(again, d);
    }

    #[test]
    fn device_changes_table() {
        let a = config(1, Some("192.0.2.1:51820"), &["10.244.1.0/24"]);
        let b = config(2, Some("192.0.2.2:51820"), &["10.244.2.0/24"]);
        let roaming_b = config(2, None, &["10.244.2.0/24"]);
        let b_moved = config(2, Some("192.0.2.9:51820"), &["10.244.2.0/24"]);
        let b_more = config(
            2,
            Some("192.0.2.2:51820"),
            &["10.244.2.0/24", "10.250.0.2/32"],
        );
        // name, device has, controller wants, expected changes
        type Case<'a> = (&'a str, Vec<PeerConfig>, Vec<PeerConfig>, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            (
                "nothing to do",
                vec![a.clone(), b.clone()],
                vec![a.clone(), b.clone()],
                vec![],
            ),
            (
                "add",
                vec![a.clone()],
                vec![a.clone(), b.clone()],
                vec!["+2"],
            ),
            (
                "remove",
                vec![a.clone(), b.clone()],
                vec![a.clone()],
                vec!["-2"],
            ),
            (
                "allowed IPs changed",
                vec![a.clone(), b.clone()],
                vec![a.clone(), b_more],
                vec!["+2"],
            ),
            (
                "endpoint changed",
                vec![b.clone()],
                vec![b_moved],
                vec!["+2"],
            ),
            (
                "no endpoint wanted leaves a roamed one alone",
                vec![b.clone()],
                vec![roaming_b],
                vec![],
            ),
            (
                "from an empty device",
                vec![],
                vec![a.clone(), b.clone()],
                vec!["+1", "+2"],
            ),
        ];
        for (name, have, want, expected) in cases {
            assert_eq!(
                summary(&device_changes(&observed(have), &want)),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn updates_apply_and_malformed_ones_change_nothing() {
        let mut d = Desired::default();
        let snapshot = pb::PeerUpdate {
            epoch: "e".into(),
            revision: 3,
            rotate_key_request: String::new(),
            update: Some(pb::peer_update::Update::Snapshot(pb::PeerSnapshot {
                peers: vec![
                    peer(1, "a:1", &["10.0.1.0/24"]),
                    peer(2, "b:1", &["10.0.2.0/24"]),
                ],
                mesh: Some(pb::MeshSettings {
                    interface_name: "wgmesh0".into(),
                    ..Default::default()
                }),
                tunnel_addresses: vec!["10.250.0.1/16".into()],
                pod_cidrs: vec!["10.244.1.0/24".into()],
                ..Default::default()
            })),
        };
        d.apply(&snapshot).unwrap();
        assert_eq!((d.peers.len(), d.revision, d.addresses.len()), (2, 3, 1));
        assert_eq!(d.pod_cidrs, vec!["10.244.1.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(d.routes().len(), 2);

        let delta = pb::PeerUpdate {
            epoch: "e".into(),
            revision: 4,
            rotate_key_request: String::new(),
            update: Some(pb::peer_update::Update::Delta(pb::PeerDelta {
                upserted: vec![peer(3, "c:1", &["10.0.3.0/24"])],
                removed: vec![vec![1; 32]],
                ..Default::default()
            })),
        };
        d.apply(&delta).unwrap();
        let keys: Vec<u8> = d.peers.keys().map(|k| k.as_bytes()[0]).collect();
        assert_eq!(keys, [2, 3]);
        assert_eq!(
            d.settings.as_ref().unwrap().interface_name,
            "wgmesh0",
            "settings kept"
        );

        let before = d.clone();
        for bad in [
            pb::PeerUpdate {
                update: None,
                ..Default::default()
            },
            pb::PeerUpdate {
                update: Some(pb::peer_update::Update::Delta(pb::PeerDelta {
                    upserted: vec![pb::Peer {
                        public_key: vec![1, 2, 3],
                        ..Default::default()
                    }],
                    ..Default::default()
                })),
                ..Default::default()
            },
            pb::PeerUpdate {
                update: Some(pb::peer_update::Update::Delta(pb::PeerDelta {
                    removed: vec![vec![9; 31]],
                    ..Default::default()
                })),
                ..Default::default()
            },
            pb::PeerUpdate {
                update: Some(pb::peer_update::Update::Delta(pb::PeerDelta {
                    pod_cidrs: vec!["10.244.1.1/24".into()],
                    ..Default::default()
                })),
                ..Default::default()
            },
            pb::PeerUpdate {
                update: Some(pb::peer_update::Update::Snapshot(pb::PeerSnapshot {
                    tunnel_addresses: vec!["garbage".into()],
                    ..Default::default()
                })),
                ..Default::default()
            },
        ] {
            assert!(d.apply(&bad).is_err());
            assert_eq!(d, before, "a malformed message changes nothing");
        }
    }
}

#[cfg(test)]
mod redaction_tests {
    use std::collections::BTreeMap;

    use wgmesh_core::{Key, PrivateKey};
    use wgmesh_device::{DeviceChange, DeviceState, InterfaceConfig, PeerConfig, PeerState};

    use super::Desired;

    /// Issue #12, item 12: what the agent holds and might log with `?` never shows a private
    /// or preshared key; public keys still show.
    #[test]
    fn debug_never_shows_a_secret() {
        let bytes: [u8; 32] = std::array::from_fn(|i| 101 + i as u8);
        let psk = Key::from_bytes(bytes);
        let private = PrivateKey::from_bytes(bytes);
        let public = PrivateKey::generate().public_key();
        let peer = PeerConfig {
            public_key: public,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: 0,
            preshared_key: Some(psk),
        };
        let state = DeviceState {
            public_key: public,
            listen_port: 1,
            fwmark: 0,
            peers: vec![PeerState {
                config: peer.clone(),
                current_endpoint: None,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
            }],
        };
        let pb_peer = wgmesh_proto::Peer {
            public_key: public.as_bytes().to_vec(),
            preshared_key: bytes.to_vec(),
            ..Default::default()
        };
        let desired = Desired {
            peers: BTreeMap::from([(public, pb_peer)]),
            ..Desired::default()
        };
        let mut needles = vec![psk.to_base64(), format!("{bytes:?}")];
        needles.extend(
            bytes
                .windows(4)
                .map(|w| w.iter().map(u8::to_string).collect::<Vec<_>>().join(", ")),
        );
        for (what, debug) in [
            ("PeerConfig", format!("{peer:?}")),
            (
                "DeviceChange::UpsertPeer",
                format!("{:?}", DeviceChange::UpsertPeer(peer.clone())),
            ),
            (
                "DeviceChange::SetPrivateKey",
                format!("{:?}", DeviceChange::SetPrivateKey(private.clone())),
            ),
            (
                "InterfaceConfig",
                format!(
                    "{:?}",
                    InterfaceConfig {
                        name: "wgmesh0".into(),
                        private_key: private.clone(),
                        listen_port: 0,
                        fwmark: 0,
                    }
                ),
            ),
            ("DeviceState", format!("{state:?}")),
            ("Desired", format!("{desired:?}")),
        ] {
            for n in &needles {
                assert!(!debug.contains(n.as_str()), "{what} shows {n}: {debug}");
            }
        }
        assert!(format!("{peer:?}").contains(&public.to_base64()));
    }
}
