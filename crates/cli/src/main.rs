//! `kubectl-wgmesh`: the kubectl plugin of wgmesh (`kubectl wgmesh ...`).
#![forbid(unsafe_code)]

#[macro_use]
mod output;
mod cluster;
mod config;
mod exit;
mod graph;
mod import;
mod keys;
mod peer;
mod qr;
mod secret_file;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::output::Format;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  any other error
  2  wrong usage (unknown flag, missing argument)
  3  the cluster could not be reached, or refused our credentials or permissions
  4  an object named on the command line does not exist (or already exists, for `peer add`)
  5  invalid input: a file, key, CIDR or name given on the command line
  6  not ready: the controller refused the peer (its Ready condition says why), or `status`
     found a node or peer that is not Ready
  7  timed out waiting for the controller";

#[derive(Parser)]
#[command(
    name = "kubectl wgmesh",
    version,
    about = "Manage a wgmesh WireGuard mesh: external peers, their configs, and the mesh's health",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(flatten)]
    kube: KubeArgs,
    #[command(subcommand)]
    command: Cmd,
}

/// How to reach the cluster; the same meaning as kubectl's flags.
#[derive(Args, Clone, Debug, Default)]
pub struct KubeArgs {
    /// Path of the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, env = "KUBECONFIG", hide_env = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Every node and external peer with endpoint, tunnel address, handshake, traffic and
    /// Ready, and a node-by-node matrix of recent handshakes.
    #[command(after_help = EXIT_CODES)]
    Status {
        /// Only this mesh (default: every mesh).
        #[arg(long)]
        mesh: Option<String>,
        /// Output format: the table, or the data as yaml or json.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// The mesh as a picture: member nodes (gateways marked), external peers pointing at the
    /// nodes they handshake with (at every gateway when none does), and each link labeled
    /// with the age of its latest handshake; a link with none within 210 s is dashed. Graphviz
    /// DOT (`| dot -Tpng > mesh.png`), or an SVG image laid out here, no Graphviz needed
    /// (over 10 nodes it leaves out the node pairs with a recent handshake, and says so).
    #[command(after_help = EXIT_CODES)]
    Graph {
        /// Only this mesh (default: every mesh, each its own cluster).
        #[arg(long)]
        mesh: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = graph::Format::Dot)]
        output: graph::Format,
    },
    /// External peers: add one, or print its config again.
    #[command(subcommand)]
    Peer(PeerCmd),
    /// Read a wg-quick config and print (or `--apply`) the equivalent WireGuardPeers, one per
    /// [Peer] section.
    #[command(after_help = EXIT_CODES)]
    Import(import::Opts),
    /// Print a config for the other side of a tunnel.
    #[command(subcommand)]
    Export(ExportCmd),
    /// Print a new private key (like `wg genkey`).
    Genkey,
    /// Read a private key on stdin and print its public key (like `wg pubkey`).
    Pubkey,
    /// Print a new preshared key (like `wg genpsk`).
    Genpsk,
}

#[derive(Subcommand)]
enum PeerCmd {
    /// Create an external peer (a laptop, a phone, a remote site) and print its wg-quick
    /// config. The key pair is generated here; the private key is never sent to the cluster
    /// unless --store-private-key is given.
    #[command(after_help = EXIT_CODES)]
    Add(peer::AddArgs),
    /// Print an external peer's wg-quick config again.
    #[command(after_help = EXIT_CODES)]
    Config(peer::ConfigArgs),
}

#[derive(Subcommand)]
enum ExportCmd {
    /// A node as a [Peer] section, for a remote site or another cluster.
    #[command(after_help = EXIT_CODES)]
    Node {
        /// The Node's name.
        node: String,
        #[arg(long, default_value = "default")]
        mesh: String,
        /// Networks to route to the node beyond its own (say, the service CIDR).
        #[arg(long, value_delimiter = ',')]
        allowed_ips: Vec<String>,
        /// PersistentKeepalive of the section (0: off).
        #[arg(long)]
        keepalive: Option<u16>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Genkey => keys::genkey(),
        Cmd::Pubkey => keys::pubkey(std::io::stdin().lock()),
        Cmd::Genpsk => keys::genpsk(),
        Cmd::Import(opts) => run(import::run(&cli.kube, opts)),
        Cmd::Status { mesh, output } => run(status::run(&cli.kube, mesh, output)),
        Cmd::Graph { mesh, output } => run(graph::run(&cli.kube, mesh, output)),
        Cmd::Peer(PeerCmd::Add(args)) => run(peer::add(&cli.kube, args)),
        Cmd::Peer(PeerCmd::Config(args)) => run(peer::config(&cli.kube, args)),
        Cmd::Export(ExportCmd::Node {
            node,
            mesh,
            allowed_ips,
            keepalive,
        }) => run(peer::export_node(
            &cli.kube,
            &node,
            &mesh,
            &allowed_ips,
            keepalive,
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::code_of(&e))
        }
    }
}

/// Runs one command on a small runtime.
fn run(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(fut)
}
