//! The `wgmesh.v1.MeshService` gRPC service: registration, peer streams and status reports.
//! Every replica serves it from its own caches.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use prost::Message;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use wgmesh_api::WireGuardPeer;
use wgmesh_core::PublicKey;
use wgmesh_core::node_config::{NodeConfig, NodeUpdate, next_update_within};
use wgmesh_proto as pb;
use wgmesh_proto::served::mesh_service_server::MeshService;
use wgmesh_proto::{checked, encode, served};

use crate::auth::{Authenticator, TokenBucket};
use crate::convert;
use crate::forward::{Forwarder, STREAM_COUNT, STREAM_EVENT, STREAM_ORIGIN, forwarded_by_replica};
use crate::index::{Index, NodeView};
use crate::liveness::{Origin, StreamEvent};
use crate::metrics::Metrics;
use crate::reconcile::Caches;
use crate::reports::{self, Reports};

/// How long Register waits for the new node's tunnel address before answering without it
/// (the address then arrives on the peer stream).
const REGISTER_WAIT: Duration = Duration::from_secs(10);
/// Messages buffered per stream; a slower agent gets coalesced updates instead.
const STREAM_BUFFER: usize = 2;
/// Snapshots being sent at once. After a controller restart every agent asks for one; sent
/// all at once, each stream holds a snapshot's parts in its buffers and HTTP/2 window at the
/// same time (O(nodes) each, O(nodes^2) in all). A few dozen keep both cores busy.
pub const SNAPSHOTS_IN_FLIGHT: usize = 32;
/// How long a stream holds its turn for its agent to take the snapshot's last parts: a slow
/// agent delays no other for longer.
const SNAPSHOT_TURN: Duration = Duration::from_secs(5);
/// How long a snapshot may wait for room in its stream before it gives its turn up (and
/// goes on without one): an agent that stops reading keeps no other from its snapshot.
const SNAPSHOT_TURN_HELD: Duration = Duration::from_secs(10);
/// Field manager of the node peer fields a registration owns.
const REGISTER_MANAGER: &str = "wgmesh-controller-register";
/// How soon a stream's token is reviewed again when the API server could not answer (then
/// twice that, and so on up to the usual period).
const REVIEW_RETRY: Duration = Duration::from_secs(30);
/// How long a stream waits for its token's review.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stream for a mesh that does not exist stays open (its agent then connects
/// again, as it does when the mesh appears).
const MISSING_MESH_STREAM: Duration = Duration::from_secs(120);

pub struct MeshServer {
    pub client: kube::Client,
    pub caches: Caches,
    pub index: Arc<Index>,
    pub auth: Arc<Authenticator>,
    pub reports: Arc<Reports>,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub shutdown: watch::Receiver<bool>,
    /// True while this replica holds the lease (and so writes status itself).
    pub leader: watch::Receiver<bool>,
    /// Passes reports on to the lease holder; `None` without a CA to authenticate replicas.
    pub forwarder: Option<Arc<Forwarder>>,
    /// The name replicas' client certificates carry (`--peer-server-name`).
    pub replica_name: String,
    /// Most peers per message to agents that join parts (`--peers-per-part`; 50 peers are
    /// about 7 KB, under tonic's 8 KiB encode buffer). A stream's buffer grows to its largest
    /// message and stays so: whole snapshots cost O(nodes) per stream, O(nodes^2) in all.
    pub peers_per_part: usize,
    /// How often an open peer stream's token is reviewed again (`--stream-review-seconds`):
    /// a stream ends when its token expires, or no longer passes review (its pod deleted).
    pub stream_review: Duration,
    /// Turns to send a snapshot ([`SNAPSHOTS_IN_FLIGHT`]).
    pub snapshot_turns: Arc<tokio::sync::Semaphore>,
    /// The open peer stream of each node in each mesh.
    pub open_streams: Arc<OpenStreams>,
    /// Each node's budget of key changes ([`KEY_CHANGE_BURST`]).
    pub(crate) key_changes: std::sync::Mutex<std::collections::HashMap<String, TokenBucket>>,
}

/// Key changes a node may register at once, and how fast that refills: each one is a write,
/// an Event, new preshared keys for every pair and an update to every member, so an agent
/// changing its key in a loop would keep the whole mesh busy.
const KEY_CHANGE_BURST: f64 = 4.0;
const KEY_CHANGES_PER_SECOND: f64 = 1.0 / 30.0;

/// A mesh's name and a node's.
type MeshNode = (String, String);

/// The open peer stream of each (mesh, node): a new one ends the one before (its agent
/// restarted or reconnected, and the old connection may take a minute to time out), so an
/// agent that opens streams without end holds one.
#[derive(Default)]
pub struct OpenStreams {
    next: std::sync::atomic::AtomicU64,
    open: std::sync::Mutex<std::collections::HashMap<MeshNode, (u64, watch::Sender<bool>)>>,
}

impl OpenStreams {
    /// Opens a stream of `node` in `mesh`, ending the one before: its id, and a channel that
    /// turns `true` when a newer stream ends it.
    fn open(&self, mesh: &str, node: &str) -> (u64, watch::Receiver<bool>) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (ended, superseded) = watch::channel(false);
        let key = (mesh.to_owned(), node.to_owned());
        let older = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (id, ended));
        if let Some((_, older)) = older {
            let _ = older.send(true);
        }
        (id, superseded)
    }

    fn close(&self, mesh: &str, node: &str, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let key = (mesh.to_owned(), node.to_owned());
        if open.get(&key).is_some_and(|(open_id, _)| *open_id == id) {
            open.remove(&key);
        }
    }
}

/// The name of a node's `WireGuardPeer` in a mesh.
pub fn node_peer_name(mesh: &str, node: &str) -> String {
    let name = if mesh == "default" {
        format!("node-{node}")
    } else {
        format!("{mesh}-node-{node}")
    };
    if name.len() <= 253 {
        return name;
    }
    // Too long for an object name: keep a readable prefix and make it unique with a hash.
    use blake2::{Blake2s256, Digest};
    let hash = Blake2s256::digest(name.as_bytes());
    let suffix: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{suffix}", name[..240].trim_end_matches(['-', '.']))
}

/// The name a node's peer takes when `usual` is held by another object: `usual` with a
/// suffix from the Node's UID, still a valid object name.
fn other_node_peer_name(usual: &str, node_uid: &str) -> String {
    use blake2::{Blake2s256, Digest};
    let hash = Blake2s256::digest(format!("{usual}/{node_uid}").as_bytes());
    let suffix: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
    let base = &usual[..usual.len().min(240)];
    format!("{}-{suffix}", base.trim_end_matches(['-', '.']))
}

/// The endpoint address a node registers: the first it names, which must be one of its Node's
/// addresses (an agent speaks for its own node only, never for another's address), else the
/// Node's first address.
fn endpoint_address(
    node: &str,
    named: &[IpAddr],
    node_addresses: &[IpAddr],
) -> Result<IpAddr, Status> {
    let Some(ip) = named.first().copied() else {
        return node_addresses.first().copied().ok_or_else(|| {
            Status::failed_precondition(format!(
                "no endpoint address given and Node {node} has no InternalIP or ExternalIP"
            ))
        });
    };
    if node_addresses.contains(&ip) {
        Ok(ip)
    } else {
        Err(Status::permission_denied(format!(
            "endpoint address {ip} is not an address of Node {node} (its addresses: {})",
            node_addresses
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

fn endpoint_string(ip: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(ip, port).to_string()
}

#[tonic::async_trait]
impl MeshService for MeshServer {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let source = request.remote_addr().map(|a| a.ip());
        let (metadata, _, req) = request.into_parts();
        let req = checked::register(&req)?;
        self.auth
            .authorize_node(&metadata, source, &req.node)
            .await?;
        let (key, port) = (req.public_key, req.listen_port);

        let mesh = self
            .caches
            .meshes
            .get(&kube::runtime::reflector::ObjectRef::new(&req.mesh))
            .ok_or_else(|| {
                Status::not_found(format!("WireGuardMesh {} does not exist", req.mesh))
            })?;
        if mesh.metadata.deletion_timestamp.is_some() {
            // Its nodes are leaving; a node peer made now would outlive it.
            return Err(Status::failed_precondition(format!(
                "WireGuardMesh {} is being deleted",
                req.mesh
            )));
        }
        let node = self
            .caches
            .nodes
            .get(&kube::runtime::reflector::ObjectRef::new(&req.node))
            .ok_or_else(|| {
                Status::failed_precondition(format!("Node {} does not exist", req.node))
            })?;
        if !convert::selector_matches(mesh.spec.node_selector.as_ref(), node.labels()) {
            return Err(Status::failed_precondition(format!(
                "node {} does not match the nodeSelector of mesh {}",
                req.node, req.mesh
            )));
        }
        let address = endpoint_address(
            &req.node,
            &req.endpoint_addresses,
            &convert::node_addresses(&node),
        )?;

        let (name, existing) = self.node_peer_slot(&req.mesh, &node)?;
        let key_changed = existing
            .as_ref()
            .is_some_and(|e| e.spec.public_key != key.to_base64());
        // The key the node's peer already holds is the node's (node members win a key over
        // any other peer): a copy someone made since, refused, must not lock the node out
        // when its agent registers again.
        if existing.is_none() || key_changed {
            self.check_key_is_free(&key, &name, &req.node).await?;
        }
        let registered = endpoint_string(address, port);
        // What the other members are told: the Node's or the mesh's choice, else this.
        let endpoint = wgmesh_core::desired::node_endpoint(
            &convert::node_endpoint_choice(&node, &mesh),
            Some(&registered),
        )
        .unwrap_or_else(|| registered.clone());
        let mut labels = wgmesh_api::name_label("wgmesh.io/node", &req.node);
        labels.extend(wgmesh_api::name_label("wgmesh.io/mesh", &req.mesh));
        let owner = node_owner(&node);
        let unchanged = existing.as_deref().is_some_and(|e| {
            registration_is_current(e, &key.to_base64(), &registered, &labels, &owner)
        });
        if unchanged {
            // An agent's every restart and reconnection, and every agent after a controller
            // restart: nothing to write, and no call to the API server.
            self.metrics.registration("unchanged");
        } else {
            let moved = existing
                .as_deref()
                .is_some_and(|e| convert::registered_endpoint(e) != Some(registered.as_str()));
            if key_changed || moved {
                self.charge_registration_change(&req.node, key_changed)?;
            }
            self.write_registration(
                &name,
                &req.node,
                &req.mesh,
                &key,
                key_changed,
                RegisteredPeer {
                    labels,
                    registered,
                    owner,
                    endpoint,
                },
            )
            .await?;
        }
        tracing::info!(node = %req.node, mesh = %req.mesh, agent = %req.agent_version, unchanged, "agent registered");

        // Answer with the tunnel addresses once the writer has allocated them.
        let mut view = self.index.subscribe(&req.mesh, &req.node);
        let member = tokio::time::timeout(REGISTER_WAIT, async {
            loop {
                if let Some(m) = view.borrow_and_update().member(&req.node)
                    && m.public_key == key
                {
                    return Some(m.clone());
                }
                if view.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await
        .ok()
        .flatten();
        let settings = self.index.view(&req.mesh).and_then(|v| v.settings);
        Ok(Response::new(pb::RegisterResponse {
            tunnel_addresses: encode::tunnel_addresses(member.as_ref()),
            mesh: settings.map(|s| (*s).clone()),
            pod_cidrs: encode::pod_cidrs(member.as_ref()),
        }))
    }

    type WatchPeersStream = ReceiverStream<Result<served::PeerUpdate, Status>>;

    async fn watch_peers(
        &self,
        request: Request<pb::WatchPeersRequest>,
    ) -> Result<Response<Self::WatchPeersStream>, Status> {
        let source = request.remote_addr().map(|a| a.ip());
        let (metadata, _, req) = request.into_parts();
        let req = checked::watch(&req)?;
        let grant = self
            .auth
            .authorize_stream(&metadata, source, &req.node)
            .await?;
        if self.caches.meshes.get(&ObjectRef::new(&req.mesh)).is_none()
            && self.index.view(&req.mesh).is_none()
        {
            // A mesh nobody made (or long gone): the agent is told it is gone, which is what it
            // needs to leave it, and little is kept for the stream (no subscription, liveness
            // entry or snapshot turn), however many names a node makes up. The stream ends
            // when the mesh appears, and the agent, connecting again, registers; or after
            // MISSING_MESH_STREAM, so that what a node can hold open this way is bounded by how
            // fast it can ask.
            let (tx, rx) = mpsc::channel(STREAM_BUFFER);
            let gone = NodeConfig::mesh_deleted();
            for message in encode::peer_update_parts(
                self.index.epoch(),
                0,
                &gone,
                &NodeUpdate::Snapshot,
                usize::MAX,
            ) {
                let _ = tx.try_send(Ok(message));
            }
            let meshes = self.caches.meshes.clone();
            let mut shutdown = self.shutdown.clone();
            let mesh = req.mesh.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(2));
                let until = tokio::time::Instant::now() + MISSING_MESH_STREAM;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            if meshes.get(&ObjectRef::new(&mesh)).is_some() {
                                break;
                            }
                        }
                        _ = tx.closed() => break,
                        _ = shutdown.changed() => break,
                        () = tokio::time::sleep_until(until) => break,
                    }
                }
            });
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        let views = self.index.subscribe(&req.mesh, &req.node);
        let base = (req.resume_epoch == self.index.epoch() && req.resume_revision > 0)
            .then(|| self.index.at_revision(&req.mesh, req.resume_revision))
            .flatten()
            .map(|desired| NodeView {
                revision: req.resume_revision,
                settings: None,
                desired,
            });
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let (id, superseded) = self.open_streams.open(&req.mesh, &req.node);
        let stream = PeerStream {
            id,
            superseded,
            open_streams: self.open_streams.clone(),
            node: req.node.clone(),
            mesh: req.mesh.clone(),
            per_part: if req.accepts_parts {
                self.peers_per_part
            } else {
                usize::MAX
            },
            takes_allowed_ips_changes: req.accepts_allowed_ips_changes,
            meshes: self.caches.meshes.clone(),
            epoch: self.index.epoch().to_owned(),
            index: self.index.clone(),
            snapshot_turns: self.snapshot_turns.clone(),
            views,
            tx,
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
            reports: self.reports.clone(),
            leader: self.leader.clone(),
            forwarder: self.forwarder.clone(),
            auth: self.auth.clone(),
            grant,
            review_every: self.stream_review,
        };
        tracing::info!(node = %req.node, mesh = %req.mesh, resumed = base.is_some(), "agent watching peers");
        tokio::spawn(stream.run(base));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_status(
        &self,
        request: Request<pb::ReportStatusRequest>,
    ) -> Result<Response<pb::ReportStatusResponse>, Status> {
        // A report another replica forwarded: that replica authenticated the agent, and the
        // client certificate (verified against our CA, and naming the replicas) authenticates
        // the replica. Anything else goes through agent authentication.
        let forwarded = forwarded_by_replica(
            request.metadata().as_ref(),
            request.peer_certs().as_deref().map(Vec::as_slice),
            &self.replica_name,
        );
        let source = request.remote_addr().map(|a| a.ip());
        let (metadata, _, request) = request.into_parts();
        let req = checked::report(&request)?;
        if !forwarded {
            self.auth
                .authorize_node(&metadata, source, &req.node)
                .await?;
        }
        // Another replica says an agent's stream to it opened or closed.
        if forwarded && let Some(event) = metadata.get(STREAM_EVENT) {
            let event = event
                .to_str()
                .ok()
                .and_then(StreamEvent::parse)
                .ok_or_else(|| Status::invalid_argument("unknown stream event"))?;
            let now = std::time::Instant::now();
            let count = metadata
                .get(STREAM_COUNT)
                .and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
            let origin = metadata.get(STREAM_ORIGIN).and_then(|v| v.to_str().ok());
            match (count, origin) {
                (Some(open), Some(origin)) => self
                    .reports
                    .liveness
                    .remote_streams(&req.mesh, &req.node, origin, open, now),
                // A replica from before counts.
                _ => self
                    .reports
                    .liveness
                    .stream(&req.mesh, &req.node, event, Origin::Remote, now),
            }
            self.reports.changed.notify_one();
            return Ok(Response::new(pb::ReportStatusResponse {}));
        }
        // A node whose agent left a deleted mesh says so (it is no member any more): what
        // the mesh's finalizer waits for.
        if req.left_deleted_mesh {
            // Only a mesh being deleted waits for its nodes to leave; anything else would only
            // grow the record. A report another replica forwarded was checked there (this
            // replica's cache may not show the deletion yet).
            let deleting = forwarded
                || self
                    .caches
                    .meshes
                    .get(&ObjectRef::new(&req.mesh))
                    .is_some_and(|m| m.metadata.deletion_timestamp.is_some());
            if !deleting {
                return Ok(Response::new(pb::ReportStatusResponse {}));
            }
            self.reports.record_left(&req.mesh, &req.node);
            self.forward_to_leader(forwarded, request).await;
            return Ok(Response::new(pb::ReportStatusResponse {}));
        }
        // A node reports on its own peers in a mesh it belongs to, and nothing else.
        let view = self.index.view(&req.mesh).ok_or_else(|| {
            Status::not_found(format!("WireGuardMesh {} does not exist", req.mesh))
        })?;
        let config = NodeConfig::of(&req.node, view.settings.clone(), view.desired.clone());
        if config.member.is_none() {
            return Err(Status::permission_denied(format!(
                "node {} is not a member of mesh {}",
                req.node, req.mesh
            )));
        }
        // Looked up, not collected: every agent reports, and a set of its peers per report
        // would cost O(nodes) each.
        let (shared, own) = (config.shared_peers(), config.own_key());
        let in_peer_set = |k: &PublicKey| Some(*k) != own && shared.contains_key(k);
        let is_node_peer = |k: &PublicKey| in_peer_set(k) && shared[k].node.is_some();
        let node_peers = view.desired.node_peers_per_member();
        let (observations, dropped) = checked::scope(req.peers, in_peer_set, SystemTime::now());
        if dropped > 0 {
            self.metrics.error("report_out_of_scope");
            tracing::warn!(node = %req.node, mesh = %req.mesh, dropped, "dropped report entries for peers outside the node's peer set");
        }
        let in_detail = self.reports.node_peers_in_detail(node_peers);
        // The relay's sessions with the nodes behind NAT publish their endpoints: kept at
        // any size (only the relay's: another node's word never moves a node's endpoint).
        let relaying = view.desired.relay.as_deref() == Some(req.node.as_str());
        let behind_nat = |k: &PublicKey| {
            relaying
                && shared
                    .get(k)
                    .and_then(|p| p.node.as_ref())
                    .is_some_and(|n| view.desired.members.get(n).is_some_and(|m| m.behind_nat))
        };
        let observations =
            reports::kept_observations(observations, is_node_peer, in_detail, behind_nat);
        self.reports.record(&req.mesh, &req.node, observations);
        self.reports.record_agent(
            &req.mesh,
            &req.node,
            crate::reports::AgentState {
                programmed: req.programmed,
                refused_update: req.refused_update.clone(),
                // A node cannot have more live sessions than node peers.
                live_node_sessions: req
                    .live_node_sessions
                    .map(|n| n.min(u32::try_from(node_peers).unwrap_or(u32::MAX))),
            },
        );
        self.reports
            .liveness
            .heard(&req.mesh, &req.node, std::time::Instant::now());
        self.forward_to_leader(forwarded, request).await;
        Ok(Response::new(pb::ReportStatusResponse {}))
    }
}

impl MeshServer {
    /// Passes an agent's report on to the lease holder (the writer), unless we are it or the
    /// report came from another replica.
    async fn forward_to_leader(&self, forwarded: bool, request: pb::ReportStatusRequest) {
        if !forwarded
            && !*self.leader.borrow()
            && let Some(forwarder) = &self.forwarder
            && let Err(e) = forwarder.forward(request).await
        {
            // The agent reports again on its next change; nothing is lost for good.
            self.metrics.error("forward_report");
            tracing::warn!(error = %e, "forwarding a status report to the lease holder failed");
        }
    }

    /// Writes the node's peer as a registration says (server-side apply, the fields
    /// [`REGISTER_MANAGER`] owns), with an Event when its key changed.
    async fn write_registration(
        &self,
        name: &str,
        node: &str,
        mesh: &str,
        key: &PublicKey,
        key_changed: bool,
        peer: RegisteredPeer,
    ) -> Result<(), Status> {
        let api: Api<WireGuardPeer> = Api::all(self.client.clone());
        let apply = json!({
            "apiVersion": "wgmesh.io/v1alpha1",
            "kind": "WireGuardPeer",
            "metadata": {
                "name": name,
                "labels": peer.labels,
                "annotations": { convert::REGISTERED_ENDPOINT_ANNOTATION: peer.registered },
                "ownerReferences": [peer.owner],
            },
            "spec": {
                "mesh": mesh,
                "node": node,
                "publicKey": key.to_base64(),
                "endpoint": peer.endpoint,
            }
        });
        let patched = api
            .patch(
                name,
                &PatchParams::apply(REGISTER_MANAGER).force(),
                &Patch::Apply(&apply),
            )
            .await
            .map_err(|e| {
                self.metrics.error("register");
                Status::unavailable(format!("writing WireGuardPeer {name}: {e}"))
            })?;
        self.metrics.registration("written");
        // Until the cache shows this write, the next registration could be judged unchanged
        // against what it replaced (an endpoint changed and changed back): wait for it. By
        // what was written, not by resourceVersion: the writer's status update can follow
        // this write before the cache is looked at, and the exact version is never seen.
        let text = key.to_base64();
        let caught_up = async {
            while self
                .caches
                .peers
                .get(&ObjectRef::new(name))
                .is_none_or(|p| {
                    !registration_is_current(&p, &text, &peer.registered, &peer.labels, &peer.owner)
                })
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        let _ = tokio::time::timeout(REGISTER_WAIT, caught_up).await;
        if key_changed {
            tracing::info!(node, peer = %name, "node registered a new public key");
            let event = Event {
                type_: EventType::Normal,
                reason: "KeyChanged".into(),
                note: Some(format!("node {node} registered a new public key {key}")),
                action: "Register".into(),
                secondary: None,
            };
            let _ = self
                .recorder
                .publish(&event, &patched.object_ref(&()))
                .await;
        }
        Ok(())
    }

    /// Counts a change of a registered node's peer (its key, or its endpoint) against the
    /// node's budget: each is a write and an update to every member.
    fn charge_registration_change(&self, node: &str, key_changed: bool) -> Result<(), Status> {
        let now = std::time::Instant::now();
        let mut budgets = self.key_changes.lock().unwrap_or_else(|e| e.into_inner());
        let budget = budgets
            .entry(node.to_owned())
            .or_insert_with(|| TokenBucket::with(now, KEY_CHANGE_BURST, KEY_CHANGES_PER_SECOND));
        if !budget.allows(now) {
            self.metrics.error(if key_changed {
                "register_key_change_limited"
            } else {
                "register_change_limited"
            });
            let what = if key_changed { "key" } else { "registration" };
            return Err(Status::resource_exhausted(format!(
                "node {node} changed its {what} {KEY_CHANGE_BURST} times in a short while; \
                 the next change is taken in {:.0} s",
                1.0 / KEY_CHANGES_PER_SECOND
            )));
        }
        budget.charge(now);
        // Nodes that have not changed keys for a while cost nothing to forget.
        if budgets.len() > 1024 {
            budgets.retain(|_, b| !b.is_full(now));
        }
        Ok(())
    }

    /// The name of `node`'s peer in `mesh`, and the peer if it exists. Its usual name
    /// ([`node_peer_name`]) may be held by an object that is not the controller's peer of this
    /// node (a user's peer named `node-x`, or another mesh's node whose names join the same
    /// way): then the node's peer takes another name, made from the Node's UID, so nobody
    /// can keep a node out of a mesh by taking a name first.
    fn node_peer_slot(
        &self,
        mesh: &str,
        node: &Node,
    ) -> Result<(String, Option<Arc<WireGuardPeer>>), Status> {
        let node_name = node.name_any();
        let ours = |p: &WireGuardPeer| {
            p.spec.node.as_ref().map(|n| n.as_str()) == Some(node_name.as_str())
                && p.spec.mesh.0 == mesh
                && convert::node_owner_uid(p).is_some()
        };
        let usual = node_peer_name(mesh, &node_name);
        let held = self.caches.peers.get(&ObjectRef::new(&usual));
        match held {
            Some(p) if ours(&p) => return Ok((usual, Some(p))),
            // Only the spec.node the controller wrote (and the admission policy guards) tells
            // that a peer under another name is this node's: one pass over the peers, as the
            // key check makes, and only at a node's first registration or when the usual
            // name is taken.
            _ => {
                if let Some(p) = self.caches.peers.find(|p| ours(p)) {
                    return Ok((p.name_any(), Some(p)));
                }
            }
        }
        if held.is_none() {
            return Ok((usual, None));
        }
        let other = other_node_peer_name(&usual, node.metadata.uid.as_deref().unwrap_or(""));
        if self.caches.peers.get(&ObjectRef::new(&other)).is_none() {
            tracing::info!(node = %node_name, %mesh, taken = %usual, peer = %other, "the usual name of the node's peer is taken; using another");
            return Ok((other, None));
        }
        Err(Status::failed_precondition(format!(
            "WireGuardPeers {usual} and {other} exist and neither is the controller's peer of \
             node {node_name} (no ownerReference to the Node); delete one to let the node register"
        )))
    }

    /// Refuses a key that any other WireGuardPeer holds (in any mesh): registering it would
    /// take the holder's place and its per-pair preshared keys.
    async fn check_key_is_free(
        &self,
        key: &PublicKey,
        own: &str,
        node: &str,
    ) -> Result<(), Status> {
        // A key has one text form (parsing trims, and refuses non-canonical base64), so the
        // texts compare: no copy of the cache, no decoding of every peer's key.
        let text = key.to_base64();
        let Some(holder) = self
            .caches
            .peers
            .find(|p| p.spec.public_key.trim() == text && p.metadata.name.as_deref() != Some(own))
        else {
            return Ok(());
        };
        let holder_name = holder.name_any();
        tracing::warn!(%node, public_key = %key, holder = %holder_name, "refused a registration with a key another peer holds");
        self.metrics.error("register_duplicate_key");
        let event = Event {
            type_: EventType::Warning,
            reason: "DuplicatePublicKeyRefused".into(),
            note: Some(format!(
                "node {node} tried to register public key {key}, which WireGuardPeer {holder_name} holds; refused"
            )),
            action: "Register".into(),
            secondary: None,
        };
        let _ = self.recorder.publish(&event, &holder.object_ref(&())).await;
        Err(Status::already_exists(format!(
            "public key {key} is held by WireGuardPeer {holder_name}; a node must register its own key"
        )))
    }
}

/// `period` shortened by up to a half, by stream: thousands of streams opened together (a
/// controller restart) are not all reviewed in the same second.
fn spread(period: Duration, stream: u64) -> Duration {
    // Fibonacci hashing: consecutive ids land far apart in [0, 1).
    let fraction = (stream.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
    period.mul_f64(1.0 - fraction / 2.0)
}

/// What a registration writes to the node's peer besides its key, mesh and node.
struct RegisteredPeer {
    labels: std::collections::BTreeMap<String, String>,
    /// The endpoint the agent registered (an annotation).
    registered: String,
    owner: OwnerReference,
    /// The endpoint the other members are told.
    endpoint: String,
}

/// Whether the node's peer already holds what a registration would write (the agent
/// restarted or reconnected, or the controller did): then nothing is written. Its
/// `spec.endpoint` is not compared: the writer keeps it in step with the desired mesh (the
/// relay's observation for a node behind NAT), which the annotation decides.
fn registration_is_current(
    peer: &WireGuardPeer,
    key: &str,
    registered: &str,
    labels: &std::collections::BTreeMap<String, String>,
    owner: &OwnerReference,
) -> bool {
    let meta = &peer.metadata;
    peer.spec.public_key == key
        && convert::registered_endpoint(peer) == Some(registered)
        && labels
            .iter()
            .all(|(k, v)| meta.labels.as_ref().and_then(|l| l.get(k)) == Some(v))
        && meta.owner_references.as_ref().is_some_and(|refs| {
            refs.iter()
                .any(|r| r.uid == owner.uid && r.kind == owner.kind && r.name == owner.name)
        })
}

fn node_owner(node: &k8s_openapi::api::core::v1::Node) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: node.name_any(),
        uid: node.metadata.uid.clone().unwrap_or_default(),
        controller: Some(false),
        block_owner_deletion: Some(false),
    }
}

/// One agent's stream: a snapshot, then deltas, coalesced when the agent is slow.
struct PeerStream {
    node: String,
    mesh: String,
    /// Most peers per message: `usize::MAX` for an agent that does not join parts.
    per_part: usize,
    /// The agent applies changes of allowed IPs; an older one gets such peers whole.
    takes_allowed_ips_changes: bool,
    /// The synced mesh cache: a mesh absent from it is deleted, and its nodes are told so.
    meshes: kube::runtime::reflector::Store<wgmesh_api::WireGuardMesh>,
    epoch: String,
    /// Which peers changed between revisions, so a delta compares only those.
    index: Arc<Index>,
    snapshot_turns: Arc<tokio::sync::Semaphore>,
    views: watch::Receiver<NodeView>,
    tx: mpsc::Sender<Result<served::PeerUpdate, Status>>,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
    /// Where the stream's opening and closing count toward the agent's liveness (here, and
    /// at the lease holder through `forwarder` when this replica is not it).
    reports: Arc<Reports>,
    leader: watch::Receiver<bool>,
    forwarder: Option<Arc<Forwarder>>,
    /// This stream among the node's ([`OpenStreams`]), and `true` once a newer one ends it.
    id: u64,
    superseded: watch::Receiver<bool>,
    open_streams: Arc<OpenStreams>,
    /// What authorized the stream, checked again every `review_every` and at the token's
    /// expiry: a stream lasts no longer than the token it was opened with.
    auth: Arc<Authenticator>,
    grant: crate::auth::StreamGrant,
    review_every: Duration,
}

impl PeerStream {
    /// When to review the stream's token next: after `period` (spread by stream), or when it
    /// expires if that is sooner.
    fn next_review(&self, period: Duration) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let until_expiry = self
            .grant
            .expires()
            .map(|at| at.duration_since(SystemTime::now()).unwrap_or_default());
        let every = spread(period, self.id);
        now + until_expiry.map_or(every, |d| d.min(every))
    }

    /// Sends `message` when the stream has room, giving the snapshot `turn` up if that
    /// takes longer than [`SNAPSHOT_TURN_HELD`]: an agent that stops reading holds its own
    /// stream, never the other agents' turns. `false` when the stream ended instead (the
    /// agent closed it, a newer stream of the node took over, or we shut down).
    async fn send(
        &self,
        message: served::PeerUpdate,
        turn: &mut Option<tokio::sync::OwnedSemaphorePermit>,
        turn_until: tokio::time::Instant,
    ) -> bool {
        let (mut superseded, mut shutdown) = (self.superseded.clone(), self.shutdown.clone());
        let reserve = self.tx.reserve();
        tokio::pin!(reserve);
        loop {
            let give_up_turn = async {
                if turn.is_some() {
                    tokio::time::sleep_until(turn_until).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                permit = &mut reserve => {
                    let Ok(permit) = permit else { return false };
                    permit.send(Ok(message));
                    return true;
                }
                () = give_up_turn => {
                    tracing::warn!(node = %self.node, mesh = %self.mesh, "the agent takes no snapshot part: its turn goes to the next");
                    self.metrics.error("snapshot_turn_given_up");
                    *turn = None;
                }
                _ = superseded.wait_for(|s| *s) => return false,
                _ = shutdown.wait_for(|s| *s) => return false,
            }
        }
    }

    /// Counts the stream's opening or closing toward the agent's liveness, here and at the
    /// lease holder, and wakes the status writer (a gateway may be down).
    fn announce(&self, event: StreamEvent) {
        let now = std::time::Instant::now();
        self.reports
            .liveness
            .stream(&self.mesh, &self.node, event, Origin::Local, now);
        self.reports.changed.notify_one();
        if !*self.leader.borrow()
            && let Some(forwarder) = &self.forwarder
            && !forwarder.queue_stream_event(&self.mesh, &self.node, event)
        {
            self.metrics.error("forward_stream_event");
            tracing::warn!(
                event = event.as_str(),
                "too many stream events queued for the lease holder; dropped one"
            );
        }
    }

    /// The node's view of a mesh view: the shared desired state and its own membership, not
    /// a per-stream copy of the peer set (a thousand streams cost a thousand pointers).
    fn config_of(&self, view: &NodeView) -> NodeConfig<pb::MeshSettings> {
        NodeConfig::of(&self.node, view.settings.clone(), view.desired.clone())
    }

    async fn run(mut self, base: Option<NodeView>) {
        self.metrics.agent_connected();
        self.announce(StreamEvent::Opened);
        // What was last sent, to compute the next delta from, and its revision (`None`: not
        // a revision of the mesh, as when it was deleted).
        let mut sent_revision: Option<u64> = base.as_ref().map(|b| b.revision);
        let mut sent: Option<NodeConfig<pb::MeshSettings>> = base.map(|b| {
            let mut config = self.config_of(&b);
            // A resumed agent's settings are not known: send them again.
            config.settings = None;
            config
        });
        let mut next_review = self.next_review(self.review_every);
        let mut retry = REVIEW_RETRY;
        loop {
            let view = self.views.borrow_and_update().clone();
            // No settings: the mesh was never computed, is held (a Secret it needs is not
            // read yet), or is gone. Only gone (absent from the synced cache, or being
            // deleted) is news.
            let mesh_gone = view.settings.is_none()
                && self
                    .meshes
                    .get(&kube::runtime::reflector::ObjectRef::new(&self.mesh))
                    .is_none_or(|m| m.metadata.deletion_timestamp.is_some());
            if view.settings.is_some() || mesh_gone {
                let now = if mesh_gone {
                    NodeConfig::mesh_deleted()
                } else {
                    self.config_of(&view)
                };
                // Only the peers changed since what was sent are compared, when the index
                // still knows which they are.
                let changed = match (&sent, sent_revision) {
                    (Some(sent), Some(from)) if !mesh_gone => {
                        self.index
                            .changed_since(&self.mesh, &sent.desired, from, view.revision)
                    }
                    _ => None,
                };
                let update = next_update_within(sent.as_ref(), &now, changed.as_ref());
                let update = match (update, &sent) {
                    (Some(NodeUpdate::Delta(d)), Some(sent)) if self.takes_allowed_ips_changes => {
                        Some(NodeUpdate::Delta(d.with_allowed_ips_changes(sent, &now)))
                    }
                    (update, _) => update,
                };
                if let Some(update) = update {
                    let kind = match update {
                        NodeUpdate::Snapshot => "snapshot",
                        NodeUpdate::Delta(_) => "delta",
                    };
                    // A snapshot waits for its turn and keeps it until the agent has taken
                    // the last part from our buffer (or for SNAPSHOT_TURN at most).
                    let mut turn = match update {
                        NodeUpdate::Snapshot => {
                            self.snapshot_turns.clone().acquire_owned().await.ok()
                        }
                        NodeUpdate::Delta(_) => None,
                    };
                    let turn_until = tokio::time::Instant::now() + SNAPSHOT_TURN_HELD;
                    let mut bytes = 0;
                    let mut closed = false;
                    // Parts are made one at a time, as the channel takes them. Sending waits
                    // while the agent is slow; the watch channel meanwhile keeps only the
                    // latest view, so the next update covers everything missed.
                    for message in encode::peer_update_parts(
                        &self.epoch,
                        view.revision,
                        &now,
                        &update,
                        self.per_part,
                    ) {
                        bytes += message.encoded_len();
                        if !self.send(message, &mut turn, turn_until).await {
                            closed = true;
                            break;
                        }
                    }
                    if closed {
                        break;
                    }
                    if turn.is_some() {
                        let drained = self.tx.reserve_many(STREAM_BUFFER);
                        let _ = tokio::time::timeout(SNAPSHOT_TURN, drained).await;
                    }
                    drop(turn);
                    self.metrics.stream_sent(kind, bytes);
                }
                sent = Some(now);
                sent_revision = (!mesh_gone).then_some(view.revision);
            }
            let review_due = tokio::select! {
                r = self.views.changed() => if r.is_err() { break } else { false },
                _ = self.shutdown.changed() => break,
                _ = self.tx.closed() => break,
                _ = self.superseded.wait_for(|s| *s) => break,
                () = tokio::time::sleep_until(next_review) => true,
            };
            if review_due {
                // Bounded: meanwhile this stream sends nothing, and a hung API server must
                // not hold it (a review that does not answer says nothing of the token).
                let review =
                    tokio::time::timeout(REVIEW_TIMEOUT, self.auth.still_authorized(&self.grant))
                        .await
                        .unwrap_or_else(|_| Err(Status::unavailable("the token review timed out")));
                match review {
                    Ok(()) => {
                        retry = REVIEW_RETRY;
                        next_review = self.next_review(self.review_every);
                    }
                    // The API server cannot say, or the source's budget of failed reviews
                    // is spent (by someone else's bogus tokens, maybe): neither says anything
                    // of this token. The stream stays; it is reviewed again shortly.
                    Err(status)
                        if matches!(
                            status.code(),
                            tonic::Code::Unavailable | tonic::Code::ResourceExhausted
                        ) =>
                    {
                        // Later each time, up to the usual period: thousands of streams must
                        // not press an API server that is struggling.
                        next_review = self.next_review(retry);
                        retry = (retry * 2).min(self.review_every);
                    }
                    Err(status) => {
                        // The agent connects again with its current token.
                        let ended = self.tx.send(Err(status));
                        let _ = tokio::time::timeout(SNAPSHOT_TURN, ended).await;
                        break;
                    }
                }
            }
        }
        self.open_streams.close(&self.mesh, &self.node, self.id);
        self.metrics.agent_disconnected();
        self.announce(StreamEvent::Closed);
        tracing::info!(node = %self.node, "peer stream ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_address_table() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let addrs = [ip("192.168.0.1"), ip("2001:db8::1")];
        type Case<'a> = (Vec<IpAddr>, &'a [IpAddr], Result<&'a str, tonic::Code>);
        let cases: Vec<Case> = vec![
            (vec![], &addrs, Ok("192.168.0.1")),
            (vec![ip("2001:db8::1")], &addrs, Ok("2001:db8::1")),
            (
                vec![ip("192.168.0.2")],
                &addrs,
                Err(tonic::Code::PermissionDenied),
            ),
            (
                vec![ip("192.168.0.1")],
                &[],
                Err(tonic::Code::PermissionDenied),
            ),
            (vec![], &[], Err(tonic::Code::FailedPrecondition)),
        ];
        for (named, node_addrs, want) in cases {
            let got = endpoint_address("n", &named, node_addrs)
                .map(|ip| ip.to_string())
                .map_err(|s| s.code());
            assert_eq!(got, want.map(str::to_owned), "{named:?} {node_addrs:?}");
        }
    }

    #[test]
    fn reviews_of_streams_opened_together_are_spread() {
        let period = Duration::from_secs(600);
        let mut at: Vec<u64> = (0..1000).map(|id| spread(period, id).as_secs()).collect();
        assert!(at.iter().all(|s| (300..=600).contains(s)), "{at:?}");
        at.sort_unstable();
        at.dedup();
        assert!(at.len() > 250, "1000 streams over {} seconds", at.len());
    }

    #[test]
    fn registration_is_current_table() {
        let owner = OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: "a".into(),
            uid: "uid-a".into(),
            ..Default::default()
        };
        let labels =
            std::collections::BTreeMap::from([("wgmesh.io/node".to_owned(), "a".to_owned())]);
        let key = "k".repeat(43) + "=";
        let peer = || {
            let spec: wgmesh_api::WireGuardPeerSpec = serde_json::from_value(json!({
                "mesh": "default", "node": "a", "publicKey": key, "endpoint": "198.51.100.9:40000",
            }))
            .unwrap();
            let mut p = WireGuardPeer::new("node-a", spec);
            p.metadata.labels = Some(labels.clone());
            p.metadata.annotations = Some(
                [(
                    convert::REGISTERED_ENDPOINT_ANNOTATION.to_owned(),
                    "192.168.0.1:51820".to_owned(),
                )]
                .into(),
            );
            p.metadata.owner_references = Some(vec![owner.clone()]);
            p
        };
        let cases: Vec<(&str, WireGuardPeer, bool)> = vec![
            // spec.endpoint is the writer's (a relay's observation): not compared.
            ("as registered", peer(), true),
            (
                "another key",
                {
                    let mut p = peer();
                    p.spec.public_key = "j".repeat(43) + "=";
                    p
                },
                false,
            ),
            (
                "another registered endpoint",
                {
                    let mut p = peer();
                    p.metadata.annotations = Some(
                        [(
                            convert::REGISTERED_ENDPOINT_ANNOTATION.to_owned(),
                            "192.168.0.2:51820".to_owned(),
                        )]
                        .into(),
                    );
                    p
                },
                false,
            ),
            (
                "no annotation",
                {
                    let mut p = peer();
                    p.metadata.annotations = None;
                    p
                },
                false,
            ),
            (
                "a label missing",
                {
                    let mut p = peer();
                    p.metadata.labels = None;
                    p
                },
                false,
            ),
            (
                "owned by an older Node of that name",
                {
                    let mut p = peer();
                    p.metadata.owner_references.as_mut().unwrap()[0].uid = "uid-old".into();
                    p
                },
                false,
            ),
            (
                "no owner",
                {
                    let mut p = peer();
                    p.metadata.owner_references = None;
                    p
                },
                false,
            ),
        ];
        for (name, p, want) in cases {
            assert_eq!(
                registration_is_current(&p, &key, "192.168.0.1:51820", &labels, &owner),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn node_peer_names() {
        assert_eq!(node_peer_name("default", "worker-1"), "node-worker-1");
        assert_eq!(node_peer_name("edge", "worker-1"), "edge-node-worker-1");
        let long = "n".repeat(253);
        let name = node_peer_name("default", &long);
        assert!(name.len() <= 253, "{}", name.len());
        assert_ne!(name, node_peer_name("default", &"m".repeat(253)));
        // The other name, when the usual one is taken: valid, and one per Node.
        for usual in [node_peer_name("default", "worker-1"), name] {
            let other = other_node_peer_name(&usual, "uid-1");
            assert!(other.len() <= 253 && other != usual, "{other}");
            assert!(!other.ends_with(['-', '.']), "{other}");
            assert_ne!(other, other_node_peer_name(&usual, "uid-2"));
        }
    }
}
