//! Dual-stack end to end: three CNI-mode nodes with an IPv4 and an IPv6 InternalIP, pod CIDRs
//! and tunnel pools of both families, WireGuard between the nodes over the IPv6 underlay
//! (endpoints `[v6]:port`, set with the Node annotation), and a laptop (Debian's wireguard-go)
//! with IPv4 and IPv6 tunnel addresses, set up from `kubectl wgmesh peer add`'s config, that
//! reaches the nodes over IPv6. Pods reach each other and the laptop over both families while
//! every node's underlay is captured: no pod packet of either family crosses in plaintext.
//! Needs root.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use wgmesh_e2e::binaries::workspace_binary;
use wgmesh_e2e::chaos::watcher::Watcher;
use wgmesh_e2e::foreign::{quick_parts, wireguard_go_from_config};
use wgmesh_e2e::mesh::{MeshOptions, TestMesh};
use wgmesh_e2e::netns::{Netns, echo_roundtrip, echo_server, first_packet};

const ECHO_PORT: u16 = 7000;
const PROTECTED: [&str; 4] = [
    "10.244.0.0/16",
    "fd00:10:244::/48",
    "10.250.0.0/16",
    "fd00:250::/64",
];

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

#[tokio::test(flavor = "multi_thread")]
async fn e2e_dual_stack_pods_and_a_laptop_over_an_ipv6_underlay() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let mesh = TestMesh::start_with(
        3,
        MeshOptions {
            dual_stack: true,
            values: json!({"mesh": {"spec": {
                "tunnelCIDRs": ["10.250.0.0/16", "fd00:250::/64"],
                "clusterCIDRs": ["10.244.0.0/16", "fd00:10:244::/48"],
            }}}),
            ..Default::default()
        },
    )
    .await?;
    mesh.wait_peer_counts(2, Duration::from_secs(60)).await?;
    let prefix6 = mesh.underlay6.clone().context("a dual-stack underlay")?;
    let mut watcher = Watcher::new(mesh.dir(), &PROTECTED)?;
    for pos in 0..mesh.nodes.len() {
        watcher.watch(&mesh.nodes[pos].name, &mesh.underlay_link(pos))?;
    }
    // One socket for both families (IPv4 arrives mapped).
    for node in &mesh.nodes {
        echo_server(&node.pod, "[::]:7000".parse()?, usize::MAX)?;
    }
    let pods6: Vec<IpAddr> = mesh
        .nodes
        .iter()
        .map(|n| global_ipv6(&n.pod))
        .collect::<Result<_>>()?;
    for (node, ip) in mesh.nodes.iter().zip(&pods6) {
        let i = node.index;
        assert!(
            ip.to_string().starts_with(&format!("fd00:10:244:{i:x}::")),
            "{}'s pod has its IPv6 address from the Node's IPv6 pod CIDR: {ip}",
            node.name
        );
    }

    // The nodes reach each other over IPv6.
    let nodes: Api<Node> = Api::all(mesh.client.clone());
    for node in &mesh.nodes {
        let endpoint = format!("[{prefix6}:{:x}]", node.index);
        let patch = json!({"metadata": {"annotations": {"wgmesh.io/endpoint": endpoint}}});
        nodes
            .patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    for pos in 0..mesh.nodes.len() {
        let key = mesh.public_key(pos)?;
        let i = mesh.nodes[pos].index;
        let endpoint = format!("[{prefix6}:{i:x}]:51820");
        for other in (0..mesh.nodes.len()).filter(|o| *o != pos) {
            wait_peer(&mesh, other, &key, "endpoint", |line| {
                field(line, 2) == endpoint
            })
            .await?;
            wait_peer(&mesh, other, &key, "both families' allowed IPs", |line| {
                let allowed = field(line, 3);
                allowed.contains(&format!("10.244.{i}.0/24"))
                    && allowed.contains(&format!("fd00:10:244:{i:x}::/64"))
                    && allowed.contains("fd00:250::")
            })
            .await?;
        }
    }

    // Pods, both families, every pair; the encrypted packets cross the IPv6 underlay.
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(30))?;
    let over_ipv6 = first_packet(
        None,
        &mesh.underlay_link(0),
        "in",
        "ip6 and udp port 51820",
        || {
            eventually("every pod reaches every pod over IPv6", || {
                for (from, node) in mesh.nodes.iter().enumerate() {
                    for (to, ip) in pods6.iter().enumerate().filter(|(to, _)| *to != from) {
                        echo_roundtrip(
                            &node.pod,
                            SocketAddr::new(*ip, ECHO_PORT),
                            b"six".to_vec(),
                            Duration::from_secs(2),
                        )
                        .with_context(|| {
                            format!("{} -> {} over IPv6", node.name, mesh.nodes[to].name)
                        })?;
                    }
                }
                Ok(())
            })
        },
    )?;
    assert!(
        !over_ipv6.is_empty(),
        "node-1 sent its encrypted packets over the IPv6 underlay"
    );

    // A laptop with both families' tunnel addresses, reaching the nodes over IPv6.
    let (laptop, _link) = mesh.outside_host("l", 50)?;
    laptop.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{prefix6}:32/64"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    let config = peer_add_laptop(&mesh)?;
    let parts = quick_parts(&config);
    let laptop6: IpAddr = parts
        .addresses
        .iter()
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .find(IpAddr::is_ipv6)
        .with_context(|| format!("the laptop has an IPv6 tunnel address: {config}"))?;
    assert!(
        config.contains(&format!("Endpoint = [{prefix6}:")),
        "the laptop reaches the nodes at their IPv6 endpoints:\n{config}"
    );
    let _wggo = wireguard_go_from_config(&laptop, &format!("wgl{}", mesh.id), &config, mesh.dir())?;
    echo_server(&laptop, "[::]:7001".parse()?, usize::MAX)?;
    eventually("the laptop reaches every pod over both families", || {
        for (node, ip6) in mesh.nodes.iter().zip(&pods6) {
            for ip in [node.pod_ip.parse::<IpAddr>()?, *ip6] {
                echo_roundtrip(
                    &laptop,
                    SocketAddr::new(ip, ECHO_PORT),
                    b"laptop".to_vec(),
                    Duration::from_secs(2),
                )
                .with_context(|| format!("laptop -> {ip}"))?;
            }
        }
        Ok(())
    })?;
    eventually("every pod reaches the laptop over IPv6", || {
        for node in &mesh.nodes {
            echo_roundtrip(
                &node.pod,
                SocketAddr::new(laptop6, 7001),
                b"pod".to_vec(),
                Duration::from_secs(2),
            )
            .with_context(|| format!("{} -> laptop {laptop6}", node.name))?;
        }
        Ok(())
    })?;

    let counts = watcher.poll()?;
    let plaintext: u64 = counts.iter().map(|c| c.plaintext).sum();
    eprintln!("capture: {counts:?}");
    assert_eq!(plaintext, 0, "pod packets in plaintext: {counts:?}");
    Ok(())
}

/// `kubectl wgmesh peer add laptop --keepalive 5` against the mesh's API server: the
/// laptop's wg-quick config.
fn peer_add_laptop(mesh: &TestMesh) -> Result<String> {
    let cli = workspace_binary("wgmesh-cli", "kubectl-wgmesh")?;
    let out = Command::new(&cli)
        .arg("--kubeconfig")
        .arg(mesh.cp.kubeconfig())
        .args(["peer", "add", "laptop", "--keepalive", "5"])
        .output()?;
    if !out.status.success() {
        bail!(
            "kubectl wgmesh peer add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let config = String::from_utf8(out.stdout)?;
    eprintln!("--- the laptop's config ---\n{config}");
    Ok(config)
}

/// The tab-separated field `n` of a `wg show dump` peer line.
fn field(line: &str, n: usize) -> String {
    line.split('\t').nth(n).unwrap_or_default().to_owned()
}

/// Waits until node `on`'s device has the peer `key` with a dump line `ok` accepts.
async fn wait_peer(
    mesh: &TestMesh,
    on: usize,
    key: &str,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dump = mesh.wg_dump(on)?;
        let line = dump
            .lines()
            .skip(1)
            .find(|l| l.split('\t').next() == Some(key))
            .unwrap_or_default()
            .to_owned();
        if ok(&line) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{}: peer {key}: {what}: {line:?}\n{}",
                mesh.nodes[on].name,
                mesh.agent_logs(10)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The global IPv6 address of `ns`'s eth0 (a pod's, from the CNI plugins).
fn global_ipv6(ns: &Netns) -> Result<IpAddr> {
    let out = ns.ip(&["-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"])?;
    let addr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .with_context(|| format!("no global IPv6 address on {}'s eth0: {out}", ns.name))?;
    Ok(addr.parse()?)
}

fn eventually(what: &str, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("{what}: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// An IPv6-only cluster: nodes with only IPv6 on their underlay (no IPv4 address, an IPv6
/// default route), Nodes with only IPv6 InternalIPs and pod CIDRs, an API server on `[::1]`
/// with IPv6 Services, and the controller at an IPv6 pod IP. The agents reach it through the
/// chart's Service URL (`https://[v6]:port`, TLS to the Service's name), register the Node's
/// IPv6 address as their endpoint, and pods (and a laptop with only IPv6, from `kubectl
/// wgmesh peer add`) reach each other through the tunnel while every node's underlay is
/// captured: no plaintext pod packet, and no IPv4 packet at all.
#[tokio::test(flavor = "multi_thread")]
async fn e2e_dual_stack_ipv6_only_control_plane() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let mesh = TestMesh::start_with(
        3,
        MeshOptions {
            ipv6_only: true,
            values: json!({"mesh": {"spec": {
                "tunnelCIDRs": ["fd00:250::/64"],
                "clusterCIDRs": ["fd00:10:244::/48"],
            }}}),
            ..Default::default()
        },
    )
    .await?;
    let prefix6 = mesh.underlay6.clone().context("an IPv6 underlay")?;
    let controller_ip = mesh.controller_ip();
    assert!(
        controller_ip.parse::<std::net::Ipv6Addr>().is_ok(),
        "the controller's pod IP is IPv6: {controller_ip}"
    );
    assert!(
        mesh.cp.url().starts_with("https://[::1]:"),
        "the API server serves on [::1]: {}",
        mesh.cp.url()
    );
    let cluster_ip = mesh
        .installed
        .service
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.clone())
        .unwrap_or_default();
    assert!(
        cluster_ip.parse::<std::net::Ipv6Addr>().is_ok(),
        "the controller's Service has an IPv6 cluster IP: {cluster_ip:?}"
    );

    // The world is IPv6-only: no IPv4 address or route on any node's underlay, and Nodes that
    // say so.
    let nodes: Api<Node> = Api::all(mesh.client.clone());
    for node in &mesh.nodes {
        let v4 = node.ns.ip(&["-4", "-o", "addr", "show", "dev", "eth0"])?;
        assert!(v4.trim().is_empty(), "{}: IPv4 on eth0: {v4}", node.name);
        let default4 = node.ns.ip(&["-4", "route", "show", "default"])?;
        assert!(default4.trim().is_empty(), "{}: {default4}", node.name);
        let default6 = node.ns.ip(&["-6", "route", "show", "default"])?;
        assert!(
            default6.contains(&format!("via {prefix6}:fd dev eth0")),
            "{}: the default route is IPv6 through the router: {default6}",
            node.name
        );
        let object = nodes.get(&node.name).await?;
        let addresses: Vec<String> = object
            .status
            .and_then(|s| s.addresses)
            .unwrap_or_default()
            .into_iter()
            .map(|a| a.address)
            .collect();
        assert!(
            !addresses.is_empty()
                && addresses
                    .iter()
                    .all(|a| a.parse::<std::net::Ipv6Addr>().is_ok()),
            "{}: only IPv6 InternalIPs: {addresses:?}",
            node.name
        );
    }

    mesh.wait_peer_counts(2, Duration::from_secs(60)).await?;

    // Each agent's control connection: the chart's URL with the Service's IPv6 address, and
    // an established TCP connection from the node's IPv6 address to it.
    for (pos, node) in mesh.nodes.iter().enumerate() {
        let url = mesh
            .agent_env(pos, "WGMESH_CONTROLLER")
            .context("the agent's WGMESH_CONTROLLER")?;
        let authority = url
            .strip_prefix("https://")
            .filter(|a| a.starts_with(&format!("[{controller_ip}]:")))
            .with_context(|| format!("{}: the controller URL {url}", node.name))?;
        let connections = node.ns.exec("ss", &["-tnH", "state", "established"])?;
        let own = format!("[{}]:", node.node_ip);
        assert!(
            connections.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.iter().any(|a| a.starts_with(&own)) && f.contains(&authority)
            }),
            "{}: an established IPv6 connection {own}* -> {authority}:\n{connections}",
            node.name
        );
    }

    // Endpoints are the registered IPv6 node addresses (no annotation), and allowed IPs the
    // IPv6 pod CIDR and tunnel address only.
    for pos in 0..mesh.nodes.len() {
        let key = mesh.public_key(pos)?;
        let i = mesh.nodes[pos].index;
        let endpoint = format!("[{prefix6}:{i:x}]:51820");
        for other in (0..mesh.nodes.len()).filter(|o| *o != pos) {
            wait_peer(&mesh, other, &key, "its IPv6 endpoint", |line| {
                field(line, 2) == endpoint
            })
            .await?;
            wait_peer(&mesh, other, &key, "IPv6 allowed IPs only", |line| {
                let allowed = field(line, 3);
                allowed.contains(&format!("fd00:10:244:{i:x}::/64"))
                    && allowed.contains("fd00:250::")
                    && !allowed.contains('.')
            })
            .await?;
        }
    }

    let mut watcher = Watcher::new(mesh.dir(), &["fd00:10:244::/48", "fd00:250::/64"])?;
    for pos in 0..mesh.nodes.len() {
        watcher.watch(&mesh.nodes[pos].name, &mesh.underlay_link(pos))?;
    }
    for node in &mesh.nodes {
        let i = node.index;
        assert!(
            node.pod_ip.starts_with(&format!("fd00:10:244:{i:x}::")),
            "{}'s pod has an address of its IPv6 pod CIDR: {}",
            node.name,
            node.pod_ip
        );
        echo_server(&node.pod, "[::]:7000".parse()?, usize::MAX)?;
    }
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(30))?;
    // The tunnel runs over the IPv6 underlay, and nothing of IPv4 leaves a node.
    let over_ipv6 = first_packet(
        None,
        &mesh.underlay_link(0),
        "in",
        "ip6 and udp port 51820",
        || mesh.pod_matrix(ECHO_PORT, Duration::from_secs(10)),
    )?;
    assert!(
        !over_ipv6.is_empty(),
        "node-1 sent its encrypted packets over the IPv6 underlay"
    );
    for pos in 0..mesh.nodes.len() {
        let ipv4 = first_packet(None, &mesh.underlay_link(pos), "in", "ip", || {
            mesh.pod_matrix(ECHO_PORT, Duration::from_secs(10))
        })?;
        // tcpdump ends its output with a newline even when nothing came.
        assert!(
            ipv4.trim().is_empty(),
            "{} sent IPv4 on its underlay: {ipv4:?}",
            mesh.nodes[pos].name
        );
    }

    // A laptop with only IPv6, from `kubectl wgmesh peer add` against the API server on
    // [::1]: an IPv6 tunnel address from the IPv6 pool, the nodes' [v6]:51820 endpoints.
    let (laptop, _link) = mesh.outside_host("l", 0x32)?;
    let config = peer_add_laptop(&mesh)?;
    let parts = quick_parts(&config);
    let laptop_ips: Vec<IpAddr> = parts
        .addresses
        .iter()
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect();
    assert!(
        !laptop_ips.is_empty() && laptop_ips.iter().all(IpAddr::is_ipv6),
        "the laptop has IPv6 tunnel addresses only:\n{config}"
    );
    let endpoints: Vec<&str> = config
        .lines()
        .filter(|l| l.starts_with("Endpoint"))
        .collect();
    assert!(
        endpoints.len() == mesh.nodes.len()
            && endpoints
                .iter()
                .all(|l| l.starts_with(&format!("Endpoint = [{prefix6}:"))),
        "the laptop reaches every node at its IPv6 endpoint:\n{config}"
    );
    let _wggo = wireguard_go_from_config(&laptop, &format!("wgl{}", mesh.id), &config, mesh.dir())?;
    echo_server(&laptop, "[::]:7001".parse()?, usize::MAX)?;
    eventually("the laptop reaches every pod", || {
        for node in &mesh.nodes {
            echo_roundtrip(
                &laptop,
                SocketAddr::new(node.pod_ip.parse()?, ECHO_PORT),
                b"laptop".to_vec(),
                Duration::from_secs(2),
            )
            .with_context(|| format!("laptop -> {}", node.pod_ip))?;
        }
        Ok(())
    })?;
    eventually("every pod reaches the laptop", || {
        for node in &mesh.nodes {
            echo_roundtrip(
                &node.pod,
                SocketAddr::new(laptop_ips[0], 7001),
                b"pod".to_vec(),
                Duration::from_secs(2),
            )
            .with_context(|| format!("{} -> laptop {}", node.name, laptop_ips[0]))?;
        }
        Ok(())
    })?;

    let counts = watcher.poll()?;
    let plaintext: u64 = counts.iter().map(|c| c.plaintext).sum();
    let captured: u64 = counts.iter().map(|c| c.packets).sum();
    eprintln!("capture: {counts:?}");
    assert!(captured > 0, "the capture saw the traffic: {counts:?}");
    assert_eq!(plaintext, 0, "pod packets in plaintext: {counts:?}");
    Ok(())
}
