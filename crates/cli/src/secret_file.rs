//! Files the CLI writes that hold a private key (the `--qr-png` image encodes the whole
//! wg-quick config, private key included).

use std::fs::{File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Owner read and write only.
const MODE: u32 = 0o600;

/// Writes `path` with what `fill` writes, readable and writable by its owner only (0600,
/// whatever the umask).
///
/// The content goes to a new file in the same directory, created exclusively with mode
/// 0600 (so there is no moment with a looser mode, and a planted file or symlink under the
/// temporary name is refused), which is then renamed over `path`. A file already at `path`
/// is therefore replaced, not rewritten: whatever its mode was, the result is 0600, and a
/// process that opened the old file while it was readable does not see the new key. A
/// symlink at `path` is replaced too, never followed.
pub fn write(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let (tmp_path, file) = create_temporary(path)?;
    let result = (|| {
        // Exactly 0600 even under an odd umask (one that clears the owner's bits).
        file.set_permissions(Permissions::from_mode(MODE))?;
        let mut out = std::io::BufWriter::new(&file);
        fill(&mut out)?;
        out.flush()?;
        drop(out);
        file.sync_all()?;
        std::fs::rename(&tmp_path, path)?;
        anyhow::Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp_path);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// A new file next to `path`, created exclusively with mode 0600.
fn create_temporary(path: &Path) -> Result<(PathBuf, File)> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?
        .to_string_lossy();
    let mut attempt = 0u32;
    loop {
        let tmp = dir.join(format!(".{name}.{}.{attempt}.tmp", std::process::id()));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(MODE)
            .open(&tmp)
        {
            Ok(file) => return Ok((tmp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("creating a file in {}", dir.display()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::process::Command;

    use super::*;

    const SECRET: &[u8] = b"PrivateKey = CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=\n";

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    /// Whether uid/gid 65534 (nobody), with no supplementary groups, can read `path`.
    fn nobody_reads(path: &Path) -> bool {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(path)
            .output()
            .expect("setpriv (util-linux)");
        out.status.success()
    }

    /// Issue #12, item 11: created 0600 whatever the umask, and a file that already exists
    /// with a looser mode ends up 0600 too (it is replaced, not rewritten in place).
    #[test]
    fn private_files_are_owner_only() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let dir = tempfile::tempdir().unwrap();
        // A directory anyone may enter, so that only the file's own mode protects it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let root_user = nix::unistd::geteuid().is_root();

        let control = dir.path().join("control.txt");
        std::fs::write(&control, SECRET).unwrap();
        assert_eq!(mode(&control), 0o644, "umask 022 applies");
        if root_user {
            assert!(nobody_reads(&control), "control: nobody reads a 0644 file");
        }

        let fresh = dir.path().join("peer.png");
        let existing = dir.path().join("old.png");
        std::fs::write(&existing, b"old").unwrap();
        std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o666)).unwrap();
        // A symlink at the path is replaced, not followed.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let target = elsewhere.join("target.txt");
        std::fs::write(&target, b"untouched").unwrap();
        let link = dir.path().join("link.png");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for path in [&fresh, &existing, &link] {
            write(path, |w: &mut dyn Write| {
                w.write_all(SECRET)?;
                Ok(())
            })
            .unwrap();
            assert_eq!(std::fs::read(path).unwrap(), SECRET, "{}", path.display());
            assert_eq!(mode(path), 0o600, "{}", path.display());
            if root_user {
                assert!(!nobody_reads(path), "nobody read {}", path.display());
            }
        }
        // Nothing else is left in the directory (no temporary files).
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "control.txt",
                "elsewhere",
                "link.png",
                "old.png",
                "peer.png"
            ]
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
    }
}
