//! `import FILE`: the `[Peer]` sections of a wg-quick config as `WireGuardPeer`s (and Secrets
//! for their preshared keys). Everything is checked before anything is created.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Resource;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde::Serialize;
use wgmesh_api::mesh::SecretKeyRef;
use wgmesh_api::{WireGuardPeer, WireGuardPeerSpec};
use wgmesh_core::validate::is_object_name;
use wgmesh_core::wgquick::{self, WgQuickConfig};

use crate::KubeArgs;
use crate::cluster;
use crate::exit::{self, err};
use crate::output::{self, Format};

#[derive(clap::Args, Debug)]
pub struct Opts {
    /// The wg-quick file (`-` for stdin).
    pub file: PathBuf,
    /// Name of the peer (a file with several peers: NAME-1, NAME-2, ...). Default: each
    /// peer's `# Name = ...` comment, else `<file name>-<n>`.
    #[arg(long)]
    pub name: Option<String>,
    /// The mesh the peers join.
    #[arg(long, default_value = "default")]
    pub mesh: String,
    /// Create them in the cluster instead of printing them.
    #[arg(long)]
    pub apply: bool,
    /// Namespace of the Secrets that hold preshared keys found in the file.
    #[arg(long, default_value = "wgmesh-secrets")]
    pub secret_namespace: String,
    /// Output format of the printed objects.
    #[arg(short, long, value_enum, default_value_t = Format::Yaml)]
    pub output: Format,
}

/// An object to print or create.
#[derive(Serialize, Clone, Debug)]
#[serde(untagged)]
pub enum Object {
    Peer(Box<WireGuardPeer>),
    Secret(Box<Secret>),
}

pub async fn run(kube: &KubeArgs, opts: Opts) -> Result<()> {
    let text = read(&opts.file)?;
    let cfg = wgquick::parse(&text).map_err(|e| {
        err(
            exit::INVALID_INPUT,
            format!("{}: {e}; nothing was created", opts.file.display()),
        )
    })?;
    let stem = opts
        .file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| s != "-")
        .unwrap_or_else(|| "imported".into());
    let objects = objects(&cfg, &opts, &stem)?;
    if !opts.apply {
        return output::print(opts.output, &objects);
    }
    let client = cluster::client(kube).await?;
    cluster::mesh_objects(&client, &opts.mesh).await?;
    let peers: Api<WireGuardPeer> = Api::all(client.clone());
    for o in &objects {
        if let Object::Peer(p) = o {
            let name = p.metadata.name.clone().unwrap_or_default();
            if peers.get_opt(&name).await?.is_some() {
                return Err(err(
                    exit::NOT_FOUND,
                    format!("WireGuardPeer {name} already exists; nothing was created"),
                ));
            }
        }
    }
    // Every object is tried first (a server-side dry run): a Secret of that name left from
    // an earlier import, or anything else the API server refuses, fails the import before
    // anything exists.
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    for o in &objects {
        let refused = match o {
            Object::Secret(s) => secrets(&client, s)
                .create(&dry_run, s)
                .await
                .err()
                .map(|e| {
                    (
                        format!("Secret {}", s.metadata.name.clone().unwrap_or_default()),
                        e,
                    )
                }),
            Object::Peer(p) => peers.create(&dry_run, p).await.err().map(|e| {
                (
                    format!(
                        "WireGuardPeer {}",
                        p.metadata.name.clone().unwrap_or_default()
                    ),
                    e,
                )
            }),
        };
        if let Some((what, e)) = refused {
            return Err(err(
                exit::INVALID_INPUT,
                format!("{what}: {e}; nothing was created"),
            ));
        }
    }
    // Each peer, then its preshared key's Secret, owned by the peer (deleting the peer
    // deletes it). Whatever fails now undoes what this import created.
    let mut created: Vec<Object> = Vec::new();
    let mut secret: Option<&Secret> = None;
    for o in &objects {
        let step = match o {
            Object::Secret(s) => {
                secret = Some(s);
                continue;
            }
            Object::Peer(p) => create_peer(&client, p, secret.take(), &mut created).await,
        };
        if let Err(e) = step {
            undo(&client, &created).await;
            return Err(e.context("nothing this import created was kept"));
        }
    }
    Ok(())
}

fn secrets(client: &kube::Client, secret: &Secret) -> Api<Secret> {
    Api::namespaced(
        client.clone(),
        secret.metadata.namespace.as_deref().unwrap_or_default(),
    )
}

/// Creates `secret` (the peer's preshared key) first, so that the controller finds it when it
/// first judges the peer, then `peer`, then makes the Secret the peer's (deleting the peer
/// deletes it); records what it created.
async fn create_peer(
    client: &kube::Client,
    peer: &WireGuardPeer,
    secret: Option<&Secret>,
    created: &mut Vec<Object>,
) -> Result<()> {
    if let Some(secret) = secret {
        let ns = secret.metadata.namespace.clone().unwrap_or_default();
        let secret_name = secret.metadata.name.clone().unwrap_or_default();
        secrets(client, secret)
            .create(&PostParams::default(), secret)
            .await
            .with_context(|| format!("creating Secret {ns}/{secret_name}"))?;
        created.push(Object::Secret(Box::new(secret.clone())));
        outln!("secret/{secret_name} created in {ns}");
    }
    let name = peer.metadata.name.clone().unwrap_or_default();
    let made = Api::<WireGuardPeer>::all(client.clone())
        .create(&PostParams::default(), peer)
        .await
        .with_context(|| format!("creating WireGuardPeer {name}"))?;
    created.push(Object::Peer(Box::new(made.clone())));
    outln!("wireguardpeer.wgmesh.io/{name} created");
    if let Some(secret) = secret {
        let secret_name = secret.metadata.name.clone().unwrap_or_default();
        let owner = made.owner_ref(&()).with_context(|| {
            format!("the API server returned WireGuardPeer {name} without a uid")
        })?;
        let patch = serde_json::json!({"metadata": {"ownerReferences": [owner]}});
        secrets(client, secret)
            .patch(&secret_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| {
                format!("making Secret {secret_name} owned by WireGuardPeer {name}")
            })?;
    }
    Ok(())
}

/// Deletes what an import created, newest first; a failure is only reported.
async fn undo(client: &kube::Client, created: &[Object]) {
    for o in created.iter().rev() {
        let (what, result) = match o {
            Object::Peer(p) => {
                let name = p.metadata.name.clone().unwrap_or_default();
                (
                    format!("WireGuardPeer {name}"),
                    Api::<WireGuardPeer>::all(client.clone())
                        .delete(&name, &DeleteParams::default())
                        .await
                        .map(|_| ()),
                )
            }
            Object::Secret(s) => {
                let name = s.metadata.name.clone().unwrap_or_default();
                (
                    format!("Secret {name}"),
                    secrets(client, s)
                        .delete(&name, &DeleteParams::default())
                        .await
                        .map(|_| ()),
                )
            }
        };
        match result {
            Ok(()) => eprintln!("{what} deleted again"),
            Err(e) => eprintln!("warning: deleting {what}: {e}"),
        }
    }
}

/// A wg-quick file or stdin, read up to one byte past what the parser takes (so it says the
/// input is too long) and never more: `import /dev/zero` ends with that error, not with the
/// machine's memory.
pub(crate) fn read(path: &std::path::Path) -> Result<String> {
    let limit = wgquick::MAX_INPUT_LEN as u64 + 1;
    let mut bytes = Vec::new();
    let what = if path.as_os_str() == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut bytes)
            .context("reading stdin")?;
        "stdin".to_owned()
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut bytes))
            .map_err(|e| {
                err(
                    exit::INVALID_INPUT,
                    format!("reading {}: {e}", path.display()),
                )
            })?;
        path.display().to_string()
    };
    String::from_utf8(bytes).map_err(|_| {
        err(
            exit::INVALID_INPUT,
            format!("reading {what}: not UTF-8 text"),
        )
    })
}

/// The objects equivalent to the config's peers: pure, so it is tested without a cluster.
pub fn objects(cfg: &WgQuickConfig, opts: &Opts, stem: &str) -> Result<Vec<Object>> {
    if cfg.peers.is_empty() {
        return Err(err(
            exit::INVALID_INPUT,
            format!("{}: the file has no [Peer] section", opts.file.display()),
        ));
    }
    let many = cfg.peers.len() > 1;
    let mut names = BTreeSet::new();
    let mut out = Vec::new();
    for (i, p) in cfg.peers.iter().enumerate() {
        let n = i + 1;
        let name = match (&opts.name, many) {
            (Some(name), false) => name.clone(),
            (Some(name), true) => format!("{name}-{n}"),
            (None, _) => p
                .comment
                .as_deref()
                .map(sanitize)
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| format!("{}-{n}", sanitize(stem))),
        };
        if !is_object_name(&name) {
            return Err(err(
                exit::INVALID_INPUT,
                format!("peer {n}: {name:?} is not a valid object name (use --name)"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(err(
                exit::INVALID_INPUT,
                format!("peer {n}: the name {name} is used twice (use --name)"),
            ));
        }
        let mut spec: WireGuardPeerSpec = serde_json::from_value(serde_json::json!({
            "mesh": opts.mesh,
            "publicKey": p.public_key.to_base64(),
        }))?;
        spec.allowed_ips = p.allowed_ips.iter().map(|c| c.to_string().into()).collect();
        spec.endpoint = p.endpoint.clone().map(Into::into);
        spec.persistent_keepalive = p.persistent_keepalive.map(i32::from);
        spec.comment = p.comment.clone();
        // What the API server would refuse, refused here: nothing is created unless all is.
        spec.check().map_err(|why| {
            err(
                exit::INVALID_INPUT,
                format!("peer {n} ({name}): {why}; nothing was created"),
            )
        })?;
        if let Some(psk) = &p.preshared_key {
            let secret = format!("wgpeer-{name}-psk");
            spec.preshared_key_secret_ref = Some(SecretKeyRef {
                namespace: opts.secret_namespace.clone(),
                name: secret.clone().into(),
                key: "presharedKey".into(),
            });
            out.push(Object::Secret(Box::new(Secret {
                metadata: ObjectMeta {
                    name: Some(secret),
                    namespace: Some(opts.secret_namespace.clone()),
                    labels: Some(wgmesh_api::name_label("wgmesh.io/peer", &name)),
                    ..ObjectMeta::default()
                },
                type_: Some("Opaque".into()),
                data: Some(BTreeMap::from([(
                    "presharedKey".into(),
                    ByteString(psk.to_base64().into_bytes()),
                )])),
                ..Secret::default()
            })));
        }
        out.push(Object::Peer(Box::new(WireGuardPeer::new(&name, spec))));
    }
    Ok(out)
}

/// A comment turned into an object name: lowercase, runs of anything else become `-`.
fn sanitize(s: &str) -> String {
    let mut out = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-')
        .chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches('-')
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(name: Option<&str>) -> Opts {
        Opts {
            file: "wg0.conf".into(),
            name: name.map(Into::into),
            mesh: "default".into(),
            apply: false,
            secret_namespace: "wgmesh-secrets".into(),
            output: Format::Yaml,
        }
    }

    const SERVER: &str = "\
# an existing VPN server's config
[interface]
privatekey = CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=
Address = 10.8.0.1/24
Address = fd08::1/64
DNS = 1.1.1.1
Table = off
PostUp = iptables -A FORWARD -i %i -j ACCEPT

# Alice's Laptop
[Peer]
PublicKey = AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=
AllowedIPs = 10.8.0.2/32
AllowedIPs = fd08::2/128

[peer]
# Name = Berlin office
PublicKey = AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=
PresharedKey = BQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU=
AllowedIPs = 10.8.0.3/32, 192.168.50.0/24
Endpoint = 203.0.113.10:51820
PersistentKeepalive = 25
";

    fn peer_specs(objects: &[Object]) -> Vec<(String, serde_json::Value)> {
        objects
            .iter()
            .filter_map(|o| match o {
                Object::Peer(p) => Some((
                    p.metadata.name.clone().unwrap(),
                    serde_json::to_value(&p.spec).unwrap(),
                )),
                Object::Secret(_) => None,
            })
            .collect()
    }

    #[test]
    fn a_server_config_becomes_one_peer_per_section() {
        let cfg = wgquick::parse(SERVER).unwrap();
        let objects = objects(&cfg, &opts(None), "wg0").unwrap();
        let peers = peer_specs(&objects);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].0, "alice-s-laptop");
        assert_eq!(
            peers[0].1["allowedIPs"],
            serde_json::json!(["10.8.0.2/32", "fd08::2/128"])
        );
        assert_eq!(peers[1].0, "berlin-office");
        assert_eq!(peers[1].1["endpoint"], "203.0.113.10:51820");
        assert_eq!(peers[1].1["persistentKeepalive"], 25);
        assert_eq!(
            peers[1].1["presharedKeySecretRef"]["name"],
            "wgpeer-berlin-office-psk"
        );
        let secret = objects
            .iter()
            .find_map(|o| match o {
                Object::Secret(s) => Some(s),
                _ => None,
            })
            .unwrap();
        let psk = &secret.data.as_ref().unwrap()["presharedKey"].0;
        assert_eq!(psk, b"BQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU=");
    }

    #[test]
    fn names_from_the_flag() {
        let cfg = wgquick::parse(SERVER).unwrap();
        let names: Vec<String> = peer_specs(&objects(&cfg, &opts(Some("old")), "wg0").unwrap())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["old-1", "old-2"]);
        assert!(objects(&cfg, &opts(Some("Bad_Name")), "wg0").is_err());
    }

    #[test]
    fn what_the_api_server_would_refuse_is_refused_before_anything_is_created() {
        let many_ips: String = (0..300)
            .map(|i| format!("AllowedIPs = 10.9.{}.{}/32\n", i / 250, i % 250))
            .collect();
        let endpoint = "Endpoint = 203.0.113.10:51820\n";
        let cases = [
            (
                endpoint,
                "Endpoint = [fe80::1%eth0]:51820\n".to_owned(),
                "zone",
            ),
            (
                endpoint,
                "Endpoint = _wg.example.com:51820\n".to_owned(),
                "spec.endpoint",
            ),
            (endpoint, many_ips, "spec.allowedIPs has 302 entries"),
        ];
        for (line, replacement, want) in cases {
            // The second peer is the bad one: the first must not be created either.
            let text = SERVER.replace(line, &replacement);
            let cfg = wgquick::parse(&text).unwrap();
            let e = objects(&cfg, &opts(None), "wg0").unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
            assert!(e.contains("peer 2 (berlin-office)"), "{e}");
            assert!(e.contains("nothing was created"), "{e}");
        }
        let long_comment = SERVER.replace("# Alice's Laptop", &format!("# {}", "x".repeat(2000)));
        let cfg = wgquick::parse(&long_comment).unwrap();
        let e = objects(&cfg, &opts(None), "wg0").unwrap_err().to_string();
        assert!(e.contains("spec.comment has 2000 characters"), "{e}");
    }

    #[test]
    fn reading_stops_past_the_largest_config() {
        // One byte past the limit, so the parser says the input is too long.
        let text = read(std::path::Path::new("/dev/zero")).map(|t| t.len());
        assert_eq!(text.ok(), Some(wgquick::MAX_INPUT_LEN + 1));
    }

    #[test]
    fn invalid_file_names_its_line() {
        let broken = SERVER.replace("AllowedIPs = 10.8.0.2/32\n", "AllowedIPs = 10.8.0.300/32\n");
        let e = wgquick::parse(&broken).unwrap_err();
        assert_eq!(e.line, 13, "{e}");
    }
}
