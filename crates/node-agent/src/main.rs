//! `wgmesh-agent`: owns the node's WireGuard key and programs the node's interface from the
//! peer set the controller streams.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::sync::Arc;

use tokio::sync::watch;
use tracing_subscriber::EnvFilter;
use wgmesh_agent::agent::Agent;
use wgmesh_agent::config::{Cli, Command, RunArgs};
use wgmesh_agent::keys;
use wgmesh_agent::metrics::Metrics;
use wgmesh_agent::routing::Routing;
use wgmesh_core::PrivateKey;
use wgmesh_device::InterfaceConfig;
use wgmesh_device::userspace::{UserspaceDevice, WorkerPolicy};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse_from_args(std::env::args_os()).unwrap_or_else(|e| e.exit());
    tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .init();
    let result = match cli.command {
        None => run(cli.run).await,
        Some(Command::Run(args)) => run(*args).await,
        Some(Command::Cleanup(args)) => cleanup(&args).await,
        Some(Command::InstallCniPlugins(args)) => install_cni_plugins(&args.from, &args.to),
        Some(Command::UserspaceDevice(args)) => {
            userspace_device(&args.interface, args.workers).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "wgmesh-agent failed");
            ExitCode::FAILURE
        }
    }
}

/// `WGMESH_LOG` (default `info`), with netlink's message tracing always off: at trace level it
/// prints raw netlink messages, which for the kernel backend include the private key.
fn log_filter() -> EnvFilter {
    let base = std::env::var("WGMESH_LOG").unwrap_or_else(|_| "info".into());
    EnvFilter::try_new(format!("{base},netlink_proto=off"))
        .unwrap_or_else(|_| EnvFilter::new("info,netlink_proto=off"))
}

/// For a node whose agent is gone: removes what an agent leaves on purpose when it stops (it
/// cannot tell a stop from an upgrade), saying what went.
async fn cleanup(args: &wgmesh_agent::config::CleanupArgs) -> anyhow::Result<()> {
    let dir = args.state_dir.join(&args.mesh);
    // A WireGuard link is deleted only if it is marked as wgmesh's: one an agent older than
    // the mark made is marked first when it holds the node's key or carries its saved peers.
    let known = wgmesh_agent::saved::peers_on(&dir, &args.interface);
    let key = std::fs::read_to_string(wgmesh_agent::keys::key_path(&dir))
        .ok()
        .and_then(|k| k.trim().parse::<PrivateKey>().ok())
        .map(|k| k.public_key());
    if (key.is_some() || !known.is_empty())
        && let Err(e) =
            wgmesh_device::kernel::claim_link(&args.interface, key.as_ref(), &known).await
    {
        tracing::warn!(error = %e, "could not check whose the WireGuard link is");
    }
    let routing = Routing::new().await?;
    routing
        .cleanup(&args.interface, args.route_table, &[])
        .await?;
    tracing::info!(
        interface = %args.interface,
        route_table = args.route_table,
        "removed the interface (with its addresses; not another tool's WireGuard link), wgmesh's routes via it, its guard and throw routes (main table and table {}) and its rules",
        args.route_table
    );
    if wgmesh_agent::cni::remove_conflist(&args.cni_conf_dir, &args.cni_run_dir)? {
        tracing::info!(path = %wgmesh_agent::cni::conflist_path(&args.cni_conf_dir).display(), "removed the CNI configuration");
    }
    let gate = wgmesh_agent::cni::gate::sync(&args.cni_conf_dir, &args.cni_run_dir, false)?;
    if gate == (wgmesh_agent::cni::gate::Outcome::Absent { removed: true }) {
        tracing::info!(path = %args.cni_conf_dir.join(wgmesh_agent::cni::gate::GATE_FILE).display(), "removed the pods' gate (add-on mode)");
    }
    wgmesh_agent::netfilter::apply(None).await?;
    tracing::info!(
        table = wgmesh_agent::netfilter::TABLE,
        "removed the nftables table inet wgmesh (pod egress masquerade, MSS clamping, the control connection marks), if there was one"
    );
    if routing.remove_bridge_if_unused(&args.cni_bridge).await? {
        tracing::info!(bridge = %args.cni_bridge, "removed the pods' bridge (no pod uses it)");
    }
    if args.remove_key {
        wgmesh_agent::keys::forget(&dir)?;
        tracing::info!(dir = %dir.display(), "removed the mesh's key and state");
        return Ok(());
    }
    let saved = wgmesh_agent::saved::path(&dir);
    if saved.exists() {
        wgmesh_agent::saved::remove(&dir)?;
        tracing::info!(path = %saved.display(), "removed the saved configuration (the key stays; --remove-key removes it)");
    }
    Ok(())
}

fn install_cni_plugins(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    let copied = wgmesh_agent::cni::install_plugins(from, to)?;
    tracing::info!(?copied, to = %to.display(), "CNI plugins installed where missing");
    Ok(())
}

/// The userspace device alone, with a random key and port, for benchmarks and debugging:
/// configure it with `wg set` (no addresses or routes: set those with `ip`).
async fn userspace_device(interface: &str, workers: WorkerPolicy) -> anyhow::Result<()> {
    let device = UserspaceDevice::create_with(
        InterfaceConfig {
            name: interface.to_owned(),
            private_key: PrivateKey::generate(),
            listen_port: 0,
            fwmark: 0,
        },
        workers,
    )?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    device.shutdown();
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // First of all: nothing (key, state, device, routes) may happen with a URL we refuse.
    wgmesh_agent::config::check_controller_url(&args.controller).map_err(anyhow::Error::msg)?;
    if args.node.is_empty() {
        anyhow::bail!("--node (or NODE_NAME) is required");
    }
    let (key, new) = keys::load_or_create(&args.mesh_state_dir(), args.rotate_key)?;
    tracing::info!(
        public_key = %key.public_key(),
        key_file = %keys::key_path(&args.mesh_state_dir()).display(),
        "{}",
        if new { "generated a new private key" } else { "reusing the private key" }
    );
    let metrics = Metrics::default();
    let (healthy, healthy_rx) = watch::channel(false);
    let healthy = Arc::new(healthy);
    wgmesh_agent::http::serve(args.metrics_addr, metrics.clone(), healthy_rx).await?;

    let agent = Agent::new(args, key, metrics, healthy).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = agent.run() => r?,
        _ = term.recv() => tracing::info!("stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
    }
    Ok(())
}
