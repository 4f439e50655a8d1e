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

use wgmesh_core::PrivateKey;
// The device's vocabulary is core's, so that the decision of what to change (the pure
// `device_changes`) lives with the other decisions.
pub use wgmesh_core::device::{DeviceChange, DeviceState, PeerConfig, PeerState, device_changes};

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
