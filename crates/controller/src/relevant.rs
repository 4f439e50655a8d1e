//! Which watch events change what the controller reads, and how much of it. The caches keep
//! trimmed objects ([`crate::trim`]), so many events from a large cluster (a kubelet's status
//! update with new heartbeat times, another controller's annotations) leave the cached
//! object as it was but for its `resourceVersion`: those wake nothing. Of the rest, the
//! status the writer itself writes (traffic, handshakes, live sessions, a mesh's counts) is
//! read by the writer only: the snapshot it works from is refreshed, but the desired mesh,
//! O(objects) to recompute, is not. Everything the computation reads is an input
//! ([`Outputs::without_outputs`] keeps it).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::Instant;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Resource;
use kube::runtime::watcher::Event;
use serde::Serialize;
use wgmesh_api::{WireGuardMesh, WireGuardPeer, WireGuardPeerStatus};

/// What an event changed in the caches, least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// Nothing the controller keeps.
    Nothing,
    /// Only what the status writer wrote and reads back: refresh its snapshot.
    Outputs,
    /// What the desired mesh is computed from: recompute.
    Inputs,
}

/// What the watches changed since the reconciler last took it: the most that changed, and
/// when the first change came. Changes merge, so none is lost however many arrive while the
/// reconciler works.
#[derive(Default)]
pub struct Pending {
    state: Mutex<Option<(Instant, Change)>>,
    notify: tokio::sync::Notify,
}

impl Pending {
    pub fn add(&self, change: Change) {
        if change == Change::Nothing {
            return;
        }
        let mut state = self.state.lock().expect("pending changes lock");
        *state = Some(match *state {
            Some((first, before)) => (first, before.max(change)),
            None => (Instant::now(), change),
        });
        drop(state);
        self.notify.notify_one();
    }

    /// Waits for a change and takes everything pending.
    pub async fn next(&self) -> (Instant, Change) {
        loop {
            if let Some(pending) = self.state.lock().expect("pending changes lock").take() {
                return pending;
            }
            // A change added after the check leaves a permit: this returns at once.
            self.notify.notified().await;
        }
    }
}

/// The fields of an object that only the status writer reads; the computation reads the
/// rest. Keeping too much only costs a recomputation, dropping a field the computation reads
/// would leave the mesh stale: `convert` and `reconcile` name what they read.
pub trait Outputs {
    /// Clears the writer-only fields.
    fn without_outputs(&mut self) {}
}

impl Outputs for Node {}
impl Outputs for ServiceCIDR {}
impl Outputs for EndpointSlice {}

/// The computation reads a peer's tunnel addresses, last seen endpoint and whether it is
/// `Ready` (`convert::peer_input`); traffic, handshakes, live sessions, the condition's
/// message and times are the writer's. Of a node peer's spec, the writer keeps
/// `allowedIPs` (its Node's pod CIDRs decide its claims, `desired::claimed_networks`) and,
/// once the registered endpoint is annotated, `endpoint` in step with the desired mesh, for
/// people to read: the computation reads neither. The generation only counts spec changes.
impl Outputs for WireGuardPeer {
    fn without_outputs(&mut self) {
        self.metadata.generation = None;
        if self.spec.node.is_some() {
            self.spec.allowed_ips.clear();
            if self
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(crate::convert::REGISTERED_ENDPOINT_ANNOTATION))
            {
                self.spec.endpoint = None;
            }
        }
        if let Some(status) = self.status.take() {
            self.status = Some(WireGuardPeerStatus {
                addresses: status.addresses,
                endpoint: status.endpoint,
                conditions: status
                    .conditions
                    .into_iter()
                    .map(|c| Condition {
                        type_: c.type_,
                        status: c.status,
                        last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                        message: String::new(),
                        reason: String::new(),
                        observed_generation: None,
                    })
                    .collect(),
                ..WireGuardPeerStatus::default()
            });
        }
    }
}

/// The computation reads a mesh's active gateway (`convert::mesh_input`) of its status; the
/// counts and conditions are the writer's.
impl Outputs for WireGuardMesh {
    fn without_outputs(&mut self) {
        if let Some(status) = self.status.as_mut() {
            *status = wgmesh_api::WireGuardMeshStatus {
                active_gateway: status.active_gateway.take(),
                ..Default::default()
            };
        }
    }
}

/// Two fingerprints of an object as cached (but for its `resourceVersion`): all of it, and
/// its inputs only.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    whole: u64,
    inputs: u64,
}

/// A fingerprint of every cached object, to tell what each event changed.
#[derive(Default)]
pub struct Fingerprints {
    seen: HashMap<String, Fingerprint>,
    /// During a relist: the objects listed so far, which replace `seen` when it is done.
    listing: Option<HashMap<String, Fingerprint>>,
}

impl Fingerprints {
    /// What the event (already applied to the cache) changed. An object added, deleted or
    /// relisted counts as inputs; a relist's objects count only as a whole, when it is done,
    /// as the cache takes them then.
    pub fn change<K>(&mut self, event: &Event<K>) -> Change
    where
        K: Resource + Serialize + Clone + Outputs,
    {
        match event {
            Event::Apply(object) => {
                let Some(now) = fingerprint(object) else {
                    self.seen.remove(&key(object));
                    return Change::Inputs;
                };
                match self.seen.insert(key(object), now) {
                    Some(before) if before == now => Change::Nothing,
                    Some(before) if before.inputs == now.inputs => Change::Outputs,
                    _ => Change::Inputs,
                }
            }
            Event::Delete(object) => {
                self.seen.remove(&key(object));
                Change::Inputs
            }
            Event::Init => {
                self.listing = Some(HashMap::new());
                Change::Nothing
            }
            Event::InitApply(object) => {
                if let Some(f) = fingerprint(object) {
                    self.listing
                        .get_or_insert_with(HashMap::new)
                        .insert(key(object), f);
                }
                Change::Nothing
            }
            Event::InitDone => {
                self.seen = self.listing.take().unwrap_or_default();
                Change::Inputs
            }
        }
    }
}

fn key<K: Resource>(object: &K) -> String {
    let meta = object.meta();
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// `None` if the object does not serialize (no Kubernetes object fails to): then every
/// event of it changes inputs.
fn fingerprint<K: Resource + Serialize + Clone + Outputs>(object: &K) -> Option<Fingerprint> {
    let mut object = object.clone();
    object.meta_mut().resource_version = None;
    let whole = hash(&object)?;
    object.without_outputs();
    let inputs = hash(&object)?;
    Some(Fingerprint { whole, inputs })
}

fn hash(object: &impl Serialize) -> Option<u64> {
    let bytes = serde_json::to_vec(object).ok()?;
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

    fn node(name: &str, rv: &str, label: &str) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.resource_version = Some(rv.into());
        n.labels_mut().insert("zone".into(), label.into());
        n
    }

    #[test]
    fn change_table() {
        let a1 = node("a", "1", "x");
        let a2_heartbeat = node("a", "2", "x");
        let a3_relabelled = node("a", "3", "y");
        let b1 = node("b", "1", "x");
        use Change::*;
        // (what happens, the event, what it changed), in order, on one set of fingerprints.
        let steps: Vec<(&str, Event<Node>, Change)> = vec![
            ("a relist starts", Event::Init, Nothing),
            ("a listed object", Event::InitApply(a1.clone()), Nothing),
            ("the relist is done", Event::InitDone, Inputs),
            (
                "a trimmed-away change",
                Event::Apply(a2_heartbeat.clone()),
                Nothing,
            ),
            ("the same again", Event::Apply(a2_heartbeat), Nothing),
            ("a label", Event::Apply(a3_relabelled.clone()), Inputs),
            ("a new object", Event::Apply(b1.clone()), Inputs),
            ("a deletion", Event::Delete(b1.clone()), Inputs),
            ("created again", Event::Apply(b1.clone()), Inputs),
            ("a relist starts", Event::Init, Nothing),
            (
                "listed unchanged",
                Event::InitApply(a3_relabelled.clone()),
                Nothing,
            ),
            ("the relist is done", Event::InitDone, Inputs),
            (
                "b, not in the relist, is new again",
                Event::Apply(b1),
                Inputs,
            ),
            ("a as listed", Event::Apply(a3_relabelled), Nothing),
            ("a back to its first label", Event::Apply(a1), Inputs),
        ];
        let mut fingerprints = Fingerprints::default();
        for (what, event, want) in steps {
            assert_eq!(fingerprints.change(&event), want, "{what}");
        }
    }

    fn peer(status: WireGuardPeerStatus) -> WireGuardPeer {
        let spec = serde_json::from_value(serde_json::json!({
            "mesh": "m",
            "publicKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        }))
        .unwrap();
        let mut p = WireGuardPeer::new("p", spec);
        p.status = Some(status);
        p
    }

    fn ready(status: &str, message: &str) -> Condition {
        Condition {
            type_: "Ready".into(),
            status: status.into(),
            message: message.into(),
            reason: "R".into(),
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            observed_generation: None,
        }
    }

    /// What the writer writes of a peer is an output, but for what the computation reads.
    #[test]
    fn peer_status_inputs_and_outputs() {
        let base = WireGuardPeerStatus {
            addresses: vec!["10.250.0.1".into()],
            conditions: vec![ready("True", "programmed")],
            ..Default::default()
        };
        use Change::*;
        let cases: Vec<(&str, WireGuardPeerStatus, Change)> = vec![
            ("unchanged", base.clone(), Nothing),
            (
                "traffic",
                WireGuardPeerStatus {
                    rx_bytes: 5,
                    ..base.clone()
                },
                Outputs,
            ),
            (
                "live sessions",
                WireGuardPeerStatus {
                    live_sessions: Some(4999),
                    ..base.clone()
                },
                Outputs,
            ),
            (
                "the condition's message only",
                WireGuardPeerStatus {
                    conditions: vec![ready("True", "programmed on 5 nodes")],
                    ..base.clone()
                },
                Outputs,
            ),
            (
                "no longer ready",
                WireGuardPeerStatus {
                    conditions: vec![ready("False", "overlap")],
                    ..base.clone()
                },
                Inputs,
            ),
            (
                "a tunnel address",
                WireGuardPeerStatus {
                    addresses: vec!["10.250.0.2".into()],
                    ..base.clone()
                },
                Inputs,
            ),
            (
                "a last seen endpoint",
                WireGuardPeerStatus {
                    endpoint: Some("198.51.100.1:51820".into()),
                    ..base.clone()
                },
                Inputs,
            ),
        ];
        for (what, status, want) in cases {
            let mut fingerprints = Fingerprints::default();
            fingerprints.change(&Event::Apply(peer(base.clone())));
            assert_eq!(
                fingerprints.change(&Event::Apply(peer(status))),
                want,
                "{what}"
            );
        }
    }

    /// The writer keeps a node peer's allowed IPs and endpoint in step with the desired mesh:
    /// outputs. An external peer's are what its author claims: inputs.
    #[test]
    fn peer_spec_inputs_and_outputs() {
        let with = |node: Option<&str>, annotated: bool, allowed: &str, endpoint: &str| {
            let mut spec = serde_json::json!({
                "mesh": "m",
                "publicKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                "allowedIPs": [allowed],
                "endpoint": endpoint,
            });
            if let Some(node) = node {
                spec["node"] = node.into();
            }
            let mut p = WireGuardPeer::new("p", serde_json::from_value(spec).unwrap());
            // A spec change bumps the generation.
            p.metadata.generation = Some((allowed.len() + endpoint.len()) as i64);
            if annotated {
                p.metadata.annotations = Some(
                    [(
                        crate::convert::REGISTERED_ENDPOINT_ANNOTATION.to_owned(),
                        "192.0.2.1:51820".to_owned(),
                    )]
                    .into(),
                );
            }
            p
        };
        use Change::*;
        let cases = [
            (
                "a node peer's allowed IPs",
                with(Some("n"), true, "10.244.1.0/24", "192.0.2.1:51820"),
                with(Some("n"), true, "10.244.12.0/24", "192.0.2.1:51820"),
                Outputs,
            ),
            (
                "a node peer's endpoint, with the registered one annotated",
                with(Some("n"), true, "10.244.1.0/24", "192.0.2.1:51820"),
                with(Some("n"), true, "10.244.1.0/24", "203.0.113.1:51820"),
                Outputs,
            ),
            (
                "a node peer's endpoint, from before the annotation",
                with(Some("n"), false, "10.244.1.0/24", "192.0.2.1:51820"),
                with(Some("n"), false, "10.244.1.0/24", "203.0.113.1:51820"),
                Inputs,
            ),
            (
                "an external peer's allowed IPs",
                with(None, false, "10.9.0.0/24", "192.0.2.1:51820"),
                with(None, false, "10.99.0.0/24", "192.0.2.1:51820"),
                Inputs,
            ),
            (
                "an external peer's endpoint",
                with(None, true, "10.9.0.0/24", "192.0.2.1:51820"),
                with(None, true, "10.9.0.0/24", "203.0.113.1:51820"),
                Inputs,
            ),
        ];
        for (what, before, after, want) in cases {
            let mut fingerprints = Fingerprints::default();
            fingerprints.change(&Event::Apply(before));
            assert_eq!(fingerprints.change(&Event::Apply(after)), want, "{what}");
        }
    }

    #[test]
    fn a_meshs_active_gateway_is_an_input_and_its_counts_are_not() {
        let mesh = |nodes: i32, gateway: &str| {
            let mut m = WireGuardMesh::new("m", Default::default());
            m.status = Some(wgmesh_api::WireGuardMeshStatus {
                nodes,
                active_gateway: Some(gateway.into()),
                ..Default::default()
            });
            m
        };
        let mut fingerprints = Fingerprints::default();
        assert_eq!(
            fingerprints.change(&Event::Apply(mesh(3, "a"))),
            Change::Inputs
        );
        assert_eq!(
            fingerprints.change(&Event::Apply(mesh(4, "a"))),
            Change::Outputs
        );
        assert_eq!(
            fingerprints.change(&Event::Apply(mesh(4, "b"))),
            Change::Inputs
        );
    }

    #[tokio::test]
    async fn pending_changes_merge() {
        let pending = Pending::default();
        pending.add(Change::Nothing);
        pending.add(Change::Outputs);
        pending.add(Change::Inputs);
        pending.add(Change::Outputs);
        let (_, change) = pending.next().await;
        assert_eq!(change, Change::Inputs, "the most that changed");
        pending.add(Change::Outputs);
        assert_eq!(pending.next().await.1, Change::Outputs);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), pending.next());
        assert!(waiting.await.is_err(), "nothing pending: it waits");
    }

    #[test]
    fn namespaces_keep_objects_apart() {
        let slice = |ns: &str| {
            let mut s = EndpointSlice::default();
            s.metadata.name = Some("kubernetes".into());
            s.metadata.namespace = Some(ns.into());
            s
        };
        let mut fingerprints = Fingerprints::default();
        assert_eq!(
            fingerprints.change(&Event::Apply(slice("default"))),
            Change::Inputs
        );
        assert_eq!(
            fingerprints.change(&Event::Apply(slice("other"))),
            Change::Inputs
        );
        assert_eq!(
            fingerprints.change(&Event::Apply(slice("default"))),
            Change::Nothing
        );
        assert_eq!(slice("x").name_any(), "kubernetes");
    }
}
