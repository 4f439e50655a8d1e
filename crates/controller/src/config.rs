//! Command-line and environment configuration of the controller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use wgmesh_core::Cidr;
use wgmesh_core::desired::ReservedRange;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "wgmesh-controller",
    version,
    about = "The wgmesh cluster controller",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Config {
    /// Without a command: run the controller.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address the gRPC server (agents) listens on. `[::]` takes IPv4 and IPv6 (IPv4 alone
    /// where the kernel has no IPv6).
    #[arg(long, env = "WGMESH_GRPC_ADDR", default_value = "[::]:9443")]
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

    /// Address of the HTTP server for /metrics, /healthz and /readyz (`[::]` as for
    /// --grpc-addr).
    #[arg(long, env = "WGMESH_METRICS_ADDR", default_value = "[::]:9090")]
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

    /// Seconds a deleted mesh waits for its nodes' agents to report that they left (removed
    /// their data path) before it goes anyway (an agent that is down never reports).
    #[arg(long, env = "WGMESH_LEAVE_TIMEOUT", default_value_t = 120)]
    pub leave_timeout: u64,

    /// Seconds a gateway's agent may be disconnected (its stream closed, no report since)
    /// before the traffic between external peers and the other nodes moves to the next live
    /// gateway. An agent restart reconnects well within it; a connection that dies silently
    /// (a node powered off) is closed by HTTP/2 keepalive first, within about 50 s.
    #[arg(long, env = "WGMESH_GATEWAY_FAILOVER_SECONDS", default_value_t = 5)]
    pub gateway_failover_seconds: u64,

    /// Most peers in one stream message to agents that join updates sent in parts (every
    /// current agent): a stream's buffer grows to its largest message, so this bounds the
    /// memory each connected agent costs the controller. Tests set it low so that every
    /// update of more than a few peers travels in parts.
    #[arg(long, env = "WGMESH_PEERS_PER_PART", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub peers_per_part: u32,

    /// Up to this many node peers per node (a mesh of one more node), agents' observations
    /// of node peers are kept and written one by one (each node peer's status lists every
    /// node's handshake with it); above, only each node's count of live sessions is, since
    /// per-node detail grows as nodes^2. Benchmarks raise it to measure that growth.
    #[arg(long, env = "WGMESH_NODE_PEER_DETAIL_LIMIT", default_value_t = wgmesh_core::report::NODE_PEER_DETAIL_LIMIT)]
    pub node_peer_detail_limit: usize,

    /// Seconds between reviews of an open peer stream's token: a stream whose token no longer
    /// passes (its pod was deleted) ends then, and every stream ends when its token expires.
    /// Reviews answered in the last 30 s (the agent's own calls) are reused.
    #[arg(long, env = "WGMESH_STREAM_REVIEW_SECONDS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub stream_review_seconds: u64,

    /// Minimum seconds between two writes of agent-reported status to one object.
    #[arg(long, env = "WGMESH_STATUS_INTERVAL", default_value_t = 30)]
    pub status_interval: u64,

    /// Ranges no WireGuardPeer may claim, besides those the controller finds itself (loopback,
    /// link-local and metadata, multicast, every Node's addresses, the API server's
    /// addresses, and the ServiceCIDR objects of Kubernetes 1.33+): name the Service CIDR
    /// here on older clusters, and any underlay range nodes must keep reaching directly.
    #[arg(long, env = "WGMESH_RESERVED_CIDRS", value_delimiter = ',')]
    pub reserved_cidrs: Vec<String>,

    /// Log format.
    #[arg(long, env = "WGMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Delete a WireGuardMesh (or all) and wait until it is gone, that is until its nodes' agents have
    /// left it (the controller's finalizer) or the controller gave up on them: what the Helm
    /// chart's pre-delete hook runs, so that `helm uninstall` leaves nodes clean.
    DeleteMesh(DeleteMeshArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct DeleteMeshArgs {
    /// The mesh to delete.
    #[arg(long, default_value = "default", conflicts_with = "all")]
    pub name: String,
    /// Delete every mesh (what `helm uninstall` runs: without the controller and the agents
    /// no mesh is kept, and a node left in one keeps its guard routes).
    #[arg(long)]
    pub all: bool,
    /// Seconds to wait for it to go.
    #[arg(long, default_value_t = 180)]
    pub timeout: u64,
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

    /// `--reserved-cidrs`, parsed, and the API server's address when the controller reaches it
    /// by IP (`api_server_host` is the host of its cluster URL).
    pub fn reserved_ranges(
        &self,
        api_server_host: Option<&str>,
    ) -> Result<Vec<ReservedRange>, crate::Error> {
        let mut out = self
            .reserved_cidrs
            .iter()
            .map(|c| {
                Cidr::parse_masked(c.trim())
                    .map(|cidr| ReservedRange::new(cidr, "reserved by --reserved-cidrs"))
                    .map_err(|e| crate::Error::Config(format!("--reserved-cidrs {c:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let api_ip = api_server_host
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|h| h.parse::<std::net::IpAddr>().ok());
        if let Some(ip) = api_ip {
            out.push(ReservedRange::new(
                Cidr::host(ip),
                "the address the controller reaches the API server at",
            ));
        }
        Ok(out)
    }

    pub fn status_interval(&self) -> Duration {
        Duration::from_secs(self.status_interval)
    }

    pub fn gateway_failover(&self) -> crate::liveness::Limit {
        Duration::from_secs(self.gateway_failover_seconds)
    }
}

/// The address to listen on for `addr`: IPv6's unspecified address takes both families on
/// Linux (an IPv6-only cluster's pods have no IPv4 address, a dual-stack one's have both),
/// but where the kernel has no IPv6 at all (booted with `ipv6.disable=1`) it cannot be bound,
/// and IPv4's takes its place. Any other address is the user's choice and kept.
pub fn listen_addr(addr: SocketAddr, ipv6_available: bool) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V6(ip) if ip.is_unspecified() && !ipv6_available => {
            SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port())
        }
        _ => addr,
    }
}

/// Whether this network namespace can have IPv6 sockets at all.
pub fn ipv6_available() -> bool {
    std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addr_table() {
        for (addr, ipv6, want) in [
            ("[::]:9443", true, "[::]:9443"),
            ("[::]:9443", false, "0.0.0.0:9443"),
            ("0.0.0.0:9443", true, "0.0.0.0:9443"),
            ("0.0.0.0:9443", false, "0.0.0.0:9443"),
            ("[fd00::5]:9443", false, "[fd00::5]:9443"),
            ("10.0.0.5:9090", false, "10.0.0.5:9090"),
            ("[::1]:9090", false, "[::1]:9090"),
        ] {
            let got = listen_addr(addr.parse().unwrap(), ipv6);
            assert_eq!(got, want.parse().unwrap(), "{addr} ipv6={ipv6}");
        }
    }

    #[test]
    fn reserved_ranges_table() {
        type Case<'a> = (
            &'a [&'a str],
            Option<&'a str>,
            Result<&'a [&'a str], &'a str>,
        );
        let cases: &[Case] = &[
            (&[], None, Ok(&[])),
            (&["10.96.0.0/12"], None, Ok(&["10.96.0.0/12"])),
            (
                &["10.96.0.1/12", "fd00::/108"],
                None,
                Ok(&["10.96.0.0/12", "fd00::/108"]),
            ),
            (&[], Some("203.0.113.7"), Ok(&["203.0.113.7/32"])),
            (&[], Some("[2001:db8::7]"), Ok(&["2001:db8::7/128"])),
            (&[], Some("api.example.com"), Ok(&[])),
            (&["10.96.0.0/33"], None, Err("--reserved-cidrs")),
            (&["nonsense"], None, Err("nonsense")),
        ];
        for (flags, host, want) in cases {
            let mut args = vec!["wgmesh-controller".to_owned()];
            for f in *flags {
                args.push(format!("--reserved-cidrs={f}"));
            }
            let config = Config::parse_from(args);
            let got = config
                .reserved_ranges(*host)
                .map(|r| r.iter().map(|r| r.cidr.to_string()).collect::<Vec<_>>());
            match (got, want) {
                (Ok(got), Ok(want)) => assert_eq!(got, *want, "{flags:?} {host:?}"),
                (Err(e), Err(want)) => assert!(e.to_string().contains(want), "{e}"),
                (got, want) => panic!("{flags:?} {host:?}: got {got:?}, want {want:?}"),
            }
        }
    }
}
