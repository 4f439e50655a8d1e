//! Pod CIDRs from other IPAMs (`WireGuardMesh.spec.podCIDRSource`) end to end: three nodes in
//! add-on mode whose pods sit in 10.244.<i>.0/24 behind a kindnet-like plaintext network, and
//! the mesh switched between sources while every node's underlay is captured:
//! - `calico` before Calico is installed: the mesh is held as it is (nothing stripped, pods
//!   still reach each other encrypted);
//! - Calico's CRD and `IPAMBlock` objects as Calico's IPAM writes them: host-affine blocks
//!   become the nodes' allowed IPs on every device, deleted and virtual blocks do not, a
//!   released block goes away;
//! - `cilium`: `CiliumNode` objects' `spec.ipam.podCIDRs`;
//! - `annotation`: the Node's `wgmesh.io/pod-cidrs`;
//! - back to `node`: `Node.spec.podCIDRs`.
//!
//! After each switch every pod reaches every other, and the capture counts no plaintext pod
//! packet. The controller runs with the chart's RBAC (`rbac.podCIDRSources`). Needs root.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use serde_json::json;
use wgmesh_api::WireGuardPeer;
use wgmesh_e2e::chaos::watcher::Watcher;
use wgmesh_e2e::mesh::{MeshOptions, NetworkMode, TestMesh};
use wgmesh_e2e::netns::echo_server;

const ECHO_PORT: u16 = 7000;
const TUNNEL_CIDR: &str = "10.250.0.0/16";
const CLUSTER_CIDR: &str = "10.244.0.0/16";

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

#[tokio::test]
async fn e2e_other_ipam_pod_cidrs_from_calico_cilium_the_annotation_and_the_node() -> Result<()> {
    if !is_root() {
        eprintln!("skipped: the mesh needs root (network namespaces, TUN)");
        return Ok(());
    }
    let mesh = TestMesh::start_with(
        3,
        MeshOptions {
            mode: NetworkMode::Addon,
            values: json!({"rbac": {"podCIDRSources": ["calico", "cilium"]}}),
            ..Default::default()
        },
    )
    .await?;
    mesh.wait_peer_counts(2, Duration::from_secs(60)).await?;
    let _servers: Vec<_> = mesh
        .nodes
        .iter()
        .map(|n| echo_server(&n.pod, addr(&n.pod_ip, ECHO_PORT), 1000))
        .collect::<Result<_>>()?;
    let mut watcher = Watcher::new(mesh.dir(), &[CLUSTER_CIDR, TUNNEL_CIDR])?;
    for (pos, node) in mesh.nodes.iter().enumerate() {
        watcher.watch(&node.name, &mesh.underlay_link(pos))?;
    }
    let n = mesh.nodes.len();
    let each = |f: &dyn Fn(usize) -> Vec<String>| (1..=n).map(f).collect::<Vec<_>>();

    // The default source: Node.spec.podCIDRs.
    let node_spec = each(&|i| vec![format!("10.244.{i}.0/24")]);
    wait_pod_cidrs(&mesh, &node_spec, "Node.spec.podCIDRs").await?;
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(20))?;

    // Calico before Calico: nothing to list, so the mesh is held as it is.
    mesh.patch_mesh_spec(json!({"podCIDRSource": "calico"}))
        .await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    wait_pod_cidrs(&mesh, &node_spec, "held while Calico's CRD is missing").await?;
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(20))?;
    let controller = mesh.controller.as_ref().context("the controller runs")?;
    let log = std::fs::read_to_string(controller.log_path())?;
    assert!(
        log.contains("pod CIDR source (Calico's IPAMBlocks) has not been listed yet"),
        "the controller says why it holds the mesh:\n{log}"
    );

    // Calico's IPAM: one /26 per node, node-1 with a second block; a block being released,
    // a virtual one and one without affinity belong to no node.
    create_crd(
        &mesh,
        include_str!("../testdata/foreign/calico-ipamblocks.crd.yaml"),
    )
    .await?;
    let blocks = foreign_api(
        &mesh,
        "crd.projectcalico.org",
        "v1",
        "IPAMBlock",
        "ipamblocks",
    );
    for i in 1..=n {
        create_block(
            &blocks,
            &format!("10.244.{i}.0/26"),
            Some(&format!("host:node-{i}")),
            false,
        )
        .await?;
    }
    create_block(&blocks, "10.244.101.0/26", Some("host:node-1"), false).await?;
    create_block(&blocks, "10.244.2.192/26", Some("host:node-2"), true).await?;
    create_block(&blocks, "10.244.3.128/26", Some("virtual:vm-1"), false).await?;
    create_block(&blocks, "10.244.3.64/26", None, false).await?;
    let mut calico = each(&|i| vec![format!("10.244.{i}.0/26")]);
    calico[0].push("10.244.101.0/26".into());
    wait_pod_cidrs(&mesh, &calico, "Calico's host-affine blocks").await?;
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(20))?;
    // Calico releases node-1's second block.
    blocks
        .delete("10-244-101-0-26", &DeleteParams::default())
        .await?;
    calico[0].pop();
    wait_pod_cidrs(&mesh, &calico, "a released block gone").await?;
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(20))?;

    // Cilium's IPAM: the CiliumNode of each node.
    create_crd(
        &mesh,
        include_str!("../testdata/foreign/cilium-ciliumnodes.crd.yaml"),
    )
    .await?;
    let cilium_nodes = foreign_api(&mesh, "cilium.io", "v2", "CiliumNode", "ciliumnodes");
    for (pos, node) in mesh.nodes.iter().enumerate() {
        let i = pos + 1;
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNode",
            "metadata": {"name": node.name},
            "spec": {
                "addresses": [{"type": "InternalIP", "ip": node.node_ip}],
                "health": {"ipv4": format!("10.244.{i}.90")},
                "ipam": {"podCIDRs": [format!("10.244.{i}.0/25")], "pool": {}},
            },
        }))?;
        cilium_nodes.create(&PostParams::default(), &object).await?;
    }
    mesh.patch_mesh_spec(json!({"podCIDRSource": "cilium"}))
        .await?;
    let cilium = each(&|i| vec![format!("10.244.{i}.0/25")]);
    wait_pod_cidrs(&mesh, &cilium, "CiliumNodes' spec.ipam.podCIDRs").await?;
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(20))?;

    // An IPAM that writes nowhere Kubernetes can read: the Node annotation.
    let nodes: Api<Node> = Api::all(mesh.client.clone());
    for i in 1..=n {
        let patch = json!({"metadata": {"annotations": {"wgmesh.io/pod-cidrs": format!("10.244.{i}.0/27, 10.244.{}.0/28", 150 + i)}}});
        nodes
            .patch(
                &format!("node-{i}"),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
    }
    mesh.patch_mesh_spec(json!({"podCIDRSource": "annotation"}))
        .await?;
    let annotated = each(&|i| {
        vec![
            format!("10.244.{i}.0/27"),
            format!("10.244.{}.0/28", 150 + i),
        ]
    });
    wait_pod_cidrs(&mesh, &annotated, "the wgmesh.io/pod-cidrs annotation").await?;
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(20))?;

    mesh.patch_mesh_spec(json!({"podCIDRSource": "node"}))
        .await?;
    wait_pod_cidrs(&mesh, &node_spec, "back to Node.spec.podCIDRs").await?;
    mesh.pod_matrix(ECHO_PORT, Duration::from_secs(20))?;

    let counts = watcher.poll()?;
    let plaintext: u64 = counts.iter().map(|c| c.plaintext).sum();
    assert_eq!(
        plaintext, 0,
        "pod packets in plaintext on the underlay: {counts:?}"
    );
    eprintln!("capture: {counts:?}");
    Ok(())
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().expect("a socket address")
}

/// Waits until node `i`'s pod CIDRs are `want[i - 1]` in its WireGuardPeer and on every other
/// node's device (its allowed IPs, tunnel addresses aside).
async fn wait_pod_cidrs(mesh: &TestMesh, want: &[Vec<String>], what: &str) -> Result<()> {
    let peers: Api<WireGuardPeer> = Api::all(mesh.client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut wrong = Vec::new();
        let list = peers.list(&Default::default()).await?;
        for (pos, node) in mesh.nodes.iter().enumerate() {
            let mut want = want[pos].clone();
            want.sort();
            let in_api = list
                .items
                .iter()
                .find(|p| p.spec.node.as_ref().is_some_and(|n| n.0 == node.name))
                .map(|p| pod_part(p.spec.allowed_ips.iter().map(|c| c.0.clone())))
                .unwrap_or_default();
            if in_api != want {
                wrong.push(format!("{}'s WireGuardPeer: {in_api:?}", node.name));
            }
            let key = mesh.public_key(pos)?;
            for other in (0..mesh.nodes.len()).filter(|o| *o != pos) {
                let on_device = device_allowed_ips(mesh, other, &key)?;
                if on_device != want {
                    wrong.push(format!(
                        "{} on {}'s device: {on_device:?}",
                        node.name, mesh.nodes[other].name
                    ));
                }
            }
            if !wrong.is_empty() && Instant::now() > deadline {
                bail!(
                    "{what}: want {want:?}, have {}\n{}",
                    wrong.join("; "),
                    mesh.agent_logs(10)
                );
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The pod networks among allowed IPs: all but the tunnel addresses, sorted.
fn pod_part(allowed: impl Iterator<Item = String>) -> Vec<String> {
    let mut pods: Vec<String> = allowed.filter(|c| !c.starts_with("10.250.")).collect();
    pods.sort();
    pods
}

/// The allowed IPs node `on`'s device has for the peer with public key `key`.
fn device_allowed_ips(mesh: &TestMesh, on: usize, key: &str) -> Result<Vec<String>> {
    let dump = mesh.wg_dump(on)?;
    let line = dump
        .lines()
        .skip(1)
        .find(|l| l.split('\t').next() == Some(key))
        .with_context(|| format!("no peer {key} on node {on}:\n{dump}"))?;
    let allowed = line.split('\t').nth(3).unwrap_or_default();
    Ok(pod_part(allowed.split(',').map(str::to_owned)))
}

/// Creates a CRD from its YAML and waits until the API server serves it.
async fn create_crd(mesh: &TestMesh, yaml: &str) -> Result<()> {
    let crd: CustomResourceDefinition = serde_yaml::from_str(yaml)?;
    let name = crd.metadata.name.clone().context("a CRD has a name")?;
    let crds: Api<CustomResourceDefinition> = Api::all(mesh.client.clone());
    crds.create(&PostParams::default(), &crd).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let established = crds
            .get(&name)
            .await?
            .status
            .and_then(|s| s.conditions)
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if established {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("CRD {name} not established");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn foreign_api(
    mesh: &TestMesh,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
    Api::all_with(mesh.client.clone(), &resource)
}

/// A block as Calico's IPAM writes it (named after its CIDR, two addresses allocated).
async fn create_block(
    blocks: &Api<DynamicObject>,
    cidr: &str,
    affinity: Option<&str>,
    deleted: bool,
) -> Result<()> {
    let name = cidr.replace(['.', '/'], "-");
    let mut spec = json!({
        "cidr": cidr,
        "allocations": [0, null, 1],
        "attributes": [
            {"handle_id": "ipip-tunnel-addr-node", "secondary": {"node": "node", "type": "ipipTunnelAddress"}},
            {"handle_id": "k8s-pod-network.0123abcd", "secondary": {"namespace": "default", "pod": "web-0"}},
        ],
        "unallocated": [3, 4, 5],
        "strictAffinity": false,
        "sequenceNumber": 2,
        "sequenceNumberForAllocation": {"0": 0, "2": 1},
        "deleted": deleted,
    });
    if let Some(a) = affinity {
        spec["affinity"] = json!(a);
    }
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "crd.projectcalico.org/v1",
        "kind": "IPAMBlock",
        "metadata": {"name": name},
        "spec": spec,
    }))?;
    blocks
        .create(&PostParams::default(), &object)
        .await
        .with_context(|| format!("creating IPAMBlock {name}"))?;
    Ok(())
}
