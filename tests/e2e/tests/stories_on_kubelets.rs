//! The stories users live through, on real kubelets (`wgmesh_e2e::real_cluster`), with the
//! chart installed as docs/kind.md says and a capture on every node's underlay link:
//! - add-on mode over a pod network that already works (the Debian bridge and host-local
//!   plugins, routed between nodes): pods keep their addresses and their traffic becomes
//!   encrypted; a node reboots with its agent late and starts no pod before the agent
//!   programmed it (the pods' gate); `helm uninstall` leaves the nodes clean and the other
//!   network working; a reinstall encrypts again;
//! - CNI mode through a node joining under traffic, the controllers' lease moving, a node
//!   drained and deleted, a laptop on Debian's wireguard-go through a gateway node, a
//!   `helm upgrade` to a new image tag rolling the agents under a TCP stream (the stall per
//!   node reported), a node rebooting with its agent late (no pod network, so no pod, until
//!   the agent programmed it), then `helm uninstall` leaving every node clean and a reinstall.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use wgmesh_e2e::chaos::meter::Meter;
use wgmesh_e2e::chaos::watcher::Watcher;
use wgmesh_e2e::foreign::{quick_parts, wireguard_go_from_config};
use wgmesh_e2e::helm::NAMESPACE;
use wgmesh_e2e::install::repo_root;
use wgmesh_e2e::real_cluster::chart::{
    KIND_ADDON_STEPS, TUNNEL_CIDR, WebPod, deploy_web, diagnose, http_get, http_get_from_pod,
    install_as_documented, kubectl_with_plugin, pod_netns, run_documented, web_pods,
};
use wgmesh_e2e::real_cluster::image::{BUSYBOX_IMAGE, WGMESH_IMAGE};
use wgmesh_e2e::real_cluster::lifecycle::{
    AGENT_PODS, CONTROLLER_PODS, Rollout, helm, lease_holder, leftovers, pods as chart_pods,
};
use wgmesh_e2e::real_cluster::{CLUSTER_CIDR, PodNetwork, RealCluster};

/// One real cluster at a time: two would share these 2 cores, and their timeouts with them.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const INTERFACE: &str = "wgmesh0";
const CNI_BRIDGE: &str = "wgmesh-br0";

fn log(what: impl AsRef<str>) {
    eprintln!("[stories] {}", what.as_ref());
}

/// Retries `f` every half second until it succeeds or `timeout` passes.
fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => bail!("{what} (after {timeout:?}): {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Every web pod asks every web pod on another node for its name (HTTP over TCP).
fn web_matrix(cluster: &RealCluster, pods: &[WebPod]) -> Result<()> {
    for from in pods {
        for to in pods.iter().filter(|p| p.node != from.node) {
            let body = http_get_from_pod(cluster, &from.name, &to.ip, 8080)
                .with_context(|| format!("{} -> {}", from.name, to.name))?;
            ensure!(
                body.trim() == to.name,
                "{} asked {}:8080 ({}) and got {body:?}",
                from.name,
                to.ip,
                to.name
            );
        }
    }
    Ok(())
}

/// Whether every node routes every other node's web pod into the tunnel.
fn routed_into_tunnel(cluster: &RealCluster, pods: &[WebPod]) -> Result<()> {
    for from in pods {
        let node = cluster.node(&from.node)?;
        for to in pods.iter().filter(|p| p.node != from.node) {
            let route = node.exec("ip", &["route", "get", &to.ip])?;
            ensure!(
                route.contains(&format!("dev {INTERFACE}")),
                "{} routes {} ({}) outside the tunnel: {}",
                from.node,
                to.ip,
                to.node,
                route.trim()
            );
        }
    }
    Ok(())
}

/// The number of peers on `node`'s WireGuard device (our userspace one here: this kernel has
/// no WireGuard module).
fn device_peers(cluster: &RealCluster, node: &str) -> Result<usize> {
    let out = cluster
        .node(node)?
        .exec("wg", &["show", INTERFACE, "peers"])?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

/// Waits until no node has anything of wgmesh's left.
fn wait_clean(cluster: &RealCluster, timeout: Duration) -> Result<()> {
    eventually("every node clean", timeout, || {
        let mut left = Vec::new();
        for node in &cluster.nodes {
            for l in leftovers(node, INTERFACE, CNI_BRIDGE)? {
                left.push(format!("{}: {l}", node.name));
            }
        }
        ensure!(left.is_empty(), "left behind:\n{}", left.join("\n"));
        Ok(())
    })
}

fn watch_every_node(cluster: &RealCluster) -> Result<Watcher> {
    let mut watcher = Watcher::new(cluster.dir(), &[CLUSTER_CIDR, TUNNEL_CIDR])?;
    for node in &cluster.nodes {
        watcher.watch(&node.name, &cluster.underlay_link(node.index))?;
    }
    Ok(watcher)
}

fn assert_no_plaintext_since(watcher: &mut Watcher, before: u64, what: &str) -> Result<()> {
    let counts = watcher.poll()?;
    let now: u64 = counts.iter().map(|c| c.plaintext).sum();
    ensure!(
        now == before,
        "{} pod packets crossed the underlay in plaintext {what}: {counts:?}",
        now - before
    );
    ensure!(
        counts.iter().all(|c| c.packets > 0),
        "a capture saw nothing: {counts:?}"
    );
    Ok(())
}

/// docs/kind.md's add-on-mode install, then waits until pod traffic between nodes is routed
/// into the tunnel.
fn install_addon(cluster: &mut RealCluster, pods: &[WebPod]) -> Result<()> {
    let t = Instant::now();
    run_documented(cluster, KIND_ADDON_STEPS, |out| log(out))?;
    eventually(
        "every node routes the others' pods into the tunnel",
        Duration::from_secs(60),
        || routed_into_tunnel(cluster, pods),
    )?;
    log(format!(
        "add-on: installed, pod traffic routed into the tunnel, in {:.1?}",
        t.elapsed()
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addon_mode_over_a_working_pod_network_then_uninstall_and_reinstall() -> Result<()> {
    let _one = ONE_CLUSTER.lock().await;
    let started = Instant::now();
    let mut cluster = RealCluster::start(3, PodNetwork::Bridge).await?;
    cluster.wait_nodes_ready(Duration::from_secs(180)).await?;
    log(format!(
        "add-on: 3 nodes Ready on the bridge network after {:.1?}",
        started.elapsed()
    ));
    let mut watcher = watch_every_node(&cluster)?;

    // The other network carries pod traffic, in plaintext: the capture sees it.
    let before = deploy_web(&mut cluster)?;
    web_matrix(&cluster, &before)?;
    let plaintext = watcher.plaintext()?;
    ensure!(
        plaintext > 0,
        "the capture saw no plaintext pod packet before wgmesh: it would miss a leak"
    );
    log(format!(
        "add-on: before wgmesh, {plaintext} pod packets crossed the underlay in plaintext"
    ));
    let conflist = |c: &RealCluster| -> Result<Vec<String>> {
        c.nodes
            .iter()
            .map(|n| {
                Ok(std::fs::read_to_string(
                    n.host_path("/etc/cni/net.d/10-bridge.conflist"),
                )?)
            })
            .collect()
    };
    let other_cni = conflist(&cluster)?;
    let main_routes = |c: &RealCluster| -> Result<Vec<String>> {
        c.nodes
            .iter()
            .map(|n| {
                // Without the routes of our interface (its address's subnet).
                let routes = n.exec("ip", &["route", "show", "table", "main"])?;
                Ok(routes
                    .lines()
                    .filter(|l| !l.contains(&format!("dev {INTERFACE}")))
                    .collect::<Vec<_>>()
                    .join("\n"))
            })
            .collect()
    };
    let other_routes = main_routes(&cluster)?;
    ensure!(
        other_routes.iter().all(|r| r.contains("10.244.")),
        "the nodes have no plaintext routes to other nodes' pods: {other_routes:?}"
    );
    let router_routes = cluster.router.ip(&["route"])?;

    install_addon(&mut cluster, &before)?;

    // Pods keep their addresses; the other network's configuration and routes stay.
    let after = web_pods(&cluster)?;
    ensure!(
        after
            .iter()
            .map(|p| (&p.name, &p.ip))
            .eq(before.iter().map(|p| (&p.name, &p.ip))),
        "the pods changed: {before:?} -> {after:?}"
    );
    ensure!(
        conflist(&cluster)? == other_cni,
        "the other CNI's configuration changed"
    );
    // Its plaintext routes stay in the main table; wgmesh's rule is looked up first.
    let now = main_routes(&cluster)?;
    ensure!(
        now == other_routes,
        "the nodes' main tables changed: {other_routes:#?} -> {now:#?}"
    );
    ensure!(
        cluster.router.ip(&["route"])? == router_routes,
        "the underlay's routes changed"
    );
    let base = watcher.plaintext()?;
    web_matrix(&cluster, &after)?;
    assert_no_plaintext_since(&mut watcher, base, "with wgmesh in add-on mode")?;
    log("add-on: every pod reached the others across nodes, nothing in plaintext");

    // node-2 reboots, and its agent comes late: the pods' gate (a copy of the bridge
    // network's configuration, linked to /run) keeps its pods from starting until then.
    reboot_with_the_agent_late("add-on", &mut cluster, &mut watcher, WGMESH_IMAGE).await?;
    let after = eventually(
        "node-2's web pod back, every pod reaching the others",
        Duration::from_secs(60),
        || {
            let pods = web_pods(&cluster)?;
            web_matrix(&cluster, &pods)?;
            Ok(pods)
        },
    )?;

    // A mesh made by hand, besides the chart's (it selects no node here).
    let by_hand = cluster.cp.dir().join("by-hand.yaml");
    std::fs::write(
        &by_hand,
        r#"apiVersion: wgmesh.io/v1alpha1
kind: WireGuardMesh
metadata:
  name: by-hand
spec:
  interfaceName: wgmesh1
  listenPort: 51821
  tunnelCIDRs: [10.251.0.0/16]
  nodeSelector:
    matchLabels:
      wgmesh.test/by-hand: "yes"
"#,
    )?;
    cluster
        .cp
        .kubectl_ok(&["apply", "-f", &by_hand.display().to_string()])?;

    // helm uninstall: the pre-delete hook deletes every mesh and waits for the agents to
    // leave.
    let t = Instant::now();
    let out = helm(&cluster, &["uninstall", "wgmesh", "--namespace", NAMESPACE])
        .with_context(|| diagnose(&mut cluster))?;
    log(format!(
        "add-on: `helm uninstall` in {:.1?}: {}",
        t.elapsed(),
        out.trim()
    ));
    let left = cluster
        .cp
        .kubectl_ok(&["get", "wireguardmeshes", "-o", "name"])?;
    ensure!(
        left.trim().is_empty(),
        "meshes left after the uninstall: {left}"
    );
    wait_clean(&cluster, Duration::from_secs(30))?;
    // The other network still carries the pods (in plaintext again: wgmesh is gone).
    web_matrix(&cluster, &after)?;
    log(format!(
        "add-on: every node clean {:.1?} after the uninstall began; pods still reach each other",
        t.elapsed()
    ));

    // And a reinstall encrypts again.
    install_addon(&mut cluster, &after)?;
    let base = watcher.plaintext()?;
    web_matrix(&cluster, &after)?;
    assert_no_plaintext_since(&mut watcher, base, "after the reinstall")?;
    log(format!("add-on: done in {:.1?}", started.elapsed()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_mode_join_failover_drain_laptop_upgrade_and_uninstall() -> Result<()> {
    let _one = ONE_CLUSTER.lock().await;
    let started = Instant::now();
    let mut cluster = RealCluster::start(3, PodNetwork::None).await?;
    let mut watcher = watch_every_node(&cluster)?;
    log(format!(
        "cni: 3 nodes registered after {:.1?}",
        started.elapsed()
    ));
    install_as_documented(&mut cluster, |out| {
        log(out.lines().next().unwrap_or_default())
    })?;
    let pods = deploy_web(&mut cluster)?;
    log(format!(
        "cni: installed, web pods on 3 nodes, after {:.1?}",
        started.elapsed()
    ));
    let pod_on = |pods: &[WebPod], node: &str| -> Result<WebPod> {
        pods.iter()
            .find(|p| p.node == node)
            .cloned()
            .with_context(|| format!("no web pod on {node}: {pods:?}"))
    };
    // A TCP stream (and UDP pings) from node-1's web pod to node-2's for the whole story.
    let (p1, p2) = (pod_on(&pods, "node-1")?, pod_on(&pods, "node-2")?);
    let (ns1, ns2) = (
        pod_netns(&cluster, &p1, &format!("{}p1", cluster.id))?,
        pod_netns(&cluster, &p2, &format!("{}p2", cluster.id))?,
    );
    let stream12 = Meter::start(&ns1, (&ns2, &p2.ip), (&ns2, &p2.ip))?;
    stream12
        .wait_flowing(0, 50, Duration::from_secs(30))
        .await
        .context("node-1 -> node-2 stream")?;

    // 1. A fourth node joins under traffic: the agent DaemonSet covers it, it gets the mesh.
    let t = Instant::now();
    cluster.add_node(4)?;
    watcher.watch("node-4", &cluster.underlay_link(4))?;
    cluster
        .wait_nodes_registered(Duration::from_secs(60))
        .await?;
    cluster.wait_nodes_ready(Duration::from_secs(120)).await?;
    cluster.cp.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "rollout",
        "status",
        "daemonset/wgmesh-agent",
        "--timeout=120s",
    ])?;
    cluster
        .cp
        .kubectl_ok(&["rollout", "status", "daemonset/web", "--timeout=120s"])?;
    let pods = eventually("a web pod on node-4", Duration::from_secs(30), || {
        let pods = web_pods(&cluster)?;
        pod_on(&pods, "node-4")?;
        Ok(pods)
    })?;
    eventually("node-4 in the mesh", Duration::from_secs(60), || {
        routed_into_tunnel(&cluster, &pods)?;
        web_matrix(&cluster, &pods)
    })?;
    for node in ["node-1", "node-2", "node-3", "node-4"] {
        ensure!(device_peers(&cluster, node)? == 3, "{node} lacks a peer");
    }
    log(format!(
        "cni: node-4 joined and reached every pod (and they it) {:.1?} after its kubelet started",
        t.elapsed()
    ));
    let p4 = pod_on(&pods, "node-4")?;
    let ns4 = pod_netns(&cluster, &p4, &format!("{}p4", cluster.id))?;
    let stream41 = Meter::start(&ns4, (&ns1, &p1.ip), (&ns1, &p1.ip))?;
    // Windows are in stream12's clock; stream41's started this much later.
    let offset41 = stream12.now_ms() - stream41.now_ms();
    stream41
        .wait_flowing(0, 50, Duration::from_secs(30))
        .await
        .context("node-4 -> node-1 stream")?;

    // 2. The controllers' lease moves when the leader's pod is deleted.
    let leader = lease_holder(&cluster)?;
    let controllers = pods_named(&cluster, CONTROLLER_PODS)?;
    ensure!(
        controllers.len() == 2 && controllers.contains(&leader),
        "two controller pods, one the leader {leader:?}: {controllers:?}"
    );
    let t = Instant::now();
    cluster
        .cp
        .kubectl_ok(&["-n", NAMESPACE, "delete", "pod", &leader, "--wait=false"])?;
    let new_leader = eventually("the lease moves", Duration::from_secs(60), || {
        let holder = lease_holder(&cluster)?;
        ensure!(!holder.is_empty() && holder != leader, "held by {holder:?}");
        Ok(holder)
    })?;
    log(format!(
        "cni: the lease moved from {leader} to {new_leader} {:.1?} after the leader's pod was deleted",
        t.elapsed()
    ));

    // 3. node-3 is drained, shut down and deleted: it leaves every other node's device, and
    // the agent DaemonSet follows. The change came through the new leader, so the agents
    // reconnected to it through the Service.
    let t = Instant::now();
    cluster.cp.kubectl_ok(&[
        "drain",
        "node-3",
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--force",
        "--timeout=60s",
    ])?;
    let drained = t.elapsed();
    watcher.poll()?;
    watcher.unwatch("node-3")?;
    cluster.remove_node("node-3")?;
    cluster.cp.kubectl_ok(&["delete", "node", "node-3"])?;
    let deleted = t.elapsed();
    eventually(
        "node-3 gone from the devices",
        Duration::from_secs(60),
        || {
            for node in ["node-1", "node-2", "node-4"] {
                let n = device_peers(&cluster, node)?;
                ensure!(n == 2, "{node} has {n} peers");
            }
            Ok(())
        },
    )?;
    let left_devices = t.elapsed();
    let peers = cluster
        .cp
        .kubectl_ok(&["get", "wireguardpeers", "-o", "name"])?;
    ensure!(!peers.contains("node-3"), "node-3's peer is left: {peers}");
    log(format!(
        "cni: node-3 drained in {drained:.1?}, shut down and deleted at {deleted:.1?}, out of every device at {left_devices:.1?}",
    ));
    let node3_deleted = Instant::now();

    // 4. A laptop on Debian's wireguard-go, configured from `kubectl wgmesh peer add`,
    // reaches the pods through node-1, the only gateway.
    let t = Instant::now();
    cluster
        .cp
        .kubectl_ok(&["label", "node", "node-1", "wgmesh.io/gateway=true"])?;
    helm(
        &cluster,
        &[
            "upgrade",
            "wgmesh",
            &repo_root().join("deploy/helm/wgmesh").display().to_string(),
            "--namespace",
            NAMESPACE,
            "--reset-then-reuse-values",
            "--set-string",
            r"mesh.spec.gatewaySelector.matchLabels.wgmesh\.io/gateway=true",
        ],
    )?;
    eventually(
        "node-1 is the only gateway",
        Duration::from_secs(30),
        || {
            let g = cluster.cp.kubectl_ok(&[
                "get",
                "wireguardmesh",
                "default",
                "-o",
                "jsonpath={.status.gateways}",
            ])?;
            ensure!(g.trim() == r#"["node-1"]"#, "gateways {g}");
            Ok(())
        },
    )?;
    let (laptop, _laptop_link) = cluster.outside_host("l", 50)?;
    let config = kubectl_with_plugin(
        &cluster,
        &["wgmesh", "peer", "add", "laptop", "--keepalive", "5"],
    )?;
    ensure!(
        config.matches("[Peer]").count() == 1,
        "one gateway, one peer:\n{config}"
    );
    let iface = format!("wgl{}", cluster.id);
    let _wireguard_go = wireguard_go_from_config(&laptop, &iface, &config, cluster.dir())?;
    let laptop_ip = quick_parts(&config).addresses[0]
        .split('/')
        .next()
        .context("the laptop's address")?
        .to_owned();
    eventually(
        "the laptop reaches every pod",
        Duration::from_secs(30),
        || {
            for p in &web_pods(&cluster)? {
                let body = http_get(&laptop, format!("{}:8080", p.ip).parse()?)?;
                ensure!(body.trim() == p.name, "{} answered {body:?}", p.name);
            }
            Ok(())
        },
    )?;
    let status = eventually(
        "`kubectl wgmesh status` shows the laptop's handshake",
        Duration::from_secs(60),
        || {
            let out = kubectl_with_plugin(&cluster, &["wgmesh", "status", "-o", "json"])?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            let row = v["peers"]
                .as_array()
                .and_then(|p| p.iter().find(|r| r["name"] == "laptop"))
                .with_context(|| format!("no laptop row: {out}"))?;
            ensure!(row["ready"] == true, "not ready: {row}");
            ensure!(
                row["handshakes"].get("node-1").is_some(),
                "no handshake from node-1: {row}"
            );
            kubectl_with_plugin(&cluster, &["wgmesh", "status"])
        },
    )?;
    log(format!(
        "cni: the laptop ({laptop_ip}) reached every pod through node-1 in {:.1?}; status:\n{}",
        t.elapsed(),
        status.trim_end()
    ));

    // The agent DaemonSet follows once Kubernetes removed node-3's orphaned agent pod (the
    // pod garbage collector waits 40 s for a deleted node's pods).
    eventually("the DaemonSet follows", Duration::from_secs(90), || {
        let desired = cluster.cp.kubectl_ok(&[
            "-n",
            NAMESPACE,
            "get",
            "daemonset",
            "wgmesh-agent",
            "-o",
            "jsonpath={.status.desiredNumberScheduled}",
        ])?;
        ensure!(
            desired.trim() == "3",
            "the DaemonSet wants {desired} agents"
        );
        Ok(())
    })?;
    log(format!(
        "cni: the agent DaemonSet covers 3 nodes {:.1?} after node-3's deletion",
        node3_deleted.elapsed()
    ));

    // 5. An upgrade in the rolling order: the controllers first (the agents' DaemonSet set
    // to OnDelete), and the mesh keeps working with controllers newer than the agents; then
    // the agents, node by node, under the streams.
    let next = WGMESH_IMAGE.replace(":dev", ":next");
    for node in &cluster.nodes {
        node.tag_image(WGMESH_IMAGE, &next)?;
    }
    let chart = repo_root().join("deploy/helm/wgmesh").display().to_string();
    let upgrade = |sets: &[&str]| -> Result<String> {
        let mut args = vec!["upgrade", "wgmesh", &chart, "--namespace", NAMESPACE];
        args.push("--reset-then-reuse-values");
        for s in sets {
            args.extend(["--set", s]);
        }
        helm(&cluster, &args)
    };
    let t = Instant::now();
    upgrade(&["image.tag=next", "agent.updateStrategy.type=OnDelete"])?;
    cluster.cp.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "rollout",
        "status",
        "deployment/wgmesh-controller",
        "--timeout=120s",
    ])?;
    let controllers = eventually(
        "the controllers on the new image",
        Duration::from_secs(60),
        || {
            let c = chart_pods(&cluster, CONTROLLER_PODS)?;
            ensure!(
                c.iter()
                    .all(|p| p.image == next && p.ready && !p.terminating),
                "{c:?}"
            );
            Ok(c)
        },
    )?;
    let agents = chart_pods(&cluster, AGENT_PODS)?;
    ensure!(
        agents.iter().all(|p| p.image == WGMESH_IMAGE),
        "an agent was replaced with OnDelete: {agents:?}"
    );
    // A change the new controllers make, which the old agents apply: a second external peer
    // on the gateway.
    kubectl_with_plugin(&cluster, &["wgmesh", "peer", "add", "phone"])?;
    eventually("node-1 programs the phone", Duration::from_secs(30), || {
        let n = device_peers(&cluster, "node-1")?;
        ensure!(n == 4, "node-1 has {n} peers");
        Ok(())
    })?;
    web_matrix(&cluster, &web_pods(&cluster)?)?;
    log(format!(
        "cni: controllers on {next} ({}) with every agent on {WGMESH_IMAGE}: a new peer programmed, pods reach each other, {:.1?} after the upgrade began",
        controllers.len(),
        t.elapsed()
    ));

    let nodes: Vec<String> = cluster.nodes.iter().map(|n| n.name.clone()).collect();
    let mut rollout = Rollout::new(&next, nodes);
    let upgrade_began = stream12.now_ms();
    let t = Instant::now();
    upgrade(&["agent.updateStrategy.type=RollingUpdate"])?;
    loop {
        let agents = chart_pods(&cluster, AGENT_PODS)?;
        let controllers = chart_pods(&cluster, CONTROLLER_PODS)?;
        rollout.observe(stream12.now_ms(), &agents);
        if rollout.done(&agents, &controllers) {
            break;
        }
        if t.elapsed() > Duration::from_secs(240) {
            bail!(
                "the agents' rollout did not finish: {rollout:?}\n{}",
                diagnose(&mut cluster)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let upgraded = stream12.now_ms();
    // Settle: a node's last packets after its new agent is Ready count too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    log(format!(
        "cni: the agents rolled to {next} in {:.1?}",
        t.elapsed()
    ));
    // Each node's window: from its old agent's end to its new one's start plus 3 s (the
    // handshakes), cut short where the next node's begins.
    let mut rolls: Vec<(&String, u64, u64)> = rollout
        .nodes
        .iter()
        .map(|(n, r)| (n, r.down_ms.unwrap_or(0), r.up_ms.unwrap_or(upgraded)))
        .collect();
    rolls.sort_by_key(|r| r.1);
    for (k, (node, down, up)) in rolls.iter().enumerate() {
        let next_down = rolls.get(k + 1).map_or(u64::MAX, |r| r.1);
        let (from, to) = (*down, (up + 3000).min(next_down));
        let w12 = stream12.window(from, to);
        let w41 = stream41.window(from.saturating_sub(offset41), to.saturating_sub(offset41));
        log(format!(
            "cni: {node}'s agent replaced in {} ms; longest stall of the stream node-1 -> node-2 {} ms ({} of {} pings lost), node-4 -> node-1 {} ms ({} of {} lost)",
            up.saturating_sub(*down),
            w12.longest_stall_ms,
            w12.pings_lost,
            w12.pings_sent,
            w41.longest_stall_ms,
            w41.pings_lost,
            w41.pings_sent
        ));
    }
    let whole12 = stream12.window(upgrade_began, stream12.now_ms());
    let whole41 = stream41.window(upgrade_began - offset41, stream41.now_ms());
    ensure!(
        whole12.breaks.is_empty() && whole41.breaks.is_empty(),
        "a stream broke during the upgrade: {whole12:?} {whole41:?}"
    );
    // The userspace device lives in the agent's process: while the DaemonSet replaces an
    // agent, its node's tunnels stop (encrypted or dropped, never plaintext) and TCP retries.
    // The bound is well inside TCP's patience; the figures above are what it cost.
    ensure!(
        whole12.longest_stall_ms < 15_000 && whole41.longest_stall_ms < 15_000,
        "a stream stalled for over 15 s during the upgrade: {whole12:?} {whole41:?}"
    );
    eventually(
        "the laptop still reaches the pods",
        Duration::from_secs(30),
        || {
            for p in &web_pods(&cluster)? {
                http_get(&laptop, format!("{}:8080", p.ip).parse()?)?;
            }
            Ok(())
        },
    )?;
    web_matrix(&cluster, &web_pods(&cluster)?)?;
    assert_no_plaintext_since(&mut watcher, 0, "during the whole story")?;
    log("cni: nothing crossed any underlay in plaintext from install to upgrade");

    drop((stream12, stream41));
    drop((ns1, ns2, ns4));

    // 6. node-2 reboots, and its agent cannot start for a while (its image is gone from the
    // node and no registry answers). The CNI configuration in /etc/cni/net.d survives the
    // reboot but what it links to in /run does not: containerd has no pod network and the
    // kubelet starts no pod until the agent has programmed the node again, so no pod talks
    // to other nodes over the node's default route meanwhile.
    reboot_with_the_agent_late("cni", &mut cluster, &mut watcher, &next).await?;

    // 7. helm uninstall leaves every node clean, and a reinstall works.
    cluster
        .cp
        .kubectl_ok(&["delete", "daemonset", "web", "--wait=true", "--timeout=60s"])?;
    eventually("the web pods gone", Duration::from_secs(60), || {
        let left = web_pods(&cluster)?;
        ensure!(left.is_empty(), "{left:?}");
        Ok(())
    })?;
    let t = Instant::now();
    let out = helm(&cluster, &["uninstall", "wgmesh", "--namespace", NAMESPACE])
        .with_context(|| diagnose(&mut cluster))?;
    log(format!(
        "cni: `helm uninstall` in {:.1?}: {}",
        t.elapsed(),
        out.trim()
    ));
    wait_clean(&cluster, Duration::from_secs(30))?;
    log(format!(
        "cni: every node clean {:.1?} after the uninstall began",
        t.elapsed()
    ));
    cluster
        .cp
        .kubectl_ok(&["delete", "wireguardpeer", "laptop"])?;
    let t = Instant::now();
    install_as_documented(&mut cluster, |_| {})?;
    let pods = deploy_web(&mut cluster)?;
    eventually(
        "pods reach each other again",
        Duration::from_secs(60),
        || web_matrix(&cluster, &pods),
    )?;
    log(format!(
        "cni: reinstalled, pods reach each other, in {:.1?}; done in {:.1?}",
        t.elapsed(),
        started.elapsed()
    ));
    Ok(())
}

/// A pod on node-2 pings node-1's web pod all along; node-2
/// reboots without its agent's image (`agent_image`), stays NotReady for the network, sends
/// nothing in plaintext, and once the image is back the agent programs the node and the pod
/// runs again, its pings crossing the tunnel.
async fn reboot_with_the_agent_late(
    mode: &str,
    cluster: &mut RealCluster,
    watcher: &mut Watcher,
    agent_image: &str,
) -> Result<()> {
    let target = web_pods(cluster)?
        .into_iter()
        .find(|p| p.node == "node-1")
        .context("no web pod on node-1")?;
    let talker = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "talker", "namespace": "default"},
        "spec": {
            "nodeName": "node-2",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["ping", "-i", "0.2", &target.ip],
            }],
        },
    });
    let manifest = cluster.dir().join("talker.json");
    std::fs::write(&manifest, talker.to_string())?;
    cluster
        .cp
        .kubectl_ok(&["apply", "-f", &manifest.display().to_string()])?;
    let talks = |cluster: &RealCluster| -> Result<()> {
        // Lines of the last 3 s only: the container from before the reboot logged too.
        let log = cluster
            .cp
            .kubectl_ok(&["logs", "talker", "--since=3s", "--tail=5"])?;
        ensure!(log.contains("bytes from"), "no answer: {log}");
        Ok(())
    };
    eventually("talker pings node-1's pod", Duration::from_secs(60), || {
        talks(cluster)
    })?;
    let before: u64 = watcher.poll()?.iter().map(|c| c.plaintext).sum();

    // The image stays on the node under another name (its content with it), to come back.
    const SPARE: &str = "wgmesh.test/agent-spare:1";
    let node2 = cluster.node("node-2")?;
    node2.tag_image(agent_image, SPARE)?;
    node2.remove_image(agent_image)?;
    watcher.unwatch("node-2")?;
    let t = Instant::now();
    cluster.reboot_node("node-2", &mut |link| watcher.watch("node-2", link))?;
    log(format!(
        "{mode}: node-2 rebooted (its kubelet started {:.1?} after it went down), without its agent's image",
        t.elapsed()
    ));
    // The agent stays away 25 s: long enough for the kubelet to have started every pod it
    // could, and to have reported why it could not.
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_no_plaintext_since(
        watcher,
        before,
        "while node-2's agent was away after its reboot",
    )?;
    let not_ready = cluster.cp.kubectl_ok(&[
        "get",
        "node",
        "node-2",
        "-o",
        r#"jsonpath={.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].message}"#,
    ])?;
    ensure!(
        not_ready.starts_with("False") && not_ready.contains("network"),
        "node-2 should have no pod network without its agent: Ready {not_ready}"
    );
    log(format!(
        "{mode}: node-2 without its agent {:.1?} after the reboot, nothing in plaintext; Ready: {}",
        t.elapsed(),
        not_ready.trim()
    ));

    cluster.node("node-2")?.tag_image(SPARE, agent_image)?;
    let back = Instant::now();
    eventually(
        "talker on node-2 pings node-1's pod again",
        Duration::from_secs(240),
        || talks(cluster),
    )
    .with_context(|| diagnose(cluster))?;
    assert_no_plaintext_since(watcher, before, "while node-2 came back from its reboot")?;
    log(format!(
        "{mode}: node-2's agent image back: the talker pod pings across the tunnel {:.1?} later, nothing in plaintext",
        back.elapsed()
    ));
    cluster
        .cp
        .kubectl_ok(&["delete", "pod", "talker", "--wait=true", "--timeout=60s"])?;
    Ok(())
}

/// The names of the chart's pods with `selector` that are not terminating.
fn pods_named(cluster: &RealCluster, selector: &str) -> Result<Vec<String>> {
    Ok(chart_pods(cluster, selector)?
        .into_iter()
        .filter(|p| !p.terminating)
        .map(|p| p.name)
        .collect())
}
