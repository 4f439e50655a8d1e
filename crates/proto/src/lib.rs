//! The `wgmesh.v1` gRPC API between the controller and the node agents, generated from
//! `proto/wgmesh/v1/mesh.proto` (read it for what every message and field means).

/// Generated code of package `wgmesh.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("wgmesh.v1");
}

pub use v1::*;

/// The service as the controller serves it: the same messages on the wire, but the stream's
/// peers are [`encoded::EncodedPeer`]s, each encoded once and shared by every stream.
pub mod served {
    #![allow(clippy::all, clippy::pedantic)]
    include!(concat!(env!("OUT_DIR"), "/served/wgmesh.v1.rs"));
}

pub mod checked;
pub mod decode;
pub mod encode;
pub mod encoded;

/// By hand (the build skips the generated one): the preshared key is the one secret on this
/// API, so it shows only as present or not.
impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured, so that a new field fails to compile here until it is shown.
        let Peer {
            public_key,
            name,
            endpoint,
            allowed_ips,
            persistent_keepalive,
            preshared_key,
            node,
        } = self;
        let psk = if preshared_key.is_empty() {
            "<none>"
        } else {
            "<redacted>"
        };
        f.debug_struct("Peer")
            .field("public_key", public_key)
            .field("name", name)
            .field("endpoint", endpoint)
            .field("allowed_ips", allowed_ips)
            .field("persistent_keepalive", persistent_keepalive)
            .field("preshared_key", &format_args!("{psk}"))
            .field("node", node)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #12, item 12: the only secret on this API is a peer's preshared key; `Debug`
    /// of a message holding one (directly or nested) never shows it. Public keys still show.
    #[test]
    fn debug_never_shows_a_preshared_key() {
        let psk: Vec<u8> = (101..=132).collect();
        let public: Vec<u8> = (1..=32).collect();
        let peer = Peer {
            public_key: public.clone(),
            name: "alice".into(),
            endpoint: "192.0.2.1:51820".into(),
            allowed_ips: vec!["10.0.0.1/32".into()],
            persistent_keepalive: 25,
            preshared_key: psk.clone(),
            node: String::new(),
        };
        let snapshot = PeerSnapshot {
            peers: vec![peer.clone()],
            ..PeerSnapshot::default()
        };
        let delta = PeerDelta {
            upserted: vec![peer.clone()],
            ..PeerDelta::default()
        };
        let update = PeerUpdate {
            update: Some(peer_update::Update::Snapshot(snapshot.clone())),
            ..PeerUpdate::default()
        };
        // Renderings of the key's bytes: `Debug` of a Vec<u8>, whole or any run of four.
        let mut needles = vec![format!("{psk:?}")];
        needles.extend(
            psk.windows(4)
                .map(|w| w.iter().map(u8::to_string).collect::<Vec<_>>().join(", ")),
        );
        for (what, debug) in [
            ("Peer", format!("{peer:?}")),
            ("Peer pretty", format!("{peer:#?}")),
            ("PeerSnapshot", format!("{snapshot:?}")),
            ("PeerDelta", format!("{delta:?}")),
            ("PeerUpdate", format!("{update:?}")),
        ] {
            for n in &needles {
                assert!(!debug.contains(n.as_str()), "{what} shows {n}: {debug}");
            }
            assert!(
                debug.contains("alice"),
                "{what} still shows the rest: {debug}"
            );
        }
        let debug = format!("{peer:?}");
        assert!(debug.contains(&format!("{public:?}")), "{debug}");
        assert!(debug.contains("preshared_key"), "{debug}");
        // An absent key says so.
        let none = Peer {
            preshared_key: Vec::new(),
            ..peer
        };
        assert!(format!("{none:?}").contains("preshared_key: <none>"));
    }
}

#[cfg(test)]
#[path = "parts_tests.rs"]
mod parts_tests;

#[cfg(test)]
#[path = "encoded_tests.rs"]
mod encoded_tests;
