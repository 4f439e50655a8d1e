//! What agents report of their peers (handshakes, traffic, endpoints), kept in memory and
//! aggregated per peer for the status writer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use wgmesh_core::PublicKey;

/// One agent's observation of one peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub public_key: PublicKey,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub endpoint: Option<String>,
}

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

#[derive(Default)]
pub struct Reports {
    /// mesh -> reporting node -> observations
    by_mesh: Mutex<HashMap<String, HashMap<String, Vec<Observation>>>>,
    /// Woken when a report changes something.
    pub changed: Notify,
}

impl Reports {
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

    /// Forgets the reports of meshes and nodes that are gone: `members` holds every mesh that
    /// exists with its member nodes.
    pub fn prune(&self, members: &BTreeMap<String, BTreeSet<String>>) {
        let mut by_mesh = self.by_mesh.lock().expect("reports lock");
        by_mesh.retain(|mesh, nodes| match members.get(mesh) {
            Some(live) => {
                nodes.retain(|node, _| live.contains(node));
                !nodes.is_empty()
            }
            None => false,
        });
    }

    /// How many nodes' reports are kept, over all meshes (for tests and metrics).
    pub fn reporting_nodes(&self) -> usize {
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

/// What a node's report may say, whatever it sends: only peers in its own peer set (once
/// each, so a report holds at most that many), endpoints that parse as socket addresses, and
/// handshakes no later than `now` (a forged future time must not win the aggregate). Returns
/// the kept observations and how many were dropped.
pub fn scope(
    reported: Vec<Reported>,
    peer_set: &BTreeSet<PublicKey>,
    now: SystemTime,
) -> (Vec<Observation>, usize) {
    let total = reported.len();
    let mut seen = BTreeSet::new();
    let kept: Vec<Observation> = reported
        .into_iter()
        .filter(|r| peer_set.contains(&r.public_key) && seen.insert(r.public_key))
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
        type Case<'a> = (
            &'a str,
            Vec<Reported>,
            Vec<(PublicKey, Option<SystemTime>, Option<&'a str>)>,
            usize,
        );
        let cases: Vec<Case> = vec![
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
            let (kept, n) = scope(input, &peer_set, now);
            let got: Vec<_> = kept
                .iter()
                .map(|o| (o.public_key, o.last_handshake, o.endpoint.as_deref()))
                .collect();
            assert_eq!(got, want, "{name}");
            assert_eq!(n, dropped, "{name}: dropped");
        }
    }

    #[test]
    fn prune_forgets_gone_meshes_and_nodes() {
        let reports = Reports::default();
        reports.record("default", "a", vec![]);
        reports.record("default", "b", vec![]);
        reports.record("gone", "a", vec![]);
        let live = BTreeMap::from([("default".to_owned(), BTreeSet::from(["a".to_owned()]))]);
        reports.prune(&live);
        assert_eq!(reports.reporting_nodes(), 1);
        assert!(reports.by_mesh.lock().unwrap()["default"].contains_key("a"));
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
