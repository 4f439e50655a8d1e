//! Preparing the kernel VM once: Debian's kernel package (the version pinned in
//! [`crate::versions::DEBIAN_KERNEL`]), its ELF `vmlinux`, its modules, and an initramfs made
//! of Debian's static busybox and our `init.sh`, all cached under
//! `<cache>/kernel-vm/<version>/`.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::process::run_ok;
use crate::tools::cache_dir;
use crate::versions::{DEBIAN_KERNEL, DEBIAN_KERNEL_PACKAGE};

/// The initramfs's /init.
const INIT: &str = include_str!("init.sh");

/// Modules the initramfs loads, in order, before it can mount the host's root (virtio, 9p,
/// overlayfs and virtio-net are modules in Debian's kernel). Paths under `kernel/`.
const BOOT_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci",
    "net/9p/9pnet",
    "net/9p/9pnet_virtio",
    "fs/netfs/netfs",
    "fs/fscache/fscache",
    "fs/9p/9p",
    "fs/overlayfs/overlay",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
];

/// Debian packages the lane needs on the host: QEMU itself, and the tools preparing it uses.
pub const HOST_PACKAGES: &[&str] = &["qemu-system-x86", "xz-utils"];

/// A prepared kernel VM: what [`super::run`] boots.
#[derive(Debug, Clone)]
pub struct KernelVm {
    /// The cache entry.
    pub dir: PathBuf,
    /// The ELF kernel (QEMU boots it through PVH, skipping the bzImage's decompression).
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    /// `lib/modules` of the kernel, on the host's root (the guest reads it over 9p).
    pub modules: PathBuf,
    /// The kernel release, such as `6.1.0-57-amd64`.
    pub release: String,
}

impl KernelVm {
    fn at(dir: PathBuf) -> Result<Self> {
        let release = fs::read_to_string(dir.join("release"))
            .with_context(|| format!("{} is incomplete", dir.display()))?
            .trim()
            .to_owned();
        Ok(KernelVm {
            vmlinux: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
            modules: dir.join("root/lib/modules"),
            release,
            dir,
        })
    }
}

/// The cache entry of the pinned kernel.
pub fn cache_entry() -> PathBuf {
    cache_dir().join("kernel-vm").join(DEBIAN_KERNEL)
}

/// Whether the pinned kernel is prepared (nothing to download or build).
pub fn is_prepared() -> bool {
    cache_entry().join("ready").is_file()
}

/// The prepared kernel VM, downloaded and built first when absent (progress on stderr).
/// Installs QEMU with apt-get when it is missing and we are root.
pub fn prepare() -> Result<KernelVm> {
    ensure_host_tools()?;
    let dir = cache_entry();
    if dir.join("ready").is_file() {
        return KernelVm::at(dir);
    }
    let parent = dir.parent().expect("the entry has a parent").to_owned();
    fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let lock_path = parent.join(format!("{DEBIAN_KERNEL}.lock"));
    let lock = File::create(&lock_path)
        .with_context(|| format!("creating lock file {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    if dir.join("ready").is_file() {
        return KernelVm::at(dir);
    }
    let started = Instant::now();
    eprintln!(
        "[wgmesh] kernel VM: preparing {DEBIAN_KERNEL_PACKAGE} {DEBIAN_KERNEL} in {} (once; cached afterwards)",
        dir.display()
    );
    let work = parent.join(format!("{DEBIAN_KERNEL}.tmp"));
    let _ = fs::remove_dir_all(&work);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&work)?;
    build(&work).with_context(|| format!("preparing the kernel VM in {}", work.display()))?;
    fs::rename(&work, &dir)?;
    fs::write(dir.join("ready"), "")?;
    eprintln!("[wgmesh] kernel VM: prepared in {:.1?}", started.elapsed());
    KernelVm::at(dir)
}

/// QEMU and xz, installed with apt-get when missing (root only; others get the command).
pub fn ensure_host_tools() -> Result<()> {
    let have = |program: &str| {
        Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if have("qemu-system-x86_64") && have("xz") {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the kernel VM lane needs QEMU: sudo apt-get install -y {}",
            HOST_PACKAGES.join(" ")
        );
    }
    eprintln!(
        "[wgmesh] kernel VM: installing {} with apt-get",
        HOST_PACKAGES.join(" ")
    );
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(HOST_PACKAGES)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        apt_update()?;
        if !install() {
            bail!("apt-get install {} failed", HOST_PACKAGES.join(" "));
        }
    }
    Ok(())
}

fn apt_update() -> Result<()> {
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!("apt-get update failed");
    }
    Ok(())
}

fn step(what: &str) {
    eprintln!("[wgmesh] kernel VM: {what}");
}

/// `apt-get download <spec>` into `dir`; runs `apt-get update` once if the first try fails
/// (a fresh machine's package lists may be missing or stale).
fn apt_download(dir: &Path, spec: &str) -> Result<PathBuf> {
    let download = || {
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", spec])
            .current_dir(dir)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download() {
        step("apt-get download failed; updating the package lists and trying again");
        apt_update()?;
        if !download() {
            bail!("apt-get download {spec} failed{}", newer_kernel_hint(spec));
        }
    }
    let name = spec.split('=').next().unwrap_or(spec);
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        if file.starts_with(&format!("{name}_")) && file.ends_with(".deb") {
            return Ok(path);
        }
    }
    bail!("apt-get download {spec} left no .deb in {}", dir.display())
}

/// What `linux-image-amd64` depends on now, when that differs from the pin: Debian's
/// security archive keeps only the newest kernel, so a pinned version disappears.
fn newer_kernel_hint(spec: &str) -> String {
    if !spec.starts_with("linux-image-") {
        return String::new();
    }
    match current_metapackage_kernel() {
        Some((package, version)) if version != DEBIAN_KERNEL => format!(
            "; linux-image-amd64 now depends on {package} {version}: pin that in tests/e2e/src/versions.rs (DEBIAN_KERNEL_PACKAGE, DEBIAN_KERNEL)"
        ),
        _ => String::new(),
    }
}

/// The versioned kernel package `linux-image-amd64`'s candidate depends on, and its version:
/// from `Depends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)`.
pub fn current_metapackage_kernel() -> Option<(String, String)> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", "linux-image-amd64"])
        .output()
        .ok()?;
    parse_metapackage_depends(&String::from_utf8_lossy(&out.stdout))
}

fn parse_metapackage_depends(show: &str) -> Option<(String, String)> {
    let depends = show.lines().find_map(|l| l.strip_prefix("Depends: "))?;
    depends.split(',').find_map(|dep| {
        let dep = dep.trim();
        let (name, rest) = dep.split_once(' ')?;
        if !name.starts_with("linux-image-") {
            return None;
        }
        let version = rest.trim().strip_prefix("(= ")?.strip_suffix(')')?;
        Some((name.to_owned(), version.to_owned()))
    })
}

fn build(work: &Path) -> Result<()> {
    if let Some((package, version)) = current_metapackage_kernel()
        && (package != DEBIAN_KERNEL_PACKAGE || version != DEBIAN_KERNEL)
    {
        step(&format!(
            "note: linux-image-amd64 now depends on {package} {version}; the pin (tests/e2e/src/versions.rs) is {DEBIAN_KERNEL_PACKAGE} {DEBIAN_KERNEL}"
        ));
    }
    let debs = work.join("debs");
    fs::create_dir_all(&debs)?;
    step(&format!(
        "downloading {DEBIAN_KERNEL_PACKAGE} {DEBIAN_KERNEL} and busybox-static (apt-get download)"
    ));
    let kernel_deb = apt_download(&debs, &format!("{DEBIAN_KERNEL_PACKAGE}={DEBIAN_KERNEL}"))?;
    let busybox_deb = apt_download(&debs, "busybox-static")?;

    step("unpacking the kernel package (dpkg-deb -x)");
    let root = work.join("root");
    run_ok(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&kernel_deb)
            .arg(&root),
    )?;
    let bb_root = work.join("busybox");
    run_ok(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(&busybox_deb)
            .arg(&bb_root),
    )?;
    let busybox = bb_root.join("bin/busybox");
    if !busybox.is_file() {
        bail!("busybox-static has no bin/busybox");
    }

    let release = only_entry(&root.join("lib/modules"))?;
    let modules = root.join("lib/modules").join(&release);
    let wireguard = modules.join("kernel/drivers/net/wireguard/wireguard.ko");
    if !wireguard.is_file() {
        bail!(
            "{DEBIAN_KERNEL_PACKAGE} {DEBIAN_KERNEL} has no {}: this kernel cannot test the kernel backend",
            wireguard
                .strip_prefix(&root)
                .unwrap_or(&wireguard)
                .display()
        );
    }
    fs::write(work.join("release"), format!("{release}\n"))?;

    step("extracting the ELF vmlinux from vmlinuz (its xz payload)");
    extract_vmlinux(
        &root.join(format!("boot/vmlinuz-{release}")),
        &work.join("vmlinux"),
    )?;

    step("indexing the modules (busybox depmod)");
    run_ok(
        Command::new(&busybox)
            .arg("depmod")
            .arg("-b")
            .arg(&root)
            .arg(&release),
    )?;

    step("writing the initramfs (busybox, boot modules, init)");
    let mut archive = Cpio::default();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "mnt",
        "newroot",
        "lib",
        "lib/modules",
        "mods",
    ] {
        archive.dir(d);
    }
    archive.file("bin/busybox", 0o755, &fs::read(&busybox)?);
    archive.file("init", 0o755, INIT.as_bytes());
    let mut order = String::new();
    for m in BOOT_MODULES {
        let path = modules.join("kernel").join(format!("{m}.ko"));
        let base = m.rsplit('/').next().expect("a module name");
        if !path.is_file() {
            // Built into this kernel, or not needed by it.
            step(&format!("note: no {m}.ko in this kernel; skipped"));
            continue;
        }
        archive.file(&format!("mods/{base}.ko"), 0o644, &fs::read(&path)?);
        order.push_str(base);
        order.push('\n');
    }
    archive.file("mods/order", 0o644, order.as_bytes());
    fs::write(work.join("initramfs.cpio"), archive.finish())?;

    // Only the modules are needed (over 9p); the rest of the package and the .debs go.
    fs::remove_dir_all(&debs)?;
    fs::remove_dir_all(&bb_root)?;
    let _ = fs::remove_dir_all(root.join("boot"));
    let _ = fs::remove_dir_all(root.join("usr"));
    Ok(())
}

fn only_entry(dir: &Path) -> Result<String> {
    let entries: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match entries.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!(
            "expected one kernel in {}, found {entries:?}",
            dir.display()
        ),
    }
}

/// Debian's bzImage carries the kernel as an xz stream; `xz --single-stream` decodes it and
/// ignores what follows.
fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<()> {
    let data = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let magic = b"\xfd7zXZ\x00";
    let start = data
        .windows(magic.len())
        .position(|w| w == magic)
        .with_context(|| format!("{} has no xz payload", vmlinuz.display()))?;
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(File::create(out)?)
        .spawn()
        .context("running xz")?;
    let mut stdin = child.stdin.take().expect("piped");
    let payload = data[start..].to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&payload));
    let status = child.wait()?;
    // xz stops reading after the stream: a broken pipe on the trailing bytes is expected.
    let _ = writer.join();
    if !status.success() {
        bail!("xz could not decode the kernel in {}", vmlinuz.display());
    }
    let elf = fs::read(out)?;
    if !elf.starts_with(b"\x7fELF") {
        bail!("the payload of {} is not an ELF kernel", vmlinuz.display());
    }
    Ok(())
}

/// A `newc` cpio archive (the initramfs format), written in memory.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_metapackages_kernel() {
        let show = "Package: linux-image-amd64\nVersion: 6.1.192-3\nDepends: linux-image-6.1.0-57-amd64 (= 6.1.192-3)\n";
        assert_eq!(
            parse_metapackage_depends(show),
            Some(("linux-image-6.1.0-57-amd64".into(), "6.1.192-3".into()))
        );
        assert_eq!(parse_metapackage_depends("Package: x\n"), None);
    }

    #[test]
    fn cpio_entries_are_aligned() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let out = c.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
