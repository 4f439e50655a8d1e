//! The controller against a real API server, with real gRPC clients standing in for agents.

use std::ops::ControlFlow::{self, Break, Continue};
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use wgmesh_api::WireGuardPeer;
use wgmesh_api::condition::Condition;
use wgmesh_e2e::ControlPlane;
use wgmesh_e2e::agent_sim::{SimAgent, channel};
use wgmesh_e2e::cluster::{self, AGENT_NAMESPACE};
use wgmesh_e2e::controller::{Controller, ControllerTls};
use wgmesh_e2e::install::install_default_mesh;
use wgmesh_proto as pb;

const WAIT: Duration = Duration::from_secs(20);

/// Polls `probe` every 200 ms until it breaks with a value, for at most `within`; the error
/// names `what` was awaited and the last state the probe continued with.
async fn eventually<T, S, F, Fut>(within: Duration, what: &str, mut probe: F) -> Result<T>
where
    S: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<ControlFlow<T, S>>>,
{
    let deadline = std::time::Instant::now() + within;
    loop {
        match probe().await? {
            Break(done) => return Ok(done),
            Continue(seen) if std::time::Instant::now() > deadline => {
                anyhow::bail!("{what} did not happen within {within:?}; last seen: {seen:?}")
            }
            Continue(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

struct Fixture {
    cp: ControlPlane,
    client: kube::Client,
    tls: ControllerTls,
}

impl Fixture {
    async fn new() -> Result<Self> {
        let cp = ControlPlane::start().await?;
        install_default_mesh(&cp)?;
        let client = cp.client().await?;
        let tls = ControllerTls::issue(&cp)?;
        Ok(Fixture { cp, client, tls })
    }

    async fn controller(&self, identity: &str) -> Result<Controller> {
        Controller::start(
            &self.cp,
            &self.tls,
            identity,
            &[("WGMESH_LEASE_DURATION", "6"), ("WGMESH_LEASE_GRACE", "2")],
        )
        .await
    }

    /// Node `name` number `n` (pod CIDR 10.244.n.0/24, address 192.168.0.n) and its agent,
    /// registered and watching.
    async fn agent(&self, controller: &Controller, name: &str, n: u8) -> Result<SimAgent> {
        cluster::create_node(
            &self.client,
            name,
            &[&format!("10.244.{n}.0/24")],
            &format!("192.168.0.{n}"),
            &[],
        )
        .await?;
        let token = cluster::agent_token(&self.client, name).await?;
        let ch = channel(&controller.grpc_url(), &self.tls.ca_pem).await?;
        let mut agent = SimAgent::new(ch, name, "default", &token, [n; 32]);
        let registered = agent.register(&format!("192.168.0.{n}")).await?;
        assert_eq!(
            registered.tunnel_addresses.len(),
            1,
            "{name} gets one tunnel address from the IPv4 pool"
        );
        agent.watch().await?;
        Ok(agent)
    }

    async fn apply_peer(&self, name: &str, spec: serde_json::Value) -> Result<()> {
        let api: Api<WireGuardPeer> = Api::all(self.client.clone());
        let body = json!({
            "apiVersion": "wgmesh.io/v1alpha1",
            "kind": "WireGuardPeer",
            "metadata": {"name": name},
            "spec": spec,
        });
        api.patch(
            name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&body),
        )
        .await?;
        Ok(())
    }

    async fn peer(&self, name: &str) -> Result<WireGuardPeer> {
        let api: Api<WireGuardPeer> = Api::all(self.client.clone());
        Ok(api.get(name).await?)
    }

    /// Waits until the peer's Ready condition has `reason`.
    async fn wait_reason(&self, name: &str, reason: &str) -> Result<WireGuardPeer> {
        let what = format!("{name}'s Ready reason {reason}");
        eventually(WAIT, &what, || async move {
            let peer = self.peer(name).await?;
            let ready = peer
                .status
                .as_ref()
                .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
                .cloned();
            Ok(match ready {
                Some(c) if c.reason == reason => Break(peer),
                other => Continue(other),
            })
        })
        .await
    }
}

fn key(n: u8) -> String {
    wgmesh_core::PublicKey::from_bytes([n; 32]).to_base64()
}

fn last_delta(agent: &SimAgent) -> pb::PeerDelta {
    match agent.updates.last().and_then(|u| u.update.clone()) {
        Some(pb::peer_update::Update::Delta(d)) => d,
        other => panic!("{}: last update is not a delta: {other:?}", agent.node),
    }
}

fn names(peers: &[pb::Peer]) -> Vec<String> {
    peers.iter().map(|p| p.name.clone()).collect()
}

#[tokio::test]
async fn nodes_and_external_peers_reach_every_agent_as_exact_deltas() -> Result<()> {
    let fx = Fixture::new().await?;
    let controller = fx.controller("c1").await?;
    let mut a = fx.agent(&controller, "a", 1).await?;
    let mut b = fx.agent(&controller, "b", 2).await?;
    let mut c = fx.agent(&controller, "c", 3).await?;

    // Every node receives the other two.
    for agent in [&mut a, &mut b, &mut c] {
        agent
            .wait_until(WAIT, "the two other nodes", |s| s.peers.len() == 2)
            .await?;
    }
    assert_eq!(a.peer_names(), ["node-b", "node-c"]);
    let b_at_a = a.peer("node-b").unwrap();
    assert_eq!(b_at_a.endpoint, "192.168.0.2:51820");
    assert!(b_at_a.allowed_ips.contains(&"10.244.2.0/24".to_owned()));
    assert!(
        b_at_a
            .allowed_ips
            .iter()
            .any(|ip| ip.starts_with("10.250.") && ip.ends_with("/32"))
    );
    let mut addresses: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|s| s.tunnel_addresses[0].clone())
        .collect();
    addresses.dedup();
    assert_eq!(
        addresses.len(),
        3,
        "tunnel addresses are distinct: {addresses:?}"
    );

    // Add an external peer: exactly one upsert, everywhere.
    fx.apply_peer(
        "office",
        json!({"publicKey": key(20), "allowedIPs": ["192.168.50.0/24"], "endpoint": "203.0.113.1:51820"}),
    )
    .await?;
    for agent in [&mut a, &mut b, &mut c] {
        agent
            .wait_until(WAIT, "office", |s| s.peer("office").is_some())
            .await?;
        let d = last_delta(agent);
        assert_eq!(
            (names(&d.upserted), d.removed.len()),
            (vec!["office".to_owned()], 0)
        );
    }
    let office = a.peer("office").unwrap();
    assert!(office.allowed_ips.contains(&"192.168.50.0/24".to_owned()));
    assert_eq!(office.endpoint, "203.0.113.1:51820");

    // Change it: one upsert with the new endpoint.
    fx.apply_peer(
        "office",
        json!({"publicKey": key(20), "allowedIPs": ["192.168.50.0/24"], "endpoint": "203.0.113.9:51820"}),
    )
    .await?;
    a.wait_until(WAIT, "the new endpoint", |s| {
        s.peer("office")
            .is_some_and(|p| p.endpoint == "203.0.113.9:51820")
    })
    .await?;
    assert_eq!(names(&last_delta(&a).upserted), ["office"]);

    // Disable it: one removal.
    fx.apply_peer(
        "office",
        json!({"publicKey": key(20), "allowedIPs": ["192.168.50.0/24"], "endpoint": "203.0.113.9:51820", "disabled": true}),
    )
    .await?;
    a.wait_until(WAIT, "office gone", |s| s.peer("office").is_none())
        .await?;
    let d = last_delta(&a);
    assert_eq!(
        (d.upserted.len(), d.removed.clone()),
        (0, vec![vec![20u8; 32]])
    );
    fx.wait_reason("office", "Disabled").await?;

    // Re-enable, then delete: one removal.
    fx.apply_peer(
        "office",
        json!({"publicKey": key(20), "allowedIPs": ["192.168.50.0/24"], "endpoint": "203.0.113.9:51820"}),
    )
    .await?;
    a.wait_until(WAIT, "office back", |s| s.peer("office").is_some())
        .await?;
    let api: Api<WireGuardPeer> = Api::all(fx.client.clone());
    api.delete("office", &DeleteParams::default()).await?;
    a.wait_until(WAIT, "office deleted", |s| s.peer("office").is_none())
        .await?;
    assert_eq!(last_delta(&a).removed, vec![vec![20u8; 32]]);

    // An overlapping peer gets the condition and never reaches an agent.
    fx.apply_peer(
        "office",
        json!({"publicKey": key(20), "allowedIPs": ["192.168.50.0/24"]}),
    )
    .await?;
    a.wait_until(WAIT, "office", |s| s.peer("office").is_some())
        .await?;
    fx.apply_peer(
        "intruder",
        json!({"publicKey": key(21), "allowedIPs": ["192.168.50.128/25"]}),
    )
    .await?;
    let intruder = fx.wait_reason("intruder", "AllowedIPsOverlap").await?;
    let message = &intruder.status.unwrap().conditions[0].message;
    assert!(message.contains("WireGuardPeer office"), "{message}");
    assert!(
        a.next_update(Duration::from_secs(2)).await?.is_none(),
        "nothing is sent for a refused peer"
    );
    assert!(
        !a.updates
            .iter()
            .chain(&b.updates)
            .any(|u| format!("{u:?}").contains("intruder")),
        "the overlapping peer never reached an agent"
    );
    // Fixing it clears the condition and programs it.
    fx.apply_peer(
        "intruder",
        json!({"publicKey": key(21), "allowedIPs": ["192.168.60.0/24"]}),
    )
    .await?;
    fx.wait_reason("intruder", "Programmed").await?;
    a.wait_until(WAIT, "intruder after the fix", |s| {
        s.peer("intruder").is_some()
    })
    .await?;

    // Deleting a Node removes it from every agent, and its WireGuardPeer goes.
    cluster::delete_node(&fx.client, "b").await?;
    for agent in [&mut a, &mut c] {
        agent
            .wait_until(WAIT, "node-b removed", |s| s.peer("node-b").is_none())
            .await?;
    }
    let api = &api;
    eventually(WAIT, "node-b's WireGuardPeer deleted", || async move {
        Ok(match api.get_opt("node-b").await? {
            None => Break(()),
            Some(p) => Continue(p.metadata.deletion_timestamp),
        })
    })
    .await?;

    // Status: addresses, readiness and counts.
    let node_a = fx.wait_reason("node-a", "Programmed").await?;
    assert_eq!(node_a.status.unwrap().addresses.len(), 1);
    let meshes: Api<wgmesh_api::WireGuardMesh> = Api::all(fx.client.clone());
    let meshes = &meshes;
    eventually(WAIT, "the mesh status settled", || async move {
        let status = meshes.get("default").await?.status.unwrap_or_default();
        let counts = (
            status.nodes,
            status.ready_nodes,
            status.peers,
            status.ready_peers,
        );
        Ok(if counts == (2, 2, 2, 2) {
            Break(())
        } else {
            Continue(status)
        })
    })
    .await?;
    let metrics = controller.metrics().await?;
    assert!(
        metrics.contains("wgmesh_controller_connected_agents 3"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn agents_are_authenticated_and_bound_to_their_node() -> Result<()> {
    let fx = Fixture::new().await?;
    let controller = fx.controller("c1").await?;
    for (name, n) in [("a", 1u8), ("b", 2)] {
        cluster::create_node(
            &fx.client,
            name,
            &[&format!("10.244.{n}.0/24")],
            &format!("192.168.0.{n}"),
            &[],
        )
        .await?;
    }
    cluster::ensure_agent_identity(&fx.client).await?;
    let token_a = cluster::agent_token(&fx.client, "a").await?;
    let ch = channel(&controller.grpc_url(), &fx.tls.ca_pem).await?;
    let code = |r: Result<pb::RegisterResponse, tonic::Status>| r.map(|_| ()).map_err(|s| s.code());

    // The right token works.
    let mut ok = SimAgent::new(ch.clone(), "a", "default", &token_a, [1; 32]);
    assert_eq!(code(ok.register("192.168.0.1").await), Ok(()));

    // Someone copies a's key into a peer of their own: refused (a's peer holds it), and a's
    // agent still registers that key again, as it does on every restart.
    fx.apply_peer(
        "copies-a",
        json!({"mesh": "default", "publicKey": key(1), "allowedIPs": ["10.77.0.0/24"]}),
    )
    .await?;
    eventually(Duration::from_secs(30), "copies-a refused", || async {
        let peer = Api::<WireGuardPeer>::all(fx.client.clone())
            .get("copies-a")
            .await?;
        let reasons: Vec<String> = peer
            .status
            .iter()
            .flat_map(|s| s.conditions.iter().map(|c| c.reason.clone()))
            .collect();
        Ok(if reasons.iter().any(|r| r == "DuplicatePublicKey") {
            Break(())
        } else {
            Continue(reasons)
        })
    })
    .await?;
    assert_eq!(code(ok.register("192.168.0.1").await), Ok(()));

    // A mesh nobody made: the stream says it is gone, and ends once the mesh exists (the
    // agent then connects again and registers).
    let mut made_up = SimAgent::new(ch.clone(), "a", "made-up", &token_a, [1; 32]);
    made_up.watch().await?;
    let update = made_up.next_update(Duration::from_secs(10)).await?;
    assert!(
        made_up.departure != 0,
        "a made-up mesh is reported gone: {update:?}"
    );
    assert!(
        made_up.next_update(Duration::from_secs(3)).await?.is_none(),
        "the stream stays open while the mesh does not exist"
    );
    let meshes: Api<wgmesh_api::WireGuardMesh> = Api::all(fx.client.clone());
    let made: wgmesh_api::WireGuardMesh = serde_json::from_value(json!({
        "apiVersion": "wgmesh.io/v1alpha1",
        "kind": "WireGuardMesh",
        "metadata": {"name": "made-up"},
        "spec": {"listenPort": 51822, "tunnelCIDRs": ["10.252.0.0/16"], "interfaceName": "wgmadeup0"},
    }))?;
    meshes.create(&Default::default(), &made).await?;
    assert!(
        made_up.next_update(Duration::from_secs(10)).await.is_err(),
        "the stream ends once the mesh exists"
    );
    meshes.delete("made-up", &Default::default()).await?;

    // A Node whose name is too long for a label value registers (its peer has no label).
    let long = format!("{}.{}", "n".repeat(40), "m".repeat(40));
    cluster::create_node(&fx.client, &long, &["10.244.9.0/24"], "192.168.0.9", &[]).await?;
    let token_long = cluster::agent_token(&fx.client, &long).await?;
    let mut long_agent = SimAgent::new(ch.clone(), &long, "default", &token_long, [9; 32]);
    assert_eq!(code(long_agent.register("192.168.0.9").await), Ok(()));

    // A token for node a cannot register node b, nor watch its peers.
    let mut b_with_a = SimAgent::new(ch.clone(), "b", "default", &token_a, [2; 32]);
    assert_eq!(
        code(b_with_a.register("192.168.0.2").await),
        Err(tonic::Code::PermissionDenied)
    );
    assert_eq!(
        b_with_a.watch().await.map_err(|s| s.code()),
        Err(tonic::Code::PermissionDenied)
    );

    // No token.
    let mut none = SimAgent::new(ch.clone(), "a", "default", "", [1; 32]);
    assert_eq!(
        code(none.register("192.168.0.1").await),
        Err(tonic::Code::Unauthenticated)
    );

    // A token for another audience.
    let pod =
        cluster::agent_pod(&fx.client, "aud-pod", "a", cluster::AGENT_SERVICE_ACCOUNT).await?;
    let other_audience = cluster::bound_token(
        &fx.client,
        cluster::AGENT_SERVICE_ACCOUNT,
        &pod,
        "not-wgmesh",
    )
    .await?;
    let mut aud = SimAgent::new(ch.clone(), "a", "default", &other_audience, [1; 32]);
    assert_eq!(
        code(aud.register("192.168.0.1").await),
        Err(tonic::Code::Unauthenticated)
    );

    // An expired token, signed with the cluster's real key.
    let sa_uid = agent_service_account_uid(&fx.client).await?;
    let expired = wgmesh_e2e::tokens::expired_token(
        &fx.cp,
        AGENT_NAMESPACE,
        cluster::AGENT_SERVICE_ACCOUNT,
        &sa_uid,
        &pod,
        "wgmesh",
    )?;
    let mut old = SimAgent::new(ch.clone(), "a", "default", &expired, [1; 32]);
    assert_eq!(
        code(old.register("192.168.0.1").await),
        Err(tonic::Code::Unauthenticated)
    );

    // Another service account on the right node.
    let other_sa = k8s_openapi::api::core::v1::ServiceAccount {
        metadata: kube::api::ObjectMeta {
            name: Some("intruder".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(
        fx.client.clone(),
        AGENT_NAMESPACE,
    )
    .create(&PostParams::default(), &other_sa)
    .await?;
    let intruder_pod = cluster::agent_pod(&fx.client, "intruder-pod", "a", "intruder").await?;
    let intruder = cluster::bound_token(&fx.client, "intruder", &intruder_pod, "wgmesh").await?;
    let mut sa = SimAgent::new(ch.clone(), "a", "default", &intruder, [1; 32]);
    assert_eq!(
        code(sa.register("192.168.0.1").await),
        Err(tonic::Code::PermissionDenied)
    );

    // Garbage in a well-formed request is a clear error, not a crash.
    let short = pb::RegisterRequest {
        node: "a".into(),
        mesh: "default".into(),
        public_key: vec![1, 2, 3],
        listen_port: 51820,
        ..Default::default()
    };
    let mut client = pb::mesh_service_client::MeshServiceClient::new(ch);
    let mut req = tonic::Request::new(short);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token_a}").parse()?);
    assert_eq!(
        client.register(req).await.map(|_| ()).map_err(|s| s.code()),
        Err(tonic::Code::InvalidArgument)
    );

    let metrics = controller.metrics().await?;
    assert!(
        metrics.contains("wgmesh_controller_auth_failures_total"),
        "{metrics}"
    );
    Ok(())
}

/// Whether a lease holder identity (`name@address`) is this replica.
fn owns(replica: &Controller, holder: &str) -> bool {
    holder.split('@').next() == Some(replica.identity.as_str())
}

/// Waits until one of `replicas` holds the lease; returns the holder's identity.
async fn holder_among(client: &kube::Client, replicas: &[Controller]) -> Result<String> {
    eventually(WAIT, "a replica holding the lease", || async move {
        let h = lease_holder(client).await?;
        Ok(if replicas.iter().any(|r| owns(r, &h)) {
            Break(h)
        } else {
            Continue(h)
        })
    })
    .await
}

async fn lease_holder(client: &kube::Client) -> Result<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    Ok(leases
        .get("wgmesh-controller")
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default())
}

#[tokio::test]
async fn restarts_and_failover_lose_nothing() -> Result<()> {
    let fx = Fixture::new().await?;
    let mut c1 = fx.controller("c1").await?;
    let mut a = fx.agent(&c1, "a", 1).await?;
    let mut b = fx.agent(&c1, "b", 2).await?;
    a.wait_until(WAIT, "node-b", |s| s.peers.len() == 1).await?;
    b.wait_until(WAIT, "node-a", |s| s.peers.len() == 1).await?;
    let before = a.peers.clone();

    // Kill the controller; a new one comes up; agents resume without losing a peer.
    c1.kill();
    let c2 = fx.controller("c2").await?;
    for agent in [&mut a, &mut b] {
        agent.reconnect(channel(&c2.grpc_url(), &fx.tls.ca_pem).await?);
        agent.watch().await?;
        let update = agent
            .next_update(WAIT)
            .await?
            .context("an update after reconnecting")?;
        assert!(
            matches!(update.update, Some(pb::peer_update::Update::Snapshot(_))),
            "a new epoch starts with a snapshot"
        );
    }
    assert_eq!(a.peers, before, "the same peers after the restart");

    // A reconnect to the same controller resumes with a delta, not a snapshot.
    a.reconnect(channel(&c2.grpc_url(), &fx.tls.ca_pem).await?);
    a.watch().await?;
    let resumed = a.next_update(Duration::from_secs(2)).await?;
    assert!(
        resumed
            .as_ref()
            .is_none_or(|u| matches!(u.update, Some(pb::peer_update::Update::Delta(_)))),
        "resuming within an epoch sends no snapshot: {resumed:?}"
    );

    // Two replicas: kill the lease holder; the other takes the lease and keeps writing.
    let c3 = fx.controller("c3").await?;
    let mut replicas = vec![c2, c3];
    let holder = holder_among(&fx.client, &replicas).await?;
    let leader_index = replicas.iter().position(|r| owns(r, &holder)).unwrap();
    let mut leader = replicas.remove(leader_index);
    let survivor = replicas.pop().unwrap();
    leader.kill();
    for agent in [&mut a, &mut b] {
        agent.reconnect(channel(&survivor.grpc_url(), &fx.tls.ca_pem).await?);
        agent.watch().await?;
        agent.next_update(WAIT).await?;
    }
    assert_eq!(a.peers, before, "nothing lost when the leader dies");

    // A new peer is programmed at once (every replica computes the mesh); the survivor
    // takes the lease and writes the address it was programmed with.
    fx.apply_peer(
        "laptop",
        json!({"publicKey": key(30), "allowedIPs": ["192.168.70.0/24"]}),
    )
    .await?;
    a.wait_until(Duration::from_secs(40), "laptop via the survivor", |s| {
        s.peer("laptop").is_some()
    })
    .await?;
    let fx = &fx;
    let written = eventually(
        Duration::from_secs(40),
        "the laptop's address written by the survivor",
        || async move {
            let status = fx.peer("laptop").await?.status.unwrap_or_default();
            Ok(if status.addresses.is_empty() {
                Continue(status)
            } else {
                Break(status.addresses)
            })
        },
    )
    .await?;
    assert!(owns(&survivor, &lease_holder(&fx.client).await?));
    assert_eq!(written.len(), 1);
    let programmed = a.peer("laptop").context("laptop programmed")?;
    assert!(
        programmed
            .allowed_ips
            .iter()
            .any(|c| c.starts_with(&format!("{}/", written[0]))),
        "programmed with the address written: {programmed:?} vs {written:?}"
    );
    Ok(())
}

#[tokio::test]
async fn status_reports_reach_the_writer_through_any_replica_and_a_quiet_mesh_writes_nothing()
-> Result<()> {
    let fx = Fixture::new().await?;
    let env = [
        ("WGMESH_LEASE_DURATION", "6"),
        ("WGMESH_LEASE_GRACE", "2"),
        ("WGMESH_STATUS_INTERVAL", "5"),
    ];
    let c1 = Controller::start(&fx.cp, &fx.tls, "c1", &env).await?;
    let c2 = Controller::start(&fx.cp, &fx.tls, "c2", &env).await?;
    let mut a = fx.agent(&c1, "a", 1).await?;
    let mut b = fx.agent(&c1, "b", 2).await?;
    a.wait_until(WAIT, "node-b", |s| s.peers.len() == 1).await?;
    b.wait_until(WAIT, "node-a", |s| s.peers.len() == 1).await?;

    let holder = lease_holder(&fx.client).await?;
    let (leader, follower) = if owns(&c1, &holder) {
        (&c1, &c2)
    } else {
        (&c2, &c1)
    };

    // Agent a reports through the replica that does not write.
    a.reconnect(channel(&follower.grpc_url(), &fx.tls.ca_pem).await?);
    let handshake = std::time::SystemTime::now();
    let report = |rx: u64| {
        vec![pb::PeerStatus {
            public_key: vec![2; 32],
            last_handshake: Some(prost_types::Timestamp::from(handshake)),
            rx_bytes: rx,
            tx_bytes: 2000,
            endpoint: "192.168.0.2:51820".into(),
        }]
    };
    a.report(report(1000)).await?;
    let fx = &fx;
    let rx_bytes_written = |rx: i64| async move {
        let status = fx.peer("node-b").await?.status.unwrap_or_default();
        Ok(if status.rx_bytes == rx {
            Break(status)
        } else {
            Continue(status)
        })
    };
    let status = eventually(WAIT, "the report in the status", || rx_bytes_written(1000)).await?;
    let first_write = std::time::Instant::now();
    assert_eq!(status.tx_bytes, 2000);
    assert_eq!(status.endpoint.as_deref(), Some("192.168.0.2:51820"));
    assert!(status.last_handshake_time.is_some());

    // A second report right away is held back by the per-object interval (5 s here).
    a.report(report(5000)).await?;
    eventually(WAIT, "the second report in the status", || {
        rx_bytes_written(5000)
    })
    .await?;
    assert!(
        first_write.elapsed() >= Duration::from_secs(4),
        "written again after {:?}",
        first_write.elapsed()
    );

    // A quiet mesh: no writes at all.
    let writes = |text: String| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("wgmesh_controller_status_writes_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = writes(leader.metrics().await?);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = writes(leader.metrics().await?);
    assert_eq!(before, after, "status writes in a quiet mesh");
    assert_eq!(
        writes(follower.metrics().await?),
        0.0,
        "the replica without the lease never writes"
    );
    Ok(())
}

/// Above the node-peer detail limit (1 here, so three nodes are a large mesh), node peers are
/// counted, not kept one by one: a node peer's status shows its agent's live sessions and no
/// per-node handshakes or traffic, whatever the agent sends, and no agent claims more
/// sessions than it has node peers.
#[tokio::test]
async fn a_large_mesh_counts_live_sessions_instead_of_keeping_every_pair() -> Result<()> {
    let fx = Fixture::new().await?;
    let env = [
        ("WGMESH_NODE_PEER_DETAIL_LIMIT", "1"),
        ("WGMESH_STATUS_INTERVAL", "1"),
    ];
    let controller = Controller::start(&fx.cp, &fx.tls, "c1", &env).await?;
    let mut a = fx.agent(&controller, "a", 1).await?;
    let mut b = fx.agent(&controller, "b", 2).await?;
    let mut c = fx.agent(&controller, "c", 3).await?;
    for agent in [&mut a, &mut b, &mut c] {
        agent
            .wait_until(WAIT, "two node peers", |s| s.peers.len() == 2)
            .await?;
    }
    let observed = |n: u8| pb::PeerStatus {
        public_key: vec![n; 32],
        last_handshake: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
        rx_bytes: 1000,
        tx_bytes: 2000,
        endpoint: format!("192.168.0.{n}:51820"),
    };
    // Agent a sends both node peers one by one (as agents before the count did) and claims
    // more sessions than it has peers; b says 1.
    a.report_sessions(vec![observed(2), observed(3)], 7).await?;
    b.report_sessions(vec![], 1).await?;
    let fx = &fx;
    let (sa, sb) = eventually(WAIT, "live sessions in the status", || async move {
        let (na, nb) = (fx.peer("node-a").await?, fx.peer("node-b").await?);
        let (sa, sb) = (na.status.unwrap_or_default(), nb.status.unwrap_or_default());
        Ok(
            if sa.live_sessions.is_some() && sb.live_sessions.is_some() {
                Break((sa, sb))
            } else {
                Continue((sa, sb))
            },
        )
    })
    .await?;
    assert_eq!(sa.live_sessions, Some(2), "capped at a's node peers");
    assert_eq!(sb.live_sessions, Some(1));
    for s in [&sa, &sb] {
        assert!(s.handshakes.is_empty(), "no per-node handshakes: {s:?}");
        assert_eq!(
            (s.rx_bytes, s.tx_bytes),
            (0, 0),
            "no per-pair traffic: {s:?}"
        );
        assert_eq!(s.endpoint, None, "{s:?}");
    }
    Ok(())
}

/// `spec.node` is the controller's to set (the chart's admission policy stops others at the
/// API server; this is the controller's own check behind it): a WireGuardPeer claiming a
/// node that the Node does not own is refused, never programmed, and never adopted, synced
/// or deleted by the controller.
#[tokio::test]
async fn a_user_made_node_peer_is_refused_and_left_alone() -> Result<()> {
    let fx = Fixture::new().await?;
    let controller = fx.controller("c1").await?;
    let mut a = fx.agent(&controller, "a", 1).await?;
    let _b = fx.agent(&controller, "b", 2).await?;
    a.wait_until(WAIT, "node b", |s| s.peers.len() == 1).await?;

    // Claims node b (which exists, and has its own peer) and a ghost node (which the
    // controller used to delete the object for).
    let claims = [
        (
            "fake-b",
            "b",
            30u8,
            "NodePeerNotOwned",
            "only the controller",
        ),
        ("fake-ghost", "ghost", 31, "NodeNotInMesh", "does not exist"),
    ];
    for (name, node, n, reason, says) in claims {
        fx.apply_peer(
            name,
            json!({"publicKey": key(n), "node": node, "allowedIPs": ["10.99.0.0/24"]}),
        )
        .await?;
        let peer = fx.wait_reason(name, reason).await?;
        let message = &peer.status.unwrap().conditions[0].message;
        assert!(message.contains(says), "{name}: {message}");
    }
    // Nor does such an object (or a peer author's `node-d`) keep a node out: the node's
    // peer takes another name, and the objects stay as their authors left them.
    cluster::create_node(&fx.client, "c", &["10.244.3.0/24"], "192.168.0.3", &[]).await?;
    cluster::create_node(&fx.client, "d", &["10.244.4.0/24"], "192.168.0.4", &[]).await?;
    fx.apply_peer(
        "node-c",
        json!({"publicKey": key(32), "node": "c", "allowedIPs": ["10.98.0.0/24"]}),
    )
    .await?;
    fx.apply_peer(
        "node-d",
        json!({"publicKey": key(33), "allowedIPs": ["10.97.0.0/24"]}),
    )
    .await?;
    fx.wait_reason("node-c", "NodePeerNotOwned").await?;
    let mut joined = Vec::new();
    for (node, n) in [("c", 3u8), ("d", 4)] {
        let token = cluster::agent_token(&fx.client, node).await?;
        let ch = channel(&controller.grpc_url(), &fx.tls.ca_pem).await?;
        let mut agent = SimAgent::new(ch, node, "default", &token, [n; 32]);
        let registered = agent.register(&format!("192.168.0.{n}")).await?;
        assert_eq!(registered.tunnel_addresses.len(), 1, "{node}");
        // Registering again finds the same peer.
        agent.register(&format!("192.168.0.{n}")).await?;
        joined.push(agent);
    }
    let all: Api<WireGuardPeer> = Api::all(fx.client.clone());
    for node in ["c", "d"] {
        let owned: Vec<String> = all
            .list(&Default::default())
            .await?
            .into_iter()
            .filter(|p| p.spec.node.as_ref().is_some_and(|n| n.as_str() == node))
            .filter(|p| p.metadata.owner_references.is_some())
            .map(|p| kube::ResourceExt::name_any(&p))
            .collect();
        assert_eq!(owned.len(), 1, "{node}: {owned:?}");
        assert!(owned[0].starts_with(&format!("node-{node}-")), "{owned:?}");
        let name = owned[0].clone();
        a.wait_until(WAIT, &name, |s| s.peer(&name).is_some())
            .await?;
    }
    for name in ["fake-b", "fake-ghost", "node-c", "node-d"] {
        let peer = fx.peer(name).await?;
        assert_eq!(peer.spec.allowed_ips.len(), 1, "{name} was not synced");
    }
    Ok(())
}
/// A gRPC channel to `controller` presenting `cert` as the client certificate.
async fn channel_with_client_cert(
    controller: &Controller,
    ca_pem: &str,
    cert: &wgmesh_e2e::pki::CertifiedKey,
) -> Result<tonic::transport::Channel> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem))
        .domain_name("localhost");
    Ok(Channel::from_shared(controller.grpc_url())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?)
}

#[tokio::test]
async fn a_forwarded_report_needs_the_replica_certificate_not_just_the_ca() -> Result<()> {
    let fx = Fixture::new().await?;
    let controller = fx.controller("c1").await?;
    let mut a = fx.agent(&controller, "a", 1).await?;
    let mut b = fx.agent(&controller, "b", 2).await?;
    a.wait_until(WAIT, "node-b", |s| s.peers.len() == 1).await?;
    b.wait_until(WAIT, "node-a", |s| s.peers.len() == 1).await?;

    // A report marked as forwarded by a replica, carrying no agent token.
    let forwarded = |rx: u64| {
        let mut req = tonic::Request::new(pb::ReportStatusRequest {
            node: "a".into(),
            mesh: "default".into(),
            peers: vec![pb::PeerStatus {
                public_key: vec![2; 32],
                last_handshake: None,
                rx_bytes: rx,
                tx_bytes: 1,
                endpoint: "192.168.0.2:51820".into(),
            }],
            ..Default::default()
        });
        req.metadata_mut()
            .insert("x-wgmesh-forwarded", "1".parse().expect("metadata"));
        req
    };

    // A certificate from the same CA, valid for client authentication, naming someone else.
    let other = fx
        .cp
        .ca()
        .server_cert("wgmesh-controller", &["intruder.example"])?;
    let ch = channel_with_client_cert(&controller, &fx.tls.ca_pem, &other).await?;
    let mut client = pb::mesh_service_client::MeshServiceClient::new(ch);
    let refused = client.report_status(forwarded(666)).await;
    assert_eq!(
        refused.map(|_| ()).map_err(|s| s.code()),
        Err(tonic::Code::Unauthenticated),
        "a forwarded report from a certificate without the replica name is authenticated as an agent's"
    );

    // The replicas' own certificate (it names the peer server name, `localhost` here) is
    // trusted as a replica.
    let replica = fx
        .cp
        .ca()
        .server_cert("wgmesh-controller", &["localhost", "127.0.0.1"])?;
    let ch = channel_with_client_cert(&controller, &fx.tls.ca_pem, &replica).await?;
    let mut client = pb::mesh_service_client::MeshServiceClient::new(ch);
    client.report_status(forwarded(1000)).await?;
    let fx = &fx;
    eventually(WAIT, "the replica's report in the status", || async move {
        let status = fx.peer("node-b").await?.status.unwrap_or_default();
        anyhow::ensure!(status.rx_bytes != 666, "the refused report was recorded");
        Ok(if status.rx_bytes == 1000 {
            Break(())
        } else {
            Continue(status)
        })
    })
    .await?;
    Ok(())
}

/// Creates namespace `ns` (if needed) and a Secret there with a valid preshared key.
async fn psk_secret(client: &kube::Client, ns: &str, name: &str, byte: u8) -> Result<()> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::{Namespace, Secret};
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(ns.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    match namespaces.create(&PostParams::default(), &namespace).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            [("presharedKey".to_owned(), ByteString(vec![byte; 32]))]
                .into_iter()
                .collect(),
        ),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}

#[tokio::test]
async fn secrets_outside_the_secret_namespaces_are_never_read() -> Result<()> {
    let fx = Fixture::new().await?;
    // The controller's own namespace holds its TLS key: a peer must not be able to point there.
    psk_secret(&fx.client, AGENT_NAMESPACE, "wgmesh-controller-tls", 7).await?;
    psk_secret(&fx.client, "wgmesh-secrets", "laptop-psk", 8).await?;
    let controller = Controller::start(
        &fx.cp,
        &fx.tls,
        "c1",
        &[("WGMESH_SECRET_NAMESPACES", "wgmesh-secrets,other-secrets")],
    )
    .await?;
    let _a = fx.agent(&controller, "a", 1).await?;
    let psk_ref =
        |ns: &str, name: &str| json!({"namespace": ns, "name": name, "key": "presharedKey"});

    fx.apply_peer(
        "laptop",
        json!({"publicKey": key(40), "allowedIPs": ["192.168.71.0/24"],
               "presharedKeySecretRef": psk_ref("wgmesh-secrets", "laptop-psk")}),
    )
    .await?;
    fx.wait_reason("laptop", "Programmed").await?;

    fx.apply_peer(
        "sneaky",
        json!({"publicKey": key(41), "allowedIPs": ["192.168.72.0/24"],
               "presharedKeySecretRef": psk_ref(AGENT_NAMESPACE, "wgmesh-controller-tls")}),
    )
    .await?;
    let sneaky = fx
        .wait_reason("sneaky", "PresharedKeySecretMissing")
        .await?;
    let ready = sneaky
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
        .context("a Ready condition")?;
    assert_eq!(ready.status, "False");
    assert!(
        ready
            .message
            .contains(&format!("{AGENT_NAMESPACE}/wgmesh-controller-tls"))
            && ready.message.contains("not read")
            && ready.message.contains("other-secrets, wgmesh-secrets"),
        "the message names the Secret and the allowed namespaces: {}",
        ready.message
    );
    // Still refused after the periodic re-read of Secrets (15 s).
    tokio::time::sleep(Duration::from_secs(17)).await;
    fx.wait_reason("sneaky", "PresharedKeySecretMissing")
        .await?;
    Ok(())
}

/// The startup taint goes once the node's agent says it has programmed the mesh (not before),
/// other taints stay; an agent's refusal becomes one Warning event on its Node.
#[tokio::test]
async fn the_startup_taint_goes_once_programmed_and_refusals_become_events() -> Result<()> {
    let fx = Fixture::new().await?;
    let c = fx.controller("c1").await?;
    let mut a = fx.agent(&c, "a", 1).await?;
    let _b = fx.agent(&c, "b", 2).await?;
    a.wait_until(WAIT, "node-b", |s| s.peers.len() == 1).await?;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(fx.client.clone());
    let taints = json!({"spec": {"taints": [
        {"key": "wgmesh.io/agent-not-ready", "effect": "NoSchedule"},
        {"key": "example.com/other", "effect": "NoSchedule"},
    ]}});
    nodes
        .patch("a", &PatchParams::default(), &Patch::Merge(&taints))
        .await?;
    let keys = |n: &k8s_openapi::api::core::v1::Node| -> Vec<String> {
        n.spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .map(|t| t.iter().map(|t| t.key.clone()).collect())
            .unwrap_or_default()
    };

    // Nothing programmed yet: the taint stays.
    a.report_state(0, "").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(keys(&nodes.get("a").await?).contains(&"wgmesh.io/agent-not-ready".to_owned()));

    a.report_state(3, "").await?;
    let nodes = &nodes;
    eventually(WAIT, "the startup taint gone", || async move {
        let now = keys(&nodes.get("a").await?);
        Ok(if now == ["example.com/other"] {
            Break(())
        } else {
            Continue(now)
        })
    })
    .await?;

    let refusal = "revision 9: would remove all 1 peers while 2 members exist";
    a.report_state(3, refusal).await?;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(fx.client.clone());
    let events = &events;
    let found = eventually(WAIT, "an UpdateRefused event", || async move {
        let found: Vec<_> = events
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("UpdateRefused"))
            .collect();
        Ok(if found.is_empty() {
            Continue(())
        } else {
            Break(found)
        })
    })
    .await?;
    assert_eq!(found.len(), 1, "one event: {found:?}");
    let e = &found[0];
    assert!(e.note.as_deref().unwrap_or("").contains(refusal), "{e:?}");
    assert_eq!(
        e.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("a")
    );
    Ok(())
}

/// A deleted mesh tells its agents so, and goes once every node's agent said it left; an agent
/// that never says so holds it only until the leave timeout.
#[tokio::test]
async fn a_deleted_mesh_waits_for_its_nodes_to_leave() -> Result<()> {
    let fx = Fixture::new().await?;
    let c = Controller::start(
        &fx.cp,
        &fx.tls,
        "c1",
        &[
            ("WGMESH_LEASE_DURATION", "6"),
            ("WGMESH_LEASE_GRACE", "2"),
            ("WGMESH_LEAVE_TIMEOUT", "60"),
        ],
    )
    .await?;
    let mut a = fx.agent(&c, "a", 1).await?;
    let mut b = fx.agent(&c, "b", 2).await?;
    a.wait_until(WAIT, "node-b", |s| s.peers.len() == 1).await?;
    let meshes: Api<wgmesh_api::WireGuardMesh> = Api::all(fx.client.clone());
    let meshes = &meshes;
    eventually(WAIT, "the finalizer on the mesh", || async move {
        let finalizers = meshes
            .get("default")
            .await?
            .metadata
            .finalizers
            .unwrap_or_default();
        Ok(
            if finalizers.contains(&"wgmesh.io/agents-clean".to_owned()) {
                Break(())
            } else {
                Continue(finalizers)
            },
        )
    })
    .await?;

    meshes.delete("default", &DeleteParams::default()).await?;
    for agent in [&mut a, &mut b] {
        agent
            .wait_until(WAIT, "told the mesh is deleted", |s| {
                s.tunnel_addresses.is_empty() && s.departure == pb::Departure::MeshDeleted as i32
            })
            .await?;
    }
    // While it is being deleted, no node registers (a node peer made now would outlive it).
    let refused = a
        .register("192.168.0.1")
        .await
        .expect_err("registering with a mesh being deleted");
    assert!(
        refused.code() == tonic::Code::FailedPrecondition
            && refused.message().contains("being deleted"),
        "{refused:?}"
    );
    a.report_left_deleted_mesh().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        meshes.get_opt("default").await?.is_some(),
        "b has not left yet"
    );
    b.report_left_deleted_mesh().await?;
    eventually(WAIT, "the mesh gone after every node left", || async move {
        Ok(match meshes.get_opt("default").await? {
            None => Break(()),
            Some(m) => Continue(m.metadata.finalizers),
        })
    })
    .await?;
    Ok(())
}

/// Waits until mesh `mesh`'s Ready condition has `reason`; returns the condition.
async fn mesh_ready_with(client: &kube::Client, mesh: &str, reason: &str) -> Result<Condition> {
    let meshes: Api<wgmesh_api::WireGuardMesh> = Api::all(client.clone());
    let meshes = &meshes;
    let what = format!("mesh {mesh}'s Ready reason {reason}");
    eventually(WAIT, &what, || async move {
        let status = meshes.get(mesh).await?.status.unwrap_or_default();
        let ready = status.conditions.into_iter().find(|c| c.type_ == "Ready");
        Ok(match ready {
            Some(c) if c.reason == reason => Break(c),
            other => Continue(other),
        })
    })
    .await
}

/// Waits until mesh `mesh` is not Ready with `reason`; returns the condition's message.
async fn mesh_refused_with(client: &kube::Client, mesh: &str, reason: &str) -> Result<String> {
    let c = mesh_ready_with(client, mesh, reason).await?;
    assert_eq!(c.status, "False", "{c:?}");
    Ok(c.message)
}

#[tokio::test]
async fn a_mesh_without_members_or_with_a_pool_over_a_node_says_so_and_changes_nothing()
-> Result<()> {
    let fx = Fixture::new().await?;
    let c = fx.controller("c1").await?;
    // Nothing is encrypted yet: not Ready.
    let message = mesh_refused_with(&fx.client, "default", "NoMembers").await?;
    assert!(message.contains("no node is a member"), "{message}");

    let mut a = fx.agent(&c, "a", 1).await?;
    let _b = fx.agent(&c, "b", 2).await?;
    a.wait_until(WAIT, "node-b", |s| s.peers.len() == 1).await?;
    let ready = mesh_ready_with(&fx.client, "default", "AllPeersProgrammed").await?;
    assert_eq!(ready.status, "True", "{ready:?}");
    let meshes: Api<wgmesh_api::WireGuardMesh> = Api::all(fx.client.clone());

    // A second mesh on the same nodes with the same interface: the newer one is held.
    let edge: wgmesh_api::WireGuardMesh = serde_json::from_value(json!({
        "apiVersion": "wgmesh.io/v1alpha1",
        "kind": "WireGuardMesh",
        "metadata": {"name": "edge"},
        "spec": {"listenPort": 51821, "tunnelCIDRs": ["10.251.0.0/16"]},
    }))?;
    meshes.create(&Default::default(), &edge).await?;
    let message = mesh_refused_with(&fx.client, "edge", "MeshConflict").await?;
    assert!(
        message.contains("mesh default (older)") && message.contains("interface wgmesh0"),
        "{message}"
    );

    // A pool over the nodes' own addresses would route the underlay into the tunnel: the
    // mesh is held as it is and says why; the agents are told nothing new.
    let updates = a.updates.len();
    meshes
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"tunnelCIDRs": ["192.168.0.0/16"]}})),
        )
        .await?;
    let message = mesh_refused_with(&fx.client, "default", "InvalidTunnelPool").await?;
    assert!(
        message.contains("192.168.0.0/16") && message.contains("an address of node"),
        "{message}"
    );
    let told = a
        .wait_until(Duration::from_secs(3), "any update", |s| {
            s.updates.len() > updates
        })
        .await;
    assert!(
        told.is_err(),
        "an agent was told to change: {:?}",
        a.updates.last()
    );
    // Held, the older mesh keeps wgmesh0 on the nodes as it is: the newer one stays held.
    let edge_reason = || async {
        let status = meshes.get("edge").await?.status.unwrap_or_default();
        let ready = status.conditions.into_iter().find(|c| c.type_ == "Ready");
        Ok::<_, anyhow::Error>(ready.map(|c| c.reason))
    };
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(edge_reason().await?.as_deref(), Some("MeshConflict"));
    }
    Ok(())
}

#[tokio::test]
async fn a_caller_spraying_bad_tokens_does_not_lock_out_agents() -> Result<()> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let fx = Fixture::new().await?;
    let c = fx.controller("c1").await?;
    // Bogus tokens from another address (127.0.0.2), until the controller stops asking the
    // API server about them.
    let url = c.grpc_url().replace("localhost", "127.0.0.1");
    let sprayer = Channel::from_shared(url)?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&fx.tls.ca_pem))
                .domain_name("localhost"),
        )?
        .local_address(Some("127.0.0.2".parse()?))
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    let mut limited = false;
    for i in 0..200u32 {
        let token = format!("bogus-{i}");
        let mut sim = SimAgent::new(sprayer.clone(), "a", "default", &token, [9; 32]);
        match sim.register("192.168.0.1").await {
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                limited = true;
                break;
            }
            Err(_) => {}
            Ok(r) => anyhow::bail!("a bogus token registered: {r:?}"),
        }
    }
    assert!(limited, "200 bad tokens were all reviewed");
    // An agent starting meanwhile, from its own address, is reviewed and registers.
    fx.agent(&c, "a", 1).await?;
    Ok(())
}

/// A peer stream that takes nothing (an HTTP/2 window of 0: its agent hung, or means harm)
/// holds its own stream only: not the snapshot turns every other agent waits for, and not a
/// second stream of its node, which ends the first.
#[tokio::test]
async fn agents_that_take_no_snapshot_keep_no_other_agent_waiting() -> Result<()> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    use wgmesh_proto::mesh_service_client::MeshServiceClient;
    let fx = Fixture::new().await?;
    // One peer per part, so that a snapshot is more parts than a stream buffers.
    let c = Controller::start(&fx.cp, &fx.tls, "c1", &[("WGMESH_PEERS_PER_PART", "1")]).await?;
    let stalled_channel = || async {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&fx.tls.ca_pem))
            .domain_name("localhost");
        anyhow::Ok(
            Channel::from_shared(c.grpc_url())?
                .tls_config(tls)?
                .initial_stream_window_size(Some(0))
                .connect()
                .await?,
        )
    };
    // More stalled agents than snapshots are sent at once (32), each with a snapshot of
    // more parts than its stream buffers.
    let mut tokens = Vec::new();
    for i in 0..34u8 {
        let node = format!("stalled-{i}");
        let address = format!("192.168.1.{}", i + 1);
        cluster::create_node(
            &fx.client,
            &node,
            &[&format!("10.245.{i}.0/24")],
            &address,
            &[],
        )
        .await?;
        let token = cluster::agent_token(&fx.client, &node).await?;
        let ch = channel(&c.grpc_url(), &fx.tls.ca_pem).await?;
        SimAgent::new(ch, &node, "default", &token, [100 + i; 32])
            .register(&address)
            .await?;
        tokens.push((node, token));
    }
    let mut stalled = Vec::new();
    for (node, token) in tokens {
        let mut req = tonic::Request::new(pb::WatchPeersRequest {
            node,
            mesh: "default".into(),
            accepts_parts: true,
            ..Default::default()
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        let stream = MeshServiceClient::new(stalled_channel().await?)
            .watch_peers(req)
            .await?
            .into_inner();
        stalled.push(stream);
    }
    // An agent that reads gets its snapshot, with every stalled node in it.
    let mut a = fx.agent(&c, "a", 1).await?;
    a.wait_until(WAIT, "the stalled nodes", |s| s.peers.len() == 34)
        .await?;

    // A second stream of a node ends the first.
    let mut first = fx.agent(&c, "b", 2).await?;
    first
        .wait_until(WAIT, "node a", |s| s.peers.len() == 35)
        .await?;
    let ch = channel(&c.grpc_url(), &fx.tls.ca_pem).await?;
    let mut again = SimAgent::new(ch, "b", "default", &first.token, [2; 32]);
    again.watch().await?;
    again
        .wait_until(WAIT, "its snapshot", |s| s.peers.len() == 35)
        .await?;
    let ended = first.next_update(WAIT).await;
    assert!(
        ended
            .as_ref()
            .is_err_and(|e| e.to_string().contains("closed the stream")),
        "{ended:?}"
    );
    let _ = &stalled;
    Ok(())
}

/// Each key change costs the whole mesh (new preshared keys, an update to every member): a
/// node may make a few at once, then one per 30 s.
#[tokio::test]
async fn a_node_changing_its_key_in_a_loop_is_slowed_down() -> Result<()> {
    let fx = Fixture::new().await?;
    let c = fx.controller("c1").await?;
    let a = fx.agent(&c, "a", 1).await?;
    let ch = channel(&c.grpc_url(), &fx.tls.ca_pem).await?;
    let mut outcomes = Vec::new();
    for n in 0..6u8 {
        let mut again = SimAgent::new(ch.clone(), "a", "default", &a.token, [200 + n; 32]);
        outcomes.push(again.register("192.168.0.1").await.map_err(|s| s.code()));
    }
    let codes: Vec<_> = outcomes.iter().map(|o| o.as_ref().err().copied()).collect();
    assert_eq!(
        codes,
        [
            None,
            None,
            None,
            None,
            Some(tonic::Code::ResourceExhausted),
            Some(tonic::Code::ResourceExhausted)
        ],
        "{outcomes:?}"
    );
    // The same key again is no change, and always taken, without a call to the API server
    // (an agent's every reconnection; every agent's after a controller restart).
    let unchanged = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("wgmesh_controller_registrations_total{outcome=\"unchanged\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = unchanged(&c.metrics().await?);
    let mut same = SimAgent::new(ch, "a", "default", &a.token, [203; 32]);
    for _ in 0..10 {
        same.register("192.168.0.1").await?;
    }
    assert_eq!(unchanged(&c.metrics().await?), before + 10);
    Ok(())
}

/// The active gateway's allowed IPs carry every external peer's networks, a list as long as
/// the external peers: an agent that takes changes of allowed IPs gets an external peer's
/// coming and going as a change of two entries, an older agent the gateway whole, and both
/// end with the same list.
#[tokio::test]
async fn the_gateways_growing_list_goes_as_changes_to_agents_that_take_them() -> Result<()> {
    let fx = Fixture::new().await?;
    let meshes: Api<wgmesh_api::WireGuardMesh> = Api::all(fx.client.clone());
    meshes
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"gatewaySelector": {"matchLabels": {"gw": "yes"}}}})),
        )
        .await?;
    let controller = fx.controller("c1").await?;
    cluster::create_node(
        &fx.client,
        "a",
        &["10.244.1.0/24"],
        "192.168.0.1",
        &[("gw", "yes")],
    )
    .await?;
    let token = cluster::agent_token(&fx.client, "a").await?;
    let ch = channel(&controller.grpc_url(), &fx.tls.ca_pem).await?;
    let mut a = SimAgent::new(ch, "a", "default", &token, [1; 32]);
    a.register("192.168.0.1").await?;
    a.watch().await?;
    let mut old = fx.agent(&controller, "b", 2).await?;
    cluster::create_node(&fx.client, "c", &["10.244.3.0/24"], "192.168.0.3", &[]).await?;
    let token = cluster::agent_token(&fx.client, "c").await?;
    let ch = channel(&controller.grpc_url(), &fx.tls.ca_pem).await?;
    let mut new = SimAgent::new(ch, "c", "default", &token, [3; 32]);
    new.accepts_allowed_ips_changes = true;
    new.register("192.168.0.3").await?;
    new.watch().await?;
    for agent in [&mut a, &mut old, &mut new] {
        agent
            .wait_until(WAIT, "the two other nodes", |s| s.peers.len() == 2)
            .await?;
    }
    let gateway_at = |s: &SimAgent| s.peer("node-a").map(|p| p.allowed_ips.clone());
    let before = gateway_at(&new).context("a at c")?;

    for (step, site, n) in [
        ("add", "office", 20u8),
        ("add", "home", 21),
        ("delete", "office", 20),
    ] {
        if step == "add" {
            fx.apply_peer(
                site,
                json!({"publicKey": key(n), "allowedIPs": [format!("192.168.{n}.0/24")]}),
            )
            .await?;
        } else {
            let api: Api<WireGuardPeer> = Api::all(fx.client.clone());
            api.delete(site, &DeleteParams::default()).await?;
        }
        let network = format!("192.168.{n}.0/24");
        let carried = |s: &SimAgent| {
            gateway_at(s).is_some_and(|ips| ips.contains(&network) == (step == "add"))
        };
        for agent in [&mut old, &mut new] {
            agent
                .wait_until(WAIT, &format!("{step} {site} at the gateway"), carried)
                .await?;
        }
        let (whole, changed) = (last_delta(&old), last_delta(&new));
        assert_eq!(
            (names(&whole.upserted), whole.changed_allowed_ips.len()),
            (vec!["node-a".to_owned()], 0),
            "{step} {site}: the older agent gets the gateway whole"
        );
        assert!(
            changed.upserted.is_empty(),
            "{step} {site}: {:?}",
            names(&changed.upserted)
        );
        let [change] = changed.changed_allowed_ips.as_slice() else {
            panic!("{step} {site}: one change: {changed:?}");
        };
        assert_eq!(change.public_key, vec![1u8; 32]);
        let moved = if step == "add" {
            (change.added.len(), change.removed.len())
        } else {
            (change.removed.len(), change.added.len())
        };
        assert_eq!(
            moved,
            (2, 0),
            "{step} {site}: its network and tunnel address: {change:?}"
        );
        assert!(
            change.added.contains(&network) || change.removed.contains(&network),
            "{change:?}"
        );
        assert_eq!(
            gateway_at(&new),
            gateway_at(&old),
            "{step} {site}: one list"
        );
    }
    assert_ne!(gateway_at(&new), Some(before), "home is still carried");
    Ok(())
}

/// The lease holder judges gateways by their agents' streams, also those open on another
/// replica (which tells it each stream's count there, in order): the active gateway stays
/// while its stream to the other replica is open, and moves once it closes.
#[tokio::test]
async fn a_gateway_streaming_to_another_replica_fails_over_when_its_stream_closes() -> Result<()> {
    let fx = Fixture::new().await?;
    let replicas = [fx.controller("c1").await?, fx.controller("c2").await?];
    let holder = holder_among(&fx.client, &replicas).await?;
    let (leader, other) = if owns(&replicas[0], &holder) {
        (&replicas[0], &replicas[1])
    } else {
        (&replicas[1], &replicas[0])
    };
    // a (the first gateway by name) streams to the replica without the lease, b to the
    // holder.
    let mut a = fx.agent(other, "a", 1).await?;
    let mut b = fx.agent(leader, "b", 2).await?;
    a.wait_until(WAIT, "node b", |s| s.peers.len() == 1).await?;
    b.wait_until(WAIT, "node a", |s| s.peers.len() == 1).await?;
    let meshes: Api<wgmesh_api::WireGuardMesh> = Api::all(fx.client.clone());
    let active = || async {
        let status = meshes.get("default").await?.status.unwrap_or_default();
        anyhow::Ok(status.active_gateway)
    };
    // Longer than the failover limit (5 s): a's stream elsewhere keeps it active.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(active().await?.as_deref(), Some("a"));
    }
    drop(a);
    let meshes = &meshes;
    eventually(WAIT, "b active once a's stream closed", || async move {
        let status = meshes.get("default").await?.status.unwrap_or_default();
        Ok(match status.active_gateway.as_deref() {
            Some("b") => Break(()),
            other => Continue(other.map(str::to_owned)),
        })
    })
    .await?;
    Ok(())
}

/// A call without a valid agent token is answered from its headers: the controller does not
/// wait for (nor buffer) a body it declared 3 MiB long and never finishes sending. Before,
/// tonic read the whole message before the handler checked the token, so anyone who could
/// reach the port held megabytes of our memory per stream.
#[tokio::test]
async fn a_call_without_a_token_is_refused_before_its_body_is_read() -> Result<()> {
    use http_body::Frame;
    use tower::ServiceExt;

    let fx = Fixture::new().await?;
    let controller = fx.controller("c1").await?;
    let ch = channel(&controller.grpc_url(), &fx.tls.ca_pem).await?;
    for token in [None, Some("not-a-token")] {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<bytes::Bytes>, tonic::Status>>(4);
        // gRPC framing: uncompressed, 3 MiB long; then only the first KiB of it.
        let mut head = vec![0u8];
        head.extend_from_slice(&(3u32 << 20).to_be_bytes());
        head.extend_from_slice(&[0; 1024]);
        tx.send(Ok(Frame::data(bytes::Bytes::from(head)))).await?;
        let body = tonic::body::Body::new(http_body_util::StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
        let mut request = http::Request::builder()
            .method("POST")
            .uri("/wgmesh.v1.MeshService/ReportStatus")
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let response = tokio::time::timeout(
            Duration::from_secs(10),
            ch.clone().oneshot(request.body(body)?),
        )
        .await
        .context("the controller waited for the body")??;
        let status = response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        assert_eq!(
            status.as_deref(),
            Some("16"), // UNAUTHENTICATED
            "token {token:?}: {:?}",
            response.headers()
        );
        drop(tx);
    }
    Ok(())
}

/// The UID of the agents' service account (a token signed here names it).
async fn agent_service_account_uid(client: &kube::Client) -> Result<String> {
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(client.clone(), AGENT_NAMESPACE);
    sas.get(cluster::AGENT_SERVICE_ACCOUNT)
        .await?
        .metadata
        .uid
        .context("the agents' service account has no uid")
}

/// Waits for `agent`'s stream to end and returns the status it ended with.
async fn stream_end(agent: &mut SimAgent, within: Duration) -> Result<tonic::Status> {
    let until = tokio::time::Instant::now() + within;
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        anyhow::ensure!(
            !left.is_zero(),
            "the stream was still open after {within:?}"
        );
        match agent.next_update(left).await {
            Ok(_) => continue,
            Err(e) => {
                return e
                    .downcast::<tonic::Status>()
                    .map_err(|e| anyhow::anyhow!("the stream ended without a status: {e}"));
            }
        }
    }
}

/// A peer stream lasts no longer than the token it was opened with: it ends when the token
/// expires, and when the pod the token is bound to is deleted (found at the next review,
/// every 2 s here). Before, a stream opened with a stolen token kept that node's view for
/// as long as its connection lived. The agent's own calls meanwhile carry its newest token.
#[tokio::test]
async fn a_peer_stream_ends_with_its_token() -> Result<()> {
    let fx = Fixture::new().await?;
    let controller = Controller::start(
        &fx.cp,
        &fx.tls,
        "c1",
        &[("WGMESH_STREAM_REVIEW_SECONDS", "2")],
    )
    .await?;
    cluster::create_node(&fx.client, "a", &["10.244.1.0/24"], "192.168.0.1", &[]).await?;
    cluster::ensure_agent_identity(&fx.client).await?;
    let ch = channel(&controller.grpc_url(), &fx.tls.ca_pem).await?;

    // A token that expires in 15 s, signed by the cluster: the stream ends then, although the
    // pod is there and nothing else changed.
    let pod =
        cluster::agent_pod(&fx.client, "agent-a", "a", cluster::AGENT_SERVICE_ACCOUNT).await?;
    let sa_uid = agent_service_account_uid(&fx.client).await?;
    let who = (
        AGENT_NAMESPACE,
        cluster::AGENT_SERVICE_ACCOUNT,
        sa_uid.as_str(),
    );
    let signed = std::time::Instant::now();
    let short = wgmesh_e2e::tokens::signed_token(&fx.cp, who, &pod, "wgmesh", 15)?;
    // Only the stream: a registration may wait seconds for the controller's cache, which a
    // slow machine would take out of the token's short life.
    let mut agent = SimAgent::new(ch.clone(), "a", "default", &short, [1; 32]);
    agent.watch().await?;
    agent
        .next_update(Duration::from_secs(10))
        .await?
        .context("the snapshot")?;
    let ended = stream_end(&mut agent, Duration::from_secs(30)).await?;
    assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended:?}");
    // `exp` is in whole seconds: 14 to 15 s after signing.
    assert!(
        signed.elapsed() >= Duration::from_secs(14),
        "the stream ended before its token expired: {:?}",
        signed.elapsed()
    );

    // A token from the API server (valid for an hour): the stream ends once its pod is gone.
    let pod_b =
        cluster::agent_pod(&fx.client, "agent-a-2", "a", cluster::AGENT_SERVICE_ACCOUNT).await?;
    let token =
        cluster::bound_token(&fx.client, cluster::AGENT_SERVICE_ACCOUNT, &pod_b, "wgmesh").await?;
    let mut agent = SimAgent::new(ch.clone(), "a", "default", &token, [1; 32]);
    agent.watch().await?;
    agent
        .next_update(Duration::from_secs(10))
        .await?
        .context("the snapshot")?;
    // Still open after several reviews.
    assert!(
        agent.next_update(Duration::from_secs(5)).await?.is_none(),
        "nothing changed, and the stream stays open"
    );
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(fx.client.clone(), AGENT_NAMESPACE);
    pods.delete("agent-a-2", &DeleteParams::default().grace_period(0))
        .await?;
    // The review answered in the last 30 s is reused; the next one refuses.
    let ended = stream_end(&mut agent, Duration::from_secs(45)).await?;
    assert_eq!(ended.code(), tonic::Code::Unauthenticated, "{ended:?}");
    Ok(())
}
