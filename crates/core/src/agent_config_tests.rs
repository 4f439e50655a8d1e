use super::*;

type Config = AgentConfig<&'static str>;

fn peer(n: u8, allowed: &[&str]) -> AgentPeer {
    AgentPeer {
        public_key: PublicKey::from_bytes([n; 32]),
        name: format!("p{n}"),
        endpoint: None,
        allowed_ips: allowed
            .iter()
            .map(|c| Cidr::parse_strict(c).unwrap())
            .collect(),
        persistent_keepalive: 0,
        preshared_key: None,
        node: None,
    }
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|n| n.parse().unwrap()).collect()
}

fn update(revision: u64, change: AgentChange<&'static str>) -> AgentUpdate<&'static str> {
    AgentUpdate {
        epoch: "e".into(),
        revision,
        rotate_key_request: None,
        change,
    }
}

#[test]
fn snapshots_replace_and_deltas_change_only_what_they_carry() {
    let mut c = Config::default();
    c.apply(update(
        3,
        AgentChange::Snapshot {
            peers: vec![peer(1, &["10.0.1.0/24"]), peer(2, &["10.0.2.0/24"])],
            settings: Some("wgmesh0"),
            addresses: nets(&["10.250.0.1/16"]),
            pod_cidrs: nets(&["10.244.1.0/24"]),
            departure: Departure::Unspecified,
            members: 3,
        },
    ));
    assert_eq!((c.peers.len(), c.revision, c.members), (2, 3, 3));
    assert_eq!(c.routes(), nets(&["10.0.1.0/24", "10.0.2.0/24"]));
    assert!(c.is_member());

    c.apply(update(
        4,
        AgentChange::Delta {
            upserted: vec![peer(3, &["10.0.3.0/24", "10.0.1.0/24"])],
            removed: vec![PublicKey::from_bytes([1; 32])],
            settings: None,
            addresses: None,
            pod_cidrs: None,
            members: None,
            allowed_ips_changes: vec![],
        },
    ));
    let keys: Vec<u8> = c.peers.keys().map(|k| k.as_bytes()[0]).collect();
    assert_eq!(keys, [2, 3]);
    assert_eq!(c.settings, Some("wgmesh0"), "settings kept");
    assert_eq!(c.addresses, nets(&["10.250.0.1/16"]), "addresses kept");
    assert_eq!((c.revision, c.members), (4, 3));
    assert_eq!(
        c.routes(),
        nets(&["10.0.1.0/24", "10.0.2.0/24", "10.0.3.0/24"]),
        "sorted, once each"
    );

    c.apply(update(
        5,
        AgentChange::Delta {
            upserted: vec![],
            removed: vec![],
            settings: Some("wg1"),
            addresses: Some(nets(&["10.250.0.9/16"])),
            pod_cidrs: Some(nets(&["10.244.9.0/24"])),
            members: Some(4),
            allowed_ips_changes: vec![],
        },
    ));
    assert_eq!(
        (
            c.settings,
            c.addresses.clone(),
            c.pod_cidrs.clone(),
            c.members
        ),
        (
            Some("wg1"),
            nets(&["10.250.0.9/16"]),
            nets(&["10.244.9.0/24"]),
            4
        )
    );
}

#[test]
fn verdict_table() {
    use Departure as D;
    let view = |peers: &[u8], member: bool, departure: D, members: u32| Config {
        revision: 9,
        addresses: if member {
            nets(&["10.250.0.1/16"])
        } else {
            vec![]
        },
        peers: peers
            .iter()
            .map(|&n| (PublicKey::from_bytes([n; 32]), peer(n, &[])))
            .collect(),
        departure,
        members,
        ..Default::default()
    };
    let member3 = view(&[2, 3], true, D::Unspecified, 3);
    let nothing = Config::default();
    let empty_member = view(&[], true, D::Unspecified, 3);
    let no_reason = |d: &str| {
        Verdict::Refuse(format!(
            "revision 9: would end this node's membership, but the mesh gives no reason to leave ({d})"
        ))
    };
    // name, programmed, next, expected
    let cases: Vec<(&str, &Config, Config, Verdict)> = vec![
        (
            "a member's change",
            &member3,
            view(&[2, 4], true, D::Unspecified, 3),
            Verdict::Program,
        ),
        (
            "the first snapshot",
            &nothing,
            view(&[2, 3], true, D::Unspecified, 3),
            Verdict::Program,
        ),
        (
            "not registered yet, nothing programmed",
            &nothing,
            view(&[], false, D::NotRegistered, 3),
            Verdict::Program,
        ),
        (
            "mesh deleted",
            &member3,
            view(&[], false, D::MeshDeleted, 0),
            Verdict::Leave(D::MeshDeleted),
        ),
        (
            "node deleted",
            &member3,
            view(&[], false, D::NodeDeleted, 2),
            Verdict::Leave(D::NodeDeleted),
        ),
        (
            "node deselected",
            &member3,
            view(&[], false, D::NodeNotSelected, 2),
            Verdict::Leave(D::NodeNotSelected),
        ),
        (
            "a departure after a restart with nothing programmed still cleans up",
            &nothing,
            view(&[], false, D::MeshDeleted, 0),
            Verdict::Leave(D::MeshDeleted),
        ),
        (
            "membership lost without a reason",
            &member3,
            view(&[], false, D::NotRegistered, 3),
            no_reason("NotRegistered"),
        ),
        (
            "membership lost, from an older controller",
            &member3,
            view(&[], false, D::Unspecified, 0),
            no_reason("Unspecified"),
        ),
        (
            "every peer gone while others are members",
            &member3,
            view(&[], true, D::Unspecified, 3),
            Verdict::Refuse("revision 9: would remove all 2 peers while 3 members exist".into()),
        ),
        (
            "every peer gone, and this node is the last member",
            &member3,
            view(&[], true, D::Unspecified, 1),
            Verdict::Program,
        ),
        (
            "no peers before either",
            &empty_member,
            view(&[], true, D::Unspecified, 3),
            Verdict::Program,
        ),
    ];
    for (name, programmed, next, want) in cases {
        assert_eq!(verdict(programmed, &next), want, "{name}");
    }
}

#[test]
fn a_delta_follows_only_the_state_it_was_made_from() {
    let delta = |epoch: &str, revision| AgentUpdate {
        epoch: epoch.into(),
        revision,
        rotate_key_request: None,
        change: AgentChange::<&'static str>::Delta {
            upserted: vec![],
            removed: vec![],
            settings: None,
            addresses: None,
            pod_cidrs: None,
            members: None,
            allowed_ips_changes: vec![],
        },
    };
    let snapshot = |epoch: &str, revision| AgentUpdate {
        epoch: epoch.into(),
        revision,
        rotate_key_request: None,
        change: AgentChange::<&'static str>::Snapshot {
            peers: vec![],
            settings: None,
            addresses: vec![],
            pod_cidrs: vec![],
            departure: Departure::Unspecified,
            members: 0,
        },
    };
    let fresh = Config::default();
    let mut at_5 = Config::default();
    at_5.apply(snapshot("e", 5));
    // (state, update, follows)
    let cases = [
        (&fresh, delta("e", 1), false),
        (&fresh, delta("", 0), false),
        (&fresh, snapshot("e", 1), true),
        (&at_5, delta("e", 6), true),
        (&at_5, delta("e", 5), true),
        (&at_5, delta("e", 4), false),
        (&at_5, delta("other", 6), false),
        (&at_5, snapshot("other", 1), true),
    ];
    for (i, (state, update, want)) in cases.into_iter().enumerate() {
        assert_eq!(state.follows(&update), want, "case {i}");
    }
}

/// A change of allowed IPs applies to the peer held, and only a change that fits what the
/// agent holds follows it: one computed from another state makes the agent start over from
/// a snapshot instead of holding a mix of two.
#[test]
fn allowed_ips_changes_apply_only_to_what_they_were_made_from() {
    let cidrs = |list: &[&str]| -> Vec<Cidr> {
        list.iter()
            .map(|c| Cidr::parse_strict(c).unwrap())
            .collect()
    };
    let mut at_5 = Config::default();
    at_5.apply(update(
        5,
        AgentChange::Snapshot {
            peers: vec![
                peer(1, &["10.0.1.0/24", "10.0.2.0/24", "10.250.0.1/32"]),
                peer(2, &["10.0.9.0/24"]),
            ],
            settings: Some("wgmesh0"),
            addresses: nets(&["10.250.0.3/16"]),
            pod_cidrs: vec![],
            departure: Departure::Unspecified,
            members: 3,
        },
    ));
    let changed = |key: u8, added: &[&str], removed: &[&str]| {
        update(
            6,
            AgentChange::Delta {
                upserted: vec![],
                removed: vec![],
                settings: None,
                addresses: None,
                pod_cidrs: None,
                members: None,
                allowed_ips_changes: vec![AllowedIpsChange {
                    public_key: PublicKey::from_bytes([key; 32]),
                    added: cidrs(added),
                    removed: cidrs(removed),
                }],
            },
        )
    };
    // (name, update, follows)
    let cases = [
        ("grows", changed(1, &["10.0.3.0/24"], &[]), true),
        ("shrinks", changed(1, &[], &["10.0.2.0/24"]), true),
        ("both", changed(1, &["10.0.0.0/24"], &["10.0.1.0/24"]), true),
        ("a peer not held", changed(7, &["10.0.3.0/24"], &[]), false),
        (
            "adds what is there",
            changed(1, &["10.0.1.0/24"], &[]),
            false,
        ),
        (
            "removes what is not",
            changed(1, &[], &["10.0.3.0/24"]),
            false,
        ),
    ];
    for (name, u, want) in cases {
        assert_eq!(at_5.follows(&u), want, "{name}");
    }

    let mut c = at_5.clone();
    c.apply(changed(
        1,
        &["10.0.0.0/24", "10.0.3.0/24"],
        &["10.0.2.0/24"],
    ));
    assert_eq!(
        c.peers[&PublicKey::from_bytes([1; 32])].allowed_ips,
        cidrs(&["10.0.0.0/24", "10.0.1.0/24", "10.0.3.0/24", "10.250.0.1/32"]),
        "sorted, the removed one gone"
    );
    assert_eq!(
        c.peers[&PublicKey::from_bytes([2; 32])],
        at_5.peers[&PublicKey::from_bytes([2; 32])],
        "the other peer as it was"
    );
    assert_eq!(c.revision, 6);
}
