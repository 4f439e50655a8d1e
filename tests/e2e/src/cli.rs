//! `kubectl-wgmesh`, the CLI binary of this workspace, run against a test cluster.

use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

/// The CLI binary, run with `--kubeconfig` of the test control plane.
pub struct Cli {
    pub binary: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Cli {
    /// The workspace's `kubectl-wgmesh` (built if needed), for the cluster of `kubeconfig`.
    pub fn new(kubeconfig: impl Into<PathBuf>) -> Result<Self> {
        Ok(Cli {
            binary: crate::binaries::workspace_binary("wgmesh-cli", "kubectl-wgmesh")?,
            kubeconfig: kubeconfig.into(),
        })
    }

    pub fn run(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.binary)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .with_context(|| format!("running kubectl-wgmesh {}", args.join(" ")))
    }

    /// Its standard output; an error, with its standard error, unless it exited 0.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args)?;
        if !out.status.success() {
            bail!(
                "kubectl-wgmesh {} exited with {:?}: {}",
                args.join(" "),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
