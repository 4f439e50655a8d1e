//! Talking to the cluster: the client from the kubeconfig, and the objects of one mesh.

use anyhow::{Context, Result};
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use wgmesh_api::{WireGuardMesh, WireGuardPeer};

use crate::KubeArgs;
use crate::exit::{self, err};

/// A client for the current (or chosen) kubeconfig context, as kubectl would pick it.
pub async fn client(args: &KubeArgs) -> Result<Client> {
    let opts = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &opts).await?
        }
        None if args.context.is_some() => Config::from_kubeconfig(&opts).await?,
        None => Config::infer().await?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// A mesh and every `WireGuardPeer` of it.
pub struct MeshObjects {
    pub mesh: WireGuardMesh,
    pub peers: Vec<WireGuardPeer>,
}

pub async fn mesh_objects(client: &Client, mesh: &str) -> Result<MeshObjects> {
    let meshes: Api<WireGuardMesh> = Api::all(client.clone());
    let Some(m) = meshes
        .get_opt(mesh)
        .await
        .with_context(|| format!("reading WireGuardMesh {mesh}"))?
    else {
        return Err(err(
            exit::NOT_FOUND,
            format!("WireGuardMesh {mesh} does not exist"),
        ));
    };
    let peers = all_peers(client)
        .await?
        .into_iter()
        .filter(|p| p.spec.mesh.as_str() == mesh)
        .collect();
    Ok(MeshObjects { mesh: m, peers })
}

pub async fn all_peers(client: &Client) -> Result<Vec<WireGuardPeer>> {
    let api: Api<WireGuardPeer> = Api::all(client.clone());
    let mut peers = api
        .list(&ListParams::default())
        .await
        .context("listing WireGuardPeers")?
        .items;
    peers.sort_by_key(|p| (p.spec.node.is_none(), p.name_any()));
    Ok(peers)
}

pub async fn get_peer(client: &Client, name: &str) -> Result<WireGuardPeer> {
    let api: Api<WireGuardPeer> = Api::all(client.clone());
    api.get_opt(name)
        .await
        .with_context(|| format!("reading WireGuardPeer {name}"))?
        .ok_or_else(|| {
            err(
                exit::NOT_FOUND,
                format!("WireGuardPeer {name} does not exist"),
            )
        })
}
