//! The status writer: runs on the lease holder only. It allocates tunnel addresses, writes
//! every peer's and mesh's status (conditions, addresses, what agents report), keeps node
//! peers' allowed IPs in step with their Node, and deletes node peers whose Node left.
//!
//! Writes are bounded: nothing is written when nothing meaningful changed, what agents report
//! is written at most once per object per `report_interval`, and a quiet mesh is never written.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use wgmesh_api::condition::{READY, Reason};
use wgmesh_api::peer::NodeHandshake;
use wgmesh_api::{WireGuardMesh, WireGuardMeshStatus, WireGuardPeer, WireGuardPeerStatus};
use wgmesh_core::PublicKey;
use wgmesh_core::desired::Verdict;

use crate::convert;
use crate::metrics::Metrics;
use crate::reconcile::Computed;
use crate::reports::{Aggregate, Reports};

/// How often the writer looks for report-driven writes that were held back by the rate limit.
const FLUSH_TICK: Duration = Duration::from_secs(5);

pub struct Writer {
    client: Client,
    recorder: Recorder,
    reports: Arc<Reports>,
    metrics: Metrics,
    report_interval: Duration,
    /// Addresses we allocated and wrote but the cache may not show yet.
    pending_addresses: HashMap<String, Vec<IpAddr>>,
    /// The last status we wrote per peer, and when report-driven fields were last written.
    written: HashMap<String, (WireGuardPeerStatus, Option<Instant>)>,
    mesh_written: HashMap<String, WireGuardMeshStatus>,
    /// Each peer's last verdict reason, to raise an Event only when it changes.
    last_reason: HashMap<String, Reason>,
    /// Refusal events and the startup taint, from what agents say of themselves.
    followups: crate::agent_followups::AgentFollowUps,
    /// How long after its stream closed a gateway's agent counts as down.
    gateway_failover: crate::liveness::Limit,
    /// When this replica became the lease holder: agents it has not seen by
    /// [`crate::liveness::UNSEEN`] after that are down.
    leader_since: Instant,
    /// When a gateway's agent next goes down unless heard from: the writer looks again then.
    next_liveness_check: Option<Instant>,
}

/// The verdict of one peer object, whichever way it was reached.
#[derive(Debug, PartialEq, Eq)]
struct PeerVerdict {
    ready: bool,
    reason: Reason,
    message: String,
}

/// How many peers the writer walks between two yields to the runtime.
const YIELD_EVERY: usize = 256;

/// The longest rest between two syncs (see [`crate::pacing`]).
const MAX_REST: Duration = Duration::from_millis(500);

impl Writer {
    pub fn new(
        client: Client,
        recorder: Recorder,
        reports: Arc<Reports>,
        metrics: Metrics,
        report_interval: Duration,
        leave_timeout: Duration,
        gateway_failover: crate::liveness::Limit,
    ) -> Self {
        Writer {
            client,
            recorder,
            reports,
            metrics,
            report_interval,
            pending_addresses: HashMap::new(),
            written: HashMap::new(),
            mesh_written: HashMap::new(),
            last_reason: HashMap::new(),
            followups: crate::agent_followups::AgentFollowUps::new(leave_timeout),
            gateway_failover,
            leader_since: Instant::now(),
            next_liveness_check: None,
        }
    }

    /// Writes while `leader` is true; idles otherwise.
    pub async fn run(
        mut self,
        mut computed: watch::Receiver<Arc<Computed>>,
        mut leader: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(FLUSH_TICK);
        let mut pacer = crate::pacing::Pacer::new(MAX_REST, Instant::now());
        let mut interrupted = false;
        loop {
            if !*leader.borrow_and_update() {
                // Another replica may write meanwhile: forget what we think we wrote.
                self.pending_addresses.clear();
                self.written.clear();
                self.mesh_written.clear();
                if leader.changed().await.is_err() {
                    return;
                }
                self.leader_since = Instant::now();
                // The other replicas announce their open streams to the new holder.
                self.reports.liveness.forget_remote();
                continue;
            }
            let snapshot = computed.borrow_and_update().clone();
            let started = Instant::now();
            // A node joining has its tunnel address written promptly: a newer snapshot with an
            // address not written yet cuts the walk short, and the next walk writes it first.
            // Never two walks in a row, so every status is still written under a flood of joins.
            let interruptible = !interrupted;
            let interrupt = || {
                interruptible
                    && computed.has_changed().unwrap_or(false)
                    && computed.borrow().awaiting_address
            };
            interrupted = !self.sync(&snapshot, &interrupt).await;
            tracing::debug!(
                synced_ms = started.elapsed().as_millis() as u64,
                interrupted,
                "walked every peer and mesh"
            );
            if interrupted {
                continue;
            }
            // A sync walks every peer: under a flood (thousands of agents reporting after a
            // restart) it rests, and what arrives meanwhile is taken by the next one.
            let rest = pacer.ran(started.elapsed(), Instant::now());
            tokio::time::sleep(rest).await;
            // No gateway about to go down: the tick wakes us anyway.
            let liveness_check = self
                .next_liveness_check
                .map_or_else(|| tokio::time::Instant::now() + FLUSH_TICK, Into::into);
            tokio::select! {
                r = computed.changed() => if r.is_err() { return },
                _ = self.reports.changed.notified() => {},
                _ = tick.tick() => {},
                _ = tokio::time::sleep_until(liveness_check) => {},
                r = leader.changed() => if r.is_err() { return },
            }
        }
    }

    /// Writes what `snapshot` calls for; `false` when `interrupt` cut the walk short.
    async fn sync(&mut self, snapshot: &Computed, interrupt: &(dyn Fn() -> bool + Sync)) -> bool {
        let nodes: HashMap<String, &Arc<Node>> =
            snapshot.nodes.iter().map(|n| (n.name_any(), n)).collect();
        let mut by_mesh: BTreeMap<&str, Vec<&Arc<WireGuardPeer>>> = BTreeMap::new();
        for peer in &snapshot.peers {
            by_mesh
                .entry(peer.spec.mesh.as_str())
                .or_default()
                .push(peer);
        }
        for (mesh_name, peers) in by_mesh {
            // Unknown until its Secrets are read: its peers keep the status they have.
            if snapshot.held.contains_key(mesh_name) {
                continue;
            }
            let mesh = snapshot.meshes.get(mesh_name);
            if !self
                .sync_mesh_peers(mesh_name, mesh, &peers, snapshot, &nodes, interrupt)
                .await
            {
                return false;
            }
        }
        self.next_liveness_check = None;
        for (name, (mesh, desired)) in &snapshot.meshes {
            let peers: Vec<&Arc<WireGuardPeer>> = snapshot
                .peers
                .iter()
                .filter(|p| p.spec.mesh.as_str() == name)
                .collect();
            self.write_mesh_status(mesh, &peers, desired).await;
        }
        for held in snapshot.held.values() {
            self.write_held_mesh_status(held).await;
        }
        let live: std::collections::HashSet<String> =
            snapshot.peers.iter().map(|p| p.name_any()).collect();
        self.followups
            .sync_finalizers(&self.client, &self.reports, snapshot)
            .await;
        self.followups
            .sync(
                &self.client,
                &self.recorder,
                &self.metrics,
                &self.reports,
                snapshot,
            )
            .await;
        self.written.retain(|k, _| live.contains(k));
        self.pending_addresses.retain(|k, _| live.contains(k));
        self.last_reason.retain(|k, _| live.contains(k));
        true
    }

    /// Writes the statuses of one mesh's peers; `false` when `interrupt` cut it short.
    async fn sync_mesh_peers(
        &mut self,
        mesh_name: &str,
        mesh: Option<&(Arc<WireGuardMesh>, Arc<wgmesh_core::desired::DesiredMesh>)>,
        peers: &[&Arc<WireGuardPeer>],
        snapshot: &Computed,
        nodes: &HashMap<String, &Arc<Node>>,
        interrupt: &(dyn Fn() -> bool + Sync),
    ) -> bool {
        // Tunnel addresses go in the desired mesh's precedence (core decides it, with the
        // claims); peers it has not seen yet come last, by name.
        let rank: HashMap<&str, usize> = mesh
            .map(|(_, d)| {
                d.precedence
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (n.as_str(), i))
                    .collect()
            })
            .unwrap_or_default();
        let mut order: Vec<&Arc<WireGuardPeer>> = peers.to_vec();
        order.sort_by_cached_key(|p| {
            let name = p.name_any();
            (rank.get(name.as_str()).copied().unwrap_or(usize::MAX), name)
        });
        let current: BTreeMap<String, Vec<IpAddr>> = order
            .iter()
            .map(|p| (p.name_any(), self.current_addresses(p)))
            .collect();
        // The desired mesh allocated them (and programs its members with them); the writer
        // persists them. A peer it has not seen keeps what it holds.
        let allocated = mesh.map(|(_, d)| &d.tunnel_addresses);
        let allocated_to = |name: &str| allocated.and_then(|a| a.get(name));
        let observed = self.reports.aggregate(mesh_name);
        // Nodes behind NAT are published where their relay saw them, and nowhere else: an
        // agent speaks for its own node, and the relay is the one every node behind NAT
        // keeps a session with.
        let natted: BTreeMap<String, PublicKey> = mesh
            .map(|(_, d)| {
                d.members
                    .iter()
                    .filter(|(_, m)| m.behind_nat)
                    .map(|(n, m)| (n.clone(), m.public_key))
                    .collect()
            })
            .unwrap_or_default();
        let relay_seen = mesh
            .and_then(|(_, d)| d.relay.as_deref())
            .filter(|_| !natted.is_empty())
            .and_then(|relay| {
                let keys = natted.values().copied().collect();
                self.reports.observed_by(mesh_name, relay, &keys)
            });
        // Roaming external peers are published where the active gateway saw them, and
        // nowhere else: another gateway's agent speaks for its own node, not for where a
        // laptop is (and the active gateway is the one every external peer's config sends
        // its traffic for the rest of the cluster to).
        let gateway_seen = mesh.and_then(|(_, d)| {
            let gateway = d.active_gateway.as_deref()?;
            let external: std::collections::BTreeSet<PublicKey> = d
                .peers
                .iter()
                .filter(|(_, p)| p.node.is_none())
                .map(|(k, _)| *k)
                .collect();
            self.reports.observed_by(mesh_name, gateway, &external)
        });
        let agents = self.reports.agents(mesh_name);
        let node_peers_in_detail = mesh.is_none_or(|(_, desired)| {
            self.reports
                .node_peers_in_detail(desired.node_peers_per_member())
        });

        // A peer given a new address (a node joining) is programmed with it already; it is
        // written first all the same (recomputations carry it over only until then, and
        // people and `kubectl wgmesh` read it there), not after a walk over every other peer.
        order.sort_by_cached_key(|p| {
            let name = p.name_any();
            allocated_to(&name).is_none_or(|a| Some(a) == current.get(&name))
        });
        for (i, peer) in order.into_iter().enumerate() {
            // A walk over thousands of peers that need no write never awaits: it yields
            // now and then, so the agents' streams are served meanwhile.
            if i % YIELD_EVERY == YIELD_EVERY - 1 {
                tokio::task::yield_now().await;
                if interrupt() {
                    return false;
                }
            }
            let name = peer.name_any();
            let verdict = verdict_of(peer, mesh, snapshot);
            self.raise_event_on_change(peer, &verdict).await;
            let addresses = allocated_to(&name)
                .or_else(|| current.get(&name))
                .cloned()
                .unwrap_or_default();
            // Someone else's object claiming a node: judged (refused), never adopted, and
            // shown nothing the node's agent reported.
            let owned_node =
                peer.spec.node.as_ref().map(|n| n.0.clone()).filter(|n| {
                    convert::is_owned_node_peer(peer, nodes.get(n).copied().map(|n| &**n))
                });
            let node_report = owned_node.as_ref().map(|node| NodeReport {
                live_sessions: agents.get(node).and_then(|a| a.live_node_sessions),
                reported: agents.contains_key(node),
                in_detail: node_peers_in_detail,
                endpoint_witness: match natted.get(node) {
                    None => EndpointWitness::AnyAgent,
                    Some(key) => EndpointWitness::Relay(
                        relay_seen
                            .as_ref()
                            .and_then(|seen| seen.get(key))
                            .and_then(|o| o.endpoint.clone()),
                    ),
                },
            });
            let external_witness = EndpointWitness::ActiveGateway(
                gateway_seen
                    .as_ref()
                    .zip(peer.spec.public_key.parse::<PublicKey>().ok())
                    .and_then(|(seen, key)| seen.get(&key))
                    .and_then(|o| o.endpoint.clone()),
            );
            self.write_peer_status(
                peer,
                &verdict,
                &addresses,
                &observed,
                node_report,
                external_witness,
            )
            .await;
            if let Some(node_name) = owned_node {
                let node = nodes.get(&node_name).copied();
                // The endpoint the desired mesh publishes for it (its Node's or the mesh's
                // choice), shown in spec.endpoint for humans and `kubectl wgmesh`.
                let endpoint = mesh.and_then(|(_, desired)| {
                    let key = peer.spec.public_key.parse().ok()?;
                    desired.peers.get(&key)?.endpoint.clone()
                });
                self.sync_node_peer(
                    peer,
                    mesh.map(|(m, _)| &**m),
                    node,
                    &addresses,
                    endpoint.as_deref(),
                    &snapshot.foreign_pod_cidrs,
                )
                .await;
            }
        }
        true
    }

    /// What the peer holds now: what we last wrote (until the cache catches up), else its status.
    fn current_addresses(&mut self, peer: &WireGuardPeer) -> Vec<IpAddr> {
        let name = peer.name_any();
        let from_status: Vec<IpAddr> = peer
            .status
            .as_ref()
            .map(|s| s.addresses.iter().filter_map(|a| a.parse().ok()).collect())
            .unwrap_or_default();
        match self.pending_addresses.get(&name) {
            Some(pending) if *pending != from_status => pending.clone(),
            Some(_) => {
                self.pending_addresses.remove(&name);
                from_status
            }
            None => from_status,
        }
    }

    async fn write_peer_status(
        &mut self,
        peer: &WireGuardPeer,
        verdict: &PeerVerdict,
        addresses: &[IpAddr],
        observed: &HashMap<PublicKey, Aggregate>,
        node_report: Option<NodeReport>,
        external_witness: EndpointWitness,
    ) {
        let name = peer.name_any();
        let current = peer.status.clone().unwrap_or_default();
        // Built on this writer's own last write where there is one: the cache may not have
        // caught up with it yet, and a status built on the cache's would put back the
        // reports written since (for a whole report interval, as reports are not due).
        let mut desired = self
            .written
            .get(&name)
            .map_or_else(|| current.clone(), |(last, _)| last.clone());
        desired.addresses = addresses.iter().map(ToString::to_string).collect();
        desired.observed_generation = peer.metadata.generation;
        desired.conditions = vec![ready_condition(
            current.conditions.iter().find(|c| c.type_ == READY),
            verdict,
            peer.metadata.generation,
        )];

        // What agents report is written at most once per interval per object.
        let last_report_write = self.written.get(&name).and_then(|(_, at)| *at);
        let report_due = last_report_write.is_none_or(|at| at.elapsed() >= self.report_interval);
        let key = peer.spec.public_key.parse::<PublicKey>().ok();
        let mut wrote_reports = false;
        let mut with_reports = desired.clone();
        if let Some(agg) = key.and_then(|k| observed.get(&k)) {
            apply_observation(&mut with_reports, agg, self.reports.handshakes_listed());
        }
        match node_report {
            Some(report) => apply_node_report(&mut with_reports, &desired, report),
            None => {
                if let Some(endpoint) = external_witness.endpoint(&desired) {
                    with_reports.endpoint = endpoint;
                }
            }
        }
        if with_reports != desired && report_due {
            desired = with_reports;
            wrote_reports = true;
        }

        if desired == current {
            return;
        }
        if let Some((last, _)) = self.written.get(&name) {
            // Already written; the cache has not caught up yet.
            if *last == desired {
                return;
            }
        }
        match self.patch_status::<WireGuardPeer, _>(&name, &desired).await {
            Ok(()) => {
                let at = if wrote_reports {
                    Some(Instant::now())
                } else {
                    last_report_write
                };
                let addrs: Vec<IpAddr> = addresses.to_vec();
                self.pending_addresses.insert(name.clone(), addrs);
                self.written.insert(name, (desired, at));
            }
            Err(e) => {
                self.metrics.error("status_write");
                tracing::warn!(peer = %name, error = %e, "writing peer status failed");
            }
        }
    }

    /// Keeps a node peer's `spec.allowedIPs` equal to its tunnel addresses and pod CIDRs and
    /// its `spec.endpoint` to the one the desired mesh publishes, and
    /// deletes the node peer when its Node is gone or left the mesh's selector.
    async fn sync_node_peer(
        &mut self,
        peer: &WireGuardPeer,
        mesh: Option<&WireGuardMesh>,
        node: Option<&Arc<Node>>,
        addresses: &[IpAddr],
        endpoint: Option<&str>,
        foreign: &convert::ForeignPodCidrs,
    ) {
        let api: Api<WireGuardPeer> = Api::all(self.client.clone());
        let name = peer.name_any();
        let selected = match (mesh, node) {
            (Some(m), Some(n)) => {
                convert::selector_matches(m.spec.node_selector.as_ref(), n.labels())
            }
            (None, Some(_)) => true,
            (_, None) => false,
        };
        if !selected {
            tracing::info!(peer = %name, "deleting the peer of a node that left the mesh");
            if let Err(e) = api.delete(&name, &DeleteParams::default()).await
                && !is_not_found(&e)
            {
                self.metrics.error("delete_node_peer");
                tracing::warn!(peer = %name, error = %e, "deleting node peer failed");
            }
            return;
        }
        // A gone mesh has no pod CIDR source to follow: nothing to update.
        let (Some(node), Some(mesh)) = (node, mesh) else {
            return;
        };
        let pod_cidrs = convert::pod_cidrs(node, mesh.spec.pod_cidr_source, foreign);
        let want: Vec<String> = wgmesh_core::desired::node_allowed_ips(addresses, &pod_cidrs)
            .iter()
            .map(ToString::to_string)
            .collect();
        let have: Vec<String> = peer.spec.allowed_ips.iter().map(|c| c.0.clone()).collect();
        let have_endpoint = peer.spec.endpoint.as_ref().map(|e| e.0.as_str());
        // Behind NAT, none until the relay has seen it: never the private address it
        // registered.
        let endpoint = if convert::behind_nat(node) {
            endpoint
        } else {
            endpoint.or(have_endpoint)
        };
        if want == have && endpoint == have_endpoint {
            return;
        }
        let mut patch = json!({ "spec": { "allowedIPs": want, "endpoint": endpoint } });
        // Node peers from before the annotation: keep what the agent registered before
        // spec.endpoint shows another choice.
        if !peer
            .annotations()
            .contains_key(convert::REGISTERED_ENDPOINT_ANNOTATION)
            && let Some(registered) = have_endpoint
        {
            patch["metadata"] = json!({ "annotations": {
                convert::REGISTERED_ENDPOINT_ANNOTATION: registered
            }});
        }
        if let Err(e) = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            self.metrics.error("node_peer_allowed_ips");
            tracing::warn!(peer = %name, error = %e, "updating node peer allowed IPs failed");
        }
    }

    async fn write_mesh_status(
        &mut self,
        mesh: &WireGuardMesh,
        peers: &[&Arc<WireGuardPeer>],
        desired_mesh: &wgmesh_core::desired::DesiredMesh,
    ) {
        let verdicts = &desired_mesh.verdicts;
        let name = mesh.name_any();
        let programmed =
            |p: &WireGuardPeer| matches!(verdicts.get(&p.name_any()), Some(Verdict::Programmed));
        let (node_peers, external): (Vec<&Arc<WireGuardPeer>>, Vec<&Arc<WireGuardPeer>>) =
            peers.iter().copied().partition(|p| p.spec.node.is_some());
        let nodes = node_peers.len() as i32;
        let ready_nodes = node_peers.iter().filter(|p| programmed(p)).count() as i32;
        let peers_count = external.len() as i32;
        let ready_peers = external.iter().filter(|p| programmed(p)).count() as i32;
        let all_ready = ready_nodes == nodes && ready_peers == peers_count;
        let counts = format!(
            "{ready_nodes}/{nodes} nodes and {ready_peers}/{peers_count} external peers are programmed"
        );
        let verdict = if mesh.spec.disabled {
            // The agents keep what they have and apply nothing new.
            PeerVerdict {
                ready: false,
                reason: Reason::Disabled,
                message: format!(
                    "spec.disabled is true: the nodes keep what they have programmed and apply \
                     no change (no peer added, changed or removed) until it is enabled; {counts}"
                ),
            }
        } else if nodes == 0 {
            // Nothing is encrypted yet: not Ready, however many of nothing are programmed.
            PeerVerdict {
                ready: false,
                reason: Reason::NoMembers,
                message: format!(
                    "no node is a member yet: no Node matches the nodeSelector, or no agent \
                     has registered; {counts}"
                ),
            }
        } else {
            PeerVerdict {
                ready: all_ready,
                reason: if all_ready {
                    Reason::AllPeersProgrammed
                } else {
                    Reason::PeersNotReady
                },
                message: counts,
            }
        };
        let current = mesh.status.clone().unwrap_or_default();
        let active_gateway =
            self.active_gateway(&name, desired_mesh, current.active_gateway.as_deref());
        let desired = WireGuardMeshStatus {
            nodes,
            ready_nodes,
            peers: peers_count,
            ready_peers,
            gateways: desired_mesh.gateways.clone(),
            active_gateway,
            conditions: vec![ready_condition(
                current.conditions.iter().find(|c| c.type_ == READY),
                &verdict,
                mesh.metadata.generation,
            )],
            observed_generation: mesh.metadata.generation,
        };
        self.patch_mesh_status(name, &current, desired).await;
    }

    /// A held mesh's status: its counts as they were, `Ready=False` with why it is held.
    async fn write_held_mesh_status(&mut self, held: &crate::reconcile::HeldMesh) {
        let mesh = &held.mesh;
        let current = mesh.status.clone().unwrap_or_default();
        let verdict = PeerVerdict {
            ready: false,
            reason: held.reason,
            message: held.message.clone(),
        };
        let desired = WireGuardMeshStatus {
            conditions: vec![ready_condition(
                current.conditions.iter().find(|c| c.type_ == READY),
                &verdict,
                mesh.metadata.generation,
            )],
            observed_generation: mesh.metadata.generation,
            ..current.clone()
        };
        self.patch_mesh_status(mesh.name_any(), &current, desired)
            .await;
    }

    async fn patch_mesh_status(
        &mut self,
        name: String,
        current: &WireGuardMeshStatus,
        desired: WireGuardMeshStatus,
    ) {
        if desired == *current || self.mesh_written.get(&name) == Some(&desired) {
            return;
        }
        match self.patch_status::<WireGuardMesh, _>(&name, &desired).await {
            Ok(()) => {
                self.mesh_written.insert(name, desired);
            }
            Err(e) => {
                self.metrics.error("mesh_status_write");
                tracing::warn!(mesh = %name, error = %e, "writing mesh status failed");
            }
        }
    }

    /// The gateway that should carry external traffic now: `current` unless its agent is down
    /// ([`crate::liveness`]). Notes when to look again.
    fn active_gateway(
        &mut self,
        mesh: &str,
        desired: &wgmesh_core::desired::DesiredMesh,
        current: Option<&str>,
    ) -> Option<String> {
        let now = Instant::now();
        let liveness = &self.reports.liveness;
        let gateways = &desired.gateways;
        let unseen_after = self.leader_since + crate::liveness::UNSEEN;
        let limit = self.gateway_failover;
        let down = liveness.down(mesh, gateways, now, limit, unseen_after);
        let next = liveness.next_change(mesh, gateways, now, limit, unseen_after);
        self.next_liveness_check = match (self.next_liveness_check, next) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let active = wgmesh_core::gateway::choose_active(gateways, current, &down);
        if active.as_deref() != current
            && let (Some(from), Some(to)) = (current, active.as_deref())
        {
            tracing::warn!(
                mesh,
                from,
                to,
                down = down.len(),
                "gateway failover: external peers' traffic moves"
            );
            self.metrics.gateway_failover(mesh);
        }
        // With no gateway at all, the last one named stays (it is ignored until it is one).
        active.or(current.map(str::to_owned))
    }

    /// One status write (a merge patch of `.status`), counted.
    async fn patch_status<K, S>(&self, name: &str, status: &S) -> kube::Result<()>
    where
        K: Resource<Scope = k8s_openapi::ClusterResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
        S: serde::Serialize,
    {
        let api: Api<K> = Api::all(self.client.clone());
        let patch = json!({ "status": status });
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        self.metrics.status_written();
        Ok(())
    }

    async fn raise_event_on_change(&mut self, peer: &WireGuardPeer, verdict: &PeerVerdict) {
        let name = peer.name_any();
        let previous = self.last_reason.insert(name.clone(), verdict.reason);
        if verdict.ready || previous == Some(verdict.reason) {
            return;
        }
        if verdict.reason == Reason::Programmed {
            return;
        }
        let event = Event {
            type_: EventType::Warning,
            reason: verdict.reason.as_str().into(),
            note: Some(verdict.message.clone()),
            action: "Validate".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &peer.object_ref(&())).await {
            tracing::debug!(peer = %name, error = %e, "publishing an event failed");
        }
    }
}

fn verdict_of(
    peer: &WireGuardPeer,
    mesh: Option<&(Arc<WireGuardMesh>, Arc<wgmesh_core::desired::DesiredMesh>)>,
    snapshot: &Computed,
) -> PeerVerdict {
    let name = peer.name_any();
    if let Some(why) = snapshot.invalid.get(&name) {
        return PeerVerdict {
            ready: false,
            reason: Reason::InvalidSpec,
            message: why.clone(),
        };
    }
    let Some((mesh, desired)) = mesh else {
        return PeerVerdict {
            ready: false,
            reason: Reason::MeshNotFound,
            message: format!("WireGuardMesh {} does not exist", peer.spec.mesh),
        };
    };
    match desired.verdicts.get(&name) {
        // The agents apply nothing while the mesh is disabled: accepted, not programmed.
        Some(Verdict::Programmed) if mesh.spec.disabled => PeerVerdict {
            ready: false,
            reason: Reason::Disabled,
            message: format!(
                "accepted, but WireGuardMesh {} is disabled: its nodes apply no change until \
                 it is enabled",
                peer.spec.mesh
            ),
        },
        Some(Verdict::Programmed) => PeerVerdict {
            ready: true,
            reason: Reason::Programmed,
            message: "accepted: in the peer set sent to every member node".into(),
        },
        Some(Verdict::Refused { reason, message }) => PeerVerdict {
            ready: false,
            reason: *reason,
            message: message.clone(),
        },
        None => PeerVerdict {
            ready: false,
            reason: Reason::TunnelAddressPending,
            message: "not yet computed".into(),
        },
    }
}

/// The Ready condition, keeping the previous transition time when nothing changed.
fn ready_condition(
    previous: Option<&Condition>,
    verdict: &PeerVerdict,
    generation: Option<i64>,
) -> Condition {
    let status = if verdict.ready { "True" } else { "False" };
    let unchanged = previous.is_some_and(|p| {
        p.status == status && p.reason == verdict.reason.as_str() && p.message == verdict.message
    });
    Condition {
        type_: READY.into(),
        status: status.into(),
        reason: verdict.reason.as_str().into(),
        message: verdict.message.clone(),
        observed_generation: generation,
        last_transition_time: match previous {
            Some(p) if unchanged || p.status == status => p.last_transition_time.clone(),
            _ => Time(jiff::Timestamp::now()),
        },
    }
}

fn apply_observation(status: &mut WireGuardPeerStatus, agg: &Aggregate, listed: usize) {
    status.rx_bytes = i64::try_from(agg.rx_bytes).unwrap_or(i64::MAX);
    status.tx_bytes = i64::try_from(agg.tx_bytes).unwrap_or(i64::MAX);
    if agg.endpoint.is_some() {
        status.endpoint = agg.endpoint.clone();
    }
    status.last_handshake_time = agg.last_handshake.and_then(to_time);
    status.handshakes = latest_handshakes(&agg.by_node, listed)
        .into_iter()
        .filter_map(|(node, t)| {
            Some(NodeHandshake {
                node: node.clone(),
                last_handshake_time: to_time(*t)?,
            })
        })
        .collect();
}

/// The latest `listed` handshakes ([`Reports::handshakes_listed`]), by node name (a stable
/// order: a status whose entries only moved is not written again). An external peer can hold
/// sessions with every gateway, by default every node: at 5,000 nodes a full list is some
/// 320 KB, rewritten whole at every report interval.
fn latest_handshakes(
    by_node: &BTreeMap<String, SystemTime>,
    listed: usize,
) -> Vec<(&String, &SystemTime)> {
    let mut all: Vec<(&String, &SystemTime)> = by_node.iter().collect();
    if listed > 0 && all.len() > listed {
        all.select_nth_unstable_by(listed - 1, |a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        all.truncate(listed);
        all.sort_unstable_by_key(|(node, _)| *node);
    }
    all
}

/// What a node's own agent reported of itself, for its node peer's status.
#[derive(Clone, Debug)]
struct NodeReport {
    /// The agent's count of live sessions; `None` when it reported none (an agent from
    /// before the count).
    live_sessions: Option<u32>,
    /// Whether the agent has reported to this process at all. Until it has (a controller
    /// just started, or became the lease holder), what the status shows stays: clearing it
    /// would write every node peer twice after each restart, the second time back to what it
    /// was.
    reported: bool,
    /// Whether the mesh is small enough for node peers to be observed one by one.
    in_detail: bool,
    /// Whose observation of the node's endpoint its status shows.
    endpoint_witness: EndpointWitness,
}

/// Whose observation of a peer's endpoint its `status.endpoint` shows (and the mesh
/// publishes, for a node behind NAT or a roaming external peer).
#[derive(Clone, Debug, PartialEq, Eq)]
enum EndpointWitness {
    /// Any agent's (the aggregate of reports): a node not behind NAT.
    AnyAgent,
    /// Only its relay's, for a node behind NAT: where the relay saw it; `None` while it has
    /// not (it has not reported to this process, or has no endpoint for the node).
    Relay(Option<String>),
    /// Only the active gateway's, for an external peer; `None` while it has not seen it.
    ActiveGateway(Option<String>),
}

impl EndpointWitness {
    /// The endpoint the witness says, or what `before` shows while it has seen none (an
    /// agent or controller restart, or a failover, would otherwise unpublish it for a
    /// while); `None` when any agent's word counts.
    fn endpoint(&self, before: &WireGuardPeerStatus) -> Option<Option<String>> {
        match self {
            EndpointWitness::AnyAgent => None,
            EndpointWitness::Relay(seen) | EndpointWitness::ActiveGateway(seen) => {
                Some(seen.clone().or_else(|| before.endpoint.clone()))
            }
        }
    }
}

/// A node peer's live sessions; in a mesh too large for per-node detail, no per-node
/// observations either (nobody reports them any more: what was there would only go stale).
fn apply_node_report(
    status: &mut WireGuardPeerStatus,
    before: &WireGuardPeerStatus,
    report: NodeReport,
) {
    // Behind NAT: the relay's word (what any other agent saw, the aggregate, never counts).
    let endpoint = report.endpoint_witness.endpoint(before);
    apply_session_report(status, &report);
    if let Some(endpoint) = endpoint {
        status.endpoint = endpoint;
    }
}

fn apply_session_report(status: &mut WireGuardPeerStatus, report: &NodeReport) {
    if report.reported {
        status.live_sessions = report
            .live_sessions
            .map(|n| i32::try_from(n).unwrap_or(i32::MAX));
    }
    if !report.in_detail {
        status.handshakes.clear();
        status.last_handshake_time = None;
        status.endpoint = None;
        status.rx_bytes = 0;
        status.tx_bytes = 0;
    }
}

fn to_time(t: SystemTime) -> Option<Time> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .and_then(|d| jiff::Timestamp::from_second(d.as_secs() as i64).ok())
        .map(Time)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgmesh_api::WireGuardMeshSpec;
    use wgmesh_core::desired::DesiredMesh;

    fn peer(name: &str) -> WireGuardPeer {
        let spec = serde_json::from_value(json!({
            "mesh": "office",
            "publicKey": PublicKey::from_bytes([1; 32]).to_base64(),
        }))
        .unwrap();
        WireGuardPeer::new(name, spec)
    }

    fn verdict(ready: bool, reason: Reason, message: &str) -> PeerVerdict {
        PeerVerdict {
            ready,
            reason,
            message: message.into(),
        }
    }

    #[test]
    fn verdict_of_table() {
        let mut desired = DesiredMesh::default();
        desired.verdicts.insert("ok".into(), Verdict::Programmed);
        desired.verdicts.insert(
            "off".into(),
            Verdict::Refused {
                reason: Reason::Disabled,
                message: "spec.disabled is true".into(),
            },
        );
        let mesh = (
            Arc::new(WireGuardMesh::new("office", WireGuardMeshSpec::default())),
            Arc::new(desired),
        );
        let mut snapshot = Computed::default();
        snapshot
            .invalid
            .insert("broken".into(), "spec.endpoint: bad port".into());
        // (case, peer, whether its mesh exists, expected verdict)
        let cases = [
            (
                "an invalid spec wins over everything",
                "broken",
                true,
                verdict(false, Reason::InvalidSpec, "spec.endpoint: bad port"),
            ),
            (
                "an invalid spec wins over a missing mesh",
                "broken",
                false,
                verdict(false, Reason::InvalidSpec, "spec.endpoint: bad port"),
            ),
            (
                "no mesh",
                "ok",
                false,
                verdict(
                    false,
                    Reason::MeshNotFound,
                    "WireGuardMesh office does not exist",
                ),
            ),
            (
                "programmed",
                "ok",
                true,
                verdict(
                    true,
                    Reason::Programmed,
                    "accepted: in the peer set sent to every member node",
                ),
            ),
            (
                "refused: core's reason and message",
                "off",
                true,
                verdict(false, Reason::Disabled, "spec.disabled is true"),
            ),
            (
                "not in the computation yet: pending, not refused",
                "new",
                true,
                verdict(false, Reason::TunnelAddressPending, "not yet computed"),
            ),
        ];
        for (case, name, has_mesh, want) in cases {
            let got = verdict_of(&peer(name), has_mesh.then_some(&mesh), &snapshot);
            assert_eq!(got, want, "{case}");
        }
        // A disabled mesh: accepted peers are not programmed; refused ones stay refused.
        let mut disabled = (*mesh.0).clone();
        disabled.spec.disabled = true;
        let disabled = (Arc::new(disabled), mesh.1.clone());
        let got = verdict_of(&peer("ok"), Some(&disabled), &snapshot);
        assert_eq!(
            (got.ready, got.reason),
            (false, Reason::Disabled),
            "{got:?}"
        );
        assert!(got.message.contains("is disabled"), "{got:?}");
        let got = verdict_of(&peer("off"), Some(&disabled), &snapshot);
        assert_eq!(got.message, "spec.disabled is true");
    }

    #[test]
    fn ready_condition_table() {
        let then = Time(jiff::Timestamp::UNIX_EPOCH);
        let previous = |status: &str, reason: Reason, message: &str| Condition {
            type_: READY.into(),
            status: status.into(),
            reason: reason.as_str().into(),
            message: message.into(),
            observed_generation: Some(1),
            last_transition_time: then.clone(),
        };
        let refused = verdict(false, Reason::AllowedIpsOverlap, "overlaps node a");
        let programmed = verdict(
            true,
            Reason::Programmed,
            "accepted: in the peer set sent to every member node",
        );
        // (case, previous condition, verdict, whether the transition time is kept)
        let cases = [
            ("first condition", None, &refused, false),
            (
                "nothing changed",
                Some(previous(
                    "False",
                    Reason::AllowedIpsOverlap,
                    "overlaps node a",
                )),
                &refused,
                true,
            ),
            (
                "same status, another reason: no transition",
                Some(previous("False", Reason::TunnelAddressPending, "pending")),
                &refused,
                true,
            ),
            (
                "False to True is a transition",
                Some(previous(
                    "False",
                    Reason::AllowedIpsOverlap,
                    "overlaps node a",
                )),
                &programmed,
                false,
            ),
            (
                "True to False is a transition",
                Some(previous(
                    "True",
                    Reason::Programmed,
                    "accepted: in the peer set sent to every member node",
                )),
                &refused,
                false,
            ),
        ];
        for (case, previous, verdict, kept) in cases {
            let got = ready_condition(previous.as_ref(), verdict, Some(7));
            assert_eq!(got.type_, READY, "{case}");
            assert_eq!(
                got.status,
                if verdict.ready { "True" } else { "False" },
                "{case}"
            );
            assert_eq!(got.reason, verdict.reason.as_str(), "{case}");
            assert_eq!(got.message, verdict.message, "{case}");
            assert_eq!(got.observed_generation, Some(7), "{case}");
            assert_eq!(got.last_transition_time == then, kept, "{case}");
        }
    }

    #[test]
    fn node_report_table() {
        let observed = || WireGuardPeerStatus {
            handshakes: vec![NodeHandshake {
                node: "b".into(),
                last_handshake_time: Time(jiff::Timestamp::UNIX_EPOCH),
            }],
            last_handshake_time: Some(Time(jiff::Timestamp::UNIX_EPOCH)),
            endpoint: Some("192.0.2.2:51820".into()),
            rx_bytes: 10,
            tx_bytes: 20,
            ..Default::default()
        };
        // (case, live sessions reported (None: no report to this process yet), in detail,
        // live sessions shown, observations kept), from a status showing 7 live sessions
        let cases = [
            ("small mesh", Some(Some(3)), true, Some(3), true),
            (
                "small mesh, agent from before the count",
                Some(None),
                true,
                None,
                true,
            ),
            ("large mesh", Some(Some(4998)), false, Some(4998), false),
            (
                "large mesh, agent from before the count",
                Some(None),
                false,
                None,
                false,
            ),
            (
                "small mesh, not reported to this process yet",
                None,
                true,
                Some(7),
                true,
            ),
            (
                "large mesh, not reported to this process yet",
                None,
                false,
                Some(7),
                false,
            ),
        ];
        for (case, live, in_detail, shown, kept) in cases {
            let mut status = WireGuardPeerStatus {
                live_sessions: Some(7),
                ..observed()
            };
            let before = status.clone();
            apply_node_report(
                &mut status,
                &before,
                NodeReport {
                    live_sessions: live.flatten(),
                    reported: live.is_some(),
                    in_detail,
                    endpoint_witness: EndpointWitness::AnyAgent,
                },
            );
            assert_eq!(status.live_sessions, shown, "{case}");
            let untouched = WireGuardPeerStatus {
                live_sessions: shown,
                ..observed()
            };
            assert_eq!(status == untouched, kept, "{case}");
            if !kept {
                assert!(status.handshakes.is_empty(), "{case}");
                assert_eq!((status.rx_bytes, status.tx_bytes), (0, 0), "{case}");
            }
        }
    }

    #[test]
    fn a_node_behind_nat_is_shown_where_its_relay_saw_it() {
        // (case, endpoint before (the aggregate's: any agent's), where the relay saw it, in
        // detail, endpoint shown)
        type Case<'a> = (
            &'a str,
            Option<&'a str>,
            Option<&'a str>,
            bool,
            Option<&'a str>,
        );
        let cases: [Case; 5] = [
            (
                "the relay's observation, not the aggregate's",
                Some("192.0.2.66:51820"),
                Some("198.51.100.7:40001"),
                true,
                Some("198.51.100.7:40001"),
            ),
            (
                "kept in a mesh too large for detail",
                None,
                Some("198.51.100.7:40001"),
                false,
                Some("198.51.100.7:40001"),
            ),
            (
                "the relay has not seen it (yet): what was shown stays",
                Some("198.51.100.7:40001"),
                None,
                true,
                Some("198.51.100.7:40001"),
            ),
            (
                "the relay has not seen it, in a mesh too large for detail",
                Some("198.51.100.7:40001"),
                None,
                false,
                Some("198.51.100.7:40001"),
            ),
            ("nothing seen, nothing shown", None, None, true, None),
        ];
        for (case, before, relay, in_detail, want) in cases {
            let before = WireGuardPeerStatus {
                endpoint: before.map(str::to_owned),
                ..Default::default()
            };
            // What the aggregate (any agent's report) would have put there.
            let mut status = WireGuardPeerStatus {
                endpoint: Some("192.0.2.99:51820".into()),
                ..before.clone()
            };
            apply_node_report(
                &mut status,
                &before,
                NodeReport {
                    live_sessions: Some(1),
                    reported: true,
                    in_detail,
                    endpoint_witness: EndpointWitness::Relay(relay.map(str::to_owned)),
                },
            );
            assert_eq!(status.endpoint.as_deref(), want, "{case}");
        }
    }

    #[test]
    fn a_status_lists_the_latest_handshakes_only() {
        let at = |secs: u64| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let few: BTreeMap<String, SystemTime> = (0..3)
            .map(|i| (format!("node-{i}"), at(1000 + i)))
            .collect();
        assert_eq!(latest_handshakes(&few, 65).len(), 3, "all of a few");
        // 5,000 nodes: the 65 latest (node-4935..node-4999), in name order.
        let many: BTreeMap<String, SystemTime> = (0..5000)
            .map(|i| (format!("node-{i:04}"), at(1000 + i)))
            .collect();
        let listed: Vec<&String> = latest_handshakes(&many, 65)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let want: Vec<String> = (4935..5000).map(|i| format!("node-{i:04}")).collect();
        assert_eq!(listed, want.iter().collect::<Vec<_>>());
    }
}
