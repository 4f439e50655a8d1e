//! A real cluster on this machine (`wgmesh_e2e::real_cluster`): real kubelets and containerd
//! on namespace nodes, the scheduler and the controller manager, a pod that runs, and a
//! ClusterIP Service (kube-proxy) that reaches it from every node.
//!
//! Its first run builds kubelet and the other Kubernetes programs (with kube-apiserver, 20-30
//! minutes on 2 cores; `cargo xtask test` does that first, with progress) and installs
//! containerd, runc and busybox-static with apt-get when missing.
//! `WGMESH_REAL_CLUSTER_NODES` sets the number of nodes (default 3).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wgmesh_e2e::real_cluster::chart::{http_get, web_server_container};
use wgmesh_e2e::real_cluster::{PodNetwork, RealCluster, idle};

fn node_count() -> usize {
    std::env::var("WGMESH_REAL_CLUSTER_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_cluster_nodes_become_ready() -> Result<()> {
    let n = node_count();
    let started = Instant::now();
    let mut cluster = RealCluster::start(n, PodNetwork::Bridge).await?;
    let registered = started.elapsed();
    cluster.wait_nodes_ready(Duration::from_secs(180)).await?;
    let ready = started.elapsed();
    eprintln!("[real-cluster] {n} nodes: started in {registered:.1?}, all Ready after {ready:.1?}");
    eprintln!(
        "{}",
        cluster.cp.kubectl_ok(&["get", "nodes", "-o", "wide"])?
    );

    // A pod the scheduler places, on the busybox image built here: a web server, behind a
    // ClusterIP Service.
    let objects = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [{
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "sleeper", "namespace": "default", "labels": {"app": "web"}},
            "spec": {
                "containers": [web_server_container()],
                "terminationGracePeriodSeconds": 1,
            },
        }, {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
        }],
    });
    let manifest = cluster.dir().join("sleeper.json");
    std::fs::write(&manifest, objects.to_string())?;
    let manifest = manifest.display().to_string();
    cluster.cp.kubectl_ok(&["apply", "-f", &manifest])?;
    let pod_started = Instant::now();
    let deadline = pod_started + Duration::from_secs(120);
    loop {
        cluster.check_running()?;
        let phase = cluster.cp.kubectl_ok(&[
            "get",
            "pod",
            "sleeper",
            "-o",
            "jsonpath={.status.phase} {.spec.nodeName} {.status.podIP}",
        ])?;
        if phase.starts_with("Running") {
            eprintln!(
                "[real-cluster] pod Running after {:.1?}: {phase}",
                pod_started.elapsed()
            );
            let ip = phase.split_whitespace().nth(2).context("no pod IP")?;
            if !ip.starts_with("10.244.") {
                bail!("the pod's address {ip} is not in the cluster CIDR");
            }
            break;
        }
        if Instant::now() > deadline {
            let describe = cluster.cp.kubectl(&["describe", "pod", "sleeper"])?;
            let tails: Vec<String> = cluster
                .nodes
                .iter()
                .map(|n| {
                    format!(
                        "--- {} kubelet:\n{}\n--- containerd:\n{}",
                        n.name,
                        n.kubelet_log_tail(20),
                        n.containerd_log_tail(10)
                    )
                })
                .collect();
            bail!(
                "the pod is not Running ({phase}):\n{}\n{}",
                String::from_utf8_lossy(&describe.stdout),
                tails.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The Service from every node's network namespace (hostNetwork's view): kube-proxy's
    // rules there send it to the pod, on its node or across the underlay.
    let cluster_ip =
        cluster
            .cp
            .kubectl_ok(&["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"])?;
    let addr: SocketAddr = format!("{cluster_ip}:80").parse()?;
    let service_started = Instant::now();
    for node in &cluster.nodes {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match http_get(&node.ns, addr) {
                Ok(body) if body.trim() == "sleeper" => break,
                Ok(body) if Instant::now() > deadline => {
                    bail!("{}: {addr} answered {body:?}", node.name)
                }
                Err(e) if Instant::now() > deadline => {
                    bail!(
                        "{}: {addr}: {e:#}\n{}",
                        node.name,
                        node.kube_proxy_log_tail(20)
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    eprintln!(
        "[real-cluster] Service {addr} answers from every node after {:.1?}",
        service_started.elapsed()
    );

    // The idle cluster's cost, per program.
    for line in idle::measure(&cluster.pids(), Duration::from_secs(10)).await {
        eprintln!("[real-cluster] {line}");
    }
    Ok(())
}
