//! Differences between two peer sets: what to upsert and what to remove. Used by the
//! controller to stream deltas and by the agent to change its device in place.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::desired::DesiredPeer;
use crate::{Cidr, PublicKey};

/// The changes that turn one peer set into another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSetDelta {
    /// Peers to add or replace (whole), sorted by public key.
    pub upserted: Vec<Arc<DesiredPeer>>,
    /// Public keys of peers to remove, sorted.
    pub removed: Vec<PublicKey>,
}

impl PeerSetDelta {
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.removed.is_empty()
    }
}

/// The delta from `old` to `new`, both seen by the node with key `own` (excluded from both).
/// Unchanged peers are skipped cheaply when both sides share the same allocation.
pub fn diff_peer_sets(
    old: &BTreeMap<PublicKey, Arc<DesiredPeer>>,
    new: &BTreeMap<PublicKey, Arc<DesiredPeer>>,
    own: Option<&PublicKey>,
) -> PeerSetDelta {
    let mut delta = PeerSetDelta::default();
    for (key, peer) in new {
        if Some(key) == own {
            continue;
        }
        match old.get(key) {
            Some(prev) if Arc::ptr_eq(prev, peer) || prev == peer => {}
            _ => delta.upserted.push(peer.clone()),
        }
    }
    for key in old.keys() {
        if Some(key) != own && !new.contains_key(key) {
            delta.removed.push(*key);
        }
    }
    delta
}

/// The same delta as [`diff_peer_sets`], looking only at `keys`: every key whose peer may
/// differ between `old` and `new` must be in it. O(keys) instead of O(peers), which matters
/// when thousands of streams each diff the same small change.
pub fn diff_peer_sets_over(
    old: &BTreeMap<PublicKey, Arc<DesiredPeer>>,
    new: &BTreeMap<PublicKey, Arc<DesiredPeer>>,
    own: Option<&PublicKey>,
    keys: &BTreeSet<PublicKey>,
) -> PeerSetDelta {
    let mut delta = PeerSetDelta::default();
    for key in keys.iter().filter(|k| Some(*k) != own) {
        match (old.get(key), new.get(key)) {
            (Some(prev), Some(peer)) if Arc::ptr_eq(prev, peer) || prev == peer => {}
            (_, Some(peer)) => delta.upserted.push(peer.clone()),
            (Some(_), None) => delta.removed.push(*key),
            (None, None) => {}
        }
    }
    delta
}

/// A peer the node holds whose allowed IPs are all that changed: what to add to its list and
/// what to take out. The lists that grow with the mesh (the relay between the nodes behind
/// NAT carries all their networks, the active gateway every external peer's) change by an
/// entry when a node or peer comes or goes; sent whole, each such change would cost every
/// node holding the list the whole list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedIpsChange {
    pub public_key: PublicKey,
    /// Sorted; none of them in the list.
    pub added: Vec<Cidr>,
    /// Sorted; each of them in the list.
    pub removed: Vec<Cidr>,
}

impl AllowedIpsChange {
    /// Whether the change fits `list` (sorted, without duplicates): it removes only entries
    /// the list has and adds only entries it lacks. A change that does not fit was computed
    /// from another state than the holder's.
    pub fn fits(&self, list: &[Cidr]) -> bool {
        self.removed.iter().all(|c| list.binary_search(c).is_ok())
            && self.added.iter().all(|c| list.binary_search(c).is_err())
    }

    /// `list` (sorted, without duplicates) with the change made: sorted, without duplicates.
    pub fn applied_to(&self, list: &[Cidr]) -> Vec<Cidr> {
        let kept = list
            .iter()
            .filter(|c| self.removed.binary_search(c).is_err());
        let mut out: Vec<Cidr> = kept.chain(self.added.iter()).copied().collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// What turns the sorted list `old` into the sorted list `new`: the entries only `new` has
/// (added) and those only `old` has (removed), each sorted. One merge of the two lists.
pub fn sorted_difference(old: &[Cidr], new: &[Cidr]) -> (Vec<Cidr>, Vec<Cidr>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() && j < new.len() {
        match old[i].cmp(&new[j]) {
            std::cmp::Ordering::Less => {
                removed.push(old[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                added.push(new[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
            }
        }
    }
    removed.extend_from_slice(&old[i..]);
    added.extend_from_slice(&new[j..]);
    (added, removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::PresharedKey;

    fn peer(n: u8, endpoint: &str) -> Arc<DesiredPeer> {
        Arc::new(DesiredPeer {
            name: format!("p{n}"),
            public_key: PublicKey::from_bytes([n; 32]),
            endpoint: Some(endpoint.to_owned()),
            allowed_ips: vec![format!("10.0.{n}.0/24").parse().unwrap()],
            persistent_keepalive: 0,
            preshared_key: PresharedKey::None,
            node: None,
            encoding: Default::default(),
            allowed_ips_diff: Default::default(),
        })
    }

    fn set(peers: &[Arc<DesiredPeer>]) -> BTreeMap<PublicKey, Arc<DesiredPeer>> {
        peers.iter().map(|p| (p.public_key, p.clone())).collect()
    }

    /// name, old set, new set, own key, upserted key bytes, removed key bytes
    type Case<'a> = (
        &'a str,
        Vec<Arc<DesiredPeer>>,
        Vec<Arc<DesiredPeer>>,
        Option<&'a PublicKey>,
        Vec<u8>,
        Vec<u8>,
    );

    #[test]
    fn diff_table() {
        let (a, b, c) = (
            peer(1, "1.1.1.1:1"),
            peer(2, "2.2.2.2:2"),
            peer(3, "3.3.3.3:3"),
        );
        let b2 = peer(2, "2.2.2.2:9");
        let own = PublicKey::from_bytes([3; 32]);
        let cases: Vec<Case> = vec![
            (
                "no change",
                vec![a.clone(), b.clone()],
                vec![a.clone(), b.clone()],
                None,
                vec![],
                vec![],
            ),
            (
                "equal but not shared is no change",
                vec![a.clone()],
                vec![peer(1, "1.1.1.1:1")],
                None,
                vec![],
                vec![],
            ),
            (
                "add",
                vec![a.clone()],
                vec![a.clone(), b.clone()],
                None,
                vec![2],
                vec![],
            ),
            (
                "remove",
                vec![a.clone(), b.clone()],
                vec![a.clone()],
                None,
                vec![],
                vec![2],
            ),
            (
                "change",
                vec![a.clone(), b.clone()],
                vec![a.clone(), b2.clone()],
                None,
                vec![2],
                vec![],
            ),
            (
                "own key never appears",
                vec![a.clone()],
                vec![a.clone(), c.clone()],
                Some(&own),
                vec![],
                vec![],
            ),
            (
                "own key removal is not sent",
                vec![a.clone(), c.clone()],
                vec![a.clone()],
                Some(&own),
                vec![],
                vec![],
            ),
            (
                "from empty is a full upsert",
                vec![],
                vec![a.clone(), b.clone()],
                None,
                vec![1, 2],
                vec![],
            ),
        ];
        for (name, old, new, own, upserted, removed) in cases {
            let (old, new) = (set(&old), set(&new));
            let d = diff_peer_sets(&old, &new, own);
            let got_up: Vec<u8> = d
                .upserted
                .iter()
                .map(|p| p.public_key.as_bytes()[0])
                .collect();
            let got_rm: Vec<u8> = d.removed.iter().map(|k| k.as_bytes()[0]).collect();
            assert_eq!((got_up, got_rm), (upserted, removed), "{name}");
            // Over any key set holding every key of either side, the same delta.
            let every: BTreeSet<PublicKey> = old.keys().chain(new.keys()).copied().collect();
            let mut wider = every.clone();
            wider.insert(PublicKey::from_bytes([99; 32]));
            for keys in [every, wider] {
                assert_eq!(
                    diff_peer_sets_over(&old, &new, own, &keys),
                    d,
                    "{name} over keys"
                );
            }
        }
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        let mut out: Vec<Cidr> = list.iter().map(|c| c.parse().unwrap()).collect();
        out.sort();
        out
    }

    /// name, old list, new list
    type ListCase<'a> = (&'a str, Vec<&'a str>, Vec<&'a str>);

    #[test]
    fn allowed_ips_change_table() {
        let cases: Vec<ListCase> = vec![
            ("equal", vec!["10.0.0.0/24"], vec!["10.0.0.0/24"]),
            ("empty to one", vec![], vec!["10.0.0.0/24"]),
            ("one to empty", vec!["10.0.0.0/24"], vec![]),
            (
                "grown in the middle",
                vec!["10.0.0.0/24", "10.0.2.0/24"],
                vec!["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24"],
            ),
            (
                "shrunk at both ends",
                vec!["10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24", "fd00::/64"],
                vec!["10.0.1.0/24"],
            ),
            (
                "one in, one out",
                vec!["10.0.0.0/24", "10.250.0.1/32"],
                vec!["10.0.0.0/24", "10.250.0.2/32"],
            ),
            (
                "all new",
                vec!["10.0.0.0/24", "10.0.1.0/24"],
                vec!["192.168.0.0/16", "fd00::/64"],
            ),
        ];
        for (name, old, new) in cases {
            let (old, new) = (cidrs(&old), cidrs(&new));
            let (added, removed) = sorted_difference(&old, &new);
            let change = AllowedIpsChange {
                public_key: PublicKey::from_bytes([1; 32]),
                added: added.clone(),
                removed: removed.clone(),
            };
            assert!(change.fits(&old), "{name}: fits the old list");
            assert_eq!(change.applied_to(&old), new, "{name}: gives the new list");
            assert!(added.is_sorted() && removed.is_sorted(), "{name}: sorted");
            assert!(
                added.iter().all(|c| !old.contains(c)),
                "{name}: added are new"
            );
            assert!(
                removed.iter().all(|c| !new.contains(c)),
                "{name}: removed are gone"
            );
            // A change from another state does not fit it.
            if !added.is_empty() {
                assert!(
                    !change.fits(&new),
                    "{name}: an added entry is already there"
                );
            } else if !removed.is_empty() {
                assert!(!change.fits(&new), "{name}: a removed entry is not there");
            }
        }
    }
}
