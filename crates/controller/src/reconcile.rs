//! The reconciler: watches Nodes, meshes and peers, recomputes every mesh's desired state with
//! `wgmesh_core::desired::compute` when anything changes, and publishes it to the index (for the
//! agents' streams) and to the status writer.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Node, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::watch;
use wgmesh_api::foreign::{CalicoIpamBlock, CiliumNode};
use wgmesh_api::mesh::SecretKeyRef;
use wgmesh_api::{Backend, PodCidrSource, WireGuardMesh, WireGuardPeer};
use wgmesh_core::desired::{self, DesiredMesh, PeerInput, ReservedRange, SecretInput};
use wgmesh_core::mesh_conflicts::{self, MeshClaim};
use wgmesh_core::reason::Reason;
use wgmesh_proto as pb;

use crate::convert::{self, ForeignPodCidrs, Secrets};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::relevant::{Change, Fingerprints, Outputs, Pending};
use crate::secret_scope::SecretNamespaces;

/// How often referenced Secrets are read again (agents have no API access; the controller
/// is the only reader, with `get` rights only).
const SECRET_REFRESH: Duration = Duration::from_secs(15);

/// The caches every replica keeps.
#[derive(Clone)]
pub struct Caches {
    pub nodes: Store<Node>,
    pub meshes: Store<WireGuardMesh>,
    pub peers: Store<WireGuardPeer>,
    /// The cluster's Service CIDRs (Kubernetes 1.33+); reserved, no peer may claim them.
    pub service_cidrs: Store<ServiceCIDR>,
    /// The `kubernetes` Service's endpoints: the API server's real addresses, reserved.
    pub api_endpoints: Store<EndpointSlice>,
    /// Reserved ranges from the controller's configuration (`--reserved-cidrs`) and the
    /// address it reaches the API server at.
    pub configured_reserved: Arc<Vec<ReservedRange>>,
    pub seniority: Arc<Mutex<Seniority>>,
    /// Calico's IPAM blocks, watched once a mesh reads its pod CIDRs from them.
    pub calico_blocks: ForeignCache<CalicoIpamBlock>,
    /// Cilium's per-node objects, watched once a mesh reads its pod CIDRs from them.
    pub cilium_nodes: ForeignCache<CiliumNode>,
}

/// The cache of another project's objects, and whether it has been listed once.
#[derive(Clone)]
pub struct ForeignCache<K: Resource<DynamicType = ()> + 'static> {
    pub store: Store<K>,
    synced: Arc<AtomicBool>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> ForeignCache<K> {
    /// Whether the objects have been listed: until then every node's pod CIDRs from this
    /// source are unknown, not empty.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }
}

impl Caches {
    /// The pod CIDRs in Calico's and Cilium's objects, by node.
    pub fn foreign_pod_cidrs(&self) -> ForeignPodCidrs {
        ForeignPodCidrs {
            calico: convert::calico_pod_cidrs(
                self.calico_blocks.store.state().iter().map(|b| &**b),
            ),
            cilium: convert::cilium_pod_cidrs(self.cilium_nodes.store.state().iter().map(|n| &**n)),
        }
    }

    /// The objects a pod CIDR source reads, when they have not been listed yet.
    fn unsynced_source(&self, source: PodCidrSource) -> Option<&'static str> {
        match source {
            PodCidrSource::Node | PodCidrSource::Annotation => None,
            PodCidrSource::Calico => {
                (!self.calico_blocks.synced()).then_some("Calico's IPAMBlocks")
            }
            PodCidrSource::Cilium => (!self.cilium_nodes.synced()).then_some("CiliumNodes"),
        }
    }

    /// Every cluster-wide range no peer may claim, beyond the fixed ones and node addresses.
    pub fn reserved(&self) -> Vec<ReservedRange> {
        let service_cidrs = self.service_cidrs.state().into_iter().flat_map(|s| {
            let name = s.name_any();
            s.spec
                .as_ref()
                .and_then(|spec| spec.cidrs.clone())
                .unwrap_or_default()
                .into_iter()
                .filter_map(move |c| {
                    let cidr = wgmesh_core::Cidr::parse_masked(&c).ok()?;
                    Some(ReservedRange::new(
                        cidr,
                        format!("the Service CIDR ({name})"),
                    ))
                })
        });
        let api_server = self.api_endpoints.state().into_iter().flat_map(|slice| {
            slice
                .endpoints
                .iter()
                .flat_map(|e| e.addresses.clone())
                .filter_map(|a| a.parse().ok())
                .map(|ip| {
                    ReservedRange::new(wgmesh_core::Cidr::host(ip), "an address of the API server")
                })
                .collect::<Vec<_>>()
        });
        self.configured_reserved
            .iter()
            .cloned()
            .chain(service_cidrs)
            .chain(api_server)
            .collect()
    }
}

/// The order in which this process first saw each peer, to break ties between peers created
/// in the same second (creation times have one-second resolution).
#[derive(Default)]
pub struct Seniority {
    next: u64,
    by_uid: HashMap<String, u64>,
}

impl Seniority {
    /// Ranks every peer (the result is in `peers`' order), giving new ones the next numbers
    /// in resourceVersion order (the order the API server stored them in), and forgets
    /// deleted ones.
    pub fn rank(&mut self, peers: &[Arc<WireGuardPeer>]) -> Vec<u64> {
        let mut unseen: Vec<&Arc<WireGuardPeer>> = peers
            .iter()
            .filter(|p| !self.by_uid.contains_key(uid(p)))
            .collect();
        unseen.sort_by_cached_key(|p| {
            let rv = p
                .metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok());
            (rv.unwrap_or(u64::MAX), p.name_any())
        });
        for p in unseen {
            self.next += 1;
            self.by_uid.insert(uid(p).to_owned(), self.next);
        }
        if self.by_uid.len() > peers.len() {
            let live: HashSet<&str> = peers.iter().map(|p| uid(p)).collect();
            self.by_uid.retain(|u, _| live.contains(u.as_str()));
        }
        peers.iter().map(|p| self.by_uid[uid(p)]).collect()
    }
}

/// What identifies a peer for its seniority: its uid, else (objects built by hand) its name.
fn uid(peer: &WireGuardPeer) -> &str {
    peer.metadata
        .uid
        .as_deref()
        .or(peer.metadata.name.as_deref())
        .unwrap_or_default()
}

/// What one recomputation produced, handed to the status writer.
#[derive(Debug, Default)]
pub struct Computed {
    /// Desired state per mesh.
    pub meshes: BTreeMap<String, (Arc<WireGuardMesh>, Arc<DesiredMesh>)>,
    /// Peers whose spec could not be used at all, with why.
    pub invalid: BTreeMap<String, String>,
    pub peers: Vec<Arc<WireGuardPeer>>,
    pub nodes: Vec<Arc<Node>>,
    /// Meshes held at their last published state, with why: a Secret they reference has
    /// never been read successfully (a fresh controller, an API error), or their pod CIDR
    /// source (Calico's or Cilium's objects) has not been listed yet, so what they should be
    /// is unknown; or their tunnel pool cannot be programmed on their nodes
    /// ([`desired::check_tunnel_pools`]). Their agents and peers' statuses are left as they
    /// are; the mesh's own status says why.
    pub held: BTreeMap<String, HeldMesh>,
    /// The pod CIDRs other IPAMs assigned, by node (`spec.podCIDRSource`).
    pub foreign_pod_cidrs: Arc<ForeignPodCidrs>,
    /// Meshes being deleted (their finalizer waits for their nodes to leave), with the nodes
    /// that have a node peer in them.
    pub deleting: BTreeMap<String, (Arc<WireGuardMesh>, BTreeSet<String>)>,
    /// Whether a peer's tunnel address is allocated (and published) but not in its status
    /// yet (a node joining): the writer then cuts short a walk of an older snapshot.
    pub awaiting_address: bool,
}

/// How the watches retry after an API server error. kube's default (client-go's: up to 30 s,
/// doubled by jitter, kept for 120 s) left the controller blind to Node and peer changes for
/// over a minute after a 15 s API server outage. One controller with five watches is no load
/// for an API server coming back, so it retries within 5 s; a success resets the delay.
fn watch_backoff() -> watcher::ExponentialBackoff {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(WATCH_RETRY_MAX)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .into()
}

/// The longest a watch waits before retrying (jitter adds up to as much again).
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

/// Starts the watches and returns the caches, a future that drives them, and a receiver of
/// change signals.
pub fn watch_cluster(
    client: &Client,
    configured_reserved: Vec<ReservedRange>,
) -> (
    Caches,
    impl std::future::Future<Output = ()> + Send + 'static,
    Arc<Pending>,
) {
    let (nodes, nodes_w) = reflector::store::<Node>();
    let (meshes, meshes_w) = reflector::store::<WireGuardMesh>();
    let (peers, peers_w) = reflector::store::<WireGuardPeer>();
    let (service_cidrs, service_cidrs_w) = reflector::store::<ServiceCIDR>();
    let (api_endpoints, api_endpoints_w) = reflector::store::<EndpointSlice>();
    let cfg = watcher::Config::default;
    let node_events = watcher(Api::<Node>::all(client.clone()), cfg())
        .backoff(watch_backoff())
        .modify(crate::trim::node)
        .reflect(nodes_w)
        .filter_map(changes())
        .boxed();
    let mesh_events = watcher(Api::<WireGuardMesh>::all(client.clone()), cfg())
        .backoff(watch_backoff())
        .reflect(meshes_w)
        .filter_map(changes())
        .boxed();
    let peer_events = watcher(Api::<WireGuardPeer>::all(client.clone()), cfg())
        .backoff(watch_backoff())
        .modify(crate::trim::peer)
        .reflect(peers_w)
        .filter_map(changes())
        .boxed();
    // Reserved ranges: clusters before 1.33 have no ServiceCIDR objects (that watch then
    // retries with backoff, and --reserved-cidrs must name the Service CIDR).
    let service_cidr_events = watcher(Api::<ServiceCIDR>::all(client.clone()), cfg())
        .backoff(watch_backoff())
        .reflect(service_cidrs_w)
        .filter_map(changes())
        .boxed();
    let api_endpoint_events = watcher(
        Api::<EndpointSlice>::namespaced(client.clone(), "default"),
        cfg().labels("kubernetes.io/service-name=kubernetes"),
    )
    .backoff(watch_backoff())
    .reflect(api_endpoints_w)
    .filter_map(changes())
    .boxed();
    let (calico_blocks, calico_events) =
        foreign_watch::<CalicoIpamBlock>(client, meshes.clone(), PodCidrSource::Calico);
    let (cilium_nodes, cilium_events) =
        foreign_watch::<CiliumNode>(client, meshes.clone(), PodCidrSource::Cilium);
    let pending = Arc::new(Pending::default());
    let changes = pending.clone();
    let driver = async move {
        let mut all = stream::select_all([
            node_events,
            mesh_events,
            peer_events,
            service_cidr_events,
            api_endpoint_events,
            calico_events,
            cilium_events,
        ]);
        while let Some(change) = all.next().await {
            changes.add(change);
        }
    };
    (
        Caches {
            nodes,
            meshes,
            peers,
            service_cidrs,
            api_endpoints,
            configured_reserved: Arc::new(configured_reserved),
            seniority: Arc::default(),
            calico_blocks,
            cilium_nodes,
        },
        driver,
        pending,
    )
}

/// A filter of a reflected watch that passes what each event changed in the cache, when it
/// changed something ([`Fingerprints`]); watch errors change nothing.
fn changes<K>()
-> impl FnMut(Result<watcher::Event<K>, watcher::Error>) -> std::future::Ready<Option<Change>>
where
    K: kube::Resource + serde::Serialize + Clone + Outputs,
{
    let mut fingerprints = Fingerprints::default();
    move |event| {
        std::future::ready(match event {
            Ok(event) => Some(fingerprints.change(&event)).filter(|c| *c != Change::Nothing),
            Err(_) => None,
        })
    }
}

/// A watch of another project's cluster-scoped objects that starts only once a mesh reads
/// its pod CIDRs from them: clusters without Calico or Cilium never see the request, and the
/// chart grants the controller read access only to the source it is given. Until the first
/// list succeeds (the CRD missing, access denied) the cache stays unsynced, so the meshes
/// reading it are held as they are rather than stripped of their pod CIDRs.
fn foreign_watch<K>(
    client: &Client,
    meshes: Store<WireGuardMesh>,
    source: PodCidrSource,
) -> (ForeignCache<K>, futures::stream::BoxStream<'static, Change>)
where
    K: Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let synced = Arc::new(AtomicBool::new(false));
    let flag = synced.clone();
    let wanted = async move {
        while !meshes
            .state()
            .iter()
            .any(|m| m.spec.pod_cidr_source == source)
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        tracing::info!(kind = %K::kind(&()), "a mesh reads its pod CIDRs from these objects: watching them");
    };
    let events = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .backoff(watch_backoff())
        .reflect(writer)
        .map(move |event| match event {
            Ok(watcher::Event::InitDone) => {
                flag.store(true, Ordering::Release);
                Change::Inputs
            }
            Ok(_) => Change::Inputs,
            Err(e) => {
                tracing::warn!(kind = %K::kind(&()), error = %e, "cannot watch a mesh's pod CIDR source");
                Change::Nothing
            }
        });
    let stream = stream::once(wanted)
        .map(|()| Change::Nothing)
        .chain(events)
        .boxed();
    (ForeignCache { store, synced }, stream)
}

/// The longest rest between two recomputations (see [`crate::pacing`]).
const MAX_REST: Duration = Duration::from_millis(500);

/// Recomputes on every change signal (coalescing bursts) and on Secret changes.
pub async fn run(
    client: Client,
    caches: Caches,
    changes: Arc<Pending>,
    index: Arc<Index>,
    computed: watch::Sender<Arc<Computed>>,
    metrics: Metrics,
    secret_namespaces: SecretNamespaces,
) {
    let mut secrets = Secrets::new();
    let mut refresh = tokio::time::interval(SECRET_REFRESH);
    let mut pacer = crate::pacing::Pacer::new(MAX_REST, Instant::now());
    let mut computed_once = false;
    loop {
        // Whatever changed meanwhile is taken at once: one recomputation for all of it.
        let (first_change, change, refresh_secrets) = tokio::select! {
            (at, change) = changes.next() => (at, change, false),
            _ = refresh.tick() => (Instant::now(), Change::Inputs, true),
        };
        if change == Change::Outputs {
            // Only what the writer wrote changed: its snapshot is brought up to date, and
            // the desired meshes, computed from inputs that did not change, stay.
            let previous = computed.borrow().clone();
            computed.send_replace(Arc::new(refreshed(&previous, &caches)));
            continue;
        }

        // Secrets are read when first referenced and then on every refresh tick.
        let refs = referenced_secrets(&caches);
        secrets.retain(|r, _| refs.contains(r));
        let to_read: BTreeSet<SecretKeyRef> = refs
            .into_iter()
            .filter(|r| refresh_secrets || !secrets.contains_key(r))
            .collect();
        let read = read_secrets(&client, &to_read, &secret_namespaces, &secrets, &metrics).await;
        let secrets_changed = read.iter().any(|(r, value)| secrets.get(r) != Some(value));
        secrets.extend(read);
        if refresh_secrets && !secrets_changed && computed_once {
            // The tick only re-reads Secrets: the same values change nothing, and a
            // recomputation of thousands of objects every tick would be for nothing.
            continue;
        }

        let started = Instant::now();
        // On a runtime worker, not a blocking thread: a join waits for this recomputation,
        // and on a blocking thread it competed for the cores with the streams and the writer
        // (a 5,000-node bench run was twice as slow).
        let previous = computed.borrow().clone();
        let result = compute_all(&caches, &secrets, &index, &previous);
        computed_once = true;
        metrics.reconciled(first_change.elapsed().as_secs_f64());
        tracing::debug!(
            computed_ms = started.elapsed().as_millis() as u64,
            since_change_ms = first_change.elapsed().as_millis() as u64,
            "recomputed the desired meshes"
        );
        computed.send_replace(Arc::new(result));
        // Recomputing is O(objects): under a flood of events it rests (what arrives
        // meanwhile is coalesced into the next one), an isolated change does not.
        let rest = pacer.ran(started.elapsed(), Instant::now());
        tokio::time::sleep(rest).await;
    }
}

/// `previous` with the objects as the caches hold them now, for changes only the status
/// writer reads ([`Change::Outputs`]): the desired meshes and judgements stay.
fn refreshed(previous: &Computed, caches: &Caches) -> Computed {
    // Destructured, so that a new field is decided here.
    let Computed {
        meshes,
        invalid,
        peers: _,
        nodes: _,
        held,
        foreign_pod_cidrs,
        deleting,
        awaiting_address,
    } = previous;
    Computed {
        meshes: meshes
            .iter()
            .map(|(name, (mesh, desired))| {
                let mesh = caches
                    .meshes
                    .get(&reflector::ObjectRef::new(name))
                    .unwrap_or_else(|| mesh.clone());
                (name.clone(), (mesh, desired.clone()))
            })
            .collect(),
        invalid: invalid.clone(),
        peers: caches.peers.state(),
        nodes: caches.nodes.state(),
        held: held.clone(),
        foreign_pod_cidrs: foreign_pod_cidrs.clone(),
        deleting: deleting.clone(),
        awaiting_address: *awaiting_address,
    }
}

/// Recomputes every mesh from the caches and publishes the results to the index.
/// `previous` is the last computation: the tunnel addresses it allocated and published are
/// held until the status writer has written them.
pub fn compute_all(
    caches: &Caches,
    secrets: &Secrets,
    index: &Index,
    previous: &Computed,
) -> Computed {
    let nodes = caches.nodes.state();
    let peers = caches.peers.state();
    let meshes = caches.meshes.state();
    let mut out = Computed {
        peers: peers.clone(),
        nodes: nodes.clone(),
        ..Default::default()
    };

    let seniority = caches
        .seniority
        .lock()
        .expect("seniority lock")
        .rank(&peers);
    let mut inputs: BTreeMap<String, Vec<PeerInput>> = BTreeMap::new();
    for (peer, rank) in peers.iter().zip(seniority) {
        match convert::peer_input(peer, secrets, rank) {
            Ok(input) => inputs
                .entry(peer.spec.mesh.0.clone())
                .or_default()
                .push(input),
            Err(why) => {
                out.invalid.insert(peer.name_any(), why);
            }
        }
    }

    let reserved = caches.reserved();
    out.foreign_pod_cidrs = Arc::new(caches.foreign_pod_cidrs());
    let mut live = BTreeSet::new();
    let mut prepared = Vec::new();
    for mesh in &meshes {
        let name = mesh.name_any();
        if mesh.metadata.deletion_timestamp.is_some() {
            // Being deleted: its agents are told so (the index forgets it) and leave.
            let nodes = peers
                .iter()
                .filter(|p| p.spec.mesh.0 == name)
                .filter_map(|p| p.spec.node.as_ref().map(|n| n.0.clone()))
                .collect();
            out.deleting.insert(name, (mesh.clone(), nodes));
            continue;
        }
        live.insert(name.clone());
        let unknown = unknown_secrets(mesh, &peers, secrets);
        if !unknown.is_empty() {
            tracing::warn!(mesh = %name, secrets = ?unknown, "holding the mesh as it is: a Secret it references could not be read yet");
            let names: Vec<String> = unknown
                .iter()
                .map(|r| format!("{}/{}", r.namespace, r.name.as_str()))
                .collect();
            let message = format!("held as it is: Secrets not read yet: {}", names.join(", "));
            out.held.insert(name, held(mesh, Reason::MeshHeld, message));
            continue;
        }
        if let Some(source) = caches.unsynced_source(mesh.spec.pod_cidr_source) {
            tracing::warn!(mesh = %name, "holding the mesh as it is: its pod CIDR source ({source}) has not been listed yet (is the CRD installed, and may the controller list it?)");
            let message = format!(
                "held as it is: the pod CIDR source {source} has not been listed yet (is its \
                 CRD installed, and may the controller list it? see rbac.podCIDRSources)"
            );
            out.held.insert(name, held(mesh, Reason::MeshHeld, message));
            continue;
        }
        let mesh_input = convert::mesh_input(mesh, secrets, &reserved);
        let node_inputs: Vec<_> = nodes
            .iter()
            .map(|n| convert::node_input(n, mesh, &out.foreign_pod_cidrs))
            .collect();
        if let Err(why) = desired::check_tunnel_pools(&mesh_input, &node_inputs) {
            tracing::warn!(mesh = %name, reason = %why, "holding the mesh as it is: its tunnel pool cannot be programmed");
            let message = format!("held as it is: {why}");
            out.held
                .insert(name, held(mesh, Reason::InvalidTunnelPool, message));
            continue;
        }
        prepared.push((mesh, name, mesh_input, node_inputs));
    }
    // Meshes that would fight over a node (one interface, port and pool route each there):
    // the older keeps the node, the newer is held. A mesh held for another reason keeps its
    // data plane as it is, so it still claims what it selects.
    let claims: Vec<MeshClaim> = meshes
        .iter()
        // One mesh fights no other: nothing to build at 5,000 nodes.
        .filter(|_| live.len() > 1)
        .filter(|mesh| live.contains(&mesh.name_any()))
        .map(|mesh| mesh_claim(mesh, &nodes))
        .collect();
    let conflicting = mesh_conflicts::conflicts(&claims);
    for (mesh, name, mesh_input, node_inputs) in prepared {
        if let Some(message) = conflicting.get(&name) {
            tracing::warn!(mesh = %name, reason = %message, "holding the mesh as it is: it conflicts with another mesh on a node");
            out.held
                .insert(name, held(mesh, Reason::MeshConflict, message.clone()));
            continue;
        }
        let mut peer_inputs = inputs.remove(&name).unwrap_or_default();
        let mut unwritten = false;
        if let Some((_, before)) = previous.meshes.get(&name) {
            for input in &mut peer_inputs {
                unwritten |= hold_allocated(input, &before.tunnel_addresses);
            }
        }
        let desired = desired::compute(&mesh_input, &node_inputs, &peer_inputs);
        out.awaiting_address |= unwritten
            || peer_inputs
                .iter()
                .any(|p| desired.tunnel_addresses.get(&p.name) != Some(&p.tunnel_addresses));
        index.publish(&name, settings_of(mesh), desired.clone());
        out.meshes.insert(name, (mesh.clone(), Arc::new(desired)));
    }
    for gone in index.meshes().into_iter().filter(|m| !live.contains(m)) {
        index.remove(&gone);
    }
    out
}

/// What `mesh` takes on the nodes it selects, from its spec alone (a held mesh has no
/// computed input).
fn mesh_claim(mesh: &WireGuardMesh, nodes: &[Arc<Node>]) -> MeshClaim {
    let spec = &mesh.spec;
    MeshClaim {
        name: mesh.name_any(),
        created: mesh
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(i64::MAX, |t| t.0.as_second()),
        interface: spec.interface_name.clone(),
        listen_port: u16::try_from(spec.listen_port).unwrap_or(0),
        tunnel_pools: spec
            .tunnel_cidrs
            .iter()
            .filter_map(|c| wgmesh_core::Cidr::parse_masked(c.as_str()).ok())
            .collect(),
        nodes: nodes
            .iter()
            .filter(|n| convert::selector_matches(spec.node_selector.as_ref(), n.labels()))
            .map(|n| n.name_any())
            .collect(),
    }
}

fn held(mesh: &Arc<WireGuardMesh>, reason: Reason, message: String) -> HeldMesh {
    HeldMesh {
        mesh: mesh.clone(),
        reason,
        message,
    }
}

/// A mesh held as it is, and why (its `Ready` condition).
#[derive(Debug, Clone)]
pub struct HeldMesh {
    pub mesh: Arc<WireGuardMesh>,
    pub reason: Reason,
    pub message: String,
}

/// Adds to what a peer's status holds the tunnel addresses `allocated` to it by an earlier
/// computation and not written yet: they are published already, so they stay its (a senior
/// peer seen meanwhile does not take them). `true` if it added any.
fn hold_allocated(input: &mut PeerInput, allocated: &BTreeMap<String, Vec<IpAddr>>) -> bool {
    let Some(addresses) = allocated.get(&input.name) else {
        return false;
    };
    let mut added = false;
    for a in addresses {
        if !input.tunnel_addresses.contains(a) {
            input.tunnel_addresses.push(*a);
            added = true;
        }
    }
    added
}

/// The Secrets whose value is unknown (never read, or only ever failing to read; a Secret that
/// does not exist is known: missing) and that the mesh's data plane depends on: the mesh's
/// own, and those of peers programmed now. A new peer's unknown Secret only keeps that peer
/// out (as a missing one does), so no peer author can freeze the mesh by naming a Secret.
fn unknown_secrets(
    mesh: &WireGuardMesh,
    peers: &[Arc<WireGuardPeer>],
    secrets: &Secrets,
) -> Vec<SecretKeyRef> {
    let name = mesh.name_any();
    let of_peers = peers
        .iter()
        .filter(|p| p.spec.mesh.0 == name && convert::is_programmed(p))
        .filter_map(|p| p.spec.preshared_key_secret_ref.as_ref());
    let refs: BTreeSet<&SecretKeyRef> = mesh.spec.preshared_key.iter().chain(of_peers).collect();
    refs.into_iter()
        .filter(|r| !secrets.contains_key(r))
        .cloned()
        .collect()
}

/// A Secret's value after a read: what the API said, except that an error (throttling, a
/// timeout, a forbidden) keeps the last value read, or leaves it unknown. Only NotFound means
/// missing: an API blip must never change the data plane.
fn after_read(
    previous: Option<&SecretInput>,
    read: Result<SecretInput, String>,
) -> Option<SecretInput> {
    match read {
        Ok(value) => Some(value),
        Err(_) => previous.cloned(),
    }
}

/// The interface settings agents receive for a mesh.
pub fn settings_of(mesh: &WireGuardMesh) -> pb::MeshSettings {
    let spec = &mesh.spec;
    pb::MeshSettings {
        interface_name: spec.interface_name.clone(),
        listen_port: spec.listen_port.clamp(0, 65535) as u32,
        mtu: spec.mtu.unwrap_or(0).max(0) as u32,
        backend: match spec.backend {
            Backend::Auto => pb::Backend::Unspecified,
            Backend::Kernel => pb::Backend::Kernel,
            Backend::Userspace => pb::Backend::Userspace,
        } as i32,
        persistent_keepalive: spec.persistent_keepalive.unwrap_or(0).clamp(0, 65535) as u32,
        fwmark: spec.fwmark.as_ref().map(|f| f.mark as u32).unwrap_or(0),
        fwmark_table: spec
            .fwmark
            .as_ref()
            .and_then(|f| f.table)
            .map(|t| t as u32)
            .unwrap_or(0),
        tunnel_cidrs: spec.tunnel_cidrs.iter().map(|c| c.0.clone()).collect(),
        disabled: spec.disabled,
        plaintext_fallback: !spec.strict,
        cluster_cidrs: spec.cluster_cidrs.iter().map(|c| c.0.clone()).collect(),
        host_encryption: spec.encrypts_hosts(),
    }
}

fn referenced_secrets(caches: &Caches) -> BTreeSet<SecretKeyRef> {
    let from_meshes = caches
        .meshes
        .state()
        .iter()
        .filter_map(|m| m.spec.preshared_key.clone())
        .collect::<Vec<_>>();
    let from_peers = caches
        .peers
        .state()
        .iter()
        .filter_map(|p| p.spec.preshared_key_secret_ref.clone())
        .collect::<Vec<_>>();
    from_meshes.into_iter().chain(from_peers).collect()
}

async fn read_secrets(
    client: &Client,
    refs: &BTreeSet<SecretKeyRef>,
    allowed: &SecretNamespaces,
    previous: &Secrets,
    metrics: &Metrics,
) -> Secrets {
    let mut out = Secrets::new();
    for r in refs {
        // Outside the allowed namespaces: not even a request.
        if let Err(why) = allowed.check(r) {
            out.insert(r.clone(), SecretInput::Missing(why));
            continue;
        }
        let api: Api<Secret> = Api::namespaced(client.clone(), &r.namespace);
        let what = format!("Secret {}/{}", r.namespace, r.name.0);
        let read = match api.get_opt(&r.name.0).await {
            Ok(Some(secret)) => Ok(match secret.data.as_ref().and_then(|d| d.get(&r.key)) {
                Some(bytes) if bytes.0.is_empty() => {
                    SecretInput::Missing(format!("{what} key {} is empty", r.key))
                }
                Some(bytes) => SecretInput::Present(bytes.0.clone()),
                None => SecretInput::Missing(format!("{what} has no key {}", r.key)),
            }),
            Ok(None) => Ok(SecretInput::Missing(format!("{what} does not exist"))),
            Err(e) => {
                metrics.error("read_secret");
                tracing::warn!(secret = %what, error = %e, "reading a Secret failed; keeping what was last read");
                Err(e.to_string())
            }
        };
        if let Some(value) = after_read(previous.get(r), read) {
            out.insert(r.clone(), value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_retries_within_ten_seconds_however_long_the_outage() {
        let delays: Vec<Duration> = watch_backoff().take(50).collect();
        assert!(delays[0] <= Duration::from_millis(500), "{delays:?}");
        assert!(
            delays.iter().all(|d| *d <= 2 * WATCH_RETRY_MAX),
            "{delays:?}"
        );
    }

    #[test]
    fn a_read_error_keeps_the_last_value_and_only_not_found_means_missing() {
        let present = SecretInput::Present(b"k".to_vec());
        let missing = SecretInput::Missing("Secret s/x does not exist".into());
        type Case<'a> = (
            &'a str,
            Option<&'a SecretInput>,
            Result<SecretInput, String>,
            Option<&'a SecretInput>,
        );
        let cases: Vec<Case> = vec![
            ("read", None, Ok(present.clone()), Some(&present)),
            (
                "deleted (NotFound)",
                Some(&present),
                Ok(missing.clone()),
                Some(&missing),
            ),
            (
                "an error keeps the last value",
                Some(&present),
                Err("429".into()),
                Some(&present),
            ),
            (
                "an error keeps a known absence",
                Some(&missing),
                Err("timeout".into()),
                Some(&missing),
            ),
            (
                "an error before any read leaves it unknown",
                None,
                Err("403".into()),
                None,
            ),
        ];
        for (what, previous, read, want) in cases {
            assert_eq!(after_read(previous, read).as_ref(), want, "{what}");
        }
    }

    /// A peer as the API server lists it: (name, uid, resourceVersion).
    fn peer((name, uid, rv): (&str, Option<&str>, Option<&str>)) -> Arc<WireGuardPeer> {
        let spec = serde_json::from_value(serde_json::json!({
            "publicKey": wgmesh_core::PublicKey::from_bytes([1; 32]).to_base64(),
        }))
        .unwrap();
        let mut p = WireGuardPeer::new(name, spec);
        p.metadata.uid = uid.map(Into::into);
        p.metadata.resource_version = rv.map(Into::into);
        Arc::new(p)
    }

    type Listed = (&'static str, Option<&'static str>, Option<&'static str>);
    /// One listing and the ranks it must yield.
    type Round = (&'static [Listed], &'static [(&'static str, u64)]);

    /// Each case feeds one `Seniority` successive listings and checks every rank it returns.
    #[test]
    fn seniority_rank_table() {
        struct Case {
            name: &'static str,
            rounds: &'static [Round],
        }
        let cases = [
            Case {
                name: "new peers are ranked by resourceVersion, not list order",
                rounds: &[(
                    &[
                        ("c", Some("u-c"), Some("30")),
                        ("a", Some("u-a"), Some("200")),
                        ("b", Some("u-b"), Some("9")),
                    ],
                    &[("b", 1), ("c", 2), ("a", 3)],
                )],
            },
            Case {
                name: "a missing or unparsable resourceVersion ranks last, ties by name",
                rounds: &[(
                    &[
                        ("z", Some("u-z"), None),
                        ("y", Some("u-y"), Some("not-a-number")),
                        ("x", Some("u-x"), Some("5")),
                    ],
                    &[("x", 1), ("y", 2), ("z", 3)],
                )],
            },
            Case {
                name: "a seen peer keeps its rank even when a later one has a lower version",
                rounds: &[
                    (&[("a", Some("u-a"), Some("50"))], &[("a", 1)]),
                    (
                        &[
                            ("a", Some("u-a"), Some("51")),
                            ("b", Some("u-b"), Some("7")),
                        ],
                        &[("a", 1), ("b", 2)],
                    ),
                ],
            },
            Case {
                name: "a deleted peer is forgotten; recreated (new uid) it ranks as new",
                rounds: &[
                    (
                        &[
                            ("a", Some("u-a1"), Some("1")),
                            ("b", Some("u-b"), Some("2")),
                        ],
                        &[("a", 1), ("b", 2)],
                    ),
                    (&[("b", Some("u-b"), Some("2"))], &[("b", 2)]),
                    (
                        &[
                            ("a", Some("u-a2"), Some("3")),
                            ("b", Some("u-b"), Some("2")),
                        ],
                        &[("a", 3), ("b", 2)],
                    ),
                ],
            },
            Case {
                name: "without a uid the name identifies the peer",
                rounds: &[
                    (&[("a", None, Some("1"))], &[("a", 1)]),
                    (&[("a", None, Some("2"))], &[("a", 1)]),
                ],
            },
        ];
        for case in cases {
            let mut seniority = Seniority::default();
            for (i, (listed, want)) in case.rounds.iter().enumerate() {
                let peers: Vec<_> = listed.iter().copied().map(peer).collect();
                let want: HashMap<String, u64> =
                    want.iter().map(|(n, r)| (n.to_string(), *r)).collect();
                let ranks = seniority.rank(&peers);
                let got: HashMap<String, u64> =
                    peers.iter().map(|p| p.name_any()).zip(ranks).collect();
                assert_eq!(got, want, "{}: round {i}", case.name);
            }
        }
    }
}
