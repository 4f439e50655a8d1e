//! Prometheus metrics and `/healthz` of the agent, on a local port.

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type PeerLabel = Vec<(&'static str, String)>;

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
    rx: Family<PeerLabel, Gauge>,
    tx: Family<PeerLabel, Gauge>,
    handshake: Family<PeerLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let (connected, peers, updates) = (Gauge::default(), Gauge::default(), Counter::default());
        let (rx, tx, handshake) = (Family::default(), Family::default(), Family::default());
        let refused = Counter::default();
        let mut registry = Registry::with_prefix("wgmesh_agent");
        registry.register(
            "controller_connected",
            "1 while the peer stream is open",
            connected.clone(),
        );
        registry.register("peers", "Peers programmed on the device", peers.clone());
        registry.register(
            "updates",
            "Peer updates received from the controller",
            updates.clone(),
        );
        registry.register(
            "refused_updates",
            "Updates not programmed because they would have wiped the data plane without the mesh saying so",
            refused.clone(),
        );
        registry.register("peer_rx_bytes", "Bytes received from a peer", rx.clone());
        registry.register("peer_tx_bytes", "Bytes sent to a peer", tx.clone());
        registry.register(
            "peer_last_handshake_seconds",
            "Unix time of a peer's last handshake (0: never)",
            handshake.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                connected,
                peers,
                updates,
                refused,
                rx,
                tx,
                handshake,
            }),
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
    pub fn observe_peer(&self, name: &str, rx: u64, tx: u64, handshake: Option<SystemTime>) {
        let label = vec![("peer", name.to_owned())];
        self.inner.rx.get_or_create(&label).set(rx as i64);
        self.inner.tx.get_or_create(&label).set(tx as i64);
        let secs = handshake
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.inner.handshake.get_or_create(&label).set(secs);
    }
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.inner.registry).expect("writing to a String cannot fail");
        out
    }
}
