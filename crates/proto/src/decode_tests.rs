use super::*;
use crate::PeerDelta;

fn wire_peer(n: u8) -> Peer {
    Peer {
        public_key: vec![n; 32],
        name: format!("p{n}"),
        endpoint: format!("192.0.2.{n}:51820"),
        allowed_ips: vec![
            format!("10.244.{n}.0/24"),
            format!("10.250.0.{n}/32"),
            format!("10.244.{n}.0/24"),
        ],
        persistent_keepalive: 25,
        preshared_key: vec![7; 32],
        node: format!("node-{n}"),
    }
}

fn snapshot_update(peers: Vec<Peer>) -> PeerUpdate {
    PeerUpdate {
        epoch: "e".into(),
        revision: 3,
        rotate_key_request: "r1".into(),
        update: Some(peer_update::Update::Snapshot(PeerSnapshot {
            peers,
            mesh: Some(MeshSettings {
                interface_name: "wgmesh0".into(),
                ..Default::default()
            }),
            tunnel_addresses: vec!["10.250.0.1/16".into()],
            pod_cidrs: vec!["10.244.1.0/24".into()],
            departure: crate::Departure::Unspecified as i32,
            members: 3,
        })),
        more_parts: false,
    }
}

fn delta_update(delta: PeerDelta) -> PeerUpdate {
    PeerUpdate {
        epoch: "e".into(),
        revision: 4,
        rotate_key_request: String::new(),
        update: Some(peer_update::Update::Delta(delta)),
        more_parts: false,
    }
}

#[test]
fn a_snapshot_decodes_typed_and_encodes_back() {
    let update = AgentUpdate::try_from(&snapshot_update(vec![wire_peer(2), wire_peer(3)])).unwrap();
    assert_eq!(update.rotate_key_request.as_deref(), Some("r1"));
    let mut config = AgentConfig::default();
    config.apply(update);
    let p2 = &config.peers[&PublicKey::from_bytes([2; 32])];
    assert_eq!(
        p2.allowed_ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.244.2.0/24", "10.250.0.2/32"],
        "sorted, once each"
    );
    assert_eq!(p2.endpoint.as_deref(), Some("192.0.2.2:51820"));
    assert_eq!(p2.preshared_key, Some(Key::from_bytes([7; 32])));
    assert_eq!(p2.node.as_deref(), Some("node-2"));
    assert_eq!(p2.persistent_keepalive, 25);

    let mut again = AgentConfig::default();
    again.apply(AgentUpdate::try_from(&snapshot(&config)).unwrap());
    assert_eq!(again, config, "what the agent saves reads back the same");
}

#[test]
fn deltas_carry_only_what_changed() {
    let update = AgentUpdate::try_from(&delta_update(PeerDelta {
        upserted: vec![wire_peer(4)],
        removed: vec![vec![2; 32]],
        ..Default::default()
    }))
    .unwrap();
    match update.change {
        AgentChange::Delta {
            upserted,
            removed,
            settings,
            addresses,
            pod_cidrs,
            members,
            allowed_ips_changes,
        } => {
            assert_eq!(upserted.len(), 1);
            assert_eq!(removed, vec![PublicKey::from_bytes([2; 32])]);
            assert_eq!(allowed_ips_changes, vec![]);
            assert_eq!(
                (settings, addresses, pod_cidrs, members),
                (None, None, None, None)
            );
        }
        other => panic!("not a delta: {other:?}"),
    }
}

#[test]
fn a_change_of_allowed_ips_is_read_sorted_and_once_each() {
    let update = AgentUpdate::try_from(&delta_update(PeerDelta {
        changed_allowed_ips: vec![crate::AllowedIpsChange {
            public_key: vec![3; 32],
            added: vec![
                "10.0.2.0/24".into(),
                "10.0.1.0/24".into(),
                "10.0.2.0/24".into(),
            ],
            removed: vec!["fd00::/64".into()],
        }],
        ..Default::default()
    }))
    .unwrap();
    let AgentChange::Delta {
        allowed_ips_changes,
        ..
    } = update.change
    else {
        panic!("not a delta");
    };
    let text = |list: &[Cidr]| list.iter().map(ToString::to_string).collect::<Vec<_>>();
    let [change] = allowed_ips_changes.as_slice() else {
        panic!("one change: {allowed_ips_changes:?}");
    };
    assert_eq!(change.public_key, PublicKey::from_bytes([3; 32]));
    assert_eq!(text(&change.added), ["10.0.1.0/24", "10.0.2.0/24"]);
    assert_eq!(text(&change.removed), ["fd00::/64"]);
}

/// Every malformed field is refused, and the error names it.
#[test]
fn malformed_fields_are_named() {
    let bad_peer = |edit: fn(&mut Peer)| {
        let mut p = wire_peer(2);
        edit(&mut p);
        snapshot_update(vec![wire_peer(1), p])
    };
    let cases: Vec<(PeerUpdate, &str)> = vec![
        (
            PeerUpdate {
                update: None,
                ..Default::default()
            },
            "update",
        ),
        (
            bad_peer(|p| p.public_key = vec![1, 2, 3]),
            "snapshot.peers[1].public_key",
        ),
        (
            bad_peer(|p| p.allowed_ips[1] = "10.0.0.0/33".into()),
            "snapshot.peers[1].allowed_ips[1]",
        ),
        (
            bad_peer(|p| p.endpoint = "no-port".into()),
            "snapshot.peers[1].endpoint",
        ),
        (
            bad_peer(|p| p.preshared_key = vec![1; 31]),
            "snapshot.peers[1].preshared_key",
        ),
        (
            bad_peer(|p| p.persistent_keepalive = 70_000),
            "snapshot.peers[1].persistent_keepalive",
        ),
        (
            delta_update(PeerDelta {
                removed: vec![vec![9; 31]],
                ..Default::default()
            }),
            "delta.removed[0]",
        ),
        (
            delta_update(PeerDelta {
                pod_cidrs: vec!["10.244.1.1/24".into()],
                ..Default::default()
            }),
            "delta.pod_cidrs[0]",
        ),
        (
            delta_update(PeerDelta {
                tunnel_addresses: vec!["10.250.0.1".into()],
                ..Default::default()
            }),
            "delta.tunnel_addresses[0]",
        ),
        (
            delta_update(PeerDelta {
                upserted: vec![Peer {
                    public_key: vec![],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            "delta.upserted[0].public_key",
        ),
        (
            changed(vec![change(vec![9; 31], &["10.0.1.0/24"], &[])]),
            "delta.changed_allowed_ips[0].public_key",
        ),
        (
            changed(vec![change(
                vec![9; 32],
                &["10.0.1.0/24", "10.0.0.0/33"],
                &[],
            )]),
            "delta.changed_allowed_ips[0].added[1]",
        ),
        (
            changed(vec![change(vec![9; 32], &[], &["bogus"])]),
            "delta.changed_allowed_ips[0].removed[0]",
        ),
        (
            changed(vec![
                change(vec![9; 32], &["10.0.1.0/24"], &[]),
                change(vec![9; 32], &["10.0.2.0/24"], &[]),
            ]),
            "delta.changed_allowed_ips[1].public_key",
        ),
        (
            delta_update(PeerDelta {
                removed: vec![vec![9; 32]],
                changed_allowed_ips: vec![change(vec![9; 32], &["10.0.1.0/24"], &[])],
                ..Default::default()
            }),
            "delta.changed_allowed_ips[0].public_key",
        ),
        (
            delta_update(PeerDelta {
                upserted: vec![wire_peer(4)],
                changed_allowed_ips: vec![change(vec![4; 32], &["10.0.1.0/24"], &[])],
                ..Default::default()
            }),
            "delta.changed_allowed_ips[0].public_key",
        ),
        (
            changed(vec![change(
                vec![9; 32],
                &["10.0.1.0/24"],
                &["10.0.1.0/24"],
            )]),
            "delta.changed_allowed_ips[0]",
        ),
    ];
    for (update, field) in cases {
        match AgentUpdate::try_from(&update) {
            Err(e) => assert_eq!(e.field, field, "{e}"),
            Ok(u) => panic!("{field}: accepted {u:?}"),
        }
    }
}

fn change(public_key: Vec<u8>, added: &[&str], removed: &[&str]) -> crate::AllowedIpsChange {
    let text = |list: &[&str]| list.iter().map(ToString::to_string).collect();
    crate::AllowedIpsChange {
        public_key,
        added: text(added),
        removed: text(removed),
    }
}

fn changed(changes: Vec<crate::AllowedIpsChange>) -> PeerUpdate {
    delta_update(PeerDelta {
        changed_allowed_ips: changes,
        ..Default::default()
    })
}

#[test]
fn unknown_departures_never_mean_leave() {
    assert_eq!(departure(99), Departure::Unspecified);
    for d in [
        Departure::Unspecified,
        Departure::MeshDeleted,
        Departure::NodeDeleted,
        Departure::NodeNotSelected,
        Departure::NotRegistered,
    ] {
        assert_eq!(departure(wire_departure(d) as i32), d);
    }
}
