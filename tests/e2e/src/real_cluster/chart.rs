//! wgmesh on a real cluster as a user installs it: docs/kind.md's CNI-mode commands (the
//! image is already in every node's containerd), a web server the scheduler places on every
//! node, and the checks and diagnostics the end-to-end test and `cargo xtask demo` share.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::helm::Helm;
use crate::install::repo_root;
use crate::netns::Netns;

use super::RealCluster;
use super::image::BUSYBOX_IMAGE;

/// The tunnel addresses of the chart's default mesh.
pub const TUNNEL_CIDR: &str = "10.250.0.0/16";

const WAIT_FOR_CONTROLLER: &[&str] = &[
    "kubectl",
    "--namespace",
    "wgmesh-system",
    "rollout",
    "status",
    "deployment/wgmesh-controller",
    "--timeout=180s",
];
const WAIT_FOR_AGENTS: &[&str] = &[
    "kubectl",
    "--namespace",
    "wgmesh-system",
    "rollout",
    "status",
    "daemonset/wgmesh-agent",
    "--timeout=180s",
];
const WAIT_FOR_NODES: &[&str] = &[
    "kubectl",
    "wait",
    "--for=condition=Ready",
    "nodes",
    "--all",
    "--timeout=180s",
];
/// The agents program the mesh before the leading controller writes the peers' status (and
/// after a reinstall the previous install's lease must expire first): a user waits for it.
const WAIT_FOR_PEERS: &[&str] = &[
    "kubectl",
    "wait",
    "--for=condition=Ready",
    "wireguardpeers",
    "--all",
    "--timeout=180s",
];
const LOOK_AT_THE_MESH: &[&[&str]] = &[
    &["kubectl", "get", "wireguardpeers"],
    &["kubectl", "wgmesh", "status"],
];

/// docs/kind.md's CNI-mode commands once the cluster exists, as they are run here (paths are
/// the repository's). A test keeps the document saying the same.
pub const KIND_CNI_STEPS: &[&[&str]] = &[
    &[
        "helm",
        "install",
        "wgmesh",
        "deploy/helm/wgmesh",
        "--namespace",
        "wgmesh-system",
        "--create-namespace",
        "--values",
        "deploy/kind/cni.values.yaml",
    ],
    WAIT_FOR_CONTROLLER,
    WAIT_FOR_AGENTS,
    WAIT_FOR_NODES,
    WAIT_FOR_PEERS,
    LOOK_AT_THE_MESH[0],
    LOOK_AT_THE_MESH[1],
];

/// docs/kind.md's add-on-mode commands, on a cluster whose pod network already works.
pub const KIND_ADDON_STEPS: &[&[&str]] = &[
    &[
        "helm",
        "install",
        "wgmesh",
        "deploy/helm/wgmesh",
        "--namespace",
        "wgmesh-system",
        "--create-namespace",
        "--values",
        "deploy/kind/addon.values.yaml",
    ],
    WAIT_FOR_CONTROLLER,
    WAIT_FOR_AGENTS,
    WAIT_FOR_NODES,
    WAIT_FOR_PEERS,
    LOOK_AT_THE_MESH[0],
    LOOK_AT_THE_MESH[1],
];

/// kind's node names in docs/kind.md's CNI-mode cluster and the real cluster's in their place.
pub const KIND_NODE_NAMES: &[(&str, &str)] = &[
    ("wgmesh-cni-control-plane", "node-1"),
    ("wgmesh-cni-worker2", "node-3"),
    ("wgmesh-cni-worker", "node-2"),
];

/// docs/kind.md's "see pod traffic go through the tunnel": two pods on different workers
/// (kind's node names; [`KIND_NODE_NAMES`] maps them), and a ping between them, whose target
/// the document computes with `$(kubectl get pod b -o jsonpath='{.status.podIP}')`.
pub const KIND_POD_STEPS: &[&[&str]] = &[
    &[
        "kubectl",
        "run",
        "a",
        "--image=busybox:1.36",
        "--restart=Never",
        r#"--overrides='{"spec":{"nodeName":"wgmesh-cni-worker"}}'"#,
        "--",
        "sleep",
        "3600",
    ],
    &[
        "kubectl",
        "run",
        "b",
        "--image=busybox:1.36",
        "--restart=Never",
        r#"--overrides='{"spec":{"nodeName":"wgmesh-cni-worker2"}}'"#,
        "--",
        "sleep",
        "3600",
    ],
    &[
        "kubectl",
        "wait",
        "--for=condition=Ready",
        "pod/a",
        "pod/b",
        "--timeout=120s",
    ],
    &["kubectl", "exec", "a", "--", "ping", "-c", "3"],
];

/// Runs [`KIND_POD_STEPS`] (kind's node names mapped to ours, the shell's quotes removed),
/// then checks that pod a's node routes pod b's address into the tunnel (docs/kind.md's
/// `docker exec wgmesh-cni-worker ip route get`). Returns the ping's output.
pub fn ping_as_documented(
    cluster: &mut RealCluster,
    mut progress: impl FnMut(&str),
) -> Result<String> {
    let mut ping = String::new();
    for step in KIND_POD_STEPS {
        let mut args: Vec<String> = step[1..]
            .iter()
            .map(|a| {
                // The shell's quotes go; the JSON inside has only double quotes.
                let mut a = a.replace('\'', "");
                for (kind, ours) in KIND_NODE_NAMES {
                    a = a.replace(kind, ours);
                }
                a
            })
            .collect();
        if args.get(..2) == Some(&["exec".to_owned(), "a".to_owned()]) {
            let b_ip =
                cluster
                    .cp
                    .kubectl_ok(&["get", "pod", "b", "-o", "jsonpath={.status.podIP}"])?;
            let node = cluster
                .nodes
                .iter()
                .find(|n| n.name == "node-2")
                .context("no node-2")?;
            let route = node.exec("ip", &["route", "get", &b_ip])?;
            progress(&format!("on node-2: ip route get {b_ip}: {}", route.trim()));
            if !route.contains("dev wgmesh0") {
                bail!("node-2 does not route pod b's address {b_ip} into the tunnel: {route}");
            }
            args.push(b_ip);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match cluster.cp.kubectl_ok(&args) {
            Ok(out) => {
                progress(&format!(
                    "`kubectl {}`:\n{}",
                    args.join(" "),
                    out.trim_end()
                ));
                ping = out;
            }
            Err(e) => bail!("`kubectl {}`: {e:#}\n{}", args.join(" "), diagnose(cluster)),
        }
    }
    Ok(ping)
}

/// Runs [`KIND_CNI_STEPS`] against `cluster`, telling `progress` each command's output.
pub fn install_as_documented(cluster: &mut RealCluster, progress: impl FnMut(&str)) -> Result<()> {
    run_documented(cluster, KIND_CNI_STEPS, progress)
}

/// Runs documented commands (helm, kubectl, kubectl with our plugin) against `cluster`,
/// telling `progress` each command's output.
pub fn run_documented(
    cluster: &mut RealCluster,
    steps: &[&[&str]],
    mut progress: impl FnMut(&str),
) -> Result<()> {
    let helm = Helm::new()?;
    let root = repo_root();
    let started = Instant::now();
    for step in steps {
        let (program, args) = step.split_first().context("an empty step")?;
        let args: Vec<String> = args
            .iter()
            .map(|a| match a.starts_with("deploy/") {
                true => root.join(a).display().to_string(),
                false => (*a).to_owned(),
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = match *program {
            "helm" => helm.ok(&args, Some(cluster.cp.kubeconfig())),
            _ if args.first() == Some(&"wgmesh") => kubectl_with_plugin(cluster, &args),
            _ => cluster.cp.kubectl_ok(&args),
        };
        match out {
            Ok(out) => progress(&format!(
                "`{}` after {:.1?}:\n{}",
                step.join(" "),
                started.elapsed(),
                out.trim_end()
            )),
            Err(e) => bail!("`{}`: {e:#}\n{}", step.join(" "), diagnose(cluster)),
        }
    }
    Ok(())
}

/// Runs kubectl with our plugin (`kubectl-wgmesh`) on its PATH, as after `cargo install`.
pub fn kubectl_with_plugin(cluster: &RealCluster, args: &[&str]) -> Result<String> {
    let plugin = crate::binaries::workspace_binary("wgmesh-cli", "kubectl-wgmesh")?;
    let plugin_dir = plugin.parent().context("the plugin's directory")?;
    let path = std::env::var("PATH").unwrap_or_default();
    let out = Command::new(&cluster.cp.binaries().kubectl)
        .args(args)
        .env("KUBECONFIG", cluster.cp.kubeconfig())
        .env("PATH", format!("{}:{path}", plugin_dir.display()))
        .output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A pod of the `web` DaemonSet.
#[derive(Clone, Debug)]
pub struct WebPod {
    pub name: String,
    pub node: String,
    pub ip: String,
}

/// A container of the busybox image built here serving `GET /` on port 8080 with its pod's
/// name (its hostname).
pub fn web_server_container() -> serde_json::Value {
    serde_json::json!({
        "name": "main",
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["/bin/sh", "-c",
            "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"],
    })
}

/// A web server on every node, placed by the scheduler (a DaemonSet's pods are scheduled by
/// the default scheduler), each answering `GET /` on port 8080 with its pod's name. Returns
/// once every pod runs.
pub fn deploy_web(cluster: &mut RealCluster) -> Result<Vec<WebPod>> {
    let daemonset = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "containers": [web_server_container()],
                    "terminationGracePeriodSeconds": 1,
                },
            },
        },
    });
    let manifest = cluster.dir().join("web.json");
    std::fs::write(&manifest, daemonset.to_string())?;
    cluster
        .cp
        .kubectl_ok(&["apply", "-f", &manifest.display().to_string()])?;
    if let Err(e) = cluster
        .cp
        .kubectl_ok(&["rollout", "status", "daemonset/web", "--timeout=120s"])
    {
        bail!("{e:#}\n{}", diagnose(cluster));
    }
    let pods = web_pods(cluster)?;
    if pods.len() != cluster.nodes.len() {
        bail!("one web pod per node expected: {pods:?}");
    }
    Ok(pods)
}

/// The `web` DaemonSet's pods that have an address, on the cluster's running nodes (a shut
/// down node's pods stay listed until the pod garbage collector removes them), by node name.
pub fn web_pods(cluster: &RealCluster) -> Result<Vec<WebPod>> {
    let listed = cluster.cp.kubectl_ok(&[
        "get",
        "pods",
        "-l",
        "app=web",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP}{\"\\n\"}{end}",
    ])?;
    let mut pods: Vec<WebPod> = listed
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(str::to_owned);
            Some(WebPod {
                name: f.next()?,
                node: f.next()?,
                ip: f.next()?,
            })
        })
        .filter(|p| cluster.nodes.iter().any(|n| n.name == p.node))
        .collect();
    pods.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(pods)
}

/// `GET /` of `addr` from inside `ns` (a node's, a pod's, a host's outside the cluster);
/// the response's body.
pub fn http_get(ns: &Netns, addr: std::net::SocketAddr) -> Result<String> {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;
    ns.run(move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default())
    })
}

/// Names `pod`'s network namespace (the one the CNI plugins set up) `name`, for
/// `ip netns exec`.
pub fn pod_netns(cluster: &RealCluster, pod: &WebPod, name: &str) -> Result<Netns> {
    let id = cluster.cp.kubectl_ok(&[
        "get",
        "pod",
        &pod.name,
        "-o",
        "jsonpath={.status.containerStatuses[0].containerID}",
    ])?;
    let node = cluster
        .nodes
        .iter()
        .find(|n| n.name == pod.node)
        .with_context(|| format!("{} is on an unknown node {}", pod.name, pod.node))?;
    Netns::attach(name, node.container_pid(id.trim())?)
}

/// `GET /` of `ip:port` from inside pod `pod` (`kubectl exec`); the response's body. With
/// busybox's nc: Debian's static busybox wget crashes (SIGSEGV) on any URL.
pub fn http_get_from_pod(cluster: &RealCluster, pod: &str, ip: &str, port: u16) -> Result<String> {
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} {port}");
    let response = cluster
        .cp
        .kubectl_ok(&["exec", pod, "--", "sh", "-c", &script])?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default())
}

/// What to look at when a step fails: pods, nodes, wgmesh's logs and the kubelets'.
pub fn diagnose(cluster: &mut RealCluster) -> String {
    let mut out = String::new();
    for args in [
        &["get", "pods", "-A", "-o", "wide"][..],
        &["get", "nodes", "-o", "wide"],
        &["-n", "wgmesh-system", "describe", "pods"],
        &[
            "-n",
            "wgmesh-system",
            "logs",
            "-l",
            "app.kubernetes.io/component=controller",
            "--tail=30",
        ],
        &[
            "-n",
            "wgmesh-system",
            "logs",
            "-l",
            "app.kubernetes.io/component=agent",
            "--tail=30",
            "--all-containers",
        ],
    ] {
        out.push_str(&format!("--- kubectl {}\n", args.join(" ")));
        match cluster.cp.kubectl(args) {
            Ok(o) => {
                out.push_str(&String::from_utf8_lossy(&o.stdout));
                out.push_str(&String::from_utf8_lossy(&o.stderr));
            }
            Err(e) => out.push_str(&format!("{e:#}\n")),
        }
    }
    for n in &cluster.nodes {
        out.push_str(&format!(
            "--- {} kubelet:\n{}\n",
            n.name,
            n.kubelet_log_tail(15)
        ));
    }
    out
}
