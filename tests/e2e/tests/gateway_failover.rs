//! Gateway failover. node-1 and node-2 are the mesh's gateways, node-3 is interior; a laptop
//! on Debian's wireguard-go attaches to both gateways and reaches node-3 through the active
//! one, node-1. Then node-1's agent is killed and its underlay link cut (the node is gone):
//! - the controller, seeing node-1's agent gone (its stream closed, no report since), moves
//!   the active gateway to node-2 (`status.activeGateway`) within seconds;
//! - node-3's device gives node-2 the laptop's address (the interior route moves);
//! - the laptop's config, exported again, sends the rest of the mesh through node-2, and
//!   with it the laptop reaches node-3's pod again, and node-3's pod the laptop;
//! - node-1 coming back does not move the role back (every move changes the laptops'
//!   configs).
//!
//! Needs root.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wgmesh_e2e::cli::Cli;
use wgmesh_e2e::foreign::{quick_parts, wireguard_go_from_config};
use wgmesh_e2e::mesh::TestMesh;
use wgmesh_e2e::netns::{echo_roundtrip, echo_server, sh};

const ECHO_PORT: u16 = 7000;
const LAPTOP_PORT: u16 = 7001;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("a socket address")
}

fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("timed out waiting for {what}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn mesh_status(mesh: &TestMesh, path: &str) -> Result<String> {
    Ok(mesh
        .cp
        .kubectl_ok(&[
            "get",
            "wireguardmesh",
            "default",
            "-o",
            &format!("jsonpath={{.status.{path}}}"),
        ])?
        .trim()
        .to_owned())
}

/// The allowed IPs node `on` gives the peer with public key `key`.
fn allowed_ips_on(mesh: &TestMesh, on: usize, key: &str) -> Result<String> {
    let dump = mesh.wg_dump(on)?;
    dump.lines()
        .skip(1)
        .find(|l| l.split('\t').next() == Some(key))
        .and_then(|l| l.split('\t').nth(3))
        .map(str::to_owned)
        .with_context(|| format!("no peer {key} on node {on}:\n{dump}"))
}

/// The node the first `[Peer]` section is for (its comment, `# node NAME`, comes before it).
fn first_peer_node(config: &str) -> Option<String> {
    config
        .lines()
        .find_map(|l| l.trim().strip_prefix("# node "))
        .map(str::to_owned)
}

#[tokio::test]
async fn e2e_gateway_failover_moves_external_traffic_to_the_next_live_gateway() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    // The binary first (a build, maybe), then the cluster it talks to.
    let mut cli = Cli::new(PathBuf::new())?;
    let mut mesh = TestMesh::start(3).await?;
    cli.kubeconfig = mesh.cp.kubeconfig().to_owned();
    let dir = mesh.cp.dir().to_owned();
    mesh.wait_peer_counts(2, Duration::from_secs(90)).await?;
    for node in &mesh.nodes {
        echo_server(&node.pod, addr("0.0.0.0", ECHO_PORT), usize::MAX)?;
    }
    for node in ["node-1", "node-2"] {
        mesh.cp
            .kubectl_ok(&["label", "node", node, "wgmesh.io/gateway=true"])?;
    }
    mesh.patch_mesh_spec(serde_json::json!({
        "gatewaySelector": {"matchLabels": {"wgmesh.io/gateway": "true"}}
    }))
    .await?;
    eventually(
        "node-1 and node-2 are the gateways, node-1 active",
        Duration::from_secs(20),
        || {
            let gateways = mesh_status(&mesh, "gateways")?;
            let active = mesh_status(&mesh, "activeGateway")?;
            if gateways != r#"["node-1","node-2"]"# || active != "node-1" {
                bail!("gateways {gateways}, active {active:?}");
            }
            Ok(())
        },
    )?;

    // The laptop, through both gateways; the rest of the mesh through node-1.
    let (laptop, _laptop_link) = mesh.outside_host("l", 50)?;
    let config = cli.ok(&[
        "peer",
        "add",
        "laptop",
        "--keepalive",
        "1",
        "--store-private-key",
    ])?;
    assert_eq!(config.matches("[Peer]").count(), 2, "{config}");
    assert_eq!(
        first_peer_node(&config).as_deref(),
        Some("node-1"),
        "{config}"
    );
    let iface = format!("wgl{}", mesh.id);
    let laptop_wg = wireguard_go_from_config(&laptop, &iface, &config, &dir)?;
    let laptop_ip = quick_parts(&config).addresses[0]
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    echo_server(&laptop, addr("0.0.0.0", LAPTOP_PORT), usize::MAX)?;
    let node3_pod = addr(&mesh.nodes[2].pod_ip, ECHO_PORT);
    let node2_pod = addr(&mesh.nodes[1].pod_ip, ECHO_PORT);
    let reaches = |mesh: &TestMesh| -> Result<()> {
        for pod in [node2_pod, node3_pod] {
            echo_roundtrip(&laptop, pod, b"laptop".to_vec(), Duration::from_secs(2))?;
        }
        echo_roundtrip(
            &mesh.nodes[2].pod,
            addr(&laptop_ip, LAPTOP_PORT),
            b"pod".to_vec(),
            Duration::from_secs(2),
        )?;
        Ok(())
    };
    eventually(
        "laptop <-> node-2's and node-3's pods",
        Duration::from_secs(30),
        || reaches(&mesh),
    )
    .with_context(|| mesh.agent_logs(20))?;
    let node1_key = mesh.public_key(0)?;
    let node2_key = mesh.public_key(1)?;
    let laptop_host = format!("{laptop_ip}/32");
    assert!(allowed_ips_on(&mesh, 2, &node1_key)?.contains(&laptop_host));
    assert!(!allowed_ips_on(&mesh, 2, &node2_key)?.contains(&laptop_host));

    // node-1 goes away: its agent killed, its underlay cut.
    let t0 = Instant::now();
    mesh.kill_agent(0);
    sh("ip", &["link", "set", &mesh.underlay_link(0), "down"])?;
    eventually(
        "status.activeGateway = node-2",
        Duration::from_secs(30),
        || {
            let active = mesh_status(&mesh, "activeGateway")?;
            if active != "node-2" {
                bail!("active {active:?}");
            }
            Ok(())
        },
    )?;
    let moved = t0.elapsed();
    eventually(
        "node-3 routes the laptop through node-2",
        Duration::from_secs(15),
        || {
            if !allowed_ips_on(&mesh, 2, &node2_key)?.contains(&laptop_host) {
                bail!("not yet");
            }
            Ok(())
        },
    )?;
    let routed = t0.elapsed();
    assert!(!allowed_ips_on(&mesh, 2, &node1_key)?.contains(&laptop_host));

    // The laptop's config, exported again, follows.
    let config = cli.ok(&["peer", "config", "laptop"])?;
    assert_eq!(
        first_peer_node(&config).as_deref(),
        Some("node-2"),
        "{config}"
    );
    drop(laptop_wg);
    let _laptop_wg = wireguard_go_from_config(&laptop, &iface, &config, &dir)?;
    eventually(
        "laptop <-> node-2's and node-3's pods, through node-2",
        Duration::from_secs(30),
        || reaches(&mesh),
    )
    .with_context(|| mesh.agent_logs(20))?;
    eprintln!(
        "failover: active gateway moved {moved:?}, node-3's route {routed:?}, the laptop \
         reconnected {:?} after node-1 went away",
        t0.elapsed()
    );
    assert!(
        routed < Duration::from_secs(20),
        "the interior route moved within seconds: {routed:?}"
    );

    // node-1 back: the role stays on node-2.
    sh("ip", &["link", "set", &mesh.underlay_link(0), "up"])?;
    mesh.start_agent(0)?;
    let node3_key = mesh.public_key(2)?;
    eventually(
        "node-1's agent back, its device programmed",
        Duration::from_secs(60),
        || allowed_ips_on(&mesh, 0, &node3_key).map(|_| ()),
    )?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(mesh_status(&mesh, "activeGateway")?, "node-2");
    reaches(&mesh)?;
    Ok(())
}
