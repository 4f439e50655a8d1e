//! What a real cluster needs from the machine: Debian packages (installed with apt-get when
//! missing and we are root), and the kernel settings every kubelet changes, put back after.

use std::process::Command;

use anyhow::{Result, bail};

/// Debian packages the real cluster uses: the container runtime and its OCI runtime, the CNI
/// plugins, a C compiler and static libc for the pause image, and busybox for the test image.
pub const PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "containernetworking-plugins",
    "busybox-static",
    "gcc",
    "libc6-dev",
    "iptables",
    "util-linux",
];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs the missing [`PACKAGES`] with apt-get (root only; others get the command).
pub fn ensure_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the real cluster needs Debian packages: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    eprintln!(
        "[wgmesh] real cluster: installing {} with apt-get",
        missing.join(" ")
    );
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let updated = Command::new("apt-get")
            .args(["update", "-qq"])
            .status()
            .is_ok_and(|s| s.success());
        if !updated || !install() {
            bail!("apt-get install {} failed", missing.join(" "));
        }
    }
    Ok(())
}

/// The kernel settings a kubelet sets at start-up when `protectKernelDefaults` is false (the
/// default, and kind's setting): they are not namespaced, so they change the machine's.
const KUBELET_SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// The values of [`KUBELET_SYSCTLS`] before the kubelets started; written back on drop.
pub struct KernelSettings {
    saved: Vec<(&'static str, String)>,
}

impl KernelSettings {
    pub fn save() -> Self {
        let saved = KUBELET_SYSCTLS
            .iter()
            .filter_map(|k| {
                let v = std::fs::read_to_string(format!("/proc/sys/{k}")).ok()?;
                Some((*k, v.trim().to_owned()))
            })
            .collect();
        KernelSettings { saved }
    }
}

impl Drop for KernelSettings {
    fn drop(&mut self) {
        for (key, value) in &self.saved {
            let _ = std::fs::write(format!("/proc/sys/{key}"), value);
        }
    }
}
