//! Command-line and environment configuration of the controller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "wgmesh-controller",
    version,
    about = "The wgmesh cluster controller"
)]
pub struct Config {
    /// Address the gRPC server (agents) listens on.
    #[arg(long, env = "WGMESH_GRPC_ADDR", default_value = "0.0.0.0:9443")]
    pub grpc_addr: SocketAddr,

    /// PEM certificate chain of the gRPC server.
    #[arg(
        long,
        env = "WGMESH_TLS_CERT",
        default_value = "/etc/wgmesh/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,

    /// PEM private key of the gRPC server.
    #[arg(
        long,
        env = "WGMESH_TLS_KEY",
        default_value = "/etc/wgmesh/tls/tls.key"
    )]
    pub tls_key: PathBuf,

    /// CA of the replicas' serving certificate. When set, replicas that do not hold the lease
    /// forward agents' status reports to the one that does, authenticated by mutual TLS.
    #[arg(long, env = "WGMESH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// host:port other replicas reach this replica's gRPC server at (default: $POD_IP and
    /// the gRPC port).
    #[arg(long, env = "WGMESH_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,

    /// Name in the replicas' serving certificate, checked when forwarding to another replica,
    /// and required in the client certificate of a replica that forwards a report.
    #[arg(
        long,
        env = "WGMESH_PEER_SERVER_NAME",
        default_value = "wgmesh-controller"
    )]
    pub peer_server_name: String,

    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    #[arg(long, env = "WGMESH_METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// Namespace the controller runs in (its Lease lives there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "wgmesh-system")]
    pub namespace: String,

    /// This replica's identity in the Lease; the pod name in a cluster.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Name of the Lease that elects the writer.
    #[arg(long, env = "WGMESH_LEASE_NAME", default_value = "wgmesh-controller")]
    pub lease_name: String,

    /// Seconds a lease stays valid without renewal.
    #[arg(long, env = "WGMESH_LEASE_DURATION", default_value_t = 15)]
    pub lease_duration: u64,

    /// Seconds before expiry at which the holder renews.
    #[arg(long, env = "WGMESH_LEASE_GRACE", default_value_t = 5)]
    pub lease_grace: u64,

    /// Namespace of the agents' service account.
    #[arg(long, env = "WGMESH_AGENT_NAMESPACE")]
    pub agent_namespace: Option<String>,

    /// Name of the agents' service account: only its tokens may register nodes.
    #[arg(
        long,
        env = "WGMESH_AGENT_SERVICE_ACCOUNT",
        default_value = "wgmesh-agent"
    )]
    pub agent_service_account: String,

    /// Audience agents' projected tokens must carry.
    #[arg(long, env = "WGMESH_TOKEN_AUDIENCE", default_value = "wgmesh")]
    pub token_audience: String,

    /// Namespaces whose Secrets the controller reads (preshared keys of meshes and peers),
    /// comma-separated. A reference to a Secret anywhere else is not read, and its object is
    /// not Ready. Keep the controller's own namespace (its TLS key) out of this list.
    #[arg(
        long,
        env = "WGMESH_SECRET_NAMESPACES",
        value_delimiter = ',',
        default_value = "wgmesh-secrets"
    )]
    pub secret_namespaces: Vec<String>,

    /// Minimum seconds between two writes of agent-reported status to one object.
    #[arg(long, env = "WGMESH_STATUS_INTERVAL", default_value_t = 30)]
    pub status_interval: u64,

    /// Log format.
    #[arg(long, env = "WGMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl Config {
    pub fn agent_namespace(&self) -> &str {
        self.agent_namespace.as_deref().unwrap_or(&self.namespace)
    }

    /// Where other replicas reach this one, if known.
    pub fn advertise_addr(&self) -> Option<String> {
        self.advertise_addr.clone().or_else(|| {
            let ip: std::net::IpAddr = std::env::var("POD_IP").ok()?.parse().ok()?;
            Some(SocketAddr::new(ip, self.grpc_addr.port()).to_string())
        })
    }

    pub fn status_interval(&self) -> Duration {
        Duration::from_secs(self.status_interval)
    }
}
