//! Cluster fixtures: Node objects, the agents' service account, pods bound to nodes, and the
//! projected tokens agents present (from TokenRequest, exactly as the kubelet obtains them).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    Container, Namespace, Node, NodeAddress, NodeSpec, NodeStatus, Pod, PodSpec, ServiceAccount,
};
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};

pub const AGENT_NAMESPACE: &str = "wgmesh-system";
pub const AGENT_SERVICE_ACCOUNT: &str = "wgmesh-agent";
pub const TOKEN_AUDIENCE: &str = "wgmesh";

/// Creates a Node with pod CIDRs, an InternalIP and labels.
pub async fn create_node(
    client: &kube::Client,
    name: &str,
    pod_cidrs: &[&str],
    internal_ip: &str,
    labels: &[(&str, &str)],
) -> Result<Node> {
    create_node_with_addresses(client, name, pod_cidrs, &[internal_ip], labels).await
}

/// Creates a Node with pod CIDRs, InternalIPs (a dual-stack node has one of each family, the
/// first is its `hostIP`) and labels.
pub async fn create_node_with_addresses(
    client: &kube::Client,
    name: &str,
    pod_cidrs: &[&str],
    internal_ips: &[&str],
    labels: &[(&str, &str)],
) -> Result<Node> {
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: pod_cidrs.first().map(|c| c.to_string()),
            pod_cidrs: Some(pod_cidrs.iter().map(|c| c.to_string()).collect()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let api: Api<Node> = Api::all(client.clone());
    let created = api.create(&PostParams::default(), &node).await?;
    // Addresses live in status, which create ignores.
    let mut with_status = created.clone();
    with_status.status = Some(NodeStatus {
        addresses: Some(
            internal_ips
                .iter()
                .map(|ip| NodeAddress {
                    type_: "InternalIP".into(),
                    address: ip.to_string(),
                })
                .collect(),
        ),
        ..Default::default()
    });
    Ok(api
        .replace_status(name, &PostParams::default(), &with_status)
        .await?)
}

pub async fn delete_node(client: &kube::Client, name: &str) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    api.delete(name, &DeleteParams::default()).await?;
    Ok(())
}

/// The agents' namespace and service account (idempotent).
pub async fn ensure_agent_identity(client: &kube::Client) -> Result<()> {
    let ns_api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(AGENT_NAMESPACE.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    ignore_conflict(ns_api.create(&PostParams::default(), &ns).await)?;
    let sa_api: Api<ServiceAccount> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(AGENT_SERVICE_ACCOUNT.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    ignore_conflict(sa_api.create(&PostParams::default(), &sa).await)?;
    Ok(())
}

/// A pod of the agent's service account scheduled on `node` (nothing runs it: it exists so
/// a token can be bound to it, as the kubelet's projected tokens are).
pub async fn agent_pod(
    client: &kube::Client,
    name: &str,
    node: &str,
    service_account: &str,
) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            service_account_name: Some(service_account.into()),
            automount_service_account_token: Some(false),
            containers: vec![Container {
                name: "agent".into(),
                image: Some("wgmesh/wgmesh:dev".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(pods.create(&PostParams::default(), &pod).await?)
}

/// A token of `service_account` for `audience`, bound to `pod` (a projected token).
pub async fn bound_token(
    client: &kube::Client,
    service_account: &str,
    pod: &Pod,
    audience: &str,
) -> Result<String> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            // Empty: the API server's own audiences (the in-cluster token).
            audiences: if audience.is_empty() {
                vec![]
            } else {
                vec![audience.into()]
            },
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        },
        ..Default::default()
    };
    let response = api
        .create_token_request(service_account, &PostParams::default(), &request)
        .await?;
    response
        .status
        .map(|s| s.token)
        .context("TokenRequest returned no token")
}

/// A token of the agent pod already running on `node` (`wgmesh-agent-<node>`), bound to it as
/// its kubelet projects it.
pub async fn running_agent_token(client: &kube::Client, node: &str) -> Result<String> {
    let pod = Api::<Pod>::namespaced(client.clone(), AGENT_NAMESPACE)
        .get(&format!("wgmesh-agent-{node}"))
        .await?;
    bound_token(client, AGENT_SERVICE_ACCOUNT, &pod, TOKEN_AUDIENCE).await
}

/// An agent identity on `node`: a pod of the agent service account there, and its token.
pub async fn agent_token(client: &kube::Client, node: &str) -> Result<String> {
    ensure_agent_identity(client).await?;
    let pod = agent_pod(
        client,
        &format!("wgmesh-agent-{node}"),
        node,
        AGENT_SERVICE_ACCOUNT,
    )
    .await?;
    bound_token(client, AGENT_SERVICE_ACCOUNT, &pod, TOKEN_AUDIENCE).await
}

fn ignore_conflict<T>(r: kube::Result<T>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
