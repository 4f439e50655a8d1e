//! Finds the control-plane binaries, or builds them from the Go module proxy into a cache.
//!
//! Lookup order: `$KUBEBUILDER_ASSETS` (the directory controller-runtime's setup-envtest
//! fills, so its users can reuse theirs), then the per-version cache
//! (`$WGMESH_CACHE_DIR`, else `$XDG_CACHE_HOME/wgmesh`, else `~/.cache/wgmesh`), then a build
//! with `tools/build-go-tools.sh`. A file lock keeps parallel tests from building twice.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::versions;

/// Paths of the programs a control plane needs.
#[derive(Debug, Clone)]
pub struct ControlPlaneBinaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kubectl: PathBuf,
}

/// The cache root, outside the repository so `cargo clean` and fresh clones keep it.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("WGMESH_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("wgmesh");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("wgmesh")
}

/// Finds or builds etcd, kube-apiserver and kubectl. Prints progress on stderr when it has
/// to build (a cold build takes minutes).
pub fn control_plane_binaries() -> Result<ControlPlaneBinaries> {
    if let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS") {
        let dir = PathBuf::from(assets);
        let bins = ControlPlaneBinaries {
            etcd: dir.join("etcd"),
            kube_apiserver: dir.join("kube-apiserver"),
            kubectl: dir.join("kubectl"),
        };
        if bins.etcd.is_file() && bins.kube_apiserver.is_file() {
            let kubectl = if bins.kubectl.is_file() {
                bins.kubectl
            } else {
                cached_tool(&KUBECTL)?
            };
            return Ok(ControlPlaneBinaries { kubectl, ..bins });
        }
        eprintln!(
            "[wgmesh] KUBEBUILDER_ASSETS={} has no etcd and kube-apiserver; using the wgmesh cache",
            dir.display()
        );
    }
    Ok(ControlPlaneBinaries {
        etcd: cached_tool(&ETCD)?,
        kube_apiserver: cached_tool(&KUBE_APISERVER)?,
        kubectl: cached_tool(&KUBECTL)?,
    })
}

/// A program built from the Go module proxy by `build-go-tools.sh <what> <version>` into
/// `<cache>/<dir_prefix>-v<version>/<binary>`.
#[derive(Debug, Clone, Copy)]
pub struct GoTool {
    pub what: &'static str,
    pub version: &'static str,
    pub dir_prefix: &'static str,
    pub binary: &'static str,
}

pub const ETCD: GoTool = GoTool {
    what: "etcd",
    version: versions::ETCD,
    dir_prefix: "etcd",
    binary: "etcd",
};
pub const KUBE_APISERVER: GoTool = GoTool {
    what: "k8s",
    version: versions::KUBERNETES,
    dir_prefix: "kubernetes",
    binary: "kube-apiserver",
};
pub const KUBECTL: GoTool = GoTool {
    binary: "kubectl",
    ..KUBE_APISERVER
};
/// What a real cluster adds to the control plane: the node agent, the Service proxy, the
/// scheduler and the controller manager (`crate::real_cluster`). Built with kube-apiserver,
/// in one build into the same cache entry.
pub const KUBELET: GoTool = GoTool {
    binary: "kubelet",
    ..KUBE_APISERVER
};
pub const KUBE_PROXY: GoTool = GoTool {
    binary: "kube-proxy",
    ..KUBELET
};
pub const KUBE_SCHEDULER: GoTool = GoTool {
    binary: "kube-scheduler",
    ..KUBELET
};
pub const KUBE_CONTROLLER_MANAGER: GoTool = GoTool {
    binary: "kube-controller-manager",
    ..KUBELET
};

/// Paths of the Kubernetes programs a real cluster runs besides its control plane.
#[derive(Debug, Clone)]
pub struct ClusterBinaries {
    pub kubelet: PathBuf,
    pub kube_proxy: PathBuf,
    pub kube_scheduler: PathBuf,
    pub kube_controller_manager: PathBuf,
}

/// Finds or builds kubelet, kube-proxy, kube-scheduler and kube-controller-manager (the
/// version of [`KUBE_APISERVER`]; `$KUBEBUILDER_ASSETS` has none of them).
pub fn cluster_binaries() -> Result<ClusterBinaries> {
    Ok(ClusterBinaries {
        kubelet: cached_tool(&KUBELET)?,
        kube_proxy: cached_tool(&KUBE_PROXY)?,
        kube_scheduler: cached_tool(&KUBE_SCHEDULER)?,
        kube_controller_manager: cached_tool(&KUBE_CONTROLLER_MANAGER)?,
    })
}

pub const HELM: GoTool = GoTool {
    what: "helm",
    version: versions::HELM,
    dir_prefix: "helm",
    binary: "helm",
};
/// Upstream wireguard-go, for the data-plane benchmark.
pub const WIREGUARD_GO: GoTool = GoTool {
    what: "wggo",
    version: versions::WIREGUARD_GO,
    dir_prefix: "wireguard-go",
    binary: "wireguard-go",
};

/// Every program `cargo xtask test` needs from Go.
pub const TEST_TOOLS: [GoTool; 8] = [
    ETCD,
    KUBE_APISERVER,
    KUBECTL,
    KUBELET,
    KUBE_PROXY,
    KUBE_SCHEDULER,
    KUBE_CONTROLLER_MANAGER,
    HELM,
];

impl GoTool {
    /// The cache directory of this tool's version.
    fn cache_entry(&self) -> PathBuf {
        cache_dir().join(format!("{}-v{}", self.dir_prefix, self.version))
    }

    /// Whether it is in the cache, so that no Go build will run for it.
    pub fn is_cached(&self) -> bool {
        self.cache_entry().join(self.binary).is_file()
    }
}

/// The tool's path in the cache, built first when absent.
pub fn cached_tool(tool: &GoTool) -> Result<PathBuf> {
    let GoTool {
        what,
        version,
        dir_prefix,
        binary,
    } = *tool;
    let dir = tool.cache_entry();
    let path = dir.join(binary);
    if path.is_file() {
        return Ok(path);
    }
    fs::create_dir_all(cache_dir())
        .with_context(|| format!("creating cache directory {}", cache_dir().display()))?;
    let lock_path = cache_dir().join(format!("{dir_prefix}-v{version}.lock"));
    let lock = File::create(&lock_path)
        .with_context(|| format!("creating lock file {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    // Another process may have built it while we waited for the lock.
    if path.is_file() {
        return Ok(path);
    }
    // A killed build leaves gigabytes of Go caches behind; a running one holds its lock.
    crate::scratch::remove_abandoned(&std::env::temp_dir(), "wgmesh-gobuild.");
    eprintln!(
        "[wgmesh] {binary} v{version} is not in {}; building it from the Go module proxy (once; cached afterwards)",
        dir.display()
    );
    let script = build_script();
    let status = Command::new("bash")
        .arg(&script)
        .arg(what)
        .arg(version)
        .arg(&dir)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!(
            "building {binary} v{version} failed ({status}); is Go installed and the Go module proxy reachable?"
        );
    }
    if !path.is_file() {
        bail!("{} did not produce {}", script.display(), path.display());
    }
    Ok(path)
}

fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tools")
        .join("build-go-tools.sh")
}
