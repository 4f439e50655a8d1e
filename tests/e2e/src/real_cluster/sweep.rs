//! What a killed run leaves: a test interrupted with Ctrl-C or killed by a timeout never drops
//! its cluster, so its kubelets, containerds, pods and control plane keep running. Each
//! cluster writes a ledger in its scratch directory as it creates things (processes with
//! their start times, cgroups, network namespaces, root links); the next cluster to start
//! reads the ledgers of directories whose owner is gone (their lock is free), stops those
//! processes (by PID, when the PID is still the same process) and the shims and pods of their
//! nodes, and removes the rest. The directories themselves then go as every scratch
//! directory does ([`crate::scratch`]).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::netns::sh;
use crate::scratch::LOCK_FILE;

const LEDGER: &str = "ledger";

/// The prefix of the clusters' scratch directories.
pub const DIR_PREFIX: &str = "wgmesh-real-cluster-";

/// Appends to a cluster's ledger. Errors are ignored: the ledger only helps a later cleanup.
pub struct Ledger {
    path: PathBuf,
}

impl Ledger {
    pub fn new(dir: &Path) -> Self {
        Ledger {
            path: dir.join(LEDGER),
        }
    }

    fn append(&self, line: &str) {
        if let Ok(mut f) = File::options().create(true).append(true).open(&self.path) {
            let _ = writeln!(f, "{line}");
        }
    }

    pub fn process(&self, pid: Option<u32>) {
        if let Some(pid) = pid
            && let Some(start) = start_time(pid)
        {
            self.append(&format!("pid {pid} {start}"));
        }
    }

    pub fn cgroup(&self, root: &str) {
        self.append(&format!("cgroup {root}"));
    }

    pub fn netns(&self, name: &str) {
        self.append(&format!("netns {name}"));
    }

    pub fn link(&self, name: &str) {
        self.append(&format!("link {name}"));
    }
}

/// A process's start time (clock ticks after boot), which tells it from a later process
/// that got the same PID.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    // Field 22 of the line; the part after the name starts at field 3.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Cleans up after the clusters of killed runs (see the module's documentation); returns the
/// directories it cleaned.
pub fn sweep_abandoned() -> Vec<PathBuf> {
    let parent = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&parent) else {
        return Vec::new();
    };
    let mut cleaned = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry.file_name().to_string_lossy().starts_with(DIR_PREFIX) {
            continue;
        }
        let Ok(ledger) = std::fs::read_to_string(dir.join(LEDGER)) else {
            continue;
        };
        let owned = File::open(dir.join(LOCK_FILE)).is_ok_and(|l| l.try_lock().is_err());
        if owned {
            continue;
        }
        eprintln!(
            "[wgmesh] real cluster: cleaning up after a killed run ({})",
            dir.display()
        );
        clean(&dir, &ledger);
        // Once only: the names in it (netns, links, cgroups) are free again and may soon
        // belong to a live cluster, while the directory waits for its removal.
        let _ = std::fs::remove_file(dir.join(LEDGER));
        cleaned.push(dir);
    }
    // A killed run's kubelets changed kernel settings it could not put back.
    super::host::restore_if_last(None);
    cleaned
}

fn clean(dir: &Path, ledger: &str) {
    let lines: Vec<Vec<&str>> = ledger
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    // Processes, last started first (the kubelets before their containerd).
    for fields in lines.iter().rev() {
        if let ["pid", pid, start] = fields.as_slice()
            && let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>())
            && start_time(pid) == Some(start)
        {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
    // containerd's shims of this cluster's nodes: their command line names its directory.
    let needle = dir.display().to_string();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let is_shim = std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.starts_with("/usr/bin/containerd-shim") && c.contains(&needle)
            });
            if is_shim {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
    for fields in &lines {
        if let ["cgroup", root] = fields.as_slice() {
            for _ in 0..3 {
                for pid in super::node::cgroup_pids(root) {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            super::node::remove_cgroups(root);
        }
    }
    for fields in &lines {
        match fields.as_slice() {
            ["netns", name] => {
                let _ = sh("ip", &["netns", "del", name]);
            }
            ["link", name] => {
                let _ = sh("ip", &["link", "del", name]);
            }
            _ => {}
        }
    }
}
