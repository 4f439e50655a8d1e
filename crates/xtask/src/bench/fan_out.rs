//! `cargo xtask bench fan-out`: what one change of the mesh costs the controller to send to
//! every node, for agents that take changes of allowed IPs and for agents that take peers
//! whole (agents before them), side by side in one run. In process, no API server: the
//! desired mesh before and after the change is computed once per measurement, and then, as
//! every node's stream does, each node's update is decided (`next_update_within`, with the
//! changed keys as the index hints them) and encoded into its messages.
//!
//! The changes measured are those that move the lists as long as the mesh: a node joining
//! behind NAT (the relay, carrying every such node's networks, changes for each of them) and
//! an external peer coming (the active gateway, carrying every external peer's networks,
//! changes for every interior node).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, ensure};
use prost::Message;
use wgmesh_core::desired::{DesiredMesh, MeshInput, NodeEndpoint, NodeInput, PeerInput, compute};
use wgmesh_core::diff::diff_peer_sets;
use wgmesh_core::node_config::{NodeConfig, NodeUpdate, next_update_within};
use wgmesh_core::{Cidr, PublicKey};
use wgmesh_proto as pb;

use super::stats::median;
use crate::setup::step;

#[derive(clap::Args)]
pub struct Args {
    /// Nodes in the mesh.
    #[arg(long, default_value_t = 5000)]
    nodes: usize,
    /// How many of them are behind NAT (the last ones).
    #[arg(long, default_value_t = 1000)]
    behind_nat: usize,
    /// External peers (each with one network), reached through the active gateway.
    #[arg(long, default_value_t = 1000)]
    externals: usize,
    /// Gateways among the nodes (the first ones); the others are interior nodes.
    #[arg(long, default_value_t = 3)]
    gateways: usize,
    /// Measurements of each kind of agent per change; medians are reported.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// Most peers per message, as the controller sends agents that join parts.
const PEERS_PER_PART: usize = 1000;

fn key_of(i: usize) -> PublicKey {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    k[31] = 0x40;
    PublicKey::from_bytes(k)
}

fn cidr(text: &str) -> Cidr {
    text.parse().expect("a valid CIDR")
}

/// Node `i`: address 172.16.x.y, pod CIDR 10.(100 + i / 256).(i % 256).0/24.
fn node(i: usize, args: &Args, behind_nat: bool) -> NodeInput {
    let address: IpAddr = format!("172.16.{}.{}", i / 250, i % 250 + 1)
        .parse()
        .expect("an address");
    NodeInput {
        name: format!("node-{i:05}"),
        uid: format!("uid-{i}"),
        addresses: vec![address],
        host_addresses: vec![address],
        selected: true,
        pod_cidrs: vec![cidr(&format!("10.{}.{}.0/24", 100 + i / 256, i % 256))],
        rotate_key_request: None,
        gateway: i < args.gateways,
        endpoint: NodeEndpoint::Registered,
        behind_nat,
    }
}

/// A peer created at `created` with key `key_index` and tunnel address 10.250.x.y.
fn peer(name: String, created: usize, key_index: usize, tunnel: usize) -> PeerInput {
    PeerInput {
        name,
        created: created as i64,
        previously_programmed: true,
        seniority: created as u64,
        public_key: key_of(key_index),
        allowed_ips: vec![],
        endpoint: None,
        last_seen_endpoint: None,
        persistent_keepalive: None,
        preshared_key: None,
        responder: false,
        disabled: false,
        node: None,
        node_owner_uid: None,
        tunnel_addresses: vec![
            format!("10.250.{}.{}", tunnel / 250, tunnel % 250 + 1)
                .parse()
                .expect("an address"),
        ],
    }
}

fn node_peer(n: &NodeInput, i: usize) -> PeerInput {
    PeerInput {
        endpoint: Some(format!("{}:51820", n.addresses[0])),
        node: Some(n.name.clone()),
        node_owner_uid: Some(n.uid.clone()),
        ..peer(n.name.clone(), i, i, i)
    }
}

/// External peer `e`: network 192.168.x.y/28 (at most 4,096 of them fit in 192.168/16).
fn external(e: usize, args: &Args) -> PeerInput {
    let index = args.nodes + 10 + e;
    PeerInput {
        allowed_ips: vec![cidr(&format!("192.168.{}.{}/28", e / 16, (e % 16) * 16))],
        ..peer(format!("site-{e:05}"), index, index, index)
    }
}

/// The mesh of `nodes` nodes (the last `behind_nat` of them behind NAT) and `externals`
/// external peers.
fn mesh(args: &Args, nodes: usize, behind_nat: usize, externals: usize) -> DesiredMesh {
    let input = MeshInput {
        name: "default".into(),
        tunnel_pools: vec![cidr("10.250.0.0/16")],
        persistent_keepalive: 0,
        preshared_key: None,
        reserved: vec![],
        active_gateway: None,
        host_encryption: false,
        marks_tunnel_packets: false,
    };
    let node_inputs: Vec<NodeInput> = (0..nodes)
        .map(|i| node(i, args, i >= nodes - behind_nat))
        .collect();
    let mut peers: Vec<PeerInput> = node_inputs
        .iter()
        .enumerate()
        .map(|(i, n)| node_peer(n, i))
        .collect();
    peers.extend((0..externals).map(|e| external(e, args)));
    compute(&input, &node_inputs, &peers)
}

/// The keys whose peer differs between the two meshes in any shared view: what the
/// controller's index hands every stream.
fn changed_keys(before: &DesiredMesh, after: &DesiredMesh) -> BTreeSet<PublicKey> {
    let mut keys = BTreeSet::new();
    for (old, new) in [
        (&before.peers, &after.peers),
        (&before.interior_peers, &after.interior_peers),
        (&before.nat_peers, &after.nat_peers),
    ] {
        let delta = diff_peer_sets(old, new, None);
        keys.extend(delta.upserted.iter().map(|p| p.public_key));
        keys.extend(delta.removed);
    }
    keys
}

/// What sending one change to every member of `before` cost.
struct Sent {
    seconds: f64,
    bytes: Vec<f64>,
    changes: usize,
    whole_peers: usize,
}

fn send_to_every_node(
    before: &Arc<DesiredMesh>,
    after: &Arc<DesiredMesh>,
    takes_changes: bool,
) -> Sent {
    let settings = Arc::new(pb::MeshSettings {
        interface_name: "wgmesh0".into(),
        ..pb::MeshSettings::default()
    });
    let nodes: Vec<&String> = before.members.keys().collect();
    let started = Instant::now();
    let hint = changed_keys(before, after);
    let mut sent = Sent {
        seconds: 0.0,
        bytes: Vec::with_capacity(nodes.len()),
        changes: 0,
        whole_peers: 0,
    };
    for node in nodes {
        let was = NodeConfig::of(node, Some(settings.clone()), before.clone());
        let now = NodeConfig::of(node, Some(settings.clone()), after.clone());
        let update = match next_update_within(Some(&was), &now, Some(&hint)) {
            Some(NodeUpdate::Delta(d)) if takes_changes => {
                Some(NodeUpdate::Delta(d.with_allowed_ips_changes(&was, &now)))
            }
            other => other,
        };
        let mut bytes = 0;
        if let Some(update) = update {
            if let NodeUpdate::Delta(d) = &update {
                sent.changes += d.allowed_ips_changes.len();
                sent.whole_peers += d.upserted.len();
            }
            for message in pb::encode::peer_update_parts("epoch", 2, &now, &update, PEERS_PER_PART)
            {
                bytes += message.encoded_len();
            }
        }
        sent.bytes.push(bytes as f64);
    }
    sent.seconds = started.elapsed().as_secs_f64();
    sent
}

/// One change measured for both kinds of agent, rounds interleaved (the order alternates).
struct Scenario {
    name: String,
    /// The mesh before and after the change, computed anew for every measurement: the
    /// encodings and differences each peer memoizes start empty.
    meshes: Box<dyn Fn() -> (DesiredMesh, DesiredMesh)>,
}

pub fn run(args: Args) -> Result<()> {
    ensure!(
        args.rounds >= 1
            && args.nodes >= 2
            && args.behind_nat < args.nodes
            && args.gateways >= 1
            && args.gateways + args.behind_nat < args.nodes
            && args.nodes + args.externals < 16_000
            && args.externals < 4096,
        "need --rounds >= 1, --gateways >= 1, --gateways + --behind-nat below --nodes, \
         --externals below 4096 and --nodes + --externals below 16000"
    );
    let args = Arc::new(args);
    let (n, k, e) = (args.nodes, args.behind_nat, args.externals);
    let scenarios = [
        Scenario {
            name: format!("a node joins behind NAT ({n} nodes, {k} behind NAT)"),
            meshes: Box::new({
                let args = args.clone();
                move || (mesh(&args, n, k, e), mesh(&args, n + 1, k + 1, e))
            }),
        },
        Scenario {
            name: format!("an external peer comes ({n} nodes, {e} external peers)"),
            meshes: Box::new({
                let args = args.clone();
                move || (mesh(&args, n, k, e), mesh(&args, n, k, e + 1))
            }),
        },
    ];
    let mut rows = Vec::new();
    let mut report = Vec::new();
    for scenario in &scenarios {
        step(&scenario.name);
        let mut seconds = [Vec::new(), Vec::new()];
        let mut last = [None, None];
        for round in 0..args.rounds {
            for turn in 0..2 {
                // Alternate which kind goes first: the machine is shared and noisy.
                let takes_changes = (round + turn) % 2 == 1;
                let (before, after) = (scenario.meshes)();
                let (before, after) = (Arc::new(before), Arc::new(after));
                let sent = send_to_every_node(&before, &after, takes_changes);
                seconds[usize::from(takes_changes)].push(sent.seconds);
                last[usize::from(takes_changes)] = Some(sent);
            }
        }
        let ms = |i: usize| median(&seconds[i]) * 1000.0;
        let ratio = ms(0) / ms(1).max(f64::MIN_POSITIVE);
        for (i, label) in [
            (0, "whole peers (older agents)"),
            (1, "changes of allowed IPs"),
        ] {
            let sent = last[i].as_ref().expect("measured");
            let max = sent.bytes.iter().copied().fold(0.0, f64::max);
            rows.push(format!(
                "| {} | {label} | {:.1} | {:.0} / {:.0} | {} / {} | {} |",
                scenario.name,
                ms(i),
                median(&sent.bytes),
                max,
                sent.changes,
                sent.whole_peers,
                if i == 1 {
                    format!("{ratio:.1}x")
                } else {
                    String::new()
                }
            ));
            report.push(serde_json::json!({
                "change": scenario.name,
                "agents_take_changes": i == 1,
                "cpu_ms_median": ms(i),
                "cpu_ms": seconds[i].iter().map(|s| s * 1000.0).collect::<Vec<_>>(),
                "bytes_per_agent_median": median(&sent.bytes),
                "bytes_per_agent_max": max,
                "changes_sent": sent.changes,
                "whole_peers_sent": sent.whole_peers,
            }));
        }
    }
    println!();
    println!(
        "fan-out benchmark: one change sent to every node ({} rounds, medians; one core)",
        args.rounds
    );
    println!(
        "| change | agents | CPU ms to send to all | bytes per agent, median / max | changes / whole peers sent | ratio whole : changes |"
    );
    println!("|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    let dir = crate::setup::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("fan-out.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&serde_json::json!({
            "nodes": args.nodes,
            "behind_nat": args.behind_nat,
            "externals": args.externals,
            "gateways": args.gateways,
            "rounds": args.rounds,
            "results": report,
        }))?,
    )?;
    println!("\nwrote {}", path.display());
    Ok(())
}
