//! `cargo xtask demo`: the whole of wgmesh on one machine, as a new user first sees it: a
//! real cluster (`wgmesh_e2e::real_cluster`: three nodes with containerd, kubelet and
//! kube-proxy), wgmesh installed with `helm install` as docs/kind.md says, a web server on
//! every node, then the peers as kubectl shows them and a pod-to-pod transfer through the
//! tunnel. Left running until Ctrl-C (`--no-wait` stops at once). Needs root, like the
//! end-to-end tests.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wgmesh_e2e::netns::{echo_roundtrip, echo_server};
use wgmesh_e2e::real_cluster::chart::{deploy_web, install_as_documented, pod_netns};
use wgmesh_e2e::real_cluster::{PodNetwork, RealCluster};

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
    step(&format!(
        "a real cluster on this machine: the control plane, kube-scheduler, kube-controller-manager, \
         and {NODES} nodes (network namespaces) each with containerd, kubelet and kube-proxy; \
         the wgmesh image built from the release binaries; no pod network yet"
    ));
    let started = Instant::now();
    let mut cluster = RealCluster::start(NODES, PodNetwork::None).await?;
    eprintln!(
        "    API server {}; {NODES} nodes registered in {:.1?}",
        cluster.cp.url(),
        started.elapsed()
    );

    step("installing wgmesh in CNI mode with docs/kind.md's commands");
    install_as_documented(&mut cluster, |out| println!("$ {out}\n"))?;
    step("kubectl get nodes -o wide");
    println!(
        "{}",
        cluster.cp.kubectl_ok(&["get", "nodes", "-o", "wide"])?
    );

    step("a web server on every node (a DaemonSet, placed by the scheduler)");
    let pods = deploy_web(&mut cluster)?;
    step("kubectl get pods -A -o wide");
    println!(
        "{}",
        cluster
            .cp
            .kubectl_ok(&["get", "pods", "-A", "-o", "wide"])?
    );

    // One line per node, in the shape scripts read.
    let mut pod_namespaces = Vec::new();
    for (node, pod) in cluster.nodes.iter().zip(&pods) {
        let cidr = cluster.cp.kubectl_ok(&[
            "get",
            "node",
            &node.name,
            "-o",
            "jsonpath={.spec.podCIDR}",
        ])?;
        let pod_ns = pod_netns(&cluster, pod, &format!("wgm{}p{}", cluster.id, node.index))?;
        println!(
            "{}: underlay {}, pod {} (CIDR {}), netns {}, pod netns {}",
            node.name, node.node_ip, pod.ip, cidr, node.ns.name, pod_ns.name
        );
        pod_namespaces.push(pod_ns);
    }

    let (from, to) = (&pods[0], &pods[NODES - 1]);
    let (from_ns, to_ns) = (&pod_namespaces[0], &pod_namespaces[NODES - 1]);
    step(&format!(
        "a pod-to-pod transfer: 8 MiB from {} on {} to {} on {}, through wgmesh0",
        from.name, from.node, to.name, to.node
    ));
    let route = cluster.nodes[0].ns.ip(&["route", "get", &to.ip])?;
    let route = route.lines().next().unwrap_or_default().trim();
    eprintln!("    on {}: ip route get {} -> {route}", from.node, to.ip);
    let target: SocketAddr = format!("{}:{ECHO_PORT}", to.ip).parse()?;
    echo_server(to_ns, format!("0.0.0.0:{ECHO_PORT}").parse()?, 1)?;
    let payload = vec![0x5a_u8; 8 << 20];
    let t = Instant::now();
    echo_roundtrip(from_ns, target, payload, Duration::from_secs(60))?;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "    echoed 8 MiB there and back in {secs:.2} s ({:.0} Mbit/s each way)",
        8.0 * 8.0 * 1.048_576 / secs
    );
    step(&format!("wg show wgmesh0 on {}", from.node));
    println!("{}", cluster.nodes[0].exec("wg", &["show", "wgmesh0"])?);

    if no_wait {
        step("done (--no-wait): stopping everything");
        return Ok(());
    }
    println!("\nwgmesh keeps running until you press Ctrl-C. In another terminal:\n");
    println!(
        "    export KUBECONFIG={}",
        cluster.cp.kubeconfig().display()
    );
    println!("    kubectl get wgmesh,wgpeers -o wide");
    println!("    kubectl get pods -A -o wide");
    println!(
        "    ip netns exec {} ping {}      # {}'s web pod to {}'s",
        from_ns.name, to.ip, from.node, to.node
    );
    println!(
        "    ip netns exec {} ip route        # {}'s routes via wgmesh0",
        cluster.nodes[0].ns.name, from.node
    );
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    step("stopping the cluster");
    drop(pod_namespaces);
    drop(cluster);
    Ok(())
}
