//! The last configuration the agent programmed, kept on the node next to the key (mode 0600:
//! it holds preshared keys). A restarted agent programs it again before it reaches the
//! controller, so a restart while the controller is unreachable still brings the tunnels back.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use prost::Message;
use wgmesh_proto as pb;

use crate::state::Desired;

/// The file inside a mesh's state directory.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("programmed.pb")
}

/// Saves `programmed` through a temporary file (0600 from the first byte) and a rename, so a
/// crash leaves the old file or the new one, never a mix.
pub fn save(state_dir: &Path, programmed: &Desired) -> io::Result<()> {
    fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(".programmed.pb.tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&pb::decode::snapshot(programmed).encode_to_vec())?;
    file.sync_all()?;
    fs::rename(&tmp, path(state_dir))
}

/// The saved configuration, if there is one that reads back; a damaged file is logged and
/// ignored (the controller's snapshot replaces it).
pub fn load(state_dir: &Path) -> Option<Desired> {
    let path = path(state_dir);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the saved configuration");
            return None;
        }
    };
    let decoded = pb::PeerUpdate::decode(bytes.as_slice())
        .map_err(|e| e.to_string())
        .and_then(|u| {
            wgmesh_core::agent_config::AgentUpdate::try_from(&u).map_err(|e| e.to_string())
        });
    match decoded {
        Ok(update) => {
            let mut desired = Desired::default();
            desired.apply(update);
            Some(desired)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring a damaged saved configuration");
            None
        }
    }
}

/// The public keys of the peers the saved configuration lists when it is of `interface`:
/// a WireGuard link of that name carrying one of them is this node's (an older agent's, whose
/// key may have been rotated since).
pub fn peers_on(state_dir: &Path, interface: &str) -> Vec<wgmesh_core::PublicKey> {
    load(state_dir)
        .filter(|s| {
            s.settings
                .as_ref()
                .is_some_and(|s| s.interface_name == interface)
        })
        .map(|s| s.peers.keys().copied().collect())
        .unwrap_or_default()
}

/// Forgets the saved configuration (the node left the mesh).
pub fn remove(state_dir: &Path) -> io::Result<()> {
    match fs::remove_file(path(state_dir)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn saved_reads_back_with_mode_0600_and_damage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load(dir.path()).is_none(), "nothing saved yet");
        let mut desired = Desired::default();
        desired.apply(
            wgmesh_core::agent_config::AgentUpdate::try_from(&pb::PeerUpdate {
                epoch: "e1".into(),
                revision: 7,
                rotate_key_request: String::new(),
                more_parts: false,
                update: Some(pb::peer_update::Update::Snapshot(pb::PeerSnapshot {
                    peers: vec![pb::Peer {
                        public_key: vec![3; 32],
                        name: "node-3".into(),
                        endpoint: "192.0.2.3:51820".into(),
                        allowed_ips: vec!["10.244.3.0/24".into()],
                        preshared_key: vec![9; 32],
                        ..Default::default()
                    }],
                    mesh: Some(pb::MeshSettings {
                        interface_name: "wgmesh0".into(),
                        listen_port: 51820,
                        ..Default::default()
                    }),
                    tunnel_addresses: vec!["10.250.0.1/16".into()],
                    pod_cidrs: vec!["10.244.1.0/24".into()],
                    departure: 0,
                    members: 3,
                })),
            })
            .unwrap(),
        );
        save(dir.path(), &desired).unwrap();
        let mode = fs::metadata(path(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load(dir.path()), Some(desired.clone()));
        // The evidence that a link of the interface's name is this node's: its saved peers.
        let node_3 = wgmesh_core::PublicKey::from_bytes([3; 32]);
        assert_eq!(peers_on(dir.path(), "wgmesh0"), vec![node_3]);
        assert!(peers_on(dir.path(), "wg0").is_empty(), "another interface");

        save(dir.path(), &Desired::default()).unwrap();
        assert_eq!(load(dir.path()), Some(Desired::default()), "overwritten");

        fs::write(path(dir.path()), b"\xff\xff not protobuf").unwrap();
        assert!(load(dir.path()).is_none(), "damaged");
        assert!(
            peers_on(dir.path(), "wgmesh0").is_empty(),
            "nothing to go by"
        );
        remove(dir.path()).unwrap();
        remove(dir.path()).unwrap();
        assert!(!path(dir.path()).exists());
    }
}
