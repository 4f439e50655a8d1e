//! The userspace mesh end to end: three node namespaces running the real agent against the
//! real controller and API server, pods attached by the real CNI plugins, and a foreign
//! WireGuard peer (Debian's wireguard-go). Needs root.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use wgmesh_e2e::cluster;
use wgmesh_e2e::mesh::TestMesh;
use wgmesh_e2e::netns::{Netns, echo_roundtrip, echo_server, sh};
use wgmesh_e2e::process::ChildGuard;

const ECHO_PORT: u16 = 7000;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("a socket address")
}

/// Captures node `from`'s underlay link while pod `from` sends a marker to pod `to`: the
/// marker never appears, the transfer is WireGuard UDP, and nothing else crosses between
/// nodes (the controller's gRPC aside).
fn assert_transfer_encrypted(mesh: &TestMesh, from: usize, to: usize) -> Result<()> {
    let capture = mesh.cp.dir().join(format!("underlay-{from}-{to}.pcap"));
    let iface = format!("wgm{}v{}", mesh.id, mesh.nodes[from].index);
    let mut cmd = std::process::Command::new("tcpdump");
    cmd.args(["-i", &iface, "-U", "-n", "-w"]).arg(&capture);
    let mut tcpdump = ChildGuard::spawn("tcpdump", cmd, &mesh.cp.dir().join("tcpdump.log"))?;
    std::thread::sleep(Duration::from_millis(700));
    let marker = b"WGMESH-PLAINTEXT-MARKER-".repeat(4000);
    echo_roundtrip(
        &mesh.nodes[from].pod,
        addr(&mesh.nodes[to].pod_ip, ECHO_PORT),
        marker,
        Duration::from_secs(10),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    tcpdump.stop(Duration::from_secs(5));
    let read = |filter: &str| -> Result<String> {
        let mut args = vec!["-r", capture.to_str().unwrap(), "-n", "-A"];
        args.extend(filter.split_whitespace());
        sh("tcpdump", &args)
    };
    let all = read("")?;
    assert!(
        !all.contains("WGMESH-PLAINTEXT-MARKER"),
        "the marker crossed the underlay in plaintext"
    );
    let wireguard = read("udp port 51820")?;
    assert!(
        wireguard.lines().count() > 20,
        "the transfer went over WireGuard:\n{wireguard}"
    );
    let controller_host = format!("{}.254", mesh.underlay);
    let other = read(&format!(
        "ip and not udp port 51820 and not host {controller_host}"
    ))?;
    assert!(
        other.trim().is_empty(),
        "non-WireGuard traffic between nodes:\n{other}"
    );
    Ok(())
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

#[tokio::test]
async fn userspace_mesh_end_to_end() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the end-to-end mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let mut mesh = TestMesh::start(3).await?;
    mesh.wait_peer_counts(2, Duration::from_secs(90)).await?;
    for node in &mesh.nodes {
        echo_server(&node.pod, addr("0.0.0.0", ECHO_PORT), usize::MAX)?;
    }

    // 1. Every pod reaches every other pod.
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(30))?;

    // 2. On the underlay, a transfer of a marker shows only WireGuard UDP, never the marker.
    assert_transfer_encrypted(&mesh, 0, 1)?;

    // 3. wg show inside a node lists its peers with recent handshakes.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let peers = mesh.wg_peers(0)?;
    assert_eq!(peers.len(), 2, "{}", mesh.wg_dump(0)?);
    let key1 = mesh.public_key(1)?;
    let (_, hs) = peers
        .iter()
        .find(|(k, _)| *k == key1)
        .context("node-2 in wg show")?;
    assert!(
        now.saturating_sub(*hs) < 180,
        "recent handshake with node-2: {hs} vs {now}"
    );

    // 3b. The kubelet renews an agent's token: the agent opens its peer stream again with
    // it, which takes over before the old token expires (the controller ends a stream at its
    // token's expiry), without a new session.
    mesh.renew_agent_token(0).await?;
    wait_for(
        "node-1's stream on the renewed token",
        Duration::from_secs(30),
        || {
            Ok(mesh
                .agent_log(0)?
                .contains("the peer stream moved to the new one"))
        },
    )
    .await?;
    assert!(
        !mesh
            .agent_log(0)?
            .contains("the session with the controller ended"),
        "{}",
        mesh.agent_logs(20)
    );

    // 4. Restarting an agent keeps its public key; the other nodes' session is untouched.
    let key0 = mesh.public_key(0)?;
    let key2 = mesh.public_key(2)?;
    let between_1_and_2 = mesh
        .wg_peers(1)?
        .into_iter()
        .find(|(k, _)| *k == key2)
        .map(|(_, h)| h);
    mesh.stop_agent(0);
    mesh.start_agent(0)?;
    mesh.wait_peer_counts(2, Duration::from_secs(60)).await?;
    assert_eq!(
        mesh.public_key(0)?,
        key0,
        "the restarted agent kept its key"
    );
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(30))?;
    let after = mesh
        .wg_peers(1)?
        .into_iter()
        .find(|(k, _)| *k == key2)
        .map(|(_, h)| h);
    assert_eq!(
        after, between_1_and_2,
        "node-2 and node-3 kept their session"
    );

    // 5. Killing the controller leaves a running transfer unharmed; agents reconnect.
    let from = mesh.nodes[0].pod.name.clone();
    let target = addr(&mesh.nodes[2].pod_ip, ECHO_PORT);
    let transfer = std::thread::spawn(move || -> Result<()> {
        let ns = Netns { name: from };
        let r = (|| {
            for _ in 0..40 {
                echo_roundtrip(&ns, target, vec![7u8; 64 * 1024], Duration::from_secs(5))?;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        })();
        std::mem::forget(ns); // borrowed name: the mesh owns and deletes the namespace
        r
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    mesh.controller.as_mut().unwrap().kill();
    let transfer_result = tokio::task::spawn_blocking(move || transfer.join()).await?;
    transfer_result.map_err(|_| anyhow::anyhow!("the transfer thread panicked"))??;
    mesh.controller.as_mut().unwrap().restart().await?;

    // 6. Deleting a node removes its peer and routes from the others, and the node leaves:
    // its agent removes its interface, routes and guards (the mesh said so, a SIGTERM never
    // does); adding it back restores everything.
    cluster::delete_node(&mesh.client, "node-3").await?;
    wait_for("node-3 gone from node-1", Duration::from_secs(60), || {
        Ok(mesh.wg_peers(0)?.len() == 1 && !mesh.routes(0)?.contains("10.244.3.0/24"))
    })
    .await?;
    wait_for("node-3 left the mesh", Duration::from_secs(60), || {
        let link = mesh.nodes[2].ns.ip(&["-o", "link", "show"])?;
        let ours = mesh.nodes[2]
            .ns
            .ip(&["route", "show", "table", "all", "proto", "87"])?;
        Ok(!link.contains("wgmesh0") && ours.trim().is_empty())
    })
    .await?;
    cluster::create_node(
        &mesh.client,
        "node-3",
        &["10.244.3.0/24"],
        &mesh.nodes[2].node_ip.clone(),
        &[],
    )
    .await?;
    wait_for("node-3 back on node-1", Duration::from_secs(60), || {
        Ok(mesh.wg_peers(0)?.len() == 2 && mesh.routes(0)?.contains("10.244.3.0/24"))
    })
    .await?;
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(30))?;

    // 7. Key rotation by Node annotation: the agent makes a new key and the mesh learns it.
    let old_key = mesh.public_key(1)?;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(mesh.client.clone());
    let patch =
        json!({"metadata": {"annotations": {"wgmesh.io/rotate-key": "2026-11-21T00:00:00Z"}}});
    nodes
        .patch("node-2", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    wait_for(
        "node-2's new key on node-1",
        Duration::from_secs(30),
        || {
            let new_key = mesh.public_key(1)?;
            Ok(new_key != old_key && mesh.wg_peers(0)?.iter().any(|(k, _)| *k == new_key))
        },
    )
    .await?;
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(30))?;

    // 8. A foreign peer: Debian's wireguard-go, configured only with `wg`, peers with node-1.
    interop_with_wireguard_go(&mesh).await?;

    // Private keys stay on their node: never in a log, nor in the API.
    let objects = mesh
        .cp
        .kubectl_ok(&["get", "wgpeers,wgmeshes,nodes", "-o", "yaml"])?;
    for i in 0..mesh.nodes.len() {
        let private = mesh.private_key(i)?;
        assert!(
            !mesh.agent_log(i)?.contains(&private),
            "node {i}'s private key is in its log"
        );
        assert!(
            !objects.contains(&private),
            "node {i}'s private key is in the API"
        );
    }

    Ok(())
}

async fn interop_with_wireguard_go(mesh: &TestMesh) -> Result<()> {
    let (laptop, _veth) = mesh.outside_host("l", 50)?;
    let private = sh("wg", &["genkey"])?.trim().to_owned();
    let public = {
        let key: wgmesh_core::PrivateKey = private.parse()?;
        key.public_key().to_base64()
    };
    let peers: Api<wgmesh_api::WireGuardPeer> = Api::all(mesh.client.clone());
    let body = json!({
        "apiVersion": "wgmesh.io/v1alpha1", "kind": "WireGuardPeer",
        "metadata": {"name": "laptop"},
        "spec": {"publicKey": public, "persistentKeepalive": 5},
    });
    peers
        .patch(
            "laptop",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&body),
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let address = loop {
        if let Some(a) = peers
            .get("laptop")
            .await?
            .status
            .and_then(|s| s.addresses.first().cloned())
        {
            break a;
        }
        if Instant::now() > deadline {
            bail!("the laptop got no tunnel address");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let iface = format!("wgl{}", mesh.id);
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &laptop.name, "wireguard-go", "-f", &iface])
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
    let _wggo = ChildGuard::spawn("wireguard-go", cmd, &mesh.cp.dir().join("wireguard-go.log"))?;
    let socket = format!("/var/run/wireguard/{iface}.sock");
    wait_for("wireguard-go's socket", Duration::from_secs(10), || {
        Ok(std::path::Path::new(&socket).exists())
    })
    .await?;
    let key_file = mesh.cp.dir().join("laptop.key");
    std::fs::write(&key_file, &private)?;
    let node = &mesh.nodes[0];
    laptop.exec(
        "wg",
        &[
            "set",
            &iface,
            "private-key",
            key_file.to_str().unwrap(),
            "peer",
            &mesh.public_key(0)?,
            "endpoint",
            &format!("{}:51820", node.node_ip),
            "allowed-ips",
            "10.244.0.0/16,10.250.0.0/16",
            "persistent-keepalive",
            "5",
        ],
    )?;
    laptop.ip(&["addr", "add", &format!("{address}/32"), "dev", &iface])?;
    laptop.ip(&["link", "set", &iface, "mtu", "1420", "up"])?;
    laptop.ip(&["route", "add", "10.244.0.0/16", "dev", &iface])?;
    laptop.ip(&["route", "add", "10.250.0.0/16", "dev", &iface])?;

    // Laptop -> pod on node-1, and pod -> laptop.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match echo_roundtrip(
            &laptop,
            addr(&node.pod_ip, ECHO_PORT),
            b"hello from wireguard-go".to_vec(),
            Duration::from_secs(2),
        ) {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => {
                bail!(
                    "laptop -> pod: {e}\n{}\n{}",
                    laptop.exec("wg", &["show", &iface])?,
                    mesh.agent_logs(20)
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    echo_server(&laptop, addr(&address, 7001), usize::MAX)?;
    echo_roundtrip(
        &node.pod,
        addr(&address, 7001),
        b"hello from a pod".to_vec(),
        Duration::from_secs(5),
    )?;
    let show = laptop.exec("wg", &["show", &iface, "latest-handshakes"])?;
    assert!(
        !show.trim().ends_with("\t0"),
        "wireguard-go completed a handshake: {show}"
    );
    Ok(())
}
