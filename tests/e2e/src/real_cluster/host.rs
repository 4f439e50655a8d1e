//! What a real cluster needs from the machine: Debian packages (installed with apt-get when
//! missing and we are root), and the kernel settings every kubelet changes, put back after.

use std::path::{Path, PathBuf};
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

/// The machine's values of [`KUBELET_SYSCTLS`] from before any cluster's kubelets started:
/// written by the first cluster, read back when the last one ends (its own drop, or the
/// cleanup after a killed run), so that concurrent and killed runs still restore the
/// machine's values rather than a kubelet's.
const SAVED: &str = "wgmesh-real-cluster-kernel.saved";
const SAVED_LOCK: &str = "wgmesh-real-cluster-kernel.lock";

fn read_current() -> String {
    KUBELET_SYSCTLS
        .iter()
        .filter_map(|k| {
            let v = std::fs::read_to_string(format!("/proc/sys/{k}")).ok()?;
            Some(format!("{k} {}\n", v.trim()))
        })
        .collect()
}

fn with_lock<T>(f: impl FnOnce(&Path) -> T) -> Option<T> {
    let tmp = std::env::temp_dir();
    let lock = std::fs::File::create(tmp.join(SAVED_LOCK)).ok()?;
    lock.lock().ok()?;
    Some(f(&tmp.join(SAVED)))
}

/// Whether a cluster other than the one in `own` is running (holds its directory's lock).
fn other_clusters_live(own: Option<&Path>) -> bool {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return false;
    };
    entries.flatten().any(|e| {
        let dir = e.path();
        e.file_name()
            .to_string_lossy()
            .starts_with(super::sweep::DIR_PREFIX)
            && Some(dir.as_path()) != own
            && std::fs::File::open(dir.join(crate::scratch::LOCK_FILE))
                .is_ok_and(|l| l.try_lock().is_err())
    })
}

/// Writes the saved values back and forgets them, unless another cluster still runs.
pub fn restore_if_last(own: Option<&Path>) {
    with_lock(|saved| {
        if other_clusters_live(own) {
            return;
        }
        let Ok(text) = std::fs::read_to_string(saved) else {
            return;
        };
        for line in text.lines() {
            if let Some((key, value)) = line.split_once(' ')
                && KUBELET_SYSCTLS.contains(&key)
            {
                let _ = std::fs::write(format!("/proc/sys/{key}"), value);
            }
        }
        let _ = std::fs::remove_file(saved);
    });
}

/// Holds the kernel settings for one cluster: saves the machine's values when no cluster has,
/// and restores them on drop when it is the last cluster.
pub struct KernelSettings {
    own: PathBuf,
}

impl KernelSettings {
    /// `own` is the cluster's directory (which it holds the lock of).
    pub fn save(own: &Path) -> Self {
        with_lock(|saved| {
            if !saved.exists() {
                let _ = std::fs::write(saved, read_current());
            }
        });
        KernelSettings {
            own: own.to_owned(),
        }
    }
}

impl Drop for KernelSettings {
    fn drop(&mut self) {
        restore_if_last(Some(&self.own));
    }
}
