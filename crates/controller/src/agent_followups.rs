//! What the lease holder does about what agents say of themselves: an event when an agent
//! refused an update (it would have wiped the node without the mesh saying so), the startup
//! taint removed from a Node once its agent has programmed the mesh there, and a deleted
//! mesh let go (its finalizer removed) once its nodes' agents have left it.
//!
//! The taint (`wgmesh.io/agent-not-ready:NoSchedule`, set through the kubelet's
//! `--register-with-taints`) keeps pods off a new node until the mesh runs on it: in add-on
//! mode the other CNI would otherwise carry their traffic in plaintext before our agent ever
//! started there. Like Cilium's `node.cilium.io/agent-not-ready`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use wgmesh_api::{WireGuardMesh, WireGuardPeer};

use crate::metrics::Metrics;
use crate::reconcile::Computed;
use crate::reports::{AgentState, Reports};

/// The startup taint's key.
pub const AGENT_NOT_READY_TAINT: &str = "wgmesh.io/agent-not-ready";

/// The finalizer that keeps a deleted mesh until its nodes' agents have left it (removed their
/// interface, routes and CNI configuration), so that `helm uninstall` leaves nodes clean.
pub const AGENTS_CLEAN_FINALIZER: &str = "wgmesh.io/agents-clean";

/// The nodes a deleted mesh still waits for: those with a node peer in it whose agent has not
/// said it left.
pub fn waiting_for(nodes: &BTreeSet<String>, left: &BTreeSet<String>) -> Vec<String> {
    nodes.difference(left).cloned().collect()
}

/// Whether a deleted mesh may go: nobody left to wait for, or it waited `timeout` since its
/// deletion (an agent that is down never reports).
pub fn may_go(
    waiting: &[String],
    deleted_at: SystemTime,
    now: SystemTime,
    timeout: Duration,
) -> bool {
    waiting.is_empty() || now.duration_since(deleted_at).unwrap_or_default() >= timeout
}

/// The Node's taints without ours, when it carries ours (with any effect); `None` otherwise.
pub fn without_startup_taint(node: &Node) -> Option<Vec<Taint>> {
    let taints = node.spec.as_ref()?.taints.as_ref()?;
    if !taints.iter().any(|t| t.key == AGENT_NOT_READY_TAINT) {
        return None;
    }
    Some(
        taints
            .iter()
            .filter(|t| t.key != AGENT_NOT_READY_TAINT)
            .cloned()
            .collect(),
    )
}

/// The refusal to announce: a new, non-empty one (once per distinct message).
pub fn refusal_to_announce<'a>(last: Option<&String>, state: &'a AgentState) -> Option<&'a str> {
    let refused = state.refused_update.as_str();
    (!refused.is_empty() && last.map(String::as_str) != Some(refused)).then_some(refused)
}

pub struct AgentFollowUps {
    /// (mesh, node) -> the refusal last announced.
    announced: HashMap<(String, String), String>,
    leave_timeout: Duration,
}

impl AgentFollowUps {
    pub fn new(leave_timeout: Duration) -> Self {
        AgentFollowUps {
            announced: HashMap::new(),
            leave_timeout,
        }
    }

    /// Every live mesh carries the finalizer; a deleted one loses it once its agents left.
    pub async fn sync_finalizers(&self, client: &Client, reports: &Reports, snapshot: &Computed) {
        let api: Api<WireGuardMesh> = Api::all(client.clone());
        for (mesh, _) in snapshot.meshes.values() {
            if !mesh
                .finalizers()
                .iter()
                .any(|f| f == AGENTS_CLEAN_FINALIZER)
            {
                let mut finalizers = mesh.finalizers().to_vec();
                finalizers.push(AGENTS_CLEAN_FINALIZER.to_owned());
                set_finalizers(&api, mesh, finalizers).await;
            }
        }
        for (name, (mesh, nodes)) in &snapshot.deleting {
            if !mesh
                .finalizers()
                .iter()
                .any(|f| f == AGENTS_CLEAN_FINALIZER)
            {
                continue;
            }
            let waiting = waiting_for(nodes, &reports.left(name));
            let deleted_at = mesh
                .metadata
                .deletion_timestamp
                .as_ref()
                .map(|t| SystemTime::from(t.0))
                .unwrap_or_else(SystemTime::now);
            if may_go(&waiting, deleted_at, SystemTime::now(), self.leave_timeout) {
                if waiting.is_empty() {
                    tracing::info!(mesh = %name, nodes = nodes.len(), "every node left the deleted mesh; letting it go");
                } else {
                    tracing::warn!(mesh = %name, ?waiting, timeout = ?self.leave_timeout, "these nodes did not say they left the deleted mesh in time; letting it go (clean them with wgmesh-agent cleanup)");
                }
                // The mesh's node members go with it: a reinstall starts from a clean slate
                // (new keys register anew), and nothing of the mesh outlives it in the API.
                if !delete_node_peers(client, name, &snapshot.peers).await {
                    continue;
                }
                let kept = mesh
                    .finalizers()
                    .iter()
                    .filter(|f| *f != AGENTS_CLEAN_FINALIZER)
                    .cloned()
                    .collect();
                set_finalizers(&api, mesh, kept).await;
            } else {
                tracing::debug!(mesh = %name, ?waiting, "waiting for nodes to leave the deleted mesh");
            }
        }
        let existing: BTreeSet<String> = snapshot
            .meshes
            .keys()
            .chain(snapshot.deleting.keys())
            .chain(snapshot.held.keys())
            .cloned()
            .collect();
        reports.forget_left(&existing);
    }

    pub async fn sync(
        &mut self,
        client: &Client,
        recorder: &Recorder,
        metrics: &Metrics,
        reports: &Reports,
        snapshot: &Computed,
    ) {
        let nodes: HashMap<String, &Node> = snapshot
            .nodes
            .iter()
            .map(|n| (n.name_any(), n.as_ref()))
            .collect();
        let mut seen = HashSet::new();
        for (mesh, (_, desired)) in &snapshot.meshes {
            for (node_name, state) in reports.agents(mesh) {
                if !desired.members.contains_key(&node_name) {
                    continue;
                }
                let Some(node) = nodes.get(&node_name) else {
                    continue;
                };
                let key = (mesh.clone(), node_name.clone());
                if let Some(refused) = refusal_to_announce(self.announced.get(&key), &state) {
                    metrics.agent_refused_update(mesh);
                    let event = Event {
                        type_: EventType::Warning,
                        reason: "UpdateRefused".into(),
                        note: Some(format!("mesh {mesh}: {refused}")),
                        action: "Program".into(),
                        secondary: None,
                    };
                    if let Err(e) = recorder.publish(&event, &node.object_ref(&())).await {
                        tracing::debug!(node = %node_name, error = %e, "publishing an event failed");
                    }
                    tracing::warn!(node = %node_name, mesh = %mesh, refused, "an agent refused an update");
                    self.announced.insert(key.clone(), refused.to_owned());
                } else if state.refused_update.is_empty() {
                    self.announced.remove(&key);
                }
                seen.insert(key);
                if state.programmed && without_startup_taint(node).is_some() {
                    remove_startup_taint(client, &node_name).await;
                }
            }
        }
        self.announced.retain(|k, _| seen.contains(k));
    }
}

/// Deletes the node members (WireGuardPeers the controller made for Nodes) of mesh `mesh`.
/// Returns whether none is left; a failure is logged and the next sync tries again.
async fn delete_node_peers(client: &Client, mesh: &str, peers: &[Arc<WireGuardPeer>]) -> bool {
    let api: Api<WireGuardPeer> = Api::all(client.clone());
    let mut all_gone = true;
    for peer in peers
        .iter()
        .filter(|p| p.spec.node.is_some() && p.spec.mesh.0 == mesh)
    {
        let name = peer.name_any();
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(mesh, peer = %name, "deleted the node member of the deleted mesh")
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                tracing::warn!(mesh, peer = %name, error = %e, "deleting a node member of the deleted mesh failed; trying again");
                all_gone = false;
            }
        }
    }
    all_gone
}

/// Sets a mesh's finalizers, only if it is still the object we read (its `resourceVersion`):
/// on a conflict the next sync tries again.
async fn set_finalizers(api: &Api<WireGuardMesh>, mesh: &WireGuardMesh, finalizers: Vec<String>) {
    let name = mesh.name_any();
    let patch = json!({
        "metadata": {"resourceVersion": mesh.resource_version(), "finalizers": finalizers},
    });
    if let Err(e) = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        tracing::debug!(mesh = %name, error = %e, "updating the mesh's finalizers failed; trying again");
    }
}

/// Replaces the Node's taints with all but ours, only if the Node is still the one we read
/// (its `resourceVersion` in the patch): a concurrent change (the node lifecycle controller's
/// own taints) wins with a conflict, and the next sync tries again. The Node is read afresh
/// first: the caches skip changes to what they trim (a kubelet's status heartbeat), so the
/// cached resourceVersion may be older than the Node.
async fn remove_startup_taint(client: &Client, name: &str) {
    let api: Api<Node> = Api::all(client.clone());
    let node = match api.get_opt(name).await {
        Ok(Some(node)) => node,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(node = %name, error = %e, "reading the node to remove its startup taint failed; trying again");
            return;
        }
    };
    let Some(kept) = without_startup_taint(&node) else {
        return;
    };
    let patch = json!({
        "metadata": {"resourceVersion": node.resource_version()},
        "spec": {"taints": kept},
    });
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            tracing::info!(node = %name, taint = AGENT_NOT_READY_TAINT, "the node's agent programmed the mesh: removed the startup taint")
        }
        Err(e) => {
            tracing::debug!(node = %name, error = %e, "removing the startup taint failed; trying again")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(taints: &[(&str, &str)]) -> Node {
        Node {
            spec: Some(k8s_openapi::api::core::v1::NodeSpec {
                taints: Some(
                    taints
                        .iter()
                        .map(|(k, e)| Taint {
                            key: (*k).into(),
                            effect: (*e).into(),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn startup_taint_table() {
        let keys =
            |t: Option<Vec<Taint>>| t.map(|t| t.into_iter().map(|t| t.key).collect::<Vec<_>>());
        assert_eq!(keys(without_startup_taint(&Node::default())), None);
        assert_eq!(
            keys(without_startup_taint(&node(&[("other", "NoSchedule")]))),
            None
        );
        assert_eq!(
            keys(without_startup_taint(&node(&[
                ("other", "NoSchedule"),
                (AGENT_NOT_READY_TAINT, "NoSchedule"),
                (AGENT_NOT_READY_TAINT, "NoExecute"),
            ]))),
            Some(vec!["other".to_owned()])
        );
        assert_eq!(
            keys(without_startup_taint(&node(&[(
                AGENT_NOT_READY_TAINT,
                "NoSchedule"
            )]))),
            Some(vec![])
        );
    }

    #[test]
    fn a_deleted_mesh_goes_when_its_nodes_left_or_the_wait_is_over() {
        let set = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let timeout = Duration::from_secs(120);
        // nodes, left, seconds since deletion, waiting, may go
        for (nodes, left, secs, want_waiting, want_go) in [
            (set(&["a", "b"]), set(&[]), 5, vec!["a", "b"], false),
            (set(&["a", "b"]), set(&["a"]), 5, vec!["b"], false),
            (set(&["a", "b"]), set(&["b", "a", "c"]), 5, vec![], true),
            (set(&[]), set(&[]), 0, vec![], true),
            (set(&["a", "b"]), set(&["a"]), 120, vec!["b"], true),
        ] {
            let waiting = waiting_for(&nodes, &left);
            assert_eq!(waiting, want_waiting, "{nodes:?} {left:?}");
            let now = t0 + Duration::from_secs(secs);
            assert_eq!(
                may_go(&waiting, t0, now, timeout),
                want_go,
                "{nodes:?} {left:?} {secs}"
            );
        }
    }

    #[test]
    fn refusals_are_announced_once_each() {
        let state = |r: &str| AgentState {
            programmed: true,
            refused_update: r.into(),
            live_node_sessions: None,
        };
        let first = "revision 9: would remove all 2 peers while 3 members exist".to_owned();
        assert_eq!(refusal_to_announce(None, &state("")), None);
        assert_eq!(
            refusal_to_announce(None, &state(&first)),
            Some(first.as_str())
        );
        assert_eq!(refusal_to_announce(Some(&first), &state(&first)), None);
        assert_eq!(
            refusal_to_announce(Some(&first), &state("revision 10: other")),
            Some("revision 10: other")
        );
    }
}
