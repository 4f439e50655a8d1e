//! Where the members reach a node, end to end on three CNI-mode nodes whose underlay links
//! each carry a second, "external" address:
//! - the mesh prefers `ExternalIP` (`spec.endpointAddressTypes`): every node peer is
//!   published at its Node's ExternalIP (the registered address kept in an annotation), the
//!   devices send there, and pods reach each other;
//! - a Node's `wgmesh.io/endpoint` annotation names a DNS name, resolved by a hosts file we
//!   control inside the agents' mount namespaces: when the name moves to another address the
//!   agents follow within their re-resolution period (1 s here) and the encrypted packets go
//!   to the new address, with no change from the controller;
//! - without the annotation and the preference, the registered InternalIP again;
//! - the mesh moved to another `listenPort`: every node published at its new port;
//! - a node renumbered (its InternalIP changed) and its agent restarted with the old address
//!   in its environment: published at the new one.
//!
//! And nodes behind NAT (`e2e_node_endpoint_nat_relay`): two of three nodes each behind its
//! own NAT router (iptables MASQUERADE), reached through the reachable one.
//!
//! Needs root.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use wgmesh_api::WireGuardPeer;
use wgmesh_e2e::chaos::watcher::Watcher;
use wgmesh_e2e::mesh::{MeshOptions, NAT_ROUTER_OCTET, NetworkMode, TestMesh};
use wgmesh_e2e::netns::{echo_roundtrip, echo_server, first_packet, sh};

const ECHO_PORT: u16 = 7000;
const PORT: u16 = 51820;
/// The DNS name node-2's annotation gives it.
const NAME: &str = "node-2.mesh.test";

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

#[tokio::test]
async fn e2e_node_endpoint_external_ip_preference_and_a_dns_endpoint_that_moves() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let mut mesh = TestMesh::start_with(
        3,
        MeshOptions {
            mode: NetworkMode::Cni,
            values: json!({"agent": {"endpointRefreshSeconds": 1}}),
            ..Default::default()
        },
    )
    .await?;
    mesh.wait_peer_counts(2, Duration::from_secs(60)).await?;
    let _servers: Vec<_> = mesh
        .nodes
        .iter()
        .map(|n| echo_server(&n.pod, addr(&n.pod_ip, ECHO_PORT), 1000))
        .collect::<Result<_>>()?;
    let internal = |pos: usize| mesh.nodes[pos].node_ip.clone();
    let external = |pos: usize| format!("{}.{}", mesh.underlay, 100 + mesh.nodes[pos].index);

    // Every node gets a second address, published as its ExternalIP.
    let nodes: Api<Node> = Api::all(mesh.client.clone());
    for (pos, node) in mesh.nodes.iter().enumerate() {
        node.ns.ip(&[
            "addr",
            "add",
            &format!("{}/24", external(pos)),
            "dev",
            "eth0",
        ])?;
        let mut object = nodes.get_status(&node.name).await?;
        let status = object.status.as_mut().context("a Node has a status")?;
        status
            .addresses
            .get_or_insert_default()
            .push(k8s_openapi::api::core::v1::NodeAddress {
                type_: "ExternalIP".into(),
                address: external(pos),
            });
        nodes
            .replace_status(&node.name, &Default::default(), &object)
            .await?;
    }
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(20))?;

    // The mesh prefers ExternalIPs.
    mesh.patch_mesh_spec(json!({"endpointAddressTypes": ["ExternalIP", "InternalIP"]}))
        .await?;
    for pos in 0..mesh.nodes.len() {
        let want = format!("{}:{PORT}", external(pos));
        wait_published(&mesh, pos, &want, &format!("{}:{PORT}", internal(pos))).await?;
        wait_on_devices(&mesh, pos, &want).await?;
    }
    // First, before the answers (sent from node-2's primary address, .2) let node-1's device
    // learn that address, as WireGuard's roaming does.
    sent_to(&mesh, 0, 1, &external(1))?;
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(20))?;

    // node-2 by a DNS name that the agents resolve from a hosts file we control.
    let hosts: Vec<_> = (0..mesh.nodes.len())
        .map(|pos| private_hosts_file(&mesh, pos))
        .collect::<Result<_>>()?;
    point(&hosts, &internal(1))?;
    annotate(&nodes, "node-2", Some(NAME)).await?;
    wait_published(
        &mesh,
        1,
        &format!("{NAME}:{PORT}"),
        &format!("{}:{PORT}", internal(1)),
    )
    .await?;
    wait_on_devices(&mesh, 1, &format!("{}:{PORT}", internal(1))).await?;
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(20))?;

    // The name moves: the agents follow it on their own.
    point(&hosts, &external(1))?;
    let moved = Instant::now();
    wait_on_devices(&mesh, 1, &format!("{}:{PORT}", external(1))).await?;
    eprintln!("the agents followed the name in {:?}", moved.elapsed());
    sent_to(&mesh, 0, 1, &external(1))?;
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(20))?;

    // Neither annotation nor preference: the registered InternalIPs again.
    annotate(&nodes, "node-2", None).await?;
    mesh.patch_mesh_spec(json!({"endpointAddressTypes": null}))
        .await?;
    for pos in 0..mesh.nodes.len() {
        let want = format!("{}:{PORT}", internal(pos));
        wait_published(&mesh, pos, &want, &want).await?;
        wait_on_devices(&mesh, pos, &want).await?;
    }
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(20))?;

    // The mesh moves to another port: every agent listens there and registers it, and the
    // members are told (an idle pair has no packet to roam by).
    let moved_port = PORT + 1;
    mesh.patch_mesh_spec(json!({"listenPort": moved_port}))
        .await?;
    for pos in 0..mesh.nodes.len() {
        let want = format!("{}:{moved_port}", internal(pos));
        wait_published(&mesh, pos, &want, &want).await?;
        wait_on_devices(&mesh, pos, &want).await?;
    }
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(20))?;

    // node-3's InternalIP changes, and its agent restarts with the address its pod was
    // started with (the downward API's, now not the Node's): it registers with the Node's
    // own address instead of staying out of the mesh.
    let renumbered = format!("{}.{}", mesh.underlay, 150 + mesh.nodes[2].index);
    mesh.nodes[2]
        .ns
        .ip(&["addr", "add", &format!("{renumbered}/24"), "dev", "eth0"])?;
    let mut object = nodes.get_status("node-3").await?;
    for address in object
        .status
        .as_mut()
        .and_then(|s| s.addresses.as_mut())
        .context("a Node has addresses")?
    {
        if address.type_ == "InternalIP" {
            address.address = renumbered.clone();
        }
    }
    nodes
        .replace_status("node-3", &Default::default(), &object)
        .await?;
    mesh.stop_agent(2);
    mesh.start_agent(2)?;
    let want = format!("{renumbered}:{moved_port}");
    wait_published(&mesh, 2, &want, &want).await?;
    Ok(())
}

/// Two nodes each behind its own NAT router (a private address, its default route through a
/// router that masquerades to the underlay), one reachable node. The NAT'd nodes are
/// published at the masqueraded address the reachable node (their relay) observed, reach
/// each other through it and it directly, both ways, and the underlay carries no plaintext
/// pod packet.
#[tokio::test]
async fn e2e_node_endpoint_nat_relay() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let mesh = TestMesh::start_with(
        3,
        MeshOptions {
            mode: NetworkMode::Cni,
            behind_nat: vec![2, 3],
            ..Default::default()
        },
    )
    .await?;
    let started = Instant::now();
    // Either end: behind a NAT a leaked pod packet's source is the NAT's address.
    let mut watcher = Watcher::either_end(mesh.dir(), &["10.244.0.0/16", "10.250.0.0/16"])?;
    for pos in 0..mesh.nodes.len() {
        watcher.watch(&mesh.nodes[pos].name, &mesh.underlay_link(pos))?;
    }
    let _servers: Vec<_> = mesh
        .nodes
        .iter()
        .map(|n| echo_server(&n.pod, addr(&n.pod_ip, ECHO_PORT), usize::MAX))
        .collect::<Result<_>>()?;
    let nat_address = |pos: usize| {
        format!(
            "{}.{}",
            mesh.underlay,
            NAT_ROUTER_OCTET + mesh.nodes[pos].index
        )
    };

    // The NAT'd nodes keep their sessions alive (25 s by default): the relay learns where
    // they are from their packets, reports it, and the mesh publishes it.
    for pos in [1, 2] {
        let want = format!("{}:{PORT}", nat_address(pos));
        wait_endpoint(&mesh, pos, Some(&want), Duration::from_secs(90)).await?;
        wait_on_device(&mesh, 0, pos, &want).await?;
    }
    eprintln!("NAT'd nodes published after {:?}", started.elapsed());

    // Each NAT'd node has the relay only, carrying the other's networks and not its own.
    for (pos, other) in [(1, 2), (2, 1)] {
        let dump = mesh.wg_dump(pos)?;
        let peers: Vec<&str> = dump.lines().skip(1).collect();
        let relay = mesh.public_key(0)?;
        if peers.len() != 1 || !peers[0].starts_with(&relay) {
            bail!(
                "{}'s peers are not the relay alone:\n{dump}",
                mesh.nodes[pos].name
            );
        }
        let allowed: Vec<&str> = peers[0]
            .split('\t')
            .nth(3)
            .unwrap_or_default()
            .split(',')
            .collect();
        let (own, theirs) = (&mesh.nodes[pos].pod_cidr, &mesh.nodes[other].pod_cidr);
        if !allowed.contains(&theirs.as_str()) || allowed.contains(&own.as_str()) {
            bail!(
                "{}: the relay's allowed IPs {allowed:?} should carry {theirs} and never {own}",
                mesh.nodes[pos].name
            );
        }
    }
    if mesh.wg_peers(0)?.len() != 2 {
        bail!(
            "the relay should have both NAT'd nodes:\n{}",
            mesh.wg_dump(0)?
        );
    }

    // Every pod reaches every other, both ways: NAT'd to NAT'd through the relay.
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(60))?;
    let counts = watcher.poll()?;
    let plaintext: u64 = counts.iter().map(|c| c.plaintext).sum();
    if plaintext > 0 {
        bail!("plaintext pod packets on the underlay: {counts:?}");
    }
    eprintln!(
        "pods reach each other, no plaintext on the underlay ({} packets captured) after {:?}",
        counts.iter().map(|c| c.packets).sum::<u64>(),
        started.elapsed()
    );
    Ok(())
}

/// Waits until node `pos`'s published endpoint (its WireGuardPeer's `spec.endpoint`) is `want`.
async fn wait_endpoint(
    mesh: &TestMesh,
    pos: usize,
    want: Option<&str>,
    timeout: Duration,
) -> Result<()> {
    let peers: Api<WireGuardPeer> = Api::all(mesh.client.clone());
    let node = &mesh.nodes[pos].name;
    let deadline = Instant::now() + timeout;
    loop {
        let list = peers.list(&Default::default()).await?;
        let have = list
            .items
            .iter()
            .find(|p| p.spec.node.as_ref().is_some_and(|n| &n.0 == node))
            .and_then(|p| p.spec.endpoint.as_ref().map(|e| e.0.clone()));
        if have.as_deref() == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{node}'s WireGuardPeer: endpoint {have:?}, want {want:?}\n{}",
                mesh.agent_logs(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until node `at`'s device has node `pos` at `endpoint`.
async fn wait_on_device(mesh: &TestMesh, at: usize, pos: usize, endpoint: &str) -> Result<()> {
    let key = mesh.public_key(pos)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let dump = mesh.wg_dump(at)?;
        let have = dump
            .lines()
            .skip(1)
            .find(|l| l.split('\t').next() == Some(key.as_str()))
            .and_then(|l| l.split('\t').nth(2))
            .unwrap_or_default()
            .to_owned();
        if have == endpoint {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{}'s device has {} at {have:?}, want {endpoint}",
                mesh.nodes[at].name,
                mesh.nodes[pos].name,
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("a socket address")
}

async fn annotate(nodes: &Api<Node>, node: &str, endpoint: Option<&str>) -> Result<()> {
    let patch = json!({"metadata": {"annotations": {"wgmesh.io/endpoint": endpoint}}});
    nodes
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Waits until node `pos`'s WireGuardPeer shows `endpoint`, with `registered` kept.
async fn wait_published(
    mesh: &TestMesh,
    pos: usize,
    endpoint: &str,
    registered: &str,
) -> Result<()> {
    let peers: Api<WireGuardPeer> = Api::all(mesh.client.clone());
    let node = &mesh.nodes[pos].name;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = peers.list(&Default::default()).await?;
        let peer = list
            .items
            .iter()
            .find(|p| p.spec.node.as_ref().is_some_and(|n| &n.0 == node))
            .with_context(|| format!("no WireGuardPeer of {node}"))?;
        let have = peer.spec.endpoint.as_ref().map(|e| e.0.clone());
        let have_registered = peer
            .annotations()
            .get("wgmesh.io/registered-endpoint")
            .cloned();
        if have.as_deref() == Some(endpoint) && have_registered.as_deref() == Some(registered) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{node}'s WireGuardPeer: endpoint {have:?} (want {endpoint}), registered {have_registered:?} (want {registered})"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits until every other node's device has node `pos` at `endpoint`. Checked while the
/// mesh is quiet: traffic lets a device learn an endpoint from where packets come from
/// (roaming), and the nodes answer from their primary address.
async fn wait_on_devices(mesh: &TestMesh, pos: usize, endpoint: &str) -> Result<()> {
    let key = mesh.public_key(pos)?;
    for other in (0..mesh.nodes.len()).filter(|o| *o != pos) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let dump = mesh.wg_dump(other)?;
            let have = dump
                .lines()
                .skip(1)
                .find(|l| l.split('\t').next() == Some(key.as_str()))
                .and_then(|l| l.split('\t').nth(2))
                .unwrap_or_default()
                .to_owned();
            if have == endpoint {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{}'s device has {} at {have:?}, want {endpoint}\n{}",
                    mesh.nodes[other].name,
                    mesh.nodes[pos].name,
                    mesh.agent_logs(10)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// A hosts file bind-mounted over /etc/hosts in node `pos`'s agent's mount namespace (it is
/// private to the agent), so its resolver answers what the test writes.
fn private_hosts_file(mesh: &TestMesh, pos: usize) -> Result<std::path::PathBuf> {
    let node = &mesh.nodes[pos];
    let pid = node
        .agent
        .as_ref()
        .and_then(|a| a.pid())
        .context("the agent is not running")?
        .to_string();
    let file = mesh.dir().join(format!("hosts-{}", node.name));
    std::fs::write(&file, "127.0.0.1 localhost\n")?;
    sh(
        "nsenter",
        &[
            "-t",
            &pid,
            "-m",
            "mount",
            "--bind",
            &file.display().to_string(),
            "/etc/hosts",
        ],
    )?;
    Ok(file)
}

/// Points the test's name at `ip` in every hosts file, in place (the bind mounts follow the
/// file, not its name).
fn point(hosts: &[std::path::PathBuf], ip: &str) -> Result<()> {
    for file in hosts {
        rewrite_in_place(file, &format!("127.0.0.1 localhost\n{ip} {NAME}\n"))?;
    }
    Ok(())
}

fn rewrite_in_place(file: &Path, content: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(file)?;
    f.write_all(content.as_bytes())?;
    Ok(())
}

/// Pod `from` talks to pod `to` while node `from`'s underlay is captured: its encrypted
/// packets go to `ip`.
fn sent_to(mesh: &TestMesh, from: usize, to: usize, ip: &str) -> Result<()> {
    let filter = format!("udp and dst host {ip} and dst port {PORT}");
    let target = addr(&mesh.nodes[to].pod_ip, ECHO_PORT);
    let seen = first_packet(None, &mesh.underlay_link(from), "in", &filter, || {
        for _ in 0..5 {
            let _ = echo_roundtrip(
                &mesh.nodes[from].pod,
                target,
                b"hello".to_vec(),
                Duration::from_secs(2),
            );
        }
        Ok(())
    })?;
    if !seen.contains(ip) {
        bail!("no encrypted packet from {} to {ip}", mesh.nodes[from].name);
    }
    Ok(())
}
