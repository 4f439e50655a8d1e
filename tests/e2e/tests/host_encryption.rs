//! Host-to-host encryption (opt-in: `spec.hostEncryption` with `spec.fwmark`). The nodes'
//! own addresses join their peers' allowed IPs, so what a host-network pod (a process in the
//! node's own network namespace, as on a real node) sends to another node's address crosses
//! the tunnel: a capture on the underlay sees WireGuard, never the TCP stream. The tunnel's
//! own packets go to the same addresses and carry the mark, which keeps them out of the
//! tunnel; the control connection keeps working (an agent restarted with the option on gets
//! its peers back), and pod traffic is unaffected. In both network modes: CNI mode moves its
//! routes from the main table to the agent's table for it.
//!
//! The controller runs on a node's host network, as on a real cluster, in the last test: a
//! node that missed a new preshared key while its agent was down cannot handshake with any
//! other node, yet it still reaches the controller (which keeps the agents' connections out
//! of the tunnel, under TLS) and gets its tunnels back.
//!
//! Needs root.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use wgmesh_e2e::mesh::{MeshOptions, NetworkMode, TestMesh};
use wgmesh_e2e::netns::{echo_roundtrip, echo_server, first_packet};

const HOST_PORT: u16 = 7003;
const POD_PORT: u16 = 7004;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("a socket address")
}

#[tokio::test]
async fn e2e_host_encryption_cni_mode_host_traffic_crosses_the_tunnel() -> Result<()> {
    host_traffic_crosses_the_tunnel(NetworkMode::Cni).await
}

#[tokio::test]
async fn e2e_host_encryption_addon_mode_host_traffic_crosses_the_tunnel() -> Result<()> {
    host_traffic_crosses_the_tunnel(NetworkMode::Addon).await
}

async fn host_traffic_crosses_the_tunnel(mode: NetworkMode) -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let mut mesh = TestMesh::start_in(3, mode).await?;
    mesh.wait_peer_counts(2, Duration::from_secs(60)).await?;
    for node in &mesh.nodes {
        echo_server(&node.ns, addr(&node.node_ip, HOST_PORT), usize::MAX)?;
        echo_server(&node.pod, addr("0.0.0.0", POD_PORT), usize::MAX)?;
    }
    let (a_ip, b_ip) = (mesh.nodes[0].node_ip.clone(), mesh.nodes[1].node_ip.clone());
    let host_tcp = format!("tcp and port {HOST_PORT} and host {b_ip}");
    let a_to_b = |mesh: &TestMesh| {
        echo_roundtrip(
            &mesh.nodes[0].ns,
            addr(&b_ip, HOST_PORT),
            b"host to host".to_vec(),
            Duration::from_secs(2),
        )
    };

    // Off (the default): host traffic is the underlay's business, in plaintext.
    let seen = first_packet(None, &mesh.underlay_link(0), "inout", &host_tcp, || {
        a_to_b(&mesh)
    })?;
    assert!(
        !seen.trim().is_empty(),
        "without host encryption the hosts talk over the underlay"
    );

    mesh.patch_mesh_spec(serde_json::json!({
        "fwmark": { "mark": 0x5157 },
        "hostEncryption": true,
    }))
    .await?;
    let b_host_route = format!("{b_ip}/32");
    eventually("node a routes b's address into the tunnel", || {
        let dump = mesh.wg_dump(0)?;
        let routes = mesh.nodes[0].ns.ip(&["route", "show", "table", "all"])?;
        if dump.contains(&b_host_route) && routes.contains(&format!("{b_ip} dev wgmesh0")) {
            Ok(())
        } else {
            bail!("not yet:\n{dump}\n{routes}")
        }
    })?;

    // On: the same exchange, both ways, shows no TCP on the underlay; WireGuard carries it.
    for (from, to, link) in [(0, &b_ip, 0), (1, &a_ip, 1)] {
        let filter = format!("tcp and port {HOST_PORT} and host {to}");
        let seen = first_packet(None, &mesh.underlay_link(link), "inout", &filter, || {
            eventually("host to host through the tunnel", || {
                echo_roundtrip(
                    &mesh.nodes[from].ns,
                    addr(to, HOST_PORT),
                    b"host to host".to_vec(),
                    Duration::from_secs(2),
                )
            })
        })?;
        // tcpdump stopped by `timeout` prints a bare newline.
        assert!(
            seen.trim().is_empty(),
            "host traffic to {to} left in plaintext: {seen:?}\n{}",
            mesh.agent_logs(10)
        );
    }
    let udp = format!("udp and host {b_ip}");
    let seen = first_packet(None, &mesh.underlay_link(0), "inout", &udp, || {
        a_to_b(&mesh)
    })?;
    assert!(
        !seen.trim().is_empty(),
        "the tunnel carries host traffic as UDP"
    );

    // Pods are unaffected, and an agent restarted with the option on reaches the controller
    // and gets its tunnels back: its own packets to the other nodes' addresses never loop.
    mesh.pod_matrix(POD_PORT, Duration::from_secs(20))?;
    let before = registrations(&mesh, 2)?;
    mesh.kill_agent(2);
    mesh.start_agent(2)?;
    mesh.wait_peer_counts(2, Duration::from_secs(60)).await?;
    let c_ip = mesh.nodes[2].node_ip.clone();
    eventually("a to the restarted node's host", || {
        echo_roundtrip(
            &mesh.nodes[0].ns,
            addr(&c_ip, HOST_PORT),
            b"after a restart".to_vec(),
            Duration::from_secs(2),
        )
    })?;
    eventually("the restarted agent registers with the controller", || {
        if registrations(&mesh, 2)? > before {
            Ok(())
        } else {
            bail!("not yet:\n{}", mesh.agent_log(2)?)
        }
    })?;
    mesh.pod_matrix(POD_PORT, Duration::from_secs(20))?;

    // Strict reverse-path filtering on a node's underlay (RHEL's default) drops what the
    // other nodes send from addresses routed into the tunnel, ARP included: the agent says
    // what to set, within one repair (10 s).
    for conf in ["all", "eth0"] {
        mesh.nodes[0]
            .ns
            .sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "1")?;
    }
    let warned = Instant::now() + Duration::from_secs(30);
    while !mesh.agent_log(0)?.contains("strict reverse-path filtering") {
        if Instant::now() > warned {
            bail!(
                "no warning about rp_filter:
{}",
                mesh.agent_log(0)?
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for conf in ["all", "eth0"] {
        mesh.nodes[0]
            .ns
            .sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "2")?;
    }
    eventually("loose reverse-path filtering works", || a_to_b(&mesh))?;

    // Off again: the host routes go, and host traffic is plain underlay traffic once more.
    mesh.patch_mesh_spec(serde_json::json!({ "hostEncryption": false }))
        .await?;
    eventually("node a stops routing b's address into the tunnel", || {
        let dump = mesh.wg_dump(0)?;
        if dump.contains(&b_host_route) {
            bail!("still there:\n{dump}")
        }
        a_to_b(&mesh)
    })?;
    // The mark stays: the routes to peers stay in the agent's table behind `not fwmark`, in
    // CNI mode too, and pods still reach each other.
    mesh.pod_matrix(POD_PORT, Duration::from_secs(20))?;
    Ok(())
}

#[tokio::test]
async fn e2e_host_encryption_a_node_that_missed_a_preshared_key_still_reaches_the_controller()
-> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    const SECRETS_NAMESPACE: &str = "wgmesh-secrets";
    const SECRET: &str = "mesh-psk";
    // The controller on node c's host network; the agents reach it through its Service IP,
    // which every node translates as kube-proxy does.
    let mut mesh = TestMesh::start_with(
        3,
        MeshOptions {
            controller_on_node: Some(3),
            ..Default::default()
        },
    )
    .await?;
    mesh.wait_peer_counts(2, Duration::from_secs(60)).await?;
    let secrets: Api<Secret> = Api::namespaced(mesh.client.clone(), SECRETS_NAMESPACE);
    let secret = |value: &str| -> Result<Secret> {
        Ok(serde_json::from_value(serde_json::json!({
            "metadata": {"name": SECRET},
            "stringData": {"presharedKey": value},
        }))?)
    };
    secrets
        .create(&PostParams::default(), &secret("the first mesh secret")?)
        .await?;
    // A mark without kube-proxy's masquerade bit (0x4000), which its translation of the
    // Service IP ORs into the agent's mark.
    mesh.patch_mesh_spec(serde_json::json!({
        "fwmark": { "mark": 0x1157 },
        "hostEncryption": true,
        "presharedKey": {"namespace": SECRETS_NAMESPACE, "name": SECRET},
    }))
    .await?;
    for node in &mesh.nodes {
        echo_server(&node.ns, addr(&node.node_ip, HOST_PORT), usize::MAX)?;
    }
    let (a_ip, c_ip) = (mesh.nodes[0].node_ip.clone(), mesh.nodes[2].node_ip.clone());
    // Node `i`'s preshared key for the peer whose allowed IPs hold `ip`.
    let psk = |mesh: &TestMesh, i: usize, ip: &str| -> Result<String> {
        let dump = mesh.wg_dump(i)?;
        dump.lines()
            .skip(1)
            .find(|l| l.contains(&format!("{ip}/32")))
            .and_then(|l| l.split('\t').nth(1))
            .filter(|k| *k != "(none)")
            .map(str::to_owned)
            .with_context(|| format!("no preshared key for {ip} on node {i}:\n{dump}"))
    };
    eventually(
        "a routes c's address into the tunnel, with a preshared key",
        || {
            psk(&mesh, 0, &c_ip)?;
            let routes = mesh.nodes[0].ns.ip(&["route", "show", "table", "all"])?;
            if !routes.contains(&format!("{c_ip} dev wgmesh0")) {
                bail!("not yet:\n{routes}");
            }
            echo_roundtrip(
                &mesh.nodes[0].ns,
                addr(&c_ip, HOST_PORT),
                b"before".to_vec(),
                Duration::from_secs(2),
            )
        },
    )?;

    // a's agent is down while the mesh's secret changes: b and c move to new preshared keys
    // for a, which comes back with the old ones (saved, programmed again at start) and can
    // handshake with nobody. Its connection to the controller goes to c's address.
    let old = psk(&mesh, 2, &a_ip)?;
    mesh.kill_agent(0);
    secrets
        .patch(
            SECRET,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {"presharedKey": "the second one"}})),
        )
        .await?;
    eventually("c has a new preshared key for a", || {
        if psk(&mesh, 2, &a_ip)? == old {
            bail!("not yet")
        }
        Ok(())
    })?;
    let before = registrations(&mesh, 0)?;
    mesh.start_agent(0)?;
    eventually(
        "the agent that missed the new key registers with the controller",
        || {
            if registrations(&mesh, 0)? > before {
                Ok(())
            } else {
                bail!("not yet:\n{}", mesh.agent_log(0)?)
            }
        },
    )?;
    // It got the new key: the hosts talk through the tunnel again, never in plaintext.
    let filter = format!("tcp and port {HOST_PORT} and host {c_ip}");
    let seen = first_packet(None, &mesh.underlay_link(0), "inout", &filter, || {
        eventually("a to c's host through the tunnel", || {
            echo_roundtrip(
                &mesh.nodes[0].ns,
                addr(&c_ip, HOST_PORT),
                b"after".to_vec(),
                Duration::from_secs(2),
            )
        })
    })?;
    assert!(
        seen.trim().is_empty(),
        "host traffic to {c_ip} left in plaintext: {seen:?}"
    );
    assert_eq!(
        psk(&mesh, 0, &c_ip)?,
        psk(&mesh, 2, &a_ip)?,
        "both ends agree"
    );
    Ok(())
}

/// How often node `i`'s agent has registered with the controller, by its log.
fn registrations(mesh: &TestMesh, i: usize) -> Result<usize> {
    Ok(mesh.agent_log(i)?.matches("registered").count())
}

fn eventually(what: &str, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e).context(what.to_owned()),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}
