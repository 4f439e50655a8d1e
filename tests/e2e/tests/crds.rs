//! The CRDs against a real API server: they install and become Established, the examples are
//! accepted, every invalid sample is refused with a message naming its field, and `kubectl get`
//! shows the printer columns.

use std::fs;

use anyhow::Result;
use wgmesh_e2e::ControlPlane;
use wgmesh_e2e::install::{install_crds, repo_root};

#[tokio::test]
async fn crds_examples_and_invalid_objects_against_a_real_api_server() -> Result<()> {
    let cp = ControlPlane::start().await?;
    install_crds(&cp)?;

    // Valid samples are accepted.
    let examples = repo_root().join("deploy/examples");
    let mut example_files: Vec<_> = fs::read_dir(&examples)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    example_files.sort();
    assert!(example_files.len() >= 4, "examples are missing");
    for path in &example_files {
        cp.kubectl_ok(&["apply", "-f", &path.display().to_string()])
            .map_err(|e| anyhow::anyhow!("{} was refused: {e}", path.display()))?;
    }

    // Invalid samples are refused, each with a message naming the field its header names.
    let invalid = repo_root().join("tests/e2e/testdata/invalid");
    let mut invalid_files: Vec<_> = fs::read_dir(&invalid)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    invalid_files.sort();
    assert!(
        invalid_files.len() >= 15,
        "need at least 15 invalid samples"
    );
    let mut failures = Vec::new();
    for path in &invalid_files {
        let text = fs::read_to_string(path)?;
        let field = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no '# expect: FIELD' header", path.display()))
            .trim()
            .to_owned();
        let out = cp.kubectl(&["apply", "-f", &path.display().to_string()])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let name = path.file_name().unwrap().to_string_lossy();
        if out.status.success() {
            failures.push(format!(
                "{name}: accepted, expected a refusal naming {field}"
            ));
        } else if !stderr.contains(&field) {
            failures.push(format!("{name}: refused without naming {field}: {stderr}"));
        } else {
            eprintln!("{name}: refused: {}", stderr.trim());
        }
    }
    assert!(
        failures.is_empty(),
        "invalid samples:\n{}",
        failures.join("\n")
    );

    // A mesh's interface name cannot change.
    let renamed = cp.kubectl(&[
        "patch",
        "wireguardmesh",
        "default",
        "--type=merge",
        "-p",
        r#"{"spec":{"interfaceName":"wgmesh9"}}"#,
    ])?;
    let stderr = String::from_utf8_lossy(&renamed.stderr);
    assert!(
        !renamed.status.success() && stderr.contains("interfaceName cannot change"),
        "renaming the interface: {stderr}"
    );
    // Other fields still can.
    cp.kubectl_ok(&[
        "patch",
        "wireguardmesh",
        "default",
        "--type=merge",
        "-p",
        r#"{"spec":{"listenPort":51821}}"#,
    ])?;

    // `kubectl get` shows the printer columns.
    let peers = cp.kubectl_ok(&["get", "wgpeers"])?;
    let header = peers.lines().next().unwrap_or_default();
    for column in [
        "NAME",
        "MESH",
        "NODE",
        "ADDRESS",
        "ENDPOINT",
        "READY",
        "HANDSHAKE",
        "AGE",
    ] {
        assert!(
            header.contains(column),
            "column {column} missing in:\n{peers}"
        );
    }
    assert!(peers.contains("alice-laptop") && peers.contains("berlin-office"));
    let wide = cp.kubectl_ok(&["get", "wgpeers", "-o", "wide"])?;
    assert!(wide.contains("PUBLIC KEY") && wide.contains("192.168.50.0/24"));

    let meshes = cp.kubectl_ok(&["get", "wgmeshes"])?;
    for column in [
        "INTERFACE",
        "PORT",
        "BACKEND",
        "TUNNEL CIDRS",
        "NODES",
        "READY",
    ] {
        assert!(
            meshes.contains(column),
            "column {column} missing in:\n{meshes}"
        );
    }
    // Defaults are applied by the API server.
    let default_mesh = cp.kubectl_ok(&[
        "get",
        "wireguardmesh",
        "default",
        "-o",
        "jsonpath={.spec.backend}",
    ])?;
    assert_eq!(default_mesh, "auto");
    // The category `wgmesh` lists every wgmesh object at once (kubectl expands a category
    // before it looks at short names, so one mesh is `wgmeshes NAME` or `wireguardmesh NAME`).
    let by_category = cp.kubectl_ok(&["get", "wgmesh", "-o", "name"])?;
    assert!(
        by_category.contains("wireguardmesh.wgmesh.io/default")
            && by_category.contains("wireguardpeer.wgmesh.io/alice-laptop"),
        "category listing:\n{by_category}"
    );
    Ok(())
}
