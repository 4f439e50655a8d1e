//! The kernel backend on a real kernel: tests that run inside a QEMU VM booting Debian's
//! kernel, which has WireGuard (see `wgmesh_e2e::vm`). The build machines' own kernel has none.
//!
//! Each `kernel_vm_*` test here is one of two kinds:
//! - host side (`kernel_vm_device_backend`, `kernel_vm_mesh`): prepares what stays on the host
//!   (the control plane and the controller: under emulation they would be very slow), boots a
//!   VM running a test binary, and fails with its output when that fails. Skipped inside;
//! - inside (`kernel_vm_in_vm_*`): runs only in the VM (`WGMESH_IN_VM=1`), skipped elsewhere.
//!
//! Inside, the lean part: one VM, one network namespace per node (bridged to the VM's root
//! namespace, the underlay router), real `wgmesh-agent` processes, pods as namespaces behind
//! each node, UDP probes written here (no `ping` is installed and processes are expensive
//! under emulation), and `wg`, which reads kernel links over generic netlink.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use wgmesh_e2e::ControlPlane;
use wgmesh_e2e::binaries::workspace_binary;
use wgmesh_e2e::cluster;
use wgmesh_e2e::controller::{Controller, ControllerTls};
use wgmesh_e2e::install::install_default_mesh;
use wgmesh_e2e::netns::{Netns, sh};
use wgmesh_e2e::process::ChildGuard;
use wgmesh_e2e::scratch::ScratchDir;
use wgmesh_e2e::vm::{self, HOST_FROM_GUEST, lane};

/// What the host hands the in-VM mesh test (as JSON, in a file the VM reads over 9p).
#[derive(Serialize, Deserialize, Debug)]
struct MeshSetup {
    agent: PathBuf,
    /// The controller's gRPC port on the host's loopback.
    grpc_port: u16,
    ca_file: PathBuf,
    /// One per node, in order: (node name, token file).
    nodes: Vec<(String, PathBuf)>,
}

const SETUP_ENV: &str = "WGMESH_KVM_SETUP";
/// Nodes of the in-VM mesh.
const NODES: usize = 3;
/// The in-VM underlay: node i at `.i`, the VM's root namespace (router, controller proxy)
/// at `.254`.
const UNDERLAY: &str = "192.168.77";

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

/// A three-node mesh on kernel WireGuard: the control plane and the controller on the host,
/// the agents in the VM (see [`kernel_vm_in_vm_mesh`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_vm_mesh() -> Result<()> {
    if !host_only("kernel_vm_mesh") {
        return Ok(());
    }
    let started = Instant::now();
    let cp = ControlPlane::start().await?;
    install_default_mesh(&cp)?;
    let tls = ControllerTls::issue(&cp)?;
    let controller = Controller::start(&cp, &tls, "wgmesh-controller-0", &[]).await?;
    let client = cp.client().await?;
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
    let setup = MeshSetup {
        agent: workspace_binary("wgmesh-node-agent", "wgmesh-agent")?,
        grpc_port: controller.grpc_port,
        ca_file: tls.ca.clone(),
        nodes,
    };
    let setup_file = dir.path().join("setup.json");
    std::fs::write(&setup_file, serde_json::to_string(&setup)?)?;
    eprintln!(
        "[wgmesh] kernel_vm_mesh: control plane and controller up on the host in {:.1?}",
        started.elapsed()
    );
    let exe = std::env::current_exe()?;
    let setup_path = setup_file.display().to_string();
    let out = tokio::task::spawn_blocking(move || {
        lane::run_test_binary(
            &exe,
            &[
                "--exact",
                "kernel_vm_in_vm_mesh",
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ],
            &[(SETUP_ENV, &setup_path)],
            Duration::from_secs(900),
        )
    })
    .await?
    .map_err(|e| e.context(format!("controller log:\n{}", controller.log_tail(30))))?;
    eprintln!("--- in the VM ---\n{}{}", out.stdout, out.stderr);
    if !out.ran.iter().any(|t| t == "kernel_vm_in_vm_mesh") {
        bail!(
            "kernel_vm_in_vm_mesh did not run in the VM:\n{}",
            out.stderr
        );
    }
    lane::report("kernel_vm_mesh", out.ran.len(), started);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Inside the VM.

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<Result<T>> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {path}"))?;
        Ok(f())
    })
}

/// A UDP echo server in a pod namespace, until `stop`.
fn echo_server(ns: &str, port: u16, stop: Arc<AtomicBool>) -> JoinHandle<Result<Result<()>>> {
    in_netns(ns, move || {
        let socket = UdpSocket::bind(("0.0.0.0", port))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                socket.send_to(&buf[..n], from)?;
            }
        }
        Ok(())
    })
}

/// Probes counted: how many were sent and how many came back.
#[derive(Debug, Clone, Copy)]
struct Probes {
    sent: u64,
    received: u64,
}

impl Probes {
    fn lost(&self) -> u64 {
        self.sent - self.received
    }
}

/// From pod namespace `ns`, a UDP probe to `to` every `interval` until `stop`; replies that
/// come within `drain` of the last probe count.
fn prober(
    ns: &str,
    to: SocketAddr,
    interval: Duration,
    drain: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<Result<Probes>>> {
    in_netns(ns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        let mut got = BTreeSet::new();
        let mut buf = [0u8; 64];
        let mut sent = 0u64;
        let mut recv_until = |socket: &UdpSocket, until: Instant, got: &mut BTreeSet<u64>| {
            loop {
                let now = Instant::now();
                if now >= until {
                    return;
                }
                let _ = socket.set_read_timeout(Some(until - now));
                if let Ok(n) = socket.recv(&mut buf)
                    && n == 8
                {
                    got.insert(u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")));
                }
            }
        };
        while !stop.load(Ordering::Relaxed) {
            let next = Instant::now() + interval;
            // Unreachable routes (a send error) count as lost probes.
            let _ = socket.send_to(&sent.to_be_bytes(), to);
            sent += 1;
            recv_until(&socket, next, &mut got);
        }
        recv_until(&socket, Instant::now() + drain, &mut got);
        Ok(Probes {
            sent,
            received: got.len() as u64,
        })
    })
}

fn join<T>(h: JoinHandle<Result<Result<T>>>) -> Result<T> {
    h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??
}

/// `count` probes from `from` to `to`, one every 100 ms; how many came back.
fn probe_burst(from: &str, to: SocketAddr, count: u64) -> Result<Probes> {
    let stop = Arc::new(AtomicBool::new(false));
    let h = prober(
        from,
        to,
        Duration::from_millis(100),
        Duration::from_millis(500),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(100 * count));
    stop.store(true, Ordering::Relaxed);
    join(h)
}

/// Forwards TCP connections to `listen` (in the VM's root namespace) to the host at `to`:
/// the nodes reach the controller through it (the user-mode network NATs only the VM's own
/// address).
fn tcp_proxy(listen: SocketAddr, to: SocketAddr) -> Result<()> {
    let listener = std::net::TcpListener::bind(listen)?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(upstream) = std::net::TcpStream::connect(to) else {
                    return;
                };
                let (mut a, mut b) = (
                    conn.try_clone().expect("clone"),
                    upstream.try_clone().expect("clone"),
                );
                let t = std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(std::net::Shutdown::Write);
                });
                let (mut c, mut d) = (upstream, conn);
                let _ = std::io::copy(&mut c, &mut d);
                let _ = d.shutdown(std::net::Shutdown::Write);
                let _ = t.join();
            });
        }
    });
    Ok(())
}

struct VmNode {
    name: String,
    ns: Netns,
    pod: Netns,
    pod_ip: String,
    agent: Option<ChildGuard>,
    command: Command,
    log: PathBuf,
}

impl VmNode {
    fn start_agent(&mut self) -> Result<()> {
        let mut cmd = Command::new(self.command.get_program());
        cmd.args(self.command.get_args());
        for (k, v) in self.command.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        self.agent = Some(ChildGuard::spawn(
            &format!("agent {}", self.name),
            cmd,
            &self.log,
        )?);
        Ok(())
    }

    /// The agent's log (all its runs), without colours.
    fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// How many times the agent said its kernel device was ready (once per run).
    fn kernel_device_ready(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("device ready") && l.contains("backend=kernel"))
            .count()
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = self.log();
        let all: Vec<&str> = text.lines().collect();
        format!(
            "--- {} ---\n{}",
            self.name,
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }

    fn wg_dump(&self) -> Result<String> {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns.name,
                "wg",
                "show",
                "wgmesh0",
                "dump",
            ],
        )
    }

    /// Peers with a handshake, as `wg` reads them from the kernel (generic netlink).
    fn peers(&self) -> Result<Vec<(String, u64)>> {
        Ok(self
            .wg_dump()?
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                Some((f.first()?.to_string(), f.get(4)?.parse().ok()?))
            })
            .collect())
    }

    fn ifindex(&self) -> Result<String> {
        let out = self.ns.ip(&["-o", "link", "show", "wgmesh0"])?;
        Ok(out.split(':').next().unwrap_or_default().to_owned())
    }
}

/// Removes terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn all_logs(nodes: &[VmNode]) -> String {
    nodes
        .iter()
        .map(|n| n.log_tail(25))
        .collect::<Vec<_>>()
        .join("\n")
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

    // The underlay: a bridge in the VM's root namespace, which routes (the nodes' default
    // gateway, with routes back to every pod CIDR) and proxies the controller.
    let gw = format!("{UNDERLAY}.254");
    sh("ip", &["link", "add", "kvbr", "type", "bridge"])?;
    sh("ip", &["addr", "add", &format!("{gw}/24"), "dev", "kvbr"])?;
    sh("ip", &["link", "set", "kvbr", "up"])?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    let proxy: SocketAddr = format!("{gw}:{}", setup.grpc_port).parse()?;
    tcp_proxy(
        proxy,
        format!("{HOST_FROM_GUEST}:{}", setup.grpc_port).parse()?,
    )?;
    lap("underlay and controller proxy up");

    let mut nodes = Vec::new();
    for (i, (name, token)) in setup.nodes.iter().enumerate() {
        let i = i + 1;
        let ns = Netns::create(&format!("kvn{i}"))?;
        let pod = Netns::create(&format!("kvp{i}"))?;
        let node_ip = format!("{UNDERLAY}.{i}");
        let pod_ip = format!("10.244.{i}.2");
        // Node on the underlay.
        sh(
            "ip",
            &[
                "link",
                "add",
                &format!("kvv{i}"),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns.name,
            ],
        )?;
        sh(
            "ip",
            &["link", "set", &format!("kvv{i}"), "master", "kvbr", "up"],
        )?;
        ns.ip(&["addr", "add", &format!("{node_ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &gw])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        sh(
            "ip",
            &["route", "add", &format!("10.244.{i}.0/24"), "via", &node_ip],
        )?;
        // The pod behind its node (a routed veth, as a simple CNI would make it).
        ns.ip(&[
            "link", "add", "pod0", "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
        ])?;
        ns.ip(&["addr", "add", &format!("10.244.{i}.1/24"), "dev", "pod0"])?;
        ns.ip(&["link", "set", "pod0", "up"])?;
        pod.ip(&["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["route", "add", "default", "via", &format!("10.244.{i}.1")])?;

        let state = work.join(name);
        std::fs::create_dir_all(&state)?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &ns.name])
            .arg(&setup.agent)
            .args(["--node", name])
            .args(["--controller", &format!("https://{proxy}")])
            .args(["--tls-server-name", "localhost"])
            .arg("--ca-file")
            .arg(&setup.ca_file)
            .arg("--token-file")
            .arg(token)
            .arg("--state-dir")
            .arg(&state)
            .args(["--report-interval", "2"])
            .env("WGMESH_LOG", "info,wgmesh_agent=debug")
            .env("NO_COLOR", "1");
        nodes.push(VmNode {
            name: name.clone(),
            ns,
            pod,
            pod_ip,
            agent: None,
            command,
            log: work.join(format!("{name}.log")),
        });
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
    let stop_echo = Arc::new(AtomicBool::new(false));
    let echoes: Vec<_> = nodes
        .iter()
        .map(|n| echo_server(&n.pod.name, 7777, stop_echo.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let deadline = Instant::now() + Duration::from_secs(60);
    for a in 0..NODES {
        for b in 0..NODES {
            if a == b {
                continue;
            }
            let to: SocketAddr = format!("{}:7777", nodes[b].pod_ip).parse()?;
            loop {
                let p = probe_burst(&nodes[a].pod.name, to, 5)?;
                if p.received == p.sent {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "pod {} -> pod {}: {p:?}\n{}\n{}",
                        nodes[a].name,
                        nodes[b].name,
                        nodes[a].ns.ip(&["route", "show", "table", "all"])?,
                        all_logs(&nodes)
                    );
                }
            }
        }
    }
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
    let stop = Arc::new(AtomicBool::new(false));
    let interval = Duration::from_millis(50);
    let there = prober(
        &nodes[0].pod.name,
        format!("{}:7777", nodes[1].pod_ip).parse()?,
        interval,
        Duration::from_secs(2),
        stop.clone(),
    );
    let back = prober(
        &nodes[1].pod.name,
        format!("{}:7777", nodes[0].pod_ip).parse()?,
        interval,
        Duration::from_secs(2),
        stop.clone(),
    );
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
    stop.store(true, Ordering::Relaxed);
    let (there, back) = (join(there)?, join(back)?);
    lap(&format!(
        "node-1's agent restarted; ifindex {after_restart}, {peers_after} peers; probes pod1->pod2 {there:?}, pod2->pod1 {back:?}"
    ));
    stop_echo.store(true, Ordering::Relaxed);
    for e in echoes {
        join(e)?;
    }
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
