//! The host side of the kernel VM lane's tests: running a test binary's tests inside the VM,
//! failing with everything it printed, and reporting how many really ran there.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{VmJob, VmOutput, prepare, run};

/// Where the host-side tests append `<test>\t<tests ran in the VM>\t<seconds>` lines, when
/// set (by `cargo xtask test`, which adds them up).
pub const LANE_REPORT_ENV: &str = "WGMESH_VM_LANE_REPORT";

/// Runs `exe ARGS` (a libtest binary) in a VM with `env`, and fails unless it succeeded.
pub fn run_test_binary(
    exe: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<VmOutput> {
    let kernel = prepare()?;
    let mut job = VmJob::new(exe, args).timeout(timeout);
    for (k, v) in env {
        job = job.env(k, v);
    }
    let out = run(&kernel, &job)?;
    eprintln!(
        "[wgmesh] VM ({}, kernel {}): boot {:?}, run {:.1?}, {}",
        out.accel, kernel.release, out.boot, out.elapsed, out.exit
    );
    if !out.success() {
        bail!(
            "{} in the VM: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- console (tail) ---\n{}",
            exe.display(),
            out.exit,
            out.stdout,
            out.stderr,
            out.console_tail(30)
        );
    }
    Ok(out)
}

/// Records a host-side test's result for the lane summary (and prints it).
pub fn report(test: &str, ran_in_vm: usize, started: Instant) {
    let secs = started.elapsed().as_secs_f64();
    eprintln!("[wgmesh] {test}: {ran_in_vm} test(s) ran in the VM, {secs:.1} s in all");
    if let Some(path) = std::env::var_os(LANE_REPORT_ENV)
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{test}\t{ran_in_vm}\t{secs:.1}");
    }
}

/// One line of the lane report.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneEntry {
    pub test: String,
    pub ran_in_vm: u64,
    pub seconds: f64,
}

pub fn read_report(path: &Path) -> Vec<LaneEntry> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(LaneEntry {
                test: f.next()?.to_owned(),
                ran_in_vm: f.next()?.parse().ok()?,
                seconds: f.next()?.parse().ok()?,
            })
        })
        .collect()
}

/// Builds a test target of a workspace package (`cargo test --no-run`) into the running test
/// binary's target directory, and returns its executable.
pub fn build_test_binary(package: &str, test: &str) -> Result<PathBuf> {
    let profile_dir = crate::binaries::profile_dir()?;
    let mut cmd = crate::binaries::cargo_command();
    cmd.args([
        "test",
        "--quiet",
        "-p",
        package,
        "--test",
        test,
        "--no-run",
        "--message-format=json",
    ]);
    if profile_dir.ends_with("release") {
        cmd.arg("--release");
    }
    if let Some(target_dir) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target_dir);
    }
    let out = cmd.output().context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "cargo test -p {package} --test {test} --no-run failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == test)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .with_context(|| format!("cargo built no executable for {package} --test {test}"))
}
