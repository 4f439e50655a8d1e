//! Prometheus metrics of the controller, served on `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Cheap to clone; every clone updates the same metrics.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    reconciles: Counter,
    errors: Family<Labels, Counter>,
    connected_agents: Gauge,
    stream_messages: Family<Labels, Counter>,
    stream_bytes: Counter,
    convergence: Histogram,
    auth_failures: Family<Labels, Counter>,
    status_writes: Counter,
    is_leader: Gauge,
    refused_updates: Family<Labels, Counter>,
    gateway_failovers: Family<Labels, Counter>,
    registrations: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wgmesh_controller");
        let reconciles = Counter::default();
        let errors = Family::<Labels, Counter>::default();
        let connected_agents = Gauge::default();
        let stream_messages = Family::<Labels, Counter>::default();
        let stream_bytes = Counter::default();
        let convergence = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let auth_failures = Family::<Labels, Counter>::default();
        let status_writes = Counter::default();
        let is_leader = Gauge::default();
        let refused_updates = Family::<Labels, Counter>::default();
        let gateway_failovers = Family::<Labels, Counter>::default();
        let registrations = Family::<Labels, Counter>::default();
        registry.register(
            "registrations",
            "Registrations taken, by outcome: written (the node's peer changed or is new) or unchanged (nothing to write)",
            registrations.clone(),
        );
        registry.register(
            "gateway_failovers",
            "Moves of the active gateway off a gateway whose agent was down, by mesh",
            gateway_failovers.clone(),
        );
        registry.register(
            "agent_refused_updates",
            "Updates agents refused to program (they would have wiped the node without the mesh saying so), by mesh",
            refused_updates.clone(),
        );
        registry.register(
            "reconciles",
            "Recomputations of the desired mesh",
            reconciles.clone(),
        );
        registry.register("errors", "Errors by reason", errors.clone());
        registry.register(
            "connected_agents",
            "Open WatchPeers streams",
            connected_agents.clone(),
        );
        registry.register(
            "stream_messages",
            "Messages sent on WatchPeers streams, by kind",
            stream_messages.clone(),
        );
        registry.register(
            "stream_bytes",
            "Bytes sent on WatchPeers streams",
            stream_bytes.clone(),
        );
        registry.register(
            "convergence_seconds",
            "Time from a Kubernetes change to the new desired state being published",
            convergence.clone(),
        );
        registry.register(
            "auth_failures",
            "Refused agent calls, by gRPC code",
            auth_failures.clone(),
        );
        registry.register(
            "status_writes",
            "Status writes to the API server",
            status_writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the lease",
            is_leader.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                reconciles,
                errors,
                connected_agents,
                stream_messages,
                stream_bytes,
                convergence,
                auth_failures,
                status_writes,
                is_leader,
                refused_updates,
                gateway_failovers,
                registrations,
            }),
        }
    }

    pub fn reconciled(&self, seconds_since_change: f64) {
        self.inner.reconciles.inc();
        self.inner.convergence.observe(seconds_since_change);
    }

    pub fn gateway_failover(&self, mesh: &str) {
        self.inner
            .gateway_failovers
            .get_or_create(&vec![("mesh", mesh.to_owned())])
            .inc();
    }

    pub fn agent_refused_update(&self, mesh: &str) {
        self.inner
            .refused_updates
            .get_or_create(&vec![("mesh", mesh.to_owned())])
            .inc();
    }

    /// A registration taken: `written` or `unchanged`.
    pub fn registration(&self, outcome: &'static str) {
        self.inner
            .registrations
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
    }

    pub fn error(&self, reason: &str) {
        self.inner
            .errors
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }

    pub fn agent_connected(&self) {
        self.inner.connected_agents.inc();
    }

    pub fn agent_disconnected(&self) {
        self.inner.connected_agents.dec();
    }

    pub fn stream_sent(&self, kind: &'static str, bytes: usize) {
        self.inner
            .stream_messages
            .get_or_create(&vec![("kind", kind.to_owned())])
            .inc();
        self.inner.stream_bytes.inc_by(bytes as u64);
    }

    pub fn auth_failure(&self, code: tonic::Code) {
        self.inner
            .auth_failures
            .get_or_create(&vec![("code", format!("{code:?}"))])
            .inc();
    }

    pub fn status_written(&self) {
        self.inner.status_writes.inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.inner.is_leader.set(i64::from(leader));
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.inner.registry).expect("writing to a String cannot fail");
        out
    }
}
