//! The device's peers while one transaction (`apply_ops`) changes them.
//!
//! Every change is looked up in maps (peer by key, allowed IP by owner, receiver indices in
//! use) that start as copies of the table's, so a transaction costs time in proportion to
//! the peers it holds and the changes it makes: programming 5,000 peers in one apply is
//! 5,000 upserts, not 5,000 walks over every peer's allowed IPs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use wgmesh_core::PublicKey;

use super::handover::Handover;
use super::peers::{Identity, OwnerMap, Peer, PeerEntry, PeerTable};
use crate::PeerConfig;

/// Receiver indices are 24 bits: boringtun keeps the low 8 for its sessions.
const INDEX_MASK: u32 = 0x00FF_FFFF;

pub(crate) struct PeerEdit<'t> {
    base: &'t PeerTable,
    /// In the table's order; `None` where a peer was removed (positions stay valid).
    entries: Vec<Option<PeerEntry>>,
    by_key: HashMap<PublicKey, usize>,
    /// Which entry each allowed IP belongs to now.
    owner: OwnerMap,
    /// Receiver indices given to new peers, and those of the table's peers removed.
    added_indices: HashSet<u32>,
    removed_indices: HashSet<u32>,
    /// Entries that lost allowed IPs to another peer: their lists still hold them until
    /// `entries()` filters them by `owner`, so that a taken IP costs O(1), not a walk over
    /// the loser's list.
    stale: HashSet<usize>,
    pub handover: Handover,
}

impl<'t> PeerEdit<'t> {
    pub(crate) fn new(base: &'t PeerTable) -> PeerEdit<'t> {
        let (by_key, owner) = base.lookups();
        PeerEdit {
            base,
            entries: base
                .entries
                .iter()
                .map(|e| {
                    Some(PeerEntry {
                        config: e.config.clone(),
                        peer: Arc::clone(&e.peer),
                    })
                })
                .collect(),
            by_key,
            owner,
            added_indices: HashSet::new(),
            removed_indices: HashSet::new(),
            stale: HashSet::new(),
            handover: Handover::default(),
        }
    }

    fn index_in_use(&self, index: u32) -> bool {
        self.added_indices.contains(&index)
            || (self.base.index_in_use(index) && !self.removed_indices.contains(&index))
    }

    /// Adds a peer or changes it in place: only a new preshared key restarts its session.
    pub(crate) fn upsert(
        &mut self,
        identity: &Identity,
        next_index: &mut u32,
        mut cfg: PeerConfig,
        explicit_endpoint: bool,
    ) {
        if cfg.public_key == identity.public_key {
            tracing::warn!(peer = %cfg.public_key, "ignoring a peer with our own public key");
            return;
        }
        let mut wanted = HashSet::with_capacity(cfg.allowed_ips.len());
        cfg.allowed_ips.retain(|c| wanted.insert(*c));
        let at = match self.by_key.get(&cfg.public_key) {
            Some(&at) => at,
            None => self.entries.len(),
        };
        // An allowed IP belongs to one peer: the latest assignment takes it from the others.
        for c in &cfg.allowed_ips {
            match self.owner.insert(*c, at) {
                Some(from) if from != at => {
                    self.stale.insert(from);
                    if self
                        .entry(from)
                        .is_some_and(|e| e.peer.had_session_lately())
                    {
                        self.handover.released.insert(*c);
                    }
                }
                _ => {}
            }
        }
        if let Some(Some(e)) = self.entries.get_mut(at) {
            // What it held and no longer wants is nobody's now.
            for c in &e.config.allowed_ips {
                if !wanted.contains(c) && self.owner.get(c) == Some(&at) {
                    self.owner.remove(c);
                }
            }
            self.stale.remove(&at);
            if e.config.preshared_key != cfg.preshared_key {
                let in_use = e.peer.had_session_lately();
                e.peer.reset_session(identity, cfg.preshared_key);
                if in_use {
                    self.handover.restart.push(Arc::clone(&e.peer));
                }
            }
            if e.config.persistent_keepalive != cfg.persistent_keepalive {
                e.peer.set_keepalive(cfg.persistent_keepalive);
            }
            // A configured endpoint replaces a roamed one only when it is new (or set
            // explicitly over the UAPI), so reapplying the same config keeps roaming intact.
            if let Some(ep) = cfg.endpoint
                && (explicit_endpoint || e.config.endpoint != cfg.endpoint)
            {
                e.peer.set_endpoint(ep);
            }
            e.config = cfg;
            return;
        }
        let index = loop {
            let i = *next_index & INDEX_MASK;
            *next_index = next_index.wrapping_add(1);
            if !self.index_in_use(i) {
                self.added_indices.insert(i);
                break i;
            }
        };
        let peer = Arc::new(Peer::new(identity, &cfg, index));
        if cfg
            .allowed_ips
            .iter()
            .any(|c| self.handover.released.contains(c))
        {
            self.handover.restart.push(Arc::clone(&peer));
        }
        self.by_key.insert(cfg.public_key, at);
        self.entries.push(Some(PeerEntry { config: cfg, peer }));
    }

    pub(crate) fn remove(&mut self, key: &PublicKey) {
        let Some(at) = self.by_key.remove(key) else {
            return;
        };
        let Some(e) = self.entries.get_mut(at).and_then(Option::take) else {
            return;
        };
        if !self.added_indices.remove(&e.peer.index) {
            self.removed_indices.insert(e.peer.index);
        }
        let in_use = e.peer.had_session_lately();
        for c in &e.config.allowed_ips {
            if self.owner.get(c) == Some(&at) {
                self.owner.remove(c);
                if in_use {
                    self.handover.released.insert(*c);
                }
            }
        }
    }

    /// The device's new identity: a peer with its key cannot exist (the kernel drops it
    /// too), and every other peer's sessions start again.
    pub(crate) fn set_identity(&mut self, identity: &Identity) {
        self.remove(&identity.public_key);
        for e in self.entries.iter().flatten() {
            let in_use = e.peer.had_session_lately();
            e.peer.set_identity(identity);
            if in_use {
                self.handover.restart.push(Arc::clone(&e.peer));
            }
        }
    }

    fn entry(&self, at: usize) -> Option<&PeerEntry> {
        self.entries.get(at).and_then(Option::as_ref)
    }

    /// The peers as the transaction left them, in order, each holding only the allowed IPs
    /// it still owns.
    pub(crate) fn finish(self) -> (Vec<PeerEntry>, Handover) {
        let PeerEdit {
            entries,
            owner,
            stale,
            handover,
            ..
        } = self;
        let entries = entries
            .into_iter()
            .enumerate()
            .filter_map(|(at, e)| {
                let mut e = e?;
                if stale.contains(&at) {
                    e.config.allowed_ips.retain(|c| owner.get(c) == Some(&at));
                }
                Some(e)
            })
            .collect();
        (entries, handover)
    }
}

#[cfg(test)]
mod tests {
    use wgmesh_core::{Cidr, PrivateKey};

    use super::*;

    fn cidr(s: &str) -> Cidr {
        Cidr::parse_masked(s).unwrap()
    }

    #[test]
    fn edits_come_to_what_one_change_after_another_does() {
        // Against a plain model (a list; an upsert takes its IPs from every other peer):
        // thousands of random transactions over five keys and five prefixes.
        let identity = Identity::new(PrivateKey::from_bytes([9; 32]));
        let keys: Vec<PublicKey> = (1..=5u8)
            .map(|b| PrivateKey::from_bytes([b; 32]).public_key())
            .collect();
        let prefixes = [
            "10.0.0.0/24",
            "10.0.1.0/24",
            "10.0.0.0/16",
            "fd00::/64",
            "0.0.0.0/0",
        ]
        .map(cidr);
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut table = PeerTable::build(Arc::new(identity), 0, 0, Vec::new());
        let mut model: Vec<PeerConfig> = Vec::new();
        let mut next_index = 0;
        for round in 0..3000 {
            let identity = Arc::clone(&table.identity);
            let mut edit = PeerEdit::new(&table);
            for _ in 0..next(6) {
                let key = keys[next(5) as usize];
                if next(4) == 0 {
                    edit.remove(&key);
                    model.retain(|p| p.public_key != key);
                    continue;
                }
                let cfg = PeerConfig {
                    public_key: key,
                    endpoint: None,
                    // Sometimes one prefix twice: the device keeps it once.
                    allowed_ips: (0..next(4)).map(|_| prefixes[next(5) as usize]).collect(),
                    persistent_keepalive: next(2) as u16,
                    preshared_key: None,
                };
                edit.upsert(&identity, &mut next_index, cfg.clone(), false);
                let mut cfg = cfg;
                let mut seen = HashSet::new();
                cfg.allowed_ips.retain(|c| seen.insert(*c));
                for p in model.iter_mut().filter(|p| p.public_key != key) {
                    p.allowed_ips.retain(|c| !cfg.allowed_ips.contains(c));
                }
                match model.iter_mut().find(|p| p.public_key == key) {
                    Some(p) => *p = cfg,
                    None => model.push(cfg),
                }
            }
            let (entries, _) = edit.finish();
            let got: Vec<PeerConfig> = entries.iter().map(|e| e.config.clone()).collect();
            assert_eq!(got, model, "round {round}");
            let indices: HashSet<u32> = entries.iter().map(|e| e.peer.index).collect();
            assert_eq!(
                indices.len(),
                entries.len(),
                "round {round}: indices unique"
            );
            table = PeerTable::build(identity, 0, 0, entries);
        }
    }

    #[test]
    fn a_peer_with_our_own_key_is_ignored_and_a_new_identity_drops_it() {
        let ours = PrivateKey::from_bytes([1; 32]);
        let other = PrivateKey::from_bytes([2; 32]);
        let identity = Identity::new(ours.clone());
        let table = PeerTable::build(Arc::new(identity), 0, 0, Vec::new());
        let mut edit = PeerEdit::new(&table);
        let mut next_index = 0;
        let peer = |key: PublicKey| PeerConfig {
            public_key: key,
            endpoint: None,
            allowed_ips: vec![cidr("10.0.0.0/24")],
            persistent_keepalive: 0,
            preshared_key: None,
        };
        edit.upsert(
            &table.identity,
            &mut next_index,
            peer(ours.public_key()),
            false,
        );
        edit.upsert(
            &table.identity,
            &mut next_index,
            peer(other.public_key()),
            false,
        );
        edit.set_identity(&Identity::new(other));
        let (entries, _) = edit.finish();
        assert!(
            entries.is_empty(),
            "ours ignored, the new identity's own dropped"
        );
    }
}
