//! `cargo xtask demo`: a local control plane with wgmesh's CRDs and example objects, shown
//! with kubectl and left running until Ctrl-C.

use anyhow::{Context, Result};
use wgmesh_e2e::ControlPlane;
use wgmesh_e2e::controller::{Controller, ControllerTls};
use wgmesh_e2e::install::install_crds;

use crate::setup::{repo_root, step};

pub fn run(no_wait: bool) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(demo(no_wait))
}

async fn demo(no_wait: bool) -> Result<()> {
    step("building wgmesh-controller");
    wgmesh_e2e::binaries::workspace_binary("wgmesh-controller", "wgmesh-controller")?;

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

    step("starting wgmesh-controller against it (TLS, leader election, status writer)");
    let tls = ControllerTls::issue(&cp)?;
    let controller = Controller::start(&cp, &tls, "demo", &[]).await?;
    // Give the status writer a moment to allocate addresses and judge the peers.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;

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
    println!(
        "    kubectl describe wgpeer berlin-office   # Ready=False: its preshared-key Secret is missing"
    );
    println!("\nController log: {}", controller.log_path().display());
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    step("stopping the controller and the control plane");
    drop(controller);
    drop(cp);
    Ok(())
}
