//! Prometheus metrics of the agent (served by `http.rs`). They hold no secret: peers are
//! named by their name and public key, never by a private or preshared key.
//!
//! Per-peer series are kept for external peers, and for node peers only while the node has
//! at most [`NODE_PEER_DETAIL_LIMIT`] of them (as in its reports to the controller): at 5,000
//! nodes, per-peer series for every node peer would be 25,000 series per agent and 125
//! million for the cluster, more than a Prometheus holds. Node peers are always also counted
//! together (`node_peers_*`), whatever the mesh's size.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use wgmesh_core::report::{NODE_PEER_DETAIL_LIMIT, live_sessions, node_peers_in_detail};

type Labels = Vec<(&'static str, String)>;

/// Every metric name the agent exports, as scraped (with the `_total` of counters): the
/// Grafana dashboard's test checks its queries against this list.
pub const METRIC_NAMES: &[&str] = &[
    "wgmesh_agent_controller_connected",
    "wgmesh_agent_peers",
    "wgmesh_agent_updates_total",
    "wgmesh_agent_refused_updates_total",
    "wgmesh_agent_repairs_total",
    "wgmesh_agent_peer_receive_bytes_total",
    "wgmesh_agent_peer_transmit_bytes_total",
    "wgmesh_agent_peer_last_handshake_timestamp_seconds",
    "wgmesh_agent_peer_handshake_age_seconds",
    "wgmesh_agent_peer_endpoint_info",
    "wgmesh_agent_node_peers",
    "wgmesh_agent_node_peers_live_sessions",
    "wgmesh_agent_node_peers_receive_bytes_total",
    "wgmesh_agent_node_peers_transmit_bytes_total",
];

/// One peer as read from the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSample {
    pub name: String,
    /// Base64 public key.
    pub public_key: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub last_handshake: Option<SystemTime>,
    pub endpoint: Option<SocketAddr>,
    /// Whether the peer is another node of the mesh (not an external peer).
    pub node: bool,
}

/// The last device reading of a peer, to turn device totals into counter increments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Previous {
    rx: u64,
    tx: u64,
    endpoint: Option<String>,
}

/// How much a counter grows from one device reading to the next. A device total that went
/// down was reset (the peer was removed and added again, the userspace device restarted):
/// all of the new total is new traffic, so the exported counter stays monotone.
pub fn counter_increment(previous: u64, now: u64) -> u64 {
    if now >= previous { now - previous } else { now }
}

/// Seconds from a handshake to `now` (None: never, or in the future by clock skew: 0).
pub fn handshake_age(handshake: Option<SystemTime>, now: SystemTime) -> Option<u64> {
    handshake.map(|t| now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0))
}

#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    connected: Gauge,
    peers: Gauge,
    updates: Counter,
    refused: Counter,
    repairs: Counter,
    rx: Family<Labels, Counter>,
    tx: Family<Labels, Counter>,
    handshake: Family<Labels, Gauge>,
    handshake_age: Family<Labels, Gauge>,
    endpoint: Family<Labels, Gauge>,
    node_peers: Gauge,
    node_sessions: Gauge,
    node_rx: Counter,
    node_tx: Counter,
    previous: Mutex<BTreeMap<Labels, Previous>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut inner = Inner {
            registry: Registry::with_prefix("wgmesh_agent"),
            connected: Gauge::default(),
            peers: Gauge::default(),
            updates: Counter::default(),
            refused: Counter::default(),
            repairs: Counter::default(),
            rx: Family::default(),
            tx: Family::default(),
            handshake: Family::default(),
            handshake_age: Family::default(),
            endpoint: Family::default(),
            node_peers: Gauge::default(),
            node_sessions: Gauge::default(),
            node_rx: Counter::default(),
            node_tx: Counter::default(),
            previous: Mutex::default(),
        };
        let r = &mut inner.registry;
        r.register(
            "controller_connected",
            "1 while the peer stream is open",
            inner.connected.clone(),
        );
        r.register(
            "peers",
            "Peers programmed on the device",
            inner.peers.clone(),
        );
        r.register(
            "updates",
            "Peer updates received from the controller",
            inner.updates.clone(),
        );
        r.register(
            "refused_updates",
            "Updates not programmed because they would have wiped the data plane without the mesh saying so",
            inner.refused.clone(),
        );
        r.register(
            "repairs",
            "Times routes, guards or rules of the mesh were found removed by something else and put back",
            inner.repairs.clone(),
        );
        r.register(
            "peer_receive_bytes",
            "Bytes received from a peer (device totals; a reset device total counts as new traffic)",
            inner.rx.clone(),
        );
        r.register(
            "peer_transmit_bytes",
            "Bytes sent to a peer (device totals; a reset device total counts as new traffic)",
            inner.tx.clone(),
        );
        r.register(
            "peer_last_handshake_timestamp_seconds",
            "Unix time of a peer's last handshake (0: never)",
            inner.handshake.clone(),
        );
        r.register(
            "peer_handshake_age_seconds",
            "Seconds since a peer's last handshake, at the last observation of the device (absent: never)",
            inner.handshake_age.clone(),
        );
        r.register(
            "peer_endpoint_info",
            "1 for a peer's current endpoint (one series per peer: an old endpoint's goes)",
            inner.endpoint.clone(),
        );
        r.register(
            "node_peers",
            "Node peers on the device (the other nodes of the mesh)",
            inner.node_peers.clone(),
        );
        r.register(
            "node_peers_live_sessions",
            "Node peers with a handshake in the last 180 s",
            inner.node_sessions.clone(),
        );
        r.register(
            "node_peers_receive_bytes",
            "Bytes received from all node peers together",
            inner.node_rx.clone(),
        );
        r.register(
            "node_peers_transmit_bytes",
            "Bytes sent to all node peers together",
            inner.node_tx.clone(),
        );
        Metrics {
            inner: Arc::new(inner),
        }
    }
}

impl Metrics {
    pub fn set_connected(&self, connected: bool) {
        self.inner.connected.set(i64::from(connected));
    }
    pub fn set_peers(&self, n: usize) {
        self.inner.peers.set(n as i64);
    }
    pub fn update_received(&self) {
        self.inner.updates.inc();
    }
    pub fn update_refused(&self) {
        self.inner.refused.inc();
    }
    pub fn repaired(&self) {
        self.inner.repairs.inc();
    }

    /// Takes one reading of every peer on the device: the series of peers no longer there
    /// go, so label sets do not pile up, and so do node peers' own series once the node has
    /// more node peers than [`NODE_PEER_DETAIL_LIMIT`].
    pub fn observe_peers(&self, peers: &[PeerSample], now: SystemTime) {
        let inner = &self.inner;
        let node_peers = peers.iter().filter(|p| p.node).count();
        let in_detail = node_peers_in_detail(node_peers, NODE_PEER_DETAIL_LIMIT);
        inner.node_peers.set(node_peers as i64);
        inner.node_sessions.set(i64::from(live_sessions(
            peers.iter().filter(|p| p.node).map(|p| p.last_handshake),
            now,
        )));
        let mut previous = inner.previous.lock().expect("metrics lock poisoned");
        let mut seen = BTreeMap::new();
        for peer in peers {
            let labels: Labels = vec![
                ("peer", peer.name.clone()),
                ("public_key", peer.public_key.clone()),
            ];
            let last = previous.remove(&labels).unwrap_or_default();
            let rx = counter_increment(last.rx, peer.rx_bytes);
            let tx = counter_increment(last.tx, peer.tx_bytes);
            if peer.node {
                inner.node_rx.inc_by(rx);
                inner.node_tx.inc_by(tx);
                if !in_detail {
                    // Counted together only; series from when the mesh was smaller go.
                    self.remove_series(&labels, last.endpoint.as_deref());
                    seen.insert(
                        labels,
                        Previous {
                            rx: peer.rx_bytes,
                            tx: peer.tx_bytes,
                            endpoint: None,
                        },
                    );
                    continue;
                }
            }
            inner.rx.get_or_create(&labels).inc_by(rx);
            inner.tx.get_or_create(&labels).inc_by(tx);
            let stamp = peer
                .last_handshake
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs() as i64);
            inner.handshake.get_or_create(&labels).set(stamp);
            match handshake_age(peer.last_handshake, now) {
                Some(age) => {
                    inner.handshake_age.get_or_create(&labels).set(age as i64);
                }
                None => {
                    inner.handshake_age.remove(&labels);
                }
            }
            let endpoint = peer.endpoint.map(|e| e.to_string());
            if last.endpoint != endpoint
                && let Some(old) = &last.endpoint
            {
                inner.endpoint.remove(&endpoint_labels(&labels, old));
            }
            if let Some(e) = &endpoint {
                inner
                    .endpoint
                    .get_or_create(&endpoint_labels(&labels, e))
                    .set(1);
            }
            seen.insert(
                labels,
                Previous {
                    rx: peer.rx_bytes,
                    tx: peer.tx_bytes,
                    endpoint,
                },
            );
        }
        // Whatever is left was not on the device this time.
        for (labels, gone) in previous.iter() {
            self.remove_series(labels, gone.endpoint.as_deref());
        }
        *previous = seen;
    }

    /// Removes a peer's own series (those it has: removing an absent one is nothing).
    fn remove_series(&self, labels: &Labels, endpoint: Option<&str>) {
        let inner = &self.inner;
        inner.rx.remove(labels);
        inner.tx.remove(labels);
        inner.handshake.remove(labels);
        inner.handshake_age.remove(labels);
        if let Some(e) = endpoint {
            inner.endpoint.remove(&endpoint_labels(labels, e));
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.inner.registry).expect("writing to a String cannot fail");
        out
    }
}

fn endpoint_labels(peer: &Labels, endpoint: &str) -> Labels {
    let mut labels = peer.clone();
    labels.push(("endpoint", endpoint.to_owned()));
    labels
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counter_increments() {
        for (previous, now, want) in [
            (0, 0, 0),
            (0, 100, 100),
            (100, 150, 50),
            (100, 100, 0),
            // Reset (peer re-added): the new total is new traffic.
            (500, 20, 20),
            (500, 0, 0),
        ] {
            assert_eq!(
                counter_increment(previous, now),
                want,
                "{previous} -> {now}"
            );
        }
    }

    #[test]
    fn handshake_ages() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        for (handshake, want) in [
            (None, None),
            (Some(990), Some(10)),
            (Some(1000), Some(0)),
            (Some(1010), Some(0)), // a clock ahead of ours
        ] {
            let h = handshake.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
            assert_eq!(handshake_age(h, now), want, "{handshake:?}");
        }
    }

    /// A small check of the Prometheus/OpenMetrics text format: every line is a comment
    /// (`# HELP`, `# TYPE`, `# UNIT`, `# EOF`) or `name{labels} value`, with a known name.
    fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
        let mut out = Vec::new();
        for line in text.lines() {
            if line.starts_with("# ") {
                let kind = line.split_whitespace().nth(1).unwrap();
                assert!(
                    ["HELP", "TYPE", "UNIT", "EOF"].contains(&kind),
                    "bad comment: {line}"
                );
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect(line);
            let value: f64 = value.parse().expect(line);
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect(line);
                    let mut labels = BTreeMap::new();
                    for pair in body.split("\",").filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once("=\"").expect(line);
                        labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                    }
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad name: {line}"
            );
            out.push((name.to_owned(), labels, value));
        }
        out
    }

    fn sample(name: &str, key: &str, rx: u64, endpoint: &str, handshake: u64) -> PeerSample {
        PeerSample {
            name: name.into(),
            public_key: key.into(),
            rx_bytes: rx,
            tx_bytes: rx * 2,
            last_handshake: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(handshake)),
            endpoint: Some(endpoint.parse().unwrap()),
            node: true,
        }
    }

    fn value(text: &str, name: &str, peer: &str) -> Option<f64> {
        samples(text)
            .into_iter()
            .find(|(n, l, _)| n == name && l.get("peer").map(String::as_str) == Some(peer))
            .map(|(_, _, v)| v)
    }

    #[test]
    fn renders_parseable_text_without_secrets() {
        // The keys of a configured device: the public ones may be shown, the private and
        // preshared ones never.
        let private = wgmesh_core::PrivateKey::generate();
        let peer_private = wgmesh_core::PrivateKey::generate();
        let preshared = wgmesh_core::PrivateKey::generate().expose_base64();
        let peer_key = peer_private.public_key().to_string();
        let m = Metrics::default();
        m.set_connected(true);
        m.set_peers(1);
        m.update_received();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2000);
        m.observe_peers(
            &[sample("node-b", &peer_key, 100, "192.0.2.2:51820", 1990)],
            now,
        );
        let text = m.render();
        for secret in [
            private.expose_base64(),
            peer_private.expose_base64(),
            preshared,
        ] {
            assert!(!text.contains(&secret), "secret in metrics:\n{text}");
        }
        let names: Vec<String> = samples(&text).into_iter().map(|s| s.0).collect();
        for name in &names {
            assert!(
                METRIC_NAMES.contains(&name.as_str()),
                "{name} not in METRIC_NAMES"
            );
        }
        for name in METRIC_NAMES {
            assert!(
                names.iter().any(|n| n == name),
                "{name} not rendered:\n{text}"
            );
        }
        assert_eq!(
            value(&text, "wgmesh_agent_peer_receive_bytes_total", "node-b"),
            Some(100.0)
        );
        assert_eq!(
            value(&text, "wgmesh_agent_peer_handshake_age_seconds", "node-b"),
            Some(10.0)
        );
        let info = samples(&text)
            .into_iter()
            .find(|(n, _, _)| n == "wgmesh_agent_peer_endpoint_info")
            .unwrap();
        assert_eq!(info.1["endpoint"], "192.0.2.2:51820");
        assert_eq!(info.1["public_key"], peer_key);
    }

    #[test]
    fn counters_stay_monotone_and_old_series_go() {
        let m = Metrics::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2000);
        let rx = |m: &Metrics| value(&m.render(), "wgmesh_agent_peer_receive_bytes_total", "b");
        m.observe_peers(&[sample("b", "KB", 100, "192.0.2.2:1", 1)], now);
        m.observe_peers(&[sample("b", "KB", 150, "192.0.2.2:1", 1)], now);
        assert_eq!(rx(&m), Some(150.0));
        // The device's total went back (peer re-added): the counter keeps growing.
        m.observe_peers(&[sample("b", "KB", 30, "192.0.2.9:2", 1)], now);
        assert_eq!(rx(&m), Some(180.0));
        // One endpoint series per peer: the old one went.
        let endpoints: Vec<_> = samples(&m.render())
            .into_iter()
            .filter(|(n, _, _)| n == "wgmesh_agent_peer_endpoint_info")
            .map(|(_, l, _)| l["endpoint"].clone())
            .collect();
        assert_eq!(endpoints, ["192.0.2.9:2"]);
        // A peer gone from the device takes its series with it.
        m.observe_peers(&[], now);
        let left: Vec<_> = samples(&m.render())
            .into_iter()
            .filter(|(_, l, _)| l.contains_key("peer"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn above_the_limit_node_peers_are_counted_together() {
        let m = Metrics::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2000);
        let laptop = PeerSample {
            node: false,
            ..sample("laptop", "KL", 5, "198.51.100.1:1", 1990)
        };
        let nodes = |n: usize, rx: u64| -> Vec<PeerSample> {
            (0..n)
                .map(|i| {
                    // Every other node's last handshake is older than a session lasts.
                    let handshake = if i % 2 == 0 { 1990 } else { 1000 };
                    sample(
                        &format!("n{i}"),
                        &format!("K{i}"),
                        rx,
                        "192.0.2.2:1",
                        handshake,
                    )
                })
                .chain([laptop.clone()])
                .collect()
        };
        let series_of = |text: &str, peer: &str| {
            samples(text)
                .into_iter()
                .filter(|(_, l, _)| l.get("peer").map(String::as_str) == Some(peer))
                .count()
        };
        let total = |text: &str, name: &str| {
            samples(text)
                .into_iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, _, v)| v)
        };

        // At the limit: every node peer has its own series, and the totals too.
        m.observe_peers(&nodes(NODE_PEER_DETAIL_LIMIT, 100), now);
        let text = m.render();
        assert_eq!(series_of(&text, "n0"), 5, "{text}");
        assert_eq!(
            total(&text, "wgmesh_agent_node_peers_receive_bytes_total"),
            Some(100.0 * NODE_PEER_DETAIL_LIMIT as f64)
        );

        // One more node: node peers' own series go; the totals keep counting, monotone.
        let over = NODE_PEER_DETAIL_LIMIT + 1;
        m.observe_peers(&nodes(over, 150), now);
        let text = m.render();
        assert_eq!(series_of(&text, "n0"), 0, "{text}");
        assert_eq!(series_of(&text, "laptop"), 5, "external peers keep theirs");
        assert_eq!(
            total(&text, "wgmesh_agent_node_peers_receive_bytes_total"),
            Some(
                100.0 * NODE_PEER_DETAIL_LIMIT as f64
                    + 50.0 * NODE_PEER_DETAIL_LIMIT as f64
                    + 150.0
            )
        );
        assert_eq!(total(&text, "wgmesh_agent_node_peers"), Some(over as f64));
        assert_eq!(
            total(&text, "wgmesh_agent_node_peers_live_sessions"),
            Some(over.div_ceil(2) as f64)
        );
        let per_peer = samples(&text)
            .into_iter()
            .filter(|(_, l, _)| l.contains_key("peer"))
            .count();
        assert_eq!(per_peer, 5, "only the laptop's series:\n{text}");
    }
}
