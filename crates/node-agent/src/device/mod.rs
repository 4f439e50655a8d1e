//! The node's WireGuard device behind one interface: the agent observes it and applies
//! changes to it, whatever implements it (the kernel module or our userspace device).

pub mod backend;
pub mod kernel;
pub mod userspace;

pub use backend::{BackendKind, Device, Requested};
pub use kernel::{KernelDevice, KernelSupport, kernel_wireguard_available};

use std::net::SocketAddr;
use std::time::SystemTime;

use wgmesh_core::{Cidr, Key, PrivateKey, PublicKey};

/// Interface-level settings of a device.
#[derive(Debug, Clone)]
pub struct InterfaceConfig {
    /// Interface name, such as `wgmesh0` (at most 15 bytes).
    pub name: String,
    pub private_key: PrivateKey,
    /// UDP listen port; 0 lets the OS choose.
    pub listen_port: u16,
    /// SO_MARK for the encrypted UDP sockets; 0 is none.
    pub fwmark: u32,
}

/// One peer as the device should have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    /// Where to send first; roaming replaces it with where authenticated packets come from.
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<Cidr>,
    /// Seconds; 0 is off.
    pub persistent_keepalive: u16,
    pub preshared_key: Option<Key>,
}

/// A change to the device. Changes are applied in place: other peers' sessions are never
/// touched, and a peer whose only change is its allowed IPs or endpoint keeps its session.
#[derive(Debug, Clone)]
pub enum DeviceChange {
    /// Adds the peer, or replaces the configuration of the peer with this public key.
    UpsertPeer(PeerConfig),
    RemovePeer(PublicKey),
    SetListenPort(u16),
    SetFwmark(u32),
    /// A new private key (key rotation): every session restarts.
    SetPrivateKey(PrivateKey),
}

/// What the device reports of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub config: PeerConfig,
    /// The endpoint in use now (after roaming).
    pub current_endpoint: Option<SocketAddr>,
    /// When the last handshake completed; `None` if never.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// What the device reports of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    pub public_key: PublicKey,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerState>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("creating the TUN interface {name}: {source}")]
    Tun {
        name: String,
        source: std::io::Error,
    },
    #[error("binding the UDP port {port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("serving the UAPI socket {path}: {source}")]
    Uapi {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("malformed UAPI request: {0}")]
    UapiProtocol(String),
    #[error("device I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the device has stopped")]
    Stopped,
    #[error("netlink: {op}: {source}")]
    Netlink { op: String, source: std::io::Error },
    #[error("kernel WireGuard is unavailable: {0}")]
    KernelUnavailable(String),
}

/// Checks a Linux interface name: 1-15 printable bytes, not `.` or `..`, no `/` or `:`.
pub(crate) fn validate_name(name: &str) -> Result<(), DeviceError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(())
    } else {
        Err(DeviceError::InvalidConfig(format!(
            "{name:?} is not a valid interface name (1-15 printable characters, no '/')"
        )))
    }
}

#[cfg(test)]
mod redaction_tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::Desired;

    /// Issue #12, item 12: what the agent holds and might log with `?` never shows a private
    /// or preshared key; public keys still show.
    #[test]
    fn debug_never_shows_a_secret() {
        let bytes: [u8; 32] = std::array::from_fn(|i| 101 + i as u8);
        let psk = Key::from_bytes(bytes);
        let private = PrivateKey::from_bytes(bytes);
        let public = PrivateKey::generate().public_key();
        let peer = PeerConfig {
            public_key: public,
            endpoint: None,
            allowed_ips: Vec::new(),
            persistent_keepalive: 0,
            preshared_key: Some(psk),
        };
        let state = DeviceState {
            public_key: public,
            listen_port: 1,
            fwmark: 0,
            peers: vec![PeerState {
                config: peer.clone(),
                current_endpoint: None,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
            }],
        };
        let pb_peer = wgmesh_proto::Peer {
            public_key: public.as_bytes().to_vec(),
            preshared_key: bytes.to_vec(),
            ..Default::default()
        };
        let desired = Desired {
            peers: BTreeMap::from([(public, pb_peer)]),
            ..Desired::default()
        };
        let mut needles = vec![psk.to_base64(), format!("{bytes:?}")];
        needles.extend(
            bytes
                .windows(4)
                .map(|w| w.iter().map(u8::to_string).collect::<Vec<_>>().join(", ")),
        );
        for (what, debug) in [
            ("PeerConfig", format!("{peer:?}")),
            (
                "DeviceChange::UpsertPeer",
                format!("{:?}", DeviceChange::UpsertPeer(peer.clone())),
            ),
            (
                "DeviceChange::SetPrivateKey",
                format!("{:?}", DeviceChange::SetPrivateKey(private.clone())),
            ),
            (
                "InterfaceConfig",
                format!(
                    "{:?}",
                    InterfaceConfig {
                        name: "wgmesh0".into(),
                        private_key: private.clone(),
                        listen_port: 0,
                        fwmark: 0,
                    }
                ),
            ),
            ("DeviceState", format!("{state:?}")),
            ("Desired", format!("{desired:?}")),
        ] {
            for n in &needles {
                assert!(!debug.contains(n.as_str()), "{what} shows {n}: {debug}");
            }
        }
        assert!(format!("{peer:?}").contains(&public.to_base64()));
    }
}
