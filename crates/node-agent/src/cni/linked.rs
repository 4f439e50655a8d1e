//! A CNI configuration the runtime reads through a link: the file in the configuration
//! directory is a symbolic link to its content in a directory a reboot empties (`/run`). After
//! a reboot the link dangles and the runtime has no pod network until the agent writes the
//! content again, which it does only once the node is programmed.

use std::io;
use std::path::Path;

use serde_json::Value;

/// Writes `content` to `run_dir/file` and links `conf_dir/file` to it, each through a
/// temporary name and a rename, unless both are already so. Returns whether it wrote. The
/// runtime must see `run_dir` at the same absolute path as the agent.
///
/// The link is made again whenever the content changes: the runtime watches `conf_dir`, not
/// where the link points, and reloads on the event of the rename.
pub fn write(conf_dir: &Path, run_dir: &Path, file: &str, content: &Value) -> io::Result<bool> {
    // A relative link would be read from `conf_dir`.
    let target = std::path::absolute(run_dir)?.join(file);
    let link = conf_dir.join(file);
    let text = serde_json::to_string_pretty(content).map_err(io::Error::other)? + "\n";
    let current = std::fs::read_to_string(&target).is_ok_and(|old| old == text);
    let linked = std::fs::read_link(&link).is_ok_and(|to| to == target);
    if current && linked {
        return Ok(false);
    }
    if !current {
        std::fs::create_dir_all(run_dir)?;
        let tmp = run_dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &target)?;
    }
    // Replaces a regular file too (written by agents before the link). The temporary name
    // has no CNI extension, so the runtime never reads it.
    std::fs::create_dir_all(conf_dir)?;
    let tmp = conf_dir.join(format!(".{file}.tmp"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::os::unix::fs::symlink(&target, &tmp)?;
    std::fs::rename(&tmp, &link)?;
    Ok(true)
}

/// Removes the link `conf_dir/file` and its content `run_dir/file`; true if either was there.
pub fn remove(conf_dir: &Path, run_dir: &Path, file: &str) -> io::Result<bool> {
    let mut removed = false;
    // The link first: the runtime never follows it to nothing.
    for path in [conf_dir.join(file), run_dir.join(file)] {
        match std::fs::remove_file(path) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}
