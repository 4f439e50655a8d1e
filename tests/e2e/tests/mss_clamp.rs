//! Large transfers through the tunnel without path MTU discovery. In add-on mode pods keep
//! the other CNI's 1500-byte interfaces while the tunnel's MTU is 1420 (a 1500-byte
//! underlay less WireGuard's overhead), so full-size TCP segments only fit once the sender
//! learns the smaller MTU from an ICMP "fragmentation needed", which many networks filter.
//! Here every node drops those ICMP messages:
//! - with the agents' MSS clamping (the default) a 2 MiB exchange between pods on different
//!   nodes completes, and the pods' handshakes carry the clamped MSS;
//! - with `agent.clampMSS: false` the same exchange stalls: the black hole the clamping
//!   prevents.
//!
//! In CNI mode our plugin makes the pods' interfaces with the tunnel's MTU, so the same
//! exchange completes without clamping.
//!
//! Needs root.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use serde_json::json;
use wgmesh_e2e::mesh::{MeshOptions, NetworkMode, TestMesh};
use wgmesh_e2e::netns::{Netns, echo_roundtrip, echo_server, first_packet};

const ECHO_PORT: u16 = 7000;
const TRANSFER: usize = 2 * 1024 * 1024;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// An add-on mesh of two nodes whose nodes drop ICMP "fragmentation needed", with echo
/// servers in the pods.
async fn mesh(clamp: bool) -> Result<TestMesh> {
    let mesh = TestMesh::start_with(
        2,
        MeshOptions {
            mode: NetworkMode::Addon,
            values: json!({"agent": {"clampMSS": clamp}}),
            ..Default::default()
        },
    )
    .await?;
    mesh.wait_peer_counts(1, Duration::from_secs(60)).await?;
    for node in &mesh.nodes {
        drop_frag_needed(&node.ns)?;
        let pod_mtu = node.pod.ip(&["link", "show", "eth0"])?;
        assert!(
            pod_mtu.contains("mtu 1500"),
            "the other CNI's pods: {pod_mtu}"
        );
        echo_server(&node.pod, pod_addr(&node.pod_ip), usize::MAX)?;
    }
    let tunnel = mesh.nodes[0].ns.ip(&["link", "show", "wgmesh0"])?;
    assert!(tunnel.contains("mtu 1420"), "the tunnel: {tunnel}");
    Ok(mesh)
}

/// Makes the node drop the ICMP "fragmentation needed" it would send: path MTU discovery
/// fails, as on networks that filter ICMP.
fn drop_frag_needed(ns: &Netns) -> Result<()> {
    ns.exec(
        "iptables-nft",
        &[
            "-A",
            "OUTPUT",
            "-p",
            "icmp",
            "--icmp-type",
            "fragmentation-needed",
            "-j",
            "DROP",
        ],
    )?;
    Ok(())
}

fn pod_addr(ip: &str) -> SocketAddr {
    format!("{ip}:{ECHO_PORT}")
        .parse()
        .expect("a socket address")
}

#[tokio::test]
async fn e2e_pod_mtu_clamped_handshakes_keep_large_transfers_flowing_without_pmtud() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let mesh = mesh(true).await?;
    let (a, b) = (&mesh.nodes[0], &mesh.nodes[1]);
    // The SYN as it reaches node-2's pod: clamped to 1420 - 40.
    let syn = first_packet(
        Some(&b.pod),
        "eth0",
        "in",
        &format!("tcp[tcpflags] & tcp-syn != 0 and dst port {ECHO_PORT}"),
        || {
            echo_roundtrip(
                &a.pod,
                pod_addr(&b.pod_ip),
                vec![7; TRANSFER],
                Duration::from_secs(20),
            )
        },
    )?;
    assert!(syn.contains("mss 1380"), "the SYN's MSS is clamped: {syn}");
    // And the other way.
    echo_roundtrip(
        &b.pod,
        pod_addr(&a.pod_ip),
        vec![8; TRANSFER],
        Duration::from_secs(20),
    )?;
    Ok(())
}

#[tokio::test]
async fn e2e_pod_mtu_without_clamping_the_same_transfer_black_holes() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let mesh = mesh(false).await?;
    let (a, b) = (&mesh.nodes[0], &mesh.nodes[1]);
    // Small messages still pass: the path works, only full-size segments do not.
    echo_roundtrip(
        &a.pod,
        pod_addr(&b.pod_ip),
        b"small".to_vec(),
        Duration::from_secs(10),
    )?;
    let large = echo_roundtrip(
        &a.pod,
        pod_addr(&b.pod_ip),
        vec![7; TRANSFER],
        Duration::from_secs(10),
    );
    assert!(
        large.is_err(),
        "without clamping and without ICMP, full-size segments never fit the tunnel"
    );
    Ok(())
}

/// In CNI mode our plugin makes the pods' interfaces: they get the tunnel's MTU, so no segment
/// is ever too large for the tunnel and no ICMP is needed, clamping or not.
#[tokio::test]
async fn e2e_pod_mtu_cni_pods_get_the_tunnel_mtu() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let mesh = TestMesh::start_with(
        2,
        MeshOptions {
            mode: NetworkMode::Cni,
            values: json!({"agent": {"clampMSS": false}}),
            ..Default::default()
        },
    )
    .await?;
    mesh.wait_peer_counts(1, Duration::from_secs(60)).await?;
    let tunnel = mesh.nodes[0].ns.ip(&["link", "show", "wgmesh0"])?;
    assert!(tunnel.contains("mtu 1420"), "the tunnel: {tunnel}");
    for node in &mesh.nodes {
        drop_frag_needed(&node.ns)?;
        let pod_link = node.pod.ip(&["link", "show", "eth0"])?;
        assert!(
            pod_link.contains("mtu 1420"),
            "{}: the pod's interface has the tunnel's MTU: {pod_link}",
            node.name
        );
        echo_server(&node.pod, pod_addr(&node.pod_ip), usize::MAX)?;
    }
    let (a, b) = (&mesh.nodes[0], &mesh.nodes[1]);
    echo_roundtrip(
        &a.pod,
        pod_addr(&b.pod_ip),
        vec![9; TRANSFER],
        Duration::from_secs(20),
    )?;
    echo_roundtrip(
        &b.pod,
        pod_addr(&a.pod_ip),
        vec![10; TRANSFER],
        Duration::from_secs(20),
    )?;
    Ok(())
}
