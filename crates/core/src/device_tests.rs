use super::*;

fn config(n: u8, endpoint: Option<&str>, allowed: &[&str]) -> PeerConfig {
    PeerConfig {
        public_key: PublicKey::from_bytes([n; 32]),
        endpoint: endpoint.map(|e| e.parse().unwrap()),
        allowed_ips: allowed
            .iter()
            .map(|c| Cidr::parse_masked(c).unwrap())
            .collect(),
        persistent_keepalive: 0,
        preshared_key: None,
    }
}

fn observed(peers: Vec<PeerConfig>, port: u16, fwmark: u32) -> DeviceState {
    DeviceState {
        public_key: PublicKey::from_bytes([0; 32]),
        listen_port: port,
        fwmark,
        peers: peers
            .into_iter()
            .map(|config| PeerState {
                current_endpoint: config.endpoint,
                config,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
            })
            .collect(),
    }
}

fn summary(changes: &[DeviceChange]) -> Vec<String> {
    changes
        .iter()
        .map(|c| match c {
            DeviceChange::UpsertPeer(p) => format!("+{}", p.public_key.as_bytes()[0]),
            DeviceChange::RemovePeer(k) => format!("-{}", k.as_bytes()[0]),
            DeviceChange::SetListenPort(p) => format!("port {p}"),
            DeviceChange::SetFwmark(m) => format!("mark {m}"),
            DeviceChange::SetPrivateKey(_) => "key".into(),
        })
        .collect()
}

#[test]
fn device_changes_table() {
    let a = config(1, Some("192.0.2.1:51820"), &["10.244.1.0/24"]);
    let b = config(2, Some("192.0.2.2:51820"), &["10.244.2.0/24"]);
    let roaming_b = config(2, None, &["10.244.2.0/24"]);
    let b_moved = config(2, Some("192.0.2.9:51820"), &["10.244.2.0/24"]);
    let b_more = config(
        2,
        Some("192.0.2.2:51820"),
        &["10.244.2.0/24", "10.250.0.2/32"],
    );
    let b_more_reordered = config(
        2,
        Some("192.0.2.2:51820"),
        &["10.250.0.2/32", "10.244.2.0/24", "10.250.0.2/32"],
    );
    let b_keepalive = PeerConfig {
        persistent_keepalive: 25,
        ..b.clone()
    };
    let b_psk = PeerConfig {
        preshared_key: Some(Key::from_bytes([7; 32])),
        ..b.clone()
    };
    let stranger = config(9, Some("198.51.100.9:51820"), &["10.99.0.0/24"]);
    // name, device has, wanted, expected changes
    type Case<'a> = (&'a str, Vec<PeerConfig>, Vec<PeerConfig>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "nothing to do",
            vec![a.clone(), b.clone()],
            vec![a.clone(), b.clone()],
            vec![],
        ),
        (
            "add",
            vec![a.clone()],
            vec![a.clone(), b.clone()],
            vec!["+2"],
        ),
        (
            "remove",
            vec![a.clone(), b.clone()],
            vec![a.clone()],
            vec!["-2"],
        ),
        (
            "a peer found on an adopted device that is not wanted goes",
            vec![a.clone(), stranger],
            vec![a.clone()],
            vec!["-9"],
        ),
        (
            "allowed IPs changed",
            vec![a.clone(), b.clone()],
            vec![a.clone(), b_more.clone()],
            vec!["+2"],
        ),
        (
            "the same allowed IPs in another order and repeated: nothing",
            vec![b_more],
            vec![b_more_reordered],
            vec![],
        ),
        (
            "keepalive changed",
            vec![b.clone()],
            vec![b_keepalive],
            vec!["+2"],
        ),
        (
            "preshared key set",
            vec![b.clone()],
            vec![b_psk],
            vec!["+2"],
        ),
        (
            "endpoint changed",
            vec![b.clone()],
            vec![b_moved],
            vec!["+2"],
        ),
        (
            "no endpoint wanted leaves a roamed one alone",
            vec![b.clone()],
            vec![roaming_b],
            vec![],
        ),
        (
            "from an empty device",
            vec![],
            vec![a.clone(), b.clone()],
            vec!["+1", "+2"],
        ),
    ];
    for (name, have, want, expected) in cases {
        assert_eq!(
            summary(&device_changes(
                &observed(have, 51820, 0),
                &want,
                &[],
                51820,
                0
            )),
            expected,
            "{name}"
        );
    }
}

/// A peer the device saw roam keeps its roamed endpoint while the controller still asks for
/// the one it asked for before; a new endpoint from the controller is pushed.
#[test]
fn roamed_endpoints_are_not_pushed_back() {
    let configured = config(2, Some("192.0.2.2:51820"), &["10.244.2.0/24"]);
    let roamed = config(2, Some("198.51.100.7:40000"), &["10.244.2.0/24"]);
    let moved = config(2, Some("192.0.2.9:51820"), &["10.244.2.0/24"]);
    let unset = config(2, None, &["10.244.2.0/24"]);
    // device, wanted, asked last time, expected
    let cases = [
        (&roamed, &configured, vec![configured.clone()], vec![]),
        (&roamed, &moved, vec![configured.clone()], vec!["+2"]),
        (&roamed, &configured, vec![], vec!["+2"]),
        // Asked before, but the device has none (someone cleared it): never roamed.
        (&unset, &configured, vec![configured.clone()], vec!["+2"]),
        (&configured, &configured, vec![configured.clone()], vec![]),
    ];
    for (on_device, want, previous, expected) in cases {
        let device = observed(vec![on_device.clone()], 51820, 0);
        assert_eq!(
            summary(&device_changes(
                &device,
                std::slice::from_ref(want),
                &previous,
                51820,
                0
            )),
            expected,
            "{want:?} after {previous:?}"
        );
    }
}

/// A roamed peer updated for another reason (its allowed IPs, keepalive or preshared key)
/// keeps its roamed endpoint: the kernel sets whatever endpoint an update carries, so
/// carrying the configured one would send the peer's traffic back where it no longer is.
#[test]
fn an_update_for_another_reason_keeps_the_roamed_endpoint() {
    let configured = config(2, Some("192.0.2.2:51820"), &["10.244.2.0/24"]);
    let roamed = config(2, Some("198.51.100.7:40000"), &["10.244.2.0/24"]);
    let device = observed(vec![roamed.clone()], 51820, 0);
    let wider = config(
        2,
        Some("192.0.2.2:51820"),
        &["10.244.2.0/24", "10.99.0.0/24"],
    );
    let keepalive = PeerConfig {
        persistent_keepalive: 25,
        ..configured.clone()
    };
    let psk = PeerConfig {
        preshared_key: Some(Key::from_bytes([7; 32])),
        ..configured.clone()
    };
    for want in [wider, keepalive, psk] {
        let changes = device_changes(
            &device,
            std::slice::from_ref(&want),
            std::slice::from_ref(&configured),
            51820,
            0,
        );
        let [DeviceChange::UpsertPeer(sent)] = changes.as_slice() else {
            panic!("one update wanted for {want:?}: {changes:?}");
        };
        assert_eq!(sent.endpoint, roamed.endpoint, "{want:?}");
        assert_eq!(
            PeerConfig {
                endpoint: want.endpoint,
                ..sent.clone()
            },
            want
        );
    }
    // A new endpoint from the controller is still pushed with the rest.
    let moved_and_wider = config(2, Some("192.0.2.9:51820"), &["10.99.0.0/24"]);
    let changes = device_changes(
        &device,
        std::slice::from_ref(&moved_and_wider),
        std::slice::from_ref(&configured),
        51820,
        0,
    );
    let [DeviceChange::UpsertPeer(sent)] = changes.as_slice() else {
        panic!("{changes:?}");
    };
    assert_eq!(sent, &moved_and_wider);
}

#[test]
fn port_and_mark() {
    let device = observed(vec![], 51820, 0);
    // wanted port, wanted mark, expected
    for (port, mark, expected) in [
        (51820, 0, vec![]),
        (0, 0, vec![]),
        (51821, 0, vec!["port 51821"]),
        (51820, 0x57, vec!["mark 87"]),
        (51000, 0x57, vec!["port 51000", "mark 87"]),
    ] {
        assert_eq!(
            summary(&device_changes(&device, &[], &[], port, mark)),
            expected,
            "{port} {mark}"
        );
    }
}
