//! External peers end to end, driven by the real `kubectl-wgmesh` binary against the test API
//! server: a "laptop" running Debian's wireguard-go, set up only from the config `peer add`
//! prints, reaches pods on every node and is reached from them; a "remote office" router with
//! its own LAN, attached to the one gateway node, routes that LAN to and from every pod; `status`
//! shows both with handshakes; deleting a peer cuts it off. Needs root.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use wgmesh_e2e::cli::Cli;
use wgmesh_e2e::foreign::{quick_parts, wireguard_go_from_config};
use wgmesh_e2e::mesh::TestMesh;
use wgmesh_e2e::netns::{Netns, echo_roundtrip, echo_server, veth_between};

const ECHO_PORT: u16 = 7000;
const PEER_ECHO_PORT: u16 = 7001;

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

/// Every (from, to) pair must fail to connect.
fn cut_off(from: &Netns, to: &[SocketAddr]) -> Result<()> {
    for t in to {
        if echo_roundtrip(from, *t, b"still there?".to_vec(), Duration::from_secs(1)).is_ok() {
            bail!("{} still reaches {t}", from.name);
        }
    }
    Ok(())
}

/// Waits until `status -o json` shows peer `name` Ready with a handshake from each of `nodes`.
fn status_shows(cli: &Cli, name: &str, nodes: &[&str], timeout: Duration) -> Result<()> {
    eventually(
        &format!("status shows {name} with handshakes from {nodes:?}"),
        timeout,
        || {
            let out = cli.run(&["status", "--mesh", "default", "-o", "json"])?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let row = v["peers"]
                .as_array()
                .and_then(|p| p.iter().find(|r| r["name"] == name))
                .with_context(|| format!("no row for {name}"))?;
            if row["ready"] != true {
                bail!("{name} not ready: {row}");
            }
            for n in nodes {
                if row["handshakes"].get(*n).is_none() {
                    bail!("no handshake from {n}: {row}");
                }
            }
            if row["rxBytes"].as_i64().unwrap_or(0) == 0 {
                bail!("no traffic: {row}");
            }
            // The mesh's own Ready condition too (`status` exits 0 only then).
            if v["ready"] != true {
                bail!("the mesh is not ready: {} {}", v["reason"], v["message"]);
            }
            Ok(())
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn laptop_and_remote_office() -> Result<()> {
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
    let pods: Vec<SocketAddr> = mesh
        .nodes
        .iter()
        .map(|n| addr(&n.pod_ip, ECHO_PORT))
        .collect();

    // 1. A laptop: every node is a gateway (the default).
    let started = Instant::now();
    let (laptop, _laptop_link) = mesh.outside_host("l", 50)?;
    let png = dir.join("laptop.png");
    let config = cli.ok(&[
        "peer",
        "add",
        "laptop",
        "--client-allowed-ips",
        "10.96.0.0/16",
        "--keepalive",
        "5",
        "--preshared-key",
        "--store-private-key",
        "--qr-png",
        png.to_str().unwrap(),
    ])?;
    eprintln!("--- the laptop's config ---\n{config}");
    assert_eq!(
        config.matches("[Peer]").count(),
        3,
        "every node is a gateway"
    );
    assert!(config.contains("PresharedKey = "), "{config}");
    assert!(std::fs::metadata(&png)?.len() > 0, "the PNG was written");
    // The private key stored in the Secret gives the same config again, and so does the
    // saved config itself.
    assert_eq!(cli.ok(&["peer", "config", "laptop"])?, config);
    let saved = dir.join("laptop.conf");
    std::fs::write(&saved, &config)?;
    assert_eq!(
        cli.ok(&[
            "peer",
            "config",
            "laptop",
            "--private-key-file",
            saved.to_str().unwrap()
        ])?,
        config
    );

    let iface = format!("wgl{}", mesh.id);
    let _wggo = wireguard_go_from_config(&laptop, &iface, &config, &dir)?;
    let laptop_ip = quick_parts(&config).addresses[0]
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    eventually("laptop -> every pod", Duration::from_secs(30), || {
        for p in &pods {
            echo_roundtrip(&laptop, *p, b"laptop".to_vec(), Duration::from_secs(2))?;
        }
        Ok(())
    })
    .with_context(|| mesh.agent_logs(20))?;
    echo_server(&laptop, addr("0.0.0.0", PEER_ECHO_PORT), usize::MAX)?;
    for node in &mesh.nodes {
        echo_roundtrip(
            &node.pod,
            addr(&laptop_ip, PEER_ECHO_PORT),
            b"pod".to_vec(),
            Duration::from_secs(5),
        )
        .with_context(|| format!("{} pod -> laptop", node.name))?;
    }
    eprintln!("laptop connected in {:?}", started.elapsed());
    status_shows(
        &cli,
        "laptop",
        &["node-1", "node-2", "node-3"],
        Duration::from_secs(60),
    )?;
    eprintln!(
        "--- status ---\n{}",
        cli.ok(&["status", "--mesh", "default"])?
    );

    // An invalid file is refused with its line number and creates nothing.
    let bad = dir.join("bad.conf");
    std::fs::write(
        &bad,
        "[Interface]\nPrivateKey = x\n\n[Peer]\nPublicKey = y\n",
    )?;
    let out = cli.run(&["import", bad.to_str().unwrap(), "--apply"])?;
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 2"),
        "{out:?}"
    );

    // Deleting the peer cuts the laptop off, both ways.
    let t = Instant::now();
    mesh.cp.kubectl_ok(&["delete", "wireguardpeer", "laptop"])?;
    eventually("the laptop is cut off", Duration::from_secs(15), || {
        cut_off(&laptop, &pods)?;
        cut_off(&mesh.nodes[1].pod, &[addr(&laptop_ip, PEER_ECHO_PORT)])
    })?;
    eprintln!("laptop cut off {:?} after the delete", t.elapsed());

    // 2. A remote office behind a router, attached to node-1, the only gateway.
    mesh.cp
        .kubectl_ok(&["label", "node", "node-1", "wgmesh.io/gateway=true"])?;
    mesh.cp.kubectl_ok(&[
        "patch",
        "wireguardmesh",
        "default",
        "--type=merge",
        "-p",
        r#"{"spec":{"gatewaySelector":{"matchLabels":{"wgmesh.io/gateway":"true"}}}}"#,
    ])?;
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
    let (router, _router_link) = mesh.outside_host("r", 60)?;
    let office = Netns::create(&format!("wgm{}o", mesh.id))?;
    let router_ip = format!("{}.60", mesh.underlay);
    veth_between(
        &router,
        "lan0",
        "192.168.77.1/24",
        &office,
        "eth0",
        "192.168.77.10/24",
    )?;
    router.sysctl("net.ipv4.ip_forward", "1")?;
    office.ip(&["route", "add", "default", "via", "192.168.77.1"])?;
    let config = cli.ok(&[
        "peer",
        "add",
        "office",
        "--allowed-ips",
        "192.168.77.0/24",
        "--endpoint",
        &format!("{router_ip}:51820"),
        "--listen-port",
        "51820",
        "--client-allowed-ips",
        "10.96.0.0/16",
        "--keepalive",
        "5",
    ])?;
    eprintln!("--- the office's config ---\n{config}");
    assert_eq!(config.matches("[Peer]").count(), 1, "one gateway");
    let office_iface = format!("wgo{}", mesh.id);
    let _office_wg = wireguard_go_from_config(&router, &office_iface, &config, &dir)?;
    eventually(
        "office host -> every pod (via node-1)",
        Duration::from_secs(30),
        || {
            for p in &pods {
                echo_roundtrip(&office, *p, b"office".to_vec(), Duration::from_secs(2))?;
            }
            Ok(())
        },
    )
    .with_context(|| mesh.agent_logs(20))?;
    echo_server(&office, addr("0.0.0.0", PEER_ECHO_PORT), usize::MAX)?;
    let office_host = addr("192.168.77.10", PEER_ECHO_PORT);
    eventually("every pod -> office host", Duration::from_secs(20), || {
        for node in &mesh.nodes {
            echo_roundtrip(
                &node.pod,
                office_host,
                b"pod".to_vec(),
                Duration::from_secs(2),
            )
            .with_context(|| format!("{} pod -> office", node.name))?;
        }
        Ok(())
    })?;
    status_shows(&cli, "office", &["node-1"], Duration::from_secs(60))?;
    let table = cli.ok(&["status"])?;
    eprintln!("--- status ---\n{table}");
    assert!(
        table.contains("office") && table.contains("HANDSHAKES"),
        "{table}"
    );

    // A peer the controller refuses: exit code 6 with the reason, and nothing left behind.
    let out = cli.run(&["peer", "add", "clash", "--allowed-ips", "10.244.2.0/25"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("AllowedIPsOverlap"), "{stderr}");
    assert!(
        !mesh
            .cp
            .kubectl(&["get", "wireguardpeer", "clash"])?
            .status
            .success(),
        "the refused peer was deleted again"
    );

    // A node as a [Peer] section for another site.
    let section = cli.ok(&["export", "node", "node-2"])?;
    assert!(section.contains(&mesh.public_key(1)?), "{section}");
    assert!(section.contains("10.244.2.0/24"), "{section}");
    assert!(
        section.contains(&format!("Endpoint = {}.2:51820", mesh.underlay)),
        "{section}"
    );

    let t = Instant::now();
    mesh.cp.kubectl_ok(&["delete", "wireguardpeer", "office"])?;
    eventually("the office is cut off", Duration::from_secs(15), || {
        cut_off(&office, &pods)?;
        for node in &mesh.nodes {
            cut_off(&node.pod, &[office_host])?;
        }
        Ok(())
    })?;
    eprintln!("office cut off {:?} after the delete", t.elapsed());
    Ok(())
}
