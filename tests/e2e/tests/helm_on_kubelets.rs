//! The chart as users install it, on real kubelets (`wgmesh_e2e::real_cluster`): a cluster
//! with no pod network, `helm install` in CNI mode with docs/kind.md's commands, the agents'
//! CNI configuration giving pods their addresses, and pods the scheduler places on every
//! node reaching each other through the tunnel, with nothing in plaintext on the underlay.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wgmesh_e2e::chaos::watcher::Watcher;
use wgmesh_e2e::install::repo_root;
use wgmesh_e2e::real_cluster::chart::{
    KIND_ADDON_STEPS, KIND_CNI_STEPS, KIND_POD_STEPS, TUNNEL_CIDR, deploy_web, http_get_from_pod,
    install_as_documented, ping_as_documented,
};
use wgmesh_e2e::real_cluster::{CLUSTER_CIDR, PodNetwork, RealCluster, idle};

#[test]
fn docs_say_what_the_test_runs() {
    let doc = std::fs::read_to_string(repo_root().join("docs/kind.md")).unwrap();
    // The document's commands, with line continuations joined and spaces collapsed.
    let doc = doc.replace("\\\n", " ");
    let doc: String = doc.split_whitespace().collect::<Vec<_>>().join(" ");
    for step in KIND_CNI_STEPS
        .iter()
        .chain(KIND_ADDON_STEPS)
        .chain(KIND_POD_STEPS)
    {
        let command = step.join(" ");
        assert!(
            doc.contains(&command),
            "docs/kind.md lacks `{command}`, which the real-cluster test runs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_in_cni_mode_encrypts_pod_traffic_on_real_kubelets() -> Result<()> {
    let started = Instant::now();
    let mut cluster = RealCluster::start(3, PodNetwork::None).await?;
    eprintln!(
        "[helm-on-kubelets] 3 nodes registered, no pod network, after {:.1?}",
        started.elapsed()
    );
    let mut watcher = Watcher::new(cluster.dir(), &[CLUSTER_CIDR, TUNNEL_CIDR])?;
    for node in &cluster.nodes {
        watcher.watch(&node.name, &cluster.underlay_link(node.index))?;
    }

    let install = Instant::now();
    install_as_documented(&mut cluster, |out| eprintln!("[helm-on-kubelets] {out}"))?;
    eprintln!(
        "[helm-on-kubelets] installed, every node Ready, in {:.1?}\n{}",
        install.elapsed(),
        cluster
            .cp
            .kubectl_ok(&["get", "pods", "-A", "-o", "wide"])?
            .trim_end()
    );

    // docs/kind.md's two pods and their ping.
    let ping = ping_as_documented(&mut cluster, |out| eprintln!("[helm-on-kubelets] {out}"))?;
    if !ping.contains(" 0% packet loss") {
        bail!("pod a's ping of pod b lost packets: {ping}");
    }

    // Pods the scheduler places on every node reach every other one by its address, through
    // the tunnel.
    let pods = deploy_web(&mut cluster)?;
    let matrix = Instant::now();
    for from in &pods {
        let node = cluster
            .nodes
            .iter()
            .find(|n| n.name == from.node)
            .context("a pod on an unknown node")?;
        for to in pods.iter().filter(|p| p.node != from.node) {
            let route = node.ns.ip(&["route", "get", &to.ip])?;
            if !route.contains("dev wgmesh0") {
                bail!(
                    "on {}, {} ({} on {}) is not routed into the tunnel: {route}",
                    from.node,
                    to.ip,
                    to.name,
                    to.node
                );
            }
            let body = http_get_from_pod(&cluster, &from.name, &to.ip, 8080)?;
            if body.trim() != to.name {
                bail!(
                    "{} asked {}:8080 ({}) and got {body:?}",
                    from.name,
                    to.ip,
                    to.name
                );
            }
            let ping = cluster.cp.kubectl_ok(&[
                "exec", &from.name, "--", "ping", "-c", "2", "-W", "2", &to.ip,
            ])?;
            if !ping.contains(" 0% packet loss") {
                bail!("{} pinging {}: {ping}", from.name, to.name);
            }
        }
    }
    eprintln!(
        "[helm-on-kubelets] every web pod reached the others across nodes (HTTP and ping) in {:.1?}",
        matrix.elapsed()
    );

    let counts = watcher.poll()?;
    for c in &counts {
        eprintln!(
            "[helm-on-kubelets] underlay of {}: {} packets sent, {} pod packets in plaintext {:?}",
            c.node, c.packets, c.plaintext, c.examples
        );
    }
    let plaintext: u64 = counts.iter().map(|c| c.plaintext).sum();
    if plaintext > 0 {
        bail!("{plaintext} pod packets crossed the underlay in plaintext: {counts:?}");
    }
    if counts.iter().any(|c| c.packets == 0) {
        bail!("a capture saw nothing: {counts:?}");
    }
    // What the cluster with wgmesh costs when nothing happens: agents and controllers
    // among the kubelets, containerd and the control plane.
    for line in idle::measure(&cluster.pids(), Duration::from_secs(10)).await {
        eprintln!("[helm-on-kubelets] {line}");
    }
    eprintln!("[helm-on-kubelets] done in {:.1?}", started.elapsed());
    Ok(())
}
