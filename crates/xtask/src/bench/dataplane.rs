//! `cargo xtask bench dataplane`: two network namespaces joined by a veth pair; in one run,
//! interleaved rounds measure, over (a) the raw veth, (b) our userspace device (a release build
//! of `wgmesh-agent userspace-device`, with its default worker policy and again with 2 crypto
//! workers that take every batch), (c) Debian's wireguard-go and (d) upstream wireguard-go
//! built from the Go module proxy:
//! - iperf3 TCP throughput, one stream;
//! - TCP request/response latency (1-byte ping-pong, p50 and p99);
//! - CPU seconds of both device processes per GB of payload during the iperf3 run;
//!
//! and, once per round, the crypto floor: CPU seconds per GB of payload for one seal and one
//! open of every 1420-byte packet with the AEAD our device uses, on one core (a release build
//! of `wgmesh-crypto-floor`), to which each device's CPU s/GB is compared.
//!
//! Every WireGuard flavour is started fresh for each measurement with its own interface names
//! (the UAPI socket directory is shared by all namespaces) and configured the same way, with
//! `wg set` through its UAPI socket. Before each measurement we wait, up to a cap, for the
//! machine to be idle. Everything stays inside the two namespaces the benchmark creates.

use super::procfs::{clock_ticks, cpu_jiffies, cpu_seconds, is_root};
use super::stats::{median, percentile};
use std::collections::BTreeMap;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use wgmesh_crypto_floor::{self as crypto_floor, Floor};
use wgmesh_e2e::netns::{Netns, echo_server, sh, sh_with_input, veth_between};
use wgmesh_e2e::process::ChildGuard;
use wgmesh_e2e::{tools, versions};

use crate::setup::{ensure_debian_packages, repo_root, run_ok, step};

#[derive(clap::Args)]
pub struct Args {
    /// Interleaved rounds; each measures every path once (medians are over rounds).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of each iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Timed 1-byte round trips per latency measurement (after a warm-up).
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Longest wait, in seconds, for an idle machine before each measurement.
    #[arg(long, default_value_t = 60)]
    max_idle_wait: u64,
    /// Leave out upstream wireguard-go (it is built from the Go module proxy on first use).
    #[arg(long)]
    no_upstream: bool,
}

const NS_A: &str = "wgmbench-a";
const NS_B: &str = "wgmbench-b";
const VETH_A: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const VETH_B: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
const TUNNEL_A: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const TUNNEL_B: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const MTU: &str = "1420";
const IPERF_PORT: u16 = 5201;
const PING_PORT: u16 = 5301;
const WARMUP_ROUND_TRIPS: usize = 200;
/// Seal + open pairs of the crypto floor per round (well under a second of one core).
const FLOOR_PACKETS: usize = 300_000;
/// Fraction of all cores' time that must be idle over one second before we measure.
const IDLE_TARGET: f64 = 0.90;
const UAPI_DIR: &str = "/var/run/wireguard";

/// How a WireGuard flavour's device process is started (one per namespace).
enum Launcher {
    /// `wgmesh-agent userspace-device --interface NAME --workers WORKERS`.
    Wgmesh {
        agent: PathBuf,
        workers: &'static str,
    },
    /// `wireguard-go -f NAME`.
    WireguardGo(PathBuf),
}

/// One thing we measure: the raw veth, or a WireGuard flavour over it.
struct Flavour {
    /// Prefix of its JSON fields.
    key: &'static str,
    label: String,
    /// `None` for the raw veth.
    device: Option<Device>,
}

struct Device {
    launcher: Launcher,
    /// Interface names are `<prefix>-a` and `<prefix>-b`.
    prefix: &'static str,
    /// Listen ports: `port` in A, `port + 1` in B.
    port: u16,
}

/// One measurement of one flavour.
#[derive(Default)]
struct Sample {
    round: usize,
    idle_fraction: f64,
    idle_wait_s: f64,
    gbps: f64,
    bytes: u64,
    retransmits: u64,
    latency_p50_us: f64,
    latency_p99_us: f64,
    /// utime + stime of both device processes during the iperf3 run.
    cpu_s: Option<f64>,
    cpu_s_per_gb: Option<f64>,
}

/// One measurement of the crypto floor.
struct FloorSample {
    round: usize,
    idle_fraction: f64,
    idle_wait_s: f64,
    floor: Floor,
}

pub fn run(args: Args) -> Result<()> {
    if args.rounds == 0 || args.seconds == 0 || args.round_trips == 0 {
        bail!("--rounds, --seconds and --round-trips must be at least 1");
    }
    if !is_root() {
        bail!("the data plane benchmark creates network namespaces: run it as root");
    }
    step("checking tools: iperf3, wg, Debian's wireguard-go");
    ensure_debian_packages(&["iproute2", "iperf3", "wireguard-tools", "wireguard-go"])?;
    let debian_wggo = PathBuf::from("/usr/bin/wireguard-go");
    if !debian_wggo.is_file() {
        bail!(
            "{} is missing (Debian package wireguard-go)",
            debian_wggo.display()
        );
    }

    step("building the node agent and the crypto floor (release)");
    run_ok(Command::new(env!("CARGO")).current_dir(repo_root()).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "wgmesh-node-agent",
        "-p",
        "wgmesh-crypto-floor",
    ]))?;
    // Where that build went: CARGO_TARGET_DIR when set (a shared build cache), else target/.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let agent = target_dir.join("release/wgmesh-agent");
    let floor_bin = target_dir.join("release/wgmesh-crypto-floor");

    let upstream = if args.no_upstream {
        eprintln!("    --no-upstream: leaving out upstream wireguard-go");
        None
    } else {
        step(&format!(
            "finding upstream wireguard-go {} (built from the Go module proxy on first use)",
            versions::WIREGUARD_GO
        ));
        match tools::cached_tool(&tools::WIREGUARD_GO) {
            Ok(path) => Some(path),
            Err(e) => {
                eprintln!("    SKIPPING upstream wireguard-go: {e:#}");
                None
            }
        }
    };

    let mut program_versions = BTreeMap::new();
    program_versions.insert("wireguard_go", program_version(&debian_wggo));
    if let Some(path) = &upstream {
        program_versions.insert("wireguard_go_upstream", program_version(path));
    }
    program_versions.insert("iperf3", program_version(Path::new("iperf3")));

    let mut flavours = vec![
        Flavour {
            key: "veth",
            label: "raw veth".into(),
            device: None,
        },
        Flavour {
            key: "wgmesh",
            label: "wgmesh userspace".into(),
            device: Some(Device {
                launcher: Launcher::Wgmesh {
                    agent: agent.clone(),
                    workers: "auto",
                },
                prefix: "wgbm",
                port: 51910,
            }),
        },
        // The same device made to hand every batch to its crypto workers, which the default
        // only does while a core is idle: what the pipeline costs or gains on this machine.
        Flavour {
            key: "wgmesh_workers",
            label: "wgmesh userspace, 2 workers".into(),
            device: Some(Device {
                launcher: Launcher::Wgmesh {
                    agent,
                    workers: "2",
                },
                prefix: "wgbw",
                port: 51940,
            }),
        },
        Flavour {
            key: "wireguard_go",
            label: format!("wireguard-go {} (Debian)", program_versions["wireguard_go"]),
            device: Some(Device {
                launcher: Launcher::WireguardGo(debian_wggo),
                prefix: "wgbd",
                port: 51920,
            }),
        },
    ];
    if let Some(path) = upstream {
        flavours.push(Flavour {
            key: "wireguard_go_upstream",
            label: format!(
                "wireguard-go {} (upstream)",
                program_versions["wireguard_go_upstream"]
            ),
            device: Some(Device {
                launcher: Launcher::WireguardGo(path),
                prefix: "wgbu",
                port: 51930,
            }),
        });
    }

    let work = repo_root().join("target/bench/dataplane");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    step(&format!(
        "creating namespaces {NS_A} and {NS_B} joined by a veth pair"
    ));
    // Declared first, so dropped last: device processes stop before the namespaces go.
    let ns_a = Netns::create(NS_A)?;
    let ns_b = Netns::create(NS_B)?;
    veth_between(
        &ns_a,
        "wgmb-va",
        &format!("{VETH_A}/24"),
        &ns_b,
        "wgmb-vb",
        &format!("{VETH_B}/24"),
    )?;
    let tck = clock_ticks();

    let mut samples: Vec<Vec<Sample>> = flavours.iter().map(|_| Vec::new()).collect();
    let mut floors: Vec<FloorSample> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let n = flavours.len();
    for round in 0..args.rounds {
        step(&format!("round {}/{}", round + 1, args.rounds));
        // Rotate the order so no flavour always runs first (or right after another).
        for i in 0..n {
            let idx = (i + round) % n;
            let f = &flavours[idx];
            match measure(&args, f, round, &ns_a, &ns_b, &work, tck) {
                Ok(s) => {
                    eprintln!(
                        "    {:<40} {:>6.2} Gbit/s  {:>7} retr  p50 {:>5.0} us  p99 {:>5.0} us  {}  (idle {:.0}%)",
                        f.label,
                        s.gbps,
                        s.retransmits,
                        s.latency_p50_us,
                        s.latency_p99_us,
                        s.cpu_s_per_gb
                            .map(|c| format!("{c:.2} CPU s/GB"))
                            .unwrap_or_default(),
                        s.idle_fraction * 100.0
                    );
                    samples[idx].push(s);
                }
                Err(e) => {
                    let msg = format!("round {}, {}: {e:#}", round + 1, f.label);
                    eprintln!("    FAILED {msg}");
                    failures.push(msg);
                }
            }
        }
        match measure_floor(&args, &floor_bin, round) {
            Ok(s) => {
                eprintln!(
                    "    {:<40} {:>6.0} ns per 1420-byte seal + open  {:.2} CPU s/GB  (idle {:.0}%)",
                    "crypto floor (1 core)",
                    s.floor.ns_per_packet(),
                    s.floor.cpu_s_per_gb(),
                    s.idle_fraction * 100.0
                );
                floors.push(s);
            }
            Err(e) => {
                let msg = format!("round {}, crypto floor: {e:#}", round + 1);
                eprintln!("    FAILED {msg}");
                failures.push(msg);
            }
        }
    }
    drop(ns_b);
    drop(ns_a);

    let report = report(
        &args,
        &flavours,
        &samples,
        &floors,
        &program_versions,
        &failures,
    );
    print_table(&args, &flavours, &samples, &floors, &report);
    let dir = repo_root().join("target/bench");
    fs::create_dir_all(&dir)?;
    let path = dir.join("dataplane.json");
    fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!(
        "\nwrote {} (device logs in {})",
        path.display(),
        work.display()
    );
    if !failures.is_empty() {
        bail!(
            "{} measurement(s) failed:\n  {}",
            failures.len(),
            failures.join("\n  ")
        );
    }
    Ok(())
}

/// One measurement: start the flavour's devices (if any), wait until the far end answers and
/// the machine is idle, then latency, then throughput with the devices' CPU time.
fn measure(
    args: &Args,
    f: &Flavour,
    round: usize,
    ns_a: &Netns,
    ns_b: &Netns,
    work: &Path,
    tck: f64,
) -> Result<Sample> {
    let (mut tunnel, server) = match &f.device {
        Some(d) => (Some(Tunnel::start(d, ns_a, ns_b, work)?), TUNNEL_B),
        None => (None, VETH_B),
    };
    wait_reachable(ns_a, server).with_context(|| match &tunnel {
        Some(t) => format!(
            "no TCP through the tunnel; device logs:\n{}\n{}",
            t.a.log_tail(10),
            t.b.log_tail(10)
        ),
        None => "no TCP over the veth".into(),
    })?;
    let (idle_fraction, idle_wait_s) = wait_idle(Duration::from_secs(args.max_idle_wait))?;
    let (latency_p50_us, latency_p99_us) = latency(ns_a, ns_b, server, args.round_trips)?;
    let pids: Vec<u32> = tunnel
        .iter()
        .flat_map(|t| [t.a.pid(), t.b.pid()])
        .flatten()
        .collect();
    let cpu_before = cpu_seconds(&pids, tck)?;
    let result = iperf(ns_a, ns_b, server, args.seconds, work)?;
    let cpu_after = cpu_seconds(&pids, tck)?;
    if let Some(t) = tunnel.as_mut() {
        t.check_running()?;
    }
    drop(tunnel);
    let cpu_s = (!pids.is_empty()).then_some(cpu_after - cpu_before);
    let gb = result.bytes as f64 / 1e9;
    Ok(Sample {
        round: round + 1,
        idle_fraction,
        idle_wait_s,
        gbps: result.bits_per_second / 1e9,
        bytes: result.bytes,
        retransmits: result.retransmits,
        latency_p50_us,
        latency_p99_us,
        cpu_s,
        cpu_s_per_gb: cpu_s.filter(|_| gb > 0.0).map(|c| c / gb),
    })
}

/// The crypto floor (the release binary, one thread), once the machine is idle like before
/// every other measurement.
fn measure_floor(args: &Args, floor_bin: &Path, round: usize) -> Result<FloorSample> {
    let (idle_fraction, idle_wait_s) = wait_idle(Duration::from_secs(args.max_idle_wait))?;
    let mut cmd = Command::new(floor_bin);
    cmd.arg(FLOOR_PACKETS.to_string());
    let (ok, stdout, stderr) = output_with_timeout(cmd, Duration::from_secs(60))?;
    if !ok {
        bail!("{} failed: {}", floor_bin.display(), stderr.trim());
    }
    Ok(FloorSample {
        round: round + 1,
        idle_fraction,
        idle_wait_s,
        floor: parse_floor(&stdout)?,
    })
}

/// `{"packets": N, "cpu_s": S}` as `wgmesh-crypto-floor` prints it.
fn parse_floor(stdout: &str) -> Result<Floor> {
    let v: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("the crypto floor printed no JSON: {stdout}"))?;
    let floor = Floor {
        packets: v["packets"].as_u64().context("no packets")? as usize,
        cpu_s: v["cpu_s"].as_f64().context("no cpu_s")?,
    };
    if floor.packets == 0 || floor.cpu_s <= 0.0 {
        bail!("the crypto floor measured nothing: {stdout}");
    }
    Ok(floor)
}

/// The two device processes of a WireGuard flavour; dropping it stops them (by PID).
struct Tunnel {
    a: ChildGuard,
    b: ChildGuard,
}

impl Tunnel {
    fn start(d: &Device, ns_a: &Netns, ns_b: &Netns, work: &Path) -> Result<Tunnel> {
        let if_a = format!("{}-a", d.prefix);
        let if_b = format!("{}-b", d.prefix);
        let a = start_device(&d.launcher, ns_a, &if_a, work)?;
        let b = start_device(&d.launcher, ns_b, &if_b, work)?;
        let tunnel = Tunnel { a, b };
        let key_a = Key::generate(work, &if_a)?;
        let key_b = Key::generate(work, &if_b)?;
        let (port_a, port_b) = (d.port.to_string(), (d.port + 1).to_string());
        configure(
            ns_a,
            &if_a,
            &key_a,
            &port_a,
            &key_b.public,
            &format!("{VETH_B}:{port_b}"),
            TUNNEL_B,
            TUNNEL_A,
        )?;
        configure(
            ns_b,
            &if_b,
            &key_b,
            &port_b,
            &key_a.public,
            &format!("{VETH_A}:{port_a}"),
            TUNNEL_A,
            TUNNEL_B,
        )?;
        Ok(tunnel)
    }

    fn check_running(&mut self) -> Result<()> {
        for d in [&mut self.a, &mut self.b] {
            if !d.is_running() {
                bail!("{} exited; its log:\n{}", d.name(), d.log_tail(20));
            }
        }
        Ok(())
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for d in [&mut self.a, &mut self.b] {
            d.stop(Duration::from_secs(5));
            // Gone already unless the device had to be killed (the guard's name is the
            // interface's).
            let _ = fs::remove_file(uapi_socket(d.name()));
        }
    }
}

fn uapi_socket(interface: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{interface}.sock"))
}

/// Starts one device process inside `ns` and waits for its UAPI socket.
fn start_device(
    launcher: &Launcher,
    ns: &Netns,
    interface: &str,
    work: &Path,
) -> Result<ChildGuard> {
    // Names are the benchmark's own; a socket left by a killed earlier run would confuse us.
    let socket = uapi_socket(interface);
    let _ = fs::remove_file(&socket);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name]);
    match launcher {
        Launcher::Wgmesh { agent, workers } => {
            cmd.arg(agent)
                .args(["userspace-device", "--interface", interface])
                .args(["--workers", workers])
                .env("WGMESH_LOG", "warn");
        }
        Launcher::WireguardGo(program) => {
            cmd.arg(program)
                .args(["-f", interface])
                .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
        }
    }
    // `ip netns exec` execs the program: the child's PID is the device's.
    let mut child = ChildGuard::spawn(interface, cmd, &work.join(format!("{interface}.log")))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if !child.is_running() {
            bail!(
                "{interface} exited at start; its log:\n{}",
                child.log_tail(20)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{interface}: no UAPI socket {} after 10 s; its log:\n{}",
                socket.display(),
                child.log_tail(20)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

/// A throwaway key pair; the private key is in a file only until `configure` has used it.
struct Key {
    file: PathBuf,
    public: String,
}

impl Key {
    fn generate(work: &Path, name: &str) -> Result<Key> {
        let private = sh("wg", &["genkey"])?;
        let mut pubkey = Command::new("wg");
        pubkey.arg("pubkey");
        let public = sh_with_input(pubkey, private.as_bytes())?.trim().to_owned();
        let file = work.join(format!("{name}.key"));
        fs::write(&file, private.trim())?;
        Ok(Key { file, public })
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.file);
    }
}

/// `wg set` through the UAPI socket (identical for every flavour), then the tunnel address,
/// MTU and link state with `ip`.
#[allow(clippy::too_many_arguments)]
fn configure(
    ns: &Netns,
    interface: &str,
    key: &Key,
    port: &str,
    peer: &str,
    endpoint: &str,
    peer_address: Ipv4Addr,
    address: Ipv4Addr,
) -> Result<()> {
    let key_file = key.file.to_string_lossy();
    ns.exec(
        "wg",
        &[
            "set",
            interface,
            "private-key",
            &key_file,
            "listen-port",
            port,
            "peer",
            peer,
            "endpoint",
            endpoint,
            "allowed-ips",
            &format!("{peer_address}/32"),
        ],
    )?;
    ns.ip(&["addr", "add", &format!("{address}/24"), "dev", interface])?;
    ns.ip(&["link", "set", interface, "mtu", MTU, "up"])?;
    Ok(())
}

/// Waits until a TCP connection attempt from A to `server` gets an answer (a refusal from a
/// closed port is one): the path works, and for WireGuard the handshake is done.
fn wait_reachable(ns_a: &Netns, server: Ipv4Addr) -> Result<()> {
    ns_a.run(move || {
        let addr = SocketAddr::from((server, 9));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    bail!("{addr} unreachable after 20 s: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    })
}

/// 1-byte TCP ping-pong from A to an echo server in B: p50 and p99 in microseconds.
fn latency(ns_a: &Netns, ns_b: &Netns, server: Ipv4Addr, round_trips: usize) -> Result<(f64, f64)> {
    let addr = SocketAddr::from((server, PING_PORT));
    let echo = echo_server(ns_b, addr, 1)?;
    let samples = ns_a.run(move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut byte = [0u8; 1];
        let mut samples = Vec::with_capacity(round_trips);
        for i in 0..WARMUP_ROUND_TRIPS + round_trips {
            let t0 = Instant::now();
            stream.write_all(&[i as u8])?;
            stream.read_exact(&mut byte)?;
            if i >= WARMUP_ROUND_TRIPS {
                samples.push(t0.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(samples)
    })?;
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo server panicked"))?;
    Ok((percentile(&samples, 50.0), percentile(&samples, 99.0)))
}

struct IperfResult {
    bits_per_second: f64,
    bytes: u64,
    retransmits: u64,
}

/// `iperf3 -s -1` in B, `iperf3 -c -J` from A.
fn iperf(
    ns_a: &Netns,
    ns_b: &Netns,
    server: Ipv4Addr,
    seconds: u64,
    work: &Path,
) -> Result<IperfResult> {
    let port = IPERF_PORT.to_string();
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns", "exec", &ns_b.name, "iperf3", "-s", "-1", "-p", &port,
    ]);
    let mut srv = ChildGuard::spawn("iperf3 server", cmd, &work.join("iperf3-server.log"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listening = ns_b.exec("ss", &["-Hltn", &format!("sport = :{port}")])?;
        if !listening.trim().is_empty() {
            break;
        }
        if !srv.is_running() || Instant::now() > deadline {
            bail!("the iperf3 server did not start: {}", srv.log_tail(5));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut client = Command::new("ip");
    client.args(["netns", "exec", &ns_a.name, "iperf3", "-c"]);
    client.arg(server.to_string()).args([
        "-p",
        &port,
        "-t",
        &seconds.to_string(),
        "-J",
        "--connect-timeout",
        "5000",
    ]);
    let (ok, stdout, stderr) = output_with_timeout(client, Duration::from_secs(seconds + 30))?;
    let json: Value = serde_json::from_str(&stdout)
        .with_context(|| format!("iperf3 printed no JSON: {stdout} {stderr}"))?;
    if !ok || json.get("error").is_some() {
        bail!(
            "iperf3 failed: {} {}",
            json.get("error").unwrap_or(&Value::Null),
            stderr.trim()
        );
    }
    srv.stop(Duration::from_secs(2));
    let end = &json["end"];
    Ok(IperfResult {
        bits_per_second: end["sum_received"]["bits_per_second"]
            .as_f64()
            .context("no end.sum_received.bits_per_second")?,
        bytes: end["sum_received"]["bytes"].as_u64().unwrap_or(0),
        retransmits: end["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
    })
}

/// Runs `cmd`, killing it after `timeout`: (success, stdout, stderr).
fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Result<(bool, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut err = child.stderr.take().context("stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{:?} did not finish in {timeout:?}", cmd.get_program());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    Ok((status.success(), stdout, stderr))
}

/// Waits until the machine was at least `IDLE_TARGET` idle over one second, at most `max`:
/// (the last idle fraction, seconds waited).
fn wait_idle(max: Duration) -> Result<(f64, f64)> {
    let start = Instant::now();
    let mut said = false;
    loop {
        let (i0, t0) = cpu_jiffies()?;
        std::thread::sleep(Duration::from_secs(1));
        let (i1, t1) = cpu_jiffies()?;
        let idle = (i1 - i0) as f64 / (t1 - t0).max(1) as f64;
        let waited = start.elapsed();
        if idle >= IDLE_TARGET {
            return Ok((idle, waited.as_secs_f64()));
        }
        if waited >= max {
            eprintln!(
                "    the machine is still busy ({:.0}% idle) after {:.0} s; measuring anyway",
                idle * 100.0,
                waited.as_secs_f64()
            );
            return Ok((idle, waited.as_secs_f64()));
        }
        if !said {
            eprintln!(
                "    waiting for an idle machine ({:.0}% idle, want {:.0}%)",
                idle * 100.0,
                IDLE_TARGET * 100.0
            );
            said = true;
        }
    }
}

fn program_version(program: &Path) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().map(|l| {
                l.split_whitespace()
                    .find(|w| w.starts_with('v') || w.starts_with(|c: char| c.is_ascii_digit()))
                    .unwrap_or(l)
                    .to_owned()
            })
        })
        .unwrap_or_else(|| "unknown".into())
}

fn report(
    args: &Args,
    flavours: &[Flavour],
    samples: &[Vec<Sample>],
    floors: &[FloorSample],
    program_versions: &BTreeMap<&str, String>,
    failures: &[String],
) -> Value {
    let mut r = serde_json::Map::new();
    r.insert("rounds".into(), json!(args.rounds));
    r.insert("seconds".into(), json!(args.seconds));
    r.insert("round_trips".into(), json!(args.round_trips));
    r.insert("idle_target".into(), json!(IDLE_TARGET));
    r.insert(
        "cores".into(),
        json!(std::thread::available_parallelism().map_or(0, |n| n.get())),
    );
    r.insert("versions".into(), json!(program_versions));
    r.insert(
        "wireguard_go_upstream_module".into(),
        json!(format!(
            "golang.zx2c4.com/wireguard@v{}",
            versions::WIREGUARD_GO
        )),
    );
    let floor = floor_median(floors);
    r.insert("crypto_floor_aead".into(), json!(crypto_floor::AEAD));
    r.insert(
        "crypto_floor_packet_bytes".into(),
        json!(crypto_floor::PACKET),
    );
    r.insert(
        "crypto_floor_payload_bytes_per_packet".into(),
        json!(crypto_floor::TCP_PAYLOAD),
    );
    r.insert("crypto_floor_packets".into(), json!(FLOOR_PACKETS));
    r.insert(
        "crypto_floor_cpu_s_per_gb".into(),
        json!(floor.map(|f| f.cpu_s_per_gb)),
    );
    r.insert(
        "crypto_floor_ns_per_packet".into(),
        json!(floor.map(|f| f.ns_per_packet)),
    );
    let medians = medians(samples);
    for key in [
        "veth",
        "wgmesh",
        "wgmesh_workers",
        "wireguard_go",
        "wireguard_go_upstream",
    ] {
        let m = flavours
            .iter()
            .position(|f| f.key == key)
            .and_then(|i| medians[i].as_ref());
        r.insert(format!("{key}_gbps"), json!(m.map(|m| m.gbps)));
        r.insert(
            format!("{key}_latency_p50_us"),
            json!(m.map(|m| m.latency_p50_us)),
        );
        r.insert(
            format!("{key}_latency_p99_us"),
            json!(m.map(|m| m.latency_p99_us)),
        );
        r.insert(
            format!("{key}_retransmits"),
            json!(m.map(|m| m.retransmits)),
        );
        if key != "veth" {
            let cpu = m.and_then(|m| m.cpu_s_per_gb);
            r.insert(format!("{key}_cpu_s_per_gb"), json!(cpu));
            r.insert(
                format!("{key}_cpu_vs_floor"),
                json!(vs_floor(cpu, floor.map(|f| f.cpu_s_per_gb))),
            );
        }
    }
    let ratio = |a: &str, b: &str| -> Value {
        match (r[a].as_f64(), r[b].as_f64()) {
            (Some(x), Some(y)) if y > 0.0 => json!(x / y),
            _ => Value::Null,
        }
    };
    let ratios = [
        (
            "ratio_vs_wireguard_go",
            ratio("wgmesh_gbps", "wireguard_go_gbps"),
        ),
        (
            "ratio_vs_wireguard_go_upstream",
            ratio("wgmesh_gbps", "wireguard_go_upstream_gbps"),
        ),
        ("ratio_vs_veth", ratio("wgmesh_gbps", "veth_gbps")),
    ];
    for (k, v) in ratios {
        r.insert(k.into(), v);
    }
    let mut raw = serde_json::Map::new();
    for (f, s) in flavours.iter().zip(samples) {
        let rows: Vec<Value> = s
            .iter()
            .map(|s| {
                json!({
                    "round": s.round,
                    "gbps": s.gbps,
                    "bytes": s.bytes,
                    "retransmits": s.retransmits,
                    "latency_p50_us": s.latency_p50_us,
                    "latency_p99_us": s.latency_p99_us,
                    "cpu_s": s.cpu_s,
                    "cpu_s_per_gb": s.cpu_s_per_gb,
                    "idle_fraction_before": s.idle_fraction,
                    "idle_wait_s": s.idle_wait_s,
                })
            })
            .collect();
        raw.insert(f.key.into(), json!({"label": f.label, "rounds": rows}));
    }
    let floor_rows: Vec<Value> = floors
        .iter()
        .map(|s| {
            json!({
                "round": s.round,
                "packets": s.floor.packets,
                "cpu_s": s.floor.cpu_s,
                "ns_per_packet": s.floor.ns_per_packet(),
                "cpu_s_per_gb": s.floor.cpu_s_per_gb(),
                "idle_fraction_before": s.idle_fraction,
                "idle_wait_s": s.idle_wait_s,
            })
        })
        .collect();
    raw.insert(
        "crypto_floor".into(),
        json!({"label": crypto_floor::AEAD, "rounds": floor_rows}),
    );
    r.insert("raw".into(), Value::Object(raw));
    r.insert("failures".into(), json!(failures));
    Value::Object(r)
}

/// Medians over rounds of the crypto floor.
#[derive(Clone, Copy)]
struct FloorMedian {
    cpu_s_per_gb: f64,
    ns_per_packet: f64,
}

fn floor_median(floors: &[FloorSample]) -> Option<FloorMedian> {
    if floors.is_empty() {
        return None;
    }
    let of = |f: fn(&Floor) -> f64| median(&floors.iter().map(|s| f(&s.floor)).collect::<Vec<_>>());
    Some(FloorMedian {
        cpu_s_per_gb: of(Floor::cpu_s_per_gb),
        ns_per_packet: of(Floor::ns_per_packet),
    })
}

/// A device's CPU s/GB as a multiple of the crypto floor's.
fn vs_floor(cpu_s_per_gb: Option<f64>, floor: Option<f64>) -> Option<f64> {
    match (cpu_s_per_gb, floor) {
        (Some(c), Some(f)) if f > 0.0 => Some(c / f),
        _ => None,
    }
}

/// Per-flavour medians over rounds (of throughput, per-round latency percentiles, CPU).
fn medians(samples: &[Vec<Sample>]) -> Vec<Option<Sample>> {
    samples
        .iter()
        .map(|s| {
            if s.is_empty() {
                return None;
            }
            let of = |f: fn(&Sample) -> f64| median(&s.iter().map(f).collect::<Vec<_>>());
            let cpu: Vec<f64> = s.iter().filter_map(|s| s.cpu_s_per_gb).collect();
            Some(Sample {
                gbps: of(|s| s.gbps),
                retransmits: of(|s| s.retransmits as f64) as u64,
                latency_p50_us: of(|s| s.latency_p50_us),
                latency_p99_us: of(|s| s.latency_p99_us),
                cpu_s_per_gb: (!cpu.is_empty()).then(|| median(&cpu)),
                ..Sample::default()
            })
        })
        .collect()
}

fn print_table(
    args: &Args,
    flavours: &[Flavour],
    samples: &[Vec<Sample>],
    floors: &[FloorSample],
    report: &Value,
) {
    let medians = medians(samples);
    let floor = floor_median(floors);
    println!();
    println!(
        "data plane benchmark ({} rounds, iperf3 -t {}, {} round trips; medians over rounds)",
        args.rounds, args.seconds, args.round_trips
    );
    println!(
        "| path | Gbit/s | per round | retransmits | latency p50 | latency p99 | CPU s/GB (both ends) | CPU vs floor |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for ((f, s), m) in flavours.iter().zip(samples).zip(&medians) {
        let Some(m) = m else {
            println!("| {} | failed | | | | | | |", f.label);
            continue;
        };
        let per_round: Vec<String> = s.iter().map(|s| format!("{:.2}", s.gbps)).collect();
        println!(
            "| {} | {:.2} | {} | {} | {:.0} us | {:.0} us | {} | {} |",
            f.label,
            m.gbps,
            per_round.join(" / "),
            m.retransmits,
            m.latency_p50_us,
            m.latency_p99_us,
            m.cpu_s_per_gb
                .map(|c| format!("{c:.2}"))
                .unwrap_or_else(|| "-".into()),
            vs_floor(m.cpu_s_per_gb, floor.map(|f| f.cpu_s_per_gb))
                .map(|r| format!("{r:.2}x"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    match floor {
        Some(fl) => println!(
            "| crypto floor: ChaCha20-Poly1305 seal + open, 1 core | | | | | | {:.2} | 1.00x |",
            fl.cpu_s_per_gb
        ),
        None => println!("| crypto floor | failed | | | | | | |"),
    }
    if let Some(fl) = floor {
        let per_round: Vec<String> = floors
            .iter()
            .map(|s| format!("{:.2}", s.floor.cpu_s_per_gb()))
            .collect();
        println!(
            "\ncrypto floor ({}): {:.0} ns per seal + open of a {}-byte packet ({} payload bytes), \
             {} CPU s/GB per round",
            crypto_floor::AEAD,
            fl.ns_per_packet,
            crypto_floor::PACKET,
            crypto_floor::TCP_PAYLOAD,
            per_round.join(" / ")
        );
    }
    let show = |k: &str| {
        report[k]
            .as_f64()
            .map(|v| format!("{v:.2}"))
            .unwrap_or_else(|| "n/a".into())
    };
    println!();
    println!(
        "wgmesh / wireguard-go (Debian): {}   wgmesh / wireguard-go (upstream): {}   wgmesh / veth: {}",
        show("ratio_vs_wireguard_go"),
        show("ratio_vs_wireguard_go_upstream"),
        show("ratio_vs_veth")
    );
    let mut busy: Vec<String> = flavours
        .iter()
        .zip(samples)
        .flat_map(|(f, s)| {
            s.iter()
                .filter(|s| s.idle_fraction < IDLE_TARGET)
                .map(move |s| {
                    format!(
                        "round {} {} ({:.0}% idle)",
                        s.round,
                        f.label,
                        s.idle_fraction * 100.0
                    )
                })
        })
        .collect();
    busy.extend(
        floors
            .iter()
            .filter(|s| s.idle_fraction < IDLE_TARGET)
            .map(|s| {
                format!(
                    "round {} crypto floor ({:.0}% idle)",
                    s.round,
                    s.idle_fraction * 100.0
                )
            }),
    );
    if !busy.is_empty() {
        println!("measured on a busy machine: {}", busy.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: usize, cpu_s_per_gb: Option<f64>) -> Sample {
        Sample {
            round,
            idle_fraction: 1.0,
            gbps: 1.0,
            cpu_s_per_gb,
            ..Sample::default()
        }
    }

    fn floor(round: usize, cpu_s: f64) -> FloorSample {
        FloorSample {
            round,
            idle_fraction: 1.0,
            idle_wait_s: 0.0,
            floor: Floor {
                packets: 1_000_000_000 / crypto_floor::TCP_PAYLOAD,
                cpu_s,
            },
        }
    }

    #[test]
    fn parses_the_floor_binary_output() {
        let f = parse_floor("{\"packets\": 300000, \"cpu_s\": 0.4902}\n").unwrap();
        assert_eq!(f.packets, 300_000);
        assert!((f.cpu_s - 0.4902).abs() < 1e-9);
        assert!(parse_floor("{\"packets\": 0, \"cpu_s\": 1.0}").is_err());
        assert!(parse_floor("{\"packets\": 5, \"cpu_s\": 0}").is_err());
        assert!(parse_floor("boom").is_err());
    }

    #[test]
    fn the_report_compares_every_device_with_the_median_floor() {
        let args = Args {
            rounds: 3,
            seconds: 1,
            round_trips: 1,
            max_idle_wait: 0,
            no_upstream: true,
        };
        let flavours = ["veth", "wgmesh"].map(|key| Flavour {
            key,
            label: key.into(),
            device: None,
        });
        let samples = vec![
            (1..=3).map(|r| sample(r, None)).collect(),
            vec![
                sample(1, Some(4.0)),
                sample(2, Some(3.0)),
                sample(3, Some(5.0)),
            ],
        ];
        let floors = [floor(1, 2.0), floor(2, 1.0), floor(3, 9.0)];
        let r = report(&args, &flavours, &samples, &floors, &BTreeMap::new(), &[]);
        let near = |k: &str, v: f64| {
            let got = r[k].as_f64().unwrap_or_else(|| panic!("{k}: {}", r[k]));
            assert!((got - v).abs() < 1e-3, "{k}: {got} != {v}");
        };
        near("crypto_floor_cpu_s_per_gb", 2.0);
        near("wgmesh_cpu_s_per_gb", 4.0);
        near("wgmesh_cpu_vs_floor", 2.0);
        assert!(r.get("veth_cpu_vs_floor").is_none());
        assert!(r["wireguard_go_cpu_vs_floor"].is_null());
        assert_eq!(
            r["raw"]["crypto_floor"]["rounds"].as_array().unwrap().len(),
            3
        );
        // No floor measured: no ratios, not a division by zero.
        let r = report(&args, &flavours, &samples, &[], &BTreeMap::new(), &[]);
        assert!(r["crypto_floor_cpu_s_per_gb"].is_null());
        assert!(r["wgmesh_cpu_vs_floor"].is_null());
    }
}
