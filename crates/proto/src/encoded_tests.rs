//! Peers encoded once and shared ([`crate::encoded::EncodedPeer`]) are, on the wire, exactly
//! the `Peer` each node would get encoded for it alone.

use std::sync::Arc;

use prost::Message;
use wgmesh_core::desired::{DesiredPeer, MeshInput, PeerInput, SecretInput};
use wgmesh_core::node_config::NodeConfig;

use crate::encode::{encoded_peer, peer};
use crate::parts_tests::{key, mesh_with};
use crate::{MeshSettings, Peer};

fn external(name: &str, n: u16, preshared_key: Option<SecretInput>) -> PeerInput {
    PeerInput {
        name: name.into(),
        created: 1000 + i64::from(n),
        public_key: key(n),
        allowed_ips: vec![format!("192.168.{}.0/24", n % 256).parse().unwrap()],
        endpoint: Some(format!("203.0.113.{}:51820", n % 256)),
        persistent_keepalive: Some(25),
        preshared_key,
        last_seen_endpoint: None,
        previously_programmed: false,
        seniority: 0,
        responder: false,
        disabled: false,
        node: None,
        node_owner_uid: None,
        tunnel_addresses: vec![format!("10.250.200.{}", n % 256).parse().unwrap()],
    }
}

#[test]
fn an_encoded_peer_is_the_peer_on_the_wire() {
    struct Case {
        name: &'static str,
        mesh: MeshInput,
        external: Vec<PeerInput>,
    }
    let cases = [
        Case {
            name: "no preshared keys",
            mesh: MeshInput::default(),
            external: vec![external("laptop", 500, None)],
        },
        Case {
            name: "a static key on an external peer",
            mesh: MeshInput::default(),
            external: vec![external(
                "phone",
                501,
                Some(SecretInput::Present(vec![9; 32])),
            )],
        },
        Case {
            name: "keys derived per pair from the mesh secret",
            mesh: MeshInput {
                preshared_key: Some(SecretInput::Present(vec![5; 32])),
                ..MeshInput::default()
            },
            external: vec![external("laptop", 500, None)],
        },
    ];
    for case in cases {
        let desired = mesh_with(4, case.mesh, case.external);
        // Every node's view, sharing the same peers: the memo made for one serves them all.
        for node in ["n0", "n1", "n3"] {
            let view: NodeConfig<MeshSettings> = NodeConfig::of(node, None, desired.clone());
            assert_eq!(
                view.peers().count(),
                4,
                "{}: {node} has the other nodes and the external peer",
                case.name
            );
            for p in view.peers() {
                let sent = encoded_peer(p, &view);
                let bytes = sent.encode_to_vec();
                assert_eq!(sent.encoded_len(), bytes.len(), "{}: {}", case.name, p.name);
                let decoded = Peer::decode(&bytes[..]).expect("decodes as a Peer");
                assert_eq!(
                    decoded,
                    peer(p, &view),
                    "{}: {} to {node}",
                    case.name,
                    p.name
                );
            }
        }
    }
}

#[test]
fn a_changed_copy_of_a_sent_peer_is_encoded_anew() {
    let desired = mesh_with(3, MeshInput::default(), Vec::new());
    let view: NodeConfig<MeshSettings> = NodeConfig::of("n0", None, desired);
    let sent: &Arc<DesiredPeer> = view.peers().next().expect("a peer");
    let _ = encoded_peer(sent, &view);
    let mut moved = (**sent).clone();
    moved.endpoint = Some("198.51.100.7:51820".into());
    let decoded = Peer::decode(&encoded_peer(&moved, &view).encode_to_vec()[..]).unwrap();
    assert_eq!(decoded.endpoint, "198.51.100.7:51820");
    assert_eq!(decoded, peer(&moved, &view));
}

#[test]
fn debug_never_shows_an_encoded_preshared_key() {
    let desired = mesh_with(
        2,
        MeshInput::default(),
        vec![external(
            "phone",
            501,
            Some(SecretInput::Present(vec![0xab; 32])),
        )],
    );
    let view: NodeConfig<MeshSettings> = NodeConfig::of("n0", None, desired);
    let phone = view.peers().find(|p| p.name == "phone").expect("the phone");
    let debug = format!("{:?}", encoded_peer(phone, &view));
    assert!(debug.contains("<redacted>"), "{debug}");
    assert!(!debug.contains("171"), "no byte of the key: {debug}");
}
