//! The workspace's own binaries (controller, agent, CLI), built on demand.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use crate::install::repo_root;

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// `target/<profile>/<name>`, next to the running test binary; built with cargo when missing.
pub fn workspace_binary(package: &str, name: &str) -> Result<PathBuf> {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let exe = std::env::current_exe()?;
    // target/debug/deps/test-binary -> target/debug
    let profile_dir = exe
        .parent()
        .and_then(|p| {
            if p.ends_with("deps") {
                p.parent()
            } else {
                Some(p)
            }
        })
        .context("locating the target directory")?
        .to_path_buf();
    let path = profile_dir.join(name);
    let release = profile_dir.ends_with("release");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(repo_root())
        .args(["build", "--quiet", "-p", package, "--bin", name]);
    if release {
        cmd.arg("--release");
    }
    if let Some(target_dir) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target_dir);
    }
    // Always ask cargo: it is a no-op when the binary is fresh, and a stale binary would test
    // old code.
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build -p {package} --bin {name} failed");
    }
    Ok(path)
}
