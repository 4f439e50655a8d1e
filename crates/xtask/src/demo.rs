//! `cargo xtask demo`: a local control plane with wgmesh's CRDs and example objects, shown
//! with kubectl and left running until Ctrl-C.

use anyhow::{Context, Result};
use wgmesh_e2e::ControlPlane;
use wgmesh_e2e::install::install_crds;

use crate::setup::{repo_root, step};

pub fn run(no_wait: bool) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(demo(no_wait))
}

async fn demo(no_wait: bool) -> Result<()> {
    step("starting a local Kubernetes control plane (etcd + kube-apiserver on loopback)");
    let cp = ControlPlane::start().await?;
    eprintln!("    API server: {}", cp.url());

    step("kubectl apply -f crds/");
    eprint!("{}", install_crds(&cp)?);

    let examples = repo_root().join("deploy/examples");
    step("kubectl apply -f deploy/examples/");
    eprint!(
        "{}",
        cp.kubectl_ok(&["apply", "-f", &examples.display().to_string()])?
    );

    step("kubectl get wireguardmeshes,wireguardpeers");
    println!(
        "{}",
        cp.kubectl_ok(&["get", "wireguardmeshes,wireguardpeers", "-o", "wide"])?
    );

    let kubeconfig = cp.kubeconfig().display().to_string();
    if no_wait {
        step("done (--no-wait): stopping the control plane");
        return Ok(());
    }
    println!("The control plane keeps running until you press Ctrl-C. In another terminal:\n");
    println!("    export KUBECONFIG={kubeconfig}");
    println!("    kubectl get wgmesh,wgpeer");
    println!("    kubectl explain wireguardpeer.spec");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    step("stopping the control plane");
    drop(cp);
    Ok(())
}
