//! The node's private key: generated here from the OS random source, kept in the state
//! directory with mode 0600, reused across restarts, and never sent anywhere.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use wgmesh_core::PrivateKey;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} does not hold a WireGuard private key ({reason}); refusing to replace it silently: remove it or run with --rotate-key"
    )]
    Corrupt { path: PathBuf, reason: String },
}

/// The key file inside a mesh's state directory.
pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("private.key")
}

/// Loads the key, or creates one when there is none (or when `rotate` asks for a new one).
/// Returns the key and whether it is new.
pub fn load_or_create(state_dir: &Path, rotate: bool) -> Result<(PrivateKey, bool), KeyError> {
    create_state_dir(state_dir)?;
    let path = key_path(state_dir);
    if !rotate && path.exists() {
        let meta = fs::metadata(&path).map_err(io(&path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "the key file was readable by others; setting mode 0600");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io(&path))?;
        }
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        let key = text.parse::<PrivateKey>().map_err(|e| KeyError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        return Ok((key, false));
    }
    let key = PrivateKey::generate();
    store(state_dir, &key)?;
    Ok((key, true))
}

/// Writes `key` as the mesh's key file. Written beside the final name with mode 0600 from
/// the first byte, then renamed, so a crash never leaves a partial or world-readable key.
pub fn store(state_dir: &Path, key: &PrivateKey) -> Result<(), KeyError> {
    create_state_dir(state_dir)?;
    let path = key_path(state_dir);
    let tmp = state_dir.join(".private.key.tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(format!("{}\n", key.expose_base64()).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io(&tmp))?;
    fs::rename(&tmp, &path).map_err(io(&path))
}

/// The mesh's state directory, created if missing, readable by root only.
fn create_state_dir(state_dir: &Path) -> Result<(), KeyError> {
    fs::create_dir_all(state_dir).map_err(io(state_dir))?;
    fs::set_permissions(state_dir, fs::Permissions::from_mode(0o700)).map_err(io(state_dir))
}

/// Turns an I/O error into one that names `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError {
    let path = path.to_owned();
    move |source| KeyError::Io { path, source }
}

/// Removes the mesh's state directory (its key, the rotation record, anything else in it):
/// the mesh is gone, so nothing there will be used again. Missing is fine.
pub fn forget(state_dir: &Path) -> Result<(), KeyError> {
    match fs::remove_dir_all(state_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(KeyError::Io {
            path: state_dir.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The last key rotation request (the Node annotation's value) this node acted on.
pub fn handled_rotation(state_dir: &Path) -> Option<String> {
    fs::read_to_string(state_dir.join("rotation"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Remembers that the rotation request `value` has been acted on.
pub fn record_rotation(state_dir: &Path, value: &str) -> Result<(), KeyError> {
    let path = state_dir.join("rotation");
    fs::write(&path, value).map_err(|source| KeyError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("default");
        let (first, new) = load_or_create(&state, false).unwrap();
        assert!(new);
        let mode = fs::metadata(key_path(&state)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, new) = load_or_create(&state, false).unwrap();
        assert!(!new);
        assert_eq!(
            again.public_key(),
            first.public_key(),
            "a restart keeps the key"
        );
        let (rotated, new) = load_or_create(&state, true).unwrap();
        assert!(new);
        assert_ne!(rotated.public_key(), first.public_key());
        let (after, _) = load_or_create(&state, false).unwrap();
        assert_eq!(after.public_key(), rotated.public_key());
    }

    #[test]
    fn a_forgotten_key_can_be_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("default");
        let (key, _) = load_or_create(&state, false).unwrap();
        record_rotation(&state, "1").unwrap();
        forget(&state).unwrap();
        assert!(!state.exists(), "the mesh's state directory is gone");
        forget(&state).unwrap();
        store(&state, &key).unwrap();
        let mode = fs::metadata(key_path(&state)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, new) = load_or_create(&state, false).unwrap();
        assert!(!new);
        assert_eq!(again.public_key(), key.public_key());
    }

    #[test]
    fn a_corrupt_key_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(key_path(dir.path()), "not a key").unwrap();
        let err = load_or_create(dir.path(), false).unwrap_err();
        assert!(matches!(err, KeyError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn loose_permissions_are_tightened() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path(), false).unwrap();
        fs::set_permissions(key_path(dir.path()), fs::Permissions::from_mode(0o644)).unwrap();
        load_or_create(dir.path(), false).unwrap();
        let mode = fs::metadata(key_path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
