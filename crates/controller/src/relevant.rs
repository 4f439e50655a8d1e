//! Which watch events change what the controller reads. The caches keep trimmed objects
//! ([`crate::trim`]), so most events from a large cluster (a kubelet's status update with
//! new heartbeat times, another controller's annotations) leave the cached object as it was
//! but for its `resourceVersion`. Those wake nothing: recomputing the mesh is O(objects), and
//! at 5,000 nodes kubelets alone send a dozen such events a second.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use kube::Resource;
use kube::runtime::watcher::Event;
use serde::Serialize;

/// A fingerprint of every cached object, to tell which events change one.
#[derive(Default)]
pub struct Fingerprints {
    seen: HashMap<String, u64>,
    /// During a relist: the objects listed so far, which replace `seen` when it is done.
    listing: Option<HashMap<String, u64>>,
}

impl Fingerprints {
    /// Whether the event (already applied to the cache) changed it: an object added, changed
    /// beyond its `resourceVersion`, or deleted, or a relist done. A relist's objects are news
    /// only as a whole, when it is done, as the cache takes them then.
    pub fn is_news<K>(&mut self, event: &Event<K>) -> bool
    where
        K: Resource + Serialize + Clone,
    {
        match event {
            Event::Apply(object) => match fingerprint(object) {
                Some(f) => self.seen.insert(key(object), f) != Some(f),
                None => {
                    self.seen.remove(&key(object));
                    true
                }
            },
            Event::Delete(object) => {
                self.seen.remove(&key(object));
                true
            }
            Event::Init => {
                self.listing = Some(HashMap::new());
                false
            }
            Event::InitApply(object) => {
                if let Some(f) = fingerprint(object) {
                    self.listing
                        .get_or_insert_with(HashMap::new)
                        .insert(key(object), f);
                }
                false
            }
            Event::InitDone => {
                self.seen = self.listing.take().unwrap_or_default();
                true
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

/// A hash of the object as cached, but for its `resourceVersion`. `None` if it does not
/// serialize (no Kubernetes object fails to): then every event of it is news.
fn fingerprint<K: Resource + Serialize + Clone>(object: &K) -> Option<u64> {
    let mut object = object.clone();
    object.meta_mut().resource_version = None;
    let bytes = serde_json::to_vec(&object).ok()?;
    let mut hasher = DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Node;
    use kube::ResourceExt;

    fn node(name: &str, rv: &str, label: &str) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some(name.into());
        n.metadata.resource_version = Some(rv.into());
        n.labels_mut().insert("zone".into(), label.into());
        n
    }

    #[test]
    fn news_table() {
        let a1 = node("a", "1", "x");
        let a2_heartbeat = node("a", "2", "x");
        let a3_relabelled = node("a", "3", "y");
        let b1 = node("b", "1", "x");
        // (what happens, the event, whether it is news), in order, on one set of fingerprints.
        let steps: Vec<(&str, Event<Node>, bool)> = vec![
            ("a relist starts", Event::Init, false),
            ("a listed object", Event::InitApply(a1.clone()), false),
            ("the relist is done", Event::InitDone, true),
            (
                "a trimmed-away change",
                Event::Apply(a2_heartbeat.clone()),
                false,
            ),
            ("the same again", Event::Apply(a2_heartbeat), false),
            ("a label", Event::Apply(a3_relabelled.clone()), true),
            ("a new object", Event::Apply(b1.clone()), true),
            ("a deletion", Event::Delete(b1.clone()), true),
            ("created again", Event::Apply(b1.clone()), true),
            ("a relist starts", Event::Init, false),
            (
                "listed unchanged",
                Event::InitApply(a3_relabelled.clone()),
                false,
            ),
            ("the relist is done", Event::InitDone, true),
            ("b, not in the relist, is new again", Event::Apply(b1), true),
            ("a as listed", Event::Apply(a3_relabelled), false),
            ("a back to its first label", Event::Apply(a1), true),
        ];
        let mut fingerprints = Fingerprints::default();
        for (what, event, want) in steps {
            assert_eq!(fingerprints.is_news(&event), want, "{what}");
        }
    }

    #[test]
    fn namespaces_keep_objects_apart() {
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        let slice = |ns: &str| {
            let mut s = EndpointSlice::default();
            s.metadata.name = Some("kubernetes".into());
            s.metadata.namespace = Some(ns.into());
            s
        };
        let mut fingerprints = Fingerprints::default();
        assert!(fingerprints.is_news(&Event::Apply(slice("default"))));
        assert!(fingerprints.is_news(&Event::Apply(slice("other"))));
        assert!(!fingerprints.is_news(&Event::Apply(slice("default"))));
    }
}
