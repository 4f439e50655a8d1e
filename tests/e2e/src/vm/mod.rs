//! The kernel VM lane: commands (test binaries, mostly) run inside a QEMU VM booting Debian's
//! stock kernel, which has WireGuard; the build machines' own kernel has none.
//!
//! The guest's root is the host's own root filesystem, read-only over 9p under a tmpfs overlay,
//! so every binary built or installed on the host runs inside unchanged; the job directory is
//! shared writable at its host path. QEMU's user-mode network lets the guest reach services on
//! the host's loopback at [`HOST_FROM_GUEST`]. Without hardware virtualization (the build
//! machines' `/dev/kvm` is nested PVM, unusable for a stock kernel) QEMU emulates the CPU (TCG):
//! compiled code runs ~5x slower, spawning processes ~30x.
//!
//! [`prepare`] builds the kernel and initramfs once into the cache; [`run`] boots a VM for one
//! command. `cargo xtask vm run -- CMD ARGS` is the same from the command line, and
//! `tests/e2e/tools/vm-runner.sh` makes it a cargo runner.

pub mod guest;
pub mod lane;
mod prepare;

use std::fmt;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

pub use prepare::{
    HOST_PACKAGES, KernelVm, cache_entry, current_metapackage_kernel, ensure_host_tools,
    is_prepared, prepare,
};

/// The environment variable set inside the VM (to `1`).
pub const IN_VM_ENV: &str = "WGMESH_IN_VM";
/// The job directory, shared with the host, inside the VM.
pub const JOB_ENV: &str = "WGMESH_VM_JOB";
/// The host as the guest sees it (QEMU user-mode networking's gateway).
pub const HOST_FROM_GUEST: &str = "10.0.2.2";
/// The file in the job directory where tests that really ran inside record their names.
const RAN_FILE: &str = "ran";

/// Variables passed into the VM from the caller's environment, besides those a job names.
const PASSED_ENV: &[&str] = &[
    "RUST_LOG",
    "RUST_BACKTRACE",
    "RUST_TEST_THREADS",
    "NO_COLOR",
];
/// Prefixes of variables passed as well.
const PASSED_ENV_PREFIXES: &[&str] = &["WGMESH_"];

/// Whether this process runs inside the kernel VM.
pub fn in_vm() -> bool {
    std::env::var_os(IN_VM_ENV).is_some_and(|v| v == "1")
}

/// Records that the test `name` really ran inside the VM (a skipped one must not call this):
/// the host counts these lines.
pub fn record_ran(name: &str) {
    if let Some(job) = std::env::var_os(JOB_ENV) {
        use std::io::Write;
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&job).join(RAN_FILE))
        {
            let _ = writeln!(f, "{name}");
        }
    }
}

/// One command to run inside a VM.
#[derive(Debug, Clone)]
pub struct VmJob {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The working directory inside (the host's, by default).
    pub cwd: PathBuf,
    /// Variables set inside, on top of the passed ones.
    pub env: Vec<(String, String)>,
    /// The VM is killed after this long, and the run reported as a timeout.
    pub timeout: Duration,
    pub memory_mib: u32,
    pub cpus: u32,
}

impl VmJob {
    pub fn new(program: impl Into<PathBuf>, args: &[&str]) -> Self {
        VmJob {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            cwd: std::env::current_dir().unwrap_or_else(|_| "/".into()),
            env: Vec::new(),
            timeout: Duration::from_secs(600),
            memory_mib: 1024,
            cpus: std::env::var("WGMESH_VM_CPUS")
                .ok()
                .and_then(|c| c.parse().ok())
                .unwrap_or(1),
        }
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The command exited with this code.
    Code(i32),
    /// The VM was still running at the deadline and was killed.
    Timeout(Duration),
    /// The VM stopped without the command's exit code (boot failure, kernel panic).
    NoExitCode,
}

impl fmt::Display for VmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmExit::Code(c) => write!(f, "exit code {c}"),
            VmExit::Timeout(t) => write!(f, "timed out after {t:?} (VM killed)"),
            VmExit::NoExitCode => write!(f, "the VM stopped without an exit code"),
        }
    }
}

/// What a VM run produced.
#[derive(Debug, Clone)]
pub struct VmOutput {
    pub exit: VmExit,
    pub stdout: String,
    pub stderr: String,
    /// The serial console (kernel messages and init's own).
    pub console: String,
    /// Guest uptime when the command started (the boot), from the console.
    pub boot: Option<Duration>,
    /// Wall time of the whole run, QEMU start to exit.
    pub elapsed: Duration,
    /// Tests that recorded themselves with [`record_ran`].
    pub ran: Vec<String>,
    pub accel: &'static str,
}

impl VmOutput {
    pub fn success(&self) -> bool {
        self.exit == VmExit::Code(0)
    }

    /// The last `lines` lines of the console, for failure messages.
    pub fn console_tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self.console.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// KVM where the CPU advertises hardware virtualization and /dev/kvm is usable, else TCG.
/// `WGMESH_VM_ACCEL=tcg|kvm` forces one.
fn accel() -> &'static str {
    match std::env::var("WGMESH_VM_ACCEL").as_deref() {
        Ok("tcg") => return "tcg",
        Ok("kvm") => return "kvm",
        _ => {}
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let kvm_usable = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if hw && kvm_usable { "kvm" } else { "tcg" }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Boots a VM with the prepared kernel and runs `job` in it.
pub fn run(vm: &KernelVm, job: &VmJob) -> Result<VmOutput> {
    // Removed on drop; a killed run's is removed by a later one.
    let dir =
        crate::scratch::ScratchDir::new("wgmesh-vm-job-").context("creating the job directory")?;
    let jd = dir.path().to_owned();
    let mut script = String::from("#!/bin/sh\n");
    script.push_str(
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root\n",
    );
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            PASSED_ENV.contains(&k.as_str()) || PASSED_ENV_PREFIXES.iter().any(|p| k.starts_with(p))
        })
        .collect();
    env.extend(job.env.iter().cloned());
    env.push((IN_VM_ENV.into(), "1".into()));
    env.push((JOB_ENV.into(), jd.display().to_string()));
    for (k, v) in &env {
        script.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    script.push_str(&format!(
        "cd {} || exit 126\n",
        shell_quote(&job.cwd.display().to_string())
    ));
    script.push_str(&shell_quote(&job.program.display().to_string()));
    for a in &job.args {
        script.push(' ');
        script.push_str(&shell_quote(a));
    }
    script.push_str(&format!(
        " >{} 2>{}\n",
        shell_quote(&jd.join("stdout").display().to_string()),
        shell_quote(&jd.join("stderr").display().to_string())
    ));
    fs::write(jd.join("run.sh"), script)?;

    let accel = accel();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "pc", "-display", "none", "-no-reboot", "-nodefaults"]);
    if accel == "kvm" {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg,tb-size=256", "-cpu", "max"]);
    }
    cmd.args(["-m", &job.memory_mib.to_string()])
        .args(["-smp", &job.cpus.to_string()])
        .arg("-serial")
        .arg(format!("file:{}", jd.join("console.log").display()))
        .arg("-kernel")
        .arg(&vm.vmlinux)
        .arg("-initrd")
        .arg(&vm.initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 loglevel=3 panic=-1 wgmesh.job={} wgmesh.modules={}",
            jd.display(),
            vm.modules.display()
        ))
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=job,security_model=none",
            jd.display()
        ))
        .args(["-netdev", "user,id=n0"])
        .args(["-device", "virtio-net-pci,netdev=n0,romfile="])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(jd.join("qemu.log"))?);
    // The VM dies with the thread that started it, also when the test process is killed
    // before it could stop it.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let deadline = started + job.timeout;
    let timed_out = loop {
        if child.try_wait()?.is_some() {
            break false;
        }
        if Instant::now() >= deadline {
            // Only the QEMU process we started.
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = started.elapsed();
    let read = |name: &str| fs::read_to_string(jd.join(name)).unwrap_or_default();
    let mut console = read("console.log");
    let qemu_log = read("qemu.log");
    if !qemu_log.trim().is_empty() {
        console.push_str("\n--- qemu ---\n");
        console.push_str(&qemu_log);
    }
    let exit = if timed_out {
        VmExit::Timeout(job.timeout)
    } else {
        match read("exit_code").trim().parse() {
            Ok(code) => VmExit::Code(code),
            Err(_) => VmExit::NoExitCode,
        }
    };
    let boot = console.lines().find_map(|l| {
        let rest = l.split("wgmesh-vm: ready after ").nth(1)?;
        let secs: f64 = rest.trim_end_matches(" s").trim().parse().ok()?;
        Some(Duration::from_secs_f64(secs))
    });
    Ok(VmOutput {
        exit,
        stdout: read("stdout"),
        stderr: read("stderr"),
        console,
        boot,
        elapsed,
        ran: read(RAN_FILE).lines().map(str::to_owned).collect(),
        accel,
    })
}

/// Counts the tests libtest says passed in `output` (`test result: ok. N passed; ...`).
pub fn passed_tests(output: &str) -> u64 {
    output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("test result: "))
        .filter_map(|rest| {
            rest.split(['.', ';']).find_map(|part| {
                let mut w = part.split_whitespace();
                match (w.next()?.parse::<u64>().ok(), w.next()?) {
                    (Some(n), "passed") => Some(n),
                    _ => None,
                }
            })
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_passed_tests() {
        let out =
            "running 2 tests\ntest a ... ok\ntest result: ok. 2 passed; 0 failed; 1 ignored\n";
        assert_eq!(passed_tests(out), 2);
        assert_eq!(passed_tests("nothing"), 0);
    }

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
