//! How much agents report of their peers. Every external peer and, in a small mesh, every
//! node peer is reported one by one (handshake, traffic, endpoint): that feeds the per-node
//! handshake matrix of `kubectl wgmesh status`. In a large mesh per-node detail would cost
//! O(N^2) (5,000 nodes: 25 million entries in reports, in the controller's memory and in
//! the peers' status), so node peers are summed up as one number per node: how many of them
//! it holds a live session with. Per-peer traffic and handshake ages stay in the agents'
//! metrics either way.

use std::time::{Duration, SystemTime};

use crate::PublicKey;
use crate::device::PeerState;

/// Up to this many node peers (a mesh of 65 nodes), node peers are reported one by one.
pub const NODE_PEER_DETAIL_LIMIT: usize = 64;

/// How long a WireGuard session lasts after its handshake (the protocol's Reject-After-Time):
/// a handshake younger than this means a live session.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(180);

/// Whether a node with `node_peers` node peers reports each of them, given the limit
/// (`NODE_PEER_DETAIL_LIMIT` unless the controller was told otherwise).
pub fn node_peers_in_detail(node_peers: usize, limit: usize) -> bool {
    node_peers <= limit
}

/// How many of `handshakes` (one per peer; `None`: never) are live sessions at `now`. A
/// handshake in the future (a clock step) counts as live.
pub fn live_sessions(
    handshakes: impl IntoIterator<Item = Option<SystemTime>>,
    now: SystemTime,
) -> u32 {
    let live = handshakes
        .into_iter()
        .flatten()
        .filter(|at| {
            now.duration_since(*at)
                .map_or(true, |age| age < SESSION_LIFETIME)
        })
        .count();
    u32::try_from(live).unwrap_or(u32::MAX)
}

/// What an agent reports of the peers on its device: those it reports one by one (external
/// peers always, node peers only up to `limit` of them) and how many node peers it holds a
/// live session with.
pub fn select(
    peers: &[PeerState],
    is_node: impl Fn(&PublicKey) -> bool,
    limit: usize,
    now: SystemTime,
) -> (Vec<&PeerState>, u32) {
    let node_peers: Vec<&PeerState> = peers
        .iter()
        .filter(|p| is_node(&p.config.public_key))
        .collect();
    let live = live_sessions(node_peers.iter().map(|p| p.last_handshake), now);
    let in_detail = node_peers_in_detail(node_peers.len(), limit);
    let reported = peers
        .iter()
        .filter(|p| in_detail || !is_node(&p.config.public_key))
        .collect();
    (reported, live)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::PeerConfig;

    fn peer(n: u8, handshake: Option<SystemTime>) -> PeerState {
        PeerState {
            config: PeerConfig {
                public_key: PublicKey::from_bytes([n; 32]),
                endpoint: None,
                allowed_ips: Vec::new(),
                persistent_keepalive: 0,
                preshared_key: None,
            },
            current_endpoint: None,
            last_handshake: handshake,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    #[test]
    fn select_table() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let fresh = Some(now - Duration::from_secs(5));
        let old = Some(now - Duration::from_secs(500));
        // Keys 1..=3 are nodes, 9 is external (and never counts as a session).
        let peers = [peer(1, fresh), peer(2, old), peer(3, None), peer(9, fresh)];
        let is_node = |k: &PublicKey| k.as_bytes()[0] < 9;
        // (limit, keys reported one by one, live sessions)
        let cases = [
            (64, vec![1, 2, 3, 9], 1),
            (3, vec![1, 2, 3, 9], 1),
            (2, vec![9], 1),
            (0, vec![9], 1),
        ];
        for (limit, want, live) in cases {
            let (reported, got_live) = select(&peers, is_node, limit, now);
            let reported: Vec<u8> = reported
                .iter()
                .map(|p| p.config.public_key.as_bytes()[0])
                .collect();
            assert_eq!(reported, want, "limit {limit}");
            assert_eq!(got_live, live, "limit {limit}");
        }
    }

    #[test]
    fn detail_up_to_the_limit() {
        let cases = [(0, true), (1, true), (64, true), (65, false), (4999, false)];
        for (node_peers, detail) in cases {
            assert_eq!(
                node_peers_in_detail(node_peers, NODE_PEER_DETAIL_LIMIT),
                detail,
                "{node_peers} node peers"
            );
        }
        assert!(node_peers_in_detail(4999, usize::MAX), "a raised limit");
    }

    #[test]
    fn live_sessions_table() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ago = |s: u64| Some(now - Duration::from_secs(s));
        let cases: [(&str, Vec<Option<SystemTime>>, u32); 5] = [
            ("none", vec![], 0),
            ("never shook hands", vec![None, None], 0),
            (
                "fresh and old",
                vec![ago(0), ago(179), ago(180), ago(3600)],
                2,
            ),
            (
                "from the future",
                vec![Some(now + Duration::from_secs(5))],
                1,
            ),
            ("mixed", vec![None, ago(10), ago(500)], 1),
        ];
        for (name, handshakes, want) in cases {
            assert_eq!(live_sessions(handshakes, now), want, "{name}");
        }
    }
}
