//! `cargo xtask bench agent`: what a node's agent spends on a mesh of N peers, in a network
//! namespace (root).
//!
//! - Programming N peers: `wg setconf` of one config with N peers into our userspace device
//!   and into Debian's wireguard-go, side by side (the same tool and file, rounds
//!   interleaved), and the agent's own path (one `apply` of N upserts, no UAPI).
//! - One changed peer among N: `wg set` for both devices, and one `apply` for ours.
//! - Routing: one reconciliation at N peers (a node joining: a route is added, its guard
//!   too), the repair tick (nothing to change), and one dump of the routing table for scale.
//!
//! Medians over `--rounds`; writes `target/bench/agent.json`.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use serde_json::json;
use wgmesh_agent::routing::{Routing, RoutingConfig};
use wgmesh_core::{Cidr, PrivateKey};
use wgmesh_device::userspace::UserspaceDevice;
use wgmesh_device::{DeviceChange, InterfaceConfig, PeerConfig};
use wgmesh_e2e::netns::Netns;

use super::stats::median;
use crate::setup::{DEBIAN_PACKAGES, ensure_debian_packages, repo_root, step};

/// Pod CIDRs are /24s in 10.64.0.0/10: room for this many peers.
const MAX_PEERS: usize = 16_384;

#[derive(clap::Args)]
pub struct Args {
    /// Peers in the mesh (at most 16,384).
    #[arg(long, default_value_t = 5000)]
    peers: usize,
    /// Rounds of each measurement; medians are over rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

pub fn run(args: Args) -> Result<()> {
    if args.rounds == 0 || args.peers == 0 || args.peers > MAX_PEERS {
        bail!("--rounds must be at least 1 and --peers between 1 and {MAX_PEERS}");
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the agent benchmark creates network namespaces: run it as root");
    }
    step("checking tools: wireguard-go, wireguard-tools, iproute2");
    ensure_debian_packages(DEBIAN_PACKAGES)?;
    let n = args.peers;
    let tag = std::process::id() % 10_000;
    let ns = Netns::create(&format!("wgbench-agent-{tag}"))?;
    let peers: Vec<PeerConfig> = (0..n).map(peer).collect();

    step(&format!(
        "programming {n} peers: wg setconf, ours against wireguard-go"
    ));
    let ours_name = format!("wgba{tag}u");
    let go_name = format!("wgba{tag}g");
    let ours = {
        let name = ours_name.clone();
        ns.run(move || {
            UserspaceDevice::create(InterfaceConfig {
                name,
                private_key: PrivateKey::generate(),
                listen_port: 0,
                fwmark: 0,
            })
            .context("creating our device")
        })?
    };
    let _go = WireguardGo::start(&ns, &go_name)?;
    let dir = tempfile::tempdir()?;
    let full = dir.path().join("full.conf");
    let empty = dir.path().join("empty.conf");
    std::fs::write(&full, setconf_file(&peers))?;
    std::fs::write(&empty, setconf_file(&[]))?;
    let (full, empty) = (full.display().to_string(), empty.display().to_string());
    let mut setconf = [Vec::new(), Vec::new()];
    let mut set_one = [Vec::new(), Vec::new()];
    let one = peers[n / 2].public_key.to_base64();
    for round in 0..args.rounds {
        // Interleaved, the order swapped every round: the machine's noise falls on both.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let name = [&ours_name, &go_name][which];
            ns.exec("wg", &["setconf", name, &empty])?;
            setconf[which].push(timed(|| ns.exec("wg", &["setconf", name, &full]))?);
            let keepalive = if round % 2 == 0 { "25" } else { "0" };
            set_one[which].push(timed(|| {
                ns.exec(
                    "wg",
                    &["set", name, "peer", &one, "persistent-keepalive", keepalive],
                )
            })?);
        }
    }
    let shown = ns.exec("wg", &["show", &ours_name, "peers"])?;
    if shown.lines().count() != n {
        bail!("our device holds {} peers, not {n}", shown.lines().count());
    }
    ns.exec("wg", &["setconf", &ours_name, &empty])?;

    step(&format!("programming {n} peers: the agent's apply"));
    let (apply_all, apply_one) = {
        let peers = peers.clone();
        let rounds = args.rounds;
        ns.run(move || -> Result<(Vec<f64>, Vec<f64>)> {
            let mut all = Vec::new();
            let mut one = Vec::new();
            let upserts: Vec<DeviceChange> = peers
                .iter()
                .cloned()
                .map(DeviceChange::UpsertPeer)
                .collect();
            let removals: Vec<DeviceChange> = peers
                .iter()
                .map(|p| DeviceChange::RemovePeer(p.public_key))
                .collect();
            for round in 0..rounds {
                all.push(timed(|| ours.apply(&upserts))?);
                let mut changed = peers[peers.len() / 2].clone();
                changed.persistent_keepalive = if round % 2 == 0 { 25 } else { 0 };
                one.push(timed(|| ours.apply(&[DeviceChange::UpsertPeer(changed)]))?);
                ours.apply(&removals)?;
            }
            ours.shutdown();
            Ok((all, one))
        })?
    };

    step(&format!(
        "routing at {n} peers: a join, the repair tick, one dump"
    ));
    ns.ip(&[
        "link", "add", "wgbr0", "type", "veth", "peer", "name", "wgbr0p",
    ])?;
    ns.ip(&["link", "set", "wgbr0p", "up"])?;
    let (join, repair, dump) = {
        let rounds = args.rounds;
        ns.run(move || -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(routing_rounds(n, rounds))
        })?
    };

    let ms = |v: &[f64]| median(v) * 1000.0;
    let rows = [
        ("wg setconf, N peers: ours", ms(&setconf[0])),
        (
            "wg setconf, N peers: wireguard-go (Debian)",
            ms(&setconf[1]),
        ),
        ("wg set, one peer: ours", ms(&set_one[0])),
        ("wg set, one peer: wireguard-go (Debian)", ms(&set_one[1])),
        ("agent apply, N peers", ms(&apply_all)),
        ("agent apply, one peer", ms(&apply_one)),
        ("routing: a node joins", ms(&join)),
        ("routing: the repair tick", ms(&repair)),
        ("routing: one dump of the routes", ms(&dump)),
    ];
    println!("\n{n} peers, medians of {} rounds:\n", args.rounds);
    println!("| measurement | ms |\n|---|---|");
    for (what, value) in &rows {
        println!("| {what} | {value:.1} |");
    }
    println!(
        "\nwg setconf: ours {:.2}x wireguard-go's time",
        ms(&setconf[0]) / ms(&setconf[1]).max(f64::MIN_POSITIVE)
    );
    let out = repo_root().join("target/bench/agent.json");
    std::fs::create_dir_all(out.parent().context("target/bench")?)?;
    let json = json!({
        "peers": n,
        "rounds": args.rounds,
        "ms": rows.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "runs_s": {
            "setconf_ours": setconf[0], "setconf_wireguard_go": setconf[1],
            "set_one_ours": set_one[0], "set_one_wireguard_go": set_one[1],
            "apply_all": apply_all, "apply_one": apply_one,
            "routing_join": join, "routing_repair": repair, "routing_dump": dump,
        },
    });
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Peer `i`: a /24 pod CIDR and a tunnel address, an endpoint on the underlay.
fn peer(i: usize) -> PeerConfig {
    let (hi, lo) = ((i >> 8) as u8, (i & 255) as u8);
    let [pod, tunnel] = peer_networks(i);
    PeerConfig {
        public_key: PrivateKey::generate().public_key(),
        endpoint: Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(192, 168, hi, lo)),
            51820,
        )),
        allowed_ips: vec![Cidr::from(pod), Cidr::from(tunnel)],
        persistent_keepalive: 0,
        preshared_key: None,
    }
}

/// A `wg setconf` file holding `peers` (and a key of its own each time).
fn setconf_file(peers: &[PeerConfig]) -> String {
    let key = PrivateKey::generate();
    let mut out = format!("[Interface]\nPrivateKey = {}\n", key.expose_base64());
    for p in peers {
        let ips: Vec<String> = p.allowed_ips.iter().map(ToString::to_string).collect();
        let _ = write!(
            out,
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {}\n",
            p.public_key.to_base64(),
            ips.join(", ")
        );
        if let Some(e) = p.endpoint {
            let _ = writeln!(out, "Endpoint = {e}");
        }
    }
    out
}

/// The routing work of a reconciliation as the agent does it (one snapshot for the underlay,
/// the sync and the MTU), alternating between N and N+1 peers so that each is a join or a
/// leave; then with nothing to change; then one dump.
async fn routing_rounds(n: usize, rounds: usize) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let routing = Routing::new().await?;
    let config = |peers: usize| {
        let mut routes: Vec<IpNet> = (0..peers).flat_map(peer_networks).collect();
        routes.sort();
        let mut guards = routes.clone();
        guards.push("100.64.0.0/10".parse().expect("a CIDR"));
        guards.push("10.64.0.0/10".parse().expect("a CIDR"));
        RoutingConfig {
            interface: "wgbr0".into(),
            addresses: vec!["100.127.255.254/10".parse().expect("a CIDR")],
            mtu: None,
            routes,
            table: 0,
            rules: vec![],
            guards,
            local: vec![],
        }
    };
    let (at_n, at_more) = (config(n), config(n + 1));
    routing.sync(&at_n).await?;
    let reconcile = |cfg: &RoutingConfig| {
        let routing = &routing;
        let cfg = cfg.clone();
        async move {
            let snapshot = routing.snapshot().await?;
            routing.underlay_addresses_in(&snapshot).await?;
            let changes = routing.sync_from(&cfg, &snapshot).await?;
            routing.underlay_mtu_in(&snapshot, None, None).await?;
            anyhow::Ok(changes)
        }
    };
    let (mut join, mut repair, mut dump) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let cfg = if round % 2 == 0 { &at_more } else { &at_n };
        let started = Instant::now();
        let changes = reconcile(cfg).await?;
        join.push(started.elapsed().as_secs_f64());
        if changes.routes_added + changes.routes_removed == 0 {
            bail!("round {round}: a join changed no route: {changes:?}");
        }
        let started = Instant::now();
        let changes = reconcile(cfg).await?;
        repair.push(started.elapsed().as_secs_f64());
        if !changes.is_empty() {
            bail!("round {round}: the repair tick changed {changes:?}");
        }
        let started = Instant::now();
        routing.snapshot().await?;
        dump.push(started.elapsed().as_secs_f64());
    }
    Ok((join, repair, dump))
}

/// Peer `i`'s networks: its pod CIDR (a /24 in 10.64.0.0/10) and its tunnel address (a /32
/// in 100.64.0.0/10).
fn peer_networks(i: usize) -> [IpNet; 2] {
    let (hi, lo) = ((i >> 8) as u8, (i & 255) as u8);
    let pod = IpNet::new(IpAddr::V4(Ipv4Addr::new(10, 64 + hi, lo, 0)), 24).expect("a /24");
    let tunnel = IpNet::from(IpAddr::V4(Ipv4Addr::new(100, 64 + hi, lo, 1)));
    [pod, tunnel]
}

/// Seconds `f` took; its error, if any.
fn timed<T, E: Into<anyhow::Error>>(f: impl FnOnce() -> Result<T, E>) -> Result<f64> {
    let started = Instant::now();
    f().map_err(Into::into)?;
    Ok(started.elapsed().as_secs_f64())
}

/// Debian's wireguard-go in the foreground inside the namespace, stopped on drop.
struct WireguardGo(Child);

impl WireguardGo {
    fn start(ns: &Netns, name: &str) -> Result<WireguardGo> {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "wireguard-go", "-f", name])
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting wireguard-go")?;
        let go = WireguardGo(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while ns.exec("wg", &["show", name]).is_err() {
            if Instant::now() > deadline {
                bail!("wireguard-go did not come up");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(go)
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_distinct_and_setconf_files_parse_back() {
        let peers: Vec<PeerConfig> = [0, 255, 256, MAX_PEERS - 1].map(peer).to_vec();
        let pods: std::collections::BTreeSet<_> = peers.iter().map(|p| p.allowed_ips[0]).collect();
        assert_eq!(pods.len(), peers.len());
        let text = setconf_file(&peers);
        let parsed = wgmesh_core::wgquick::parse(&text).expect("parses");
        assert_eq!(parsed.peers.len(), peers.len());
        assert_eq!(parsed.peers[3].public_key, peers[3].public_key);
    }
}
