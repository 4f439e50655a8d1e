//! A WireGuard device's configuration as wgmesh programs and observes it, and the one decision
//! about it: what to change on a device, given what it reports, to make it what a node's
//! configuration wants ([`device_changes`]). The device crate (both backends) applies these.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::SystemTime;

use crate::{Cidr, Key, PrivateKey, PublicKey};

/// One peer as the device should have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    /// Where to send first; roaming replaces it with where authenticated packets come from.
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<Cidr>,
    /// Seconds; 0 is off.
    pub persistent_keepalive: u16,
    pub preshared_key: Option<Key>,
}

/// A change to the device. Changes are applied in place: other peers' sessions are never
/// touched, and a peer whose only change is its allowed IPs or endpoint keeps its session.
#[derive(Debug, Clone)]
pub enum DeviceChange {
    /// Adds the peer, or replaces the configuration of the peer with this public key.
    UpsertPeer(PeerConfig),
    RemovePeer(PublicKey),
    SetListenPort(u16),
    SetFwmark(u32),
    /// A new private key (key rotation): every session restarts.
    SetPrivateKey(PrivateKey),
}

/// What the device reports of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub config: PeerConfig,
    /// The endpoint in use now (after roaming).
    pub current_endpoint: Option<SocketAddr>,
    /// When the last handshake completed; `None` if never.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What the device reports of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    pub public_key: PublicKey,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerState>,
}

/// The changes that turn the observed device into the wanted one: remove the peers not
/// wanted (also those found on a device adopted after a restart), upsert those that differ,
/// leave the rest (and their sessions) alone; then the port (unless 0: any) and the mark.
///
/// Endpoints roam: a device reports where a peer's authenticated packets last came from, and
/// that wins over the configured one. So a wanted endpoint is pushed only when it is new to
/// the device's configuration *and* differs from what was asked last time (`previous`, what
/// the agent last applied; after a restart, what the saved configuration named), or the
/// device has no endpoint for the peer at all.
/// An unset endpoint never overrides a roamed one, and neither does the update of a peer for
/// another reason (its allowed IPs, keepalive or preshared key): it carries the endpoint the
/// device has.
pub fn device_changes(
    observed: &DeviceState,
    wanted: &[PeerConfig],
    previous: &[PeerConfig],
    listen_port: u16,
    fwmark: u32,
) -> Vec<DeviceChange> {
    let asked: BTreeMap<PublicKey, Option<SocketAddr>> = previous
        .iter()
        .map(|p| (p.public_key, p.endpoint))
        .collect();
    let have: BTreeMap<PublicKey, &PeerConfig> = observed
        .peers
        .iter()
        .map(|p| (p.config.public_key, &p.config))
        .collect();
    let want: BTreeMap<PublicKey, &PeerConfig> = wanted.iter().map(|p| (p.public_key, p)).collect();
    let mut changes: Vec<DeviceChange> = have
        .keys()
        .filter(|k| !want.contains_key(k))
        .map(|k| DeviceChange::RemovePeer(*k))
        .collect();
    for (key, w) in &want {
        let Some(h) = have.get(key) else {
            changes.push(DeviceChange::UpsertPeer((*w).clone()));
            continue;
        };
        // A device without an endpoint for the peer did not roam: it gets the wanted one.
        let push_endpoint = w.endpoint.is_some()
            && h.endpoint != w.endpoint
            && (h.endpoint.is_none() || asked.get(key).copied().flatten() != w.endpoint);
        if push_endpoint
            || !same_set(&h.allowed_ips, &w.allowed_ips)
            || h.persistent_keepalive != w.persistent_keepalive
            || h.preshared_key != w.preshared_key
        {
            // A peer updated for something else keeps the endpoint the device has (a roamed
            // one): the kernel sets whatever endpoint an update carries.
            let endpoint = if push_endpoint {
                w.endpoint
            } else {
                h.endpoint
            };
            changes.push(DeviceChange::UpsertPeer(PeerConfig {
                endpoint,
                ..(*w).clone()
            }));
        }
    }
    if listen_port != 0 && observed.listen_port != listen_port {
        changes.push(DeviceChange::SetListenPort(listen_port));
    }
    if observed.fwmark != fwmark {
        changes.push(DeviceChange::SetFwmark(fwmark));
    }
    changes
}

/// Whether two lists hold the same networks, whatever their order and repetitions.
fn same_set(a: &[Cidr], b: &[Cidr]) -> bool {
    let mut a = a.to_vec();
    let mut b = b.to_vec();
    a.sort();
    a.dedup();
    b.sort();
    b.dedup();
    a == b
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
