//! What the lifecycle stories on real kubelets look at: the chart's pods as the API server
//! lists them (which image, Ready, terminating), the controllers' lease, a rolling update
//! followed node by node, and what wgmesh left on a node after it went.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use super::RealCluster;
use super::node::RealNode;
use crate::helm::{Helm, NAMESPACE};

/// The agents' and the controllers' pod labels.
pub const AGENT_PODS: &str = "app.kubernetes.io/component=agent";
pub const CONTROLLER_PODS: &str = "app.kubernetes.io/component=controller";

/// One pod of the chart, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRow {
    pub name: String,
    pub node: String,
    pub image: String,
    pub ready: bool,
    pub terminating: bool,
}

/// The pods of the release namespace with label selector `selector`.
pub fn pods(cluster: &RealCluster, selector: &str) -> Result<Vec<PodRow>> {
    let out = cluster.cp.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "get",
        "pods",
        "-l",
        selector,
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}|{.spec.nodeName}|{.spec.containers[0].image}|{.status.containerStatuses[0].ready}|{.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ])?;
    Ok(out.lines().filter_map(parse_pod_row).collect())
}

fn parse_pod_row(line: &str) -> Option<PodRow> {
    let mut f = line.split('|');
    Some(PodRow {
        name: f.next()?.to_owned(),
        node: f.next()?.to_owned(),
        image: f.next()?.to_owned(),
        ready: f.next()? == "true",
        terminating: !f.next()?.is_empty(),
    })
}

/// The pod that holds the controllers' leader lease (its identity is `<pod>@<address>`).
pub fn lease_holder(cluster: &RealCluster) -> Result<String> {
    let identity = cluster.cp.kubectl_ok(&[
        "-n",
        NAMESPACE,
        "get",
        "lease",
        "wgmesh-controller",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    Ok(identity
        .trim()
        .split('@')
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// `helm ARGS` against the cluster.
pub fn helm(cluster: &RealCluster, args: &[&str]) -> Result<String> {
    Helm::new()?.ok(args, Some(cluster.cp.kubeconfig()))
}

/// One node's agent replaced by a rolling update: when the old pod stopped serving
/// (terminating or gone) and when the new one was Ready, in the caller's clock (ms).
#[derive(Clone, Debug, Default)]
pub struct NodeRoll {
    pub down_ms: Option<u64>,
    pub up_ms: Option<u64>,
}

/// A rolling update of the agents from one image to another, followed from pod listings.
#[derive(Debug)]
pub struct Rollout {
    pub new_image: String,
    pub nodes: BTreeMap<String, NodeRoll>,
}

impl Rollout {
    pub fn new(new_image: &str, nodes: impl IntoIterator<Item = String>) -> Self {
        Rollout {
            new_image: new_image.to_owned(),
            nodes: nodes
                .into_iter()
                .map(|n| (n, NodeRoll::default()))
                .collect(),
        }
    }

    /// Takes in one listing of the agents made at `now_ms`.
    pub fn observe(&mut self, now_ms: u64, agents: &[PodRow]) {
        for (node, roll) in &mut self.nodes {
            let on_node: Vec<&PodRow> = agents.iter().filter(|p| &p.node == node).collect();
            let old_serving = on_node
                .iter()
                .any(|p| p.image != self.new_image && p.ready && !p.terminating);
            let new_ready = on_node
                .iter()
                .any(|p| p.image == self.new_image && p.ready && !p.terminating);
            if roll.down_ms.is_none() && !old_serving {
                roll.down_ms = Some(now_ms);
            }
            if roll.down_ms.is_some() && roll.up_ms.is_none() && new_ready {
                roll.up_ms = Some(now_ms);
            }
        }
    }
    /// Whether every node's agent and every controller runs the new image.
    pub fn done(&self, agents: &[PodRow], controllers: &[PodRow]) -> bool {
        let all_new = |pods: &[PodRow]| {
            !pods.is_empty()
                && pods
                    .iter()
                    .all(|p| p.image == self.new_image && p.ready && !p.terminating)
        };
        self.nodes.values().all(|r| r.up_ms.is_some()) && all_new(agents) && all_new(controllers)
    }
}

/// The interface, routes, rules and files wgmesh makes on a node that are still there:
/// empty once the node is clean. `bridge` is the pods' bridge of CNI mode.
pub fn leftovers(node: &RealNode, interface: &str, bridge: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let links = node.exec("ip", &["-o", "link", "show"])?;
    for name in [interface, bridge] {
        if links
            .lines()
            .any(|l| l.split(':').nth(1).map(str::trim) == Some(name))
        {
            found.push(format!("link {name}"));
        }
    }
    // Every route and rule of ours carries protocol 87.
    let routes = node.exec("ip", &["route", "show", "table", "all", "proto", "87"])?;
    found.extend(routes.lines().map(|l| format!("route {l}")));
    // (`ip rule show protocol 87` does not filter in iproute2 6.1: the details do.)
    let rules = node.exec("ip", &["-d", "rule", "show"])?;
    found.extend(
        rules
            .lines()
            .filter(|l| l.contains("proto 87"))
            .map(|l| format!("rule {l}")),
    );
    for path in [
        "/etc/cni/net.d/05-wgmesh.conflist",
        "/run/wgmesh/cni/05-wgmesh.conflist",
        "/etc/cni/net.d/00-wgmesh-gate.conflist",
        "/run/wgmesh/cni/00-wgmesh-gate.conflist",
        &format!("/var/run/wireguard/{interface}.sock"),
    ] {
        // A link is a leftover even when what it names is gone.
        if std::fs::symlink_metadata(node.host_path(path)).is_ok() {
            found.push(format!("file {path}"));
        }
    }
    let state = node.host_path("/var/lib/wgmesh");
    if let Ok(entries) = walk(&state) {
        found.extend(
            entries
                .into_iter()
                .map(|p| format!("state {}", p.display())),
        );
    }
    Ok(found)
}

/// The files under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            files.extend(walk(&e.path())?);
        } else {
            files.push(e.path());
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(node: &str, image: &str, ready: bool, terminating: bool) -> PodRow {
        PodRow {
            name: format!("{node}-{image}"),
            node: node.into(),
            image: image.into(),
            ready,
            terminating,
        }
    }

    #[test]
    fn pod_rows_parse_with_missing_fields() {
        assert_eq!(
            parse_pod_row("a|node-1|img:1||"),
            Some(row("node-1", "img:1", false, false)).map(|r| PodRow {
                name: "a".into(),
                ..r
            })
        );
        assert_eq!(
            parse_pod_row("a|node-1|img:1|true|2026-12-05T00:00:00Z"),
            Some(PodRow {
                name: "a".into(),
                ..row("node-1", "img:1", true, true)
            })
        );
        assert_eq!(parse_pod_row("garbage"), None);
    }

    #[test]
    fn a_rollout_is_followed_node_by_node() {
        let mut r = Rollout::new("new", ["n1".to_owned(), "n2".to_owned()]);
        let controllers_old = [row("n1", "old", true, false)];
        let controllers_new = [row("n2", "new", true, false)];
        r.observe(
            0,
            &[row("n1", "old", true, false), row("n2", "old", true, false)],
        );
        assert!(r.nodes.values().all(|n| n.down_ms.is_none()));
        r.observe(
            100,
            &[row("n1", "old", true, true), row("n2", "old", true, false)],
        );
        assert_eq!(r.nodes["n1"].down_ms, Some(100));
        r.observe(
            200,
            &[
                row("n1", "new", false, false),
                row("n2", "old", true, false),
            ],
        );
        assert_eq!(r.nodes["n1"].up_ms, None);
        let done = [row("n1", "new", true, false), row("n2", "new", true, false)];
        r.observe(300, &done);
        assert_eq!(r.nodes["n1"].up_ms, Some(300));
        // n2's old pod went straight to a Ready new one between two listings.
        assert_eq!(r.nodes["n2"].down_ms, Some(300));
        assert_eq!(r.nodes["n2"].up_ms, Some(300));
        assert!(r.done(&done, &controllers_new));
        assert!(!r.done(&done, &controllers_old));
    }
}
