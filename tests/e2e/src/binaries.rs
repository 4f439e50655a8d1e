//! The workspace's own binaries (controller, agent, CLI), built on demand.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

use crate::install::repo_root;

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// The running test binary's profile directory: `target/debug/deps/test-binary` ->
/// `target/debug`. Its parent is the target directory builds from tests share.
pub fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|p| {
            if p.ends_with("deps") {
                p.parent()
            } else {
                Some(p)
            }
        })
        .context("locating the target directory")?;
    Ok(dir.to_path_buf())
}

/// `cargo`, run from the repository root without the variables cargo sets for the running
/// test (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...): build scripts that watch them (ring's
/// does) would otherwise rebuild, and a later `cargo build` from a shell rebuild again.
pub fn cargo_command() -> Command {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(repo_root());
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_for_the_test = key == "OUT_DIR"
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_")
            || key.starts_with("CARGO_MANIFEST_")
            || matches!(
                key,
                "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
            );
        if set_for_the_test {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// `target/<profile>/<name>`, next to the running test binary; built with cargo when missing.
pub fn workspace_binary(package: &str, name: &str) -> Result<PathBuf> {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let profile_dir = profile_dir()?;
    let path = profile_dir.join(name);
    let release = profile_dir.ends_with("release");
    let mut cmd = cargo_command();
    cmd.args(["build", "--quiet", "-p", package, "--bin", name]);
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

/// `target/release/<name>` for each `(package, name)`, built as `deploy/Dockerfile` builds
/// them (release profile, locked dependencies), whatever profile the running test binary has.
/// One cargo invocation for all: cargo unifies the dependencies' features over the packages
/// it builds together, so building them apart would give other binaries than the Dockerfile's
/// and rebuild most dependencies twice.
pub fn release_binaries(binaries: &[(&str, &str)]) -> Result<Vec<PathBuf>> {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let profile_dir = profile_dir()?;
    let target_dir = profile_dir
        .parent()
        .context("the target directory above the profile directory")?;
    let mut cmd = cargo_command();
    cmd.args(["build", "--release", "--locked", "--quiet"])
        .env("CARGO_TARGET_DIR", target_dir);
    for (package, name) in binaries {
        cmd.args(["-p", package, "--bin", name]);
    }
    let status = cmd.status().context("running cargo build --release")?;
    if !status.success() {
        bail!("cargo build --release --locked of {binaries:?} failed");
    }
    Ok(binaries
        .iter()
        .map(|(_, name)| target_dir.join("release").join(name))
        .collect())
}
