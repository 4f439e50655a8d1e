//! What agents report of their peers (handshakes, traffic, endpoints), kept in memory and
//! aggregated per peer for the status writer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

use tokio::sync::Notify;
use wgmesh_core::PublicKey;

pub use wgmesh_proto::checked::Observation;

/// A peer as all nodes together see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Aggregate {
    /// The most recent handshake any node completed with the peer.
    pub last_handshake: Option<SystemTime>,
    /// Summed over the nodes.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The endpoint seen by the node with the most recent handshake.
    pub endpoint: Option<String>,
    /// Each reporting node's latest handshake (nodes without one are left out).
    pub by_node: BTreeMap<String, SystemTime>,
}

/// What an agent says of itself: whether it has programmed a configuration, and the update it
/// last refused (empty: none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentState {
    pub programmed: bool,
    pub refused_update: String,
    /// How many node peers it holds a live session with (unset by agents from before it).
    pub live_node_sessions: Option<u32>,
}

pub struct Reports {
    /// Up to this many node peers, a node's observations of them are kept one by one; above,
    /// only its count of live sessions (`wgmesh_core::report`), whatever the agent sends.
    pub node_peer_detail_limit: usize,
    /// mesh -> reporting node -> observations
    by_mesh: Mutex<HashMap<String, HashMap<String, Vec<Observation>>>>,
    /// mesh -> node -> what its agent says of itself
    agents: Mutex<HashMap<String, HashMap<String, AgentState>>>,
    /// mesh -> nodes whose agents left it after it was deleted (kept until the mesh object
    /// is gone, whatever the other reports' pruning does)
    left: Mutex<HashMap<String, BTreeSet<String>>>,
    /// Woken when a report changes something.
    pub changed: Notify,
    /// Whose agents are live, for gateway failover.
    pub liveness: crate::liveness::Liveness,
}

impl Default for Reports {
    fn default() -> Self {
        Reports::new(wgmesh_core::report::NODE_PEER_DETAIL_LIMIT)
    }
}

impl Reports {
    pub fn new(node_peer_detail_limit: usize) -> Self {
        Reports {
            node_peer_detail_limit,
            by_mesh: Mutex::default(),
            agents: Mutex::default(),
            left: Mutex::default(),
            changed: Notify::new(),
            liveness: crate::liveness::Liveness::default(),
        }
    }

    /// Whether node peers are reported one by one in a mesh where each node has `node_peers`.
    pub fn node_peers_in_detail(&self, node_peers: usize) -> bool {
        wgmesh_core::report::node_peers_in_detail(node_peers, self.node_peer_detail_limit)
    }

    /// How many nodes' handshakes a peer's status lists at most: every node of a mesh whose
    /// node peers are shown in detail (so `kubectl wgmesh status` misses none there), and
    /// the latest that many in larger ones.
    pub fn handshakes_listed(&self) -> usize {
        self.node_peer_detail_limit.saturating_add(1)
    }

    /// Replaces a node's report. Wakes the status writer only when it differs.
    pub fn record(&self, mesh: &str, node: &str, observations: Vec<Observation>) {
        let mut by_mesh = self.by_mesh.lock().expect("reports lock");
        let slot = by_mesh
            .entry(mesh.to_owned())
            .or_default()
            .entry(node.to_owned())
            .or_default();
        if *slot != observations {
            *slot = observations;
            self.changed.notify_one();
        }
    }

    /// Replaces what a node's agent says of itself. Wakes the status writer when it differs.
    pub fn record_agent(&self, mesh: &str, node: &str, state: AgentState) {
        let mut agents = self.agents.lock().expect("reports lock");
        let slot = agents
            .entry(mesh.to_owned())
            .or_default()
            .entry(node.to_owned())
            .or_default();
        if *slot != state {
            *slot = state;
            self.changed.notify_one();
        }
    }

    /// Records that a node's agent left a deleted mesh.
    pub fn record_left(&self, mesh: &str, node: &str) {
        let mut left = self.left.lock().expect("reports lock");
        if left
            .entry(mesh.to_owned())
            .or_default()
            .insert(node.to_owned())
        {
            self.changed.notify_one();
        }
    }

    /// The nodes whose agents left the deleted mesh `mesh`.
    pub fn left(&self, mesh: &str) -> BTreeSet<String> {
        let left = self.left.lock().expect("reports lock");
        left.get(mesh).cloned().unwrap_or_default()
    }

    /// Forgets who left meshes that no longer exist at all.
    pub fn forget_left(&self, existing: &BTreeSet<String>) {
        let mut left = self.left.lock().expect("reports lock");
        left.retain(|mesh, _| existing.contains(mesh));
    }

    /// What the agents of a mesh say of themselves, by node.
    pub fn agents(&self, mesh: &str) -> HashMap<String, AgentState> {
        let agents = self.agents.lock().expect("reports lock");
        agents.get(mesh).cloned().unwrap_or_default()
    }

    /// Forgets the reports of meshes and nodes that are gone: `members` holds every mesh that
    /// exists with its member nodes (`None`: a mesh held as it is, whose reports all stay,
    /// so its gateways are not taken for down when it is computed again).
    pub fn prune(&self, members: &BTreeMap<String, Option<BTreeSet<String>>>) {
        let keeps = |mesh: &str, node: &str| match members.get(mesh) {
            Some(Some(live)) => live.contains(node),
            Some(None) => true,
            None => false,
        };
        let mut by_mesh = self.by_mesh.lock().expect("reports lock");
        by_mesh.retain(|mesh, nodes| {
            nodes.retain(|node, _| keeps(mesh, node));
            !nodes.is_empty()
        });
        let mut agents = self.agents.lock().expect("reports lock");
        agents.retain(|mesh, nodes| {
            nodes.retain(|node, _| keeps(mesh, node));
            !nodes.is_empty()
        });
        self.liveness.retain(keeps);
    }

    /// What `node` last reported of the peers `keys` (endpoints, handshakes); `None` when it
    /// has not reported to this process. The status writer takes a node behind NAT's
    /// endpoint from its relay's report only.
    pub fn observed_by(
        &self,
        mesh: &str,
        node: &str,
        keys: &BTreeSet<PublicKey>,
    ) -> Option<HashMap<PublicKey, Observation>> {
        let by_mesh = self.by_mesh.lock().expect("reports lock");
        let observations = by_mesh.get(mesh)?.get(node)?;
        Some(
            observations
                .iter()
                .filter(|o| keys.contains(&o.public_key))
                .map(|o| (o.public_key, o.clone()))
                .collect(),
        )
    }

    /// How many nodes' reports are kept, over all meshes.
    #[cfg(test)]
    fn reporting_nodes(&self) -> usize {
        let by_mesh = self.by_mesh.lock().expect("reports lock");
        by_mesh.values().map(HashMap::len).sum()
    }

    /// Every peer of a mesh, aggregated over the reporting nodes.
    pub fn aggregate(&self, mesh: &str) -> HashMap<PublicKey, Aggregate> {
        let by_mesh = self.by_mesh.lock().expect("reports lock");
        let Some(nodes) = by_mesh.get(mesh) else {
            return HashMap::new();
        };
        aggregate(
            nodes
                .iter()
                .flat_map(|(node, obs)| obs.iter().map(move |o| (node.as_str(), o))),
        )
    }
}

/// What is kept of a node's observations: every external peer's, and its node peers' only
/// while they are few enough to keep one by one (`in_detail`); above, the count of live
/// sessions stands for them, so the reports held stay O(nodes) and not O(nodes^2).
///
/// `relayed` holds the node peers always kept whatever the size: the nodes behind NAT, in
/// the relay's report (what publishes their endpoints), O(nodes behind NAT) for one node.
pub fn kept_observations(
    observations: Vec<Observation>,
    is_node_peer: impl Fn(&PublicKey) -> bool,
    in_detail: bool,
    relayed: impl Fn(&PublicKey) -> bool,
) -> Vec<Observation> {
    if in_detail {
        return observations;
    }
    observations
        .into_iter()
        .filter(|o| !is_node_peer(&o.public_key) || relayed(&o.public_key))
        .collect()
}

/// Aggregates observations of many nodes: latest handshake, summed traffic, and the endpoint
/// seen by whoever shook hands last.
pub fn aggregate<'a>(
    observations: impl Iterator<Item = (&'a str, &'a Observation)>,
) -> HashMap<PublicKey, Aggregate> {
    let mut out: HashMap<PublicKey, Aggregate> = HashMap::new();
    for (node, o) in observations {
        let a = out.entry(o.public_key).or_default();
        if let Some(t) = o.last_handshake {
            a.by_node.insert(node.to_owned(), t);
        }
        a.rx_bytes = a.rx_bytes.saturating_add(o.rx_bytes);
        a.tx_bytes = a.tx_bytes.saturating_add(o.tx_bytes);
        if o.last_handshake > a.last_handshake {
            a.last_handshake = o.last_handshake;
            if o.endpoint.is_some() {
                a.endpoint = o.endpoint.clone();
            }
        } else if a.endpoint.is_none() {
            a.endpoint = o.endpoint.clone();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn prune_forgets_gone_meshes_and_nodes() {
        let reports = Reports::default();
        reports.record("default", "a", vec![]);
        reports.record("default", "b", vec![]);
        reports.record("gone", "a", vec![]);
        reports.record("held", "a", vec![]);
        let live = BTreeMap::from([
            ("default".to_owned(), Some(BTreeSet::from(["a".to_owned()]))),
            ("held".to_owned(), None),
        ]);
        reports.prune(&live);
        assert_eq!(reports.reporting_nodes(), 2);
        assert!(reports.by_mesh.lock().unwrap()["default"].contains_key("a"));
        assert!(reports.by_mesh.lock().unwrap()["held"].contains_key("a"));
    }

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    /// Peer n observed with a byte each way, at 198.51.100.n:4000.
    fn obs(n: u8) -> Observation {
        Observation {
            public_key: key(n),
            last_handshake: None,
            rx_bytes: 1,
            tx_bytes: 1,
            endpoint: Some(format!("198.51.100.{n}:4000")),
        }
    }

    #[test]
    fn node_peers_are_kept_one_by_one_only_in_detail() {
        let nodes = BTreeSet::from([key(1), key(2)]);
        let cases = [(true, vec![1, 2, 9]), (false, vec![9])];
        for (in_detail, want) in cases {
            let kept = kept_observations(
                vec![obs(1), obs(2), obs(9)],
                |k| nodes.contains(k),
                in_detail,
                |_| false,
            );
            let kept: Vec<PublicKey> = kept.iter().map(|o| o.public_key).collect();
            let want: Vec<PublicKey> = want.into_iter().map(key).collect();
            assert_eq!(kept, want, "in detail: {in_detail}");
        }
    }

    #[test]
    fn the_relays_observations_of_nodes_behind_nat_are_always_kept() {
        let kept = kept_observations(
            vec![obs(1), obs(2), obs(9)],
            |k| *k != key(9),
            false,
            |k| *k == key(2),
        );
        let kept: Vec<PublicKey> = kept.iter().map(|o| o.public_key).collect();
        assert_eq!(kept, [key(2), key(9)]);

        let reports = Reports::default();
        reports.record("default", "relay", vec![obs(1), obs(2)]);
        let wanted = BTreeSet::from([key(2), key(3)]);
        let seen = reports.observed_by("default", "relay", &wanted).unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[&key(2)].endpoint.as_deref(), Some("198.51.100.2:4000"));
        assert!(reports.observed_by("default", "other", &wanted).is_none());
    }

    #[test]
    fn aggregation_takes_latest_handshake_and_sums_traffic() {
        let k = PublicKey::from_bytes([1; 32]);
        let t = |s| Some(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        let obs = [
            Observation {
                public_key: k,
                last_handshake: t(100),
                rx_bytes: 10,
                tx_bytes: 1,
                endpoint: Some("a:1".into()),
            },
            Observation {
                public_key: k,
                last_handshake: t(200),
                rx_bytes: 5,
                tx_bytes: 2,
                endpoint: Some("b:1".into()),
            },
            Observation {
                public_key: k,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                endpoint: None,
            },
        ];
        let nodes = ["a", "b", "c"];
        let agg = &aggregate(nodes.into_iter().zip(obs.iter()))[&k];
        assert_eq!(agg.last_handshake, t(200));
        assert_eq!((agg.rx_bytes, agg.tx_bytes), (15, 3));
        assert_eq!(agg.endpoint.as_deref(), Some("b:1"));
        assert_eq!(
            agg.by_node
                .iter()
                .map(|(n, t)| (n.as_str(), Some(*t)))
                .collect::<Vec<_>>(),
            [("a", t(100)), ("b", t(200))],
            "per node: only those with a handshake"
        );
    }
}
