//! Runs the chart's containers as a kubelet would, without a container runtime: the command,
//! arguments and environment come from the Deployment and DaemonSet that `helm install`
//! created in the API server (not from a second, hand-written set), and each volume is
//! materialised on the test's disk and bind-mounted at its mountPath inside a private mount
//! namespace, so the program reads its files where it would in a pod.
//!
//! What a cluster provides around a pod is emulated here, and only that: downward-API fields,
//! service environment variables (with the address the test's nodes reach the controller at,
//! standing in for kube-proxy), `$(VAR)` expansion, Secret, ConfigMap and projected token
//! volumes, hostPath volumes (a directory per node), and the in-cluster API credentials.
//!
//! A stand-in, kept only where a test needs what a kubelet would get in the way of. The
//! stories users live through (install in both modes, joins, drains, failover, upgrades, a
//! laptop, uninstall) run on real kubelets (`real_cluster`, `tests/helm_on_kubelets.rs`,
//! `tests/stories_on_kubelets.rs`). These stay here, with many processes and little
//! Kubernetes:
//! - `tests/chaos.rs`: faults against one process at a time (an agent SIGKILLed, SIGSTOPped
//!   or terminated, the controller killed, the API server and etcd stopped for 15 s) with
//!   stalls timed to 10 ms. Under kubelets the restart backoff and the kubelets' own reaction
//!   to an API outage would be measured instead of ours, and a run would take minutes per
//!   fault.
//! - `tests/adversarial.rs`: a rogue node replaying another node's token and hostile peer
//!   authors talking gRPC directly: tokens and clients the test makes, no pods at all.
//! - `tests/mesh.rs`: an agent stopped and restarted by the test (its key and the other
//!   sessions kept), the controller killed under a transfer, key rotation, wireguard-go
//!   configured with `wg` alone.
//! - `tests/external_peers.rs`: a remote office behind a router and peers cut off by
//!   deletion, where only the tunnels matter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret, Service, Volume};
use kube::Api;

use crate::binaries::workspace_binary;
use crate::cluster;
use crate::helm::NAMESPACE;

/// The chart's objects as installed.
pub struct Installed {
    pub controller: Deployment,
    pub agent: DaemonSet,
    pub service: Service,
}

impl Installed {
    pub async fn read(client: &kube::Client) -> Result<Self> {
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), NAMESPACE);
        let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
        let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
        Ok(Installed {
            controller: deployments.get("wgmesh-controller").await?,
            agent: daemonsets.get("wgmesh-agent").await?,
            service: services.get("wgmesh-controller").await?,
        })
    }

    pub fn controller_pod(&self) -> Result<&PodSpec> {
        self.controller
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .context("the Deployment has no pod spec")
    }

    pub fn agent_pod(&self) -> Result<&PodSpec> {
        self.agent
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .context("the DaemonSet has no pod spec")
    }

    /// The environment Kubernetes gives pods for the controller's Service, with `host` as its
    /// address: `WGMESH_CONTROLLER_SERVICE_HOST`, `..._PORT` and `..._PORT_<NAME>`.
    pub fn service_env(&self, host: &str) -> Vec<(String, String)> {
        let name = self
            .service
            .metadata
            .name
            .clone()
            .unwrap_or_default()
            .to_uppercase()
            .replace('-', "_");
        let ports = self
            .service
            .spec
            .as_ref()
            .and_then(|s| s.ports.clone())
            .unwrap_or_default();
        let mut env = vec![(format!("{name}_SERVICE_HOST"), host.to_owned())];
        if let Some(first) = ports.first() {
            env.push((format!("{name}_SERVICE_PORT"), first.port.to_string()));
        }
        for p in &ports {
            if let Some(port_name) = &p.name {
                env.push((
                    format!(
                        "{name}_SERVICE_PORT_{}",
                        port_name.to_uppercase().replace('-', "_")
                    ),
                    p.port.to_string(),
                ));
            }
        }
        env
    }
}

/// Values of the downward-API fields a container's env may reference.
pub type Fields = BTreeMap<&'static str, String>;

/// The container's environment as the kubelet computes it: service variables first, then the
/// container's `env` in order, each value `$(VAR)`-expanded against what precedes it.
pub fn container_env(
    container: &Container,
    fields: &Fields,
    service_env: &[(String, String)],
) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = service_env.to_vec();
    for var in container.env.iter().flatten() {
        let value = if let Some(value) = &var.value {
            expand(value, &env)
        } else if let Some(field) = var.value_from.as_ref().and_then(|f| f.field_ref.as_ref()) {
            fields
                .get(field.field_path.as_str())
                .cloned()
                .with_context(|| format!("{}: no value for field {}", var.name, field.field_path))?
        } else {
            bail!("{}: unsupported env source", var.name);
        };
        env.retain(|(k, _)| k != &var.name);
        env.push((var.name.clone(), value));
    }
    Ok(env)
}

/// Kubernetes' `$(VAR)` expansion: known variables are replaced, `$$` is a literal `$`,
/// anything else stays as written.
pub fn expand(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, v)) = env.iter().rev().find(|(k, _)| k == &inner[..end])
        {
            out.push_str(v);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A container ready to start: the workspace binary for its image's command, its arguments
/// and environment, and the bind mounts of its volumes.
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// (directory or file on the test's disk, mountPath), parents before children.
    pub binds: Vec<(PathBuf, String)>,
}

impl Launch {
    /// `[ip netns exec NS] unshare --mount ... sh -c '<binds>; exec program args'`, with the
    /// container's environment only (plus PATH).
    pub fn command(&self, netns: Option<&str>) -> Command {
        let mut script = String::new();
        for (src, target) in &self.binds {
            script.push_str(&format!(
                "mkdir -p '{target}' && mount --bind '{}' '{target}' && ",
                src.display()
            ));
        }
        script.push_str("exec \"$0\" \"$@\"");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "unshare"]);
                c
            }
            None => Command::new("unshare"),
        };
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(script)
            .arg(&self.program)
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    pub fn env_value(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Where a pod's volumes come from.
pub struct VolumeSources<'a> {
    pub client: &'a kube::Client,
    /// The pod object its projected tokens are bound to.
    pub pod: &'a k8s_openapi::api::core::v1::Pod,
    /// The node's "host" filesystem: hostPath P is `<host_root>/P`.
    pub host_root: &'a Path,
    /// Where Secret, ConfigMap and token volumes are written.
    pub volume_dir: &'a Path,
    /// The API server's CA (PEM), for the in-cluster credentials.
    pub api_ca: &'a str,
}

/// Materialises the volumes `container` mounts, and returns the launch.
pub async fn prepare(
    spec: &PodSpec,
    container: &Container,
    env: Vec<(String, String)>,
    sources: &VolumeSources<'_>,
) -> Result<Launch> {
    let command = container.command.clone().unwrap_or_default();
    let image_program = command.first().context("the container has no command")?;
    let name = Path::new(image_program)
        .file_name()
        .and_then(|n| n.to_str())
        .context("command")?;
    let program = match name {
        "wgmesh-agent" => workspace_binary("wgmesh-node-agent", "wgmesh-agent")?,
        "wgmesh-controller" => workspace_binary("wgmesh-controller", "wgmesh-controller")?,
        other => bail!("no workspace binary for {other}"),
    };
    let mut args: Vec<String> = command[1..].to_vec();
    args.extend(container.args.clone().unwrap_or_default());
    let args = args.iter().map(|a| expand(a, &env)).collect();

    let volumes: BTreeMap<&str, &Volume> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mut binds = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = volumes
            .get(mount.name.as_str())
            .with_context(|| format!("volume {} is not defined", mount.name))?;
        if let Some(src) = materialise(volume, sources).await? {
            binds.push((src, mount.mount_path.clone()));
        }
    }
    // In-cluster API credentials, as the kubelet mounts them unless told not to.
    if spec.automount_service_account_token != Some(false) {
        let dir = sources.volume_dir.join("kube-api-access");
        std::fs::create_dir_all(&dir)?;
        let sa = spec.service_account_name.as_deref().unwrap_or("default");
        let token = cluster::bound_token(sources.client, sa, sources.pod, "").await?;
        std::fs::write(dir.join("token"), token)?;
        std::fs::write(dir.join("namespace"), NAMESPACE)?;
        std::fs::write(dir.join("ca.crt"), sources.api_ca)?;
        binds.push((
            dir,
            "/var/run/secrets/kubernetes.io/serviceaccount".to_owned(),
        ));
    }
    binds.sort_by_key(|(_, target)| target.len());
    Ok(Launch {
        program,
        args,
        env,
        binds,
    })
}

/// Writes a Secret's or ConfigMap's `data` into `dir` as a kubelet does: the keys `items`
/// selects, under their paths, or every key under its own name.
fn write_items(
    dir: &std::path::Path,
    what: &str,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
) -> Result<()> {
    let items: Vec<(&str, &str)> = match items {
        Some(items) => items
            .iter()
            .map(|i| (i.key.as_str(), i.path.as_str()))
            .collect(),
        None => data.keys().map(|k| (k.as_str(), k.as_str())).collect(),
    };
    for (key, path) in items {
        let value = data
            .get(key)
            .with_context(|| format!("{what} has no {key}"))?;
        std::fs::write(dir.join(path), value)?;
    }
    Ok(())
}

async fn materialise(volume: &Volume, sources: &VolumeSources<'_>) -> Result<Option<PathBuf>> {
    let dir = sources.volume_dir.join(&volume.name);
    if let Some(host) = &volume.host_path {
        if host.type_.as_deref() == Some("CharDevice") {
            // A device: the node's own (such as /dev/net/tun), nothing to bind.
            return Ok(None);
        }
        let path = sources.host_root.join(host.path.trim_start_matches('/'));
        std::fs::create_dir_all(&path)?;
        return Ok(Some(path));
    }
    std::fs::create_dir_all(&dir)?;
    if let Some(secret) = &volume.secret {
        let name = secret.secret_name.as_deref().context("secretName")?;
        let api: Api<Secret> = Api::namespaced(sources.client.clone(), NAMESPACE);
        let data: BTreeMap<String, Vec<u8>> = api
            .get(name)
            .await?
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        write_items(
            &dir,
            &format!("Secret {name}"),
            &data,
            secret.items.as_deref(),
        )?;
        return Ok(Some(dir));
    }
    if let Some(config_map) = &volume.config_map {
        let name = config_map.name.as_str();
        let api: Api<ConfigMap> = Api::namespaced(sources.client.clone(), NAMESPACE);
        let object = api.get(name).await?;
        let mut data: BTreeMap<String, Vec<u8>> = object
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        data.extend(
            object
                .binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0)),
        );
        write_items(
            &dir,
            &format!("ConfigMap {name}"),
            &data,
            config_map.items.as_deref(),
        )?;
        return Ok(Some(dir));
    }
    if let Some(projected) = &volume.projected {
        for source in projected.sources.iter().flatten() {
            let Some(token) = &source.service_account_token else {
                bail!(
                    "volume {}: only token projections are emulated",
                    volume.name
                );
            };
            let sa = sources
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_default();
            let audience = token.audience.as_deref().unwrap_or("");
            let value = cluster::bound_token(sources.client, &sa, sources.pod, audience).await?;
            std::fs::write(dir.join(&token.path), value)?;
        }
        return Ok(Some(dir));
    }
    bail!(
        "volume {}: this kind of volume is not emulated",
        volume.name
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_like_kubernetes() {
        let env = vec![
            ("A".to_owned(), "1".to_owned()),
            ("B".to_owned(), "two".to_owned()),
        ];
        for (input, want) in [
            ("https://$(A):$(B)", "https://1:two"),
            ("$$(A)", "$(A)"),
            ("$(MISSING)", "$(MISSING)"),
            ("cost $5", "cost $5"),
            ("$(A", "$(A"),
        ] {
            assert_eq!(expand(input, &env), want, "{input}");
        }
    }
}
