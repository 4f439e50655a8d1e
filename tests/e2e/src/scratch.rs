//! Scratch directories for control planes, meshes and helm homes: removed when dropped, and,
//! when a run was killed before it could drop them, by the next run. `build-go-tools.sh`
//! locks its work directories the same way (with flock(1)), so those go too.
//!
//! A control plane's directory holds etcd's 64 MB WAL, and CI machines' disks are shared and
//! sometimes nearly full, so leftovers of killed runs must not pile up. Each directory holds a
//! lock file that its process keeps an exclusive `flock` on; the kernel releases it when the
//! process dies, however it dies. A directory whose lock can be taken belongs to nobody.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

/// The lock file in every scratch directory.
pub(crate) const LOCK_FILE: &str = ".owner.lock";

/// How old an unlocked directory must be before it is removed: a directory is created a moment
/// before its lock is taken, and that moment must not look abandoned to another run.
const MIN_AGE: Duration = Duration::from_secs(60);

/// A directory under the system's temporary directory, named `<prefix><random>`.
#[derive(Debug)]
pub struct ScratchDir {
    // Field order is drop order: the directory goes before the lock is released.
    dir: tempfile::TempDir,
    _lock: File,
}

impl ScratchDir {
    /// Removes this prefix's abandoned directories, then creates and locks a new one.
    pub fn new(prefix: &str) -> Result<Self> {
        remove_abandoned(&std::env::temp_dir(), prefix);
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .with_context(|| format!("creating a {prefix}* directory"))?;
        let lock = File::create_new(dir.path().join(LOCK_FILE))?;
        lock.lock()?;
        Ok(ScratchDir { dir, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes the directories in `parent` named `<prefix>*` whose owner has exited: their lock is
/// free and they are older than [`MIN_AGE`]. Directories from before lock files existed count
/// as abandoned once old enough. Errors are ignored: this is housekeeping.
pub fn remove_abandoned(parent: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let named = entry.file_name().to_string_lossy().starts_with(prefix);
        if !named || !entry.file_type().is_ok_and(|t| t.is_dir()) || !is_old(&path) {
            continue;
        }
        let owned = match File::open(path.join(LOCK_FILE)) {
            Ok(lock) => lock.try_lock().is_err(),
            Err(_) => false,
        };
        if !owned && std::fs::remove_dir_all(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

fn is_old(path: &Path) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|modified| SystemTime::now().duration_since(modified).ok())
        .is_some_and(|age| age >= MIN_AGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(path: &Path) {
        let old = SystemTime::now() - 2 * MIN_AGE;
        File::open(path).unwrap().set_modified(old).unwrap();
    }

    #[test]
    fn removes_only_old_unowned_directories() {
        let parent = tempfile::tempdir().unwrap();
        let p = parent.path();

        // Abandoned: a lock file nobody holds.
        let abandoned = p.join("wgmesh-x-abandoned");
        std::fs::create_dir(&abandoned).unwrap();
        File::create(abandoned.join(LOCK_FILE)).unwrap();
        age(&abandoned);
        // From before lock files: no lock file at all.
        let legacy = p.join("wgmesh-x-legacy");
        std::fs::create_dir(&legacy).unwrap();
        age(&legacy);
        // Owned: the lock is held (here by this process, through another open file).
        let owned = p.join("wgmesh-x-owned");
        std::fs::create_dir(&owned).unwrap();
        let held = File::create(owned.join(LOCK_FILE)).unwrap();
        held.lock().unwrap();
        age(&owned);
        // Just created: not yet locked, but too young to judge.
        let young = p.join("wgmesh-x-young");
        std::fs::create_dir(&young).unwrap();
        // Another prefix.
        let other = p.join("other-abandoned");
        std::fs::create_dir(&other).unwrap();
        age(&other);

        let mut removed = remove_abandoned(p, "wgmesh-x-");
        removed.sort();
        assert_eq!(removed, vec![abandoned, legacy]);
        assert!(owned.exists() && young.exists() && other.exists());
        drop(held);
    }

    #[test]
    fn a_lock_held_by_another_process_with_flock_1_protects_its_directory() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("wgmesh-gobuild.x");
        std::fs::create_dir(&dir).unwrap();
        let lock = dir.join(LOCK_FILE);
        // As build-go-tools.sh takes it; `exec` leaves one process holding it.
        let mut holder = std::process::Command::new("bash")
            .arg("-c")
            .arg(r#"exec 9>"$1" && flock 9 && exec sleep 30"#)
            .arg("holder")
            .arg(&lock)
            .spawn()
            .unwrap();
        // Wait until flock(1) holds it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while File::open(&lock).map_or(true, |f| f.try_lock().is_ok()) {
            assert!(
                std::time::Instant::now() < deadline,
                "flock(1) never took the lock"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        age(&dir);
        assert!(remove_abandoned(parent.path(), "wgmesh-gobuild.").is_empty());
        holder.kill().unwrap();
        holder.wait().unwrap();
        assert_eq!(
            remove_abandoned(parent.path(), "wgmesh-gobuild."),
            vec![dir]
        );
    }

    #[test]
    fn a_live_scratch_dir_survives_a_sweep_and_goes_when_dropped() {
        let scratch = ScratchDir::new("wgmesh-scratch-test-").unwrap();
        let path = scratch.path().to_owned();
        age(&path);
        let parent = path.parent().unwrap();
        assert!(remove_abandoned(parent, "wgmesh-scratch-test-").is_empty());
        assert!(path.exists());
        drop(scratch);
        assert!(!path.exists());
    }
}
