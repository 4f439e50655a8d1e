//! `peer add`: create a WireGuardPeer (and its Secrets) from flags, wait until the controller
//! accepts it, and print the new peer's config; undo everything if it is refused.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::{Client, Resource, ResourceExt};
use wgmesh_api::condition::Reason;
use wgmesh_api::mesh::SecretKeyRef;
use wgmesh_api::{ClientSpec, WireGuardPeer, WireGuardPeerSpec};
use wgmesh_core::{Key, PrivateKey, validate};

use super::export::{ShowArgs, show};
use super::{
    PRIVATE_KEY_KEY, PSK_KEY, parse_cidrs, private_key_secret_name, psk_secret_name,
    read_private_key,
};
use crate::KubeArgs;
use crate::cluster;
use crate::config::ready_condition;
use crate::exit::{self, err};

/// Whether a Ready=False reason only means "not yet", so waiting goes on. A reason this CLI
/// does not know (from a newer controller) is taken as lasting: better to stop than hang.
fn keeps_waiting(reason: &str) -> bool {
    reason.parse::<Reason>().is_ok_and(Reason::is_transient)
}

#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// Name of the WireGuardPeer.
    pub name: String,
    /// The mesh the peer joins.
    #[arg(long, default_value = "default")]
    pub mesh: String,
    /// Networks behind the peer, routed to it from every pod (a remote site's LAN).
    #[arg(long, value_delimiter = ',')]
    pub allowed_ips: Vec<String>,
    /// Address(es) of the peer's interface, with prefix (default: the tunnel address the
    /// controller assigns).
    #[arg(long, value_delimiter = ',')]
    pub client_address: Vec<String>,
    /// DNS servers and search domains for the peer's device.
    #[arg(long, value_delimiter = ',')]
    pub dns: Vec<String>,
    /// What the peer's device sends into the mesh beyond the nodes' pods, such as the service
    /// CIDR (default: 0.0.0.0/0,::/0).
    #[arg(long, value_delimiter = ',')]
    pub client_allowed_ips: Vec<String>,
    /// Where the mesh can reach the peer (host:port); absent, the mesh answers it wherever it
    /// last sent from.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// PersistentKeepalive of the peer's device, in seconds (0: off).
    #[arg(long)]
    pub keepalive: Option<u16>,
    /// ListenPort of the peer's device (a site the mesh reaches at --endpoint needs one).
    #[arg(long)]
    pub listen_port: Option<u16>,
    /// Also use a new preshared key (kept in a Secret, which the mesh needs).
    #[arg(long)]
    pub preshared_key: bool,
    /// Keep the private key in a Secret, so `peer config` works without the key file.
    #[arg(long)]
    pub store_private_key: bool,
    /// Use this private key (or the one in this wg-quick config) instead of generating one.
    #[arg(long)]
    pub private_key_file: Option<PathBuf>,
    /// Namespace of the Secrets.
    #[arg(long, default_value = "wgmesh-secrets")]
    pub secret_namespace: String,
    /// Free text stored on the peer.
    #[arg(long)]
    pub comment: Option<String>,
    /// Seconds to wait for the controller to accept the peer.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    #[command(flatten)]
    pub show: ShowArgs,
}

pub async fn add(kube: &KubeArgs, args: AddArgs) -> Result<()> {
    let spec = spec_from_args(&args)?;
    let private_key = match &args.private_key_file {
        Some(path) => read_private_key(path)?,
        None => PrivateKey::generate(),
    };
    let client = cluster::client(kube).await?;
    cluster::mesh_objects(&client, &args.mesh).await?;
    let peers: Api<WireGuardPeer> = Api::all(client.clone());
    if peers.get_opt(&args.name).await?.is_some() {
        return Err(err(
            exit::NOT_FOUND,
            format!("WireGuardPeer {} already exists", args.name),
        ));
    }
    let psk = args.preshared_key.then(Key::generate);
    let mut spec = spec;
    spec.public_key = private_key.public_key().to_base64();
    spec.preshared_key_secret_ref = psk.map(|_| SecretKeyRef {
        namespace: args.secret_namespace.clone(),
        name: psk_secret_name(&args.name).into(),
        key: PSK_KEY.into(),
    });
    let created = peers
        .create(
            &PostParams::default(),
            &WireGuardPeer::new(&args.name, spec),
        )
        .await
        .with_context(|| format!("creating WireGuardPeer {}", args.name))?;
    eprintln!("WireGuardPeer {} created", args.name);

    let mut secrets = Vec::new();
    let stored = async {
        if let Some(psk) = &psk {
            let name = psk_secret_name(&args.name);
            create_secret(
                &client,
                &created,
                &args.secret_namespace,
                &name,
                PSK_KEY,
                psk.to_base64(),
            )
            .await?;
            secrets.push(name);
        }
        if args.store_private_key {
            let name = private_key_secret_name(&args.name);
            create_secret(
                &client,
                &created,
                &args.secret_namespace,
                &name,
                PRIVATE_KEY_KEY,
                private_key.expose_base64(),
            )
            .await?;
            secrets.push(name);
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = stored {
        undo(&client, &args.name, &args.secret_namespace, &secrets).await;
        return Err(e);
    }

    match wait_ready(&client, &args.name, Duration::from_secs(args.timeout)).await {
        Ok(_) => {}
        Err(e) if exit::code_of(&e) == exit::NOT_READY => {
            undo(&client, &args.name, &args.secret_namespace, &secrets).await;
            eprintln!("WireGuardPeer {} deleted again", args.name);
            return Err(e);
        }
        Err(e) => return Err(e),
    }
    let objects = cluster::mesh_objects(&client, &args.mesh).await?;
    let peer = cluster::get_peer(&client, &args.name).await?;
    show(&objects, &peer, private_key, psk, &args.show)
}

/// Polls the peer until its Ready condition is True (Ok), False for a lasting reason
/// (NOT_READY), or the timeout (TIMEOUT).
async fn wait_ready(client: &Client, name: &str, timeout: Duration) -> Result<WireGuardPeer> {
    let start = Instant::now();
    let mut last = String::from("no status yet");
    loop {
        let peer = cluster::get_peer(client, name).await?;
        let current = peer
            .status
            .as_ref()
            .and_then(|s| s.observed_generation)
            .zip(peer.metadata.generation)
            .is_none_or(|(seen, generation)| seen >= generation);
        if let Some(c) = ready_condition(&peer).filter(|_| current) {
            if c.status == "True" {
                return Ok(peer);
            }
            if !keeps_waiting(&c.reason) {
                return Err(err(
                    exit::NOT_READY,
                    format!(
                        "the controller refused WireGuardPeer {name}: {}: {}",
                        c.reason, c.message
                    ),
                ));
            }
            last = format!("{}: {}", c.reason, c.message);
        }
        if start.elapsed() >= timeout {
            return Err(err(
                exit::TIMEOUT,
                format!(
                    "WireGuardPeer {name} was not Ready after {}s ({last}); it was left in place",
                    timeout.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Deletes what `peer add` created.
async fn undo(client: &Client, name: &str, namespace: &str, secrets: &[String]) {
    let peers: Api<WireGuardPeer> = Api::all(client.clone());
    if let Err(e) = peers.delete(name, &DeleteParams::default()).await {
        eprintln!("warning: deleting WireGuardPeer {name}: {e}");
    }
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for s in secrets {
        if let Err(e) = api.delete(s, &DeleteParams::default()).await {
            eprintln!("warning: deleting Secret {namespace}/{s}: {e}");
        }
    }
}

/// A Secret owned by the peer, so deleting the peer deletes it too.
async fn create_secret(
    client: &Client,
    owner: &WireGuardPeer,
    namespace: &str,
    name: &str,
    key: &str,
    value: String,
) -> Result<()> {
    let owner_ref = owner
        .owner_ref(&())
        .with_context(|| format!("WireGuardPeer {} has no uid", owner.name_any()))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            owner_references: Some(vec![owner_ref]),
            labels: Some(wgmesh_api::name_label("wgmesh.io/peer", &owner.name_any())),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            key.to_owned(),
            ByteString(value.into_bytes()),
        )])),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await
        .with_context(|| format!("creating Secret {namespace}/{name}"))?;
    Ok(())
}

/// The peer's spec from the flags, everything checked before the cluster is asked.
fn spec_from_args(args: &AddArgs) -> Result<WireGuardPeerSpec> {
    if !validate::is_object_name(&args.name) {
        return Err(err(
            exit::INVALID_INPUT,
            format!(
                "{:?} is not a valid object name (lowercase letters, digits, '-' and '.')",
                args.name
            ),
        ));
    }
    let allowed = parse_cidrs("--allowed-ips", &args.allowed_ips)?;
    let client_allowed = parse_cidrs("--client-allowed-ips", &args.client_allowed_ips)?;
    for a in &args.client_address {
        a.trim().parse::<ipnet::IpNet>().map_err(|e| {
            err(
                exit::INVALID_INPUT,
                format!("--client-address {a}: {e} (give a prefix, such as 10.250.1.5/32)"),
            )
        })?;
    }
    for d in &args.dns {
        let d = d.trim();
        if d.is_empty() || d.contains(char::is_whitespace) {
            return Err(err(
                exit::INVALID_INPUT,
                format!("--dns {d:?} is not an address or domain"),
            ));
        }
    }
    if let Some(e) = &args.endpoint {
        check_endpoint(e)?;
    }
    let mut client: ClientSpec = serde_json::from_value(serde_json::json!({}))?;
    client.addresses = args
        .client_address
        .iter()
        .map(|a| a.trim().to_owned().into())
        .collect();
    client.dns = args
        .dns
        .iter()
        .map(|d| d.trim().to_owned().into())
        .collect();
    if !client_allowed.is_empty() {
        client.allowed_ips = client_allowed
            .iter()
            .map(|c| c.to_string().into())
            .collect();
    }
    client.persistent_keepalive = args.keepalive.map(i32::from);
    client.listen_port = args.listen_port.filter(|p| *p > 0).map(i32::from);
    let mut spec: WireGuardPeerSpec = serde_json::from_value(serde_json::json!({
        "mesh": args.mesh,
        // Replaced by the real key before the object is created.
        "publicKey": "",
    }))?;
    spec.allowed_ips = allowed.iter().map(|c| c.to_string().into()).collect();
    spec.endpoint = args.endpoint.clone().map(Into::into);
    spec.comment = args.comment.clone();
    spec.client = Some(client);
    spec.check().map_err(|why| err(exit::INVALID_INPUT, why))?;
    Ok(spec)
}

fn check_endpoint(e: &str) -> Result<()> {
    validate::check_mesh_endpoint(e)
        .map_err(|why| err(exit::INVALID_INPUT, format!("--endpoint: {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        add: AddArgs,
    }

    fn args(list: &[&str]) -> AddArgs {
        T::try_parse_from(std::iter::once("t").chain(list.iter().copied()))
            .unwrap()
            .add
    }

    #[test]
    fn waiting_goes_on_only_for_transient_reasons() {
        let cases = [
            ("TunnelAddressPending", true),
            ("PresharedKeySecretMissing", true),
            ("AllowedIPsOverlap", false),
            ("MeshNotFound", false),
            ("Disabled", false),
            ("SomeReasonFromANewerController", false),
            ("", false),
        ];
        for (reason, want) in cases {
            assert_eq!(keeps_waiting(reason), want, "{reason:?}");
        }
    }

    #[test]
    fn flags_become_the_spec() {
        let spec = spec_from_args(&args(&[
            "office",
            "--allowed-ips",
            "192.168.50.0/24,fd50::/64",
            "--client-allowed-ips",
            "10.96.0.0/12",
            "--dns",
            "10.96.0.10,cluster.local",
            "--endpoint",
            "203.0.113.10:51820",
            "--keepalive",
            "25",
        ]))
        .unwrap();
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json["allowedIPs"],
            serde_json::json!(["192.168.50.0/24", "fd50::/64"])
        );
        assert_eq!(json["endpoint"], "203.0.113.10:51820");
        assert_eq!(
            json["client"]["allowedIPs"],
            serde_json::json!(["10.96.0.0/12"])
        );
        assert_eq!(
            json["client"]["dns"],
            serde_json::json!(["10.96.0.10", "cluster.local"])
        );
        assert_eq!(json["client"]["persistentKeepalive"], 25);
    }

    #[test]
    fn invalid_flags_are_input_errors() {
        for bad in [
            vec!["Bad_Name"],
            vec!["x", "--allowed-ips", "192.168.50.1/24"],
            vec!["x", "--allowed-ips", "nonsense"],
            vec!["x", "--client-address", "10.0.0.1"],
            vec!["x", "--endpoint", "no-port"],
            vec!["x", "--endpoint", "fd00::1:51820"],
        ] {
            let e = spec_from_args(&args(&bad)).unwrap_err();
            assert_eq!(exit::code_of(&e), exit::INVALID_INPUT, "{bad:?}: {e}");
        }
    }
}
