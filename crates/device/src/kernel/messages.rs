//! Pure translation between our device model and WireGuard generic netlink messages: the
//! `WG_CMD_SET_DEVICE` messages that apply a list of changes (split to stay under a size
//! budget, as wireguard-tools does), and the `WG_CMD_GET_DEVICE` dump back into a
//! [`DeviceState`]. No I/O here, so all of it is unit-tested.

use std::collections::HashSet;
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
/// - A peer upsert sets `WGPEER_F_REPLACE_ALLOWEDIPS` with its allowed IPs, its persistent
///   keepalive (0 turns it off), its endpoint when it has one, and its preshared key; a
///   preshared key of `None` is sent as 32 zero bytes (which clears it) only for a peer in
///   `psk_peers`, the peers known to have one.
/// - A peer that does not fit in what is left of a message starts a new one; a peer whose
///   allowed IPs do not fit in a whole message continues in the next message with its public
///   key and the remaining allowed IPs, without the replace flag.
/// - A removal sets `WGPEER_F_REMOVE_ME`.
///
/// `psk_peers` is updated to what the device holds once every message is applied.
pub fn set_device_messages(
    ifindex: u32,
    changes: &[DeviceChange],
    psk_peers: &mut HashSet<PublicKey>,
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

    for change in changes {
        match change {
            DeviceChange::UpsertPeer(peer) => {
                let psk = match peer.preshared_key {
                    Some(k) => {
                        psk_peers.insert(peer.public_key);
                        Some(*k.as_bytes())
                    }
                    None if psk_peers.remove(&peer.public_key) => Some([0; 32]),
                    None => None,
                };
                batch.upsert(peer, psk);
            }
            DeviceChange::RemovePeer(key) => {
                psk_peers.remove(key);
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

    fn upsert(&mut self, peer: &PeerConfig, psk: Option<[u8; 32]>) {
        let public_key = *peer.public_key.as_bytes();
        let mut head = vec![
            WireguardPeerAttribute::PublicKey(public_key),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        ];
        head.extend(psk.map(WireguardPeerAttribute::PresharedKey));
        head.extend(peer.endpoint.map(WireguardPeerAttribute::Endpoint));
        head.push(WireguardPeerAttribute::PersistentKeepalive(
            peer.persistent_keepalive,
        ));
        let ips: Vec<WireguardAllowedIp> = peer.allowed_ips.iter().map(allowed_ip).collect();
        let ips_len: usize = ips.as_slice().buffer_len();

        if ips.is_empty() {
            // The replace flag alone clears the peer's allowed IPs.
            self.push_whole(WireguardPeer(head));
            return;
        }
        // Keep a peer in one message whenever it fits in one, so that its allowed IPs are
        // replaced atomically; split only peers larger than a whole message.
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
mod tests {
    use std::net::SocketAddr;

    use netlink_packet_core::ParseableParametrized;
    use netlink_packet_generic::GenlHeader;
    use netlink_packet_wireguard::WireguardTimeSpec;
    use wgmesh_core::PrivateKey;

    use super::*;

    fn pk(n: u16) -> PublicKey {
        let mut b = [0u8; 32];
        b[..2].copy_from_slice(&n.to_be_bytes());
        b[31] = 1;
        PublicKey::from_bytes(b)
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn peer(n: u16, ips: &[&str]) -> PeerConfig {
        PeerConfig {
            public_key: pk(n),
            endpoint: None,
            allowed_ips: ips.iter().map(|s| cidr(s)).collect(),
            persistent_keepalive: 0,
            preshared_key: None,
        }
    }

    fn ip_attr(s: &str) -> WireguardAllowedIp {
        allowed_ip(&cidr(s))
    }

    fn set(attributes: Vec<WireguardAttribute>) -> WireguardMessage {
        WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        }
    }

    use WireguardAttribute as D;
    use WireguardPeerAttribute as P;

    const IFINDEX: u32 = 7;

    #[test]
    fn set_device_messages_table() {
        let private = PrivateKey::from_bytes([9; 32]);
        let psk = Key::from_bytes([5; 32]);
        let endpoint: SocketAddr = "192.0.2.1:51820".parse().unwrap();
        let full = PeerConfig {
            endpoint: Some(endpoint),
            persistent_keepalive: 25,
            preshared_key: Some(psk),
            ..peer(1, &["10.250.0.2/32", "fd00::/64"])
        };
        struct Case {
            name: &'static str,
            changes: Vec<DeviceChange>,
            psk_before: Vec<PublicKey>,
            want: Vec<WireguardMessage>,
            psk_after: Vec<PublicKey>,
        }
        let cases = vec![
            Case {
                name: "nothing to do",
                changes: vec![],
                psk_before: vec![],
                want: vec![],
                psk_after: vec![],
            },
            Case {
                name: "interface settings, last one wins",
                changes: vec![
                    DeviceChange::SetListenPort(1),
                    DeviceChange::SetFwmark(0x51820),
                    DeviceChange::SetPrivateKey(private.clone()),
                    DeviceChange::SetListenPort(51820),
                ],
                psk_before: vec![],
                want: vec![set(vec![
                    D::IfIndex(IFINDEX),
                    D::PrivateKey(private.to_bytes()),
                    D::ListenPort(51820),
                    D::Fwmark(0x51820),
                ])],
                psk_after: vec![],
            },
            Case {
                name: "upsert with everything",
                changes: vec![DeviceChange::UpsertPeer(full.clone())],
                psk_before: vec![],
                want: vec![set(vec![
                    D::IfIndex(IFINDEX),
                    D::Peers(vec![WireguardPeer(vec![
                        P::PublicKey(*pk(1).as_bytes()),
                        P::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                        P::PresharedKey([5; 32]),
                        P::Endpoint(endpoint),
                        P::PersistentKeepalive(25),
                        P::AllowedIps(vec![ip_attr("10.250.0.2/32"), ip_attr("fd00::/64")]),
                    ])]),
                ])],
                psk_after: vec![pk(1)],
            },
            Case {
                name: "no preshared key and never had one: not sent",
                changes: vec![DeviceChange::UpsertPeer(peer(2, &["10.0.0.0/8"]))],
                psk_before: vec![pk(1)],
                want: vec![set(vec![
                    D::IfIndex(IFINDEX),
                    D::Peers(vec![WireguardPeer(vec![
                        P::PublicKey(*pk(2).as_bytes()),
                        P::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                        P::PersistentKeepalive(0),
                        P::AllowedIps(vec![ip_attr("10.0.0.0/8")]),
                    ])]),
                ])],
                psk_after: vec![pk(1)],
            },
            Case {
                name: "preshared key dropped: cleared with zeros",
                changes: vec![DeviceChange::UpsertPeer(peer(1, &["10.0.0.1/32"]))],
                psk_before: vec![pk(1)],
                want: vec![set(vec![
                    D::IfIndex(IFINDEX),
                    D::Peers(vec![WireguardPeer(vec![
                        P::PublicKey(*pk(1).as_bytes()),
                        P::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                        P::PresharedKey([0; 32]),
                        P::PersistentKeepalive(0),
                        P::AllowedIps(vec![ip_attr("10.0.0.1/32")]),
                    ])]),
                ])],
                psk_after: vec![],
            },
            Case {
                name: "no allowed IPs: the replace flag alone clears them",
                changes: vec![DeviceChange::UpsertPeer(peer(3, &[]))],
                psk_before: vec![],
                want: vec![set(vec![
                    D::IfIndex(IFINDEX),
                    D::Peers(vec![WireguardPeer(vec![
                        P::PublicKey(*pk(3).as_bytes()),
                        P::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                        P::PersistentKeepalive(0),
                    ])]),
                ])],
                psk_after: vec![],
            },
            Case {
                name: "removal, in order with an upsert, forgets the preshared key",
                changes: vec![
                    DeviceChange::RemovePeer(pk(1)),
                    DeviceChange::UpsertPeer(peer(4, &["10.4.0.0/16"])),
                    DeviceChange::SetFwmark(3),
                ],
                psk_before: vec![pk(1)],
                want: vec![set(vec![
                    D::IfIndex(IFINDEX),
                    D::Fwmark(3),
                    D::Peers(vec![
                        WireguardPeer(vec![
                            P::PublicKey(*pk(1).as_bytes()),
                            P::Flags(WireguardPeerFlags::RemoveMe),
                        ]),
                        WireguardPeer(vec![
                            P::PublicKey(*pk(4).as_bytes()),
                            P::Flags(WireguardPeerFlags::ReplaceAllowedIps),
                            P::PersistentKeepalive(0),
                            P::AllowedIps(vec![ip_attr("10.4.0.0/16")]),
                        ]),
                    ]),
                ])],
                psk_after: vec![],
            },
        ];
        for case in cases {
            let mut psk: HashSet<PublicKey> = case.psk_before.into_iter().collect();
            let got = set_device_messages(IFINDEX, &case.changes, &mut psk, MESSAGE_BUDGET);
            assert_eq!(got, case.want, "case {:?}", case.name);
            let want_psk: HashSet<PublicKey> = case.psk_after.into_iter().collect();
            assert_eq!(psk, want_psk, "case {:?}: preshared key set", case.name);
        }
    }

    /// Every peer's attributes, in message order, with the message number.
    fn peers_of(messages: &[WireguardMessage]) -> Vec<(usize, WireguardPeer)> {
        let mut out = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            assert_eq!(m.cmd, WireguardCmd::SetDevice);
            assert_eq!(m.attributes[0], D::IfIndex(IFINDEX), "message {i}");
            for a in &m.attributes {
                if let D::Peers(peers) = a {
                    out.extend(peers.iter().cloned().map(|p| (i, p)));
                }
                assert!(
                    !matches!(a, D::Flags(_)),
                    "REPLACE_PEERS or other device flags are never sent"
                );
            }
        }
        out
    }

    fn flags(p: &WireguardPeer) -> Option<WireguardPeerFlags> {
        p.iter().find_map(|a| match a {
            P::Flags(f) => Some(*f),
            _ => None,
        })
    }

    fn key_of(p: &WireguardPeer) -> [u8; 32] {
        p.iter()
            .find_map(|a| match a {
                P::PublicKey(k) => Some(*k),
                _ => None,
            })
            .expect("every peer has its public key")
    }

    fn ips_of(p: &WireguardPeer) -> Vec<WireguardAllowedIp> {
        p.iter()
            .find_map(|a| match a {
                P::AllowedIps(v) => Some(v.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// Encodes a message as the kernel receives it and decodes it back.
    fn wire_roundtrip(m: &WireguardMessage) -> (usize, WireguardMessage) {
        let mut genl = netlink_packet_generic::GenlMessage::from_payload(m.clone());
        genl.set_resolved_family_id(0x20);
        let mut nl = netlink_packet_core::NetlinkMessage::from(genl);
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        let header = GenlHeader { cmd: 1, version: 1 };
        let back = WireguardMessage::parse_with_param(&buf[HEADERS_LEN..], header).unwrap();
        (nl.header.length as usize, back)
    }

    #[test]
    fn splitting_table() {
        fn v4(i: usize, j: usize) -> String {
            format!("10.{}.{}.{}/32", i / 250, i % 250, j)
        }
        struct Case {
            name: &'static str,
            peers: Vec<PeerConfig>,
            budget: usize,
            min_messages: usize,
        }
        let many: Vec<PeerConfig> = (0..1000)
            .map(|i| PeerConfig {
                endpoint: Some(SocketAddr::from(([198, 51, 100, (i % 250) as u8], 51820))),
                persistent_keepalive: 25,
                ..peer(
                    i as u16,
                    &[&v4(i, 1), &v4(i, 2), &format!("fd00:{i:x}::/64")],
                )
            })
            .collect();
        let big_ips: Vec<String> = (0..1000).map(|j| v4(j, 9)).collect();
        let big_refs: Vec<&str> = big_ips.iter().map(String::as_str).collect();
        let cases = vec![
            Case {
                name: "1000 peers with 3 allowed IPs",
                peers: many.clone(),
                budget: MESSAGE_BUDGET,
                min_messages: 10,
            },
            Case {
                name: "one peer with 1000 allowed IPs",
                peers: vec![peer(1, &big_refs)],
                budget: MESSAGE_BUDGET,
                min_messages: 4,
            },
            Case {
                name: "small peers around a big one, small budget",
                peers: vec![
                    peer(1, &["10.0.0.1/32"]),
                    peer(2, &big_refs[..100]),
                    peer(3, &["10.0.0.3/32"]),
                ],
                budget: 1024,
                min_messages: 3,
            },
        ];
        for case in cases {
            let changes: Vec<DeviceChange> = case
                .peers
                .iter()
                .cloned()
                .map(DeviceChange::UpsertPeer)
                .collect();
            let messages = set_device_messages(IFINDEX, &changes, &mut HashSet::new(), case.budget);
            assert!(
                messages.len() >= case.min_messages,
                "case {:?}: {} messages",
                case.name,
                messages.len()
            );
            for (i, m) in messages.iter().enumerate() {
                let (wire_len, back) = wire_roundtrip(m);
                assert_eq!(wire_len, message_len(m), "case {:?}", case.name);
                assert!(
                    wire_len <= case.budget,
                    "case {:?}: message {i} is {wire_len} bytes",
                    case.name
                );
                assert_eq!(&back, m, "case {:?}: message {i} round trip", case.name);
            }
            // Every peer appears, in order; a peer's first part has the replace flag, its
            // continuations (at the start of the next messages) have none, and together
            // they carry its allowed IPs exactly once, in order.
            let entries = peers_of(&messages);
            let mut it = entries.iter().peekable();
            for want in &case.peers {
                let (first_msg, first) = it.next().expect("peer missing");
                assert_eq!(key_of(first), *want.public_key.as_bytes());
                assert_eq!(flags(first), Some(WireguardPeerFlags::ReplaceAllowedIps));
                let mut ips = ips_of(first);
                let mut last_msg = *first_msg;
                while let Some((msg, cont)) = it.peek() {
                    if key_of(cont) != *want.public_key.as_bytes() {
                        break;
                    }
                    assert_eq!(*msg, last_msg + 1, "a continuation opens the next message");
                    assert_eq!(flags(cont), None, "continuations do not replace");
                    assert_eq!(cont.len(), 2, "continuations: public key and allowed IPs");
                    ips.extend(ips_of(cont));
                    last_msg = *msg;
                    it.next();
                }
                let want_ips: Vec<_> = want.allowed_ips.iter().map(allowed_ip).collect();
                assert_eq!(ips, want_ips, "case {:?}", case.name);
            }
            assert!(it.next().is_none(), "case {:?}: extra peers", case.name);
        }
    }

    #[test]
    fn peers_that_fit_whole_are_not_split() {
        // Each peer is about 1/3 of the budget: two per message, never split.
        let ips: Vec<String> = (0..90).map(|j| format!("10.1.{j}.0/24")).collect();
        let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        let changes: Vec<DeviceChange> = (0..7)
            .map(|i| DeviceChange::UpsertPeer(peer(i, &refs)))
            .collect();
        let messages = set_device_messages(IFINDEX, &changes, &mut HashSet::new(), MESSAGE_BUDGET);
        let entries = peers_of(&messages);
        assert_eq!(entries.len(), 7, "no peer was split");
        assert!(messages.len() >= 3);
        assert!(messages.iter().all(|m| message_len(m) <= MESSAGE_BUDGET));
    }

    #[test]
    fn interface_settings_only_in_the_first_message() {
        let mut changes = vec![DeviceChange::SetListenPort(51820)];
        changes.extend((0..500).map(|i| DeviceChange::UpsertPeer(peer(i, &["10.0.0.0/8"]))));
        let messages = set_device_messages(IFINDEX, &changes, &mut HashSet::new(), MESSAGE_BUDGET);
        assert!(messages.len() > 1);
        assert_eq!(messages[0].attributes[1], D::ListenPort(51820));
        for m in &messages[1..] {
            assert!(!m.attributes.iter().any(|a| matches!(a, D::ListenPort(_))));
        }
    }

    #[test]
    fn removals_split_too() {
        let changes: Vec<DeviceChange> =
            (0..2000).map(|i| DeviceChange::RemovePeer(pk(i))).collect();
        let messages = set_device_messages(IFINDEX, &changes, &mut HashSet::new(), MESSAGE_BUDGET);
        assert!(messages.len() > 1);
        assert!(messages.iter().all(|m| message_len(m) <= MESSAGE_BUDGET));
        let entries = peers_of(&messages);
        assert_eq!(entries.len(), 2000);
        assert!(
            entries
                .iter()
                .all(|(_, p)| flags(p) == Some(WireguardPeerFlags::RemoveMe))
        );
    }

    #[test]
    fn parse_device_merges_split_peers_and_reads_handshakes() {
        let endpoint: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        let first = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![
                D::IfIndex(IFINDEX),
                D::IfName("wgmesh0".into()),
                D::PublicKey(*pk(100).as_bytes()),
                D::ListenPort(51820),
                D::Fwmark(0x51820),
                D::Peers(vec![
                    WireguardPeer(vec![
                        P::PublicKey(*pk(1).as_bytes()),
                        P::PresharedKey([0; 32]),
                        P::LastHandshake(WireguardTimeSpec::default()),
                        P::PersistentKeepalive(0),
                        P::RxBytes(0),
                        P::TxBytes(0),
                        P::AllowedIps(vec![ip_attr("10.0.0.1/32")]),
                    ]),
                    WireguardPeer(vec![
                        P::PublicKey(*pk(2).as_bytes()),
                        P::PresharedKey([7; 32]),
                        P::Endpoint(endpoint),
                        P::LastHandshake(WireguardTimeSpec {
                            seconds: 1_700_000_000,
                            nano_seconds: 5,
                        }),
                        P::PersistentKeepalive(25),
                        P::RxBytes(10),
                        P::TxBytes(20),
                        P::AllowedIps(vec![ip_attr("10.0.0.2/32")]),
                    ]),
                ]),
            ],
        };
        let second = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![
                D::IfIndex(IFINDEX),
                D::Peers(vec![
                    WireguardPeer(vec![
                        P::PublicKey(*pk(2).as_bytes()),
                        P::AllowedIps(vec![ip_attr("fd00::/64")]),
                    ]),
                    WireguardPeer(vec![P::PublicKey(*pk(3).as_bytes())]),
                ]),
            ],
        };
        let state = parse_device(&[first, second]).unwrap();
        assert_eq!(state.public_key, pk(100));
        assert_eq!(state.listen_port, 51820);
        assert_eq!(state.fwmark, 0x51820);
        assert_eq!(state.peers.len(), 3);
        let p1 = &state.peers[0];
        assert_eq!(p1.config.public_key, pk(1));
        assert_eq!(p1.config.preshared_key, None);
        assert_eq!(p1.last_handshake, None);
        assert_eq!(p1.config.endpoint, None);
        let p2 = &state.peers[1];
        assert_eq!(p2.config.preshared_key, Some(Key::from_bytes([7; 32])));
        assert_eq!(
            p2.last_handshake,
            Some(UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert_eq!(p2.current_endpoint, Some(endpoint));
        assert_eq!(p2.config.persistent_keepalive, 25);
        assert_eq!((p2.rx_bytes, p2.tx_bytes), (10, 20));
        assert_eq!(
            p2.config.allowed_ips,
            vec![cidr("10.0.0.2/32"), cidr("fd00::/64")]
        );
        assert_eq!(state.peers[2].config.public_key, pk(3));
    }

    #[test]
    fn parse_device_rejects_a_peer_without_key() {
        let m = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![D::Peers(vec![WireguardPeer(vec![P::RxBytes(1)])])],
        };
        assert!(parse_device(&[m]).is_err());
    }

    #[test]
    fn handshake_times() {
        assert_eq!(handshake_time(0, 0), None);
        assert_eq!(handshake_time(-1, 0), None);
        assert_eq!(handshake_time(1, 2_000_000_000), None);
        assert_eq!(handshake_time(3, 4), Some(UNIX_EPOCH + Duration::new(3, 4)));
    }
}
