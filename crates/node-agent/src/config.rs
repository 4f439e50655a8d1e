//! Command-line and environment configuration of the agent.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use wgmesh_device::Requested;

#[derive(Parser, Debug)]
#[command(name = "wgmesh-agent", version, about = "The wgmesh node agent")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent (the default). Its flags go after `run`, or without it.
    Run(Box<RunArgs>),
    /// Remove the interface, routes and rules the agent created, then exit.
    Cleanup(CleanupArgs),
    /// Copy the CNI plugins CNI mode uses into the node's plugin directory, where missing
    /// (an init container in CNI mode: kind's nodes, for one, have no `bridge`).
    InstallCniPlugins(InstallCniPluginsArgs),
    /// Run only the userspace WireGuard device, configured through its UAPI socket (`wg set`),
    /// until SIGTERM or SIGINT: for benchmarks and debugging, not for production.
    #[command(hide = true)]
    UserspaceDevice(UserspaceDeviceArgs),
}

impl Cli {
    /// Parses the command line. The agent's own flags may follow `run` or stand alone; given
    /// before a subcommand they would be ignored, so that is an error saying where they go.
    pub fn parse_from_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let mut command = Cli::command();
        let matches = command.try_get_matches_from_mut(args)?;
        if let Some((name, _)) = matches.subcommand() {
            let before: Vec<String> = matches
                .ids()
                // Arguments only: clap also lists the groups of flattened structs.
                .filter(|id| command.get_arguments().any(|a| a.get_id() == *id))
                .filter(|id| {
                    matches.value_source(id.as_str())
                        == Some(clap::parser::ValueSource::CommandLine)
                })
                .map(|id| format!("--{}", id.as_str().replace('_', "-")))
                .collect();
            if !before.is_empty() {
                return Err(command.error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!(
                        "{} must follow the subcommand ({name}), not precede it",
                        before.join(", ")
                    ),
                ));
            }
        }
        Cli::from_arg_matches(&matches)
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Name of the Kubernetes Node this agent runs on.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    pub node: String,

    /// The WireGuardMesh to join.
    #[arg(long, env = "WGMESH_MESH", default_value = "default")]
    pub mesh: String,

    /// URL of the controller's gRPC service. An IPv4 address may be written in brackets
    /// (`https://[10.96.0.10]:9443`), so that one template serves IPv4 and IPv6 Services.
    #[arg(
        long,
        env = "WGMESH_CONTROLLER",
        default_value = "https://wgmesh-controller.wgmesh-system.svc:9443",
        value_parser = unbracket_ipv4_host
    )]
    pub controller: String,

    /// Whether the controller runs on the host network (the chart's `controller.hostNetwork`).
    /// With host encryption its node's address is routed into the tunnel, so the connections
    /// to it cross the underlay instead, marked (docs/install.md); on the pod network they are
    /// pod traffic, which stays in the tunnel.
    #[arg(
        long,
        env = "WGMESH_CONTROLLER_HOST_NETWORK",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub controller_host_network: bool,

    /// CA certificate (PEM) that signed the controller's certificate.
    #[arg(long, env = "WGMESH_CA_FILE", default_value = "/etc/wgmesh/ca/ca.crt")]
    pub ca_file: PathBuf,

    /// Name to verify in the controller's certificate (default: the URL's host).
    #[arg(long, env = "WGMESH_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,

    /// Projected service-account token (audience wgmesh), read again on every connection.
    #[arg(
        long,
        env = "WGMESH_TOKEN_FILE",
        default_value = "/var/run/secrets/wgmesh/token"
    )]
    pub token_file: PathBuf,

    /// Directory holding one subdirectory per mesh with the node's private key.
    #[arg(long, env = "WGMESH_STATE_DIR", default_value = "/var/lib/wgmesh")]
    pub state_dir: PathBuf,

    /// Generate a new private key before starting (the mesh learns it on registration).
    #[arg(long)]
    pub rotate_key: bool,

    /// Address other nodes reach this node at (default: the Node's InternalIP).
    #[arg(long, env = "NODE_IP")]
    pub endpoint_address: Option<IpAddr>,

    /// Seconds between resolutions of peers' DNS endpoints (nodes with a DNS name in their
    /// `wgmesh.io/endpoint` annotation, external peers), so a name whose address changes is
    /// followed. Between them a name is looked up only for a new peer or endpoint, or after
    /// a lookup that found nothing usable; 0: every name at each change of the mesh instead.
    #[arg(long, env = "WGMESH_ENDPOINT_REFRESH_SECONDS", default_value_t = 30)]
    pub endpoint_refresh_seconds: u64,

    /// WireGuard implementation; overrides the mesh's `backend`.
    #[arg(long, env = "WGMESH_BACKEND", value_enum)]
    pub backend: Option<Requested>,

    /// Address of /metrics, /livez and /healthz: loopback by default; the chart binds the
    /// node's address (`$(HOST_IP):9091`) so Prometheus can scrape it. Nothing served holds a
    /// secret.
    #[arg(long, env = "WGMESH_METRICS_ADDR", default_value = "127.0.0.1:9091", value_parser = parse_listen_addr)]
    pub metrics_addr: SocketAddr,

    /// Seconds between observations of the device for status reports.
    #[arg(long, env = "WGMESH_REPORT_INTERVAL", default_value_t = 10)]
    pub report_interval: u64,

    #[command(flatten)]
    pub network: NetworkArgs,
}

/// How the agent fits with the cluster's pod network.
#[derive(Args, Debug, Clone)]
pub struct NetworkArgs {
    /// `addon`: another CNI plugin owns the pod network, and wgmesh only encrypts: routes to
    /// peers go into their own table (--route-table), chosen by a rule ahead of the main
    /// table. `cni`: wgmesh is the CNI too: it writes the node's conflist (bridge, host-local
    /// over the node's pod CIDRs, portmap, loopback) and routes peers in the main table.
    #[arg(long, env = "WGMESH_NETWORK_MODE", value_enum, default_value_t = NetworkMode::Addon)]
    pub network_mode: NetworkMode,

    /// Routing table of the routes to peers in add-on mode, and in CNI mode when the mesh
    /// encrypts host traffic.
    #[arg(long, env = "WGMESH_ROUTE_TABLE", default_value_t = 51820)]
    pub route_table: u32,

    /// Priority of the rule `lookup <route-table>`: below the main table's 32766, so that the
    /// tunnel wins over the other CNI's plaintext routes to the same pods (and, with host
    /// encryption, over the underlay's routes to the other nodes).
    #[arg(long, env = "WGMESH_ROUTE_RULE_PRIORITY", default_value_t = 5210)]
    pub route_rule_priority: u32,

    /// The container runtime's CNI configuration directory: the conflist's link in CNI mode,
    /// the pods' gate (a copy of the other CNI's configuration) in add-on mode.
    #[arg(long, env = "WGMESH_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,

    /// Where the content of those links is written: a directory a reboot empties (tmpfs), at
    /// the same absolute path for the agent and the container runtime. After a reboot the
    /// runtime has no pod network until the agent has programmed the node.
    #[arg(long, env = "WGMESH_CNI_RUN_DIR", default_value = "/run/wgmesh/cni")]
    pub cni_run_dir: PathBuf,

    /// Name of the pods' bridge in CNI mode.
    #[arg(long, env = "WGMESH_CNI_BRIDGE", default_value = "wgmesh-br0")]
    pub cni_bridge: String,

    /// CNI mode: masquerade pods' traffic to addresses outside the mesh (the internet, the
    /// nodes' network) to the node's address, so that answers find their way back. Traffic
    /// into the tunnel and between the node's pods keeps its pod address.
    #[arg(long, env = "WGMESH_POD_EGRESS_MASQUERADE", default_value_t = true, action = clap::ArgAction::Set)]
    pub pod_egress_masquerade: bool,

    /// Lower the MSS of TCP handshakes crossing the tunnel to what fits its MTU, so pods with
    /// a larger interface MTU (add-on mode) never depend on path MTU discovery.
    #[arg(long, env = "WGMESH_CLAMP_MSS", default_value_t = true, action = clap::ArgAction::Set)]
    pub clamp_mss: bool,
}

impl NetworkArgs {
    /// Whether this agent masquerades pod egress: CNI mode only (in add-on mode the other
    /// CNI owns pods' egress).
    pub fn masquerades(&self) -> bool {
        self.network_mode == NetworkMode::Cni && self.pod_egress_masquerade
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum NetworkMode {
    Addon,
    Cni,
}

#[derive(Args, Debug, Clone)]
pub struct CleanupArgs {
    /// Interface to remove.
    #[arg(long, default_value = "wgmesh0")]
    pub interface: String,

    /// Routing table of the routes to peers (add-on mode), emptied of our routes.
    #[arg(long, env = "WGMESH_ROUTE_TABLE", default_value_t = 51820)]
    pub route_table: u32,

    /// The mesh whose saved configuration goes (its key too with --remove-key).
    #[arg(long, env = "WGMESH_MESH", default_value = "default")]
    pub mesh: String,

    /// The agents' state directory.
    #[arg(long, env = "WGMESH_STATE_DIR", default_value = "/var/lib/wgmesh")]
    pub state_dir: PathBuf,

    /// The CNI configuration directory: the conflist (CNI mode) and the pods' gate (add-on
    /// mode) are removed from it.
    #[arg(long, env = "WGMESH_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,

    /// Where their content is, removed too.
    #[arg(long, env = "WGMESH_CNI_RUN_DIR", default_value = "/run/wgmesh/cni")]
    pub cni_run_dir: PathBuf,

    /// The pods' bridge of CNI mode, removed if no interface is attached to it.
    #[arg(long, env = "WGMESH_CNI_BRIDGE", default_value = "wgmesh-br0")]
    pub cni_bridge: String,

    /// Also remove the mesh's key (what the agent does when the mesh is deleted).
    #[arg(long)]
    pub remove_key: bool,
}

#[derive(Args, Debug, Clone)]
pub struct InstallCniPluginsArgs {
    /// Where the plugins are (in the image: Debian's containernetworking-plugins).
    #[arg(long, default_value = "/usr/lib/cni")]
    pub from: PathBuf,
    /// The node's CNI plugin directory, as mounted.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    pub to: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct UserspaceDeviceArgs {
    /// TUN interface to create (its UAPI socket is /var/run/wireguard/NAME.sock).
    #[arg(long)]
    pub interface: String,
    /// Crypto workers: `auto` (one per core, used while a core is idle) or a number that are
    /// always used (0: the reader threads do everything).
    #[arg(long, default_value = "auto")]
    pub workers: wgmesh_device::userspace::WorkerPolicy,
}

impl RunArgs {
    /// The state directory of this mesh: `<state_dir>/<mesh>`.
    pub fn mesh_state_dir(&self) -> PathBuf {
        self.state_dir.join(&self.mesh)
    }
}

/// A listen address `IP:PORT` or `[IP]:PORT`; the brackets are allowed around an IPv4
/// address too, so that one template (`[$(NODE_IP)]:9091`) serves IPv4 and IPv6 nodes.
pub fn parse_listen_addr(s: &str) -> Result<SocketAddr, String> {
    let bad = || format!("not IP:PORT or [IP]:PORT: {s:?}");
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let rest = s.strip_prefix('[').ok_or_else(bad)?;
    let (ip, port) = rest.split_once("]:").ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(SocketAddr::new(ip, port))
}

/// The URL with brackets around an IPv4 host removed: Kubernetes gives a Service's address
/// unbracketed (`WGMESH_CONTROLLER_SERVICE_HOST`), so the chart brackets it to make an IPv6
/// address a valid URL host (`https://[fd00::a]:9443`), and an IPv4 one must lose them again
/// (RFC 3986 allows only IPv6 in brackets). Anything else is left for
/// [`check_controller_url`] to judge.
pub fn unbracket_ipv4_host(url: &str) -> Result<String, String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Ok(url.to_owned());
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let Some((host, port)) = authority.strip_prefix('[').and_then(|a| a.split_once(']')) else {
        return Ok(url.to_owned());
    };
    if host.parse::<std::net::Ipv4Addr>().is_err() {
        return Ok(url.to_owned());
    }
    Ok(format!("{scheme}://{host}{port}{path}"))
}

/// Accepts only an `https://` controller URL with a host. Over plain `http://` tonic would
/// quietly skip TLS: the node's token would go out, and its peer set come in, unencrypted
/// and unauthenticated (issue #12, item 9). Checked once at start-up, before the agent
/// touches anything.
pub fn check_controller_url(url: &str) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "the controller URL must be https://HOST[:PORT] ({why}): {url:?}"
        ))
    };
    let uri: axum::http::Uri = match url.parse() {
        Ok(uri) => uri,
        Err(e) => return refuse(&e.to_string()),
    };
    if uri.scheme() != Some(&axum::http::uri::Scheme::HTTPS) {
        return refuse("TLS is required; plain http or another scheme is refused");
    }
    if uri.host().is_none_or(str::is_empty) {
        return refuse("no host");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_agents_flags_follow_run_or_stand_alone() {
        let parse = |args: &[&str]| {
            super::Cli::parse_from_args(std::iter::once("wgmesh-agent").chain(args.iter().copied()))
        };
        let run = |cli: super::Cli| match cli.command {
            None => cli.run,
            Some(super::Command::Run(args)) => *args,
            Some(other) => panic!("not run: {other:?}"),
        };
        assert!(run(parse(&["--rotate-key"]).unwrap()).rotate_key);
        assert!(run(parse(&["run", "--rotate-key"]).unwrap()).rotate_key);
        assert!(!run(parse(&["run"]).unwrap()).rotate_key);
        let err = parse(&["--rotate-key", "run"]).unwrap_err().to_string();
        assert!(
            err.contains("--rotate-key must follow the subcommand (run)"),
            "{err}"
        );
        assert!(parse(&["--mesh", "x", "cleanup"]).is_err());
        let err = parse(&["--network-mode", "cni", "run"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--network-mode must follow the subcommand (run)"),
            "no group in the message: {err}"
        );
        assert!(parse(&["cleanup", "--interface", "wg9"]).is_ok());
    }

    use super::{check_controller_url, parse_listen_addr, unbracket_ipv4_host};

    #[test]
    fn ipv4_hosts_lose_their_brackets() {
        for (url, want) in [
            ("https://[10.96.0.10]:9443", "https://10.96.0.10:9443"),
            ("https://[10.96.0.10]", "https://10.96.0.10"),
            (
                "https://[10.96.0.10]:9443/x?y",
                "https://10.96.0.10:9443/x?y",
            ),
            ("https://[fd00:96::a]:9443", "https://[fd00:96::a]:9443"),
            (
                "https://[::ffff:10.0.0.1]:9443",
                "https://[::ffff:10.0.0.1]:9443",
            ),
            ("https://10.96.0.10:9443", "https://10.96.0.10:9443"),
            ("https://controller.svc:9443", "https://controller.svc:9443"),
            ("https://[controller]:9443", "https://[controller]:9443"),
            ("https://[10.96.0.10:9443", "https://[10.96.0.10:9443"),
            ("https://[]:9443", "https://[]:9443"),
            ("http://[10.0.0.1]:80", "http://10.0.0.1:80"),
            ("[10.0.0.1]:9443", "[10.0.0.1]:9443"),
            ("", ""),
        ] {
            assert_eq!(unbracket_ipv4_host(url).as_deref(), Ok(want), "{url:?}");
        }
    }

    /// The chart's template for either family of Service address, as the agent reads it.
    #[test]
    fn the_charts_bracketed_service_url_passes_for_both_families() {
        for host in ["10.96.0.10", "fd00:10:96::a"] {
            let url = unbracket_ipv4_host(&format!("https://[{host}]:9443")).unwrap();
            assert_eq!(check_controller_url(&url), Ok(()), "{url}");
            let uri: axum::http::Uri = url.parse().unwrap();
            let got = uri
                .host()
                .unwrap()
                .trim_start_matches('[')
                .trim_end_matches(']');
            assert_eq!(got, host);
            assert_eq!(uri.port_u16(), Some(9443));
        }
    }

    #[test]
    fn listen_addresses() {
        for (text, want) in [
            ("127.0.0.1:9091", Some("127.0.0.1:9091")),
            ("[10.0.0.5]:9091", Some("10.0.0.5:9091")),
            ("[fd00::5]:9091", Some("[fd00::5]:9091")),
            ("0.0.0.0:0", Some("0.0.0.0:0")),
            ("fd00::5:9091", None),
            ("[]:9091", None),
            ("[10.0.0.5]", None),
            ("[10.0.0.5]:70000", None),
            ("10.0.0.5", None),
            ("[$(NODE_IP)]:9091", None),
            ("", None),
        ] {
            let got = parse_listen_addr(text).ok();
            assert_eq!(got, want.map(|w| w.parse().unwrap()), "{text:?}");
        }
    }

    #[test]
    fn only_https_controller_urls_pass() {
        for (url, ok) in [
            ("https://wgmesh-controller.wgmesh-system.svc:9443", true),
            ("https://10.0.0.1:9443", true),
            ("https://[fd00::1]:9443", true),
            ("HTTPS://controller:9443", true),
            ("https://controller", true),
            ("http://wgmesh-controller.wgmesh-system.svc:9443", false),
            ("HTTP://controller:9443", false),
            ("controller:9443", false),
            ("//controller:9443", false),
            ("unix:///run/wgmesh.sock", false),
            ("grpc://controller:9443", false),
            ("https://", false),
            ("https:///path", false),
            ("", false),
            ("https://con troller", false),
        ] {
            let got = check_controller_url(url);
            assert_eq!(got.is_ok(), ok, "{url:?}: {got:?}");
            if let Err(msg) = got {
                assert!(msg.contains("https://"), "{url:?}: {msg}");
            }
        }
    }
}
