//! Tests of the netlink message building: what each change encodes to, parsed back.

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
        let mut known = Known {
            psk: case.psk_before.into_iter().collect(),
            ..Known::default()
        };
        let got = set_device_messages(IFINDEX, &case.changes, &mut known, MESSAGE_BUDGET);
        assert_eq!(got, case.want, "case {:?}", case.name);
        let want_psk: HashSet<PublicKey> = case.psk_after.into_iter().collect();
        assert_eq!(
            known.psk, want_psk,
            "case {:?}: preshared key set",
            case.name
        );
    }
}

/// A peer updated for its endpoint, keepalive or preshared key, with the allowed IPs the
/// device holds (in another order), gets no `WGPEER_F_REPLACE_ALLOWEDIPS` and no allowed IPs:
/// the kernel replaces them by removing them all first, and a packet to the peer in between
/// would be dropped. Allowed IPs that differ, or a peer not known, get them.
#[test]
fn unchanged_allowed_ips_are_not_replaced() {
    let endpoint: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let dumped = PeerConfig {
        endpoint: Some(endpoint),
        ..peer(1, &["10.250.0.2/32", "10.244.1.0/24"])
    };
    let state = DeviceState {
        public_key: pk(0),
        listen_port: 51820,
        fwmark: 0,
        peers: vec![PeerState {
            config: dumped.clone(),
            current_endpoint: Some(endpoint),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }],
    };
    let moved: SocketAddr = "192.0.2.9:51820".parse().unwrap();
    let updated = PeerConfig {
        endpoint: Some(moved),
        persistent_keepalive: 25,
        ..peer(1, &["10.244.1.0/24", "10.250.0.2/32", "10.244.1.0/24"])
    };
    let mut known = Known::of(&state);
    let got = messages(&mut known, &[DeviceChange::UpsertPeer(updated.clone())]);
    assert_eq!(
        got,
        vec![set(vec![
            D::IfIndex(IFINDEX),
            D::Peers(vec![WireguardPeer(vec![
                P::PublicKey(*pk(1).as_bytes()),
                P::Endpoint(moved),
                P::PersistentKeepalive(25),
            ])]),
        ])]
    );
    // Allowed IPs that only grew are added, without the replace flag (the kernel keeps
    // the others in place), and are then what is known.
    let wider = peer(1, &["10.244.1.0/24", "10.250.0.2/32", "10.99.0.0/16"]);
    let got = messages(&mut known, &[DeviceChange::UpsertPeer(wider.clone())]);
    let sent = peers_of(&got);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].1,
        WireguardPeer(vec![
            P::PublicKey(*pk(1).as_bytes()),
            P::PersistentKeepalive(0),
            P::AllowedIps(vec![ip_attr("10.99.0.0/16")]),
        ])
    );
    assert_eq!(
        known.allowed_ips.get(&pk(1)),
        Some(&network_set(&wider.allowed_ips))
    );
    // Allowed IPs of which one went are replaced.
    let narrower = peer(1, &["10.244.1.0/24", "10.99.0.0/16"]);
    let got = messages(&mut known, &[DeviceChange::UpsertPeer(narrower.clone())]);
    let sent = peers_of(&got);
    assert!(
        sent[0]
            .1
            .contains(&P::Flags(WireguardPeerFlags::ReplaceAllowedIps)),
        "{sent:?}"
    );
    assert_eq!(
        known.allowed_ips.get(&pk(1)),
        Some(&network_set(&narrower.allowed_ips))
    );
    // A removed peer is forgotten: added again, it gets its allowed IPs.
    let _ = messages(&mut known, &[DeviceChange::RemovePeer(pk(1))]);
    let got = messages(&mut known, &[DeviceChange::UpsertPeer(wider)]);
    assert!(
        peers_of(&got)[0]
            .1
            .iter()
            .any(|a| matches!(a, P::AllowedIps(_)))
    );
}

/// The messages for `changes` with the usual interface and budget.
fn messages(known: &mut Known, changes: &[DeviceChange]) -> Vec<WireguardMessage> {
    set_device_messages(IFINDEX, changes, known, MESSAGE_BUDGET)
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
        let messages = set_device_messages(IFINDEX, &changes, &mut Known::default(), case.budget);
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
    let messages = set_device_messages(IFINDEX, &changes, &mut Known::default(), MESSAGE_BUDGET);
    let entries = peers_of(&messages);
    assert_eq!(entries.len(), 7, "no peer was split");
    assert!(messages.len() >= 3);
    assert!(messages.iter().all(|m| message_len(m) <= MESSAGE_BUDGET));
}

#[test]
fn interface_settings_only_in_the_first_message() {
    let mut changes = vec![DeviceChange::SetListenPort(51820)];
    changes.extend((0..500).map(|i| DeviceChange::UpsertPeer(peer(i, &["10.0.0.0/8"]))));
    let messages = set_device_messages(IFINDEX, &changes, &mut Known::default(), MESSAGE_BUDGET);
    assert!(messages.len() > 1);
    assert_eq!(messages[0].attributes[1], D::ListenPort(51820));
    for m in &messages[1..] {
        assert!(!m.attributes.iter().any(|a| matches!(a, D::ListenPort(_))));
    }
}

#[test]
fn removals_split_too() {
    let changes: Vec<DeviceChange> = (0..2000).map(|i| DeviceChange::RemovePeer(pk(i))).collect();
    let messages = set_device_messages(IFINDEX, &changes, &mut Known::default(), MESSAGE_BUDGET);
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

#[test]
fn an_endpoint_the_device_had_at_its_dump_is_left_out() {
    // The dump saw the peer at `roamed`; the agent's update for another reason carries that
    // endpoint (device_changes keeps a roamed one). Sending it would move the peer back if
    // it roamed again after the dump: it is left out, and the kernel keeps its own.
    let configured: SocketAddr = "192.0.2.1:51820".parse().unwrap();
    let roamed: SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let state = DeviceState {
        public_key: pk(0),
        listen_port: 51820,
        fwmark: 0,
        peers: vec![PeerState {
            config: PeerConfig {
                endpoint: Some(configured),
                ..peer(1, &["10.250.0.2/32"])
            },
            current_endpoint: Some(roamed),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }],
    };
    let mut known = Known::of(&state);
    let keepalive = PeerConfig {
        endpoint: Some(roamed),
        persistent_keepalive: 25,
        ..peer(1, &["10.250.0.2/32"])
    };
    let got = messages(&mut known, &[DeviceChange::UpsertPeer(keepalive.clone())]);
    assert_eq!(
        peers_of(&got)[0].1,
        WireguardPeer(vec![
            P::PublicKey(*pk(1).as_bytes()),
            P::PersistentKeepalive(25),
        ])
    );
    // A new endpoint is sent, and is then what the device is known to have.
    let pinned = PeerConfig {
        endpoint: Some(configured),
        ..keepalive
    };
    for (n, want_sent) in [(1, true), (2, false)] {
        let got = messages(&mut known, &[DeviceChange::UpsertPeer(pinned.clone())]);
        let sent = peers_of(&got)[0].1.0.contains(&P::Endpoint(configured));
        assert_eq!(sent, want_sent, "update {n}");
    }
    // A peer removed and added again gets its endpoint.
    let _ = messages(&mut known, &[DeviceChange::RemovePeer(pk(1))]);
    let got = messages(&mut known, &[DeviceChange::UpsertPeer(pinned)]);
    assert!(peers_of(&got)[0].1.0.contains(&P::Endpoint(configured)));
}

#[test]
fn allowed_ips_change_table() {
    let set = |v: &[&str]| network_set(&v.iter().map(|s| cidr(s)).collect::<Vec<_>>());
    let (a, b, c) = ("10.0.1.0/24", "10.0.2.0/24", "10.0.3.0/24");
    // (case, what the device is known to hold, what is wanted, the change)
    type Case<'a> = (
        &'a str,
        Option<&'a [&'a str]>,
        &'a [&'a str],
        AllowedIpsChange,
    );
    let cases: &[Case] = &[
        ("unknown peer", None, &[a], AllowedIpsChange::Replace),
        ("the same", Some(&[a, b]), &[b, a], AllowedIpsChange::Keep),
        (
            "grew at the end",
            Some(&[a]),
            &[a, c],
            AllowedIpsChange::Add(set(&[c])),
        ),
        (
            "grew in the middle",
            Some(&[a, c]),
            &[a, b, c],
            AllowedIpsChange::Add(set(&[b])),
        ),
        (
            "grew from none",
            Some(&[]),
            &[b],
            AllowedIpsChange::Add(set(&[b])),
        ),
        ("lost one", Some(&[a, b]), &[a], AllowedIpsChange::Replace),
        (
            "lost the first, gained one",
            Some(&[a, b]),
            &[b, c],
            AllowedIpsChange::Replace,
        ),
        ("lost all", Some(&[a]), &[], AllowedIpsChange::Replace),
    ];
    for (case, known, wanted, want) in cases {
        let known = known.map(set);
        assert_eq!(
            allowed_ips_change(known.as_ref(), &set(wanted)),
            *want,
            "{case}"
        );
    }
}

#[test]
fn an_allowed_ip_taken_earlier_in_the_batch_is_won_back_by_a_replace() {
    // A holds X. B takes X, then A wants X and Y back in the same batch: appending Y alone
    // would leave X with B (the kernel moved it), so A's list is replaced.
    let (x, y) = ("10.0.1.0/24", "10.0.2.0/24");
    let mut known = Known {
        allowed_ips: [(pk(1), network_set(&[cidr(x)])), (pk(2), Vec::new())].into(),
        ..Known::default()
    };
    let got = messages(
        &mut known,
        &[
            DeviceChange::UpsertPeer(peer(2, &[x])),
            DeviceChange::UpsertPeer(peer(1, &[x, y])),
        ],
    );
    let sent = peers_of(&got);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(
        sent[1]
            .1
            .contains(&P::Flags(WireguardPeerFlags::ReplaceAllowedIps)),
        "{sent:?}"
    );
}
