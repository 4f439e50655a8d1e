//! The trust boundaries end to end (docs/security.md): on a running mesh of three nodes with
//! an external peer, a rogue agent holding node-1's real token, a careless (or hostile)
//! WireGuardPeer author and an unprivileged local user try what they must not be able to do.
//! Every attempt gets a clear refusal, and no node's data plane changes (the `wg show dump`
//! of every node, counters aside, is the same before and after).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use wgmesh_api::WireGuardPeer;
use wgmesh_e2e::agent_sim::SimAgent;
use wgmesh_e2e::binaries::workspace_binary;
use wgmesh_e2e::cluster;
use wgmesh_e2e::helm::NAMESPACE;
use wgmesh_e2e::mesh::TestMesh;
use wgmesh_proto as pb;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Runs `cmd` as uid/gid 65534 (nobody), with no supplementary groups.
fn as_nobody(cmd: &[&str]) -> Result<Output> {
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(cmd)
        .output()
        .context("running setpriv")
}

/// Each node's device configuration as `wg show dump` gives it, without what traffic changes
/// (handshake times, byte counters): peers with their preshared key, endpoint, allowed IPs
/// and keepalive, sorted.
fn data_plane(mesh: &TestMesh) -> Result<Vec<Vec<String>>> {
    (0..mesh.nodes.len())
        .map(|i| {
            let dump = mesh.wg_dump(i)?;
            let mut peers: Vec<String> = dump
                .lines()
                .skip(1)
                .map(|l| {
                    let f: Vec<&str> = l.split('\t').collect();
                    [0, 1, 2, 3, 7]
                        .iter()
                        .map(|&k| f.get(k).copied().unwrap_or(""))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            peers.sort();
            Ok(peers)
        })
        .collect()
}

/// A gRPC channel to the mesh's controller, trusting the chart's CA as agents do (from its
/// ConfigMap, never the TLS Secret).
async fn controller_channel(mesh: &TestMesh) -> Result<Channel> {
    let config_maps: Api<ConfigMap> = Api::namespaced(mesh.client.clone(), NAMESPACE);
    let ca = config_maps
        .get("wgmesh-controller-ca")
        .await?
        .data
        .and_then(|mut d| d.remove("ca.crt"))
        .context("the CA ConfigMap has no ca.crt")?;
    let server_name = mesh
        .installed
        .agent_pod()?
        .containers
        .iter()
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == "WGMESH_TLS_SERVER_NAME")
        .and_then(|e| e.value.clone())
        .context("the agent has no WGMESH_TLS_SERVER_NAME")?;
    let controller = mesh.controller.as_ref().context("no controller")?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca))
        .domain_name(server_name);
    Ok(Channel::from_shared(controller.grpc_url())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

/// The call must be refused with `code`, and its message must contain `says`.
fn refused<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    says: &str,
) -> Result<()> {
    match result {
        Ok(v) => bail!("{what}: accepted ({v:?})"),
        Err(s) if s.code() == code && s.message().contains(says) => {
            eprintln!(
                "refused as it should be: {what}: {:?} {}",
                s.code(),
                s.message()
            );
            Ok(())
        }
        Err(s) => bail!(
            "{what}: refused as {:?} {:?}, want {code:?} containing {says:?}",
            s.code(),
            s.message()
        ),
    }
}

async fn apply_peer(client: &kube::Client, name: &str, spec: serde_json::Value) -> Result<()> {
    let api: Api<WireGuardPeer> = Api::all(client.clone());
    let body = json!({
        "apiVersion": "wgmesh.io/v1alpha1",
        "kind": "WireGuardPeer",
        "metadata": {"name": name},
        "spec": spec,
    });
    api.patch(name, &PatchParams::apply("author"), &Patch::Apply(&body))
        .await?;
    Ok(())
}

/// Waits until the peer's Ready condition is False with `reason`; returns its message.
/// Waits for the new peer `name` to be refused for `reason`; it holds no tunnel address
/// then (a refused peer is given none, so hostile peers cannot use up a pool).
async fn refused_with(client: &kube::Client, name: &str, reason: &str) -> Result<String> {
    let api: Api<WireGuardPeer> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = api.get(name).await?.status.unwrap_or_default();
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
        if let Some(c) = ready
            && c.reason == reason
        {
            assert_eq!(c.status, "False", "{name}: {c:?}");
            assert!(
                status.addresses.is_empty(),
                "{name} is refused but was given {:?}",
                status.addresses
            );
            eprintln!("{name}: Ready=False {reason}: {}", c.message);
            return Ok(c.message.clone());
        }
        if Instant::now() > deadline {
            bail!("{name} never got Ready=False {reason}; Ready is {ready:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn key(n: u8) -> String {
    wgmesh_core::PublicKey::from_bytes([n; 32]).to_base64()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rogue_node_a_hostile_peer_author_and_a_local_user_change_nothing() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the end-to-end mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let cli_binary = workspace_binary("wgmesh-cli", "kubectl-wgmesh")?;
    // Reports reach the status every second, so a forged one would show within the test.
    let mesh = TestMesh::start_with(
        3,
        wgmesh_e2e::mesh::MeshOptions {
            values: json!({"controller": {"statusInterval": 1}}),
            ..Default::default()
        },
    )
    .await?;
    mesh.wait_peer_counts(2, Duration::from_secs(90)).await?;
    let client = mesh.client.clone();

    // An external peer, added as users do; its QR code holds its private key.
    let png: PathBuf = mesh.cp.dir().join("laptop.png");
    let out = Command::new(&cli_binary)
        .arg("--kubeconfig")
        .arg(mesh.cp.kubeconfig())
        .args(["peer", "add", "laptop", "--qr-png"])
        .arg(&png)
        .output()?;
    assert!(
        out.status.success(),
        "peer add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    mesh.wait_peer_counts(3, Duration::from_secs(60)).await?;
    let peers: Api<WireGuardPeer> = Api::all(client.clone());
    let laptop_key = peers.get("laptop").await?.spec.public_key;
    let node2_key = mesh.public_key(1)?;
    let before = data_plane(&mesh)?;

    // --- An unprivileged local user ---
    let mode = std::fs::metadata(&png)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the QR PNG holds a private key: mode {mode:o}");
    let read = as_nobody(&["cat", &png.display().to_string()])?;
    assert!(!read.status.success(), "nobody read the QR PNG");
    let pid = mesh.nodes[0]
        .agent
        .as_ref()
        .and_then(|a| a.pid())
        .context("node-1's agent is not running")?
        .to_string();
    let uapi = Command::new("nsenter")
        .args(["-t", &pid, "-m", "-n", "--"])
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .args(["wg", "show", "wgmesh0", "dump"])
        .output()?;
    assert!(
        !uapi.status.success(),
        "nobody read the device over its UAPI socket: {}",
        String::from_utf8_lossy(&uapi.stdout)
    );
    eprintln!(
        "refused as it should be: nobody on the UAPI socket: {}",
        String::from_utf8_lossy(&uapi.stderr).trim()
    );

    // --- A rogue agent with node-1's real (pod-bound, projected) token ---
    // A token of node-1's agent pod, as its kubelet projects it.
    let token = cluster::running_agent_token(&client, "node-1").await?;
    let channel = controller_channel(&mesh).await?;
    let node1_ip = mesh.nodes[0].node_ip.clone();
    let sim = |node: &str, mesh_name: &str, key: [u8; 32]| {
        SimAgent::new(channel.clone(), node, mesh_name, &token, key)
    };
    let bytes =
        |b64: &str| -> Result<[u8; 32]> { Ok(*b64.parse::<wgmesh_core::PublicKey>()?.as_bytes()) };

    refused(
        "register the laptop's key as node-1",
        sim("node-1", "default", bytes(&laptop_key)?)
            .register(&node1_ip)
            .await,
        tonic::Code::AlreadyExists,
        "held by WireGuardPeer laptop",
    )?;
    refused(
        "register node-2's key as node-1",
        sim("node-1", "default", bytes(&node2_key)?)
            .register(&node1_ip)
            .await,
        tonic::Code::AlreadyExists,
        "held by WireGuardPeer",
    )?;
    refused(
        "register as node-2",
        sim("node-2", "default", [42; 32]).register(&node1_ip).await,
        tonic::Code::PermissionDenied,
        "not node-2",
    )?;
    refused(
        "register node-2's address as node-1's endpoint",
        sim("node-1", "default", [42; 32])
            .register(&mesh.nodes[1].node_ip)
            .await,
        tonic::Code::PermissionDenied,
        "is not an address of Node node-1",
    )?;
    refused(
        "register a malformed node name",
        sim("../node-1", "default", [42; 32])
            .register(&node1_ip)
            .await,
        tonic::Code::InvalidArgument,
        "invalid node name",
    )?;
    refused(
        "report node-2's status",
        sim("node-2", "default", [42; 32]).report(vec![]).await,
        tonic::Code::PermissionDenied,
        "not node-2",
    )?;
    refused(
        "report for a mesh that does not exist",
        sim("node-1", "other", [42; 32]).report(vec![]).await,
        tonic::Code::NotFound,
        "other",
    )?;
    refused(
        "watch node-2's peers",
        sim("node-2", "default", [42; 32]).watch().await,
        tonic::Code::PermissionDenied,
        "not node-2",
    )?;
    // A report too big to be an agent's: refused before it is decoded.
    let huge = vec![
        pb::PeerStatus {
            public_key: vec![7; 32],
            endpoint: "x".repeat(1024),
            ..Default::default()
        };
        5000
    ];
    let result = sim("node-1", "default", [42; 32]).report(huge).await;
    match result {
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ) =>
        {
            eprintln!(
                "refused as it should be: a 5 MB report: {:?} {}",
                s.code(),
                s.message()
            );
        }
        other => bail!("a 5 MB report: {other:?}"),
    }
    // Forged observations of the laptop (a handshake a year ahead, a hostile endpoint) and a
    // stranger's key: accepted only as far as they are node-1's to report, and clamped.
    let year_ahead = SystemTime::now() + Duration::from_secs(365 * 86400);
    let secs = year_ahead.duration_since(SystemTime::UNIX_EPOCH)?.as_secs() as i64;
    let laptop_bytes = bytes(&laptop_key)?.to_vec();
    let laptop_seen_at = |endpoint: String| pb::PeerStatus {
        public_key: laptop_bytes.clone(),
        last_handshake: Some(prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        }),
        rx_bytes: 1,
        tx_bytes: 1,
        endpoint,
    };
    sim("node-1", "default", [42; 32])
        .report(vec![
            laptop_seen_at("evil.example:51820".into()),
            pb::PeerStatus {
                public_key: vec![99; 32],
                last_handshake: Some(prost_types::Timestamp {
                    seconds: secs,
                    nanos: 0,
                }),
                ..Default::default()
            },
        ])
        .await
        .context("node-1 may report on its own peers")?;
    // The laptop has no endpoint of its own: where a gateway saw it last is published to
    // the others. A rogue gateway saying it was at node-2's address (or at the cloud's
    // metadata service) moves nothing.
    for seen in [
        format!("{}:51820", mesh.nodes[1].node_ip),
        "169.254.169.254:80".to_owned(),
    ] {
        sim("node-1", "default", [42; 32])
            .report(vec![laptop_seen_at(seen)])
            .await
            .context("node-1 may report on its own peers")?;
    }

    // A gateway that is not the active one (node-1 is, the first by name) saying where it saw
    // the laptop, even at an address nobody else has: only the active gateway's word moves a
    // roaming external peer.
    let node2_token = cluster::running_agent_token(&client, "node-2").await?;
    let forged = laptop_seen_at("203.0.113.9:51820".into());
    let seen_now = move || {
        let mut seen = forged.clone();
        seen.last_handshake = Some(prost_types::Timestamp {
            seconds: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            nanos: 0,
        });
        seen
    };
    let mut rogue_gateway =
        SimAgent::new(channel.clone(), "node-2", "default", &node2_token, [43; 32]);
    rogue_gateway
        .report(vec![seen_now()])
        .await
        .context("node-2 may report on its own peers")?;
    // Said again and again until the end, each time the latest handshake (node-2's real
    // agent reports too, and a node's latest report replaces its earlier one).
    let rogue_reports = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = rogue_gateway.report(vec![seen_now()]).await;
        }
    });

    // --- A peer author ---
    let reserved: &[(&str, &str, &str)] = &[
        (
            "claims-node-2",
            &format!("{}/32", mesh.nodes[1].node_ip),
            "an address of node node-2",
        ),
        ("claims-metadata", "169.254.169.254/32", "metadata"),
        ("claims-everything", "0.0.0.0/0", "this network"),
        ("claims-loopback", "127.0.0.0/8", "loopback"),
        ("claims-multicast", "224.0.0.0/4", "multicast"),
    ];
    for (i, (name, claim, says)) in reserved.iter().enumerate() {
        apply_peer(
            &client,
            name,
            json!({"mesh": "default", "publicKey": key(200 + i as u8), "allowedIPs": [claim]}),
        )
        .await?;
        let message = refused_with(&client, name, "ReservedRange").await?;
        assert!(message.contains(says), "{name}: {message}");
    }
    // The Service CIDR, from the cluster's own ServiceCIDR object.
    let service_cidrs: Api<k8s_openapi::api::networking::v1::ServiceCIDR> =
        Api::all(client.clone());
    let service_cidr = service_cidrs
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .find_map(|s| s.spec?.cidrs?.into_iter().next())
        .context("the API server has no ServiceCIDR")?;
    apply_peer(
        &client,
        "claims-services",
        json!({"mesh": "default", "publicKey": key(210), "allowedIPs": [service_cidr]}),
    )
    .await?;
    refused_with(&client, "claims-services", "ReservedRange").await?;
    // Someone else's key.
    apply_peer(
        &client,
        "copies-node-2",
        json!({"mesh": "default", "publicKey": node2_key, "allowedIPs": ["10.77.0.0/24"]}),
    )
    .await?;
    refused_with(&client, "copies-node-2", "DuplicatePublicKey").await?;

    // The pods of a Node that is not a member (no agent yet): still that Node's.
    cluster::create_node(
        &client,
        "outsider",
        &["10.244.200.0/24"],
        "192.0.2.200",
        &[],
    )
    .await?;
    apply_peer(
        &client,
        "claims-outsider-pods",
        json!({"mesh": "default", "publicKey": key(213), "allowedIPs": ["10.244.200.128/25"]}),
    )
    .await?;
    let message = refused_with(&client, "claims-outsider-pods", "AllowedIPsOverlap").await?;
    assert!(message.contains("pod CIDR of node outsider"), "{message}");
    // Endpoints an agent could not use (which every gateway would refuse to take): the API
    // server refuses them.
    for (i, endpoint) in ["a..b:51820", "[192.0.2.9]:51820", "[fe80::1%eth0]:51820"]
        .iter()
        .enumerate()
    {
        let name = format!("bad-endpoint-{i}");
        let spec =
            json!({"mesh": "default", "publicKey": key(214 + i as u8), "endpoint": endpoint});
        match apply_peer(&client, &name, spec).await {
            Err(e) if format!("{e:#}").contains("spec.endpoint") => {
                eprintln!("refused as it should be: endpoint {endpoint}: {e:#}");
            }
            other => bail!("endpoint {endpoint}: {other:?}"),
        }
    }

    // The controller's own TLS key as a preshared key: outside the Secret namespaces, never
    // read.
    apply_peer(
        &client,
        "steals-tls-key",
        json!({
            "mesh": "default",
            "publicKey": key(211),
            "allowedIPs": ["10.78.0.0/24"],
            "presharedKeySecretRef": {
                "namespace": NAMESPACE,
                "name": "wgmesh-controller-tls",
                "key": "tls.key",
            },
        }),
    )
    .await?;
    let message = refused_with(&client, "steals-tls-key", "PresharedKeySecretMissing").await?;
    assert!(message.contains("not read"), "{message}");
    // Becoming a node: the API server refuses anyone but the controller (the chart's
    // admission policy).
    let claim = apply_peer(
        &client,
        "claims-a-node",
        json!({"mesh": "default", "publicKey": key(212), "node": "node-2"}),
    )
    .await;
    match claim {
        Err(e) if format!("{e:#}").contains("wgmesh-controller") => {
            eprintln!("refused as it should be: spec.node by a user: {e:#}");
        }
        other => bail!("a user set spec.node: {other:?}"),
    }

    // Give the controller a moment to (wrongly) act, then compare every node's data plane.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = data_plane(&mesh)?;
    rogue_reports.abort();
    assert_eq!(
        before,
        after,
        "a node's data plane changed:\n{}",
        mesh.agent_logs(20)
    );
    // The forged handshake did not win: the laptop's status shows none in the future.
    let laptop = peers.get("laptop").await?;
    let status = laptop.status.unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs() as i64;
    if let Some(t) = &status.last_handshake_time {
        assert!(
            t.0.as_second() <= now + 5,
            "a forged future handshake won: {t:?}"
        );
    }
    let shown = serde_json::to_string(&status)?;
    assert!(
        !shown.contains("evil.example") && !shown.contains("203.0.113.9"),
        "a hostile endpoint reached the status: {status:?}"
    );
    Ok(())
}
