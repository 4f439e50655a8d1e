//! `peer add`, `peer config` and `export node`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::{Client, Resource, ResourceExt};
use wgmesh_api::condition::Reason;
use wgmesh_api::mesh::SecretKeyRef;
use wgmesh_api::{ClientSpec, WireGuardPeer, WireGuardPeerSpec};
use wgmesh_core::export::{client_config, node_as_peer};
use wgmesh_core::{Cidr, Key, PrivateKey, validate, wgquick};

use crate::KubeArgs;
use crate::cluster::{self, MeshObjects};
use crate::config::{self, ready_condition};
use crate::exit::{self, err};
use crate::qr;
use crate::secret_file;

/// Key of the preshared key in its Secret.
const PSK_KEY: &str = "presharedKey";
/// Key of the private key in its Secret (`--store-private-key`).
const PRIVATE_KEY_KEY: &str = "privateKey";

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
    #[arg(long, default_value = "wgmesh-system")]
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
    #[arg(long, default_value = "wgmesh-system")]
    pub secret_namespace: String,
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
            Some(wgmesh_core::desired::peer_preshared_key(&value))
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
fn show(
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

fn psk_secret_name(peer: &str) -> String {
    format!("wgpeer-{peer}-psk")
}

fn private_key_secret_name(peer: &str) -> String {
    format!("wgpeer-{peer}-private-key")
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
    let owner_ref = OwnerReference {
        api_version: WireGuardPeer::api_version(&()).into_owned(),
        kind: WireGuardPeer::kind(&()).into_owned(),
        name: owner.name_any(),
        uid: owner.uid().unwrap_or_default(),
        ..OwnerReference::default()
    };
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            owner_references: Some(vec![owner_ref]),
            labels: Some(BTreeMap::from([(
                "wgmesh.io/peer".to_owned(),
                owner.name_any(),
            )])),
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

async fn read_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<Option<Vec<u8>>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api
        .get_opt(name)
        .await
        .with_context(|| format!("reading Secret {namespace}/{name}"))?;
    Ok(secret
        .and_then(|s| s.data)
        .and_then(|mut d| d.remove(key))
        .map(|b| b.0))
}

fn read_private_key(path: &Path) -> Result<PrivateKey> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        err(
            exit::INVALID_INPUT,
            format!("reading {}: {e}", path.display()),
        )
    })?;
    if let Ok(key) = text.trim().parse() {
        return Ok(key);
    }
    // Or the config `peer add` printed earlier: its [Interface] holds the key.
    match wgquick::parse(&text) {
        Ok(cfg) => cfg.interface.private_key.ok_or_else(|| {
            err(
                exit::INVALID_INPUT,
                format!("{}: the config has no PrivateKey", path.display()),
            )
        }),
        Err(e) => Err(err(
            exit::INVALID_INPUT,
            format!(
                "{}: neither a private key nor a wg-quick config ({e})",
                path.display()
            ),
        )),
    }
}

fn parse_cidrs(flag: &str, values: &[String]) -> Result<Vec<Cidr>> {
    values
        .iter()
        .map(|v| {
            Cidr::parse_strict(v.trim())
                .map_err(|e| err(exit::INVALID_INPUT, format!("{flag} {v}: {e}")))
        })
        .collect()
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
    Ok(spec)
}

fn check_endpoint(e: &str) -> Result<()> {
    validate::check_endpoint(e)
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
    fn private_key_from_a_key_file_or_a_config() {
        let dir = tempfile::tempdir().unwrap();
        let key = PrivateKey::generate();
        let plain = dir.path().join("key");
        std::fs::write(&plain, format!("{}\n", key.expose_base64())).unwrap();
        let conf = dir.path().join("wg0.conf");
        std::fs::write(
            &conf,
            format!("[Interface]\nPrivateKey = {}\n", key.expose_base64()),
        )
        .unwrap();
        for path in [&plain, &conf] {
            assert_eq!(
                read_private_key(path).unwrap().public_key(),
                key.public_key()
            );
        }
        std::fs::write(&plain, "[Interface]\nPrivateKey = nope\n").unwrap();
        let e = read_private_key(&plain).unwrap_err();
        assert_eq!(exit::code_of(&e), exit::INVALID_INPUT);
        assert!(e.to_string().contains("line 2"), "{e}");
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
