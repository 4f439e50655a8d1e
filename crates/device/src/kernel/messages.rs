//! Pure translation between our device model and WireGuard generic netlink messages: the
//! `WG_CMD_SET_DEVICE` messages that apply a list of changes (split to stay under a size
//! budget, as wireguard-tools does), and the `WG_CMD_GET_DEVICE` dump back into a
//! [`DeviceState`]. No I/O here, so all of it is unit-tested.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use netlink_packet_core::Emitable;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardPeerFlags,
};
use wgmesh_core::{Cidr, Key, PublicKey};

use crate::{DeviceChange, DeviceState, Error, PeerConfig, PeerState};

/// Bytes of a netlink header (16) plus a generic netlink header (4).
pub const HEADERS_LEN: usize = 20;

/// Largest netlink message we send, headers included: wireguard-tools uses the smaller of
/// the page size and 8 KiB, which the kernel always accepts.
pub const MESSAGE_BUDGET: usize = 8192;

/// Length of an attribute carrying a list of nested attributes, with no entries yet.
const NEST_HEADER_LEN: usize = 4;

/// The `WG_CMD_SET_DEVICE` messages applying `changes`, in order, to the device with
/// interface index `ifindex`, each at most `budget` bytes once framed by the netlink and
/// generic netlink headers.
///
/// - Interface-level changes (private key, listen port, fwmark; the last of each wins) go
///   in the first message; `WGDEVICE_F_REPLACE_PEERS` is never set.
/// - A peer upsert sets its persistent keepalive (0 turns it off), its endpoint when it has
///   one, and its preshared key; a preshared key of `None` is sent as 32 zero bytes (which
///   clears it) only for a peer `known` to have one. Its allowed IPs are sent, with
///   `WGPEER_F_REPLACE_ALLOWEDIPS`, only when they differ from those `known` for it: the
///   kernel replaces them by removing them all and then adding the new ones, and a packet
///   to the peer in between finds no peer (it is dropped, and its sender told the host is
///   unreachable), which a peer updated for its endpoint, keepalive or key must not suffer.
/// - A peer that does not fit in what is left of a message starts a new one; a peer whose
///   allowed IPs do not fit in a whole message continues in the next message with its public
///   key and the remaining allowed IPs, without the replace flag.
/// - A removal sets `WGPEER_F_REMOVE_ME`.
///
/// `known` is updated to what the device holds once every message is applied.
pub fn set_device_messages(
    ifindex: u32,
    changes: &[DeviceChange],
    known: &mut Known,
    budget: usize,
) -> Vec<WireguardMessage> {
    let mut private_key = None;
    let mut listen_port = None;
    let mut fwmark = None;
    for change in changes {
        match change {
            DeviceChange::SetPrivateKey(k) => private_key = Some(k.to_bytes()),
            DeviceChange::SetListenPort(p) => listen_port = Some(*p),
            DeviceChange::SetFwmark(m) => fwmark = Some(*m),
            DeviceChange::UpsertPeer(_) | DeviceChange::RemovePeer(_) => {}
        }
    }
    let mut batch = Batch::new(ifindex, budget);
    batch
        .device
        .extend(private_key.map(WireguardAttribute::PrivateKey));
    batch
        .device
        .extend(listen_port.map(WireguardAttribute::ListenPort));
    batch.device.extend(fwmark.map(WireguardAttribute::Fwmark));

    // Allowed IPs sent for a peer in this batch: the kernel took them from whoever held them,
    // so what is known of that holder is stale until the next dump.
    let mut sent_to: HashMap<Cidr, PublicKey> = HashMap::new();
    for change in changes {
        match change {
            DeviceChange::UpsertPeer(peer) => {
                let psk = match peer.preshared_key {
                    Some(k) => {
                        known.psk.insert(peer.public_key);
                        Some(*k.as_bytes())
                    }
                    None if known.psk.remove(&peer.public_key) => Some([0; 32]),
                    None => None,
                };
                let ips = network_set(&peer.allowed_ips);
                let known_ips = known.allowed_ips.get(&peer.public_key).filter(|held| {
                    !held
                        .iter()
                        .any(|c| sent_to.get(c).is_some_and(|k| *k != peer.public_key))
                });
                let change = allowed_ips_change(known_ips, &ips);
                let sent = match &change {
                    AllowedIpsChange::Keep => &[][..],
                    AllowedIpsChange::Add(added) => added.as_slice(),
                    AllowedIpsChange::Replace => ips.as_slice(),
                };
                sent_to.extend(sent.iter().map(|c| (*c, peer.public_key)));
                // The endpoint the device had at its dump is left out: the kernel keeps
                // where the peer roams to, even if that changed after the dump.
                let endpoint = peer
                    .endpoint
                    .filter(|e| known.endpoints.get(&peer.public_key) != Some(e));
                batch.upsert(peer, psk, endpoint, change);
                known.allowed_ips.insert(peer.public_key, ips);
                if let Some(e) = peer.endpoint {
                    known.endpoints.insert(peer.public_key, e);
                }
            }
            DeviceChange::RemovePeer(key) => {
                known.psk.remove(key);
                known.allowed_ips.remove(key);
                known.endpoints.remove(key);
                batch.push_whole(WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey(*key.as_bytes()),
                    WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
                ]));
            }
            DeviceChange::SetPrivateKey(_)
            | DeviceChange::SetListenPort(_)
            | DeviceChange::SetFwmark(_) => {}
        }
    }
    batch.finish()
}

/// What the device is known to hold of its peers, from its last dump ([`Known::of`]) and the
/// messages built since: which peers have a preshared key, each peer's allowed IPs, and its
/// endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    pub psk: HashSet<PublicKey>,
    /// Sorted and without repetitions ([`network_set`]).
    pub allowed_ips: HashMap<PublicKey, Vec<Cidr>>,
    /// Where the device sent to at its dump (roamed or configured), or was last told to.
    pub endpoints: HashMap<PublicKey, SocketAddr>,
}

impl Known {
    /// What a dump of the device says.
    pub fn of(state: &DeviceState) -> Known {
        Known {
            psk: state
                .peers
                .iter()
                .filter(|p| p.config.preshared_key.is_some())
                .map(|p| p.config.public_key)
                .collect(),
            allowed_ips: state
                .peers
                .iter()
                .map(|p| (p.config.public_key, network_set(&p.config.allowed_ips)))
                .collect(),
            endpoints: state
                .peers
                .iter()
                .filter_map(|p| Some((p.config.public_key, p.current_endpoint?)))
                .collect(),
        }
    }
}

/// What a peer's update does to the allowed IPs the device holds for it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum AllowedIpsChange {
    /// Leave them (the same set).
    Keep,
    /// Add these to them (the set only grew): the kernel appends without touching the
    /// others, so traffic to them never misses a route.
    Add(Vec<Cidr>),
    /// Replace them with the peer's (something was removed, or the set is not known). The
    /// kernel empties the list first: a packet for the peer in between is dropped.
    Replace,
}

/// How to take a peer's allowed IPs from `known` (sorted, as [`network_set`]) to `wanted`
/// (the same).
fn allowed_ips_change(known: Option<&Vec<Cidr>>, wanted: &[Cidr]) -> AllowedIpsChange {
    let Some(known) = known else {
        return AllowedIpsChange::Replace;
    };
    if known.as_slice() == wanted {
        return AllowedIpsChange::Keep;
    }
    // Both sorted: one walk tells whether every known one is still wanted.
    let mut added = Vec::new();
    let mut k = known.iter().peekable();
    for w in wanted {
        match k.peek() {
            Some(&&c) if c == *w => {
                k.next();
            }
            Some(&&c) if c < *w => return AllowedIpsChange::Replace,
            _ => added.push(*w),
        }
    }
    if k.next().is_some() {
        return AllowedIpsChange::Replace;
    }
    AllowedIpsChange::Add(added)
}

/// Networks as a set: sorted, without repetitions.
pub fn network_set(networks: &[Cidr]) -> Vec<Cidr> {
    let mut set = networks.to_vec();
    set.sort();
    set.dedup();
    set
}

/// The `WG_CMD_GET_DEVICE` request (sent as a dump) for interface index `ifindex`.
pub fn get_device_message(ifindex: u32) -> WireguardMessage {
    WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::IfIndex(ifindex)],
    }
}

/// Length of a message on the wire: headers plus attributes.
pub fn message_len(message: &WireguardMessage) -> usize {
    HEADERS_LEN + message.attributes.as_slice().buffer_len()
}

/// Messages under construction.
struct Batch {
    ifindex: u32,
    budget: usize,
    done: Vec<WireguardMessage>,
    /// Device attributes of the current message (the interface index first).
    device: Vec<WireguardAttribute>,
    peers: Vec<WireguardPeer>,
    /// Sum of the lengths of `peers`.
    peers_len: usize,
}

impl Batch {
    fn new(ifindex: u32, budget: usize) -> Self {
        Batch {
            ifindex,
            budget,
            done: Vec::new(),
            device: vec![WireguardAttribute::IfIndex(ifindex)],
            peers: Vec::new(),
            peers_len: 0,
        }
    }

    /// Bytes left in the current message for one more peer (its whole attribute).
    fn room(&self) -> usize {
        self.budget.saturating_sub(
            HEADERS_LEN + self.device.as_slice().buffer_len() + NEST_HEADER_LEN + self.peers_len,
        )
    }

    /// Whether the current message would carry nothing beyond the interface index.
    fn is_empty(&self) -> bool {
        self.peers.is_empty() && self.device.len() == 1
    }

    fn flush(&mut self) {
        if self.is_empty() {
            return;
        }
        let mut attributes = std::mem::replace(
            &mut self.device,
            vec![WireguardAttribute::IfIndex(self.ifindex)],
        );
        if !self.peers.is_empty() {
            attributes.push(WireguardAttribute::Peers(std::mem::take(&mut self.peers)));
        }
        self.peers_len = 0;
        self.done.push(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        });
    }

    fn push(&mut self, peer: WireguardPeer) {
        self.peers_len += peer.buffer_len();
        self.peers.push(peer);
    }

    /// Adds a peer that is never split, in a new message if it does not fit.
    fn push_whole(&mut self, peer: WireguardPeer) {
        if peer.buffer_len() > self.room() && !self.peers.is_empty() {
            self.flush();
        }
        self.push(peer);
    }

    /// A peer's attributes; its endpoint if `endpoint` is given, its allowed IPs as
    /// `change` says.
    fn upsert(
        &mut self,
        peer: &PeerConfig,
        psk: Option<[u8; 32]>,
        endpoint: Option<SocketAddr>,
        change: AllowedIpsChange,
    ) {
        let public_key = *peer.public_key.as_bytes();
        let mut head = vec![WireguardPeerAttribute::PublicKey(public_key)];
        if change == AllowedIpsChange::Replace {
            head.push(WireguardPeerAttribute::Flags(
                WireguardPeerFlags::ReplaceAllowedIps,
            ));
        }
        head.extend(psk.map(WireguardPeerAttribute::PresharedKey));
        head.extend(endpoint.map(WireguardPeerAttribute::Endpoint));
        head.push(WireguardPeerAttribute::PersistentKeepalive(
            peer.persistent_keepalive,
        ));
        let ips: Vec<WireguardAllowedIp> = match &change {
            // Without the flag and the list, the kernel leaves the allowed IPs as they are.
            AllowedIpsChange::Keep => return self.push_whole(WireguardPeer(head)),
            AllowedIpsChange::Add(added) => added.iter().map(allowed_ip).collect(),
            AllowedIpsChange::Replace => peer.allowed_ips.iter().map(allowed_ip).collect(),
        };
        let ips_len: usize = ips.as_slice().buffer_len();

        if ips.is_empty() {
            // The replace flag alone clears the peer's allowed IPs.
            self.push_whole(WireguardPeer(head));
            return;
        }
        // Keep a peer in one message whenever it fits in one, so that its allowed IPs are
        // replaced atomically; split only peers larger than a whole message (each part after
        // the first adds to what the first set).
        let whole = WireguardPeer(head.clone()).buffer_len() + NEST_HEADER_LEN + ips_len;
        if whole > self.room() && !self.peers.is_empty() {
            self.flush();
        }
        let mut rest = ips.as_slice();
        let mut attrs = head;
        loop {
            let base = WireguardPeer(attrs.clone()).buffer_len() + NEST_HEADER_LEN;
            let mut room = self.room().saturating_sub(base);
            let mut n = 0;
            while n < rest.len() && rest[n].buffer_len() <= room {
                room -= rest[n].buffer_len();
                n += 1;
            }
            if n == 0 && !self.peers.is_empty() {
                self.flush();
                continue;
            }
            // An absurdly small budget cannot hold even one allowed IP: send one anyway
            // rather than loop forever.
            let n = n.max(1);
            attrs.push(WireguardPeerAttribute::AllowedIps(rest[..n].to_vec()));
            self.push(WireguardPeer(attrs));
            rest = &rest[n..];
            if rest.is_empty() {
                return;
            }
            self.flush();
            // The continuation adds to the allowed IPs set so far: no flags.
            attrs = vec![WireguardPeerAttribute::PublicKey(public_key)];
        }
    }

    fn finish(mut self) -> Vec<WireguardMessage> {
        self.flush();
        self.done
    }
}

fn allowed_ip(cidr: &Cidr) -> WireguardAllowedIp {
    let family = if cidr.is_ipv4() {
        WireguardAddressFamily::Ipv4
    } else {
        WireguardAddressFamily::Ipv6
    };
    WireguardAllowedIp(vec![
        WireguardAllowedIpAttr::Family(family),
        WireguardAllowedIpAttr::IpAddr(cidr.addr()),
        WireguardAllowedIpAttr::Cidr(cidr.prefix_len()),
    ])
}

/// The device as described by the messages of a `WG_CMD_GET_DEVICE` dump. The kernel puts
/// the interface attributes in the first message and may continue a peer with many allowed
/// IPs at the start of the next message (same public key): those are merged.
pub fn parse_device(messages: &[WireguardMessage]) -> Result<DeviceState, Error> {
    let mut state = DeviceState {
        public_key: PublicKey::from_bytes([0; 32]),
        listen_port: 0,
        fwmark: 0,
        peers: Vec::new(),
    };
    for message in messages {
        for attribute in &message.attributes {
            match attribute {
                WireguardAttribute::PublicKey(k) => state.public_key = PublicKey::from_bytes(*k),
                WireguardAttribute::ListenPort(p) => state.listen_port = *p,
                WireguardAttribute::Fwmark(m) => state.fwmark = *m,
                WireguardAttribute::Peers(peers) => {
                    for peer in peers {
                        let parsed = parse_peer(peer)?;
                        match state.peers.last_mut() {
                            Some(last) if last.config.public_key == parsed.config.public_key => {
                                last.config.allowed_ips.extend(parsed.config.allowed_ips);
                            }
                            _ => state.peers.push(parsed),
                        }
                    }
                }
                _ => {}
            }
        }
    }
    Ok(state)
}

fn parse_peer(peer: &WireguardPeer) -> Result<PeerState, Error> {
    let mut public_key = None;
    let mut state = PeerState {
        config: PeerConfig {
            public_key: PublicKey::from_bytes([0; 32]),
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: 0,
            preshared_key: None,
        },
        current_endpoint: None,
        last_handshake: None,
        rx_bytes: 0,
        tx_bytes: 0,
    };
    for attribute in peer.iter() {
        match attribute {
            WireguardPeerAttribute::PublicKey(k) => public_key = Some(PublicKey::from_bytes(*k)),
            WireguardPeerAttribute::PresharedKey(k) => {
                state.config.preshared_key = (*k != [0; 32]).then(|| Key::from_bytes(*k));
            }
            WireguardPeerAttribute::Endpoint(e) => {
                // The kernel keeps one endpoint: the configured one until roaming replaces it.
                state.config.endpoint = Some(*e);
                state.current_endpoint = Some(*e);
            }
            WireguardPeerAttribute::PersistentKeepalive(k) => {
                state.config.persistent_keepalive = *k;
            }
            WireguardPeerAttribute::LastHandshake(t) => {
                state.last_handshake = handshake_time(t.seconds, t.nano_seconds);
            }
            WireguardPeerAttribute::RxBytes(n) => state.rx_bytes = *n,
            WireguardPeerAttribute::TxBytes(n) => state.tx_bytes = *n,
            WireguardPeerAttribute::AllowedIps(ips) => {
                for ip in ips {
                    state.config.allowed_ips.push(parse_allowed_ip(ip)?);
                }
            }
            _ => {}
        }
    }
    state.config.public_key = public_key.ok_or_else(|| {
        Error::InvalidConfig("the kernel reported a peer without a public key".into())
    })?;
    Ok(state)
}

fn parse_allowed_ip(ip: &WireguardAllowedIp) -> Result<Cidr, Error> {
    let mut addr = None;
    let mut prefix = None;
    for attribute in ip.iter() {
        match attribute {
            WireguardAllowedIpAttr::IpAddr(a) => addr = Some(*a),
            WireguardAllowedIpAttr::Cidr(c) => prefix = Some(*c),
            _ => {}
        }
    }
    let (Some(addr), Some(prefix)) = (addr, prefix) else {
        return Err(Error::InvalidConfig(
            "the kernel reported an allowed IP without an address or a prefix".into(),
        ));
    };
    let net = IpNet::new(addr, prefix).map_err(|_| {
        Error::InvalidConfig(format!(
            "the kernel reported an invalid allowed IP {addr}/{prefix}"
        ))
    })?;
    Ok(Cidr::from(net.trunc()))
}

/// A handshake time from the kernel's timespec; 0 means never.
pub fn handshake_time(seconds: i64, nanos: i64) -> Option<SystemTime> {
    if seconds == 0 && nanos == 0 {
        return None;
    }
    let secs = u64::try_from(seconds).ok()?;
    let nanos = u32::try_from(nanos).ok().filter(|n| *n < 1_000_000_000)?;
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

#[cfg(test)]
#[path = "messages_tests.rs"]
mod tests;
