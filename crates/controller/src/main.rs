//! `wgmesh-controller`: reconciles Nodes and wgmesh.io objects into per-node peer sets and
//! serves them to node agents over gRPC.

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wgmesh_controller::config::{Command, Config, LogFormat};

#[cfg(feature = "dhat-heap")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Writes the profile when dropped, at the end of main (a SIGTERM, not a SIGKILL).
    #[cfg(feature = "dhat-heap")]
    let _profiler = {
        let dir = std::env::var_os("WGMESH_DHAT_DIR").unwrap_or_else(|| ".".into());
        let file =
            std::path::Path::new(&dir).join(format!("dhat-heap-{}.json", std::process::id()));
        dhat::Profiler::builder().file_name(file).build()
    };
    let config = Config::parse();
    let filter = EnvFilter::try_from_env("WGMESH_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,kube_lease_manager=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let result = match config.command.clone() {
        Some(Command::DeleteMesh(args)) => wgmesh_controller::delete_mesh(&args).await,
        None => wgmesh_controller::run(config).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "wgmesh-controller failed");
            std::process::ExitCode::FAILURE
        }
    }
}
