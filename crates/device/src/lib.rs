//! wgmesh's WireGuard device: one interface ([`Device`]) that the node agent observes and
//! applies changes to, whichever of the two backends implements it:
//!
//! - [`kernel`]: the kernel module, its link created over rtnetlink and configured through
//!   the `wireguard` generic netlink family;
//! - [`userspace`]: our own device, boringtun's noise protocol over our TUN and UDP data
//!   path, configured through the standard UAPI socket (so `wg` works on it).
//!
//! [`Device::open`] chooses between them ([`Requested`]). The agent (`wgmesh-node-agent`)
//! orchestrates on top: keys, the controller connection, routes, CNI. The data path is
//! benchmarked by `cargo xtask bench dataplane` (crates/xtask/src/bench/dataplane.rs), which
//! runs this device through `wgmesh-agent userspace-device`; see docs/performance.md.

#![deny(unsafe_code)]

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
pub enum Error {
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
pub(crate) fn validate_name(name: &str) -> Result<(), Error> {
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
        Err(Error::InvalidConfig(format!(
            "{name:?} is not a valid interface name (1-15 printable characters, no '/')"
        )))
    }
}
