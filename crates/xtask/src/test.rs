//! `cargo xtask test`: everything, in the order that fails fastest.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::setup::{
    DEBIAN_PACKAGES, ensure_debian_packages, ensure_rust_components, repo_root, run_ok, step,
};

#[derive(clap::Args)]
pub struct Opts {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Run even when the disks seem to lack the space the run needs.
    #[arg(long)]
    no_disk_check: bool,
    /// Extra arguments passed to `cargo test` (a test name filter, for example).
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

pub fn run(opts: &Opts) -> Result<()> {
    let started = Instant::now();
    let root = repo_root();

    step("checking tools: Rust components and Debian packages");
    ensure_rust_components()?;
    ensure_debian_packages(DEBIAN_PACKAGES)?;

    step("free disk space");
    if opts.no_disk_check {
        eprintln!("    skipped (--no-disk-check)");
    } else {
        crate::disk::check(crate::disk::test_needs(&crate::disk::target_dir(&root)))?;
    }

    if !opts.no_lint {
        step("cargo fmt --check");
        run_ok(
            Command::new("cargo")
                .current_dir(&root)
                .args(["fmt", "--all", "--check"]),
        )?;
        step("cargo clippy --workspace --all-targets -- -D warnings");
        run_ok(Command::new("cargo").current_dir(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }

    step("crds/ matches the Rust types");
    crate::crdgen::run(true)?;

    // Built here, with progress on the terminal, rather than inside a test whose output is
    // captured: a cold build takes minutes.
    step(
        "Kubernetes binaries (etcd, kube-apiserver, kubectl, and the real cluster's kubelet, kube-proxy, kube-scheduler, kube-controller-manager): cached or built from the Go module proxy",
    );
    let bins = wgmesh_e2e::tools::control_plane_binaries()?;
    eprintln!("    etcd:           {}", bins.etcd.display());
    eprintln!("    kube-apiserver: {}", bins.kube_apiserver.display());
    eprintln!("    kubectl:        {}", bins.kubectl.display());
    let cluster = wgmesh_e2e::tools::cluster_binaries()?;
    eprintln!("    kubelet:        {}", cluster.kubelet.display());
    // The real cluster's image holds our release binaries, as deploy/Dockerfile builds them;
    // built here with cargo's progress rather than silently inside a test.
    step("release binaries for the image the real cluster runs (cargo build --release)");
    run_ok(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "wgmesh-controller",
        "-p",
        "wgmesh-node-agent",
    ]))?;
    step("helm: cached or built from the Go module proxy");
    let helm = wgmesh_e2e::helm::Helm::new()?;
    eprintln!("    helm:           {}", helm.binary.display());

    // `-- kernel_vm_` selects only the kernel VM lane: the rest is skipped.
    let kernel_only = crate::kernel_lane::only_this_lane(&opts.cargo_test_args);
    let mut totals = if kernel_only {
        step("cargo test --workspace: skipped (the filters select only the kernel VM lane)");
        Totals::default()
    } else {
        step("cargo test --workspace (unit, integration and end-to-end tests)");
        cargo_test(&root, &opts.cargo_test_args)?
    };

    step("kernel VM lane: the kernel backend on Debian's kernel under QEMU (tests/e2e/src/vm)");
    match crate::kernel_lane::run(&root, &opts.cargo_test_args) {
        Ok(lane) => {
            totals.passed += lane.passed;
            totals.failed += lane.failed;
            totals.ignored += lane.ignored;
        }
        Err(e) => {
            println!(
                "xtask: {} passed, {} failed, {} skipped",
                totals.passed,
                totals.failed.max(1),
                totals.ignored
            );
            return Err(e);
        }
    }

    if !kernel_only {
        step(&format!(
            "fuzzing the wg-quick parser and the agents' gRPC requests, {FUZZ_SECONDS} s each (cargo +nightly fuzz)"
        ));
        fuzz(&root)?;
    }
    eprintln!("\nall checks passed in {:.0?}", started.elapsed());
    println!(
        "xtask: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    Ok(())
}

/// How long `cargo xtask test` fuzzes each target.
const FUZZ_SECONDS: u32 = 30;
/// The fuzz targets (`fuzz/fuzz_targets/`) and what each finding means.
const FUZZ_TARGETS: &[(&str, &str)] = &[
    ("wgquick_parse", "the wg-quick parser"),
    (
        "grpc_requests",
        "the controller's checks of agent requests (wgmesh_proto::checked)",
    ),
];
/// The cargo-fuzz release installed when it is missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Runs each fuzz target for a while; a crash fails the run. Skipped, with the reason printed,
/// only when no nightly toolchain or cargo-fuzz can be had.
fn fuzz(root: &Path) -> Result<()> {
    let nightly = Command::new("cargo")
        .args(["+nightly", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !nightly {
        eprintln!("    skipped: no nightly toolchain (`rustup toolchain install nightly`)");
        return Ok(());
    }
    let has_cargo_fuzz = || {
        Command::new("cargo")
            .args(["fuzz", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_cargo_fuzz() {
        eprintln!("    installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        let installed = Command::new("cargo")
            .args([
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
            ])
            .status();
        if !installed.is_ok_and(|s| s.success()) || !has_cargo_fuzz() {
            eprintln!("    skipped: cargo-fuzz could not be installed");
            return Ok(());
        }
    }
    for (target, what) in FUZZ_TARGETS {
        eprintln!("    {target}: {what}");
        run_ok(Command::new("cargo").current_dir(root).args([
            "+nightly",
            "fuzz",
            "run",
            target,
            "--",
            &format!("-max_total_time={FUZZ_SECONDS}"),
        ]))
        .with_context(|| format!("fuzzing {what} found a crash (see fuzz/artifacts/{target}/)"))?;
    }
    Ok(())
}

#[derive(Default, Debug, PartialEq)]
pub(crate) struct Totals {
    pub(crate) passed: u64,
    pub(crate) failed: u64,
    pub(crate) ignored: u64,
}

/// Runs `cargo test`, echoing its output, and adds up its `test result:` lines.
fn cargo_test(root: &Path, extra: &[String]) -> Result<Totals> {
    let mut child = Command::new("cargo")
        .current_dir(root)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(t) = parse_test_result(&line) {
            totals.passed += t.passed;
            totals.failed += t.failed;
            totals.ignored += t.ignored;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        println!(
            "xtask: {} passed, {} failed, {} skipped",
            totals.passed,
            totals.failed.max(1),
            totals.ignored
        );
        bail!("cargo test failed ({status})");
    }
    Ok(totals)
}

/// Parses `test result: ok. 8 passed; 0 failed; 1 ignored; ...`.
pub(crate) fn parse_test_result(line: &str) -> Option<Totals> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut totals = Totals::default();
    for part in rest.split(['.', ';']) {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match what {
            "passed" => totals.passed = n,
            "failed" => totals.failed = n,
            "ignored" => totals.ignored = n,
            _ => {}
        }
    }
    Some(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cargo_test_summaries() {
        assert_eq!(
            parse_test_result(
                "test result: ok. 8 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s"
            ),
            Some(Totals {
                passed: 8,
                failed: 0,
                ignored: 1
            })
        );
        assert_eq!(
            parse_test_result("test result: FAILED. 0 passed; 2 failed; 0 ignored"),
            Some(Totals {
                passed: 0,
                failed: 2,
                ignored: 0
            })
        );
        assert_eq!(parse_test_result("running 3 tests"), None);
    }
}
