//! The wgmesh controller: watches Nodes, `WireGuardMesh` and `WireGuardPeer` objects,
//! computes each node's peer set (`wgmesh_core::desired`), serves it to agents over gRPC, and,
//! on the replica holding the lease, writes status, tunnel addresses and node peers.
#![forbid(unsafe_code)]

pub mod agent_followups;
pub mod auth;
pub mod config;
pub mod convert;
pub mod early_auth;
pub mod error;
pub mod forward;
pub mod grpc;
pub mod http;
pub mod index;
pub mod liveness;
pub mod metrics;
pub mod pacing;
pub mod reconcile;
pub mod relevant;
pub mod reports;
pub mod secret_scope;
pub mod trim;
pub mod writer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::runtime::events::{Recorder, Reporter};
use tokio::sync::watch;
use tonic::transport::{Identity, Server, ServerTlsConfig};

pub use config::Config;
pub use error::{Error, Result};

/// The largest request an agent may send: a status report of a 5,000-peer mesh is about
/// 500 KiB, so 4 MiB leaves room and still bounds what one request costs us.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// How long the controller waits at start for the objects that reserve ranges to be listed.
const RESERVED_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs the controller until SIGTERM or Ctrl-C.
/// `wgmesh-controller delete-mesh`: deletes the mesh (or every mesh) and waits until the API
/// server has let them go (after the controller removed their finalizer), or the timeout.
pub async fn delete_mesh(args: &config::DeleteMeshArgs) -> Result<()> {
    use kube::ResourceExt;
    use kube::api::{Api, DeleteParams};
    let client = kube::Client::try_default().await?;
    let meshes: Api<wgmesh_api::WireGuardMesh> = Api::all(client);
    let names: Vec<String> = if args.all {
        meshes
            .list(&Default::default())
            .await?
            .items
            .iter()
            .map(|m| m.name_any())
            .collect()
    } else if meshes.get_opt(&args.name).await?.is_some() {
        vec![args.name.clone()]
    } else {
        Vec::new()
    };
    if names.is_empty() {
        tracing::info!("no mesh to delete");
        return Ok(());
    }
    for name in &names {
        meshes.delete(name, &DeleteParams::default()).await?;
        tracing::info!(mesh = %name, "deleted; waiting for its nodes to leave");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(args.timeout);
    for name in &names {
        while meshes.get_opt(name).await?.is_some() {
            if std::time::Instant::now() > deadline {
                tracing::warn!(mesh = %name, "still there after {} s: some nodes may keep their interface (wgmesh-agent cleanup removes it)", args.timeout);
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
        tracing::info!(mesh = %name, "gone: its nodes left");
    }
    Ok(())
}

pub async fn run(config: Config) -> Result<()> {
    let kube_config = kube::Config::infer()
        .await
        .map_err(|e| Error::Config(format!("Kubernetes client configuration: {e}")))?;
    let reserved = config.reserved_ranges(kube_config.cluster_url.host())?;
    let client = kube::Client::try_from(kube_config)?;
    let identity = forward::lease_identity(
        &config.identity.clone().unwrap_or_else(random_identity),
        config.advertise_addr().as_deref(),
    );
    let metrics = metrics::Metrics::new();
    let (shutdown_tx, shutdown) = watch::channel(false);

    // Fail early on unreadable TLS material rather than after the caches sync.
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| Error::ReadFile {
            path: p.display().to_string(),
            source,
        })
    };
    let (cert_pem, key_pem) = (read(&config.tls_cert)?, read(&config.tls_key)?);
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(&cert_pem, &key_pem));
    let mut forwarder = None;
    if let Some(ca_path) = &config.tls_ca {
        let ca_pem = read(ca_path)?;
        // Agents present no client certificate; replicas forwarding reports do.
        tls = tls
            .client_ca_root(tonic::transport::Certificate::from_pem(&ca_pem))
            .client_auth_optional(true);
        forwarder = Some(Arc::new(forward::Forwarder::new(
            kube::Api::namespaced(client.clone(), &config.namespace),
            &config.lease_name,
            &identity,
            forward::Forwarder::client_tls(&ca_pem, &cert_pem, &key_pem, &config.peer_server_name),
        )));
    }

    let index = Arc::new(index::Index::new(format!("{identity}-{}", random_suffix())));
    let reports = Arc::new(reports::Reports::new(config.node_peer_detail_limit));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "wgmesh-controller".into(),
            instance: Some(identity.clone()),
        },
    );

    let (caches, watch_driver, changes) = reconcile::watch_cluster(&client, reserved);
    tokio::spawn(watch_driver);
    let ready = Arc::new(AtomicBool::new(false));
    let ipv6 = config::ipv6_available();
    tokio::spawn(http::serve(
        config::listen_addr(config.metrics_addr, ipv6),
        metrics.clone(),
        ready.clone(),
        shutdown.clone(),
    ));

    tracing::info!("waiting for the caches to sync");
    caches.nodes.wait_until_ready().await.ok();
    caches.meshes.wait_until_ready().await.ok();
    caches.peers.wait_until_ready().await.ok();
    // The reserved ranges no peer may claim (Service CIDRs, the API server's addresses):
    // judged before they are known, a peer claiming them would be programmed until they
    // are. A cluster without ServiceCIDR objects (before 1.33) never lists them: after a
    // while the mesh is computed with what --reserved-cidrs names.
    let reserved_listed = futures::future::join(
        caches.service_cidrs.wait_until_ready(),
        caches.api_endpoints.wait_until_ready(),
    );
    if tokio::time::timeout(RESERVED_SYNC_WAIT, reserved_listed)
        .await
        .is_err()
    {
        tracing::warn!(
            "ServiceCIDRs or the API server's EndpointSlice not listed within {RESERVED_SYNC_WAIT:?}: going on with --reserved-cidrs for what they would reserve"
        );
    }

    let (computed_tx, computed_rx) = watch::channel(Arc::new(reconcile::Computed::default()));
    // A first computation before serving, so agents never see an empty mesh after a restart.
    computed_tx.send_replace(Arc::new(reconcile::compute_all(
        &caches,
        &Default::default(),
        &index,
        &reconcile::Computed::default(),
    )));
    tokio::spawn(reconcile::run(
        client.clone(),
        caches.clone(),
        changes,
        index.clone(),
        computed_tx,
        metrics.clone(),
        secret_scope::SecretNamespaces::new(&config.secret_namespaces),
    ));

    // Reports of deleted meshes and nodes (or nodes that left a mesh) are forgotten.
    let mut computed_for_reports = computed_rx.clone();
    let prune_reports = reports.clone();
    tokio::spawn(async move {
        while computed_for_reports.changed().await.is_ok() {
            let computed = computed_for_reports.borrow_and_update().clone();
            let computed_members = computed.meshes.iter().map(|(name, (_, desired))| {
                (
                    name.clone(),
                    Some(desired.members.keys().cloned().collect()),
                )
            });
            let deleting = computed
                .deleting
                .iter()
                .map(|(name, (_, nodes))| (name.clone(), Some(nodes.clone())));
            let held = computed.held.keys().map(|name| (name.clone(), None));
            let members = computed_members.chain(deleting).chain(held).collect();
            prune_reports.prune(&members);
        }
    });

    let leader = leader_election(&client, &config, &identity, metrics.clone()).await?;
    let writer = writer::Writer::new(
        client.clone(),
        recorder.clone(),
        reports.clone(),
        metrics.clone(),
        config.status_interval(),
        std::time::Duration::from_secs(config.leave_timeout),
        config.gateway_failover(),
    );
    let leader_rx = leader.clone();
    if let Some(forwarder) = forwarder.clone() {
        tokio::spawn(forward::forward_stream_events(
            forwarder.clone(),
            reports.clone(),
            metrics.clone(),
        ));
        tokio::spawn(forward::announce_streams_to_new_holders(
            forwarder,
            reports.clone(),
            leader.clone(),
        ));
    }
    tokio::spawn(writer.run(computed_rx, leader));

    let auth = Arc::new(auth::Authenticator::new(
        client.clone(),
        config.token_audience.clone(),
        config.agent_namespace(),
        &config.agent_service_account,
        metrics.clone(),
    ));
    let service = grpc::MeshServer {
        client: client.clone(),
        caches,
        index: index.clone(),
        auth: auth.clone(),
        reports,
        metrics: metrics.clone(),
        recorder,
        shutdown: shutdown.clone(),
        leader: leader_rx,
        forwarder,
        replica_name: config.peer_server_name.clone(),
        peers_per_part: config.peers_per_part as usize,
        stream_review: std::time::Duration::from_secs(config.stream_review_seconds),
        snapshot_turns: Arc::new(tokio::sync::Semaphore::new(grpc::SNAPSHOTS_IN_FLIGHT)),
        open_streams: Arc::default(),
        key_changes: Default::default(),
    };
    ready.store(true, Ordering::Relaxed);
    let grpc_addr = config::listen_addr(config.grpc_addr, ipv6);
    tracing::info!(addr = %grpc_addr, identity = %identity, "serving agents");

    let prune_index = index.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            tick.tick().await;
            prune_index.prune();
        }
    });

    let signal = async move {
        wait_for_signal().await;
        tracing::info!("shutting down: closing agent streams");
        let _ = shutdown_tx.send(true);
    };
    // A client that never finishes its TLS handshake holds a connection for this long.
    let tls = tls.timeout(std::time::Duration::from_secs(10));
    Server::builder()
        .tls_config(tls)?
        // Bounds what one unauthenticated request can make us allocate: requests handled at
        // once (until their response starts), and streams open at once, per connection (an
        // agent needs one per mesh, and a short one per registration and report).
        .concurrency_limit_per_connection(64)
        .max_concurrent_streams(64)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        // Connections whose other end is gone without a word (a node powered off).
        .tcp_keepalive(Some(std::time::Duration::from_secs(60)))
        .add_service(early_auth::AuthenticatedFirst {
            inner: wgmesh_proto::served::mesh_service_server::MeshServiceServer::new(service)
                .max_decoding_message_size(MAX_REQUEST_BYTES),
            auth,
            replica_name: config.peer_server_name.clone(),
        })
        .serve_with_shutdown(grpc_addr, signal)
        .await?;
    Ok(())
}

/// Runs the lease manager; the returned channel is true while this replica is the writer.
async fn leader_election(
    client: &kube::Client,
    config: &Config,
    identity: &str,
    metrics: metrics::Metrics,
) -> Result<watch::Receiver<bool>> {
    let manager = kube_lease_manager::LeaseManagerBuilder::new(client.clone(), &config.lease_name)
        .with_namespace(&config.namespace)
        .with_identity(identity)
        .with_duration(config.lease_duration)
        .with_grace(config.lease_grace)
        .build()
        .await?;
    let (mut lease, task) = manager.watch().await;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let leading = *lease.borrow_and_update();
            metrics.set_leader(leading);
            if tx.send_replace(leading) != leading {
                tracing::info!(leading, "lease changed hands");
            }
            if lease.changed().await.is_err() {
                break;
            }
        }
        tx.send_replace(false);
        drop(task);
    });
    Ok(rx)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 6];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "wgmesh-controller".into());
    format!("{host}-{}", random_suffix())
}
