//! `kubectl wgmesh import --apply` against a real API server: all or nothing. A file that
//! cannot be created whole (a port the CRD refuses, caught before the cluster is asked; a
//! Secret left from an earlier import, caught by the server-side dry run) creates nothing; a
//! refusal only the real creation meets deletes what the import made; a good file creates
//! each peer and its preshared key's Secret, owned by the peer.

use anyhow::Result;
use kube::api::{Api, DeleteParams};
use wgmesh_api::WireGuardPeer;
use wgmesh_core::{Key, PrivateKey};
use wgmesh_e2e::ControlPlane;
use wgmesh_e2e::cli::Cli;
use wgmesh_e2e::install::install_default_mesh;

fn wg_quick(endpoint: &str) -> String {
    let me = PrivateKey::from_bytes([1; 32]).expose_base64();
    let a = PrivateKey::from_bytes([2; 32]).public_key().to_base64();
    let b = PrivateKey::from_bytes([3; 32]).public_key().to_base64();
    let psk = Key::from_bytes([4; 32]).to_base64();
    format!(
        "[Interface]\nPrivateKey = {me}\nAddress = 10.8.0.1/24\n\n\
         # site-a\n[Peer]\nPublicKey = {a}\nAllowedIPs = 192.168.81.0/24\n\n\
         # site-b\n[Peer]\nPublicKey = {b}\nPresharedKey = {psk}\n\
         AllowedIPs = 192.168.82.0/24\nEndpoint = {endpoint}\n"
    )
}

#[tokio::test]
async fn import_apply_creates_everything_or_nothing() -> Result<()> {
    let cp = ControlPlane::start().await?;
    install_default_mesh(&cp)?;
    cp.kubectl_ok(&["create", "namespace", "wgmesh-secrets"])?;
    let cli = Cli::new(cp.kubeconfig())?;
    let client = cp.client().await?;
    let peers: Api<WireGuardPeer> = Api::all(client.clone());
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "wgmesh-secrets");
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("office.conf");
    let names = |list: Vec<WireGuardPeer>| -> Vec<String> {
        list.into_iter().filter_map(|p| p.metadata.name).collect()
    };

    // A port the CRD refuses (six digits) in the second peer, caught before the cluster is
    // asked: nothing is created, the first peer included.
    std::fs::write(&file, wg_quick("198.51.100.2:065535"))?;
    let out = cli.run(&["import", file.to_str().unwrap(), "--apply"])?;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing was created"),
        "{out:?}"
    );
    assert_eq!(
        names(peers.list(&Default::default()).await?.items),
        Vec::<String>::new()
    );

    // A good file: both peers, and site-b's Secret owned by its peer.
    std::fs::write(&file, wg_quick("198.51.100.2:51820"))?;
    cli.ok(&["import", file.to_str().unwrap(), "--apply"])?;
    let made = names(peers.list(&Default::default()).await?.items);
    assert_eq!(made.len(), 2, "{made:?}");
    let secret_list = secrets.list(&Default::default()).await?.items;
    assert_eq!(secret_list.len(), 1, "one preshared key");
    let owner = secret_list[0]
        .metadata
        .owner_references
        .clone()
        .unwrap_or_default();
    assert_eq!(owner.len(), 1, "{owner:?}");
    assert_eq!(owner[0].kind, "WireGuardPeer");
    assert!(made.contains(&owner[0].name), "{owner:?} {made:?}");

    // The peers deleted, the Secret still there (no garbage collector here, as when it is
    // slow): importing again creates nothing rather than half.
    for name in &made {
        peers.delete(name, &DeleteParams::default()).await?;
    }
    let out = cli.run(&["import", file.to_str().unwrap(), "--apply"])?;
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nothing was created"), "{stderr}");
    assert_eq!(
        names(peers.list(&Default::default()).await?.items),
        Vec::<String>::new()
    );

    // Refused only when it is really created (a policy that lets the dry run pass, as a
    // webhook or a quota could): what the import created is deleted again.
    for s in secrets.list(&Default::default()).await?.items {
        secrets
            .delete(
                &s.metadata.name.unwrap_or_default(),
                &DeleteParams::default(),
            )
            .await?;
    }
    let policy = dir.path().join("refuse-site-b.yaml");
    std::fs::write(&policy, REFUSE_SITE_B)?;
    cp.kubectl_ok(&["apply", "-f", policy.to_str().unwrap()])?;
    let probe: WireGuardPeer = serde_json::from_value(serde_json::json!({
        "apiVersion": "wgmesh.io/v1alpha1",
        "kind": "WireGuardPeer",
        "metadata": {"name": "site-b"},
        "spec": {"mesh": "default", "publicKey": PrivateKey::from_bytes([9; 32]).public_key().to_base64()},
    }))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match peers.create(&Default::default(), &probe).await {
            Err(e) if e.to_string().contains("refused for the test") => break,
            Ok(_) => {
                peers.delete("site-b", &DeleteParams::default()).await?;
            }
            Err(e) => return Err(e.into()),
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the test's policy is not enforced after 60 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let out = cli.run(&["import", file.to_str().unwrap(), "--apply"])?;
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nothing this import created was kept"),
        "{stderr}"
    );
    assert!(
        stderr.contains("WireGuardPeer site-a deleted again"),
        "{stderr}"
    );
    assert_eq!(
        names(peers.list(&Default::default()).await?.items),
        Vec::<String>::new()
    );
    assert!(
        secrets.list(&Default::default()).await?.items.is_empty(),
        "site-b's Secret is deleted again"
    );
    Ok(())
}

/// Refuses creating the WireGuardPeer `site-b`, except in a dry run.
const REFUSE_SITE_B: &str = r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: test-refuse-site-b
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
      - apiGroups: [wgmesh.io]
        apiVersions: ["*"]
        operations: [CREATE]
        resources: [wireguardpeers]
  validations:
    - expression: "request.dryRun || object.metadata.name != 'site-b'"
      message: refused for the test
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: test-refuse-site-b
spec:
  policyName: test-refuse-site-b
  validationActions: [Deny]
"#;
