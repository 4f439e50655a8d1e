//! Printing configs: `peer config` (a peer's own wg-quick config, as `peer add` printed it) and
//! `export node` (a node as a `[Peer]` section for the other side of a tunnel).

use std::path::PathBuf;

use anyhow::Result;
use kube::ResourceExt;
use wgmesh_api::WireGuardPeer;
use wgmesh_core::export::{client_config, node_as_peer};
use wgmesh_core::{Key, PrivateKey, wgquick};

use super::{PRIVATE_KEY_KEY, parse_cidrs, private_key_secret_name, read_private_key, read_secret};
use crate::KubeArgs;
use crate::cluster::{self, MeshObjects};
use crate::config::{self, ready_condition};
use crate::exit::{self, err};
use crate::qr;
use crate::secret_file;

#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// Print the config as a QR code instead of text.
    #[arg(long)]
    pub qr: bool,
    /// Also write the config as a QR code to this PNG file. It holds the private key: it is
    /// created with mode 0600, and an existing file there is replaced (not rewritten).
    #[arg(long)]
    pub qr_png: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    /// Name of the WireGuardPeer.
    pub name: String,
    /// The peer's private key (as `wg genkey` writes it), or its earlier wg-quick config.
    /// Absent: the Secret that `peer add --store-private-key` made.
    #[arg(long)]
    pub private_key_file: Option<PathBuf>,
    /// Namespace of the Secrets.
    #[arg(long, default_value = "wgmesh-secrets")]
    pub secret_namespace: String,
    #[command(flatten)]
    pub show: ShowArgs,
}

pub async fn config(kube: &KubeArgs, args: ConfigArgs) -> Result<()> {
    let client = cluster::client(kube).await?;
    let peer = cluster::get_peer(&client, &args.name).await?;
    if peer.spec.node.is_some() {
        return Err(err(
            exit::INVALID_INPUT,
            format!(
                "WireGuardPeer {} is a node; `export node {}` prints it as a peer",
                args.name,
                peer.spec
                    .node
                    .as_ref()
                    .map(|n| n.0.as_str())
                    .unwrap_or_default()
            ),
        ));
    }
    let private_key = match &args.private_key_file {
        Some(path) => read_private_key(path)?,
        None => {
            let name = private_key_secret_name(&args.name);
            let value = read_secret(&client, &args.secret_namespace, &name, PRIVATE_KEY_KEY)
                .await?
                .ok_or_else(|| {
                    err(
                        exit::INVALID_INPUT,
                        format!(
                            "no --private-key-file given and no Secret {}/{name} with the key",
                            args.secret_namespace
                        ),
                    )
                })?;
            String::from_utf8_lossy(&value)
                .trim()
                .parse()
                .map_err(|e| err(exit::INVALID_INPUT, format!("Secret {name}: {e}")))?
        }
    };
    if private_key.public_key().to_base64() != peer.spec.public_key {
        return Err(err(
            exit::INVALID_INPUT,
            format!(
                "the private key does not belong to WireGuardPeer {} (its public key is {})",
                args.name, peer.spec.public_key
            ),
        ));
    }
    let psk = match &peer.spec.preshared_key_secret_ref {
        Some(r) => {
            let value = read_secret(&client, &r.namespace, r.name.as_str(), &r.key)
                .await?
                .ok_or_else(|| {
                    err(
                        exit::NOT_FOUND,
                        format!("Secret {}/{} has no key {}", r.namespace, r.name, r.key),
                    )
                })?;
            let key = wgmesh_core::desired::peer_preshared_key(&value).map_err(|e| {
                err(
                    exit::INVALID_INPUT,
                    format!("Secret {}/{} key {}: {e}", r.namespace, r.name, r.key),
                )
            })?;
            Some(key)
        }
        None => None,
    };
    if !config::is_ready(&peer) {
        eprintln!(
            "warning: WireGuardPeer {} is not Ready{}",
            args.name,
            ready_condition(&peer)
                .map(|c| format!(": {}: {}", c.reason, c.message))
                .unwrap_or_default()
        );
    }
    let objects = cluster::mesh_objects(&client, peer.spec.mesh.as_str()).await?;
    show(&objects, &peer, private_key, psk, &args.show)
}

pub async fn export_node(
    kube: &KubeArgs,
    node: &str,
    mesh: &str,
    allowed_ips: &[String],
    keepalive: Option<u16>,
) -> Result<()> {
    let extra = parse_cidrs("--allowed-ips", allowed_ips)?;
    let client = cluster::client(kube).await?;
    let objects = cluster::mesh_objects(&client, mesh).await?;
    let nodes = config::node_peers(&objects.peers);
    let Some(peer) = nodes.get(node) else {
        return Err(err(
            exit::NOT_FOUND,
            format!("node {node} is not a Ready member of mesh {mesh}"),
        ));
    };
    out!(
        "{}",
        wgquick::render_peer(&node_as_peer(peer, &extra, keepalive))
    );
    Ok(())
}

/// Renders the config and prints it (or its QR code), and writes the PNG.
pub(super) fn show(
    objects: &MeshObjects,
    peer: &WireGuardPeer,
    private_key: PrivateKey,
    psk: Option<Key>,
    args: &ShowArgs,
) -> Result<()> {
    let input = config::client_input(&objects.mesh, &objects.peers, peer, Some(private_key), psk)?;
    let cfg = client_config(&input).map_err(|e| {
        err(
            exit::NOT_READY,
            format!("mesh {}: {e}", objects.mesh.name_any()),
        )
    })?;
    let text = wgquick::render(&cfg);
    if let Some(path) = &args.qr_png {
        secret_file::write(path, |out| qr::png(&text, out))?;
        eprintln!("QR code written to {}", path.display());
    }
    if args.qr {
        out!("{}", qr::terminal(&text)?);
        outln!();
    } else {
        out!("{text}");
    }
    Ok(())
}
