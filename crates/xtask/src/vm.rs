//! `cargo xtask vm`: the kernel VM lane by hand (see `wgmesh_e2e::vm`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use wgmesh_e2e::vm::{self, VmExit, VmJob};

#[derive(clap::Subcommand)]
pub enum Vm {
    /// Download Debian's kernel and build the initramfs into the cache (once).
    Prepare,
    /// Run a command (a test binary, say) inside the VM: cwd kept, RUST_LOG, RUST_BACKTRACE
    /// and WGMESH_* passed, WGMESH_IN_VM=1 set; exits with its exit code (124 on a timeout,
    /// 125 when the VM gave none). Usable as a cargo runner (tests/e2e/tools/vm-runner.sh).
    Run {
        /// Seconds before the VM is killed.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
        /// Print the VM's console and timings on stderr.
        #[arg(long, short)]
        verbose: bool,
        program: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

pub fn run(cmd: Vm) -> Result<()> {
    match cmd {
        Vm::Prepare => {
            let vm = vm::prepare()?;
            eprintln!("kernel {} ready in {}", vm.release, vm.dir.display());
            Ok(())
        }
        Vm::Run {
            timeout,
            verbose,
            program,
            args,
        } => {
            let kernel = vm::prepare()?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let job = VmJob::new(program, &args).timeout(Duration::from_secs(timeout));
            let out = vm::run(&kernel, &job)?;
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            if verbose || !matches!(out.exit, VmExit::Code(_)) {
                eprintln!("--- VM console (tail) ---\n{}", out.console_tail(40));
            }
            if verbose {
                eprintln!(
                    "[wgmesh] VM ({}): boot {:?}, whole run {:.1?}, {}",
                    out.accel, out.boot, out.elapsed, out.exit
                );
            }
            let code = match out.exit {
                VmExit::Code(c) => c,
                VmExit::Timeout(t) => {
                    eprintln!("[wgmesh] the VM timed out after {t:?} and was killed");
                    124
                }
                VmExit::NoExitCode => {
                    eprintln!("[wgmesh] the VM stopped without the command's exit code");
                    125
                }
            };
            std::process::exit(code);
        }
    }
}
