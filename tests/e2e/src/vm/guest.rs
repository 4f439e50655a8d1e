//! The guest side of the kernel VM lane's mesh tests: what runs inside the VM. Nodes are
//! network namespaces on a bridge in the VM's root namespace (the underlay router), each with
//! a real `wgmesh-agent` and a pod namespace behind it; traffic is UDP probes written here
//! (no `ping` is installed, and processes are expensive under emulation); peers are read with
//! `wg`, over generic netlink for kernel links and over the UAPI socket for userspace ones.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, sh};
use crate::process::ChildGuard;

/// The in-VM underlay: node i at `.i`, the VM's root namespace (router, proxies) at `.254`.
pub const UNDERLAY: &str = "192.168.77";
/// The bridge of the underlay, in the VM's root namespace.
pub const BRIDGE: &str = "kvbr";
/// The mesh's interface on every node.
pub const INTERFACE: &str = "wgmesh0";
/// The UDP port of the echo servers in the pods.
pub const ECHO_PORT: u16 = 7777;

/// The underlay router's address.
pub fn gateway() -> String {
    format!("{UNDERLAY}.254")
}

/// Runs `f` on a thread inside network namespace `ns`.
pub fn in_netns<T: Send + 'static>(
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

/// A UDP echo server in namespace `ns`, until `stop`.
pub fn echo_server(ns: &str, port: u16, stop: Arc<AtomicBool>) -> JoinHandle<Result<Result<()>>> {
    in_netns(ns, move || {
        let socket = UdpSocket::bind(("0.0.0.0", port))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut buf = vec![0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                socket.send_to(&buf[..n], from)?;
            }
        }
        Ok(())
    })
}

/// Echo servers on every given namespace, stopped together.
pub struct Echoes {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<Result<()>>>>,
}

impl Echoes {
    pub fn start(namespaces: &[&str]) -> Echoes {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = namespaces
            .iter()
            .map(|ns| echo_server(ns, ECHO_PORT, stop.clone()))
            .collect();
        // Bound before the first probe.
        std::thread::sleep(Duration::from_millis(300));
        Echoes { stop, threads }
    }

    pub fn add(&mut self, ns: &str) {
        self.threads
            .push(echo_server(ns, ECHO_PORT, self.stop.clone()));
        std::thread::sleep(Duration::from_millis(300));
    }

    pub fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            join(t)?;
        }
        Ok(())
    }
}

/// Probes counted: how many were sent and how many came back.
#[derive(Debug, Clone, Copy)]
pub struct Probes {
    pub sent: u64,
    pub received: u64,
}

impl Probes {
    pub fn lost(&self) -> u64 {
        self.sent - self.received
    }
}

/// From namespace `ns`, a UDP probe of `size` bytes (at least 8: the sequence number) to `to`
/// every `interval` until `stop`; replies that come within `drain` of the last probe count.
pub fn prober(
    ns: &str,
    to: SocketAddr,
    size: usize,
    interval: Duration,
    drain: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<Result<Probes>>> {
    in_netns(ns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        let mut got = BTreeSet::new();
        let mut buf = vec![0u8; size.max(8) + 1];
        let mut packet = vec![0xa5u8; size.max(8)];
        let mut sent = 0u64;
        let mut recv_until = |socket: &UdpSocket, until: Instant, got: &mut BTreeSet<u64>| {
            loop {
                let now = Instant::now();
                if now >= until {
                    return;
                }
                let _ = socket.set_read_timeout(Some(until - now));
                if let Ok(n) = socket.recv(&mut buf)
                    && n == size.max(8)
                {
                    got.insert(u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")));
                }
            }
        };
        while !stop.load(Ordering::Relaxed) {
            let next = Instant::now() + interval;
            packet[..8].copy_from_slice(&sent.to_be_bytes());
            // Unreachable routes (a send error) count as lost probes.
            let _ = socket.send_to(&packet, to);
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

pub fn join<T>(h: JoinHandle<Result<Result<T>>>) -> Result<T> {
    h.join().map_err(|_| anyhow::anyhow!("thread panicked"))??
}

/// `count` probes of `size` bytes from `from` to `to`, one every 100 ms; how many came back.
pub fn probe_burst(from: &str, to: SocketAddr, size: usize, count: u64) -> Result<Probes> {
    let stop = Arc::new(AtomicBool::new(false));
    let h = prober(
        from,
        to,
        size,
        Duration::from_millis(100),
        Duration::from_millis(500),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(100 * count));
    stop.store(true, Ordering::Relaxed);
    join(h)
}

/// Probes from `from` to `to` until a burst of 5 comes back whole, or fails at `deadline` with
/// `context()` in the error.
pub fn reaches(
    from: &str,
    to: SocketAddr,
    size: usize,
    deadline: Instant,
    context: impl Fn() -> String,
) -> Result<()> {
    loop {
        let p = probe_burst(from, to, size, 5)?;
        if p.received == p.sent {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{from} -> {to} ({size} bytes): {p:?}\n{}", context());
        }
    }
}

/// Continuous probes both ways between two namespaces, every 50 ms, until [`TwoWay::finish`].
pub struct TwoWay {
    stop: Arc<AtomicBool>,
    there: JoinHandle<Result<Result<Probes>>>,
    back: JoinHandle<Result<Result<Probes>>>,
}

impl TwoWay {
    pub fn start(a: &str, a_ip: &str, b: &str, b_ip: &str) -> Result<TwoWay> {
        let stop = Arc::new(AtomicBool::new(false));
        let interval = Duration::from_millis(50);
        let drain = Duration::from_secs(2);
        let there = prober(
            a,
            format!("{b_ip}:{ECHO_PORT}").parse()?,
            8,
            interval,
            drain,
            stop.clone(),
        );
        let back = prober(
            b,
            format!("{a_ip}:{ECHO_PORT}").parse()?,
            8,
            interval,
            drain,
            stop.clone(),
        );
        Ok(TwoWay { stop, there, back })
    }

    /// (a to b, b to a).
    pub fn finish(self) -> Result<(Probes, Probes)> {
        self.stop.store(true, Ordering::Relaxed);
        Ok((join(self.there)?, join(self.back)?))
    }
}

/// Forwards TCP connections to `listen` (in the VM's root namespace) to `to`: the nodes reach
/// the controller on the host through it (the user-mode network NATs only the VM's own
/// address), and the test reaches the API server.
pub fn tcp_proxy(listen: SocketAddr, to: SocketAddr) -> Result<()> {
    let listener = std::net::TcpListener::bind(listen)?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(upstream) = std::net::TcpStream::connect(to) else {
                    return;
                };
                let (Ok(mut a), Ok(mut b)) = (conn.try_clone(), upstream.try_clone()) else {
                    return;
                };
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

/// The underlay bridge in the VM's root namespace, which routes between nodes (their default
/// gateway) and forwards.
pub fn underlay() -> Result<()> {
    sh("ip", &["link", "add", BRIDGE, "type", "bridge"])?;
    sh(
        "ip",
        &["addr", "add", &format!("{}/24", gateway()), "dev", BRIDGE],
    )?;
    sh("ip", &["link", "set", BRIDGE, "up"])?;
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
    Ok(())
}

/// The WireGuard implementation an in-VM node's agent is told to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The mesh's `auto`, which must choose the kernel module here.
    Auto,
    /// `--backend userspace`, in a private mount namespace with its own `/run/wireguard`, so
    /// that `wg` on the other nodes does not find its UAPI socket (named after the interface,
    /// the same on every node) and keeps reading their kernel links.
    Userspace,
}

/// How an in-VM node's agent reaches the controller.
#[derive(Debug, Clone)]
pub struct AgentArgs {
    pub agent: PathBuf,
    pub controller: String,
    pub ca_file: PathBuf,
}

/// One node in the VM: its namespace on the underlay (veth `kvv<i>` in the root namespace),
/// a pod behind it on a routed veth, and its agent.
pub struct VmNode {
    pub name: String,
    pub index: usize,
    pub ns: Netns,
    pub pod: Netns,
    pub pod_ip: String,
    pub backend: Backend,
    pub agent: Option<ChildGuard>,
    command: Command,
    pub log: PathBuf,
    pub state: PathBuf,
}

impl VmNode {
    /// Wires node `index` (1-based, at `UNDERLAY.index`, pods in `10.244.index.0/24`) and
    /// its pod; the agent is not started.
    pub fn wire(
        name: &str,
        index: usize,
        backend: Backend,
        args: &AgentArgs,
        token: &Path,
        work: &Path,
    ) -> Result<VmNode> {
        let i = index;
        let gw = gateway();
        let ns = Netns::create(&format!("kvn{i}"))?;
        let pod = Netns::create(&format!("kvp{i}"))?;
        let node_ip = format!("{UNDERLAY}.{i}");
        let pod_ip = format!("10.244.{i}.2");
        let link = format!("kvv{i}");
        sh(
            "ip",
            &[
                "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ],
        )?;
        sh("ip", &["link", "set", &link, "master", BRIDGE, "up"])?;
        ns.ip(&["addr", "add", &format!("{node_ip}/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &gw])?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        // The router knows the pod networks, as a real underlay often does: a packet that
        // left a node in plaintext would be delivered, not dropped.
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
        let mut command = match backend {
            Backend::Auto => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name]);
                c
            }
            Backend::Userspace => {
                let mut c = Command::new("unshare");
                c.args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(
                        "mkdir -p /run/wireguard && mount -t tmpfs wgmesh-uapi /run/wireguard \
                         && exec \"$@\"",
                    )
                    .args(["sh", "ip", "netns", "exec", &ns.name]);
                c
            }
        };
        command
            .arg(&args.agent)
            .args(["--node", name])
            .args(["--controller", &args.controller])
            .args(["--tls-server-name", "localhost"])
            .arg("--ca-file")
            .arg(&args.ca_file)
            .arg("--token-file")
            .arg(token)
            .arg("--state-dir")
            .arg(&state)
            // Each node's own CNI directories (the guest's are shared by every node).
            .arg("--cni-conf-dir")
            .arg(state.join("cni"))
            .arg("--cni-run-dir")
            .arg(state.join("cni-run"))
            .args(["--report-interval", "2"])
            .env("WGMESH_LOG", "info,wgmesh_agent=debug")
            .env("NO_COLOR", "1");
        if backend == Backend::Userspace {
            command.args(["--backend", "userspace"]);
        }
        Ok(VmNode {
            name: name.to_owned(),
            index,
            ns,
            pod,
            pod_ip,
            backend,
            agent: None,
            command,
            log: work.join(format!("{name}.log")),
            state,
        })
    }

    /// The node's address on the underlay.
    pub fn underlay_ip(&self) -> String {
        format!("{UNDERLAY}.{}", self.index)
    }

    /// The root namespace's end of the node's underlay link.
    pub fn underlay_link(&self) -> String {
        format!("kvv{}", self.index)
    }

    pub fn pod_addr(&self) -> Result<SocketAddr> {
        Ok(format!("{}:{ECHO_PORT}", self.pod_ip).parse()?)
    }

    pub fn start_agent(&mut self) -> Result<()> {
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
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// How many times the agent said its device was ready with `backend` (once per run).
    pub fn device_ready(&self, backend: &str) -> usize {
        let tag = format!("backend={backend}");
        self.log()
            .lines()
            .filter(|l| l.contains("device ready") && l.contains(&tag))
            .count()
    }

    pub fn kernel_device_ready(&self) -> usize {
        self.device_ready("kernel")
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log();
        let all: Vec<&str> = text.lines().collect();
        format!(
            "--- {} ---\n{}",
            self.name,
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }

    /// `wg ARGS` where it sees this node's device: in the node's namespace for a kernel link
    /// (generic netlink), in the agent's mount namespace too for a userspace one (its UAPI
    /// socket).
    pub fn wg(&self, args: &[&str]) -> Result<String> {
        match self.backend {
            Backend::Auto => {
                let mut all = vec!["netns", "exec", &self.ns.name, "wg"];
                all.extend_from_slice(args);
                sh("ip", &all)
            }
            Backend::Userspace => {
                let pid = self
                    .agent
                    .as_ref()
                    .and_then(ChildGuard::pid)
                    .context("the userspace device lives only with its agent")?
                    .to_string();
                // `-r`: the agent's root too (the VM runs everything in a chroot).
                let mut all = vec!["-t", &pid, "-m", "-n", "-r", "wg"];
                all.extend_from_slice(args);
                sh("nsenter", &all)
            }
        }
    }

    pub fn wg_dump(&self) -> Result<String> {
        self.wg(&["show", INTERFACE, "dump"])
    }

    /// The device's peers: public key, endpoint and latest handshake (0: none yet).
    pub fn peer_table(&self) -> Result<BTreeMap<String, PeerRow>> {
        Ok(self
            .wg_dump()?
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                Some((
                    f.first()?.to_string(),
                    PeerRow {
                        endpoint: f.get(2)?.to_string(),
                        handshake: f.get(4)?.parse().ok()?,
                    },
                ))
            })
            .collect())
    }

    /// Peers with their latest handshake, as `wg` reads them.
    pub fn peers(&self) -> Result<Vec<(String, u64)>> {
        Ok(self
            .peer_table()?
            .into_iter()
            .map(|(k, r)| (k, r.handshake))
            .collect())
    }

    pub fn public_key(&self) -> Result<String> {
        Ok(self
            .wg(&["show", INTERFACE, "public-key"])?
            .trim()
            .to_owned())
    }

    pub fn ifindex(&self) -> Result<String> {
        let out = self.ns.ip(&["-o", "link", "show", INTERFACE])?;
        Ok(out.split(':').next().unwrap_or_default().to_owned())
    }
}

/// One peer of a device, as `wg show dump` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRow {
    pub endpoint: String,
    /// Seconds since the epoch; 0 before the first handshake.
    pub handshake: u64,
}

/// Removes terminal colour sequences (`ESC [ ... m`).
pub fn strip_ansi(s: &str) -> String {
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

pub fn all_logs(nodes: &[VmNode]) -> String {
    nodes
        .iter()
        .map(|n| n.log_tail(40))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until `check` holds, polling every 300 ms, or fails after `timeout` with `context`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
    context: impl Fn() -> String,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check().unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}\n{}", context());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}
