//! The `wgmesh.v1.MeshService` gRPC service: registration, peer streams and status reports.
//! Every replica serves it from its own caches.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use prost::Message;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use wgmesh_api::WireGuardPeer;
use wgmesh_core::PublicKey;
use wgmesh_core::desired::{DesiredMesh, DesiredPeer, Member, PresharedKey, pair_preshared_key};
use wgmesh_core::diff::diff_peer_sets;
use wgmesh_proto as pb;
use wgmesh_proto::mesh_service_server::MeshService;

use crate::auth::Authenticator;
use crate::convert;
use crate::forward::{FORWARDED, Forwarder, is_replica_certificate};
use crate::index::{Index, NodeView};
use crate::metrics::Metrics;
use crate::reconcile::Caches;
use crate::reports::{Observation, Reports};

/// How long Register waits for the new node's tunnel address before answering without it
/// (the address then arrives on the peer stream).
const REGISTER_WAIT: Duration = Duration::from_secs(10);
/// Messages buffered per stream; a slower agent gets coalesced updates instead.
const STREAM_BUFFER: usize = 2;
/// Field manager of the node peer fields a registration owns.
const REGISTER_MANAGER: &str = "wgmesh-controller-register";

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

fn check_names(node: &str, mesh: &str) -> Result<(), Status> {
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    };
    if !valid(node) {
        return Err(Status::invalid_argument(format!(
            "invalid node name {node:?}"
        )));
    }
    if !valid(mesh) {
        return Err(Status::invalid_argument(format!(
            "invalid mesh name {mesh:?}"
        )));
    }
    Ok(())
}

fn public_key(bytes: &[u8]) -> Result<PublicKey, Status> {
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| {
        Status::invalid_argument(format!("public_key must be 32 bytes, got {}", bytes.len()))
    })?;
    Ok(PublicKey::from_bytes(bytes))
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
        let (metadata, _, req) = request.into_parts();
        check_names(&req.node, &req.mesh)?;
        self.auth.authorize_node(&metadata, &req.node).await?;
        let key = public_key(&req.public_key)?;
        let port = u16::try_from(req.listen_port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Status::invalid_argument("listen_port must be 1-65535"))?;

        let mesh = self
            .caches
            .meshes
            .get(&kube::runtime::reflector::ObjectRef::new(&req.mesh))
            .ok_or_else(|| {
                Status::not_found(format!("WireGuardMesh {} does not exist", req.mesh))
            })?;
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
        let address = req
            .endpoint_addresses
            .iter()
            .find_map(|a| a.parse::<IpAddr>().ok())
            .or_else(|| convert::node_addresses(&node).into_iter().next())
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "no endpoint address given and Node {} has no InternalIP",
                    req.node
                ))
            })?;

        let name = node_peer_name(&req.mesh, &req.node);
        let api: Api<WireGuardPeer> = Api::all(self.client.clone());
        let existing = self
            .caches
            .peers
            .get(&kube::runtime::reflector::ObjectRef::new(&name));
        if let Some(existing) = &existing
            && existing.spec.node.as_ref().map(|n| n.as_str()) != Some(req.node.as_str())
        {
            return Err(Status::failed_precondition(format!(
                "WireGuardPeer {name} exists and is not the peer of node {}",
                req.node
            )));
        }
        let apply = json!({
            "apiVersion": "wgmesh.io/v1alpha1",
            "kind": "WireGuardPeer",
            "metadata": {
                "name": name,
                "labels": { "wgmesh.io/node": req.node, "wgmesh.io/mesh": req.mesh },
                "ownerReferences": [node_owner(&node)],
            },
            "spec": {
                "mesh": req.mesh,
                "node": req.node,
                "publicKey": key.to_base64(),
                "endpoint": endpoint_string(address, port),
            }
        });
        let patched = api
            .patch(
                &name,
                &PatchParams::apply(REGISTER_MANAGER).force(),
                &Patch::Apply(&apply),
            )
            .await
            .map_err(|e| {
                self.metrics.error("register");
                Status::unavailable(format!("writing WireGuardPeer {name}: {e}"))
            })?;
        if let Some(old) = existing.as_ref().map(|e| e.spec.public_key.clone())
            && old != key.to_base64()
        {
            tracing::info!(node = %req.node, peer = %name, "node registered a new public key");
            let event = Event {
                type_: EventType::Normal,
                reason: "KeyChanged".into(),
                note: Some(format!(
                    "node {} registered a new public key {key}",
                    req.node
                )),
                action: "Register".into(),
                secondary: None,
            };
            let _ = self
                .recorder
                .publish(&event, &patched.object_ref(&()))
                .await;
        }
        tracing::info!(node = %req.node, mesh = %req.mesh, agent = %req.agent_version, "agent registered");

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
            tunnel_addresses: addresses_of(member.as_ref()),
            mesh: settings.map(|s| (*s).clone()),
            pod_cidrs: pod_cidrs_of(member.as_ref()),
        }))
    }

    type WatchPeersStream = ReceiverStream<Result<pb::PeerUpdate, Status>>;

    async fn watch_peers(
        &self,
        request: Request<pb::WatchPeersRequest>,
    ) -> Result<Response<Self::WatchPeersStream>, Status> {
        let (metadata, _, req) = request.into_parts();
        check_names(&req.node, &req.mesh)?;
        self.auth.authorize_node(&metadata, &req.node).await?;
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
        let stream = PeerStream {
            node: req.node.clone(),
            epoch: self.index.epoch().to_owned(),
            views,
            tx,
            metrics: self.metrics.clone(),
            shutdown: self.shutdown.clone(),
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
        let forwarded = request.metadata().contains_key(FORWARDED)
            && request.peer_certs().is_some_and(|c| {
                c.first()
                    .is_some_and(|leaf| is_replica_certificate(leaf, &self.replica_name))
            });
        let (metadata, _, req) = request.into_parts();
        check_names(&req.node, &req.mesh)?;
        if !forwarded {
            self.auth.authorize_node(&metadata, &req.node).await?;
        }
        let observations = req
            .peers
            .iter()
            .map(|p| {
                Ok(Observation {
                    public_key: public_key(&p.public_key)?,
                    last_handshake: p.last_handshake.as_ref().and_then(|t| {
                        let secs = u64::try_from(t.seconds).ok()?;
                        let nanos = u32::try_from(t.nanos).ok()?;
                        SystemTime::UNIX_EPOCH
                            .checked_add(Duration::new(secs, nanos.min(999_999_999)))
                    }),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    endpoint: (!p.endpoint.is_empty()).then(|| p.endpoint.clone()),
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        self.reports.record(&req.mesh, &req.node, observations);
        if !forwarded
            && !*self.leader.borrow()
            && let Some(forwarder) = &self.forwarder
            && let Err(e) = forwarder.forward(req).await
        {
            // The agent reports again on its next change; nothing is lost for good.
            self.metrics.error("forward_report");
            tracing::warn!(error = %e, "forwarding a status report to the lease holder failed");
        }
        Ok(Response::new(pb::ReportStatusResponse {}))
    }
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
    epoch: String,
    views: watch::Receiver<NodeView>,
    tx: mpsc::Sender<Result<pb::PeerUpdate, Status>>,
    metrics: Metrics,
    shutdown: watch::Receiver<bool>,
}

/// What was last sent, to compute the next delta from. It holds the shared desired mesh, not
/// a per-stream copy of the peer set: a thousand streams cost a thousand pointers.
struct Sent {
    member: Option<Member>,
    settings: Option<Arc<pb::MeshSettings>>,
    desired: Arc<DesiredMesh>,
}

static NO_PEERS: BTreeMap<PublicKey, Arc<DesiredPeer>> = BTreeMap::new();

/// The peers a node sees (the shared set for gateways or for interior nodes, filtered by the
/// caller with the node's own key), or none when it is not a member.
fn visible<'a>(
    desired: &'a DesiredMesh,
    member: Option<&Member>,
) -> &'a BTreeMap<PublicKey, Arc<DesiredPeer>> {
    match member {
        Some(m) => desired.visible_to(m),
        None => &NO_PEERS,
    }
}

impl PeerStream {
    async fn run(mut self, base: Option<NodeView>) {
        self.metrics.agent_connected();
        let mut sent: Option<Sent> = base.map(|b| Sent {
            member: b.member(&self.node).cloned(),
            settings: None,
            desired: b.desired.clone(),
        });
        loop {
            let view = self.views.borrow_and_update().clone();
            if view.settings.is_some() {
                if let Some(update) = self.next_update(&view, sent.as_ref()) {
                    let kind = match update.update {
                        Some(pb::peer_update::Update::Snapshot(_)) => "snapshot",
                        _ => "delta",
                    };
                    let bytes = update.encoded_len();
                    // Waits while the agent is slow; the watch channel meanwhile keeps only the
                    // latest view, so the next message covers everything missed.
                    if self.tx.send(Ok(update)).await.is_err() {
                        break;
                    }
                    self.metrics.stream_sent(kind, bytes);
                }
                sent = Some(Sent {
                    member: view.member(&self.node).cloned(),
                    settings: view.settings.clone(),
                    desired: view.desired.clone(),
                });
            }
            tokio::select! {
                r = self.views.changed() => if r.is_err() { break },
                _ = self.shutdown.changed() => break,
                _ = self.tx.closed() => break,
            }
        }
        self.metrics.agent_disconnected();
        tracing::info!(node = %self.node, "peer stream ended");
    }

    fn next_update(&self, view: &NodeView, sent: Option<&Sent>) -> Option<pb::PeerUpdate> {
        let member = view.member(&self.node);
        let own = member.map(|m| m.public_key);
        let peers = visible(&view.desired, member);
        let count = peers.len() - usize::from(own.is_some_and(|k| peers.contains_key(&k)));
        let settings = view.settings.as_deref().cloned();
        let rotate_key_request = member
            .and_then(|m| m.rotate_key_request.clone())
            .unwrap_or_default();
        let snapshot = || pb::PeerUpdate {
            epoch: self.epoch.clone(),
            revision: view.revision,
            rotate_key_request: rotate_key_request.clone(),
            update: Some(pb::peer_update::Update::Snapshot(pb::PeerSnapshot {
                peers: peers
                    .values()
                    .filter(|p| Some(p.public_key) != own)
                    .map(|p| to_proto(p, member))
                    .collect(),
                mesh: settings.clone(),
                tunnel_addresses: addresses_of(member),
                pod_cidrs: pod_cidrs_of(member),
            })),
        };
        let Some(sent) = sent else {
            return Some(snapshot());
        };
        // Our own key or the mesh secret changed: every derived preshared key changes too.
        if sent.member.is_some()
            && member.map(|m| (&m.public_key, &m.mesh_secret))
                != sent
                    .member
                    .as_ref()
                    .map(|m| (&m.public_key, &m.mesh_secret))
        {
            return Some(snapshot());
        }
        let before = visible(&sent.desired, sent.member.as_ref());
        let delta = diff_peer_sets(before, peers, own.as_ref());
        let settings_changed = sent.settings.as_deref() != view.settings.as_deref();
        let addresses_changed = sent.member.as_ref().map(|m| &m.interface_addresses)
            != member.map(|m| &m.interface_addresses);
        let rotation_changed = sent.member.as_ref().map(|m| &m.rotate_key_request)
            != member.map(|m| &m.rotate_key_request);
        let pod_cidrs_changed =
            sent.member.as_ref().map(|m| &m.pod_cidrs) != member.map(|m| &m.pod_cidrs);
        if delta.is_empty()
            && !settings_changed
            && !addresses_changed
            && !rotation_changed
            && !pod_cidrs_changed
        {
            return None;
        }
        // Far behind: a snapshot is smaller than the delta.
        if delta.upserted.len() + delta.removed.len() > count.max(8) {
            return Some(snapshot());
        }
        Some(pb::PeerUpdate {
            epoch: self.epoch.clone(),
            revision: view.revision,
            rotate_key_request,
            update: Some(pb::peer_update::Update::Delta(pb::PeerDelta {
                upserted: delta.upserted.iter().map(|p| to_proto(p, member)).collect(),
                removed: delta
                    .removed
                    .iter()
                    .map(|k| k.as_bytes().to_vec())
                    .collect(),
                mesh: settings_changed.then_some(settings).flatten(),
                tunnel_addresses: if addresses_changed {
                    addresses_of(member)
                } else {
                    Vec::new()
                },
                pod_cidrs: if pod_cidrs_changed {
                    pod_cidrs_of(member)
                } else {
                    Vec::new()
                },
            })),
        })
    }
}

fn addresses_of(member: Option<&Member>) -> Vec<String> {
    member
        .map(|m| {
            m.interface_addresses
                .iter()
                .map(ToString::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn pod_cidrs_of(member: Option<&Member>) -> Vec<String> {
    member
        .map(|m| m.pod_cidrs.iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

/// A desired peer as the node `own` should program it (resolving derived preshared keys).
pub fn to_proto(peer: &DesiredPeer, own: Option<&Member>) -> pb::Peer {
    let preshared_key = match (&peer.preshared_key, own) {
        (PresharedKey::Static(k), _) => k.as_bytes().to_vec(),
        (PresharedKey::DerivedFromMesh, Some(me)) => match (&me.mesh_secret, peer.node.is_some()) {
            (Some(secret), true) => pair_preshared_key(secret, &me.public_key, &peer.public_key)
                .as_bytes()
                .to_vec(),
            _ => Vec::new(),
        },
        _ => Vec::new(),
    };
    pb::Peer {
        public_key: peer.public_key.as_bytes().to_vec(),
        name: peer.name.clone(),
        endpoint: peer.endpoint.clone().unwrap_or_default(),
        allowed_ips: peer.allowed_ips.iter().map(ToString::to_string).collect(),
        persistent_keepalive: u32::from(peer.persistent_keepalive),
        preshared_key,
        node: peer.node.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_peer_names() {
        assert_eq!(node_peer_name("default", "worker-1"), "node-worker-1");
        assert_eq!(node_peer_name("edge", "worker-1"), "edge-node-worker-1");
        let long = "n".repeat(253);
        let name = node_peer_name("default", &long);
        assert!(name.len() <= 253, "{}", name.len());
        assert_ne!(name, node_peer_name("default", &"m".repeat(253)));
    }
}
