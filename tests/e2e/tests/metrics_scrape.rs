//! The agent's metrics as a cluster scrapes them: at the node's address (where the chart binds
//! them, as node exporters do), from elsewhere on the underlay; per-peer byte counters that
//! grow with traffic (also while the controller is gone), the handshake age and the endpoint
//! per peer, and no secret in them.
//! Needs root.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wgmesh_e2e::mesh::TestMesh;
use wgmesh_e2e::netns::{self, echo_roundtrip, echo_server};

const ECHO_PORT: u16 = 7000;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("a socket address")
}

async fn wait_for<F: Fn() -> Result<bool>>(what: &str, timeout: Duration, f: F) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if f()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The value of `name{...,public_key="<key>"}` in Prometheus text.
fn metric(text: &str, name: &str, key: &str) -> Option<f64> {
    let label = format!("public_key=\"{key}\"");
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

/// 64 KiB from node-1's pod to node-2's and back.
fn traffic(mesh: &TestMesh) -> Result<()> {
    echo_roundtrip(
        &mesh.nodes[0].pod,
        addr(&mesh.nodes[1].pod_ip, ECHO_PORT),
        vec![1; 64 * 1024],
        Duration::from_secs(10),
    )?;
    Ok(())
}

#[tokio::test]
async fn e2e_metrics_scrape_from_the_node_address() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let mut mesh = TestMesh::start(3).await?;
    mesh.wait_peer_counts(2, Duration::from_secs(90)).await?;
    for node in &mesh.nodes {
        echo_server(&node.pod, addr("0.0.0.0", ECHO_PORT), usize::MAX)?;
    }
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(30))?;
    traffic(&mesh)?;

    // The agent's metrics and health, scraped as Prometheus would: from elsewhere on the
    // underlay (the router's namespace), at the node's address, where the chart binds them.
    let scrape_at: std::net::SocketAddr = format!("{}:9091", mesh.nodes[0].node_ip).parse()?;
    for path in ["/healthz", "/livez"] {
        let health = netns::http_get_at(&mesh.router, scrape_at, path)?;
        assert_eq!(health.trim(), "ok", "{path}");
    }
    let scrape = || netns::http_get_at(&mesh.router, scrape_at, "/metrics");
    let metrics = scrape()?;
    assert!(metrics.contains("wgmesh_agent_peers 2"), "{metrics}");
    let peer1 = mesh.public_key(1)?;
    // Reported every 2 s (the harness's reportInterval): wait for a reading after traffic.
    let rx = std::cell::Cell::new(0.0);
    wait_for(
        "rx bytes from node-2 in the metrics",
        Duration::from_secs(15),
        || {
            rx.set(
                metric(&scrape()?, "wgmesh_agent_peer_receive_bytes_total", &peer1).unwrap_or(0.0),
            );
            Ok(rx.get() > 0.0)
        },
    )
    .await?;
    traffic(&mesh)?;
    wait_for(
        "rx bytes growing after more traffic",
        Duration::from_secs(15),
        || {
            let now = metric(&scrape()?, "wgmesh_agent_peer_receive_bytes_total", &peer1);
            Ok(now.is_some_and(|n| n > rx.get()))
        },
    )
    .await?;
    let metrics = scrape()?;
    let tx = metric(&metrics, "wgmesh_agent_peer_transmit_bytes_total", &peer1);
    assert!(tx.is_some_and(|t| t > 0.0), "tx to {peer1}:\n{metrics}");
    let age = metric(&metrics, "wgmesh_agent_peer_handshake_age_seconds", &peer1);
    assert!(
        age.is_some_and(|a| a < 180.0),
        "handshake age of {peer1}:\n{metrics}"
    );
    let endpoint = metrics
        .lines()
        .find(|l| {
            l.starts_with("wgmesh_agent_peer_endpoint_info{")
                && l.contains(&format!("public_key=\"{peer1}\""))
        })
        .with_context(|| format!("endpoint of {peer1}:\n{metrics}"))?;
    let want = format!("endpoint=\"{}:", mesh.nodes[1].node_ip);
    assert!(endpoint.contains(&want), "{endpoint} has {want}PORT");
    // No secret: the node's private key (from its key file) nor any preshared key.
    assert!(
        !metrics.contains(&mesh.private_key(0)?),
        "private key in metrics"
    );
    for psk in mesh
        .wg_dump(0)?
        .lines()
        .skip(1)
        .filter_map(|l| l.split('\t').nth(1))
    {
        assert!(
            psk == "(none)" || !metrics.contains(psk),
            "preshared key in metrics"
        );
    }

    // Without the controller the tunnels carry on, and the counters keep counting.
    mesh.controller.as_mut().context("the controller")?.kill();
    wait_for(
        "the agent to notice the controller is gone",
        Duration::from_secs(30),
        || Ok(scrape()?.contains("wgmesh_agent_controller_connected 0")),
    )
    .await?;
    let before = metric(&scrape()?, "wgmesh_agent_peer_receive_bytes_total", &peer1)
        .context("rx counter")?;
    traffic(&mesh)?;
    wait_for(
        "rx bytes growing while the controller is gone",
        Duration::from_secs(15),
        || {
            let now = metric(&scrape()?, "wgmesh_agent_peer_receive_bytes_total", &peer1);
            Ok(now.is_some_and(|n| n > before))
        },
    )
    .await?;
    mesh.controller
        .as_mut()
        .context("the controller")?
        .restart()
        .await?;
    Ok(())
}
