//! `cargo xtask manifests`: deploy/manifests/wgmesh.yaml, rendered from the Helm chart.

use anyhow::{Context, Result, bail};
use wgmesh_e2e::helm::{Helm, manifests_path};

pub fn run(check: bool) -> Result<()> {
    let want = Helm::new()?.render_manifests()?;
    let path = manifests_path();
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have == want {
        println!("{} is up to date", path.display());
        return Ok(());
    }
    if check {
        bail!(
            "{} differs from the chart; run `cargo xtask manifests`",
            path.display()
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, want).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
