//! `cargo xtask crdgen`: crds/*.yaml from the Rust types.

use std::fs;

use anyhow::{Context, Result, bail};

use crate::setup::repo_root;

pub fn run(check: bool) -> Result<()> {
    let dir = repo_root().join("crds");
    fs::create_dir_all(&dir)?;
    let mut stale = Vec::new();
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
    if !stale.is_empty() {
        bail!(
            "these CRDs differ from the Rust types; run `cargo xtask crdgen`: {}",
            stale.join(", ")
        );
    }
    Ok(())
}
