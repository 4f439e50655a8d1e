//! `kubectl wgmesh graph` end to end, with the real `kubectl-wgmesh` binary against the test
//! API server: three nodes, node-1 the only gateway, and a laptop on Debian's wireguard-go
//! that handshakes with it. The DOT names every node and the laptop, marks the gateway, and
//! labels every node pair with the age of a recent handshake; the SVG parses as XML and names
//! them all. Needs root.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wgmesh_e2e::cli::Cli;
use wgmesh_e2e::foreign::wireguard_go_from_config;
use wgmesh_e2e::mesh::TestMesh;
use wgmesh_e2e::netns::{echo_roundtrip, echo_server};

const ECHO_PORT: u16 = 7000;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("a socket address")
}

/// Retries `f` until it succeeds or `timeout` passes.
fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => bail!("{what}: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// A DOT vertex line's id and label: `    m0_v1 [label="node-2", ...];`.
fn vertex(line: &str) -> Option<(&str, &str)> {
    let (id, rest) = line.trim().split_once(" [label=\"")?;
    if id.contains(' ') {
        return None; // an edge: `a -> b [label=...`
    }
    let (label, _) = rest.split_once('"')?;
    Some((id, label))
}

/// A handshake age as the graph prints it: `12s`, `3m`, `1h`, `2d`.
fn is_age(s: &str) -> bool {
    s.strip_suffix(['s', 'm', 'h', 'd'])
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[tokio::test(flavor = "multi_thread")]
async fn e2e_graph_of_three_nodes_and_a_laptop() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the end-to-end mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    // The binary first (a build, maybe), then the cluster it talks to.
    let mut cli = Cli::new(PathBuf::new())?;
    let mesh = TestMesh::start(3).await?;
    cli.kubeconfig = mesh.cp.kubeconfig().to_owned();
    let dir = mesh.cp.dir().to_owned();
    mesh.wait_peer_counts(2, Duration::from_secs(90)).await?;
    for node in &mesh.nodes {
        echo_server(&node.pod, addr("0.0.0.0", ECHO_PORT), usize::MAX)?;
    }
    // Traffic between every pair of nodes, so each pair handshakes.
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(30))?;

    // node-1 the only gateway.
    mesh.cp
        .kubectl_ok(&["label", "node", "node-1", "wgmesh.io/gateway=true"])?;
    mesh.patch_mesh_spec(serde_json::json!({
        "gatewaySelector": {"matchLabels": {"wgmesh.io/gateway": "true"}}
    }))
    .await?;
    eventually(
        "node-1 is the only gateway",
        Duration::from_secs(20),
        || {
            let out = mesh.cp.kubectl_ok(&[
                "get",
                "wireguardmesh",
                "default",
                "-o",
                "jsonpath={.status.gateways}",
            ])?;
            if out.trim() != r#"["node-1"]"# {
                bail!("gateways {out}");
            }
            Ok(())
        },
    )?;

    // A laptop through node-1.
    let (laptop, _laptop_link) = mesh.outside_host("l", 50)?;
    let config = cli.ok(&[
        "peer",
        "add",
        "laptop",
        "--client-allowed-ips",
        "10.96.0.0/16",
        "--keepalive",
        "5",
    ])?;
    assert_eq!(config.matches("[Peer]").count(), 1, "one gateway: {config}");
    let iface = format!("wgl{}", mesh.id);
    let _wggo = wireguard_go_from_config(&laptop, &iface, &config, &dir)?;
    let pod = addr(&mesh.nodes[1].pod_ip, ECHO_PORT);
    eventually("laptop -> node-2's pod", Duration::from_secs(30), || {
        echo_roundtrip(&laptop, pod, b"laptop".to_vec(), Duration::from_secs(2))
    })
    .with_context(|| mesh.agent_logs(20))?;

    // The DOT, once the status has the laptop's handshake and every node pair's.
    let mut dot = String::new();
    eventually(
        "graph shows the laptop's and every node pair's handshakes",
        Duration::from_secs(90),
        || {
            // Keeps the pairs' sessions fresh while the status catches up.
            mesh.pod_matrix(ECHO_PORT, Duration::from_secs(5))?;
            dot = cli.ok(&["graph"])?;
            let ids: Vec<(&str, &str)> = dot.lines().filter_map(vertex).collect();
            let id = |label: &str| {
                ids.iter()
                    .find(|(_, l)| *l == label)
                    .map(|(id, _)| *id)
                    .with_context(|| format!("no vertex {label:?} in\n{dot}"))
            };
            let gateway = id("node-1\\ngateway")?;
            let nodes = [gateway, id("node-2")?, id("node-3")?];
            let laptop = id("laptop\\nexternal")?;
            if ids.len() != 4 {
                bail!("not 4 vertices in\n{dot}");
            }
            for (i, a) in nodes.iter().enumerate() {
                for b in &nodes[i + 1..] {
                    let edge = dot
                        .lines()
                        .map(str::trim)
                        .find(|l| {
                            l.starts_with(&format!("{a} -> {b} "))
                                || l.starts_with(&format!("{b} -> {a} "))
                        })
                        .with_context(|| format!("no edge {a} -- {b} in\n{dot}"))?;
                    let label = edge
                        .split_once("label=\"")
                        .and_then(|(_, r)| r.split_once('"'))
                        .map(|(l, _)| l)
                        .context("an edge without a label")?;
                    if !is_age(label) || edge.contains("dashed") || !edge.contains("dir=none") {
                        bail!("edge {edge} is not a recent handshake in\n{dot}");
                    }
                }
            }
            let edge = format!("{laptop} -> {gateway} [label=\"");
            let line = dot
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with(&edge))
                .with_context(|| format!("no edge {edge} in\n{dot}"))?;
            if line.contains("dashed") {
                bail!("the laptop's handshake is not recent: {line}");
            }
            Ok(())
        },
    )
    .with_context(|| cli.ok(&["status"]).unwrap_or_default())?;
    eprintln!("--- graph -o dot ---\n{dot}");
    assert!(dot.starts_with("digraph wgmesh {"), "{dot}");
    assert!(dot.contains("label=\"mesh default\";"), "{dot}");
    assert!(
        dot.contains("style=\"filled,bold\", fillcolor=\"lightblue\""),
        "the gateway is marked: {dot}"
    );
    // The same vertices with --mesh (the edges' ages may have moved on by a second).
    let vertices = |dot: &str| -> Vec<String> {
        dot.lines()
            .filter(|l| vertex(l).is_some())
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        vertices(&cli.ok(&["graph", "--mesh", "default", "-o", "dot"])?),
        vertices(&dot)
    );

    // The SVG: XML, with every name in it.
    let svg = cli.ok(&["graph", "-o", "svg"])?;
    std::fs::write(dir.join("mesh.svg"), &svg)?;
    let doc = roxmltree::Document::parse(&svg).with_context(|| format!("the SVG:\n{svg}"))?;
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect();
    for want in ["node-1", "gateway", "node-2", "node-3", "laptop"] {
        assert!(
            texts.contains(&want),
            "no {want:?} in the SVG's text {texts:?}"
        );
    }
    assert!(
        texts.iter().filter(|t| is_age(t)).count() >= 4,
        "the edges' handshake ages: {texts:?}"
    );
    eprintln!("the SVG: {} bytes", svg.len());

    // A mesh that does not exist: exit code 4.
    let out = cli.run(&["graph", "--mesh", "nope"])?;
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    Ok(())
}
