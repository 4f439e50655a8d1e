//! The Helm chart: lint, rendered output against checked-in snapshots, the plain manifests
//! up to date, and a real install and upgrade into a real API server.
//!
//! Snapshots live in tests/e2e/testdata/helm/<name>.yaml; after an intended change, run the
//! tests with `WGMESH_UPDATE_SNAPSHOTS=1` and review the diff.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Deserialize;
use wgmesh_e2e::ControlPlane;
use wgmesh_e2e::helm::{self, Helm, NAMESPACE, RELEASE, mask_generated};
use wgmesh_e2e::install::repo_root;

fn testdata(file: &str) -> PathBuf {
    repo_root().join("tests/e2e/testdata/helm").join(file)
}

#[test]
fn chart_lints_and_renders_like_its_snapshots() -> Result<()> {
    let helm = Helm::new()?;
    let chart = helm::chart_dir().display().to_string();
    for values in [
        None,
        Some("cni.values.yaml"),
        Some("custom.values.yaml"),
        Some("service-monitor.values.yaml"),
    ] {
        let mut args = vec!["lint".to_owned(), chart.clone(), "--strict".to_owned()];
        if let Some(v) = values {
            args.extend(["--values".to_owned(), testdata(v).display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        helm.ok(&args, None)?;
    }

    let mut stale = Vec::new();
    for (name, values) in [
        ("default", None),
        ("cni", Some("cni.values.yaml")),
        ("custom", Some("custom.values.yaml")),
        ("service-monitor", Some("service-monitor.values.yaml")),
    ] {
        let path = values.map(|v| testdata(v).display().to_string());
        let mut extra = Vec::new();
        if let Some(p) = &path {
            extra.extend(["--values", p.as_str()]);
        }
        let rendered = mask_generated(&helm.template(&extra)?);
        let snapshot = testdata(&format!("{name}.snapshot.yaml"));
        let have = std::fs::read_to_string(&snapshot).unwrap_or_default();
        if have != rendered {
            if std::env::var_os("WGMESH_UPDATE_SNAPSHOTS").is_some() {
                std::fs::write(&snapshot, &rendered)?;
            } else {
                stale.push(snapshot.display().to_string());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "helm template output differs from {stale:?}; if intended, run with WGMESH_UPDATE_SNAPSHOTS=1 and review the diff"
    );

    // The plain manifests are exactly the chart's rendering.
    let want = helm.render_manifests()?;
    let have = std::fs::read_to_string(helm::manifests_path())?;
    assert!(
        have == want,
        "deploy/manifests/wgmesh.yaml differs from the chart; run `cargo xtask manifests`"
    );
    Ok(())
}

#[test]
fn a_wrong_value_type_is_refused_by_the_schema() -> Result<()> {
    let helm = Helm::new()?;
    let bad = testdata("wrong-type.values.yaml").display().to_string();
    let chart = helm::chart_dir().display().to_string();
    let out = helm.run(&["template", RELEASE, &chart, "--values", &bad], None)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {stderr}");
    assert!(
        stderr.contains("/controller/replicas") && stderr.contains("want integer"),
        "the error names the value and the type: {stderr}"
    );
    Ok(())
}

/// `mesh.spec` is checked against the WireGuardMesh CRD's own schema (written into
/// values.schema.json by `cargo xtask crdgen`): a typo the API server would silently prune,
/// or a wrong type, fails the render naming the value; every example mesh renders.
#[test]
fn a_wrong_mesh_spec_is_refused_by_the_schema_and_the_examples_are_not() -> Result<()> {
    let helm = Helm::new()?;
    let dir = tempfile::tempdir()?;
    let values = |name: &str, spec: serde_yaml::Value| -> Result<String> {
        let path = dir.path().join(format!("{name}.values.yaml"));
        let doc = serde_yaml::to_string(&serde_yaml::Mapping::from_iter([(
            "mesh".into(),
            serde_yaml::Mapping::from_iter([("spec".into(), spec)]).into(),
        )]))?;
        std::fs::write(&path, doc)?;
        Ok(path.display().to_string())
    };
    let refused: [(&str, &str, &[&str]); 5] = [
        (
            "a misspelt field",
            "tunelCIDRs: [10.250.0.0/16]",
            &["/mesh/spec", "tunelCIDRs"],
        ),
        (
            "a port as text",
            "listenPort: fifty",
            &["/mesh/spec/listenPort", "want integer"],
        ),
        (
            "an unknown backend",
            "backend: fastest",
            &["/mesh/spec/backend", "must be one of"],
        ),
        (
            "a misspelt nested field",
            "fwmark: {mark: 4183, tabel: 7}",
            &["/mesh/spec/fwmark", "tabel"],
        ),
        (
            "a port out of range",
            "listenPort: 70000",
            &["/mesh/spec/listenPort", "maximum"],
        ),
    ];
    for (name, spec, expect) in refused {
        let path = values("bad", serde_yaml::from_str(spec)?)?;
        let err = helm
            .template(&["--values", &path])
            .expect_err(&format!("{name} was rendered"));
        let message = format!("{err:#}");
        for want in expect {
            assert!(message.contains(want), "{name}: no {want:?} in {message}");
        }
    }

    let examples = repo_root().join("deploy/examples");
    let mut rendered = 0;
    for entry in std::fs::read_dir(&examples)? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        let doc: serde_yaml::Value = serde_yaml::from_str(&text)?;
        if doc["kind"].as_str() != Some("WireGuardMesh") {
            continue;
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let values = values(&name, doc["spec"].clone())?;
        helm.template(&["--values", &values])
            .with_context(|| format!("rendering {name} as mesh.spec"))?;
        rendered += 1;
    }
    assert!(rendered >= 2, "{rendered} example meshes in {examples:?}");
    Ok(())
}

#[test]
fn the_release_namespace_is_never_a_secret_namespace() -> Result<()> {
    // It holds the controller's TLS key: a Secret namespace there would let any peer author
    // name that key as a preshared key.
    let helm = Helm::new()?;
    for set in [
        format!("peerSecrets.namespace={NAMESPACE}"),
        format!("rbac.secretNamespaces={{other,{NAMESPACE}}}"),
    ] {
        let err = helm
            .template(&["--set", &set])
            .expect_err(&format!("{set} was rendered"));
        assert!(
            format!("{err:#}").contains("must not name the release namespace"),
            "{set}: {err:#}"
        );
    }
    helm.template(&["--set", "rbac.secretNamespaces={other}"])?;
    Ok(())
}

/// The objects of a rendered `helm template` (or the plain manifests).
fn documents(rendered: &str) -> Result<Vec<serde_yaml::Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// The object of `kind` named `name`.
fn object<'a>(
    objects: &'a [serde_yaml::Value],
    kind: &str,
    name: &str,
) -> Option<&'a serde_yaml::Value> {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
}

/// Every place under `value` (a pod spec) that names a Secret: keys such as `secret`
/// (a volume or a projected source), `secretName`, `secretKeyRef` (env), `secretRef`
/// (envFrom, and volume plugins' `nodePublishSecretRef`...), as `path: value`. Not
/// `imagePullSecrets`: the user's registry credentials (`imagePullSecrets` in the values),
/// which the kubelet reads to pull the image anyway.
fn secret_references(value: &serde_yaml::Value, path: &str, out: &mut Vec<String>) {
    match value {
        serde_yaml::Value::Mapping(map) => {
            for (key, child) in map {
                let key = key.as_str().unwrap_or_default();
                let here = format!("{path}.{key}");
                if key == "imagePullSecrets" {
                    continue;
                }
                if key.to_ascii_lowercase().contains("secret") {
                    out.push(format!(
                        "{here}: {}",
                        serde_yaml::to_string(child).unwrap_or_default().trim()
                    ));
                }
                secret_references(child, &here, out);
            }
        }
        serde_yaml::Value::Sequence(items) => {
            for (i, child) in items.iter().enumerate() {
                secret_references(child, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_agents_pods_reference_no_secret() -> Result<()> {
    // The Node authorizer lets a kubelet read, whole, every Secret a pod bound to its node
    // references. An agent's pod runs on every node: were it to reference the TLS Secret
    // (even for ca.crt alone), root on any node could read the controller's key with the
    // kubelet's credentials, and act as a controller replica. The agents get the CA
    // certificate from a ConfigMap instead.
    let helm = Helm::new()?;
    let mut renders = Vec::new();
    for values in [
        None,
        Some("cni.values.yaml"),
        Some("custom.values.yaml"),
        Some("service-monitor.values.yaml"),
    ] {
        let path = values.map(|v| testdata(v).display().to_string());
        let mut extra = Vec::new();
        if let Some(p) = &path {
            extra.extend(["--values", p.as_str()]);
        }
        renders.push((
            values.unwrap_or("default values").to_owned(),
            helm.template(&extra)?,
        ));
    }
    renders.push((
        "deploy/manifests/wgmesh.yaml".to_owned(),
        std::fs::read_to_string(helm::manifests_path())?,
    ));
    for (what, rendered) in renders {
        let objects = documents(&rendered)?;
        let agent = object(&objects, "DaemonSet", "wgmesh-agent")
            .with_context(|| format!("{what}: no agent DaemonSet"))?;
        let pod = &agent["spec"]["template"]["spec"];
        anyhow::ensure!(pod.is_mapping(), "{what}: the DaemonSet has no pod spec");
        let mut found = Vec::new();
        secret_references(pod, "spec.template.spec", &mut found);
        assert!(
            found.is_empty(),
            "{what}: the agent's pod references Secrets, which every node's kubelet may then read:\n{}",
            found.join("\n")
        );
        // It still gets the CA certificate, from a ConfigMap.
        let ca = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|v| v["name"].as_str() == Some("ca"))
            .with_context(|| format!("{what}: no ca volume"))?;
        assert!(
            ca["configMap"]["name"].as_str().is_some(),
            "{what}: the ca volume is not a ConfigMap: {ca:?}"
        );
    }
    Ok(())
}

#[test]
fn the_generated_ca_configmap_holds_the_secrets_ca() -> Result<()> {
    use base64::Engine;
    let helm = Helm::new()?;
    let objects = documents(&helm.template(&[])?)?;
    let secret = object(&objects, "Secret", "wgmesh-controller-tls").context("no TLS Secret")?;
    let config_map =
        object(&objects, "ConfigMap", "wgmesh-controller-ca").context("no CA ConfigMap")?;
    let ca = base64::engine::general_purpose::STANDARD.decode(
        secret["data"]["ca.crt"]
            .as_str()
            .context("the Secret has no ca.crt")?,
    )?;
    let pem = config_map["data"]["ca.crt"]
        .as_str()
        .context("the ConfigMap has no ca.crt")?;
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    assert_eq!(
        pem.as_bytes(),
        ca.as_slice(),
        "the ConfigMap's CA is the Secret's"
    );
    // Only the certificate: nothing secret.
    assert_eq!(config_map["data"].as_mapping().map(|m| m.len()), Some(1));
    assert!(!pem.contains("PRIVATE KEY"));
    Ok(())
}

#[test]
fn an_existing_secret_needs_a_ca_configmap() -> Result<()> {
    let helm = Helm::new()?;
    let err = helm
        .template(&["--set", "tls.existingSecret=my-tls"])
        .expect_err("existingSecret without caConfigMap was rendered");
    assert!(
        format!("{err:#}").contains("tls.caConfigMap is required with tls.existingSecret"),
        "{err:#}"
    );
    let err = helm
        .template(&["--set", "tls.caConfigMap=my-ca"])
        .expect_err("caConfigMap without existingSecret was rendered");
    assert!(
        format!("{err:#}").contains("tls.caConfigMap is only for tls.existingSecret"),
        "{err:#}"
    );
    // With both, neither the Secret nor the ConfigMap is generated.
    let objects =
        documents(&helm.template(&["--set", "tls.existingSecret=my-tls,tls.caConfigMap=my-ca"])?)?;
    assert!(
        !objects
            .iter()
            .any(|o| matches!(o["kind"].as_str(), Some("Secret" | "ConfigMap"))),
        "a Secret or ConfigMap was generated"
    );
    Ok(())
}

/// Settings that cannot work are refused at render, saying why; the controllers on the host
/// network roll one at a time without a surge pod (two cannot share a node's ports).
#[test]
fn settings_that_cannot_work_are_refused_and_the_controller_rolls_without_a_surge() -> Result<()> {
    let helm = Helm::new()?;
    let err = helm
        .template(&["--set", "cni.enabled=true,controller.hostNetwork=false"])
        .expect_err("CNI mode with the controller on the pod network was rendered");
    assert!(
        format!("{err:#}").contains("cannot work in CNI mode"),
        "{err:#}"
    );
    let strategy = |args: &[&str]| -> Result<serde_yaml::Value> {
        let objects = documents(&helm.template(args)?)?;
        let controller = objects
            .iter()
            .find(|o| o["kind"] == "Deployment" && o["metadata"]["name"] == "wgmesh-controller")
            .context("no controller Deployment")?;
        Ok(controller["spec"]["strategy"].clone())
    };
    let on_host = strategy(&[])?;
    assert_eq!(on_host["rollingUpdate"]["maxSurge"], 0, "{on_host:?}");
    assert_eq!(on_host["rollingUpdate"]["maxUnavailable"], 1, "{on_host:?}");
    let on_pods = strategy(&["--set", "controller.hostNetwork=false"])?;
    assert!(
        on_pods.is_null(),
        "the default surge on the pod network: {on_pods:?}"
    );
    Ok(())
}

/// resourceVersion of every object the release manages, by kind/namespace/name.
fn release_versions(cp: &ControlPlane, helm: &Helm) -> Result<BTreeMap<String, String>> {
    let manifest = helm.ok(
        &["get", "manifest", RELEASE, "--namespace", NAMESPACE],
        Some(cp.kubeconfig()),
    )?;
    let mut out = BTreeMap::new();
    for doc in manifest.split("\n---") {
        let value: serde_yaml::Value = serde_yaml::from_str(doc)?;
        let Some(kind) = value["kind"].as_str() else {
            continue;
        };
        let name = value["metadata"]["name"].as_str().context("name")?;
        let ns = value["metadata"]["namespace"].as_str();
        let mut args = vec![
            "get",
            kind,
            name,
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ];
        if let Some(ns) = ns {
            args.extend(["--namespace", ns]);
        }
        let version = cp.kubectl_ok(&args)?;
        out.insert(format!("{kind}/{}/{name}", ns.unwrap_or("")), version);
    }
    Ok(out)
}

#[tokio::test]
async fn helm_install_then_upgrade_changes_nothing() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let helm = Helm::new()?;

    // A wrong type is refused at install, and nothing is created.
    let bad = testdata("wrong-type.values.yaml").display().to_string();
    let refused = helm.install(&cp, &["--values", &bad]);
    let message = format!("{:#}", refused.expect_err("the schema refused the values"));
    assert!(message.contains("want integer"), "{message}");
    // (Helm installs a chart's crds/ before rendering; the release itself never happens.)
    let objects = cp.kubectl_ok(&[
        "get",
        "deployments,daemonsets,secrets,serviceaccounts",
        "--namespace",
        NAMESPACE,
        "-o",
        "name",
    ])?;
    assert!(objects.trim().is_empty(), "nothing installed: {objects}");
    let releases = helm.ok(&["list", "--all-namespaces", "-q"], Some(cp.kubeconfig()))?;
    assert!(releases.trim().is_empty(), "no release: {releases}");

    helm.install(&cp, &[])?;
    for crd in ["wireguardmeshes.wgmesh.io", "wireguardpeers.wgmesh.io"] {
        cp.kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}"),
        ])?;
    }
    let mesh = cp.kubectl_ok(&["get", "wireguardmeshes", "default", "-o", "yaml"])?;
    assert!(mesh.contains("10.250.0.0/16"), "{mesh}");
    let secret = cp.kubectl_ok(&[
        "get",
        "secret",
        "wgmesh-controller-tls",
        "--namespace",
        NAMESPACE,
        "-o",
        "jsonpath={.data.ca\\.crt}",
    ])?;
    assert!(!secret.is_empty(), "a CA was generated");
    // The agents' ConfigMap holds the same CA, at install and after the upgrade below.
    let same_ca = || -> Result<()> {
        use base64::Engine;
        let secret = cp.kubectl_ok(&[
            "get",
            "secret",
            "wgmesh-controller-tls",
            "--namespace",
            NAMESPACE,
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ])?;
        let config_map = cp.kubectl_ok(&[
            "get",
            "configmap",
            "wgmesh-controller-ca",
            "--namespace",
            NAMESPACE,
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ])?;
        let ca =
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(secret.trim())?)?;
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
        assert_eq!(
            config_map.trim(),
            ca.trim(),
            "the agents' CA is the Secret's"
        );
        Ok(())
    };
    same_ca()?;

    let before = release_versions(&cp, &helm)?;
    assert!(before.len() >= 10, "{before:?}");
    helm.install(&cp, &[])?;
    let after = release_versions(&cp, &helm)?;
    assert_eq!(before, after, "a second upgrade rewrote objects");
    same_ca()?;
    Ok(())
}

/// The controller's service account, as the API server names it.
fn controller_user() -> String {
    format!("system:serviceaccount:{NAMESPACE}:wgmesh-controller")
}

/// A WireGuardPeer body; `node` makes it a node member.
fn peer_body(name: &str, key_byte: u8, node: Option<&str>) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "mesh": "default",
        "publicKey": wgmesh_core::PublicKey::from_bytes([key_byte; 32]).to_base64(),
    });
    if let Some(node) = node {
        spec["node"] = node.into();
    } else {
        spec["allowedIPs"] = serde_json::json!(["192.168.70.0/24"]);
    }
    serde_json::json!({
        "apiVersion": "wgmesh.io/v1alpha1",
        "kind": "WireGuardPeer",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// The admission error's message when `result` was refused by the node policy.
fn refused_by_node_policy<T>(result: &kube::Result<T>) -> Option<String> {
    match result {
        Err(kube::Error::Api(s)) if s.message.contains("spec.node") => Some(s.message.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn only_the_controller_makes_node_members() -> Result<()> {
    use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
    use wgmesh_api::WireGuardPeer;

    let cp = ControlPlane::start().await?;
    let helm = Helm::new()?;
    helm.install(&cp, &[])?;
    cp.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/wireguardpeers.wgmesh.io",
    ])?;
    // An ordinary user allowed to write WireGuardPeers (as `peer add` users are).
    cp.kubectl_ok(&[
        "create",
        "clusterrole",
        "peer-author",
        "--verb=get,list,create,update,patch,delete",
        "--resource=wireguardpeers.wgmesh.io",
    ])?;
    cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "peer-author",
        "--clusterrole=peer-author",
        "--user=alice",
    ])?;
    let alice: Api<WireGuardPeer> = Api::all(cp.client_as("alice").await?);
    let controller: Api<WireGuardPeer> = Api::all(cp.client_as(&controller_user()).await?);
    let admin: Api<WireGuardPeer> = Api::all(cp.client().await?);
    let create = |api: &Api<WireGuardPeer>, body: serde_json::Value| {
        let api = api.clone();
        async move {
            let peer: WireGuardPeer = serde_json::from_value(body).expect("a peer");
            api.create(&PostParams::default(), &peer).await
        }
    };
    let merge = |api: &Api<WireGuardPeer>, name: &'static str, patch: serde_json::Value| {
        let api = api.clone();
        async move {
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
        }
    };

    // The policy is enforced once the API server has loaded and type-checked it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let message = loop {
        let attempt = create(&alice, peer_body("intruder", 9, Some("worker-1"))).await;
        if let Some(message) = refused_by_node_policy(&attempt) {
            break message;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "alice still creates node members after 60 s: {attempt:?}"
        );
        if attempt.is_ok() {
            admin.delete("intruder", &DeleteParams::default()).await?;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    assert!(
        message.contains(&controller_user()),
        "the message names who may: {message}"
    );

    // Alice's own peers are hers to write, but not to make node members.
    create(&alice, peer_body("laptop", 10, None)).await?;
    let add_node = merge(
        &alice,
        "laptop",
        serde_json::json!({"spec": {"node": "worker-1"}}),
    )
    .await;
    assert!(
        refused_by_node_policy(&add_node).is_some(),
        "alice made her peer a node member"
    );
    merge(
        &alice,
        "laptop",
        serde_json::json!({"spec": {"comment": "mine"}}),
    )
    .await?;

    // The controller creates node members (owned by their Node, with the endpoint their
    // agent registered) and updates them.
    let mut node_member = peer_body("node-worker-1", 11, Some("worker-1"));
    node_member["metadata"]["annotations"] =
        serde_json::json!({"wgmesh.io/registered-endpoint": "192.168.0.1:51820"});
    node_member["metadata"]["ownerReferences"] = serde_json::json!([{
        "apiVersion": "v1", "kind": "Node", "name": "worker-1",
        "uid": "00000000-0000-0000-0000-000000000001",
    }]);
    create(&controller, node_member).await?;
    merge(
        &controller,
        "node-worker-1",
        serde_json::json!({"spec": {"endpoint": "192.168.0.1:51820"}}),
    )
    .await?;

    // Alice can neither move a node member to another node nor change its spec, nor take
    // it from its Node or point the others at another endpoint, but may label it.
    for patch in [
        serde_json::json!({"spec": {"node": "worker-2"}}),
        serde_json::json!({"spec": {"publicKey": wgmesh_core::PublicKey::from_bytes([9; 32]).to_base64()}}),
        serde_json::json!({"metadata": {"ownerReferences": null}}),
        serde_json::json!({"metadata": {"annotations": {"wgmesh.io/registered-endpoint": "169.254.169.254:80"}}}),
        serde_json::json!({"metadata": {"annotations": {"wgmesh.io/registered-endpoint": null}}}),
    ] {
        let refused = merge(&alice, "node-worker-1", patch.clone()).await;
        assert!(
            refused_by_node_policy(&refused).is_some(),
            "alice changed a node member with {patch}"
        );
    }
    merge(
        &alice,
        "node-worker-1",
        serde_json::json!({"metadata": {"labels": {"team": "ops"}}}),
    )
    .await?;
    // Nor delete it (its node would drop out, and a copy of its key could take its place),
    // while her own peers are hers to delete.
    let deleted = alice
        .delete("node-worker-1", &DeleteParams::default())
        .await;
    assert!(
        refused_by_node_policy(&deleted).is_some(),
        "alice deleted a node member: {deleted:?}"
    );
    alice.delete("laptop", &DeleteParams::default()).await?;
    let node_peer = admin.get("node-worker-1").await?;
    assert_eq!(
        node_peer.spec.node.as_ref().map(|n| n.0.as_str()),
        Some("worker-1")
    );
    assert_eq!(
        node_peer.spec.public_key,
        wgmesh_core::PublicKey::from_bytes([11; 32]).to_base64()
    );
    // A cluster administrator (system:masters) still may.
    admin
        .delete("node-worker-1", &DeleteParams::default())
        .await?;
    Ok(())
}

/// `kubectl auth can-i VERB secrets` of the controller's service account in `namespace`.
fn controller_can(cp: &ControlPlane, verb: &str, namespace: &str) -> Result<bool> {
    let out = cp.kubectl(&[
        "auth",
        "can-i",
        verb,
        "secrets",
        "--namespace",
        namespace,
        "--as",
        &controller_user(),
    ])?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "yes")
}

#[tokio::test]
async fn the_controller_reads_secrets_only_in_the_secret_namespaces() -> Result<()> {
    let cp = ControlPlane::start().await?;
    let helm = Helm::new()?;
    cp.kubectl_ok(&["create", "namespace", "team-a"])?;
    helm.install(&cp, &["--set", "rbac.secretNamespaces={team-a}"])?;

    // Not in its own namespace, where its TLS key lives; only where peer Secrets live.
    assert!(
        !controller_can(&cp, "get", NAMESPACE)?,
        "get in {NAMESPACE}"
    );
    assert!(controller_can(&cp, "get", "wgmesh-secrets")?);
    assert!(controller_can(&cp, "get", "team-a")?);
    assert!(!controller_can(&cp, "list", "wgmesh-secrets")?);
    assert!(!controller_can(&cp, "get", "kube-system")?);

    // The chart made the peer Secrets namespace, and keeps it (and its Secrets) on uninstall.
    let keep = cp.kubectl_ok(&[
        "get",
        "namespace",
        "wgmesh-secrets",
        "-o",
        "jsonpath={.metadata.annotations.helm\\.sh/resource-policy}",
    ])?;
    assert_eq!(keep, "keep");

    // The controller is told the same namespaces.
    let env = cp.kubectl_ok(&[
        "get",
        "deployment",
        "wgmesh-controller",
        "--namespace",
        NAMESPACE,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].env[?(@.name==\"WGMESH_SECRET_NAMESPACES\")].value}",
    ])?;
    assert_eq!(env, "wgmesh-secrets,team-a");
    Ok(())
}
