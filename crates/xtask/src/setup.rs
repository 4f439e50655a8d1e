//! Installing what the commands need on a fresh machine, saying what is being done.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

/// The repository root (xtask lives in crates/xtask).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

pub fn step(what: &str) {
    eprintln!("\n==> {what}");
}

/// Debian packages the tests use: network tools for the end-to-end tests, and the real
/// WireGuard implementations and CNI plugins we test against.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "tcpdump",
    "iperf3",
    "wireguard-tools",
    "wireguard-go",
    "containernetworking-plugins",
    // ping between pods and nodes (the device's and the mesh's tests); a minimal Debian
    // has none
    "iputils-ping",
    // nft, with which the pod-egress test removes the agent's table to see it come back
    "nftables",
    // sysctl, unshare, nsenter and mount in the end-to-end tests' node namespaces
    "procps",
    "util-linux",
    "mount",
];

/// Installs the missing Debian packages with apt-get (root only; others get a clear message).
pub fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    if !nix_is_root() {
        bail!(
            "missing Debian packages {}; install them with: sudo apt-get install -y {}",
            missing.join(" "),
            missing.join(" ")
        );
    }
    run_ok(Command::new("apt-get").args(["update", "-qq"]))?;
    run_ok(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

/// rustfmt and clippy, which a minimal rustup profile lacks.
pub fn ensure_rust_components() -> Result<()> {
    for (component, probe) in [("rustfmt", "fmt"), ("clippy", "clippy")] {
        let present = Command::new("cargo")
            .args([probe, "--version"])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !present {
            step(&format!("installing the {component} component with rustup"));
            run_ok(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    Ok(())
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub use wgmesh_e2e::process::run_ok;
