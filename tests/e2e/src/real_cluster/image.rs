//! Container images built on this machine, since none can be pulled: a root filesystem
//! directory becomes a one-layer OCI image, written as an OCI archive (an image layout in a
//! tar file) that `ctr images import` loads into a node's containerd.
//!
//! Three images exist so far: the sandbox ("pause") image containerd starts for every pod,
//! from `tools/pause.c` compiled statically here, a test image holding Debian's static
//! busybox, and the chart's image from our release binaries ([`wgmesh`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::netns::sh;

mod wgmesh;
pub use wgmesh::{WGMESH_IMAGE, wgmesh_image};

/// The sandbox image's name: the one containerd 1.6's CRI plugin would pull by default, set
/// explicitly in each node's configuration too.
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10";
/// A test image with Debian's static busybox at `/bin/busybox` (and `/bin/sh`); run it with
/// `imagePullPolicy: Never`.
pub const BUSYBOX_IMAGE: &str = "wgmesh.test/busybox:1";

/// An image to build: its name, its root filesystem (a directory) and its configuration.
pub struct ImageSpec<'a> {
    pub name: &'a str,
    pub rootfs: &'a Path,
    pub entrypoint: &'a [&'a str],
    pub cmd: &'a [&'a str],
    /// `uid[:gid]`, or empty for root.
    pub user: &'a str,
}

/// Writes `spec` as an OCI archive at `out`. Layer timestamps and owners are fixed, so the
/// same files give the same digests.
pub fn write_oci_archive(spec: &ImageSpec<'_>, out: &Path) -> Result<()> {
    let work = tempfile::Builder::new()
        .prefix("wgmesh-oci-")
        .tempdir_in(out.parent().context("the archive's directory")?)?;
    let layout = work.path().join("layout");
    let blobs = layout.join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs)?;

    let layer = work.path().join("layer.tar");
    tar_dir(spec.rootfs, &layer)?;
    let layer_bytes = std::fs::read(&layer)?;
    let layer_digest = put_blob(&blobs, &layer_bytes)?;

    let mut config = json!({
        "Entrypoint": spec.entrypoint,
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "WorkingDir": "/",
    });
    if !spec.cmd.is_empty() {
        config["Cmd"] = json!(spec.cmd);
    }
    if !spec.user.is_empty() {
        config["User"] = json!(spec.user);
    }
    let config_blob = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }))?;
    let config_digest = put_blob(&blobs, &config_blob)?;

    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_blob.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer_bytes.len(),
        }],
    }))?;
    let manifest_digest = put_blob(&blobs, &manifest)?;

    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                // containerd's importer names the image after this one.
                "io.containerd.image.name": spec.name,
                "org.opencontainers.image.ref.name": spec.name,
            },
        }],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    tar_dir(&layout, out)
}

/// Stores `bytes` as a blob named after its digest; returns `sha256:<hex>`.
fn put_blob(blobs: &Path, bytes: &[u8]) -> Result<String> {
    let hex: String = ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(blobs.join(&hex), bytes)?;
    Ok(format!("sha256:{hex}"))
}

/// A reproducible tar of `dir`'s contents (GNU tar).
fn tar_dir(dir: &Path, out: &Path) -> Result<()> {
    sh(
        "tar",
        &[
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--sort=name",
            "--mtime=@0",
            "--format=posix",
            "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
            "-C",
            dir.to_str().context("a non-UTF-8 path")?,
            "-cf",
            out.to_str().context("a non-UTF-8 path")?,
            ".",
        ],
    )?;
    Ok(())
}

/// The images every node imports, written once per cluster into `dir`.
pub struct ClusterImages {
    pub archives: Vec<PathBuf>,
}

impl ClusterImages {
    /// Builds the pause, busybox and wgmesh images into `dir` (the last one needs the
    /// release build of the controller and the agent).
    pub fn build(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let pause = pause_image(dir)?;
        let busybox = busybox_image(dir)?;
        let wgmesh = wgmesh_image(dir)?;
        Ok(ClusterImages {
            archives: vec![pause, busybox, wgmesh],
        })
    }
}

/// Compiles `tools/pause.c` statically and wraps it as [`PAUSE_IMAGE`].
fn pause_image(dir: &Path) -> Result<PathBuf> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/pause.c");
    let rootfs = dir.join("pause-rootfs");
    std::fs::create_dir_all(&rootfs)?;
    let binary = rootfs.join("pause");
    let out = Command::new("cc")
        .args(["-static", "-O2", "-s", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .context("running cc (Debian gcc and libc6-dev) for the pause image")?;
    if !out.status.success() {
        bail!(
            "compiling {}: {}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let archive = dir.join("pause.oci.tar");
    write_oci_archive(
        &ImageSpec {
            name: PAUSE_IMAGE,
            rootfs: &rootfs,
            entrypoint: &["/pause"],
            cmd: &[],
            user: "65535:65535",
        },
        &archive,
    )?;
    Ok(archive)
}

/// Debian's static busybox as [`BUSYBOX_IMAGE`].
fn busybox_image(dir: &Path) -> Result<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        bail!("{} is missing (Debian busybox-static)", busybox.display());
    }
    let rootfs = dir.join("busybox-rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin)?;
    for d in ["tmp", "etc", "proc", "sys", "dev"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy(busybox, bin.join("busybox"))?;
    for applet in [
        "sh", "sleep", "ip", "wget", "nc", "cat", "ls", "hostname", "mkdir", "echo", "httpd",
        "ping",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    let archive = dir.join("busybox.oci.tar");
    write_oci_archive(
        &ImageSpec {
            name: BUSYBOX_IMAGE,
            rootfs: &rootfs,
            entrypoint: &[],
            cmd: &["/bin/sh"],
            user: "",
        },
        &archive,
    )?;
    Ok(archive)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The archive is an OCI layout whose blobs match their digests and sizes, and whose
    /// index names the image as containerd's importer expects.
    #[test]
    fn an_archive_is_a_consistent_oci_layout() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).unwrap();
        std::fs::write(rootfs.join("bin/hello"), b"#!/bin/sh\necho hi\n").unwrap();
        let archive = dir.path().join("img.tar");
        let spec = ImageSpec {
            name: "wgmesh.test/hello:1",
            rootfs: &rootfs,
            entrypoint: &["/bin/hello"],
            cmd: &[],
            user: "1000:1000",
        };
        write_oci_archive(&spec, &archive).unwrap();
        let again = dir.path().join("again.tar");
        write_oci_archive(&spec, &again).unwrap();
        assert_eq!(
            std::fs::read(&archive).unwrap(),
            std::fs::read(&again).unwrap(),
            "the same files give the same archive"
        );

        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        sh(
            "tar",
            &[
                "-C",
                out.to_str().unwrap(),
                "-xf",
                archive.to_str().unwrap(),
            ],
        )
        .unwrap();
        let blob = |digest: &str| {
            let hex = digest.strip_prefix("sha256:").unwrap();
            let bytes = std::fs::read(out.join("blobs/sha256").join(hex)).unwrap();
            let actual: String = ring::digest::digest(&ring::digest::SHA256, &bytes)
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(actual, hex);
            bytes
        };
        let read_json =
            |bytes: Vec<u8>| -> serde_json::Value { serde_json::from_slice(&bytes).unwrap() };
        let index = read_json(std::fs::read(out.join("index.json")).unwrap());
        let desc = &index["manifests"][0];
        assert_eq!(
            desc["annotations"]["io.containerd.image.name"],
            "wgmesh.test/hello:1"
        );
        let manifest_bytes = blob(desc["digest"].as_str().unwrap());
        assert_eq!(desc["size"], manifest_bytes.len());
        let manifest = read_json(manifest_bytes);
        let config = read_json(blob(manifest["config"]["digest"].as_str().unwrap()));
        assert_eq!(config["config"]["Entrypoint"][0], "/bin/hello");
        assert_eq!(config["config"]["User"], "1000:1000");
        let layer = &manifest["layers"][0];
        assert_eq!(config["rootfs"]["diff_ids"][0], layer["digest"]);
        let layer_bytes = blob(layer["digest"].as_str().unwrap());
        assert_eq!(layer["size"], layer_bytes.len());
    }
}
