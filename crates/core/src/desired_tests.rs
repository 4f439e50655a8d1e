//! Table-driven tests of the desired mesh. Its fixtures (`key`, `mesh`, `node`, `node_peer`)
//! serve the other tests of core too.

use super::*;

pub(crate) fn key(n: u8) -> PublicKey {
    PublicKey::from_bytes([n; 32])
}

fn cidrs(list: &[&str]) -> Vec<Cidr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

pub(crate) fn mesh() -> MeshInput {
    MeshInput {
        name: "default".into(),
        tunnel_pools: cidrs(&["10.250.0.0/16"]),
        persistent_keepalive: 0,
        preshared_key: None,
        reserved: vec![],
        active_gateway: None,
        host_encryption: false,
        marks_tunnel_packets: false,
    }
}

pub(crate) fn node(name: &str, pod_cidr: &str) -> NodeInput {
    NodeInput {
        name: name.into(),
        uid: format!("uid-{name}"),
        addresses: vec![],
        host_addresses: vec![],
        selected: true,
        pod_cidrs: cidrs(&[pod_cidr]),
        rotate_key_request: None,
        gateway: true,
        endpoint: NodeEndpoint::Registered,
        behind_nat: false,
    }
}

/// [`node`] with the InternalIP 192.168.0.n, where its peer [`node_peer`]`(name, n)` registered.
pub(crate) fn node_at(name: &str, n: u8, pod_cidr: &str) -> NodeInput {
    let ip: IpAddr = format!("192.168.0.{n}").parse().unwrap();
    NodeInput {
        addresses: vec![ip],
        host_addresses: vec![ip],
        ..node(name, pod_cidr)
    }
}

/// A node peer `<node>` with key n, created at time n, tunnel address 10.250.0.n, registered
/// at 192.168.0.n:51820 (the address of [`node_at`]).
pub(crate) fn node_peer(node: &str, n: u8) -> PeerInput {
    PeerInput {
        name: node.into(),
        created: i64::from(n),
        previously_programmed: false,
        seniority: 0,
        public_key: key(n),
        allowed_ips: vec![],
        endpoint: Some(format!("192.168.0.{n}:51820")),
        last_seen_endpoint: None,
        persistent_keepalive: None,
        preshared_key: None,
        responder: false,
        disabled: false,
        node: Some(node.into()),
        node_owner_uid: Some(format!("uid-{node}")),
        tunnel_addresses: vec![format!("10.250.0.{n}").parse().unwrap()],
    }
}

/// An external peer with key n, created at time n, tunnel address 10.250.1.n.
pub(crate) fn external(name: &str, n: u8, allowed: &[&str]) -> PeerInput {
    PeerInput {
        name: name.into(),
        created: i64::from(n),
        previously_programmed: false,
        seniority: 0,
        public_key: key(n),
        allowed_ips: cidrs(allowed),
        endpoint: None,
        last_seen_endpoint: None,
        persistent_keepalive: None,
        preshared_key: None,
        responder: false,
        disabled: false,
        node: None,
        node_owner_uid: None,
        tunnel_addresses: vec![format!("10.250.1.{n}").parse().unwrap()],
    }
}

fn three_nodes() -> (Vec<NodeInput>, Vec<PeerInput>) {
    (
        vec![
            node_at("a", 1, "10.244.1.0/24"),
            node_at("b", 2, "10.244.2.0/24"),
            node_at("c", 3, "10.244.3.0/24"),
        ],
        vec![node_peer("a", 1), node_peer("b", 2), node_peer("c", 3)],
    )
}

/// The names of the peers `node` programs (none when it is not a member).
fn names_of(d: &DesiredMesh, node: &str) -> Vec<String> {
    crate::node_config::NodeConfig::<()>::of(node, None, Arc::new(d.clone()))
        .peers()
        .map(|p| p.name.clone())
        .collect()
}

fn refused(d: &DesiredMesh, name: &str) -> Option<(Reason, String)> {
    match d.verdicts.get(name)? {
        Verdict::Programmed => None,
        Verdict::Refused { reason, message } => Some((*reason, message.clone())),
    }
}

#[test]
fn every_node_gets_every_other_node() {
    let (nodes, peers) = three_nodes();
    let d = compute(&mesh(), &nodes, &peers);
    assert_eq!(names_of(&d, "a"), ["b", "c"]);
    assert_eq!(names_of(&d, "b"), ["a", "c"]);
    assert_eq!(names_of(&d, "c"), ["a", "b"]);
    let b = &d.peers[&key(2)];
    assert_eq!(
        b.allowed_ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.244.2.0/24", "10.250.0.2/32"],
        "a node's allowed IPs are its tunnel address and pod CIDRs"
    );
    assert_eq!(b.endpoint.as_deref(), Some("192.168.0.2:51820"));
    assert_eq!(
        d.members["a"].interface_addresses[0].to_string(),
        "10.250.0.1/16",
        "the interface address carries the pool prefix"
    );
}

#[test]
fn membership_table() {
    struct Case {
        name: &'static str,
        edit: fn(&mut Vec<NodeInput>, &mut Vec<PeerInput>),
        members: &'static [&'static str],
        refused: &'static [(&'static str, Reason)],
    }
    let cases = [
        Case {
            name: "all present",
            edit: |_, _| {},
            members: &["a", "b", "c"],
            refused: &[],
        },
        Case {
            name: "a deleted Node drops its peer everywhere",
            edit: |nodes, _| nodes.retain(|n| n.name != "b"),
            members: &["a", "c"],
            refused: &[("b", Reason::NodeNotInMesh)],
        },
        Case {
            name: "a Node leaving the selector drops its peer",
            edit: |nodes, _| nodes[2].selected = false,
            members: &["a", "b"],
            refused: &[("c", Reason::NodeNotInMesh)],
        },
        Case {
            name: "a Node without a registered agent is not a member",
            edit: |_, peers| peers.retain(|p| p.name != "a"),
            members: &["b", "c"],
            refused: &[],
        },
        Case {
            name: "a disabled peer is absent everywhere",
            edit: |_, peers| peers[1].disabled = true,
            members: &["a", "c"],
            refused: &[("b", Reason::Disabled)],
        },
        Case {
            name: "a node without a tunnel address gets one and joins at once",
            edit: |_, peers| peers[0].tunnel_addresses.clear(),
            members: &["a", "b", "c"],
            refused: &[],
        },
        Case {
            name: "the newer of two nodes with one key is refused",
            edit: |_, peers| peers[2].public_key = key(1),
            members: &["a", "b"],
            refused: &[("c", Reason::DuplicatePublicKey)],
        },
        Case {
            name: "overlapping pod CIDRs: the newer node is refused",
            edit: |nodes, _| nodes[1].pod_cidrs = cidrs(&["10.244.0.0/16"]),
            members: &["a", "c"],
            refused: &[("b", Reason::AllowedIpsOverlap)],
        },
        Case {
            // The controller holds such a mesh before computing it (`check_tunnel_pools`);
            // computed anyway, the node is refused, never programmed over the pool.
            name: "pod CIDR inside the tunnel pool",
            edit: |nodes, _| nodes[0].pod_cidrs = cidrs(&["10.250.128.0/24"]),
            members: &["b", "c"],
            refused: &[("a", Reason::AllowedIpsOverlap)],
        },
    ];
    for case in cases {
        let (mut nodes, mut peers) = three_nodes();
        (case.edit)(&mut nodes, &mut peers);
        let d = compute(&mesh(), &nodes, &peers);
        let members: Vec<&str> = d.members.keys().map(String::as_str).collect();
        assert_eq!(members, case.members, "{}", case.name);
        for m in case.members {
            assert_eq!(
                names_of(&d, m).len(),
                case.members.len() - 1,
                "{}: {m} sees every other member",
                case.name
            );
        }
        for (name, reason) in case.refused {
            let (got, message) = refused(&d, name)
                .unwrap_or_else(|| panic!("{}: {name} should be refused", case.name));
            assert_eq!(got, *reason, "{}: {message}", case.name);
        }
    }
}

#[test]
fn external_peer_table() {
    struct Case {
        name: &'static str,
        peer: PeerInput,
        want_endpoint: Option<&'static str>,
        refused: Option<(Reason, &'static str)>,
    }
    let with = |f: fn(&mut PeerInput)| {
        let mut p = external("laptop", 10, &["192.168.50.0/24"]);
        f(&mut p);
        p
    };
    let cases = [
        Case {
            name: "an endpoint in the spec is pushed",
            peer: with(|p| p.endpoint = Some("203.0.113.1:51820".into())),
            want_endpoint: Some("203.0.113.1:51820"),
            refused: None,
        },
        Case {
            name: "no endpoint: the last seen one is used",
            peer: with(|p| p.last_seen_endpoint = Some("198.51.100.7:40000".into())),
            want_endpoint: Some("198.51.100.7:40000"),
            refused: None,
        },
        Case {
            name: "a responder gets no endpoint",
            peer: with(|p| {
                p.responder = true;
                p.endpoint = Some("203.0.113.1:51820".into());
            }),
            want_endpoint: None,
            refused: None,
        },
        Case {
            name: "overlapping a node's pod CIDR",
            peer: external("laptop", 10, &["10.244.2.128/25"]),
            want_endpoint: None,
            refused: Some((Reason::AllowedIpsOverlap, "pod CIDR of node b")),
        },
        Case {
            name: "overlapping the tunnel pool",
            peer: external("laptop", 10, &["10.250.0.0/24"]),
            want_endpoint: None,
            refused: Some((Reason::AllowedIpsOverlap, "tunnel pool 10.250.0.0/16")),
        },
        Case {
            name: "allowed IPs covering the peer's own endpoint",
            peer: with(|p| {
                p.allowed_ips = vec![Cidr::parse_strict("203.0.113.0/24").unwrap()];
                p.endpoint = Some("203.0.113.1:51820".into());
            }),
            want_endpoint: None,
            refused: Some((Reason::AllowedIpsOverlap, "own endpoint 203.0.113.1")),
        },
        Case {
            name: "... an IPv6 one",
            peer: with(|p| {
                p.allowed_ips = vec![Cidr::parse_strict("2001:db8::/32").unwrap()];
                p.endpoint = Some("[2001:db8::7]:51820".into());
            }),
            want_endpoint: None,
            refused: Some((Reason::AllowedIpsOverlap, "own endpoint 2001:db8::7")),
        },
        Case {
            name: "an endpoint beside its allowed IPs, or a name, is fine",
            peer: with(|p| {
                p.allowed_ips = vec![Cidr::parse_strict("203.0.113.0/24").unwrap()];
                p.endpoint = Some("site.example:51820".into());
            }),
            want_endpoint: Some("site.example:51820"),
            refused: None,
        },
        Case {
            name: "a node's key reused by an external peer",
            peer: with(|p| p.public_key = key(1)),
            want_endpoint: None,
            refused: Some((Reason::DuplicatePublicKey, "WireGuardPeer a")),
        },
        Case {
            name: "an endpoint agents would refuse is refused here, not sent to every gateway",
            peer: with(|p| p.endpoint = Some("a..b:51820".into())),
            want_endpoint: None,
            refused: Some((Reason::InvalidSpec, "spec.endpoint")),
        },
        Case {
            name: "an IPv4 address in brackets",
            peer: with(|p| p.endpoint = Some("[192.0.2.9]:51820".into())),
            want_endpoint: None,
            refused: Some((Reason::InvalidSpec, "spec.endpoint")),
        },
        Case {
            name: "a host label longer than 63 bytes",
            peer: with(|p| p.endpoint = Some(format!("{}.example:51820", "a".repeat(64)))),
            want_endpoint: None,
            refused: Some((Reason::InvalidSpec, "spec.endpoint")),
        },
        Case {
            name: "an IPv6 zone",
            peer: with(|p| p.endpoint = Some("[fe80::1%eth0]:51820".into())),
            want_endpoint: None,
            refused: Some((Reason::InvalidSpec, "zone")),
        },
        Case {
            name: "last seen at a node's address: not published",
            peer: with(|p| p.last_seen_endpoint = Some("192.0.2.1:51820".into())),
            want_endpoint: None,
            refused: None,
        },
        Case {
            name: "last seen at cloud metadata: not published",
            peer: with(|p| p.last_seen_endpoint = Some("169.254.169.254:80".into())),
            want_endpoint: None,
            refused: None,
        },
        Case {
            name: "last seen in the tunnel pool: not published",
            peer: with(|p| p.last_seen_endpoint = Some("10.250.0.2:51820".into())),
            want_endpoint: None,
            refused: None,
        },
        Case {
            name: "last seen as a name: not published (agents report addresses)",
            peer: with(|p| p.last_seen_endpoint = Some("evil.example:51820".into())),
            want_endpoint: None,
            refused: None,
        },
        Case {
            name: "the spec's endpoint wins over the last seen one",
            peer: with(|p| {
                p.endpoint = Some("203.0.113.1:51820".into());
                p.last_seen_endpoint = Some("198.51.100.7:40000".into());
            }),
            want_endpoint: Some("203.0.113.1:51820"),
            refused: None,
        },
        Case {
            name: "overlapping the pod CIDR of a Node that is not selected",
            peer: external("laptop", 10, &["10.244.9.0/24"]),
            want_endpoint: None,
            refused: Some((Reason::AllowedIpsOverlap, "pod CIDR of node z")),
        },
        Case {
            name: "overlapping the pod CIDR of a Node whose agent has not registered",
            peer: external("laptop", 10, &["10.244.8.0/25"]),
            want_endpoint: None,
            refused: Some((Reason::AllowedIpsOverlap, "pod CIDR of node y")),
        },
        Case {
            name: "an endpoint at cloud metadata",
            peer: with(|p| p.endpoint = Some("169.254.169.254:80".into())),
            want_endpoint: None,
            refused: Some((Reason::ReservedRange, "169.254.0.0/16, IPv4 link-local")),
        },
        Case {
            name: "an endpoint on the gateways' loopback",
            peer: with(|p| p.endpoint = Some("127.0.0.1:22".into())),
            want_endpoint: None,
            refused: Some((Reason::ReservedRange, "127.0.0.0/8, IPv4 loopback")),
        },
        Case {
            name: "... IPv6 loopback",
            peer: with(|p| p.endpoint = Some("[::1]:51820".into())),
            want_endpoint: None,
            refused: Some((Reason::ReservedRange, "IPv6 loopback")),
        },
        Case {
            name: "... loopback as an IPv4-mapped IPv6 address",
            peer: with(|p| p.endpoint = Some("[::ffff:127.0.0.1]:51820".into())),
            want_endpoint: None,
            refused: Some((Reason::ReservedRange, "IPv4-mapped")),
        },
        Case {
            name: "an endpoint in IPv6 link-local",
            peer: with(|p| p.endpoint = Some("[fe80::1]:51820".into())),
            want_endpoint: None,
            refused: Some((Reason::ReservedRange, "IPv6 link-local")),
        },
        Case {
            name: "a multicast endpoint",
            peer: with(|p| p.endpoint = Some("224.0.0.251:5353".into())),
            want_endpoint: None,
            refused: Some((Reason::ReservedRange, "multicast")),
        },
        Case {
            name: "the broadcast address",
            peer: with(|p| p.endpoint = Some("255.255.255.255:51820".into())),
            want_endpoint: None,
            refused: Some((Reason::ReservedRange, "broadcast")),
        },
        Case {
            name: "the unspecified address",
            peer: with(|p| p.endpoint = Some("0.0.0.0:51820".into())),
            want_endpoint: None,
            refused: Some((Reason::ReservedRange, "this network")),
        },
        Case {
            name: "an endpoint in the tunnel pool",
            peer: with(|p| p.endpoint = Some("10.250.0.2:51820".into())),
            want_endpoint: None,
            refused: Some((Reason::AllowedIpsOverlap, "the tunnel pool 10.250.0.0/16")),
        },
        Case {
            name: "an endpoint at a node's address (a site behind the nodes' NAT) is fine",
            peer: with(|p| p.endpoint = Some("192.0.2.1:51821".into())),
            want_endpoint: Some("192.0.2.1:51821"),
            refused: None,
        },
        Case {
            name: "a remote site's private address is fine",
            peer: with(|p| p.endpoint = Some("10.1.2.3:51820".into())),
            want_endpoint: Some("10.1.2.3:51820"),
            refused: None,
        },
        Case {
            name: "... beside a node's",
            peer: with(|p| p.endpoint = Some("192.0.2.2:51820".into())),
            want_endpoint: Some("192.0.2.2:51820"),
            refused: None,
        },
        Case {
            name: "an address in the Service CIDR is fine (reserved for routing only)",
            peer: with(|p| p.endpoint = Some("10.96.0.20:51820".into())),
            want_endpoint: Some("10.96.0.20:51820"),
            refused: None,
        },
        Case {
            name: "a name is not judged (the agents resolve it)",
            peer: with(|p| p.endpoint = Some("localhost:51820".into())),
            want_endpoint: Some("localhost:51820"),
            refused: None,
        },
        Case {
            name: "a missing preshared key Secret",
            peer: with(|p| {
                p.preshared_key = Some(SecretInput::Missing("Secret ns/psk not found".into()))
            }),
            want_endpoint: None,
            refused: Some((Reason::PresharedKeySecretMissing, "ns/psk")),
        },
    ];
    for case in cases {
        let (mut nodes, mut peers) = three_nodes();
        nodes[0].addresses = vec!["192.0.2.1".parse().unwrap()];
        // Not selected, and selected but without a node peer (its agent not registered).
        let mut z = node("z", "10.244.9.0/24");
        z.selected = false;
        z.addresses = vec!["fd00:26::1".parse().unwrap()];
        nodes.push(z);
        nodes.push(node("y", "10.244.8.0/24"));
        peers.push(case.peer);
        let mut m = mesh();
        m.reserved = vec![ReservedRange::new(
            "10.96.0.0/12".parse().unwrap(),
            "the Service CIDR",
        )];
        let d = compute(&m, &nodes, &peers);
        match case.refused {
            None => {
                assert_eq!(refused(&d, "laptop"), None, "{}", case.name);
                let p = &d.peers[&key(10)];
                assert_eq!(p.endpoint.as_deref(), case.want_endpoint, "{}", case.name);
                for n in ["a", "b", "c"] {
                    assert!(
                        names_of(&d, n).contains(&"laptop".to_owned()),
                        "{}",
                        case.name
                    );
                }
            }
            Some((reason, mentions)) => {
                let (got, message) = refused(&d, "laptop").expect(case.name);
                assert_eq!(got, reason, "{}", case.name);
                assert!(message.contains(mentions), "{}: {message}", case.name);
                assert!(
                    !d.peers.values().any(|p| p.name == "laptop"),
                    "{}",
                    case.name
                );
                assert_eq!(d.members.len(), 3, "{}: the rest is unaffected", case.name);
            }
        }
    }
}

#[test]
fn overlap_refuses_the_newer_external_peer_and_fixing_clears_it() {
    let (nodes, mut peers) = three_nodes();
    peers.push(external("office", 20, &["192.168.50.0/24"]));
    peers.push(external("intruder", 21, &["192.168.50.128/25"]));
    let d = compute(&mesh(), &nodes, &peers);
    let (reason, message) = refused(&d, "intruder").unwrap();
    assert_eq!(reason, Reason::AllowedIpsOverlap);
    assert!(message.contains("WireGuardPeer office"), "{message}");
    assert_eq!(refused(&d, "office"), None);

    // Order of the input does not matter: the older one wins.
    peers.reverse();
    assert_eq!(compute(&mesh(), &nodes, &peers), d);

    // Fixing the newer one clears the refusal.
    peers
        .iter_mut()
        .find(|p| p.name == "intruder")
        .unwrap()
        .allowed_ips = cidrs(&["192.168.60.0/24"]);
    let d = compute(&mesh(), &nodes, &peers);
    assert_eq!(refused(&d, "intruder"), None);
}

#[test]
fn same_second_ties_keep_the_programmed_peer_then_the_first_seen() {
    let (nodes, mut peers) = three_nodes();
    let mut office = external("office", 20, &["192.168.50.0/24"]);
    let mut aaa = external("aaa", 21, &["192.168.50.128/25"]);
    office.created = 100;
    aaa.created = 100;
    // Same second, neither programmed: the one seen first wins, whatever the names.
    office.seniority = 1;
    aaa.seniority = 2;
    peers.extend([office.clone(), aaa.clone()]);
    let d = compute(&mesh(), &nodes, &peers);
    assert_eq!(refused(&d, "office"), None);
    assert_eq!(refused(&d, "aaa").unwrap().0, Reason::AllowedIpsOverlap);
    // After a restart the first-seen order is lost, but the programmed peer keeps its place.
    office.seniority = 0;
    aaa.seniority = 0;
    office.previously_programmed = true;
    peers.truncate(3);
    peers.extend([office, aaa]);
    let d = compute(&mesh(), &nodes, &peers);
    assert_eq!(refused(&d, "office"), None);
    assert!(refused(&d, "aaa").is_some());
}

/// The precedence claims are judged in is the one addresses are allocated in: node
/// peers first, then external ones, each oldest first, ties by programmed, then first seen.
#[test]
fn precedence_is_the_allocation_order() {
    let (nodes, mut peers) = three_nodes();
    let mut office = external("office", 20, &["192.168.50.0/24"]);
    let mut aaa = external("aaa", 21, &["192.168.60.0/24"]);
    let early = external("early", 1, &["192.168.70.0/24"]);
    office.created = 100;
    aaa.created = 100;
    office.seniority = 1;
    aaa.seniority = 2;
    peers.extend([aaa.clone(), office.clone(), early]);
    let d = compute(&mesh(), &nodes, &peers);
    let node_peers: Vec<String> = peers
        .iter()
        .filter(|p| p.node.is_some())
        .map(|p| p.name.clone())
        .collect();
    assert_eq!(d.precedence[..3], node_peers[..], "nodes first");
    assert_eq!(d.precedence[3..], ["early", "office", "aaa"]);
    aaa.previously_programmed = true;
    peers.truncate(3);
    peers.extend([office, aaa]);
    let d = compute(&mesh(), &nodes, &peers);
    assert_eq!(
        d.precedence[3..],
        ["aaa", "office"],
        "programmed before seen first"
    );
}

/// A peer without a tunnel address is given the lowest free one in the computation that
/// first sees it, and programmed with it there: no member waits for the status write.
#[test]
fn a_joining_node_is_programmed_with_the_lowest_free_address() {
    let addr = |s: &str| -> IpAddr { s.parse().unwrap() };
    let (nodes, all) = three_nodes();
    // Node b is not seen yet; c joins without an address (a holds 10.250.0.1).
    let mut peers: Vec<PeerInput> = all.iter().filter(|p| p.name != "b").cloned().collect();
    peers[1].tunnel_addresses.clear();
    let d = compute(&mesh(), &nodes, &peers);
    assert_eq!(d.tunnel_addresses["c"], [addr("10.250.0.2")]);
    assert_eq!(d.tunnel_addresses["a"], [addr("10.250.0.1")], "kept");
    assert_eq!(d.verdicts["c"], Verdict::Programmed);
    assert_eq!(
        d.members["c"].interface_addresses,
        ["10.250.0.2/16".parse::<ipnet::IpNet>().unwrap()]
    );
    assert!(
        d.peers[&peers[1].public_key]
            .allowed_ips
            .contains(&Cidr::host(addr("10.250.0.2"))),
        "the other members route its tunnel address to it"
    );

    // Then b, senior to c, is seen without an address, while c's is published but not
    // written yet (the controller carries it over as held): c keeps it, b takes the next.
    let mut peers = all.clone();
    peers[1].tunnel_addresses.clear();
    peers[2].tunnel_addresses = vec![addr("10.250.0.2")];
    let d = compute(&mesh(), &nodes, &peers);
    assert_eq!(d.precedence, ["a", "b", "c"]);
    assert_eq!(d.tunnel_addresses["c"], [addr("10.250.0.2")], "it stays");
    assert_eq!(d.tunnel_addresses["b"], [addr("10.250.0.3")]);
    assert_eq!(d.verdicts["b"], Verdict::Programmed);
}

#[test]
fn exhausted_pool_is_reported() {
    let mut m = mesh();
    m.tunnel_pools = cidrs(&["10.250.0.0/30"]);
    let (nodes, mut peers) = three_nodes();
    peers[0].tunnel_addresses = vec!["10.250.0.1".parse().unwrap()];
    peers[1].tunnel_addresses = vec!["10.250.0.2".parse().unwrap()];
    peers[2].tunnel_addresses = vec![];
    let d = compute(&m, &nodes, &peers);
    let (reason, message) = refused(&d, "c").unwrap();
    assert_eq!(reason, Reason::TunnelPoolExhausted);
    assert!(message.contains("10.250.0.0/30"), "{message}");
}

/// A refused peer keeps the tunnel addresses it holds and is given none, so bad input never
/// keeps a good peer from an address, even the last one.
#[test]
fn refused_peers_keep_what_they_hold_and_take_no_new_address() {
    let addr = |s: &str| -> IpAddr { s.parse().unwrap() };
    struct Case {
        name: &'static str,
        pool: &'static str,
        // (peer, allowed IPs, held, disabled)
        externals: Vec<(&'static str, &'static str, Option<&'static str>, bool)>,
        // (peer, its addresses, refused for)
        want: Vec<(&'static str, Vec<&'static str>, Option<Reason>)>,
    }
    let cases = [
        Case {
            name: "a new refused peer gets no address",
            pool: "10.250.0.0/16",
            externals: vec![
                ("office", "192.168.50.0/24", None, false),
                ("intruder", "192.168.50.128/25", None, false),
                ("laptop", "192.168.60.0/24", None, false),
            ],
            want: vec![
                ("office", vec!["10.250.0.4"], None),
                ("intruder", vec![], Some(Reason::AllowedIpsOverlap)),
                // The pool is not full: the refused peer's address was taken in the same
                // computation, so the next one is given the one after it.
                ("laptop", vec!["10.250.0.6"], None),
            ],
        },
        Case {
            name: "a refused peer keeps what it holds",
            pool: "10.250.0.0/16",
            externals: vec![
                ("office", "192.168.50.0/24", None, false),
                ("paused", "192.168.70.0/24", Some("10.250.0.9"), true),
                ("intruder", "192.168.50.128/25", Some("10.250.0.8"), false),
            ],
            want: vec![
                ("paused", vec!["10.250.0.9"], Some(Reason::Disabled)),
                (
                    "intruder",
                    vec!["10.250.0.8"],
                    Some(Reason::AllowedIpsOverlap),
                ),
                ("office", vec!["10.250.0.4"], None),
            ],
        },
        Case {
            // Six usable addresses, five held: one left, which the older, refused peers
            // would have taken.
            name: "the last free address goes to the good peer",
            pool: "10.250.0.0/29",
            externals: vec![
                ("office", "192.168.50.0/24", Some("10.250.0.4"), false),
                ("phone", "192.168.90.0/24", Some("10.250.0.5"), false),
                ("intruder", "192.168.50.128/25", None, false),
                ("duplicate", "192.168.80.0/24", None, false),
                ("laptop", "192.168.60.0/24", None, false),
            ],
            want: vec![
                ("intruder", vec![], Some(Reason::AllowedIpsOverlap)),
                ("duplicate", vec![], Some(Reason::DuplicatePublicKey)),
                ("laptop", vec!["10.250.0.6"], None),
            ],
        },
        Case {
            name: "a refused peer holding the last address keeps it",
            pool: "10.250.0.0/29",
            externals: vec![
                ("office", "192.168.50.0/24", Some("10.250.0.4"), false),
                ("phone", "192.168.90.0/24", Some("10.250.0.5"), false),
                ("intruder", "192.168.50.128/25", Some("10.250.0.6"), false),
                ("laptop", "192.168.60.0/24", None, false),
            ],
            want: vec![
                (
                    "intruder",
                    vec!["10.250.0.6"],
                    Some(Reason::AllowedIpsOverlap),
                ),
                ("laptop", vec![], Some(Reason::TunnelPoolExhausted)),
            ],
        },
    ];
    for case in cases {
        let mut m = mesh();
        m.tunnel_pools = cidrs(&[case.pool]);
        let (nodes, mut peers) = three_nodes();
        for (i, (name, allowed, held, disabled)) in case.externals.iter().enumerate() {
            let mut p = external(name, 20 + i as u8, &[allowed]);
            p.tunnel_addresses = held.iter().map(|a| addr(a)).collect();
            p.disabled = *disabled;
            if *name == "duplicate" {
                p.public_key = key(20);
            }
            peers.push(p);
        }
        let d = compute(&m, &nodes, &peers);
        for (peer, addresses, reason) in &case.want {
            let want: Vec<IpAddr> = addresses.iter().map(|a| addr(a)).collect();
            assert_eq!(d.tunnel_addresses[*peer], want, "{}: {peer}", case.name);
            assert_eq!(
                refused(&d, peer).map(|r| r.0),
                *reason,
                "{}: {peer}",
                case.name
            );
        }
        // The result is a fixed point: fed back as what peers hold, nothing moves.
        let mut again = peers.clone();
        for p in &mut again {
            p.tunnel_addresses = d.tunnel_addresses[&p.name].clone();
        }
        let d2 = compute(&m, &nodes, &again);
        assert_eq!(d2.tunnel_addresses, d.tunnel_addresses, "{}", case.name);
        assert_eq!(d2.verdicts, d.verdicts, "{}", case.name);
    }
}

#[test]
fn keepalive_and_preshared_keys() {
    let mut m = mesh();
    m.persistent_keepalive = 25;
    m.preshared_key = Some(SecretInput::Present(b"mesh secret".to_vec()));
    let (nodes, mut peers) = three_nodes();
    peers[1].persistent_keepalive = Some(5);
    let mut ext = external("office", 20, &["192.168.50.0/24"]);
    ext.preshared_key = Some(SecretInput::Present(vec![7; 32]));
    peers.push(ext);
    let d = compute(&m, &nodes, &peers);
    assert_eq!(d.peers[&key(1)].persistent_keepalive, 25);
    assert_eq!(d.peers[&key(2)].persistent_keepalive, 5);
    assert_eq!(
        d.peers[&key(1)].preshared_key,
        PresharedKey::DerivedFromMesh
    );
    assert_eq!(
        d.peers[&key(20)].preshared_key,
        PresharedKey::Static(Key::from_bytes([7; 32]))
    );
    let secret = d.members["a"].mesh_secret.unwrap();
    let ab = pair_preshared_key(&secret, &key(1), &key(2));
    assert_eq!(
        ab,
        pair_preshared_key(&secret, &key(2), &key(1)),
        "symmetric"
    );
    assert_ne!(
        ab,
        pair_preshared_key(&secret, &key(1), &key(3)),
        "per pair"
    );
}

fn allowed_of(d: &DesiredMesh, node: &str, peer: &str) -> Option<Vec<String>> {
    assert!(d.members.contains_key(node), "{node} is a member");
    crate::node_config::NodeConfig::<()>::of(node, None, Arc::new(d.clone()))
        .peers()
        .find(|p| p.name == peer)
        .map(|p| p.allowed_ips.iter().map(ToString::to_string).collect())
}

#[test]
fn gateway_table() {
    // name, which of a/b/c are gateways, expected (node, peers it programs, allowed IPs it
    // gives node a), verdict of the external peer
    type Case<'a> = (
        &'a str,
        [bool; 3],
        Vec<(&'a str, Vec<&'a str>, Option<Vec<&'a str>>)>,
        Option<Reason>,
    );
    let a_plain = Some(vec!["10.244.1.0/24", "10.250.0.1/32"]);
    let a_routing = Some(vec![
        "10.244.1.0/24",
        "10.250.0.1/32",
        "10.250.1.9/32",
        "192.168.50.0/24",
    ]);
    let cases: Vec<Case> = vec![
        (
            "all nodes are gateways (the default): everyone programs the site",
            [true, true, true],
            vec![
                ("a", vec!["b", "c", "site"], None),
                ("b", vec!["a", "c", "site"], a_plain.clone()),
                ("c", vec!["a", "b", "site"], a_plain.clone()),
            ],
            None,
        ),
        (
            "a is the only gateway: b and c route the site through a",
            [true, false, false],
            vec![
                ("a", vec!["b", "c", "site"], None),
                ("b", vec!["a", "c"], a_routing.clone()),
                ("c", vec!["a", "b"], a_routing.clone()),
            ],
            None,
        ),
        (
            "a and c are gateways: b routes through the first, a",
            [true, false, true],
            vec![
                ("a", vec!["b", "c", "site"], None),
                ("b", vec!["a", "c"], a_routing.clone()),
                ("c", vec!["a", "b", "site"], a_plain.clone()),
            ],
            None,
        ),
        (
            "no gateway: the site is refused and nobody routes it",
            [false, false, false],
            vec![
                ("a", vec!["b", "c"], None),
                ("b", vec!["a", "c"], a_plain.clone()),
            ],
            Some(Reason::NoGateway),
        ),
    ];
    for (name, gateways, want, verdict) in cases {
        let (mut nodes, mut peers) = three_nodes();
        for (n, g) in nodes.iter_mut().zip(gateways) {
            n.gateway = g;
        }
        let mut site = external("site", 9, &["192.168.50.0/24"]);
        site.tunnel_addresses = vec!["10.250.1.9".parse().unwrap()];
        peers.push(site);
        let d = compute(&mesh(), &nodes, &peers);
        let expected_gateways: Vec<&str> = ["a", "b", "c"]
            .into_iter()
            .zip(gateways)
            .filter(|(_, g)| *g)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(d.gateways, expected_gateways, "{name}: gateways");
        for (node, programs, a_allowed) in want {
            assert_eq!(names_of(&d, node), programs, "{name}: peers of {node}");
            if let Some(a_allowed) = a_allowed {
                assert_eq!(
                    allowed_of(&d, node, "a"),
                    Some(a_allowed.iter().map(|s| s.to_string()).collect()),
                    "{name}: allowed IPs of a on {node}"
                );
            }
        }
        assert_eq!(refused(&d, "site").map(|r| r.0), verdict, "{name}: verdict");
    }
}

#[test]
fn the_active_gateway_carries_the_external_networks() {
    // a and c are gateways, b is interior: b gives the site's networks to the active one.
    let routing = |node: &str, tunnel: &str| -> Vec<String> {
        let mut v = vec![
            format!("10.244.{node}.0/24"),
            format!("10.250.0.{tunnel}/32"),
            "10.250.1.9/32".to_owned(),
            "192.168.50.0/24".to_owned(),
        ];
        v.sort();
        v
    };
    // (the mesh's hint, the active gateway, who routes the site on b)
    let cases = [
        (None, "a", "a"),
        (Some("c"), "c", "c"),
        (Some("b"), "a", "a"),
        (Some("gone"), "a", "a"),
    ];
    for (hint, active, router) in cases {
        let (mut nodes, mut peers) = three_nodes();
        nodes[1].gateway = false;
        let mut site = external("site", 9, &["192.168.50.0/24"]);
        site.tunnel_addresses = vec!["10.250.1.9".parse().unwrap()];
        peers.push(site);
        let mut m = mesh();
        m.active_gateway = hint.map(str::to_owned);
        let d = compute(&m, &nodes, &peers);
        assert_eq!(d.active_gateway.as_deref(), Some(active), "{hint:?}");
        for gw in ["a", "c"] {
            let allowed = allowed_of(&d, "b", gw).unwrap();
            let carries = allowed.contains(&"192.168.50.0/24".to_owned());
            assert_eq!(carries, gw == router, "{hint:?}: {gw} on b: {allowed:?}");
            if gw == router {
                let (pods, tunnel) = if gw == "a" { ("1", "1") } else { ("3", "3") };
                assert_eq!(allowed, routing(pods, tunnel), "{hint:?}");
            }
        }
    }
}

#[test]
fn removing_the_site_removes_its_routes_from_interior_nodes() {
    let (mut nodes, mut peers) = three_nodes();
    nodes[1].gateway = false;
    nodes[2].gateway = false;
    peers.push(external("site", 9, &["192.168.50.0/24"]));
    let with = compute(&mesh(), &nodes, &peers);
    peers.pop();
    let without = compute(&mesh(), &nodes, &peers);
    assert_ne!(allowed_of(&with, "b", "a"), allowed_of(&without, "b", "a"));
    assert_eq!(
        allowed_of(&without, "b", "a"),
        Some(vec!["10.244.1.0/24".into(), "10.250.0.1/32".into()])
    );
    assert!(without.interior_peers.values().all(|p| p.node.is_some()));
}

#[test]
fn peer_preshared_key_formats() {
    let k = Key::from_bytes([5; 32]);
    let text = k.to_string();
    let mut bad_last = text.clone();
    // The last character before the '=' carries 2 bits and 4 zero bits: only A, Q, g and w
    // are canonical.
    bad_last.replace_range(42..43, "B");
    let condensed = |b: &[u8]| Ok(mesh_secret_key(b));
    // name, Secret bytes, the key or a part of the error
    let cases: Vec<(&str, Vec<u8>, Result<Key, &str>)> = vec![
        ("wg genpsk text", format!("{text}\n").into_bytes(), Ok(k)),
        (
            "... with spaces around",
            format!("  {text} \r\n").into_bytes(),
            Ok(k),
        ),
        ("raw bytes", vec![5; 32], Ok(k)),
        (
            "a passphrase is condensed",
            b"hunter2".to_vec(),
            condensed(b"hunter2"),
        ),
        (
            "... a long one",
            b"correct horse battery staple and then some more words".to_vec(),
            condensed(b"correct horse battery staple and then some more words"),
        ),
        (
            "... 44 characters that are no base64",
            b"this passphrase has forty-four characters!!!".to_vec(),
            condensed(b"this passphrase has forty-four characters!!!"),
        ),
        (
            "... bytes that are no text",
            vec![0xff; 44],
            condensed(&[0xff; 44]),
        ),
        (
            "... 44 base64 characters without a '=' (openssl rand -base64 33)",
            b"q3Zt0m9Xc8hB2pKk1LwVvN7yRz4sTuFgAeDiHjMoPnQx".to_vec(),
            condensed(b"q3Zt0m9Xc8hB2pKk1LwVvN7yRz4sTuFgAeDiHjMoPnQx"),
        ),
        (
            "a key that lost its '='",
            format!("{}\n", &text[..43]).into_bytes(),
            Err("is 43 characters long"),
        ),
        (
            "a key with one '=' too many",
            format!("{text}=").into_bytes(),
            Err("is 45 characters long"),
        ),
        (
            "a typo in the last character",
            bad_last.into_bytes(),
            Err("does not decode to 32 bytes"),
        ),
    ];
    for (name, bytes, want) in cases {
        match (peer_preshared_key(&bytes), want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{name}"),
            (Err(e), Err(part)) => {
                assert!(e.contains(part), "{name}: {e}");
                assert!(e.contains("WireGuard key"), "{name}: {e}");
                let value = String::from_utf8_lossy(&bytes);
                assert!(
                    !e.contains(&value.trim()[..20]),
                    "{name}: the value leaks: {e}"
                );
            }
            (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
        }
    }
}

/// A peer's preshared key that looks like a key but is none refuses that peer only; the
/// mesh's secret is a passphrase whatever it looks like.
#[test]
fn a_damaged_preshared_key_refuses_its_peer_only() {
    // `wg genpsk` output without its '='.
    let damaged = Key::from_bytes([5; 32]).to_string().as_bytes()[..43].to_vec();
    let mut m = mesh();
    m.preshared_key = Some(SecretInput::Present(damaged.clone()));
    let (nodes, mut peers) = three_nodes();
    let mut site = external("site", 9, &["192.168.50.0/24"]);
    site.preshared_key = Some(SecretInput::Present(damaged.clone()));
    let mut office = external("office", 10, &["192.168.60.0/24"]);
    office.preshared_key = Some(SecretInput::Present(b"hunter2".to_vec()));
    peers.extend([site, office]);
    let d = compute(&m, &nodes, &peers);
    let (reason, message) = refused(&d, "site").expect("site refused");
    assert_eq!(reason, Reason::InvalidSpec, "{message}");
    assert!(
        message.contains("spec.presharedKeySecretRef") && message.contains("WireGuard key"),
        "{message}"
    );
    assert!(!d.peers.contains_key(&key(9)), "never programmed");
    assert_eq!(
        d.peers[&key(10)].preshared_key,
        PresharedKey::Static(mesh_secret_key(b"hunter2"))
    );
    assert_eq!(d.members.len(), 3, "the nodes are unaffected");
    assert_eq!(
        d.peers[&key(1)].preshared_key,
        PresharedKey::DerivedFromMesh
    );
    assert_eq!(d.members["a"].mesh_secret, Some(mesh_secret_key(&damaged)));
}

/// Whoever holds a key first keeps it: a node registering an older peer's key is refused, not
/// the victim (node peers are judged before external ones for their CIDRs, not their keys).
#[test]
fn public_key_table() {
    struct Case {
        name: &'static str,
        peers: fn() -> Vec<PeerInput>,
        programmed: &'static [&'static str],
        duplicate: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "a node registering an older external peer's key",
            peers: || {
                let mut c = node_peer("c", 30);
                c.public_key = key(9);
                vec![
                    node_peer("a", 1),
                    node_peer("b", 2),
                    c,
                    external("laptop", 9, &[]),
                ]
            },
            programmed: &["a", "b", "laptop"],
            duplicate: &["c"],
        },
        Case {
            name: "a node registering a newer node's key",
            peers: || {
                let mut c = node_peer("c", 30);
                c.public_key = key(2);
                vec![node_peer("a", 1), node_peer("b", 2), c]
            },
            programmed: &["a", "b"],
            duplicate: &["c"],
        },
        Case {
            name: "an external peer copying a node's key",
            peers: || {
                vec![
                    node_peer("a", 1),
                    node_peer("b", 2),
                    node_peer("c", 3),
                    external("copycat", 2, &[]),
                ]
            },
            programmed: &["a", "b", "c"],
            duplicate: &["copycat"],
        },
        Case {
            name: "a disabled holder gives its key up",
            peers: || {
                let mut old = external("old", 9, &[]);
                old.disabled = true;
                let mut c = node_peer("c", 30);
                c.public_key = key(9);
                vec![node_peer("a", 1), node_peer("b", 2), c, old]
            },
            programmed: &["a", "b", "c"],
            duplicate: &[],
        },
    ];
    let (nodes, _) = three_nodes();
    for case in cases {
        let d = compute(&mesh(), &nodes, &(case.peers)());
        for name in case.programmed {
            assert_eq!(refused(&d, name), None, "{}: {name}", case.name);
        }
        for name in case.duplicate {
            let (reason, message) =
                refused(&d, name).unwrap_or_else(|| panic!("{}: {name} refused", case.name));
            assert_eq!(
                reason,
                Reason::DuplicatePublicKey,
                "{}: {message}",
                case.name
            );
        }
    }
}

/// Claims that would route what nodes need into the tunnel are refused and never programmed.
#[test]
fn reserved_range_table() {
    let mut m = mesh();
    m.reserved = vec![
        ReservedRange::new("10.96.0.0/12".parse().unwrap(), "the Service CIDR"),
        ReservedRange::new("203.0.113.10/32".parse().unwrap(), "the API server"),
    ];
    let (mut nodes, node_peers) = three_nodes();
    for (i, n) in nodes.iter_mut().enumerate() {
        n.addresses = vec![format!("192.168.0.{}", i + 1).parse().unwrap()];
    }
    nodes[2].addresses.push("2001:db8::3".parse().unwrap());
    let cases: &[(&str, &str, Option<&str>)] = &[
        (
            "192.168.0.1/32",
            "a node's InternalIP",
            Some("an address of node a"),
        ),
        (
            "192.168.0.0/16",
            "a supernet of node addresses",
            Some("node"),
        ),
        (
            "2001:db8::/64",
            "a node's IPv6 address",
            Some("an address of node c"),
        ),
        ("169.254.169.254/32", "cloud metadata", Some("metadata")),
        ("127.0.0.0/8", "loopback", Some("loopback")),
        ("::1/128", "IPv6 loopback", Some("loopback")),
        ("fe80::/64", "IPv6 link-local", Some("link-local")),
        ("224.0.0.0/24", "multicast", Some("multicast")),
        ("ff02::/16", "IPv6 multicast", Some("multicast")),
        ("0.0.0.0/0", "the IPv4 default route", Some("this network")),
        ("::/0", "the IPv6 default route", Some("unspecified")),
        (
            "10.100.0.0/16",
            "inside the Service CIDR",
            Some("Service CIDR"),
        ),
        (
            "203.0.113.0/24",
            "the API server's network",
            Some("API server"),
        ),
        ("192.168.100.0/24", "a remote site's LAN", None),
        ("2001:db8:1::/48", "an IPv6 LAN beside a node's", None),
    ];
    for (claim, what, refusal) in cases {
        let mut peers = node_peers.clone();
        peers.push(external("site", 9, &[claim]));
        let d = compute(&m, &nodes, &peers);
        match (refused(&d, "site"), refusal) {
            (None, None) => assert!(d.peers.contains_key(&key(9)), "{what}"),
            (Some((reason, message)), Some(want)) => {
                assert_eq!(reason, Reason::ReservedRange, "{what}: {message}");
                assert!(message.contains(want), "{what}: {message}");
                assert!(!d.peers.contains_key(&key(9)), "{what}: never programmed");
            }
            (got, want) => panic!("{what}: got {got:?}, want a refusal naming {want:?}"),
        }
        assert_eq!(d.members.len(), 3, "{what}: the nodes are unaffected");
    }
}

/// `spec.node` is honoured only on the peer the controller created for that very Node.
#[test]
fn node_claim_ownership_table() {
    let cases: &[(&str, Option<&str>, bool)] = &[
        ("owned by the Node", Some("uid-c"), true),
        ("created by a user (no ownerReference)", None, false),
        (
            "owned by an earlier Node of the same name",
            Some("uid-old"),
            false,
        ),
    ];
    for (what, owner, member) in cases {
        let (nodes, mut peers) = three_nodes();
        peers[2].node_owner_uid = owner.map(str::to_owned);
        let d = compute(&mesh(), &nodes, &peers);
        assert_eq!(d.members.contains_key("c"), *member, "{what}");
        if !member {
            let (reason, message) = refused(&d, "c").expect("refused");
            assert_eq!(reason, Reason::NodePeerNotOwned, "{what}: {message}");
            assert!(!d.peers.contains_key(&key(3)), "{what}: never programmed");
        }
    }
}

#[test]
fn node_endpoint_table() {
    let named = |host: &str, port: Option<u16>| NodeEndpoint::Named {
        host: host.into(),
        port,
    };
    let v4: IpAddr = "203.0.113.7".parse().unwrap();
    let v6: IpAddr = "2001:db8::7".parse().unwrap();
    let cases: Vec<(&str, NodeEndpoint, Option<&str>, Option<&str>)> = vec![
        (
            "registered",
            NodeEndpoint::Registered,
            Some("192.168.1.2:51820"),
            Some("192.168.1.2:51820"),
        ),
        ("not registered yet", NodeEndpoint::Registered, None, None),
        (
            "an ExternalIP, the registered port",
            NodeEndpoint::Address(v4),
            Some("192.168.1.2:51821"),
            Some("203.0.113.7:51821"),
        ),
        (
            "an IPv6 address gets brackets",
            NodeEndpoint::Address(v6),
            Some("[fd00::2]:51820"),
            Some("[2001:db8::7]:51820"),
        ),
        (
            "an address before registration",
            NodeEndpoint::Address(v4),
            None,
            None,
        ),
        (
            "a name with its own port",
            named("n1.example.com", Some(4500)),
            None,
            Some("n1.example.com:4500"),
        ),
        (
            "a name, the registered port",
            named("n1.example.com", None),
            Some("192.168.1.2:51820"),
            Some("n1.example.com:51820"),
        ),
        (
            "a name, nothing registered",
            named("n1.example.com", None),
            None,
            None,
        ),
        (
            "an IPv6 literal by annotation",
            named("2001:db8::9", Some(1)),
            None,
            Some("[2001:db8::9]:1"),
        ),
        (
            "a host that is no address but looks like IPv6 keeps brackets",
            named("fe80::1%eth0", Some(1)),
            None,
            Some("[fe80::1%eth0]:1"),
        ),
    ];
    for (name, choice, registered, want) in cases {
        assert_eq!(
            node_endpoint(&choice, registered).as_deref(),
            want,
            "{name}"
        );
    }
}

#[test]
fn a_node_peer_is_published_at_the_endpoint_its_node_chooses() {
    let mut nodes = vec![
        node_at("n1", 1, "10.244.1.0/24"),
        node_at("n2", 2, "10.244.2.0/24"),
    ];
    nodes[1].endpoint = NodeEndpoint::Named {
        host: "n2.example.com".into(),
        port: None,
    };
    let peers = vec![node_peer("n1", 1), node_peer("n2", 2)];
    let desired = compute(&mesh(), &nodes, &peers);
    let n2 = desired
        .peers
        .values()
        .find(|p| p.node.as_deref() == Some("n2"))
        .unwrap();
    assert_eq!(n2.endpoint.as_deref(), Some("n2.example.com:51820"));
}

/// A node peer's registered endpoint comes from an annotation anyone who may patch
/// WireGuardPeers can rewrite: its address is published only when it is one of the Node's.
#[test]
fn registered_endpoint_table() {
    let v4 = |s: &str| -> IpAddr { s.parse().unwrap() };
    struct Case {
        name: &'static str,
        choice: NodeEndpoint,
        registered: Option<&'static str>,
        want: Option<&'static str>,
    }
    let registered = |name, registered, want| Case {
        name,
        choice: NodeEndpoint::Registered,
        registered,
        want,
    };
    let cases = [
        registered(
            "at its InternalIP",
            Some("192.168.0.2:51820"),
            Some("192.168.0.2:51820"),
        ),
        registered(
            "at its ExternalIP",
            Some("203.0.113.2:51821"),
            Some("203.0.113.2:51821"),
        ),
        registered(
            "at its IPv6 address",
            Some("[fd00::2]:51820"),
            Some("[fd00::2]:51820"),
        ),
        registered(
            "at cloud metadata: its first address, the registered port",
            Some("169.254.169.254:80"),
            Some("192.168.0.2:80"),
        ),
        registered(
            "at another node's address",
            Some("192.168.0.1:51820"),
            Some("192.168.0.2:51820"),
        ),
        registered(
            "at an address the Node no longer lists",
            Some("192.168.0.99:51820"),
            Some("192.168.0.2:51820"),
        ),
        registered(
            "at another node's IPv6 address",
            Some("[fd00::1]:51820"),
            Some("192.168.0.2:51820"),
        ),
        registered(
            "a name (never registered)",
            Some("evil.example:51820"),
            None,
        ),
        registered("a port alone", Some("51820"), None),
        registered("port 0", Some("192.168.0.2:0"), None),
        registered("nothing registered", None, None),
        Case {
            name: "a chosen address takes the registered port only",
            choice: NodeEndpoint::Address(v4("203.0.113.2")),
            registered: Some("169.254.169.254:4500"),
            want: Some("203.0.113.2:4500"),
        },
        Case {
            name: "a chosen name takes no port from a registered name",
            choice: NodeEndpoint::Named {
                host: "b.example.com".into(),
                port: None,
            },
            registered: Some("evil.example:4500"),
            want: None,
        },
    ];
    for case in cases {
        let mut a = node_at("a", 1, "10.244.1.0/24");
        a.addresses.push(v4("fd00::1"));
        let mut b = node_at("b", 2, "10.244.2.0/24");
        b.addresses = vec![v4("192.168.0.2"), v4("203.0.113.2"), v4("fd00::2")];
        b.host_addresses = vec![v4("192.168.0.2"), v4("fd00::2")];
        b.endpoint = case.choice;
        let mut peers = vec![node_peer("a", 1), node_peer("b", 2)];
        peers[1].endpoint = case.registered.map(str::to_owned);
        let d = compute(&mesh(), &[a, b], &peers);
        assert_eq!(d.verdicts["b"], Verdict::Programmed, "{}", case.name);
        assert_eq!(
            d.peers[&key(2)].endpoint.as_deref(),
            case.want,
            "{}",
            case.name
        );
        assert_eq!(
            d.peers[&key(1)].endpoint.as_deref(),
            Some("192.168.0.1:51820"),
            "{}: the others are unaffected",
            case.name
        );
    }

    // A Node that lists no address never registered (Register refuses it): nothing is
    // published, whatever the annotation says.
    let nodes = [node_at("a", 1, "10.244.1.0/24"), node("b", "10.244.2.0/24")];
    let mut peers = vec![node_peer("a", 1), node_peer("b", 2)];
    peers[1].endpoint = Some("169.254.169.254:80".into());
    let d = compute(&mesh(), &nodes, &peers);
    assert_eq!(d.verdicts["b"], Verdict::Programmed);
    assert_eq!(d.peers[&key(2)].endpoint, None);
}

#[test]
fn host_encryption_table() {
    struct Case {
        name: &'static str,
        host_encryption: bool,
        edit: fn(&mut MeshInput, &mut Vec<NodeInput>),
        /// Node b's allowed IPs as the others program them.
        b_allowed: &'static [&'static str],
    }
    let cases = [
        Case {
            name: "off: pod CIDR and tunnel address only",
            host_encryption: false,
            edit: |_, _| {},
            b_allowed: &["10.244.2.0/24", "10.250.0.2/32"],
        },
        Case {
            name: "on: b's InternalIPs, both families, not its ExternalIP",
            host_encryption: true,
            edit: |_, _| {},
            b_allowed: &[
                "10.244.2.0/24",
                "10.250.0.2/32",
                "192.168.0.2/32",
                "fd00::2/128",
            ],
        },
        Case {
            name: "an address another Node also lists goes to neither",
            host_encryption: true,
            edit: |_, nodes| nodes[2].addresses.push("192.168.0.2".parse().unwrap()),
            b_allowed: &["10.244.2.0/24", "10.250.0.2/32", "fd00::2/128"],
        },
        Case {
            name: "the API server's address (a reserved range) stays direct",
            host_encryption: true,
            edit: |mesh, _| {
                mesh.reserved.push(ReservedRange::new(
                    "192.168.0.2/32".parse().unwrap(),
                    "the API server",
                ))
            },
            b_allowed: &["10.244.2.0/24", "10.250.0.2/32", "fd00::2/128"],
        },
        Case {
            name: "loopback and link-local are never routed",
            host_encryption: true,
            edit: |_, nodes| {
                nodes[1].host_addresses =
                    vec!["127.0.0.2".parse().unwrap(), "fe80::2".parse().unwrap()]
            },
            b_allowed: &["10.244.2.0/24", "10.250.0.2/32"],
        },
    ];
    for case in cases {
        let (mut nodes, peers) = three_nodes();
        for (i, n) in nodes.iter_mut().enumerate() {
            let internal: Vec<IpAddr> = vec![
                format!("192.168.0.{}", i + 1).parse().unwrap(),
                format!("fd00::{}", i + 1).parse().unwrap(),
            ];
            n.addresses = internal.clone();
            n.addresses
                .push(format!("203.0.113.{}", i + 1).parse().unwrap());
            n.host_addresses = internal;
        }
        let mut m = mesh();
        m.host_encryption = case.host_encryption;
        (case.edit)(&mut m, &mut nodes);
        let d = compute(&m, &nodes, &peers);
        let got: Vec<String> = d.peers[&key(2)]
            .allowed_ips
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, case.b_allowed, "{}", case.name);
        assert!(
            d.verdicts.values().all(|v| *v == Verdict::Programmed),
            "{}: host addresses are no claim to judge",
            case.name
        );
    }
}

/// The peers `node` is sent, as it is sent them (the relay without its own networks), as
/// (name, allowed IPs, keepalive).
fn sent_to(d: &DesiredMesh, node: &str) -> Vec<(String, Vec<String>, u16)> {
    let view = crate::node_config::NodeConfig::<()>::of(node, None, Arc::new(d.clone()));
    view.peers()
        .map(|p| {
            let p = view.as_sent(p);
            let allowed = p.allowed_ips.iter().map(ToString::to_string).collect();
            (p.name.clone(), allowed, p.persistent_keepalive)
        })
        .collect()
}

/// A peer as a node is sent it: (name, allowed IPs, keepalive).
type Sent = (&'static str, Vec<String>, u16);

#[test]
fn nat_relay_table() {
    struct Case {
        name: &'static str,
        behind_nat: [bool; 4],
        /// The gateway chosen as active (`None`: the first).
        active: Option<&'static str>,
        keepalive: u16,
        relay: Option<&'static str>,
        gateways: Vec<&'static str>,
        /// node -> (peer, allowed IPs, keepalive) it is sent
        want: Vec<(&'static str, Vec<Sent>)>,
    }
    let ips = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let own = |n: u8| vec![format!("10.244.{n}.0/24"), format!("10.250.0.{n}/32")];
    let plain = |name: &'static str, n: u8, keepalive: u16| (name, own(n), keepalive);
    let cases = vec![
        Case {
            name: "b and c behind NAT: each reaches the other through a, the first gateway",
            behind_nat: [false, true, true, false],
            active: None,
            keepalive: 0,
            relay: Some("a"),
            gateways: vec!["a", "d"],
            want: vec![
                (
                    "a",
                    vec![plain("b", 2, 0), plain("c", 3, 0), plain("d", 4, 0)],
                ),
                (
                    "b",
                    vec![
                        (
                            "a",
                            ips(&[
                                "10.244.1.0/24",
                                "10.244.3.0/24",
                                "10.250.0.1/32",
                                "10.250.0.3/32",
                            ]),
                            25,
                        ),
                        plain("d", 4, 25),
                    ],
                ),
                (
                    "c",
                    vec![
                        (
                            "a",
                            ips(&[
                                "10.244.1.0/24",
                                "10.244.2.0/24",
                                "10.250.0.1/32",
                                "10.250.0.2/32",
                            ]),
                            25,
                        ),
                        plain("d", 4, 25),
                    ],
                ),
                (
                    "d",
                    vec![plain("a", 1, 0), plain("b", 2, 0), plain("c", 3, 0)],
                ),
            ],
        },
        Case {
            name: "the relay follows the active gateway; the mesh's keepalive is kept",
            behind_nat: [false, true, true, false],
            active: Some("d"),
            keepalive: 10,
            relay: Some("d"),
            gateways: vec!["a", "d"],
            want: vec![(
                "b",
                vec![
                    plain("a", 1, 10),
                    (
                        "d",
                        ips(&[
                            "10.244.3.0/24",
                            "10.244.4.0/24",
                            "10.250.0.3/32",
                            "10.250.0.4/32",
                        ]),
                        10,
                    ),
                ],
            )],
        },
        Case {
            name: "one node behind NAT: the relay carries nothing more for it",
            behind_nat: [true, false, false, false],
            active: None,
            keepalive: 0,
            relay: Some("b"),
            gateways: vec!["b", "c", "d"],
            want: vec![
                (
                    "a",
                    vec![plain("b", 2, 25), plain("c", 3, 25), plain("d", 4, 25)],
                ),
                (
                    "b",
                    vec![plain("a", 1, 0), plain("c", 3, 0), plain("d", 4, 0)],
                ),
            ],
        },
        Case {
            name: "every node behind NAT: no relay, direct sessions kept alive",
            behind_nat: [true, true, true, true],
            active: None,
            keepalive: 0,
            relay: None,
            gateways: vec![],
            want: vec![(
                "a",
                vec![plain("b", 2, 25), plain("c", 3, 25), plain("d", 4, 25)],
            )],
        },
        Case {
            name: "nobody behind NAT: no relay view",
            behind_nat: [false; 4],
            active: None,
            keepalive: 0,
            relay: Some("a"),
            gateways: vec!["a", "b", "c", "d"],
            want: vec![(
                "b",
                vec![plain("a", 1, 0), plain("c", 3, 0), plain("d", 4, 0)],
            )],
        },
    ];
    for c in cases {
        let mut m = mesh();
        m.persistent_keepalive = c.keepalive;
        m.active_gateway = c.active.map(str::to_owned);
        let names = ["a", "b", "c", "d"];
        let nodes: Vec<NodeInput> = names
            .iter()
            .zip(c.behind_nat)
            .enumerate()
            .map(|(i, (n, nat))| NodeInput {
                behind_nat: nat,
                ..node(n, &format!("10.244.{}.0/24", i + 1))
            })
            .collect();
        let peers: Vec<PeerInput> = (1..=4).map(|i| node_peer(names[i - 1], i as u8)).collect();
        let d = compute(&m, &nodes, &peers);
        assert_eq!(d.relay.as_deref(), c.relay, "{}: relay", c.name);
        assert_eq!(d.gateways, c.gateways, "{}: gateways", c.name);
        assert_eq!(
            d.nat_peers.is_empty(),
            !c.behind_nat.contains(&true),
            "{}: the view behind NAT exists only when needed",
            c.name
        );
        for (node, want) in c.want {
            let want: Vec<(String, Vec<String>, u16)> = want
                .into_iter()
                .map(|(p, allowed, k)| (p.to_owned(), allowed, k))
                .collect();
            assert_eq!(sent_to(&d, node), want, "{}: sent to {node}", c.name);
        }
    }
}

#[test]
fn nat_views_are_shared() {
    // Every node behind NAT sees the same peer objects: one view, not one per node.
    let nodes: Vec<NodeInput> = (1..=6)
        .map(|i| NodeInput {
            behind_nat: i > 1,
            ..node(&format!("n{i}"), &format!("10.244.{i}.0/24"))
        })
        .collect();
    let peers: Vec<PeerInput> = (1..=6).map(|i| node_peer(&format!("n{i}"), i)).collect();
    let d = Arc::new(compute(&mesh(), &nodes, &peers));
    let view = |n: &str| crate::node_config::NodeConfig::<()>::of(n, None, d.clone());
    let (v2, v3) = (view("n2"), view("n3"));
    assert!(std::ptr::eq(v2.shared_peers(), v3.shared_peers()));
    assert!(std::ptr::eq(v2.shared_peers(), &d.nat_peers));
}

#[test]
fn a_node_endpoint_agents_would_refuse_is_not_published() {
    let mut nodes = vec![
        node_at("n1", 1, "10.244.1.0/24"),
        node_at("n2", 2, "10.244.2.0/24"),
    ];
    // What a zone in the endpoint annotation used to make (the annotation is refused now).
    nodes[1].endpoint = NodeEndpoint::Named {
        host: "fe80::1%eth0".into(),
        port: Some(51820),
    };
    let d = compute(&mesh(), &nodes, &[node_peer("n1", 1), node_peer("n2", 2)]);
    assert_eq!(d.verdicts["n2"], Verdict::Programmed);
    assert_eq!(d.peers[&key(2)].endpoint, None);
    assert_eq!(
        d.peers[&key(1)].endpoint.as_deref(),
        Some("192.168.0.1:51820")
    );
}

#[test]
fn nat_endpoint_table() {
    // name, observed (the relay's report, in status.endpoint), published
    let cases: Vec<(&str, Option<&str>, Option<&str>)> = vec![
        (
            "nothing observed yet: none, never the private address",
            None,
            None,
        ),
        (
            "the NAT's address",
            Some("198.51.100.7:40001"),
            Some("198.51.100.7:40001"),
        ),
        (
            "an IPv6 one",
            Some("[2001:db8::5]:40001"),
            Some("[2001:db8::5]:40001"),
        ),
        (
            "its own Node's address (an ExternalIP on the NAT)",
            Some("203.0.113.2:51820"),
            Some("203.0.113.2:51820"),
        ),
        ("another node's address", Some("192.0.2.1:51820"), None),
        ("loopback", Some("127.0.0.1:51820"), None),
        ("cloud metadata", Some("169.254.169.254:80"), None),
        ("the Service CIDR", Some("10.96.0.1:443"), None),
        ("the tunnel pool", Some("10.250.0.1:51820"), None),
        ("a name", Some("nat.example.com:51820"), None),
        ("port 0", Some("198.51.100.7:0"), None),
    ];
    for (name, observed, want) in cases {
        let mut m = mesh();
        m.reserved = vec![ReservedRange::new(
            "10.96.0.0/12".parse().unwrap(),
            "the Service CIDR",
        )];
        let mut a = node("a", "10.244.1.0/24");
        a.addresses = vec!["192.168.0.1".parse().unwrap(), "192.0.2.1".parse().unwrap()];
        let mut b = node("b", "10.244.2.0/24");
        b.behind_nat = true;
        b.addresses = vec![
            "192.168.7.2".parse().unwrap(),
            "203.0.113.2".parse().unwrap(),
        ];
        let mut peers = vec![node_peer("a", 1), node_peer("b", 2)];
        peers[1].last_seen_endpoint = observed.map(str::to_owned);
        let d = compute(&m, &[a, b], &peers);
        assert_eq!(d.peers[&key(2)].endpoint.as_deref(), want, "{name}");
        // A reachable node keeps its own endpoint whatever was observed.
        assert_eq!(
            d.peers[&key(1)].endpoint.as_deref(),
            Some("192.168.0.1:51820"),
            "{name}"
        );
    }
}

#[test]
fn tunnel_pool_table() {
    let mut a = node("a", "10.244.1.0/24");
    a.addresses = vec!["192.168.0.2".parse().unwrap()];
    a.host_addresses = vec!["172.16.0.2".parse().unwrap()];
    // A Node the mesh does not select still owns its pods' addresses.
    let mut c = node("c", "fd00:244:3::/64");
    c.selected = false;
    let nodes = vec![a, node("b", "10.244.2.0/24"), c];
    let cases: &[(&str, &[&str], Option<&str>)] = &[
        ("the usual", &["10.250.0.0/16", "fd00:250::/64"], None),
        (
            "the smallest that fits two",
            &["10.250.0.0/30", "fd00::/126"],
            None,
        ),
        ("a /31", &["10.250.0.0/31"], Some("too small")),
        ("a /32", &["10.250.0.1/32"], Some("too small")),
        ("a /128", &["fd00::1/128"], Some("too small")),
        ("loopback", &["127.0.0.0/8"], Some("IPv4 loopback")),
        (
            "the IPv6 default route",
            &["10.250.0.0/16", "::/0"],
            Some("::/0 overlaps"),
        ),
        ("link-local", &["169.254.0.0/24"], Some("link-local")),
        (
            "the Service CIDR",
            &["10.96.0.0/16"],
            Some("the Service CIDR"),
        ),
        (
            "a node's InternalIP",
            &["192.168.0.0/16"],
            Some("an address of node a"),
        ),
        (
            "a node's host address",
            &["172.16.0.0/24"],
            Some("172.16.0.2"),
        ),
        (
            "over nodes' pod CIDRs",
            &["10.244.0.0/16"],
            Some("overlaps 10.244.1.0/24, the pod CIDR of node a"),
        ),
        (
            "inside a node's pod CIDR",
            &["10.244.2.128/25"],
            Some("overlaps 10.244.2.0/24, the pod CIDR of node b"),
        ),
        (
            "the pod CIDR of a Node the mesh does not select",
            &["10.250.0.0/16", "fd00:244:3::/96"],
            Some("the pod CIDR of node c"),
        ),
        (
            "beside the pod CIDRs",
            &["10.244.3.0/24", "fd00:244:4::/64"],
            None,
        ),
        (
            "two IPv4 pools, one inside the other",
            &["10.250.0.0/21", "10.250.0.0/30"],
            Some("of one address family"),
        ),
        (
            "two IPv6 pools",
            &["fd00:250::/64", "10.250.0.0/16", "fd00:251::/64"],
            Some("fd00:250::/64 and fd00:251::/64"),
        ),
    ];
    for (name, pools, want) in cases {
        let mut m = mesh();
        m.tunnel_pools = cidrs(pools);
        m.reserved = vec![ReservedRange::new(
            "10.96.0.0/12".parse().unwrap(),
            "the Service CIDR",
        )];
        match (check_tunnel_pools(&m, &nodes), want) {
            (Ok(()), None) => {}
            (Err(e), Some(part)) => assert!(e.contains(part), "{name}: {e}"),
            (got, _) => panic!("{name}: want {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn allowed_ips_over_the_endpoint_need_a_mesh_fwmark() {
    let mut site = external("site", 10, &["203.0.113.0/24"]);
    site.endpoint = Some("203.0.113.1:51820".into());
    for (marked, refused_with) in [(false, Some(Reason::AllowedIpsOverlap)), (true, None)] {
        let (nodes, mut peers) = three_nodes();
        peers.push(site.clone());
        let mesh = MeshInput {
            marks_tunnel_packets: marked,
            ..mesh()
        };
        let d = compute(&mesh, &nodes, &peers);
        assert_eq!(
            refused(&d, "site").map(|(r, _)| r),
            refused_with,
            "fwmark {marked}"
        );
    }
}

/// Without a fwmark, a peer's allowed IPs may not cover another peer's endpoint, nor may an
/// endpoint lie inside another peer's allowed IPs: the tunnel's packets to it would be routed
/// into a tunnel and that peer could never be reached. The older one keeps its place; with
/// a fwmark both are programmed.
#[test]
fn allowed_ips_over_another_peers_endpoint_need_a_mesh_fwmark() {
    let mut site = external("site", 10, &["192.168.70.0/24"]);
    site.endpoint = Some("203.0.113.1:51820".into());
    // Newer, claiming the range site's endpoint is in.
    let grabber = external("grabber", 11, &["203.0.113.0/24"]);
    // Newer, its endpoint inside what site claims.
    let mut behind = external("behind", 12, &["192.168.71.0/24"]);
    behind.endpoint = Some("192.168.70.9:51820".into());
    // Newer, its own endpoint elsewhere: unaffected.
    let mut elsewhere = external("elsewhere", 13, &["192.168.72.0/24"]);
    elsewhere.endpoint = Some("198.51.100.9:51820".into());
    // A responder's endpoint is never sent to: inside site's claim is fine.
    let mut responder = external("responder", 14, &["192.168.73.0/24"]);
    responder.responder = true;
    responder.endpoint = Some("192.168.70.10:51820".into());
    for marked in [false, true] {
        let (nodes, mut peers) = three_nodes();
        peers.push(responder.clone());
        peers.extend([
            site.clone(),
            grabber.clone(),
            behind.clone(),
            elsewhere.clone(),
        ]);
        let mesh = MeshInput {
            marks_tunnel_packets: marked,
            ..mesh()
        };
        let d = compute(&mesh, &nodes, &peers);
        assert_eq!(
            refused(&d, "site"),
            None,
            "fwmark {marked}: the older keeps its place"
        );
        assert_eq!(refused(&d, "elsewhere"), None, "fwmark {marked}");
        assert_eq!(refused(&d, "responder"), None, "fwmark {marked}");
        for (name, part) in [
            (
                "grabber",
                "covers 203.0.113.1, the endpoint of WireGuardPeer site",
            ),
            (
                "behind",
                "192.168.70.9 is inside 192.168.70.0/24, WireGuardPeer site",
            ),
        ] {
            match (marked, refused(&d, name)) {
                (true, None) => {}
                (false, Some((Reason::AllowedIpsOverlap, message))) => {
                    assert!(message.contains(part), "{name}: {message}")
                }
                (_, got) => panic!("fwmark {marked}, {name}: {got:?}"),
            }
        }
    }
}
