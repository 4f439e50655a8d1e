//! What an agent's request may say, checked into typed values: the controller's trust
//! boundary on the wire. Every field of every agent request is hostile input until it has
//! passed through here; nothing here panics on any input (`cargo xtask test` fuzzes it).
//!
//! Authentication (whose token, bound to which node) and the cluster-dependent checks (is the
//! node a member, is its key free) are the controller's; this module only judges the message.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use tonic::Status;
use wgmesh_core::PublicKey;

use crate::{RegisterRequest, ReportStatusRequest, WatchPeersRequest};

/// Endpoint addresses a Register may name (a node has a handful of addresses at most).
pub const MAX_ENDPOINT_ADDRESSES: usize = 16;
/// Peers one status report may carry: the target mesh size, with room for churn.
pub const MAX_REPORTED_PEERS: usize = 10_000;
/// Longest agent version string kept (it is logged and shown in status).
pub const MAX_AGENT_VERSION: usize = 64;
/// Longest refusal message kept (it becomes an event's note).
pub const MAX_REFUSAL: usize = 512;
/// Longest epoch an agent may echo (the controller's own are far shorter).
pub const MAX_EPOCH: usize = 128;

/// A checked `RegisterRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    pub node: String,
    pub mesh: String,
    pub public_key: PublicKey,
    /// The endpoint addresses the agent named, best first (the controller still checks they
    /// are its Node's).
    pub endpoint_addresses: Vec<IpAddr>,
    pub listen_port: u16,
    pub agent_version: String,
}

/// A checked `WatchPeersRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub node: String,
    pub mesh: String,
    pub resume_epoch: String,
    pub resume_revision: u64,
    /// The agent joins updates sent in parts.
    pub accepts_parts: bool,
    /// The agent applies changes of allowed IPs.
    pub accepts_allowed_ips_changes: bool,
}

/// A checked `ReportStatusRequest`: well-formed, not yet scoped to the node's peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub node: String,
    pub mesh: String,
    pub peers: Vec<Reported>,
    /// Whether the agent has programmed a configuration from this controller's epoch or an
    /// earlier one (its revision is not the controller's to trust, only that there is one).
    pub programmed: bool,
    /// The update the agent refused to program, and why; empty when none.
    pub refused_update: String,
    /// The agent removed its data path because the mesh was deleted.
    pub left_deleted_mesh: bool,
    /// How many node peers the agent holds a live session with (not checked against the
    /// node's peer count here: the caller knows it).
    pub live_node_sessions: Option<u32>,
}

/// One observation as an agent sent it, before [`scope`] judged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reported {
    pub public_key: PublicKey,
    /// Seconds and nanoseconds since the epoch, as on the wire.
    pub last_handshake: Option<(i64, i32)>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub endpoint: String,
}

/// One agent's observation of one peer, as the controller keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub public_key: PublicKey,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// A socket address, printed canonically.
    pub endpoint: Option<String>,
}

/// What Node and mesh names must be; core holds the one definition.
pub use wgmesh_core::validate::is_object_name;

fn names(node: &str, mesh: &str) -> Result<(), Status> {
    if !is_object_name(node) {
        return Err(Status::invalid_argument(format!(
            "invalid node name {:?}",
            truncated(node)
        )));
    }
    if !is_object_name(mesh) {
        return Err(Status::invalid_argument(format!(
            "invalid mesh name {:?}",
            truncated(mesh)
        )));
    }
    Ok(())
}

/// At most 64 characters of hostile text, for an error message.
fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A 32-byte public key.
pub fn public_key(bytes: &[u8]) -> Result<PublicKey, Status> {
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
        Status::invalid_argument(format!("public_key must be 32 bytes, got {}", bytes.len()))
    })?;
    Ok(PublicKey::from_bytes(bytes))
}

pub fn register(req: &RegisterRequest) -> Result<Register, Status> {
    names(&req.node, &req.mesh)?;
    let public_key = public_key(&req.public_key)?;
    let listen_port = u16::try_from(req.listen_port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Status::invalid_argument("listen_port must be 1-65535"))?;
    if req.endpoint_addresses.len() > MAX_ENDPOINT_ADDRESSES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_ENDPOINT_ADDRESSES} endpoint addresses, got {}",
            req.endpoint_addresses.len()
        )));
    }
    let endpoint_addresses = req
        .endpoint_addresses
        .iter()
        .map(|a| {
            a.parse::<IpAddr>().map_err(|_| {
                Status::invalid_argument(format!(
                    "endpoint address {:?} is not an IP address",
                    truncated(a)
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let agent_version: String = req
        .agent_version
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(MAX_AGENT_VERSION)
        .collect();
    Ok(Register {
        node: req.node.clone(),
        mesh: req.mesh.clone(),
        public_key,
        endpoint_addresses,
        listen_port,
        agent_version,
    })
}

pub fn watch(req: &WatchPeersRequest) -> Result<Watch, Status> {
    names(&req.node, &req.mesh)?;
    Ok(Watch {
        node: req.node.clone(),
        mesh: req.mesh.clone(),
        // An epoch is ours (a replica identity and a random suffix): anything longer is not.
        resume_epoch: if req.resume_epoch.len() <= 512 {
            req.resume_epoch.clone()
        } else {
            String::new()
        },
        resume_revision: req.resume_revision,
        accepts_parts: req.accepts_parts,
        accepts_allowed_ips_changes: req.accepts_allowed_ips_changes,
    })
}

pub fn report(req: &ReportStatusRequest) -> Result<Report, Status> {
    names(&req.node, &req.mesh)?;
    if req.peers.len() > MAX_REPORTED_PEERS {
        return Err(Status::invalid_argument(format!(
            "a report carries at most {MAX_REPORTED_PEERS} peers, got {}",
            req.peers.len()
        )));
    }
    let peers = req
        .peers
        .iter()
        .map(|p| {
            Ok(Reported {
                public_key: public_key(&p.public_key)?,
                last_handshake: p.last_handshake.as_ref().map(|t| (t.seconds, t.nanos)),
                rx_bytes: p.rx_bytes,
                tx_bytes: p.tx_bytes,
                endpoint: p.endpoint.clone(),
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    if req.programmed_epoch.len() > MAX_EPOCH {
        return Err(Status::invalid_argument(format!(
            "programmed_epoch is longer than {MAX_EPOCH} bytes"
        )));
    }
    if req.refused_update.len() > MAX_REFUSAL {
        return Err(Status::invalid_argument(format!(
            "refused_update is longer than {MAX_REFUSAL} bytes"
        )));
    }
    Ok(Report {
        node: req.node.clone(),
        mesh: req.mesh.clone(),
        peers,
        programmed: req.programmed_revision > 0,
        refused_update: req.refused_update.clone(),
        left_deleted_mesh: req.departed == crate::Departure::MeshDeleted as i32,
        live_node_sessions: req.live_node_sessions,
    })
}

/// What a node's report may say, whatever it sends: only peers in its own peer set (once
/// each, so a report holds at most that many), endpoints that parse as socket addresses, and
/// handshakes no later than `now` (a forged future time must not win the aggregate). Returns
/// the kept observations and how many were dropped.
pub fn scope(
    reported: Vec<Reported>,
    in_peer_set: impl Fn(&PublicKey) -> bool,
    now: SystemTime,
) -> (Vec<Observation>, usize) {
    let total = reported.len();
    let mut seen = BTreeSet::new();
    let kept: Vec<Observation> = reported
        .into_iter()
        .filter(|r| in_peer_set(&r.public_key) && seen.insert(r.public_key))
        .map(|r| Observation {
            public_key: r.public_key,
            last_handshake: r.last_handshake.and_then(|(secs, nanos)| {
                let secs = u64::try_from(secs).ok()?;
                let nanos = u32::try_from(nanos).ok()?.min(999_999_999);
                let at = SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))?;
                Some(at.min(now))
            }),
            rx_bytes: r.rx_bytes,
            tx_bytes: r.tx_bytes,
            endpoint: r.endpoint.parse::<SocketAddr>().ok().map(|a| a.to_string()),
        })
        .collect();
    let dropped = total - kept.len();
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeerStatus;

    fn register_req() -> RegisterRequest {
        RegisterRequest {
            node: "worker-1".into(),
            mesh: "default".into(),
            public_key: vec![7; 32],
            endpoint_addresses: vec!["192.168.0.1".into()],
            listen_port: 51820,
            backend: 0,
            agent_version: "0.1.0".into(),
        }
    }

    #[test]
    fn register_table() {
        type Edit = fn(&mut RegisterRequest);
        let cases: &[(&str, Edit, Option<&str>)] = &[
            ("valid", |_| {}, None),
            (
                "short key",
                |r| r.public_key = vec![1; 31],
                Some("32 bytes"),
            ),
            ("port 0", |r| r.listen_port = 0, Some("listen_port")),
            (
                "port past u16",
                |r| r.listen_port = 70_000,
                Some("listen_port"),
            ),
            (
                "an endpoint that is not an IP",
                |r| r.endpoint_addresses = vec!["evil.example".into()],
                Some("not an IP"),
            ),
            (
                "too many endpoints",
                |r| r.endpoint_addresses = vec!["192.0.2.1".into(); 17],
                Some("at most 16"),
            ),
            ("bad node", |r| r.node = "Node_1".into(), Some("node name")),
            ("bad mesh", |r| r.mesh = String::new(), Some("mesh name")),
        ];
        for (what, edit, error) in cases {
            let mut req = register_req();
            edit(&mut req);
            match (register(&req), error) {
                (Ok(_), None) => {}
                (Err(s), Some(want)) => {
                    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{what}");
                    assert!(s.message().contains(want), "{what}: {}", s.message());
                }
                (got, want) => panic!("{what}: got {got:?}, want error {want:?}"),
            }
        }
        let mut req = register_req();
        req.agent_version = format!("1.0\n{}", "x".repeat(500));
        let version = register(&req).unwrap().agent_version;
        assert_eq!(version.len(), MAX_AGENT_VERSION, "kept short");
        assert!(!version.contains('\n'), "control characters dropped");
    }

    #[test]
    fn report_refuses_malformed_and_oversized() {
        let peer = |key: Vec<u8>| PeerStatus {
            public_key: key,
            ..Default::default()
        };
        let req = |peers| ReportStatusRequest {
            node: "n".into(),
            mesh: "m".into(),
            peers,
            ..Default::default()
        };
        assert!(report(&req(vec![peer(vec![1; 32])])).is_ok());
        let long = |n: usize| "x".repeat(n);
        let with = |epoch: String, refused: String| ReportStatusRequest {
            programmed_epoch: epoch,
            refused_update: refused,
            programmed_revision: 3,
            ..req(vec![])
        };
        let ok = report(&with(long(MAX_EPOCH), long(MAX_REFUSAL))).unwrap();
        assert!(ok.programmed);
        assert_eq!(ok.refused_update.len(), MAX_REFUSAL);
        assert!(report(&with(long(MAX_EPOCH + 1), String::new())).is_err());
        assert!(report(&with(String::new(), long(MAX_REFUSAL + 1))).is_err());
        assert!(report(&req(vec![peer(vec![1; 33])])).is_err());
        let many = vec![peer(vec![1; 32]); MAX_REPORTED_PEERS + 1];
        let err = report(&req(many)).unwrap_err();
        assert!(err.message().contains("at most"), "{}", err.message());
    }

    #[test]
    fn watch_drops_an_oversized_epoch() {
        let req = WatchPeersRequest {
            node: "n".into(),
            mesh: "m".into(),
            resume_epoch: "e".repeat(10_000),
            resume_revision: 5,
            accepts_parts: true,
            accepts_allowed_ips_changes: true,
        };
        assert_eq!(watch(&req).unwrap().resume_epoch, "");
    }

    #[test]
    fn scope_table() {
        let (mine, theirs, stranger) = (
            PublicKey::from_bytes([1; 32]),
            PublicKey::from_bytes([2; 32]),
            PublicKey::from_bytes([9; 32]),
        );
        let peer_set: BTreeSet<PublicKey> = [mine, theirs].into();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |s| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        let reported = |key, hs: Option<(i64, i32)>, endpoint: &str| Reported {
            public_key: key,
            last_handshake: hs,
            rx_bytes: 1,
            tx_bytes: 2,
            endpoint: endpoint.into(),
        };
        type Want<'a> = Vec<(PublicKey, Option<SystemTime>, Option<&'a str>)>;
        let cases: Vec<(&str, Vec<Reported>, Want, usize)> = vec![
            (
                "a plain report",
                vec![reported(mine, Some((500, 0)), "192.0.2.1:51820")],
                vec![(mine, at(500), Some("192.0.2.1:51820"))],
                0,
            ),
            (
                "a peer outside the node's set is dropped",
                vec![
                    reported(stranger, Some((500, 0)), ""),
                    reported(theirs, None, ""),
                ],
                vec![(theirs, None, None)],
                1,
            ),
            (
                "a future handshake is clamped to now",
                vec![reported(mine, Some((i64::MAX, 999_999_999)), "")],
                vec![(mine, Some(now), None)],
                0,
            ),
            (
                "negative times and nanos are no handshake",
                vec![
                    reported(mine, Some((-5, 0)), ""),
                    reported(theirs, Some((5, -1)), ""),
                ],
                vec![(mine, None, None), (theirs, None, None)],
                0,
            ),
            (
                "endpoints must be socket addresses",
                vec![
                    reported(mine, None, "evil.example:51820\nX-Injected: 1"),
                    reported(theirs, None, "[2001:db8::1]:51820"),
                ],
                vec![
                    (mine, None, None),
                    (theirs, None, Some("[2001:db8::1]:51820")),
                ],
                0,
            ),
            (
                "a key repeated is kept once",
                vec![
                    reported(mine, Some((1, 0)), ""),
                    reported(mine, Some((2, 0)), ""),
                    reported(mine, Some((3, 0)), ""),
                ],
                vec![(mine, at(1), None)],
                2,
            ),
        ];
        for (name, input, want, dropped) in cases {
            let (kept, n) = scope(input, |k| peer_set.contains(k), now);
            let got: Vec<_> = kept
                .iter()
                .map(|o| (o.public_key, o.last_handshake, o.endpoint.as_deref()))
                .collect();
            assert_eq!(got, want, "{name}");
            assert_eq!(n, dropped, "{name}: dropped");
        }
    }
}
