//! `cargo xtask crdgen`: crds/*.yaml from the Rust types, and the same files in the Helm
//! chart's crds/ (Helm installs CRDs only from there).

use std::fs;

use anyhow::{Context, Result, bail};

use crate::setup::repo_root;

pub fn run(check: bool) -> Result<()> {
    let mut stale = Vec::new();
    for dir in [
        repo_root().join("crds"),
        repo_root().join("deploy/helm/wgmesh/crds"),
    ] {
        fs::create_dir_all(&dir)?;
        write_dir(&dir, check, &mut stale)?;
    }
    if !stale.is_empty() {
        bail!(
            "these CRDs differ from the Rust types; run `cargo xtask crdgen`: {}",
            stale.join(", ")
        );
    }
    Ok(())
}

fn write_dir(dir: &std::path::Path, check: bool, stale: &mut Vec<String>) -> Result<()> {
    for (file, crd) in wgmesh_api::crds() {
        let path = dir.join(file);
        let want = wgmesh_api::crd_yaml(&crd);
        let have = fs::read_to_string(&path).unwrap_or_default();
        if have == want {
            continue;
        }
        if check {
            stale.push(path.display().to_string());
        } else {
            fs::write(&path, want).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
