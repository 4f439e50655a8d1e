//! Installing wgmesh's pieces into a control plane the way a user does, with kubectl.

use std::path::PathBuf;

use anyhow::Result;

use crate::ControlPlane;

/// The repository root (this crate lives in tests/e2e).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

/// `kubectl apply -f crds/`, then waits until every CRD is Established.
pub fn install_crds(cp: &ControlPlane) -> Result<String> {
    let crds = repo_root().join("crds");
    let applied = cp.kubectl_ok(&["apply", "-f", &crds.display().to_string()])?;
    for (_, crd) in wgmesh_api::crds() {
        let name = crd.metadata.name.unwrap_or_default();
        cp.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{name}"),
        ])?;
    }
    Ok(applied)
}

/// The CRDs and the `default` mesh of `deploy/examples/mesh-default.yaml`.
pub fn install_default_mesh(cp: &ControlPlane) -> Result<()> {
    install_crds(cp)?;
    let mesh = repo_root().join("deploy/examples/mesh-default.yaml");
    cp.kubectl_ok(&["apply", "-f", &mesh.display().to_string()])?;
    Ok(())
}
