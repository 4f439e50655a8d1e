//! The agent's typed view of the mesh (core's [`AgentConfig`], built from the stream through
//! `wgmesh_proto::decode`) and the conversions between it and the device: the wire's backend
//! choice, and a peer as the device programs it.

use std::net::SocketAddr;

use wgmesh_core::agent_config::{AgentConfig, AgentPeer};
use wgmesh_device::{BackendKind, PeerConfig, Requested};
use wgmesh_proto as pb;

/// What the controller wants of this node, typed.
pub type Desired = AgentConfig<pb::MeshSettings>;

/// WireGuard's customary port, used until the mesh says otherwise.
pub const DEFAULT_LISTEN_PORT: u32 = 51820;

/// The mesh's listen port as far as we know (the WireGuard default before the first
/// registration answers).
pub fn listen_port(desired: &Desired) -> u32 {
    desired
        .settings
        .as_ref()
        .map(|s| s.listen_port)
        .unwrap_or(DEFAULT_LISTEN_PORT)
}

/// The backend to open: the agent's `--backend` when given, else the mesh's (the CRD's
/// `backend` as the controller sends it; unspecified is `auto`). The one place the wire's
/// backend becomes the device's.
pub fn requested_backend(cli: Option<Requested>, mesh: pb::Backend) -> Requested {
    cli.unwrap_or(match mesh {
        pb::Backend::Kernel => Requested::Kernel,
        pb::Backend::Userspace => Requested::Userspace,
        pb::Backend::Unspecified => Requested::Auto,
    })
}

/// The backend the agent reports on registration: the one running, if the device is open.
pub fn wire_backend(running: Option<BackendKind>) -> pb::Backend {
    match running {
        Some(BackendKind::Kernel) => pb::Backend::Kernel,
        Some(BackendKind::Userspace) => pb::Backend::Userspace,
        None => pb::Backend::Unspecified,
    }
}

/// A peer as the device should have it, with its endpoint resolved (`None` when it has none
/// or it does not resolve).
pub fn peer_config(peer: &AgentPeer, endpoint: Option<SocketAddr>) -> PeerConfig {
    PeerConfig {
        public_key: peer.public_key,
        endpoint,
        allowed_ips: peer.allowed_ips.clone(),
        persistent_keepalive: peer.persistent_keepalive,
        preshared_key: peer.preshared_key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--backend` wins when given (`auto` included); else the mesh's, unspecified as `auto`.
    /// What runs is reported as it is, and nothing before the device is open.
    #[test]
    fn backend_conversions() {
        use pb::Backend as W;
        use wgmesh_device::{BackendKind, Requested as R};
        for (cli, mesh, want) in [
            (None, W::Unspecified, R::Auto),
            (None, W::Kernel, R::Kernel),
            (None, W::Userspace, R::Userspace),
            (Some(R::Auto), W::Kernel, R::Auto),
            (Some(R::Kernel), W::Userspace, R::Kernel),
            (Some(R::Userspace), W::Kernel, R::Userspace),
            (Some(R::Userspace), W::Unspecified, R::Userspace),
        ] {
            assert_eq!(
                super::requested_backend(cli, mesh),
                want,
                "{cli:?} {mesh:?}"
            );
        }
        assert_eq!(super::wire_backend(None), W::Unspecified);
        assert_eq!(super::wire_backend(Some(BackendKind::Kernel)), W::Kernel);
        assert_eq!(
            super::wire_backend(Some(BackendKind::Userspace)),
            W::Userspace
        );
    }
}
