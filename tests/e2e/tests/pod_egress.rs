//! Pods reaching the world. A host outside the mesh sits on the nodes' network and, like
//! anything outside a cluster, has no route to pod CIDRs:
//! - in CNI mode (masquerade on by default) every pod reaches it, and it sees the node's
//!   address as the source, while pod-to-pod traffic across the tunnel keeps the pod's own
//!   address;
//! - in add-on mode wgmesh leaves egress to the other CNI: the pods' packets reach the host
//!   with their pod address (this harness's stand-in CNI does not masquerade), so its
//!   answers go nowhere.
//!
//! Needs root.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wgmesh_e2e::mesh::{NetworkMode, TestMesh};
use wgmesh_e2e::netns::{echo_roundtrip, echo_server, first_packet};

const ECHO_PORT: u16 = 7000;
const OUTSIDE_PORT: u16 = 7002;
const OUTSIDE_OCTET: u8 = 60;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("a socket address")
}

#[tokio::test]
async fn e2e_pod_egress_cni_mode_masquerades_pod_egress_and_nothing_else() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let mesh = TestMesh::start(3).await?;
    mesh.wait_peer_counts(2, Duration::from_secs(60)).await?;
    for node in &mesh.nodes {
        echo_server(&node.pod, addr("0.0.0.0", ECHO_PORT), usize::MAX)?;
    }
    let (outside, link) = mesh.outside_host("x", OUTSIDE_OCTET)?;
    let outside_ip = format!("{}.{OUTSIDE_OCTET}", mesh.underlay);
    echo_server(&outside, addr("0.0.0.0", OUTSIDE_PORT), usize::MAX)?;
    let routes = outside.ip(&["route", "show"])?;
    assert!(
        !routes.contains("default") && !routes.contains("10.244."),
        "the outside host has no way back to pods: {routes}"
    );

    for (pos, node) in mesh.nodes.iter().enumerate() {
        let filter = format!("tcp and dst port {OUTSIDE_PORT} and dst host {outside_ip}");
        let seen = first_packet(None, &link.name, "out", &filter, || {
            eventually(&format!("{} pod -> outside host", node.name), || {
                echo_roundtrip(
                    &node.pod,
                    addr(&outside_ip, OUTSIDE_PORT),
                    b"out".to_vec(),
                    Duration::from_secs(2),
                )
            })
        })?;
        assert!(
            seen.contains(&format!("{}.", node.node_ip)) && !seen.contains(&node.pod_ip),
            "the outside host sees {}'s address, not the pod's: {seen}",
            node.name
        );
        // Across the tunnel, the pod's own address.
        let next = &mesh.nodes[(pos + 1) % mesh.nodes.len()];
        let filter = format!("tcp and dst port {ECHO_PORT} and src host {}", node.pod_ip);
        let seen = first_packet(Some(&next.pod), "eth0", "in", &filter, || {
            echo_roundtrip(
                &node.pod,
                addr(&next.pod_ip, ECHO_PORT),
                b"across".to_vec(),
                Duration::from_secs(5),
            )
        })?;
        assert!(
            seen.contains(&node.pod_ip),
            "{}'s pod sees {}'s pod address: {seen}",
            next.name,
            node.name
        );
    }
    Ok(())
}

#[tokio::test]
async fn e2e_pod_egress_addon_mode_leaves_it_to_the_other_cni() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let mesh = TestMesh::start_in(2, NetworkMode::Addon).await?;
    mesh.wait_peer_counts(1, Duration::from_secs(60)).await?;
    let (outside, link) = mesh.outside_host("x", OUTSIDE_OCTET)?;
    let outside_ip = format!("{}.{OUTSIDE_OCTET}", mesh.underlay);
    echo_server(&outside, addr("0.0.0.0", OUTSIDE_PORT), usize::MAX)?;
    let node = &mesh.nodes[0];
    let filter = format!("tcp and dst port {OUTSIDE_PORT}");
    let seen = first_packet(None, &link.name, "out", &filter, || {
        let reached = echo_roundtrip(
            &node.pod,
            addr(&outside_ip, OUTSIDE_PORT),
            b"out".to_vec(),
            Duration::from_secs(2),
        );
        if reached.is_ok() {
            bail!("the pod reached a host with no route back: something masqueraded it");
        }
        Ok(())
    })?;
    assert!(
        seen.contains(&node.pod_ip),
        "the outside host sees the pod's own address: {seen}"
    );

    // Something else removes the mesh's rule, a guard and the nftables table (as
    // systemd-networkd does with rules and routes it did not make, or `nft flush ruleset`):
    // the agent puts them back on its own, with no change of the mesh.
    let rule = node
        .ns
        .ip(&["rule", "show"])?
        .lines()
        .find(|l| l.contains("lookup 51820"))
        .map(str::to_owned)
        .context("the mesh's rule")?;
    let priority = rule.split(':').next().unwrap_or_default().trim().to_owned();
    let guard = node
        .ns
        .ip(&["route", "show", "table", "51820"])?
        .lines()
        .find(|l| l.starts_with("blackhole"))
        .map(str::to_owned)
        .context("a guard route")?;
    node.ns
        .ip(&["rule", "del", "priority", &priority, "table", "51820"])?;
    let guard_args: Vec<&str> = guard.split_whitespace().collect();
    let mut del = vec!["route", "del", "table", "51820"];
    del.extend(&guard_args);
    node.ns.ip(&del)?;
    let had_table = node
        .ns
        .exec("nft", &["list", "table", "inet", "wgmesh"])
        .is_ok();
    if had_table {
        node.ns
            .exec("nft", &["delete", "table", "inet", "wgmesh"])?;
    }
    eventually("the rule, the guard and the table back", || {
        let rules = node.ns.ip(&["rule", "show"])?;
        let routes = node.ns.ip(&["route", "show", "table", "51820"])?;
        if !rules.contains("lookup 51820") {
            bail!("no rule yet:\n{rules}");
        }
        if !routes.lines().any(|l| l.trim() == guard.trim()) {
            bail!("no guard {guard} yet:\n{routes}");
        }
        if had_table {
            node.ns.exec("nft", &["list", "table", "inet", "wgmesh"])?;
        }
        Ok(())
    })?;
    Ok(())
}

fn eventually(what: &str, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e).context(what.to_owned()),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}
