//! The kernel backend on a real kernel: tests that run inside a QEMU VM booting Debian's
//! kernel, which has WireGuard (see `wgmesh_e2e::vm`). The build machines' own kernel has none.
//!
//! Each `kernel_vm_*` test here is one of two kinds:
//! - host side (`kernel_vm_device_backend`, `kernel_vm_mesh`, `kernel_vm_mixed_mesh`):
//!   prepares what stays on the host (the control plane and the controller: under emulation
//!   they would be very slow), boots a VM running a test binary, and fails with its output when
//!   that fails. Skipped inside;
//! - inside (`kernel_vm_in_vm_*`): runs only in the VM (`WGMESH_IN_VM=1`), skipped elsewhere.
//!
//! Inside, the lean part (`wgmesh_e2e::vm::guest`): one VM, one network namespace per node
//! (bridged to the VM's root namespace, the underlay router), real `wgmesh-agent` processes,
//! pods as namespaces behind each node, UDP probes, and `wg`, which reads kernel links over
//! generic netlink.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::{Deserialize, Serialize};
use serde_json::json;
use wgmesh_e2e::ControlPlane;
use wgmesh_e2e::binaries::workspace_binary;
use wgmesh_e2e::chaos::watcher::Watcher;
use wgmesh_e2e::cluster;
use wgmesh_e2e::controller::{Controller, ControllerTls};
use wgmesh_e2e::foreign::{quick_parts, wireguard_go_from_config};
use wgmesh_e2e::install::install_default_mesh;
use wgmesh_e2e::netns::{Netns, sh};
use wgmesh_e2e::scratch::ScratchDir;
use wgmesh_e2e::vm::guest::{
    AgentArgs, BRIDGE, Backend, ECHO_PORT, Echoes, INTERFACE, TwoWay, UNDERLAY, VmNode, all_logs,
    gateway, reaches, tcp_proxy, underlay, wait_until,
};
use wgmesh_e2e::vm::{self, HOST_FROM_GUEST, lane};

/// What the host hands an in-VM mesh test (as JSON, in a file the VM reads over 9p).
#[derive(Serialize, Deserialize, Debug)]
struct MeshSetup {
    agent: PathBuf,
    /// The controller's gRPC port on the host's loopback.
    grpc_port: u16,
    ca_file: PathBuf,
    /// One per node, in order: (node name, token file).
    nodes: Vec<(String, PathBuf)>,
    /// For tests that change the cluster from inside the VM.
    api: Option<ApiAccess>,
}

/// The API server, from inside the VM: its port on the host's loopback (the test proxies the
/// VM's own loopback port there, so the kubeconfig works unchanged), an admin kubeconfig, and
/// the CLI.
#[derive(Serialize, Deserialize, Debug)]
struct ApiAccess {
    port: u16,
    kubeconfig: PathBuf,
    cli: PathBuf,
}

const SETUP_ENV: &str = "WGMESH_KVM_SETUP";
/// Nodes the in-VM meshes start with.
const NODES: usize = 3;
/// The mark the mixed mesh puts on its encrypted packets.
const FWMARK: u32 = 0x51820;

fn host_only(test: &str) -> bool {
    if vm::in_vm() {
        eprintln!("{test}: skipped inside the VM (a host-side test)");
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("{test}: skipped: the kernel VM lane needs root (namespaces inside, QEMU)");
        return false;
    }
    true
}

fn vm_only(test: &str) -> bool {
    if !vm::in_vm() {
        eprintln!("{test}: skipped outside the kernel VM (the host-side tests run it there)");
        return false;
    }
    true
}

// ---------------------------------------------------------------------------------------------
// Host side.

/// The device crate's backend test (`crates/device/tests/device_backend.rs`) inside the VM,
/// where it takes the kernel branch: the probe finds the module, `Requested::Kernel` opens a
/// kernel link, `Requested::Auto` chooses it without a fallback line.
#[test]
fn kernel_vm_device_backend() -> Result<()> {
    if !host_only("kernel_vm_device_backend") {
        return Ok(());
    }
    let started = Instant::now();
    let exe = lane::build_test_binary("wgmesh-device", "device_backend")?;
    let out = lane::run_test_binary(
        &exe,
        &["--nocapture", "--test-threads=1"],
        &[],
        Duration::from_secs(600),
    )?;
    let all = format!("{}\n{}", out.stdout, out.stderr);
    if all.contains("kernel WireGuard unavailable") || all.contains("skipping") {
        bail!("device_backend did not take the kernel branch inside the VM:\n{all}");
    }
    let ran = vm::passed_tests(&out.stdout);
    if ran == 0 {
        bail!("no device_backend test ran in the VM:\n{all}");
    }
    lane::report("kernel_vm_device_backend", ran as usize, started);
    Ok(())
}

/// What stays on the host for an in-VM mesh: the control plane, the `default` mesh (patched
/// with `mesh_patch`), the controller, and `NODES` Nodes with their agents' tokens.
struct HostSide {
    cp: ControlPlane,
    controller: Controller,
    _dir: ScratchDir,
    setup_file: PathBuf,
}

impl HostSide {
    async fn start(test: &str, mesh_patch: Option<serde_json::Value>, api: bool) -> Result<Self> {
        let started = Instant::now();
        let cp = ControlPlane::start().await?;
        install_default_mesh(&cp)?;
        let client = cp.client().await?;
        if let Some(patch) = mesh_patch {
            let meshes: Api<wgmesh_api::WireGuardMesh> = Api::all(client.clone());
            meshes
                .patch("default", &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        let tls = ControllerTls::issue(&cp)?;
        let controller = Controller::start(&cp, &tls, "wgmesh-controller-0", &[]).await?;
        let dir = ScratchDir::new("wgmesh-kvm-")?;
        let mut nodes = Vec::new();
        for i in 1..=NODES {
            let name = format!("node-{i}");
            cluster::create_node(
                &client,
                &name,
                &[&format!("10.244.{i}.0/24")],
                &format!("{UNDERLAY}.{i}"),
                &[],
            )
            .await?;
            let token = cluster::agent_token(&client, &name).await?;
            let file = dir.path().join(format!("{name}.token"));
            std::fs::write(&file, token)?;
            nodes.push((name, file));
        }
        let api = if api {
            let port = cp
                .url()
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .context("the API server's port")?;
            Some(ApiAccess {
                port,
                kubeconfig: cp.kubeconfig().to_owned(),
                cli: workspace_binary("wgmesh-cli", "kubectl-wgmesh")?,
            })
        } else {
            None
        };
        let setup = MeshSetup {
            agent: workspace_binary("wgmesh-node-agent", "wgmesh-agent")?,
            grpc_port: controller.grpc_port,
            ca_file: tls.ca.clone(),
            nodes,
            api,
        };
        let setup_file = dir.path().join("setup.json");
        std::fs::write(&setup_file, serde_json::to_string(&setup)?)?;
        eprintln!(
            "[wgmesh] {test}: control plane and controller up on the host in {:.1?}",
            started.elapsed()
        );
        Ok(HostSide {
            cp,
            controller,
            _dir: dir,
            setup_file,
        })
    }

    /// Runs the in-VM test `inside` in a VM; fails with its output (and the controller's log)
    /// unless it passed there.
    async fn run_inside(&self, inside: &'static str, timeout: Duration) -> Result<usize> {
        let exe = std::env::current_exe()?;
        let setup_path = self.setup_file.display().to_string();
        let out = tokio::task::spawn_blocking(move || {
            lane::run_test_binary(
                &exe,
                &[
                    "--exact",
                    inside,
                    "--include-ignored",
                    "--nocapture",
                    "--test-threads=1",
                ],
                &[(SETUP_ENV, &setup_path)],
                timeout,
            )
        })
        .await?
        .map_err(|e| e.context(format!("controller log:\n{}", self.controller.log_tail(30))))?;
        eprintln!("--- in the VM ---\n{}{}", out.stdout, out.stderr);
        if !out.ran.iter().any(|t| t == inside) {
            bail!("{inside} did not run in the VM:\n{}", out.stderr);
        }
        Ok(out.ran.len())
    }
}

/// A three-node mesh on kernel WireGuard: the control plane and the controller on the host,
/// the agents in the VM (see [`kernel_vm_in_vm_mesh`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_vm_mesh() -> Result<()> {
    if !host_only("kernel_vm_mesh") {
        return Ok(());
    }
    let started = Instant::now();
    let host = HostSide::start("kernel_vm_mesh", None, false).await?;
    let ran = host
        .run_inside("kernel_vm_in_vm_mesh", Duration::from_secs(900))
        .await?;
    lane::report("kernel_vm_mesh", ran, started);
    Ok(())
}

/// Kernel nodes with a userspace node, a foreign peer (Debian's wireguard-go) through them,
/// and the cluster changing around them, with the mesh's fwmark set: see
/// [`kernel_vm_in_vm_mixed_mesh`]. The test changes the cluster from inside the VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_vm_mixed_mesh() -> Result<()> {
    if !host_only("kernel_vm_mixed_mesh") {
        return Ok(());
    }
    let started = Instant::now();
    let host = HostSide::start(
        "kernel_vm_mixed_mesh",
        Some(json!({"spec": {"fwmark": {"mark": FWMARK}}})),
        true,
    )
    .await?;
    let ran = host
        .run_inside("kernel_vm_in_vm_mixed_mesh", Duration::from_secs(1200))
        .await?;
    drop(host.cp);
    lane::report("kernel_vm_mixed_mesh", ran, started);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Inside the VM.

fn read_setup() -> Result<MeshSetup> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        std::env::var(SETUP_ENV).context("no mesh setup")?,
    )?)?)
}

/// The underlay and the proxy to the controller on the host; how agents reach it.
fn guest_setup(setup: &MeshSetup) -> Result<AgentArgs> {
    underlay()?;
    let proxy = format!("{}:{}", gateway(), setup.grpc_port);
    tcp_proxy(
        proxy.parse()?,
        format!("{HOST_FROM_GUEST}:{}", setup.grpc_port).parse()?,
    )?;
    Ok(AgentArgs {
        agent: setup.agent.clone(),
        controller: format!("https://{proxy}"),
        ca_file: setup.ca_file.clone(),
    })
}

/// Pod to pod with probes of `size` bytes, every ordered pair of running nodes.
fn every_pair_reaches(nodes: &[VmNode], size: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for a in nodes {
        for b in nodes {
            if a.name == b.name {
                continue;
            }
            reaches(&a.pod.name, b.pod_addr()?, size, deadline, || {
                format!(
                    "pod {} -> pod {}\n{}\n{}",
                    a.name,
                    b.name,
                    a.ns.ip(&["route", "show", "table", "all"])
                        .unwrap_or_default(),
                    all_logs(nodes)
                )
            })?;
        }
    }
    Ok(())
}

/// Inside the VM: three nodes with real agents on kernel WireGuard (the mesh's `backend:
/// auto`, which must choose the kernel here), pod-to-pod traffic both ways, the routes and
/// guard routes, an agent SIGTERM + restart under traffic with the kernel link kept, and
/// `wgmesh-agent cleanup` removing the link and every route it made. Ignored on the host
/// (`kernel_vm_mesh` runs it inside with `--include-ignored`).
#[test]
#[ignore = "runs inside the kernel VM, started by kernel_vm_mesh"]
fn kernel_vm_in_vm_mesh() -> Result<()> {
    if !vm_only("kernel_vm_in_vm_mesh") {
        return Ok(());
    }
    let t0 = Instant::now();
    let lap = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let setup: MeshSetup = serde_json::from_str(&std::fs::read_to_string(
        std::env::var(SETUP_ENV).context("no mesh setup")?,
    )?)?;
    let work = Path::new("/tmp/wgmesh-kvm");
    std::fs::create_dir_all(work)?;
    let args = guest_setup(&setup)?;
    lap("underlay and controller proxy up");

    let mut nodes = Vec::new();
    for (i, (name, token)) in setup.nodes.iter().enumerate() {
        nodes.push(VmNode::wire(
            name,
            i + 1,
            Backend::Auto,
            &args,
            token,
            work,
        )?);
    }
    lap("nodes and pods wired");
    for node in &mut nodes {
        node.start_agent()?;
    }
    lap("agents started");

    // Every node: a kernel link (wireguard kind, no userspace UAPI socket) with both peers.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let counts: Vec<usize> = nodes
            .iter()
            .map(|n| n.peers().map(|p| p.len()).unwrap_or(0))
            .collect();
        if counts.iter().all(|&c| c == NODES - 1) {
            break;
        }
        if Instant::now() > deadline {
            bail!("peer counts {counts:?}\n{}", all_logs(&nodes));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    lap("every kernel device has its peers (wg show, generic netlink)");
    for node in &nodes {
        let link = node.ns.ip(&["-d", "link", "show", "wgmesh0"])?;
        assert!(
            link.contains("wireguard"),
            "{}: wgmesh0 is a kernel WireGuard link: {link}",
            node.name
        );
        assert!(
            !Path::new("/var/run/wireguard/wgmesh0.sock").exists(),
            "no userspace UAPI socket"
        );
        let log = node.log();
        assert!(
            node.kernel_device_ready() == 1 && !log.contains("using the userspace device"),
            "{}: backend auto chose the kernel: {}",
            node.name,
            node.log_tail(30)
        );
    }

    // Pod to pod, every ordered pair.
    let pods: Vec<&str> = nodes.iter().map(|n| n.pod.name.as_str()).collect();
    let echoes = Echoes::start(&pods);
    every_pair_reaches(&nodes, 8, Duration::from_secs(60))?;
    lap("pod to pod, every pair both ways, through kernel WireGuard");
    for node in &nodes {
        let dump = node.peers()?;
        assert!(
            dump.iter().all(|(_, handshake)| *handshake > 0),
            "{}: every peer has a handshake: {dump:?}",
            node.name
        );
    }

    // Routes: each other pod CIDR via wgmesh0, and the fail-closed guards (blackhole, metric
    // 1000000, protocol 87) behind them.
    for (i, node) in nodes.iter().enumerate() {
        let routes = node.ns.ip(&["route", "show", "table", "all"])?;
        for (j, other) in nodes.iter().enumerate() {
            if i == j {
                continue;
            }
            let cidr = format!("10.244.{}.0/24", j + 1);
            assert!(
                routes
                    .lines()
                    .any(|l| l.starts_with(&cidr) && l.contains("dev wgmesh0")),
                "{}: a route to {} ({cidr}) via wgmesh0:\n{routes}",
                node.name,
                other.name
            );
        }
        let guards: Vec<&str> = routes
            .lines()
            .filter(|l| {
                l.starts_with("blackhole") && l.contains("proto 87") && l.contains("metric 1000000")
            })
            .collect();
        assert!(
            !guards.is_empty(),
            "{}: guard routes (blackhole .. proto 87 metric 1000000):\n{routes}",
            node.name
        );
        if i == 0 {
            eprintln!("{}'s routes:\n{routes}", node.name);
        }
    }
    lap("routes and guard routes present");

    // SIGTERM node-1's agent under traffic both ways; the kernel link stays (same ifindex,
    // peers kept), traffic keeps flowing; then the agent starts again.
    let traffic = TwoWay::start(
        &nodes[0].pod.name,
        &nodes[0].pod_ip,
        &nodes[1].pod.name,
        &nodes[1].pod_ip,
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let before = nodes[0].ifindex()?;
    let stopped_at = Instant::now();
    nodes[0]
        .agent
        .as_mut()
        .context("the agent runs")?
        .stop(Duration::from_secs(30));
    let stop_took = stopped_at.elapsed();
    nodes[0].agent = None;
    let after_stop = nodes[0].ifindex()?;
    let peers_while_down = nodes[0].peers()?.len();
    lap(&format!(
        "node-1's agent stopped (SIGTERM) in {stop_took:.1?}; wgmesh0 ifindex {before} -> {after_stop}, {peers_while_down} peers"
    ));
    std::thread::sleep(Duration::from_secs(3));
    nodes[0].start_agent()?;
    // Until it has its device again (the saved configuration programmed) and has registered,
    // then two more seconds of traffic.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(nodes[0].kernel_device_ready() == 2
        && nodes[0].log().matches(" registered ").count() >= 2)
    {
        if Instant::now() > deadline {
            bail!(
                "node-1's agent did not come back:\n{}",
                nodes[0].log_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    lap("node-1's agent is back (device ready, registered)");
    std::thread::sleep(Duration::from_secs(2));
    eprintln!(
        "node-1's agent after its restart:\n{}",
        nodes[0].log_tail(15)
    );
    let after_restart = nodes[0].ifindex()?;
    let peers_after = nodes[0].peers()?.len();
    let (there, back) = traffic.finish()?;
    lap(&format!(
        "node-1's agent restarted; ifindex {after_restart}, {peers_after} peers; probes pod1->pod2 {there:?}, pod2->pod1 {back:?}"
    ));
    echoes.stop()?;
    println!(
        "kernel_vm_in_vm_mesh: lost probes during the agent restart: pod1->pod2 {} of {}, pod2->pod1 {} of {}",
        there.lost(),
        there.sent,
        back.lost(),
        back.sent
    );
    assert_eq!(
        before, after_stop,
        "the kernel link stays when the agent stops"
    );
    assert_eq!(
        before, after_restart,
        "the restarted agent keeps the same link"
    );
    assert_eq!(
        peers_while_down,
        NODES - 1,
        "peers stay while the agent is down"
    );
    assert_eq!(peers_after, NODES - 1);
    assert!(
        nodes[0].agent.as_mut().is_some_and(|a| a.is_running()),
        "the restarted agent runs:\n{}",
        nodes[0].log_tail(30)
    );
    assert_eq!(
        (there.lost(), back.lost()),
        (0, 0),
        "no probe lost across the agent's restart\n{}",
        all_logs(&nodes)
    );

    // Agents first, then `wgmesh-agent cleanup` on node-1: the kernel link and every route
    // the agent made (protocol 87, guards included) go; the key stays.
    for node in &mut nodes {
        if let Some(mut a) = node.agent.take() {
            a.stop(Duration::from_secs(10));
        }
    }
    let state = work.join(&nodes[0].name);
    sh(
        "ip",
        &[
            "netns",
            "exec",
            &nodes[0].ns.name,
            &setup.agent.display().to_string(),
            "cleanup",
            "--state-dir",
            &state.display().to_string(),
            "--cni-conf-dir",
            &work.join("no-cni").display().to_string(),
            "--cni-run-dir",
            &work.join("no-cni-run").display().to_string(),
        ],
    )?;
    let gone = nodes[0].ns.ip(&["link", "show", "wgmesh0"]).is_err();
    let left = nodes[0]
        .ns
        .ip(&["route", "show", "table", "all", "proto", "87"])?;
    assert!(gone, "cleanup removes the kernel link");
    assert!(left.trim().is_empty(), "cleanup removes our routes: {left}");
    lap("wgmesh-agent cleanup removed the kernel link and the routes");
    lap("done");
    vm::record_ran("kernel_vm_in_vm_mesh");
    Ok(())
}

/// Every node's sessions with the other nodes in `nodes`: (node, peer key) -> latest handshake.
fn sessions(nodes: &[&VmNode]) -> Result<BTreeMap<(String, String), u64>> {
    let keys: Vec<String> = nodes
        .iter()
        .map(|n| n.public_key())
        .collect::<Result<_>>()?;
    let mut out = BTreeMap::new();
    for n in nodes {
        for (key, row) in n.peer_table()? {
            if keys.contains(&key) {
                out.insert((n.name.clone(), key), row.handshake);
            }
        }
    }
    Ok(out)
}

/// Checks that no session in `before` was renewed since (kernel and userspace nodes alike).
fn assert_kept(
    what: &str,
    nodes: &[VmNode],
    before: &BTreeMap<(String, String), u64>,
) -> Result<()> {
    let views: Vec<&VmNode> = nodes.iter().collect();
    let renewed = resets(before, &sessions(&views)?);
    if !renewed.is_empty() {
        bail!(
            "{what}: sessions renewed: {renewed:?}\n{}",
            handshake_evidence(nodes)
        );
    }
    Ok(())
}

/// The sessions in `before` that were reset since: a new handshake, unless the old session was
/// due for WireGuard's own rekey (sessions renew every 120 s under traffic).
fn resets(
    before: &BTreeMap<(String, String), u64>,
    after: &BTreeMap<(String, String), u64>,
) -> Vec<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    before
        .iter()
        .filter_map(|((node, key), &was)| {
            let is = after.get(&(node.clone(), key.clone())).copied();
            let rekey_due = now.saturating_sub(was) >= 115;
            (is != Some(was) && !(is.is_some() && rekey_due))
                .then(|| format!("{node}: peer {key}: handshake {was} -> {is:?}"))
        })
        .collect()
}

/// Why handshakes happened: the kernel's WireGuard messages (dynamic debug) and the agents'
/// lines about handshakes and device updates.
fn handshake_evidence(nodes: &[VmNode]) -> String {
    let dmesg = sh("dmesg", &[]).unwrap_or_default();
    let kernel: Vec<&str> = dmesg
        .lines()
        .filter(|l| l.contains("wireguard") || l.contains("wgmesh0"))
        .collect();
    let mut out = format!(
        "--- kernel (last 60) ---\n{}\n",
        kernel[kernel.len().saturating_sub(60)..].join("\n")
    );
    for n in nodes {
        let log = n.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("HANDSHAKE")
                    || l.contains("andshake")
                    || l.contains("updating the device")
                    || l.contains("KEEPALIVE")
            })
            .collect();
        out.push_str(&format!(
            "--- {} ---\n{}\n",
            n.name,
            lines[lines.len().saturating_sub(30)..].join("\n")
        ));
    }
    out
}

fn peer_counts(nodes: &[&VmNode]) -> Vec<usize> {
    nodes
        .iter()
        .map(|n| n.peer_table().map(|t| t.len()).unwrap_or(usize::MAX))
        .collect()
}

/// Inside the VM, a mixed mesh with fwmark set, changed around its traffic:
/// 1. node-1 and node-2 on kernel WireGuard (`auto`), node-3 on our userspace device: pod to
///    pod every way, full-size packets (the interface MTU), the fwmark on the device and its
///    `not fwmark` rule;
/// 2. a laptop running Debian's wireguard-go, from the config `kubectl wgmesh peer add`
///    prints, reaches every pod through the nodes (kernel and userspace gateways) and back;
/// 3. node-2's key is rotated (the Node annotation): the others follow, node-1's session with
///    node-3 is untouched;
/// 4. node-2 moves to another underlay address: the kernel (and userspace) peers roam to it;
/// 5. node-4 (kernel) joins, then leaves by its Node's deletion: peers are added and removed
///    in place (no other session renewed), the roamed endpoint is not pushed back to the
///    configured one, and node-4's agent takes its link down when it leaves;
/// 6. node-1's agent is killed (SIGKILL) under traffic to node-3 and comes back: no probe lost;
/// and all along, a capture on every node's underlay link sees no pod or tunnel address in
/// plaintext.
#[test]
#[ignore = "runs inside the kernel VM, started by kernel_vm_mixed_mesh"]
fn kernel_vm_in_vm_mixed_mesh() -> Result<()> {
    if !vm_only("kernel_vm_in_vm_mixed_mesh") {
        return Ok(());
    }
    let t0 = Instant::now();
    let lap = |what: &str| eprintln!("[{:>6.1}s] {what}", t0.elapsed().as_secs_f64());
    let setup = read_setup()?;
    let api = setup.api.as_ref().context("no API access in the setup")?;
    let work = Path::new("/tmp/wgmesh-kvm");
    std::fs::create_dir_all(work)?;
    let args = guest_setup(&setup)?;
    tcp_proxy(
        format!("127.0.0.1:{}", api.port).parse()?,
        format!("{HOST_FROM_GUEST}:{}", api.port).parse()?,
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = rt.block_on(async {
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&api.kubeconfig)?,
            &KubeConfigOptions::default(),
        )
        .await?;
        anyhow::Ok(kube::Client::try_from(config)?)
    })?;
    let node_api: Api<Node> = Api::all(client.clone());
    // The kernel's WireGuard says why it sends each handshake (dmesg), when asked.
    let _ = sh("mount", &["-t", "debugfs", "debugfs", "/sys/kernel/debug"]);
    let _ = std::fs::write(
        "/sys/kernel/debug/dynamic_debug/control",
        "module wireguard +p",
    );
    lap("underlay, controller and API server proxies up");

    let mut nodes = Vec::new();
    for (i, (name, token)) in setup.nodes.iter().enumerate() {
        let backend = if i + 1 == NODES {
            Backend::Userspace
        } else {
            Backend::Auto
        };
        nodes.push(VmNode::wire(name, i + 1, backend, &args, token, work)?);
    }
    // Everything the nodes send on the underlay, from before their agents start.
    let mut watcher = Watcher::new(work, &["10.244.0.0/16", "10.250.0.0/16"])?;
    for node in &nodes {
        watcher.watch(&node.name, &node.underlay_link())?;
    }
    for node in &mut nodes {
        node.start_agent()?;
    }
    lap("nodes wired, captures and agents started");

    // 1. The mixed mesh.
    wait_until(
        "every node has the other two as peers",
        Duration::from_secs(240),
        || Ok(peer_counts(&nodes.iter().collect::<Vec<_>>()) == vec![NODES - 1; NODES]),
        || {
            let dumps: Vec<String> = nodes
                .iter()
                .map(|n| format!("{}: {:?}", n.name, n.wg_dump()))
                .collect();
            format!("{}\n{}", dumps.join("\n"), all_logs(&nodes))
        },
    )?;
    for node in &nodes {
        let link = node.ns.ip(&["-d", "link", "show", INTERFACE])?;
        let (want, kind) = match node.backend {
            Backend::Auto => ("kernel", link.contains("wireguard")),
            Backend::Userspace => ("userspace", link.contains("tun")),
        };
        assert!(
            kind && node.device_ready(want) == 1,
            "{}: a {want} device: {link}\n{}",
            node.name,
            node.log_tail(20)
        );
        assert!(
            link.contains("mtu 1420"),
            "{}: MTU 1420 (the underlay's 1500 less 80): {link}",
            node.name
        );
        let fwmark = node.wg(&["show", INTERFACE, "fwmark"])?;
        assert_eq!(
            fwmark.trim(),
            format!("{FWMARK:#x}"),
            "{}: fwmark",
            node.name
        );
        let rules = node.ns.ip(&["rule", "show"])?;
        assert!(
            rules
                .lines()
                .any(|l| l.contains(&format!("not from all fwmark {FWMARK:#x}"))
                    && l.contains("lookup 51820")),
            "{}: the rule to the mesh's table exempts marked packets:\n{rules}",
            node.name
        );
    }
    lap("devices: kernel, kernel, userspace; MTU 1420; fwmark and its rule");
    let pods: Vec<&str> = nodes.iter().map(|n| n.pod.name.as_str()).collect();
    let mut echoes = Echoes::start(&pods);
    every_pair_reaches(&nodes, 8, Duration::from_secs(60))?;
    // The largest packet the interface takes: 1420 less the IPv4 and UDP headers.
    every_pair_reaches(&nodes, 1420 - 28, Duration::from_secs(30))?;
    lap("pod to pod every way, kernel and userspace, small and full-size packets");

    // 2. A laptop on wireguard-go through the mesh's gateways.
    let laptop = Netns::create("kvl")?;
    sh(
        "ip",
        &[
            "link",
            "add",
            "kvv50",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &laptop.name,
        ],
    )?;
    sh("ip", &["link", "set", "kvv50", "master", BRIDGE, "up"])?;
    laptop.ip(&["addr", "add", &format!("{UNDERLAY}.50/24"), "dev", "eth0"])?;
    laptop.ip(&["link", "set", "eth0", "up"])?;
    laptop.ip(&["route", "add", "default", "via", &gateway()])?;
    watcher.watch("laptop", "kvv50")?;
    let out = std::process::Command::new(&api.cli)
        .arg("--kubeconfig")
        .arg(&api.kubeconfig)
        .args([
            "peer",
            "add",
            "laptop",
            "--client-allowed-ips",
            "10.96.0.0/16",
        ])
        .args(["--keepalive", "5"])
        .output()?;
    if !out.status.success() {
        bail!(
            "kubectl-wgmesh peer add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let config = String::from_utf8(out.stdout)?;
    assert_eq!(config.matches("[Peer]").count(), NODES, "{config}");
    let _wireguard_go = wireguard_go_from_config(&laptop, "wgl0", &config, work)?;
    let laptop_ip = quick_parts(&config)
        .addresses
        .first()
        .and_then(|a| a.split('/').next().map(str::to_owned))
        .context("the laptop's address")?;
    echoes.add(&laptop.name);
    let deadline = Instant::now() + Duration::from_secs(90);
    for node in &nodes {
        reaches(&laptop.name, node.pod_addr()?, 8, deadline, || {
            format!("laptop -> {}\n{}", node.name, all_logs(&nodes))
        })?;
        reaches(
            &node.pod.name,
            format!("{laptop_ip}:{ECHO_PORT}").parse()?,
            8,
            deadline,
            || format!("{} -> laptop\n{}", node.name, all_logs(&nodes)),
        )?;
    }
    let views: Vec<&VmNode> = nodes.iter().collect();
    assert_eq!(
        peer_counts(&views),
        vec![NODES; NODES],
        "the laptop on every node"
    );
    lap("laptop (wireguard-go) <-> every pod, through kernel and userspace gateways");

    // 3. node-2's key rotated.
    let before = sessions(&views)?;
    let old_key = nodes[1].public_key()?;
    let stamp = format!("{}", t0.elapsed().as_nanos());
    rt.block_on(node_api.patch(
        "node-2",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"wgmesh.io/rotate-key": stamp}}})),
    ))?;
    wait_until(
        "node-1 and node-3 follow node-2's new key",
        Duration::from_secs(120),
        || {
            let new = nodes[1].public_key()?;
            Ok(new != old_key
                && [&nodes[0], &nodes[2]].iter().all(|n| {
                    n.peer_table()
                        .is_ok_and(|t| t.contains_key(&new) && !t.contains_key(&old_key))
                }))
        },
        || all_logs(&nodes),
    )?;
    every_pair_reaches(&nodes, 8, Duration::from_secs(60))?;
    let untouched: BTreeMap<_, _> = before
        .into_iter()
        .filter(|((node, key), _)| node != "node-2" && *key != old_key)
        .collect();
    assert_kept("the rotation", &nodes, &untouched)?;
    lap("node-2's key rotated; the others followed; node-1 <-> node-3 kept its session");

    // 4. node-2 moves on the underlay: the peers roam to its new address.
    let moved = format!("{UNDERLAY}.12");
    let n2 = &nodes[1];
    n2.ns.ip(&[
        "addr",
        "del",
        &format!("{}/24", n2.underlay_ip()),
        "dev",
        "eth0",
    ])?;
    n2.ns
        .ip(&["addr", "add", &format!("{moved}/24"), "dev", "eth0"])?;
    n2.ns
        .ip(&["route", "replace", "default", "via", &gateway()])?;
    sh("ip", &["route", "replace", "10.244.2.0/24", "via", &moved])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for other in [&nodes[0], &nodes[2]] {
        reaches(&n2.pod.name, other.pod_addr()?, 8, deadline, || {
            format!("node-2 (moved) -> {}\n{}", other.name, all_logs(&nodes))
        })?;
        reaches(&other.pod.name, n2.pod_addr()?, 8, deadline, || {
            format!("{} -> node-2 (moved)\n{}", other.name, all_logs(&nodes))
        })?;
    }
    let n2_key = n2.public_key()?;
    let roamed = |n: &VmNode| -> Result<String> {
        Ok(n.peer_table()?
            .get(&n2_key)
            .map(|r| r.endpoint.clone())
            .unwrap_or_default())
    };
    for other in [&nodes[0], &nodes[2]] {
        assert_eq!(
            roamed(other)?,
            format!("{moved}:51820"),
            "{} follows node-2 to its new address",
            other.name
        );
    }
    lap("node-2 moved to .12; node-1 (kernel) and node-3 (userspace) roamed to it");

    // 5. node-4 joins, then leaves.
    let before = sessions(&views)?;
    let token = rt.block_on(async {
        cluster::create_node(
            &client,
            "node-4",
            &["10.244.4.0/24"],
            &format!("{UNDERLAY}.4"),
            &[],
        )
        .await?;
        cluster::agent_token(&client, "node-4").await
    })?;
    let token_file = work.join("node-4.token");
    std::fs::write(&token_file, token)?;
    let mut n4 = VmNode::wire("node-4", 4, Backend::Auto, &args, &token_file, work)?;
    watcher.watch("node-4", &n4.underlay_link())?;
    n4.start_agent()?;
    wait_until(
        "node-4 and the others have each other",
        Duration::from_secs(180),
        || {
            let mut all: Vec<&VmNode> = nodes.iter().collect();
            all.push(&n4);
            Ok(peer_counts(&all) == vec![NODES + 1; NODES + 1])
        },
        || format!("{}\n{}", all_logs(&nodes), n4.log_tail(25)),
    )?;
    echoes.add(&n4.pod.name);
    let deadline = Instant::now() + Duration::from_secs(60);
    // node-2 first: node-4 only knows node-2's configured (old) address until node-2 speaks.
    for other in [&nodes[1], &nodes[0], &nodes[2]] {
        reaches(&other.pod.name, n4.pod_addr()?, 8, deadline, || {
            format!("{} -> node-4\n{}", other.name, n4.log_tail(25))
        })?;
        reaches(&n4.pod.name, other.pod_addr()?, 8, deadline, || {
            format!("node-4 -> {}\n{}", other.name, n4.log_tail(25))
        })?;
    }
    assert_kept("node-4's join", &nodes, &before)?;
    for other in [&nodes[0], &nodes[2]] {
        assert_eq!(
            roamed(other)?,
            format!("{moved}:51820"),
            "{}: the roamed endpoint stays through the update that added node-4",
            other.name
        );
    }
    lap("node-4 (kernel) joined: peers added in place, no session renewed, roaming kept");

    rt.block_on(cluster::delete_node(&client, "node-4"))?;
    wait_until(
        "node-4 leaves: the others drop it, its agent takes its link down",
        Duration::from_secs(120),
        || {
            Ok(peer_counts(&views) == vec![NODES; NODES]
                && n4.ns.ip(&["link", "show", INTERFACE]).is_err())
        },
        || format!("{}\n{}", all_logs(&nodes), n4.log_tail(25)),
    )?;
    every_pair_reaches(&nodes, 8, Duration::from_secs(30))?;
    assert_kept("node-4's leaving", &nodes, &before)?;
    if let Some(mut agent) = n4.agent.take() {
        agent.stop(Duration::from_secs(10));
    }
    lap("node-4 left: removed in place everywhere, its link gone");

    // 6. node-1's agent killed under traffic to the userspace node, and started again.
    let traffic = TwoWay::start(
        &nodes[0].pod.name,
        &nodes[0].pod_ip,
        &nodes[2].pod.name,
        &nodes[2].pod_ip,
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let ifindex = nodes[0].ifindex()?;
    nodes[0].agent.as_mut().context("node-1's agent")?.kill();
    nodes[0].agent = None;
    std::thread::sleep(Duration::from_secs(3));
    nodes[0].start_agent()?;
    wait_until(
        "node-1's agent is back",
        Duration::from_secs(120),
        || {
            Ok(nodes[0].kernel_device_ready() == 2
                && nodes[0].log().matches(" registered ").count() >= 2)
        },
        || nodes[0].log_tail(30),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let (there, back) = traffic.finish()?;
    println!(
        "kernel_vm_in_vm_mixed_mesh: lost probes across node-1's agent SIGKILL + restart: pod1->pod3 {} of {}, pod3->pod1 {} of {}",
        there.lost(),
        there.sent,
        back.lost(),
        back.sent
    );
    assert_eq!(nodes[0].ifindex()?, ifindex, "the kernel link stays");
    assert_eq!(
        (there.lost(), back.lost()),
        (0, 0),
        "no probe lost across the agent's SIGKILL\n{}",
        all_logs(&nodes)
    );
    lap("node-1's agent killed and back: no probe lost");

    // The capture, all along.
    let counts = watcher.poll()?;
    for c in &counts {
        println!(
            "kernel_vm_in_vm_mixed_mesh: underlay of {}: {} packets, {} in plaintext {:?}",
            c.node, c.packets, c.plaintext, c.examples
        );
    }
    assert!(
        counts.iter().all(|c| c.plaintext == 0 && c.packets > 0),
        "no pod or tunnel address in plaintext on any node's underlay: {counts:?}"
    );
    lap("capture: no plaintext on any node's underlay link");

    echoes.stop()?;
    for node in &mut nodes {
        if let Some(mut a) = node.agent.take() {
            a.stop(Duration::from_secs(10));
        }
    }
    lap("done");
    vm::record_ran("kernel_vm_in_vm_mixed_mesh");
    Ok(())
}
