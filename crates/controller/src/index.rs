//! The index: the latest desired state of every mesh, and one watch channel per (mesh, node)
//! that agents' streams subscribe to.
//!
//! Publishing a new desired mesh bumps the mesh's revision and notifies only the nodes whose
//! view changed (`send_if_modified`): a change that affects nobody sends nothing. Recent
//! revisions are kept so a reconnecting agent can resume with a delta.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use wgmesh_core::PublicKey;
use wgmesh_core::desired::{DesiredMesh, Member};
use wgmesh_proto::MeshSettings;

/// How many past revisions of each mesh are kept for resuming agents.
const HISTORY: usize = 16;

/// What one node sees of one mesh.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// The mesh's revision this view belongs to (0: the mesh has not been computed yet).
    pub revision: u64,
    /// The mesh's settings; `None` while the mesh does not exist.
    pub settings: Option<Arc<MeshSettings>>,
    pub desired: Arc<DesiredMesh>,
}

impl NodeView {
    pub fn member<'a>(&'a self, node: &str) -> Option<&'a Member> {
        self.desired.members.get(node)
    }
}

#[derive(Default)]
struct MeshEntry {
    revision: u64,
    settings: Option<Arc<MeshSettings>>,
    desired: Arc<DesiredMesh>,
    /// Recent revisions: each one's desired state and the keys it changed from the one before.
    history: VecDeque<Revision>,
}

struct Revision {
    revision: u64,
    desired: Arc<DesiredMesh>,
    changed: BTreeSet<PublicKey>,
}

#[derive(Default)]
struct State {
    meshes: HashMap<String, MeshEntry>,
    /// Subscribers by mesh, then node.
    nodes: HashMap<String, HashMap<String, watch::Sender<NodeView>>>,
    /// The last revision of each deleted mesh: one created again under its name counts on
    /// from there, so an agent resuming from the deleted mesh's revision is never taken for
    /// one of the new mesh's.
    removed: HashMap<String, u64>,
}

/// Shared by the reconciler (writes) and the gRPC streams (read).
pub struct Index {
    /// Identifies this process: revisions are only comparable within one epoch.
    epoch: String,
    state: Mutex<State>,
}

impl Index {
    pub fn new(epoch: String) -> Self {
        Index {
            epoch,
            state: Mutex::new(State::default()),
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Publishes a mesh's new settings and desired state. Returns the new revision, or `None`
    /// when nothing changed.
    pub fn publish(&self, mesh: &str, settings: MeshSettings, desired: DesiredMesh) -> Option<u64> {
        let mut guard = self.state.lock().expect("index lock");
        let state = &mut *guard;
        let entry = state
            .meshes
            .entry(mesh.to_owned())
            .or_insert_with(|| MeshEntry {
                revision: state.removed.remove(mesh).unwrap_or(0),
                ..MeshEntry::default()
            });
        let settings_changed = entry.settings.as_deref() != Some(&settings);
        if !settings_changed && *entry.desired == desired {
            return None;
        }
        let desired = Arc::new(share_unchanged(&entry.desired, desired));
        let changed = changed_keys(&entry.desired, &desired);
        entry.revision += 1;
        entry.settings = Some(Arc::new(settings));
        entry.desired = desired.clone();
        let view = view_of(entry);
        let revision = entry.revision;
        if let Some(subscribers) = state.nodes.get(mesh) {
            notify(subscribers, &view, &changed, settings_changed);
        }
        let entry = state.meshes.get_mut(mesh).expect("entry was just written");
        entry.history.push_back(Revision {
            revision,
            desired,
            changed,
        });
        let forgotten = (entry.history.len() > HISTORY)
            .then(|| entry.history.pop_front())
            .flatten();
        // The streams just woken wait for this lock: the oldest revision (possibly the last
        // holder of thousands of peers) is freed after it is released.
        drop(guard);
        drop(forgotten);
        Some(revision)
    }

    /// Forgets a deleted mesh: its subscribers see an empty view without settings.
    pub fn remove(&self, mesh: &str) {
        let mut state = self.state.lock().expect("index lock");
        let Some(mut entry) = state.meshes.remove(mesh) else {
            return;
        };
        entry.revision += 1;
        state.removed.insert(mesh.to_owned(), entry.revision);
        let view = NodeView {
            revision: entry.revision,
            settings: None,
            desired: Arc::new(DesiredMesh::default()),
        };
        if let Some(subscribers) = state.nodes.get(mesh) {
            notify(subscribers, &view, &BTreeSet::new(), true);
        }
    }

    /// Names of the meshes with a published state.
    pub fn meshes(&self) -> Vec<String> {
        let state = self.state.lock().expect("index lock");
        state.meshes.keys().cloned().collect()
    }

    /// The current view of a mesh.
    pub fn view(&self, mesh: &str) -> Option<NodeView> {
        let state = self.state.lock().expect("index lock");
        state.meshes.get(mesh).map(view_of)
    }

    /// The desired state of `mesh` at `revision`, if it is still remembered.
    pub fn at_revision(&self, mesh: &str, revision: u64) -> Option<Arc<DesiredMesh>> {
        let state = self.state.lock().expect("index lock");
        let entry = state.meshes.get(mesh)?;
        entry
            .history
            .iter()
            .find(|r| r.revision == revision)
            .map(|r| r.desired.clone())
    }

    /// Every key whose peer changed, in either shared view, since `sent` (the desired state
    /// of revision `from`) up to revision `to` of `mesh`; `None` unless all those revisions
    /// are still remembered and `sent` is this mesh's own revision `from` (a mesh deleted and
    /// created again counts its revisions anew). Lets each stream compare only what changed
    /// instead of every peer: O(changes), not O(nodes), per node and change.
    pub fn changed_since(
        &self,
        mesh: &str,
        sent: &Arc<DesiredMesh>,
        from: u64,
        to: u64,
    ) -> Option<BTreeSet<PublicKey>> {
        let state = self.state.lock().expect("index lock");
        let history = &state.meshes.get(mesh)?.history;
        let start = history.iter().position(|r| r.revision == from)?;
        if !Arc::ptr_eq(&history[start].desired, sent) {
            return None;
        }
        let mut changed = BTreeSet::new();
        let mut expected = from;
        for r in history.iter().skip(start + 1) {
            if r.revision > to {
                break;
            }
            expected += 1;
            if r.revision != expected {
                return None;
            }
            changed.extend(r.changed.iter().copied());
        }
        (expected == to).then_some(changed)
    }

    /// Subscribes to what `node` sees of `mesh`. Every subscriber of the same node shares one
    /// channel.
    pub fn subscribe(&self, mesh: &str, node: &str) -> watch::Receiver<NodeView> {
        let mut state = self.state.lock().expect("index lock");
        let initial = state.meshes.get(mesh).map(view_of).unwrap_or(NodeView {
            revision: 0,
            settings: None,
            desired: Arc::new(DesiredMesh::default()),
        });
        let sender = state
            .nodes
            .entry(mesh.to_owned())
            .or_default()
            .entry(node.to_owned())
            .or_insert_with(|| watch::channel(initial).0);
        sender.subscribe()
    }

    /// Drops channels nobody listens to any more.
    pub fn prune(&self) {
        let mut state = self.state.lock().expect("index lock");
        for nodes in state.nodes.values_mut() {
            nodes.retain(|_, tx| tx.receiver_count() > 0);
        }
        state.nodes.retain(|_, nodes| !nodes.is_empty());
    }
}

fn view_of(entry: &MeshEntry) -> NodeView {
    NodeView {
        revision: entry.revision,
        settings: entry.settings.clone(),
        desired: entry.desired.clone(),
    }
}

/// Public keys of the peers that were added, changed or removed, in any shared view
/// (gateways', interior nodes', or nodes behind NAT).
fn changed_keys(old: &DesiredMesh, new: &DesiredMesh) -> BTreeSet<PublicKey> {
    let views = [
        (&old.peers, &new.peers),
        (&old.interior_peers, &new.interior_peers),
        (&old.nat_peers, &new.nat_peers),
    ];
    views
        .into_iter()
        .flat_map(|(o, n)| {
            let delta = wgmesh_core::diff::diff_peer_sets(o, n, None);
            delta
                .upserted
                .iter()
                .map(|p| p.public_key)
                .chain(delta.removed)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Notifies each node whose view changed: its membership, its settings, or any peer other
/// than itself. `changed` is computed once per publish, so this is cheap per node.
fn notify(
    subscribers: &HashMap<String, watch::Sender<NodeView>>,
    view: &NodeView,
    changed: &BTreeSet<PublicKey>,
    all: bool,
) {
    for (node, tx) in subscribers {
        tx.send_if_modified(|current| {
            let own = view.member(node).map(|m| m.public_key);
            let changed = all
                || current.settings.is_none()
                || current.member(node) != view.member(node)
                || current.desired.non_members.get(node) != view.desired.non_members.get(node)
                || changed.iter().any(|k| Some(*k) != own);
            // Always move to the latest revision; wake the stream only when it matters.
            *current = view.clone();
            changed
        });
    }
}

/// Reuses the previous `Arc` of every peer that did not change, so later comparisons are
/// pointer comparisons and unchanged peers cost no memory.
fn share_unchanged(old: &DesiredMesh, mut new: DesiredMesh) -> DesiredMesh {
    let views = [
        (&old.peers, &mut new.peers),
        (&old.interior_peers, &mut new.interior_peers),
        (&old.nat_peers, &mut new.nat_peers),
    ];
    for (old, new) in views {
        for (key, peer) in new.iter_mut() {
            if let Some(prev) = old.get(key)
                && **prev == **peer
            {
                *peer = prev.clone();
            }
        }
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use wgmesh_core::desired::DesiredPeer;
    use wgmesh_core::desired::{PresharedKey, Verdict};

    fn peer(n: u8, endpoint: &str) -> (PublicKey, Arc<DesiredPeer>) {
        let key = PublicKey::from_bytes([n; 32]);
        (
            key,
            Arc::new(DesiredPeer {
                name: format!("n{n}"),
                public_key: key,
                endpoint: Some(endpoint.into()),
                allowed_ips: vec![],
                persistent_keepalive: 0,
                preshared_key: PresharedKey::None,
                node: Some(format!("n{n}")),
                encoding: Default::default(),
                allowed_ips_diff: Default::default(),
            }),
        )
    }

    fn mesh(endpoints: &[(u8, &str)]) -> DesiredMesh {
        let mut d = DesiredMesh::default();
        for (n, e) in endpoints {
            let (k, p) = peer(*n, e);
            d.members.insert(
                format!("n{n}"),
                Member {
                    public_key: k,
                    interface_addresses: vec![],
                    mesh_secret: None,
                    rotate_key_request: None,
                    pod_cidrs: vec![],
                    gateway: true,
                    behind_nat: false,
                },
            );
            d.peers.insert(k, p);
            d.verdicts.insert(format!("n{n}"), Verdict::Programmed);
        }
        d
    }

    #[test]
    fn only_affected_nodes_are_notified() {
        let index = Index::new("e".into());
        let settings = MeshSettings::default();
        index.publish(
            "m",
            settings.clone(),
            mesh(&[(1, "a:1"), (2, "b:1"), (3, "c:1")]),
        );
        let mut n1 = index.subscribe("m", "n1");
        let mut n2 = index.subscribe("m", "n2");
        n1.mark_unchanged();
        n2.mark_unchanged();

        // n1's own endpoint changes: the others must hear of it, n1 must not.
        let rev = index.publish(
            "m",
            settings.clone(),
            mesh(&[(1, "a:2"), (2, "b:1"), (3, "c:1")]),
        );
        assert_eq!(rev, Some(2));
        assert!(
            !n1.has_changed().unwrap(),
            "n1's own change is not news to n1"
        );
        assert!(n2.has_changed().unwrap());
        assert_eq!(
            n1.borrow().revision,
            2,
            "n1 still moves to the latest revision"
        );

        // Publishing the same state again is not a revision at all.
        assert_eq!(
            index.publish("m", settings, mesh(&[(1, "a:2"), (2, "b:1"), (3, "c:1")])),
            None
        );
        assert!(index.at_revision("m", 1).is_some());
        assert!(index.at_revision("m", 99).is_none());
    }

    #[test]
    fn changes_since_a_remembered_revision() {
        let index = Index::new("e".into());
        let settings = MeshSettings::default();
        let key = |n: u8| PublicKey::from_bytes([n; 32]);
        index.publish("m", settings.clone(), mesh(&[(1, "a:1"), (2, "b:1")]));
        let first = index.at_revision("m", 1).unwrap();
        index.publish("m", settings.clone(), mesh(&[(1, "a:2"), (2, "b:1")]));
        index.publish(
            "m",
            settings.clone(),
            mesh(&[(1, "a:2"), (2, "b:1"), (3, "c:1")]),
        );
        let third = index.at_revision("m", 3).unwrap();
        let changed = |sent: &Arc<DesiredMesh>, from, to| index.changed_since("m", sent, from, to);
        assert_eq!(
            changed(&first, 1, 3),
            Some(BTreeSet::from([key(1), key(3)]))
        );
        assert_eq!(changed(&first, 1, 2), Some(BTreeSet::from([key(1)])));
        assert_eq!(
            changed(&third, 3, 3),
            Some(BTreeSet::new()),
            "nothing since"
        );
        assert_eq!(changed(&third, 1, 3), None, "not revision 1's state");
        assert_eq!(changed(&first, 1, 9), None, "a revision not published yet");
        assert_eq!(index.changed_since("other", &first, 1, 3), None);

        // Deleted and created again: the old state is no revision of the new mesh.
        let before = index.view("m").unwrap().revision;
        index.remove("m");
        index.publish("m", settings.clone(), mesh(&[(1, "a:1")]));
        index.publish("m", settings.clone(), mesh(&[(1, "a:1"), (4, "d:1")]));
        assert_eq!(changed(&first, 1, 2), None);
        // Its revisions count on from the deleted mesh's: none is taken for an old one.
        let again = index.view("m").unwrap().revision;
        assert_eq!(again, before + 3, "removal, then two publications");
        assert!(index.at_revision("m", before).is_none());

        // Older than the history kept: unknown.
        for n in 0..HISTORY as u16 + 2 {
            let endpoint = format!("a:{}", n + 10);
            index.publish("m", settings.clone(), mesh(&[(1, endpoint.as_str())]));
        }
        let latest = index.view("m").unwrap().revision;
        let at = index.at_revision("m", 2);
        assert!(at.is_none(), "revision 2 is forgotten");
        assert_eq!(changed(&first, 2, latest), None);
    }

    /// Three nodes, n1 the only gateway, and optionally an external site.
    fn gateway_mesh(with_site: bool) -> DesiredMesh {
        use wgmesh_core::desired::{MeshInput, NodeInput, PeerInput, compute};
        let node = |n: u8| NodeInput {
            name: format!("n{n}"),
            uid: format!("uid-n{n}"),
            addresses: vec![],
            host_addresses: vec![],
            selected: true,
            pod_cidrs: vec![format!("10.244.{n}.0/24").parse().unwrap()],
            rotate_key_request: None,
            gateway: n == 1,
            endpoint: Default::default(),
            behind_nat: false,
        };
        let peer = |n: u8, node: Option<String>, allowed: &str| PeerInput {
            name: node.clone().unwrap_or_else(|| "site".into()),
            created: i64::from(n),
            previously_programmed: false,
            seniority: 0,
            public_key: PublicKey::from_bytes([n; 32]),
            allowed_ips: allowed.parse::<wgmesh_core::Cidr>().into_iter().collect(),
            endpoint: None,
            last_seen_endpoint: None,
            persistent_keepalive: None,
            preshared_key: None,
            responder: false,
            disabled: false,
            node_owner_uid: node.as_ref().map(|n| format!("uid-{n}")),
            node,
            tunnel_addresses: vec![format!("10.250.0.{n}").parse().unwrap()],
        };
        let mut peers: Vec<PeerInput> = (1..=3)
            .map(|n| peer(n, Some(format!("n{n}")), ""))
            .collect();
        if with_site {
            peers.push(peer(9, None, "192.168.50.0/24"));
        }
        let mesh = MeshInput {
            name: "m".into(),
            tunnel_pools: vec!["10.250.0.0/16".parse().unwrap()],
            ..MeshInput::default()
        };
        compute(&mesh, &[node(1), node(2), node(3)], &peers)
    }

    #[test]
    fn interior_nodes_hear_of_external_peers_through_the_gateway() {
        let index = Index::new("e".into());
        let settings = MeshSettings::default();
        index.publish("m", settings.clone(), gateway_mesh(false));
        let mut n1 = index.subscribe("m", "n1");
        let mut n2 = index.subscribe("m", "n2");
        n1.mark_unchanged();
        n2.mark_unchanged();

        index.publish("m", settings, gateway_mesh(true));
        assert!(n1.has_changed().unwrap(), "the gateway gets the site");
        assert!(n2.has_changed().unwrap(), "interior nodes route it via n1");
        let site = PublicKey::from_bytes([9; 32]);
        let gateway = PublicKey::from_bytes([1; 32]);
        let peers_of = |node: &str, view: &NodeView| {
            wgmesh_core::node_config::NodeConfig::of(
                node,
                view.settings.clone(),
                view.desired.clone(),
            )
            .peers()
            .map(|p| (p.public_key, p.clone()))
            .collect::<BTreeMap<_, _>>()
        };
        let n1_peers = peers_of("n1", &n1.borrow());
        let n2_peers = peers_of("n2", &n2.borrow());
        assert!(n1_peers.contains_key(&site));
        assert!(!n2_peers.contains_key(&site));
        let via: Vec<String> = n2_peers[&gateway]
            .allowed_ips
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(via.contains(&"192.168.50.0/24".to_owned()), "{via:?}");
        assert!(via.contains(&"10.250.0.9/32".to_owned()), "{via:?}");
    }
}
