//! The kernel VM lane of `cargo xtask test`: the `kernel_vm` tests of tests/e2e, which boot
//! Debian's kernel (with WireGuard) under QEMU and run the kernel backend's tests inside
//! (see `wgmesh_e2e::vm`). Ends with `kernel VM lane: N tests ran in the VM`, N counted inside
//! the VM (a test skipped there does not count).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use wgmesh_e2e::vm::{self, lane};

use crate::setup::ensure_debian_packages;

/// The lane's outcome: libtest's totals on the host, and the tests that ran in the VM.
pub struct LaneResult {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    pub ran_in_vm: u64,
}

/// Whether the test filters given to `cargo xtask test` select only this lane's tests
/// (`cargo xtask test -- kernel_vm_`): then the rest of the run is skipped.
pub fn only_this_lane(cargo_test_args: &[String]) -> bool {
    let filters: Vec<&String> = cargo_test_args
        .iter()
        .filter(|a| !a.starts_with('-'))
        .collect();
    !filters.is_empty() && filters.iter().all(|f| f.starts_with("kernel_vm"))
}

pub fn run(root: &Path, cargo_test_args: &[String]) -> Result<LaneResult> {
    let started = Instant::now();
    ensure_debian_packages(vm::HOST_PACKAGES)?;
    let prepared = vm::is_prepared();
    let kernel = vm::prepare()?;
    eprintln!(
        "    kernel {} ({}): {}",
        kernel.release,
        if prepared { "cached" } else { "prepared now" },
        kernel.dir.display()
    );
    let report = tempfile_path()?;
    // One VM at a time: on two cores, two emulated CPUs only slow each other down.
    let mut child = Command::new("cargo")
        .current_dir(root)
        .args(["test", "-p", "wgmesh-e2e", "--test", "kernel_vm", "--"])
        .args(cargo_test_args)
        .args(
            (!cargo_test_args
                .iter()
                .any(|a| a.starts_with("--test-threads")))
            .then_some("--test-threads=1"),
        )
        .env(lane::LANE_REPORT_ENV, &report)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test --test kernel_vm")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut result = LaneResult {
        passed: 0,
        failed: 0,
        ignored: 0,
        ran_in_vm: 0,
    };
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(t) = crate::test::parse_test_result(&line) {
            result.passed += t.passed;
            result.failed += t.failed;
            result.ignored += t.ignored;
        }
    }
    let status = child.wait()?;
    let entries = lane::read_report(&report);
    let _ = std::fs::remove_file(&report);
    for e in &entries {
        eprintln!(
            "    {}: {} test(s) ran in the VM, {:.1} s",
            e.test, e.ran_in_vm, e.seconds
        );
    }
    result.ran_in_vm = entries.iter().map(|e| e.ran_in_vm).sum();
    eprintln!(
        "    the kernel VM lane took {:.0?} (wall time)",
        started.elapsed()
    );
    println!("kernel VM lane: {} tests ran in the VM", result.ran_in_vm);
    if !status.success() {
        bail!("the kernel VM lane failed ({status})");
    }
    Ok(result)
}

fn tempfile_path() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("wgmesh-vm-lane-{}.tsv", std::process::id()));
    let _ = std::fs::remove_file(&path);
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_vm_filter_selects_only_the_lane() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(only_this_lane(&args(&["kernel_vm_"])));
        assert!(only_this_lane(&args(&["--nocapture", "kernel_vm_mesh"])));
        assert!(!only_this_lane(&args(&[])));
        assert!(!only_this_lane(&args(&["kernel_vm_", "mesh_"])));
        assert!(!only_this_lane(&args(&["--nocapture"])));
    }
}
