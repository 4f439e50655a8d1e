//! `cargo xtask bench control-plane`: N Node objects and N simulated agents (real gRPC clients
//! in this process) against a release build of the controller and the real local control
//! plane; then nodes join one at a time and we measure until every agent has the new peer.

use super::procfs;
use super::stats::{median, percentile};
use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt, stream};
use prost::Message;
use tokio::sync::mpsc;
use tonic::Request;
use tonic::transport::Channel;
use wgmesh_e2e::ControlPlane;
use wgmesh_e2e::agent_sim::channel;
use wgmesh_e2e::cluster;
use wgmesh_e2e::controller::{Controller, ControllerTls, http_get};
use wgmesh_e2e::install::install_default_mesh;
use wgmesh_proto as pb;
use wgmesh_proto::mesh_service_client::MeshServiceClient;

use crate::setup::{repo_root, run_ok, step};

#[derive(clap::Args)]
pub struct Args {
    /// Nodes (and simulated agents) in the mesh before the joins.
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Nodes that join one at a time while we measure.
    #[arg(long, default_value_t = 20)]
    joins: usize,
    /// Seconds of a quiet mesh during which status writes are counted.
    #[arg(long, default_value_t = 60)]
    quiet_seconds: u64,
    /// Approximate weight of each Node object in KB, as real ones weigh (labels, annotations,
    /// conditions, the kubelet's list of images, managed fields): 10-50 KB. 0: bare Nodes.
    #[arg(long, default_value_t = 20)]
    node_kb: usize,
    /// Build the controller with dhat (feature `dhat-heap`) and print where its heap was at
    /// its peak, for the first process and the restarted one. Allocation gets slower, so
    /// latencies are not comparable with a run without it.
    #[arg(long)]
    heap_profile: bool,
    /// Agents ask for whole messages, as agents before parts did (every snapshot one
    /// message), to compare the controller's memory with and without parts.
    #[arg(long)]
    whole_messages: bool,
    /// Seconds between two status updates of one Node, as its kubelet posts them (new
    /// heartbeat times; kubelets post every 5 minutes when nothing changed) from the joins to
    /// the end: at 5,000 nodes, 17 Node events a second that change nothing the controller
    /// reads. 0: Nodes never change.
    #[arg(long, default_value_t = 300)]
    kubelet_status_seconds: u64,
    /// No real agent: only simulated ones. By default (as root) one real agent (the release
    /// `wgmesh-agent`, userspace device, in a network namespace) is one more node, to measure
    /// programming every other node into a device and the agent's memory at that size.
    #[arg(long)]
    no_real_agent: bool,
    /// Agents report every node peer one by one, as agents did before they counted live
    /// sessions instead (above 64 node peers), and the controller keeps them all
    /// (`--node-peer-detail-limit`), to compare the memory with and without.
    #[arg(long)]
    detailed_reports: bool,
}

/// Agents per gRPC connection: the controller serves 64 streams at once per connection, and
/// each agent holds one open (its peer stream) besides its short calls. Real agents have a
/// connection each.
const AGENTS_PER_CHANNEL: usize = 50;
const CONCURRENCY: usize = 32;
/// No status write for this long: the last change is written.
const SETTLED_AFTER: Duration = Duration::from_secs(5);

/// One message an agent received.
struct Received {
    agent: usize,
    bytes: usize,
    /// Whether the agent has the peer of the node that is joining now ([`Joining`]).
    has_joining: bool,
    /// The agent's peer count after applying it.
    total: usize,
    /// Whether it was a snapshot (the first message of a stream).
    snapshot: bool,
}

fn node_name(i: usize) -> String {
    format!("bench-node-{i:05}")
}

/// A made-up node address (never contacted: only agents' registrations carry it).
fn node_ip(i: usize) -> String {
    format!("172.16.{}.{}", i / 250, i % 250 + 1)
}

/// The index of the node joining now (`usize::MAX`: none), whose peer agents look for.
type Joining = Arc<AtomicUsize>;

/// A peer's public key as the simulated agents keep it (no allocation per peer).
type Key = [u8; 32];

fn wire_key(bytes: &[u8]) -> Key {
    bytes.try_into().unwrap_or([0; 32])
}

fn key_of(i: usize) -> Key {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    k
}

pub async fn run(args: Args) -> Result<()> {
    step("building the controller (release)");
    let mut build = Command::new(env!("CARGO"));
    build.current_dir(repo_root()).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "wgmesh-controller",
        "-p",
        "wgmesh-node-agent",
    ]);
    if args.heap_profile {
        build.args(["--features", "dhat-heap"]);
    }
    run_ok(&mut build)?;
    let binary: PathBuf = repo_root().join("target/release/wgmesh-controller");
    let heap_dir = repo_root().join("target/bench/heap");
    if args.heap_profile {
        let _ = std::fs::remove_dir_all(&heap_dir);
        std::fs::create_dir_all(&heap_dir)?;
    }
    let heap_env = heap_dir.display().to_string();
    // WGMESH_BENCH_CONTROLLER_LOG (e.g. `warn,wgmesh_controller=debug`) for a timeline.
    let log_filter = std::env::var("WGMESH_BENCH_CONTROLLER_LOG").unwrap_or_else(|_| "warn".into());
    let mut controller_env = vec![("WGMESH_LOG", log_filter.as_str())];
    if args.detailed_reports {
        controller_env.push(("WGMESH_NODE_PEER_DETAIL_LIMIT", "1000000"));
    }
    if args.heap_profile {
        controller_env.push(("WGMESH_DHAT_DIR", heap_env.as_str()));
    }

    let real_agent = !args.no_real_agent && procfs::is_root();
    if !args.no_real_agent && !real_agent {
        eprintln!("    not root: no real agent (only simulated ones)");
    }
    let agent_network = if real_agent {
        // The controller listens on every address so the agent's namespace reaches it.
        controller_env.push(("WGMESH_BIND_ALL", "1"));
        Some(super::real_agent::AgentNetwork::create()?)
    } else {
        None
    };

    step("starting the local control plane");
    let cp = ControlPlane::start().await?;
    install_default_mesh(&cp)?;
    let client = cp.client().await?;
    let tls = ControllerTls::issue(&cp)?;
    let controller = Controller::start_binary(&cp, &tls, "bench", &controller_env, &binary).await?;
    let total = args.nodes + args.joins;
    let node_kb = args.node_kb;
    // The real agent's Node comes after the joining ones.
    let real_node = node_name(total);
    if let Some(net) = &agent_network {
        let cidr = format!("10.{}.{}.0/24", 100 + total / 256, total % 256);
        cluster::create_node(&client, &real_node, &[&cidr], &net.node_ip, &[]).await?;
        if node_kb > 0 {
            weigh_down(&client, &real_node, &net.node_ip, node_kb).await?;
        }
    }

    step(&format!("creating {total} Nodes, agent pods and tokens"));
    cluster::ensure_agent_identity(&client).await?;
    let tokens: Vec<String> = stream::iter(0..total)
        .map(|i| {
            let client = client.clone();
            async move {
                let name = node_name(i);
                let cidr = format!("10.{}.{}.0/24", 100 + i / 256, i % 256);
                let ip = node_ip(i);
                cluster::create_node(&client, &name, &[&cidr], &ip, &[]).await?;
                if node_kb > 0 {
                    weigh_down(&client, &name, &ip, node_kb).await?;
                }
                cluster::agent_token(&client, &name).await
            }
        })
        .buffered(CONCURRENCY)
        .try_collect()
        .await?;
    let node_bytes = {
        let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client.clone());
        serde_json::to_vec(&api.get(&node_name(0)).await?)?.len()
    };
    eprintln!(
        "    each Node weighs {:.1} KB as the API server returns it",
        node_bytes as f64 / 1024.0
    );

    let mut channels = Vec::new();
    for _ in 0..total.div_ceil(AGENTS_PER_CHANNEL) {
        channels.push(channel(&controller.grpc_url(), &tls.ca_pem).await?);
    }
    let channel_of = |i: usize| channels[i / AGENTS_PER_CHANNEL].clone();

    step(&format!("registering {} agents", args.nodes));
    let started = Instant::now();
    stream::iter(0..args.nodes)
        .map(|i| register(channel_of(i), i, tokens[i].clone()))
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    eprintln!("    registered in {:.1?}", started.elapsed());

    step("opening every agent's peer stream and waiting for full snapshots");
    let opening = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel::<Received>();
    let joining: Joining = Arc::new(AtomicUsize::new(usize::MAX));
    for (i, token) in tokens.iter().enumerate().take(args.nodes) {
        let parts = !args.whole_messages;
        let stream = watch(channel_of(i), i, token.clone(), parts).await?;
        tokio::spawn(follow(
            Agent {
                index: i,
                channel: channel_of(i),
                token: token.clone(),
                accepts_parts: parts,
                detailed_reports: args.detailed_reports,
            },
            stream,
            tx.clone(),
            joining.clone(),
        ));
    }
    let started = Instant::now();
    let mut complete: HashSet<usize> = HashSet::new();
    let mut counts = vec![0usize; args.nodes];
    while complete.len() < args.nodes {
        let r = tokio::time::timeout(Duration::from_secs(300), rx.recv())
            .await
            .context("agents did not converge in 300 s")?
            .context("streams ended")?;
        counts[r.agent] = r.total;
        if counts[r.agent] >= args.nodes - 1 {
            complete.insert(r.agent);
        }
    }
    eprintln!(
        "    {} agents have all {} peers {:.1?} after the last stream opened, {:.1?} after the first",
        args.nodes,
        args.nodes - 1,
        started.elapsed(),
        opening.elapsed()
    );
    // Joins are measured in a settled mesh: once the agents' first reports are written.
    let settled = writes_settle(&controller).await?;
    eprintln!("    status writes settled {settled:.1} s later");

    let mut agent = None;
    let mut agent_report = serde_json::Value::Null;
    if let Some(net) = agent_network {
        step(&format!(
            "a real agent joins as node {}: programming {} peers",
            args.nodes + 1,
            args.nodes
        ));
        let token = cluster::agent_token(&client, &real_node).await?;
        let url = format!("https://{}:{}", net.host_ip, controller.grpc_port);
        let binary = repo_root().join("target/release/wgmesh-agent");
        let mut started = super::real_agent::RealAgent::start(
            &binary,
            net,
            &real_node,
            &url,
            &tls.ca_pem,
            &token,
        )?;
        let took = started
            .wait_for_peers(args.nodes as u64, Duration::from_secs(300))
            .await?;
        let figures = started.figures()?;
        eprintln!(
            "    it had all {} peers {:.1} s after it started; RSS {:.1} MiB (peak {:.1} MiB), {:.1} CPU s, /metrics {:.0} KB",
            figures.peers,
            took.as_secs_f64(),
            figures.rss_bytes as f64 / 1048576.0,
            figures.peak_rss_bytes as f64 / 1048576.0,
            figures.cpu_seconds,
            figures.metrics_bytes as f64 / 1024.0
        );
        agent_report = serde_json::json!({
            "peers": figures.peers,
            "programmed_seconds": took.as_secs_f64(),
            "rss_bytes": figures.rss_bytes,
            "peak_rss_bytes": figures.peak_rss_bytes,
            "cpu_seconds": figures.cpu_seconds,
            "metrics_bytes": figures.metrics_bytes,
        });
        agent = Some(started);
        // The simulated agents took the new node: what it caused is written before the joins.
        let settled = writes_settle(&controller).await?;
        eprintln!("    status writes settled {settled:.1} s later");
    }
    while rx.try_recv().is_ok() {}

    let kubelets = (args.kubelet_status_seconds > 0).then(|| {
        KubeletStatus::start(
            client.clone(),
            args.nodes,
            Duration::from_secs(args.kubelet_status_seconds),
        )
    });
    if kubelets.is_some() {
        eprintln!(
            "    kubelets post each Node's status every {} s from now on: {:.1} Node updates a second",
            args.kubelet_status_seconds,
            args.nodes as f64 / args.kubelet_status_seconds as f64
        );
    }

    step(&format!("{} nodes join one at a time", args.joins));
    let mut latencies = Vec::new();
    let mut bytes_per_agent = Vec::new();
    for j in 0..args.joins {
        let i = args.nodes + j;
        joining.store(i, Ordering::Relaxed);
        let t0 = Instant::now();
        register(channel_of(i), i, tokens[i].clone()).await?;
        let mut seen: HashSet<usize> = HashSet::new();
        let mut bytes = 0usize;
        while seen.len() < args.nodes {
            let r = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .with_context(|| {
                    format!(
                        "join {j}: only {} of {} agents got the peer",
                        seen.len(),
                        args.nodes
                    )
                })?
                .context("streams ended")?;
            bytes += r.bytes;
            if r.has_joining {
                seen.insert(r.agent);
            }
        }
        let latency = seen_latency(t0, Instant::now());
        latencies.push(latency);
        bytes_per_agent.push(bytes as f64 / args.nodes as f64);
        // Drain what belongs to this change (status-driven updates would count otherwise).
        tokio::time::sleep(Duration::from_millis(300)).await;
        while let Ok(r) = rx.try_recv() {
            bytes_per_agent[j] += r.bytes as f64 / args.nodes as f64;
        }
        eprintln!(
            "    join {j}: {:.0} ms, {:.0} bytes per agent",
            latency, bytes_per_agent[j]
        );
    }

    step(&format!(
        "a quiet mesh for {} s: counting status writes",
        args.quiet_seconds
    ));
    let settled_secs = writes_settle(&controller).await?;
    eprintln!("    status writes settled {settled_secs:.1} s after the last join");
    let before = status_writes(&controller).await?;
    tokio::time::sleep(Duration::from_secs(args.quiet_seconds)).await;
    let after = status_writes(&controller).await?;
    let quiet_per_minute = (after - before) * 60.0 / args.quiet_seconds as f64;
    let peak_rss = peak_rss_bytes(controller.pid().context("controller pid")?)?;

    step(&format!(
        "the controller restarts: until all {} agents have their first snapshot again",
        args.nodes
    ));
    while rx.try_recv().is_ok() {}
    let mut controller = controller;
    let want = total - 1;
    let t0 = Instant::now();
    let bench_cpu_before = own_cpu_seconds()?;
    let machine_cpu_before = machine_cpu_seconds()?;
    let store_cpu_before = cpu_seconds_of_named(API_SERVER_AND_STORE)?;
    if args.heap_profile {
        // A clean exit writes the first process's profile (restart would SIGKILL it).
        controller.stop();
    }
    controller.restart().await?;
    let mut again: HashSet<usize> = HashSet::new();
    while again.len() < args.nodes {
        let r = tokio::time::timeout(Duration::from_secs(300), rx.recv())
            .await
            .with_context(|| {
                format!(
                    "after the restart only {} of {} agents had a full snapshot in 300 s",
                    again.len(),
                    args.nodes
                )
            })?
            .context("streams ended")?;
        if r.snapshot && r.total >= want {
            again.insert(r.agent);
        }
    }
    let restart_secs = t0.elapsed().as_secs_f64();
    let restart_writes = status_writes(&controller).await?;
    let restarted = controller.pid().context("controller pid")?;
    let restart_rss = peak_rss_bytes(restarted)?;
    // Where the restart's CPU went: the new controller process (all of its life so far), the
    // simulated agents (this process) and everything else (the API server and etcd serving
    // the lists, the kernel).
    let restart_cpu = RestartCpu {
        controller: procfs::cpu_seconds(&[restarted], procfs::clock_ticks())?,
        agents: own_cpu_seconds()? - bench_cpu_before,
        api_server: cpu_seconds_of_named(API_SERVER_AND_STORE)? - store_cpu_before,
        machine: machine_cpu_seconds()? - machine_cpu_before,
    };
    eprintln!(
        "    every agent had its snapshot {restart_secs:.1} s after the restart began; peak RSS {:.1} MiB",
        restart_rss as f64 / 1048576.0
    );
    eprintln!("    the restarted controller wrote {restart_writes} statuses meanwhile");
    eprintln!(
        "    CPU during the restart: controller {:.1} s, simulated agents {:.1} s, API server and etcd {:.1} s, the rest {:.1} s",
        restart_cpu.controller,
        restart_cpu.agents,
        restart_cpu.api_server,
        restart_cpu.rest()
    );

    let kubelet_updates = kubelets.map_or(0, |k| k.stop());
    eprintln!("    kubelets posted {kubelet_updates} Node status updates in all");

    let p50 = percentile(&latencies, 50.0);
    let p99 = percentile(&latencies, 99.0);
    let bytes = median(&bytes_per_agent);
    println!();
    println!(
        "control-plane benchmark ({} nodes of {:.1} KB, {} joins)",
        args.nodes,
        node_bytes as f64 / 1024.0,
        args.joins
    );
    println!("| metric | value | target |");
    println!("|---|---|---|");
    println!("| join p50 | {p50:.0} ms | |");
    println!("| join p99 | {p99:.0} ms | <= 1000 ms |");
    println!("| bytes per agent per change (median) | {bytes:.0} B | <= 1024 B |");
    println!(
        "| controller peak RSS | {:.1} MiB | <= 512 MiB at 5,000 nodes |",
        peak_rss as f64 / 1048576.0
    );
    println!("| status writes settled after the last join | {settled_secs:.1} s | |");
    println!("| status writes per minute, quiet | {quiet_per_minute:.1} | 0 |");
    println!("| controller restart to every agent's snapshot | {restart_secs:.1} s | <= 60 s |");
    println!(
        "| controller peak RSS after the restart | {:.1} MiB | <= 512 MiB at 5,000 nodes |",
        restart_rss as f64 / 1048576.0
    );
    if let Some(a) = agent_report.as_object() {
        println!(
            "| real agent: all {} peers programmed after its start | {:.1} s | |",
            a["peers"],
            a["programmed_seconds"].as_f64().unwrap_or_default()
        );
        println!(
            "| real agent: RSS / peak RSS | {:.1} / {:.1} MiB | |",
            a["rss_bytes"].as_f64().unwrap_or_default() / 1048576.0,
            a["peak_rss_bytes"].as_f64().unwrap_or_default() / 1048576.0
        );
    }
    println!(
        "| CPU during the restart: controller / simulated agents / API server and etcd / rest | {:.1} / {:.1} / {:.1} / {:.1} s | |",
        restart_cpu.controller,
        restart_cpu.agents,
        restart_cpu.api_server,
        restart_cpu.rest()
    );

    let report = serde_json::json!({
        "nodes": args.nodes,
        "node_bytes": node_bytes,
        "joins": args.joins,
        "join_p50_ms": p50,
        "join_p99_ms": p99,
        "join_latencies_ms": latencies,
        "bytes_per_agent_per_change": bytes,
        "controller_peak_rss_bytes": peak_rss,
        "quiet_writes_per_minute": quiet_per_minute,
        "quiet_seconds": args.quiet_seconds,
        "kubelet_status_seconds": args.kubelet_status_seconds,
        "kubelet_status_updates": kubelet_updates,
        "writes_settled_after_last_join_seconds": settled_secs,
        "restart_to_snapshots_seconds": restart_secs,
        "controller_peak_rss_after_restart_bytes": restart_rss,
        "status_writes_during_restart": restart_writes,
        "real_agent": agent_report,
        "restart_cpu_seconds": {
            "controller": restart_cpu.controller,
            "simulated_agents": restart_cpu.agents,
            "api_server_and_etcd": restart_cpu.api_server,
            "machine": restart_cpu.machine,
        },
    });
    let dir = repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("control-plane.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("\nwrote {}", path.display());
    if args.heap_profile {
        controller.stop();
        for profile in heap_profiles(&heap_dir)? {
            println!("\n{}", super::heap::summary(&profile, 12)?);
        }
    }
    drop(agent);
    drop(controller);
    drop(cp);
    Ok(())
}

/// The dhat profiles the controller processes wrote, oldest first.
fn heap_profiles(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    files.sort();
    Ok(files.into_iter().map(|(_, p)| p).collect())
}

/// Kubelets posting their Nodes' status, one Node after the other, each every `every`.
struct KubeletStatus {
    task: tokio::task::JoinHandle<()>,
    posted: Arc<AtomicUsize>,
}

impl KubeletStatus {
    fn start(client: kube::Client, nodes: usize, every: Duration) -> Self {
        let posted = Arc::new(AtomicUsize::new(0));
        let count = posted.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / nodes.max(1) as u32);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            for i in (0..nodes).cycle() {
                tick.tick().await;
                let (client, count) = (client.clone(), count.clone());
                tokio::spawn(async move {
                    if post_node_status(&client, &node_name(i)).await.is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        KubeletStatus { task, posted }
    }

    /// Stops posting; returns how many updates were posted.
    fn stop(self) -> usize {
        self.task.abort();
        self.posted.load(Ordering::Relaxed)
    }
}

/// What a kubelet posts when nothing changed: its Ready condition with a new heartbeat time.
async fn post_node_status(client: &kube::Client, name: &str) -> Result<()> {
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ))?;
    let status = serde_json::json!({"status": {"conditions": [{
        "type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "kubelet is posting ready status",
        "lastHeartbeatTime": now,
        "lastTransitionTime": "2026-12-01T00:00:00Z",
    }]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Strategic(&status))
        .await?;
    Ok(())
}

/// Gives a bench Node what a kubelet and a cloud's node controllers give a real one: labels,
/// annotations, conditions, capacity, node info and about `kb` KB of images (the kubelet
/// reports up to 50, each with its digest and tag), so the controller's memory per node is
/// measured against real objects.
async fn weigh_down(client: &kube::Client, name: &str, ip: &str, kb: usize) -> Result<()> {
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let zone = format!("zone-{}", name.len() % 3);
    let metadata = serde_json::json!({"metadata": {
        "labels": {
            "beta.kubernetes.io/arch": "amd64",
            "beta.kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "node.kubernetes.io/instance-type": "m6i.2xlarge",
            "topology.kubernetes.io/region": "eu-west-1",
            "topology.kubernetes.io/zone": zone,
            "failure-domain.beta.kubernetes.io/region": "eu-west-1",
            "failure-domain.beta.kubernetes.io/zone": zone,
            "node-role.kubernetes.io/worker": "",
            "eks.amazonaws.com/nodegroup": "general-purpose",
            "eks.amazonaws.com/capacityType": "ON_DEMAND",
        },
        "annotations": {
            "node.alpha.kubernetes.io/ttl": "0",
            "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            "csi.volume.kubernetes.io/nodeid": format!("{{\"ebs.csi.aws.com\":\"i-0{name}\"}}"),
            "alpha.kubernetes.io/provided-node-ip": ip,
        },
    }});
    api.patch(
        name,
        &PatchParams::apply("bench-kubelet").force(),
        &Patch::Apply(&{
            let mut m = metadata;
            m["apiVersion"] = "v1".into();
            m["kind"] = "Node".into();
            m["metadata"]["name"] = name.into();
            m
        }),
    )
    .await?;
    // An image entry is about 250 bytes; the kubelet lists at most 50, and the rest of the
    // weight comes from the managed fields the API server keeps for each writer.
    let images: Vec<serde_json::Value> = (0..(kb * 1024 / 500).clamp(1, 50))
        .map(|n| {
            serde_json::json!({
                "names": [
                    format!("registry.example.com/team-{n}/service-{n}@sha256:{:064x}", n * 7919 + name.len()),
                    format!("registry.example.com/team-{n}/service-{n}:v1.{n}.0"),
                ],
                "sizeBytes": 50_000_000 + n * 1_000_003,
            })
        })
        .collect();
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        serde_json::json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": "2026-12-01T00:00:00Z",
            "lastTransitionTime": "2026-12-01T00:00:00Z",
        })
    };
    let status = serde_json::json!({"status": {
        "images": images,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ],
        "capacity": {"cpu": "8", "memory": "32386524Ki", "pods": "110", "ephemeral-storage": "104845292Ki"},
        "allocatable": {"cpu": "7910m", "memory": "31369692Ki", "pods": "110", "ephemeral-storage": "95551679124"},
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "architecture": "amd64", "bootID": format!("{:032x}", name.len() * 31337),
            "containerRuntimeVersion": "containerd://1.7.27", "kernelVersion": "6.12.0-amd64",
            "kubeProxyVersion": "", "kubeletVersion": "v1.34.4", "machineID": format!("{:032x}", name.len()),
            "operatingSystem": "linux", "osImage": "Debian GNU/Linux 13 (trixie)",
            "systemUUID": format!("ec2{:029x}", name.len()),
        },
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

fn seen_latency(t0: Instant, t1: Instant) -> f64 {
    (t1 - t0).as_secs_f64() * 1000.0
}

fn request<T>(body: T, token: &str) -> Request<T> {
    let mut req = Request::new(body);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .expect("a token is valid metadata"),
    );
    req
}

async fn register(channel: Channel, i: usize, token: String) -> Result<()> {
    let mut client = MeshServiceClient::new(channel);
    let req = pb::RegisterRequest {
        node: node_name(i),
        mesh: "default".into(),
        public_key: key_of(i).to_vec(),
        endpoint_addresses: vec![node_ip(i)],
        listen_port: 51820,
        backend: pb::Backend::Userspace as i32,
        agent_version: "bench".into(),
    };
    client.register(request(req, &token)).await?;
    Ok(())
}

async fn watch(
    channel: Channel,
    i: usize,
    token: String,
    accepts_parts: bool,
) -> Result<tonic::Streaming<pb::PeerUpdate>> {
    let mut client = MeshServiceClient::new(channel);
    let req = pb::WatchPeersRequest {
        node: node_name(i),
        mesh: "default".into(),
        accepts_parts,
        ..Default::default()
    };
    Ok(client.watch_peers(request(req, &token)).await?.into_inner())
}

/// One simulated agent.
#[derive(Clone)]
struct Agent {
    index: usize,
    channel: Channel,
    token: String,
    accepts_parts: bool,
    detailed_reports: bool,
}

/// What a real agent reports once it has programmed its first configuration from a
/// controller (and then only when its observations change): a busy mesh, where it holds a
/// live session with every peer. Node peers go one by one only in a small mesh (or with
/// `--detailed-reports`); otherwise as the count of live sessions.
async fn report(agent: Agent, peers: Vec<Key>, epoch: String, revision: u64) -> Result<()> {
    let detail = agent.detailed_reports
        || wgmesh_core::report::node_peers_in_detail(
            peers.len(),
            wgmesh_core::report::NODE_PEER_DETAIL_LIMIT,
        );
    let handshake = std::time::SystemTime::now() - Duration::from_secs((agent.index % 100) as u64);
    let observed = |key: Key| pb::PeerStatus {
        public_key: key.to_vec(),
        last_handshake: Some(handshake.into()),
        rx_bytes: 1_000_000,
        tx_bytes: 2_000_000,
        endpoint: String::new(),
    };
    let live = u32::try_from(peers.len()).unwrap_or(u32::MAX);
    let req = pb::ReportStatusRequest {
        node: node_name(agent.index),
        mesh: "default".into(),
        peers: if detail {
            peers.into_iter().map(observed).collect()
        } else {
            Vec::new()
        },
        programmed_epoch: epoch,
        programmed_revision: revision,
        live_node_sessions: Some(live),
        ..Default::default()
    };
    MeshServiceClient::new(agent.channel)
        .max_encoding_message_size(64 << 20)
        .report_status(request(req, &agent.token))
        .await?;
    Ok(())
}

/// Follows one agent's stream, reporting each message's size, what it upserted and the
/// resulting peer count; when the stream ends (a controller restart) it watches again, as an
/// agent does. Its first full configuration from each controller process is reported back.
async fn follow(
    agent: Agent,
    mut stream: tonic::Streaming<pb::PeerUpdate>,
    tx: mpsc::UnboundedSender<Received>,
    joining: Joining,
) {
    let mut peers: HashSet<Key> = HashSet::new();
    let mut joiner = pb::decode::PartsJoiner::default();
    let mut bytes = 0;
    let mut reported_epoch = String::new();
    loop {
        let Ok(Some(part)) = stream.message().await else {
            // Spread the reconnections a little, as agents' jittered backoff does.
            tokio::time::sleep(Duration::from_millis(250 + (agent.index % 250) as u64)).await;
            if tx.is_closed() {
                return;
            }
            if let Ok(s) = watch(
                agent.channel.clone(),
                agent.index,
                agent.token.clone(),
                agent.accepts_parts,
            )
            .await
            {
                stream = s;
                joiner = pb::decode::PartsJoiner::default();
                bytes = 0;
            }
            continue;
        };
        // Every part counts toward the update's bytes; the update counts once joined.
        bytes += part.encoded_len();
        let update = match joiner.push(part) {
            Ok(Some(update)) => update,
            Ok(None) => continue,
            Err(e) => panic!("agent {}: a broken update in parts: {e}", agent.index),
        };
        let (epoch, revision) = (update.epoch.clone(), update.revision);
        let snapshot = matches!(update.update, Some(pb::peer_update::Update::Snapshot(_)));
        match update.update {
            Some(pb::peer_update::Update::Snapshot(s)) => {
                peers = s.peers.iter().map(|p| wire_key(&p.public_key)).collect();
            }
            Some(pb::peer_update::Update::Delta(d)) => {
                for k in &d.removed {
                    peers.remove(&wire_key(k));
                }
                peers.extend(d.upserted.iter().map(|p| wire_key(&p.public_key)));
            }
            None => {}
        }
        let has_joining = match joining.load(Ordering::Relaxed) {
            usize::MAX => false,
            i => peers.contains(&key_of(i)),
        };
        let total = peers.len();
        if epoch != reported_epoch && !peers.is_empty() {
            reported_epoch = epoch.clone();
            let (agent, peers) = (agent.clone(), peers.iter().copied().collect());
            tokio::spawn(async move {
                let index = agent.index;
                if let Err(e) = report(agent, peers, epoch, revision).await {
                    eprintln!("    agent {index}: report failed: {e:#}");
                }
            });
        }
        if tx
            .send(Received {
                agent: agent.index,
                bytes: std::mem::take(&mut bytes),
                has_joining,
                total,
                snapshot,
            })
            .is_err()
        {
            return;
        }
    }
}

/// Waits until the controller has written no status for [`SETTLED_AFTER`] (at most two
/// minutes): what the last change caused is written (a new node's status, the mesh's counts,
/// the agents' reports). The writer rests between passes, and a pass takes longer in a large
/// mesh. Returns how long the writes went on.
async fn writes_settle(controller: &Controller) -> Result<f64> {
    let settling = Instant::now();
    let mut before = status_writes(controller).await?;
    loop {
        tokio::time::sleep(SETTLED_AFTER).await;
        let now = status_writes(controller).await?;
        if now == before || settling.elapsed() > Duration::from_secs(120) {
            break;
        }
        before = now;
    }
    Ok((settling.elapsed() - SETTLED_AFTER).as_secs_f64())
}

async fn status_writes(controller: &Controller) -> Result<f64> {
    let text = http_get(controller.metrics_port, "/metrics").await?;
    text.lines()
        .find_map(|l| l.strip_prefix("wgmesh_controller_status_writes_total "))
        .context("no status_writes metric")?
        .trim()
        .parse()
        .context("parsing status_writes")
}

/// CPU seconds spent while every agent got its snapshot again after a controller restart.
struct RestartCpu {
    /// The new controller process, all its life.
    controller: f64,
    /// The simulated agents (this process).
    agents: f64,
    /// The API server and etcd (listing everything again, TokenReviews, status writes).
    api_server: f64,
    /// The whole machine.
    machine: f64,
}

impl RestartCpu {
    /// The kernel's own work, anything else running, and time another guest took from the
    /// machine's cores.
    fn rest(&self) -> f64 {
        self.machine - self.controller - self.agents - self.api_server
    }
}

const API_SERVER_AND_STORE: &[&str] = &["kube-apiserver", "etcd"];

/// The CPU seconds of every process whose command name is one of `names`.
fn cpu_seconds_of_named(names: &[&str]) -> Result<f64> {
    let tck = procfs::clock_ticks();
    let mut total = 0.0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let pid = entry.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if names.contains(&comm.trim())
            && let Ok(pid) = pid.parse::<u32>()
        {
            // A process may exit between the two reads.
            total += procfs::cpu_seconds(&[pid], tck).unwrap_or(0.0);
        }
    }
    Ok(total)
}

fn peak_rss_bytes(pid: u32) -> Result<u64> {
    Ok(procfs::status_kb(pid, "VmHWM:")? * 1024)
}

/// CPU seconds of this process (the simulated agents).
fn own_cpu_seconds() -> Result<f64> {
    procfs::cpu_seconds(&[std::process::id()], procfs::clock_ticks())
}

/// CPU seconds every core of the machine spent busy (all but idle and iowait).
fn machine_cpu_seconds() -> Result<f64> {
    let (idle, total) = procfs::cpu_jiffies()?;
    Ok((total - idle) as f64 / procfs::clock_ticks())
}
