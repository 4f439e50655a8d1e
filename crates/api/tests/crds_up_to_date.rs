//! crds/*.yaml, and their copies in the Helm chart, must be exactly what the Rust types
//! generate (`cargo xtask crdgen`).

use std::path::Path;

#[test]
fn checked_in_crds_match_the_rust_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (dir, file, crd) in ["crds", "deploy/helm/wgmesh/crds"]
        .into_iter()
        .flat_map(|d| {
            let dir = root.join(d);
            wgmesh_api::crds()
                .into_iter()
                .map(move |(f, c)| (dir.clone(), f, c))
        })
    {
        let path = dir.join(file);
        let have = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        assert!(
            have == wgmesh_api::crd_yaml(&crd),
            "{} differs from the Rust types in crates/api; run `cargo xtask crdgen`",
            path.display()
        );
    }
}

#[test]
fn crd_names_and_scope() {
    for (file, crd) in wgmesh_api::crds() {
        let name = crd.metadata.name.clone().unwrap();
        assert_eq!(
            file,
            format!("wgmesh.io_{}.yaml", name.trim_end_matches(".wgmesh.io"))
        );
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.group, "wgmesh.io");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        assert!(
            crd.spec
                .names
                .categories
                .as_ref()
                .unwrap()
                .contains(&"wgmesh".to_owned())
        );
    }
}
