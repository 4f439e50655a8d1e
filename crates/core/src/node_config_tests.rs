//! Table-driven tests of a node's view and the snapshot-or-delta rule.

use super::*;
use crate::desired::tests::{self as fixtures, key};
use crate::desired::{MeshInput, NodeInput, PeerInput, SecretInput, compute};

type Settings = &'static str;

/// Node `n<n>` with pod CIDR 10.244.n.0/24 and InternalIP 192.168.0.n, and its peer (key n,
/// tunnel address 10.250.0.n, registered at 192.168.0.n:51820).
fn node(n: u8) -> NodeInput {
    fixtures::node_at(&format!("n{n}"), n, &format!("10.244.{n}.0/24"))
}

fn node_peer(n: u8) -> PeerInput {
    fixtures::node_peer(&format!("n{n}"), n)
}

/// A mesh of nodes 1..=count, optionally with a mesh secret.
fn mesh_of(
    count: u8,
    edit: impl Fn(&mut MeshInput, &mut Vec<NodeInput>, &mut Vec<PeerInput>),
) -> Arc<DesiredMesh> {
    let mut mesh = fixtures::mesh();
    let mut nodes: Vec<NodeInput> = (1..=count).map(node).collect();
    let mut peers: Vec<PeerInput> = (1..=count).map(node_peer).collect();
    edit(&mut mesh, &mut nodes, &mut peers);
    Arc::new(compute(&mesh, &nodes, &peers))
}

fn plain(count: u8) -> Arc<DesiredMesh> {
    mesh_of(count, |_, _, _| {})
}

fn view(desired: &Arc<DesiredMesh>, settings: Settings) -> NodeConfig<Settings> {
    NodeConfig::of("n1", Some(Arc::new(settings)), desired.clone())
}

/// What an update is, in short: "snapshot", "none", or "delta +keys -keys [settings]
/// [addresses] [pod-cidrs]".
fn summary(update: Option<NodeUpdate<Settings>>) -> String {
    match update {
        None => "none".into(),
        Some(NodeUpdate::Snapshot) => "snapshot".into(),
        Some(NodeUpdate::Delta(d)) => {
            let mut s = String::from("delta");
            for p in &d.upserted {
                s += &format!(" +{}", p.public_key.as_bytes()[0]);
            }
            for k in &d.removed {
                s += &format!(" -{}", k.as_bytes()[0]);
            }
            if let Some(settings) = &d.settings {
                s += &format!(" settings={settings}");
            }
            if d.addresses_changed {
                s += " addresses";
            }
            if d.pod_cidrs_changed {
                s += " pod-cidrs";
            }
            s
        }
    }
}

#[test]
fn a_view_leaves_the_node_out_and_shares_the_entries() {
    let desired = plain(3);
    let n1 = view(&desired, "s");
    let n2 = NodeConfig::of("n2", Some(Arc::new("s")), desired.clone());
    let keys = |v: &NodeConfig<Settings>| v.peers().map(|p| p.public_key).collect::<Vec<_>>();
    assert_eq!(keys(&n1), [key(2), key(3)]);
    assert_eq!(keys(&n2), [key(1), key(3)]);
    assert_eq!(n1.peer_count(), 2);
    let three_at_1 = n1.peers().find(|p| p.public_key == key(3)).unwrap();
    let three_at_2 = n2.peers().find(|p| p.public_key == key(3)).unwrap();
    assert!(
        Arc::ptr_eq(three_at_1, three_at_2),
        "one entry per peer, shared by every view"
    );
    let outsider = NodeConfig::of("n9", Some(Arc::new("s")), desired);
    assert_eq!((outsider.peer_count(), outsider.peers().count()), (0, 0));
}

#[test]
fn preshared_keys_are_derived_per_pair_when_encoding() {
    let secret = |m: &mut MeshInput, _: &mut Vec<NodeInput>, _: &mut Vec<PeerInput>| {
        m.preshared_key = Some(SecretInput::Present(b"mesh secret".to_vec()));
    };
    let desired = mesh_of(3, secret);
    let n1 = view(&desired, "s");
    let n2 = NodeConfig::<Settings>::of("n2", None, desired.clone());
    let peer = |v: &NodeConfig<Settings>, n: u8| {
        v.peers().find(|p| p.public_key == key(n)).unwrap().clone()
    };
    let k12 = n1.preshared_key(&peer(&n1, 2)).expect("derived");
    assert_eq!(
        Some(k12),
        n2.preshared_key(&peer(&n2, 1)),
        "both ends derive the same key"
    );
    assert_ne!(
        Some(k12),
        n1.preshared_key(&peer(&n1, 3)),
        "no two pairs share one"
    );
    assert_eq!(
        view(&plain(3), "s").preshared_key(&peer(&view(&plain(3), "s"), 2)),
        None
    );
}

#[test]
fn next_update_table() {
    struct Case {
        name: &'static str,
        sent: Option<(Arc<DesiredMesh>, Settings)>,
        now: (Arc<DesiredMesh>, Settings),
        want: &'static str,
    }
    let base = plain(3);
    let cases = [
        Case {
            name: "the first message is a snapshot",
            sent: None,
            now: (base.clone(), "s"),
            want: "snapshot",
        },
        Case {
            name: "nothing changed: nothing is sent",
            sent: Some((base.clone(), "s")),
            now: (plain(3), "s"),
            want: "none",
        },
        Case {
            name: "a node joins: one upsert",
            sent: Some((base.clone(), "s")),
            now: (plain(4), "s"),
            want: "delta +4",
        },
        Case {
            name: "a node leaves: one removal",
            sent: Some((base.clone(), "s")),
            now: (plain(2), "s"),
            want: "delta -3",
        },
        Case {
            name: "settings change alone",
            sent: Some((base.clone(), "s")),
            now: (base.clone(), "t"),
            want: "delta settings=t",
        },
        Case {
            name: "a peer's endpoint changes: that peer only",
            sent: Some((base.clone(), "s")),
            now: (
                mesh_of(3, |_, _, p| {
                    p[2].endpoint = Some("192.168.0.3:51821".into())
                }),
                "s",
            ),
            want: "delta +3",
        },
        Case {
            name: "our own tunnel address changes",
            sent: Some((base.clone(), "s")),
            now: (
                mesh_of(3, |_, _, p| {
                    p[0].tunnel_addresses = vec!["10.250.0.99".parse().unwrap()]
                }),
                "s",
            ),
            want: "delta addresses",
        },
        Case {
            name: "our pod CIDRs change",
            sent: Some((base.clone(), "s")),
            now: (
                mesh_of(3, |_, n, _| {
                    n[0].pod_cidrs = vec!["10.245.1.0/24".parse().unwrap()]
                }),
                "s",
            ),
            want: "delta pod-cidrs",
        },
        Case {
            name: "our key changes: every derived key changes, a snapshot",
            sent: Some((base.clone(), "s")),
            now: (mesh_of(3, |_, _, p| p[0].public_key = key(11)), "s"),
            want: "snapshot",
        },
        Case {
            name: "the mesh secret appears: a snapshot",
            sent: Some((base.clone(), "s")),
            now: (
                mesh_of(3, |m, _, _| {
                    m.preshared_key = Some(SecretInput::Present(b"x".to_vec()))
                }),
                "s",
            ),
            want: "snapshot",
        },
        Case {
            name: "far behind: a snapshot is smaller than 38 changes for 19 peers",
            sent: Some((plain(20), "s")),
            now: (
                mesh_of(20, |_, _, p| {
                    for peer in p.iter_mut().skip(1) {
                        peer.public_key = key(100 + peer.public_key.as_bytes()[0]);
                    }
                }),
                "s",
            ),
            want: "snapshot",
        },
        Case {
            name: "many joins at once are still a delta while smaller",
            sent: Some((plain(2), "s")),
            now: (plain(20), "s"),
            want: "delta +3 +4 +5 +6 +7 +8 +9 +10 +11 +12 +13 +14 +15 +16 +17 +18 +19 +20",
        },
        Case {
            name: "we leave the mesh: a snapshot of nothing",
            sent: Some((base.clone(), "s")),
            now: (mesh_of(3, |_, n, _| n[0].selected = false), "s"),
            want: "snapshot",
        },
    ];
    for case in cases {
        let sent = case.sent.map(|(d, s)| view(&d, s));
        let now = view(&case.now.0, case.now.1);
        assert_eq!(
            summary(next_update(sent.as_ref(), &now)),
            case.want,
            "{}",
            case.name
        );
    }
}

/// Why a node is not a member, as its view says: deselected, not registered yet, deleted
/// (absent from the Nodes the mesh was computed from), or the mesh gone; a change of reason is
/// sent as a snapshot.
#[test]
fn departures_per_node_and_their_snapshots() {
    let desired = mesh_of(3, |_, nodes, peers| {
        nodes[1].selected = false; // n2
        peers.retain(|p| p.node.as_deref() != Some("n3")); // n3 not registered
        nodes.push(node(9)); // n9, never registered either
    });
    let of = |node: &str| NodeConfig::<Settings>::of(node, Some(Arc::new("s")), desired.clone());
    // node, expected departure
    for (node, want) in [
        ("n1", Departure::Unspecified),
        ("n2", Departure::NodeNotSelected),
        ("n3", Departure::NotRegistered),
        ("n9", Departure::NotRegistered),
        ("n7", Departure::NodeDeleted),
    ] {
        assert_eq!(of(node).departure, want, "{node}");
    }
    assert_eq!(
        NodeConfig::<Settings>::mesh_deleted().departure,
        Departure::MeshDeleted
    );

    // A member whose Node goes: a snapshot that says so.
    let before = view(&plain(3), "s");
    let gone = mesh_of(3, |_, nodes, peers| {
        nodes.retain(|n| n.name != "n1");
        peers.retain(|p| p.node.as_deref() != Some("n1"));
    });
    let after = view(&gone, "s");
    assert_eq!(after.departure, Departure::NodeDeleted);
    assert_eq!(summary(next_update(Some(&before), &after)), "snapshot");
    // The mesh then goes too: another snapshot; and nothing more after that.
    let deleted = NodeConfig::<Settings>::mesh_deleted();
    assert_eq!(summary(next_update(Some(&after), &deleted)), "snapshot");
    assert_eq!(summary(next_update(Some(&deleted), &deleted)), "none");
}

#[test]
fn a_node_behind_nat_gets_the_relay_again_when_another_one_joins() {
    // n1 is the relay; n2 and n3 are behind NAT, then n4 joins behind NAT too.
    let natted = |upto: u8| {
        mesh_of(upto, |_, nodes, _| {
            for n in nodes.iter_mut().filter(|n| n.name != "n1") {
                n.behind_nat = true;
            }
        })
    };
    let (before, after) = (natted(3), natted(4));
    let of = |d: &Arc<DesiredMesh>| NodeConfig::of("n2", Some(Arc::new("s")), d.clone());
    let (sent, now) = (of(&before), of(&after));
    let (all, hinted) = (next_update(Some(&sent), &now), {
        let changed = crate::diff::diff_peer_sets(&before.nat_peers, &after.nat_peers, None);
        let keys = changed
            .upserted
            .iter()
            .map(|p| p.public_key)
            .chain(changed.removed)
            .collect();
        next_update_within(Some(&sent), &now, Some(&keys))
    });
    // Only the relay, whose allowed IPs now carry n4's networks; n4 is no direct peer.
    assert_eq!(summary(all), "delta +1");
    assert_eq!(summary(hinted), "delta +1");
    let relay = now.peers().find(|p| p.public_key == key(1)).unwrap();
    let sent_relay: Vec<String> = now
        .as_sent(relay)
        .allowed_ips
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        sent_relay,
        [
            "10.244.1.0/24",
            "10.244.3.0/24",
            "10.244.4.0/24",
            "10.250.0.1/32",
            "10.250.0.3/32",
            "10.250.0.4/32"
        ]
    );
}

/// A mesh of nodes 1..=count: `natted` behind NAT, `interior` not gateways, and external
/// peers 20.. with one network each (`192.168.<n>.0/24`).
fn mesh_with(count: u8, natted: &[u8], interior: &[u8], externals: &[u8]) -> Arc<DesiredMesh> {
    mesh_of(count, |_, nodes, peers| {
        for (i, n) in nodes.iter_mut().enumerate() {
            let n_index = u8::try_from(i + 1).unwrap();
            n.behind_nat = natted.contains(&n_index);
            n.gateway = !interior.contains(&n_index) && !n.behind_nat;
        }
        for &e in externals {
            peers.push(fixtures::external(
                &format!("ext{e}"),
                e,
                &[&format!("192.168.{e}.0/24")],
            ));
        }
    })
}

/// A node's peers as its agent holds them: key -> (the peer but its allowed IPs, the list).
type Held = BTreeMap<PublicKey, (DesiredPeer, Vec<Cidr>)>;

fn held<S>(view: &NodeConfig<S>) -> Held {
    view.peers()
        .map(|p| {
            let copy = view.as_sent(p).into_owned();
            let list = copy.allowed_ips.clone();
            (
                p.public_key,
                (
                    DesiredPeer {
                        allowed_ips: vec![],
                        ..copy
                    },
                    list,
                ),
            )
        })
        .collect()
}

/// Every node of both meshes, taken from `before` to `after` by a delta with changes of
/// allowed IPs, as an agent applies it: it ends with what `after` gives it, every change
/// fits what it held, and the changes are what the case expects (node -> "key:+n-m", a
/// change with n entries added and m removed).
#[test]
fn allowed_ips_changes_take_every_node_to_its_next_view() {
    type Case<'a> = (
        &'a str,
        Arc<DesiredMesh>,
        Arc<DesiredMesh>,
        Vec<(&'a str, &'a str)>,
    );
    let cases: Vec<Case> = vec![
        (
            "a node joins behind NAT: the relay grows by its two networks",
            mesh_with(4, &[2, 3], &[], &[]),
            mesh_with(5, &[2, 3, 5], &[], &[]),
            vec![("n2", "1:+2-0"), ("n3", "1:+2-0"), ("n1", ""), ("n4", "")],
        ),
        (
            "a node behind NAT leaves: the relay shrinks",
            mesh_with(5, &[2, 3, 5], &[], &[]),
            mesh_with(4, &[2, 3], &[], &[]),
            vec![("n2", "1:+0-2"), ("n3", "1:+0-2")],
        ),
        (
            "a node goes behind NAT: the relay grows for the others; it gets its peers whole \
             (kept alive from behind NAT now)",
            mesh_with(4, &[2, 3], &[], &[]),
            mesh_with(4, &[2, 3, 4], &[], &[]),
            vec![("n2", "1:+2-0"), ("n3", "1:+2-0"), ("n4", "")],
        ),
        (
            "a node behind NAT gets another pod CIDR: the others' relay changes, its own not",
            mesh_with(4, &[2, 3], &[], &[]),
            mesh_of(4, |_, nodes, _| {
                for n in nodes
                    .iter_mut()
                    .filter(|n| ["n2", "n3"].contains(&n.name.as_str()))
                {
                    n.behind_nat = true;
                }
                nodes[1].pod_cidrs = vec!["10.244.42.0/24".parse().unwrap()];
            }),
            vec![("n2", ""), ("n3", "1:+1-1"), ("n4", "")],
        ),
        (
            "an external peer comes: the active gateway grows for interior nodes",
            mesh_with(4, &[], &[2, 3, 4], &[20, 21, 22]),
            mesh_with(4, &[], &[2, 3, 4], &[20, 21, 22, 23]),
            vec![("n2", "1:+2-0"), ("n3", "1:+2-0"), ("n1", "")],
        ),
        (
            "an external peer goes",
            mesh_with(4, &[], &[2, 3, 4], &[20, 21, 22, 23]),
            mesh_with(4, &[], &[2, 3, 4], &[20, 21, 22]),
            vec![("n2", "1:+0-2"), ("n4", "1:+0-2")],
        ),
        (
            "the only external peer goes: a change as long as the list goes whole",
            mesh_with(3, &[], &[2, 3], &[20]),
            mesh_with(3, &[], &[2, 3], &[]),
            vec![("n2", ""), ("n3", "")],
        ),
    ];
    for (name, before, after, expected) in cases {
        let names: BTreeSet<&String> = before.members.keys().chain(after.members.keys()).collect();
        for node in names {
            let sent = NodeConfig::of(node, Some(Arc::new("s")), before.clone());
            let now = NodeConfig::of(node, Some(Arc::new("s")), after.clone());
            let mut agent = held(&sent);
            let changes = match next_update(Some(&sent), &now) {
                None => String::new(),
                Some(NodeUpdate::Snapshot) => {
                    agent = held(&now);
                    "snapshot".into()
                }
                Some(NodeUpdate::Delta(d)) => {
                    let d = d.with_allowed_ips_changes(&sent, &now);
                    for k in &d.removed {
                        agent.remove(k);
                    }
                    for p in &d.upserted {
                        let copy = now.as_sent(p).into_owned();
                        let list = copy.allowed_ips.clone();
                        agent.insert(
                            p.public_key,
                            (
                                DesiredPeer {
                                    allowed_ips: vec![],
                                    ..copy
                                },
                                list,
                            ),
                        );
                    }
                    let mut out = Vec::new();
                    for c in &d.allowed_ips_changes {
                        let (_, list) = agent.get_mut(&c.public_key).unwrap_or_else(|| {
                            panic!("{name}: {node} got a change of a peer it lacks")
                        });
                        assert!(c.fits(list), "{name}: {node}: {c:?} does not fit {list:?}");
                        *list = c.applied_to(list);
                        out.push(format!(
                            "{}:+{}-{}",
                            c.public_key.as_bytes()[0],
                            c.added.len(),
                            c.removed.len()
                        ));
                    }
                    out.join(" ")
                }
            };
            assert_eq!(agent, held(&now), "{name}: {node} ends with its next view");
            if let Some((_, want)) = expected.iter().find(|(n, _)| *n == node.as_str()) {
                assert_eq!(&changes, want, "{name}: {node}'s changes");
            }
        }
    }
}

/// The shared difference is worked out once per earlier version: every node behind NAT
/// that was sent the same relay gets the change from one computation.
#[test]
fn the_relays_difference_is_shared_by_the_nodes_sent_the_same_relay() {
    let (before, after) = (
        mesh_with(4, &[2, 3], &[], &[]),
        mesh_with(5, &[2, 3, 5], &[], &[]),
    );
    let relay = &after.nat_peers[&key(1)];
    for node in ["n2", "n3"] {
        let sent = NodeConfig::of(node, Some(Arc::new("s")), before.clone());
        let now = NodeConfig::of(node, Some(Arc::new("s")), after.clone());
        let Some(NodeUpdate::Delta(d)) = next_update(Some(&sent), &now) else {
            panic!("{node}: a delta");
        };
        let d = d.with_allowed_ips_changes(&sent, &now);
        assert!(d.upserted.is_empty(), "{node}: {:?}", d.upserted);
        assert_eq!(d.allowed_ips_changes.len(), 1);
    }
    assert_eq!(format!("{:?}", relay.allowed_ips_diff), "diffed");
    let first = relay
        .allowed_ips_diff
        .get_or_init(relay, &before.nat_peers[&key(1)]);
    let again = relay
        .allowed_ips_diff
        .get_or_init(relay, &before.nat_peers[&key(1)]);
    assert!(Arc::ptr_eq(&first, &again), "one difference, shared");
}
