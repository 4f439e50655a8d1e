//! Free disk space, checked before `cargo xtask test` builds anything big.
//!
//! A full disk does not fail one step clearly: it shows up deep in the run as an etcd that
//! cannot preallocate its WAL, a linker killed half-way, or a truncated log. So the run first
//! adds up what it will write on each filesystem and stops at once, naming the paths and
//! sizes, when that does not fit.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use nix::sys::statvfs::statvfs;
use wgmesh_e2e::tools::{self, GoTool};

const GB: u64 = 1_000_000_000;

/// Something the run writes, where, and at most how much. The sizes are measured peaks with
/// headroom (see the constants' comments).
#[derive(Debug, Clone, PartialEq)]
pub struct Need {
    pub what: &'static str,
    pub path: PathBuf,
    pub bytes: u64,
}

/// A clean clone's `cargo xtask test` left 4.1 GB in target/ (line-table debug info, no
/// incremental caches, as `.ci/run` builds) and 0.3 GB in fuzz/target; the release build of
/// the two binaries for the real cluster's image adds about 1 GB.
const CLEAN_BUILD: u64 = 7 * GB;
/// Rebuilding what changed in an existing target/.
const REBUILD: u64 = 2 * GB;
/// The end-to-end tests' control planes (etcd preallocates a 64 MB WAL), meshes and logs,
/// with two tests at a time, and a real cluster's images in three nodes' containerd.
const SCRATCH: u64 = 2 * GB;
/// A cold build of etcd, helm and the six Kubernetes programs: Go's module and build caches
/// in the temporary directory (4.3 GB for kube-apiserver and kubectl alone; the other four
/// share most of their packages), removed after, then about 500 MB of binaries.
const GO_BUILD: u64 = 6 * GB;

/// Cargo's target directory for the repository at `root`.
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// What `cargo xtask test` will write, given cargo's target directory.
pub fn test_needs(target: &Path) -> Vec<Need> {
    // Not target/debug/deps: `cargo xtask` has built itself there before this runs. The
    // agent's binary comes only from building the workspace's tests.
    let built = target.join("debug").join("wgmesh-agent").is_file();
    let mut needs = vec![
        Need {
            what: if built {
                "rebuilding what changed"
            } else {
                "a clean build of the workspace and the fuzz target"
            },
            path: target.to_owned(),
            bytes: if built { REBUILD } else { CLEAN_BUILD },
        },
        Need {
            what: "the end-to-end tests' control planes and meshes",
            path: std::env::temp_dir(),
            bytes: SCRATCH,
        },
    ];
    if !wgmesh_e2e::vm::is_prepared() {
        needs.push(Need {
            what: "Debian's kernel for the kernel VM lane (a 71 MB .deb, 430 MB unpacked)",
            path: tools::cache_dir(),
            bytes: GB,
        });
    }
    if !tools::TEST_TOOLS.iter().all(GoTool::is_cached) {
        needs.push(Need {
            what: "building etcd, the six Kubernetes programs and helm with Go",
            path: std::env::temp_dir(),
            bytes: GO_BUILD,
        });
    }
    needs
}

/// One filesystem's free space.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Space {
    pub filesystem: u64,
    pub free: u64,
}

/// A filesystem without room for what goes on it.
#[derive(Debug, PartialEq)]
pub struct Shortfall {
    pub needs: Vec<Need>,
    pub free: u64,
}

impl Shortfall {
    pub fn needed(&self) -> u64 {
        self.needs.iter().map(|n| n.bytes).sum()
    }
}

/// Adds up the needs on each filesystem and returns those that do not fit.
pub fn shortfalls(needs: &[(Need, Space)]) -> Vec<Shortfall> {
    let mut by_fs: Vec<(Space, Vec<Need>)> = Vec::new();
    for (need, space) in needs {
        match by_fs
            .iter_mut()
            .find(|(s, _)| s.filesystem == space.filesystem)
        {
            Some((_, group)) => group.push(need.clone()),
            None => by_fs.push((*space, vec![need.clone()])),
        }
    }
    by_fs
        .into_iter()
        .map(|(space, needs)| Shortfall {
            needs,
            free: space.free,
        })
        .filter(|s| s.needed() > s.free)
        .collect()
}

/// Checks the needs against the disks; prints what it found, fails on a shortfall.
pub fn check(needs: Vec<Need>) -> Result<()> {
    let mut measured = Vec::new();
    for need in needs {
        let space = space_at(&need.path)?;
        eprintln!(
            "    {}: {:.1} GB free, {:.1} GB for {}",
            need.path.display(),
            space.free as f64 / GB as f64,
            need.bytes as f64 / GB as f64,
            need.what
        );
        measured.push((need, space));
    }
    let short = shortfalls(&measured);
    if short.is_empty() {
        return Ok(());
    }
    let mut msg = String::from("not enough free disk space for this run:");
    for s in &short {
        msg.push_str(&format!(
            "\n  {:.1} GB needed, {:.1} GB free, for:",
            s.needed() as f64 / GB as f64,
            s.free as f64 / GB as f64
        ));
        for n in &s.needs {
            msg.push_str(&format!("\n    {} ({})", n.what, n.path.display()));
        }
    }
    msg.push_str(
        "\nfree some space (`cargo clean` in other checkouts, old /tmp/wgmesh-* directories) \
         or skip this check with --no-disk-check",
    );
    bail!(msg)
}

/// statvfs of the path, or of its nearest existing ancestor (target/ may not exist yet).
fn space_at(path: &Path) -> Result<Space> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let st =
        statvfs(existing).map_err(|e| anyhow::anyhow!("statvfs {}: {e}", existing.display()))?;
    Ok(Space {
        filesystem: st.filesystem_id(),
        free: st.blocks_available() * st.fragment_size(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(what: &'static str, bytes: u64) -> Need {
        Need {
            what,
            path: PathBuf::from("/x"),
            bytes,
        }
    }

    fn fs(filesystem: u64, free: u64) -> Space {
        Space { filesystem, free }
    }

    #[test]
    fn adds_up_needs_per_filesystem() {
        struct Case {
            name: &'static str,
            needs: Vec<(Need, Space)>,
            short: Vec<(u64, Vec<&'static str>)>,
        }
        let cases = [
            Case {
                name: "everything fits",
                needs: vec![
                    (need("build", 6), fs(1, 10)),
                    (need("scratch", 1), fs(2, 1)),
                ],
                short: vec![],
            },
            Case {
                name: "each fits alone, not together on one filesystem",
                needs: vec![(need("build", 6), fs(1, 7)), (need("scratch", 2), fs(1, 7))],
                short: vec![(8, vec!["build", "scratch"])],
            },
            Case {
                name: "only the full filesystem is named",
                needs: vec![(need("build", 6), fs(1, 5)), (need("scratch", 1), fs(2, 9))],
                short: vec![(6, vec!["build"])],
            },
            Case {
                name: "exactly full fits",
                needs: vec![(need("build", 6), fs(1, 6))],
                short: vec![],
            },
            Case {
                name: "nothing needed",
                needs: vec![],
                short: vec![],
            },
        ];
        for case in cases {
            let got: Vec<(u64, Vec<&str>)> = shortfalls(&case.needs)
                .iter()
                .map(|s| (s.needed(), s.needs.iter().map(|n| n.what).collect()))
                .collect();
            assert_eq!(got, case.short, "{}", case.name);
        }
    }

    #[test]
    fn a_target_with_only_xtask_in_it_needs_a_clean_build() {
        let target = tempfile::tempdir().unwrap();
        let debug = target.path().join("debug");
        std::fs::create_dir_all(debug.join("deps")).unwrap();
        std::fs::write(debug.join("xtask"), "").unwrap();
        assert_eq!(test_needs(target.path())[0].bytes, CLEAN_BUILD);
        std::fs::write(debug.join("wgmesh-agent"), "").unwrap();
        assert_eq!(test_needs(target.path())[0].bytes, REBUILD);
    }

    #[test]
    fn measures_the_nearest_existing_directory() {
        let space = space_at(Path::new("/tmp/wgmesh-does-not-exist/target")).unwrap();
        assert_eq!(
            space.filesystem,
            space_at(Path::new("/tmp")).unwrap().filesystem
        );
    }
}
