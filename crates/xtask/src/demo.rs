//! `cargo xtask demo`: the whole of wgmesh on one machine, as a new user first sees it: a
//! local control plane, the Helm chart installed into it, the chart's controller, three
//! "nodes" (network namespaces) each running the chart's agent with a pod, then the peers
//! as kubectl shows them and a pod-to-pod transfer through the tunnel. Left running until
//! Ctrl-C (`--no-wait` stops at once). Needs root, like the end-to-end tests.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wgmesh_e2e::helm::Helm;
use wgmesh_e2e::mesh::TestMesh;
use wgmesh_e2e::netns::{echo_roundtrip, echo_server};

use crate::setup::{DEBIAN_PACKAGES, ensure_debian_packages, step};

const NODES: usize = 3;
const ECHO_PORT: u16 = 7000;

pub fn run(no_wait: bool) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the demo creates network namespaces and TUN devices: run it as root");
    }
    // What the nodes and pods run (the end-to-end tests' packages), and ping for the commands
    // printed at the end.
    step("checking Debian packages");
    let packages: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .chain(["iputils-ping"])
        .collect();
    ensure_debian_packages(&packages)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(demo(no_wait))
}

async fn demo(no_wait: bool) -> Result<()> {
    step("building wgmesh-controller and wgmesh-agent");
    wgmesh_e2e::binaries::workspace_binary("wgmesh-controller", "wgmesh-controller")?;
    wgmesh_e2e::binaries::workspace_binary("wgmesh-node-agent", "wgmesh-agent")?;

    step(&format!(
        "local control plane (etcd + kube-apiserver), `helm install` of deploy/helm/wgmesh in CNI mode, \
         the controller and {NODES} nodes running exactly what the chart renders"
    ));
    let started = Instant::now();
    let mesh = TestMesh::start(NODES).await?;
    mesh.wait_peer_counts(NODES - 1, Duration::from_secs(90))
        .await?;
    eprintln!(
        "    API server {}; mesh up in {:.1?}",
        mesh.cp.url(),
        started.elapsed()
    );

    step("helm list --namespace wgmesh-system");
    println!(
        "{}",
        Helm::new()?.ok(
            &["list", "--namespace", wgmesh_e2e::helm::NAMESPACE],
            Some(mesh.cp.kubeconfig())
        )?
    );
    // Status (addresses, handshakes) is written by the controller from the agents' reports.
    tokio::time::sleep(Duration::from_secs(3)).await;
    step("kubectl get wgpeers -o wide");
    println!("{}", mesh.cp.kubectl_ok(&["get", "wgpeers", "-o", "wide"])?);

    for node in &mesh.nodes {
        eprintln!(
            "    {}: underlay {}, pod {} (CIDR {}), netns {}",
            node.name, node.node_ip, node.pod_ip, node.pod_cidr, node.ns.name
        );
    }

    let (from, to) = (&mesh.nodes[0], &mesh.nodes[NODES - 1]);
    step(&format!(
        "a pod-to-pod transfer: 8 MiB from the pod on {} to the pod on {}, through wgmesh0",
        from.name, to.name
    ));
    let route = from.ns.ip(&["route", "get", &to.pod_ip])?;
    let route = route.lines().next().unwrap_or_default().trim();
    eprintln!(
        "    on {}: ip route get {} -> {route}",
        from.name, to.pod_ip
    );
    let target: SocketAddr = format!("{}:{ECHO_PORT}", to.pod_ip).parse()?;
    echo_server(&to.pod, format!("0.0.0.0:{ECHO_PORT}").parse()?, 1)?;
    let payload = vec![0x5a_u8; 8 << 20];
    let t = Instant::now();
    echo_roundtrip(&from.pod, target, payload, Duration::from_secs(60))?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "    echoed 8 MiB there and back in {secs:.2} s ({:.0} Mbit/s each way)",
        8.0 * 8.0 * 1.048_576 / secs
    );
    step(&format!("wg show wgmesh0 on {}", from.name));
    println!("{}", mesh.wg_show(0)?);

    if no_wait {
        step("done (--no-wait): stopping everything");
        return Ok(());
    }
    println!("\nwgmesh keeps running until you press Ctrl-C. In another terminal:\n");
    println!("    export KUBECONFIG={}", mesh.cp.kubeconfig().display());
    println!("    kubectl get wgmesh,wgpeers -o wide");
    println!(
        "    ip netns exec {} ping {}      # node-1's pod to node-{NODES}'s pod",
        from.pod.name, to.pod_ip
    );
    println!(
        "    ip netns exec {} ip route        # node-1's routes via wgmesh0",
        from.ns.name
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    step("stopping the agents, the controller and the control plane");
    drop(mesh);
    Ok(())
}
