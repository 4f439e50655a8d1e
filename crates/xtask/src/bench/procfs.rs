//! What the benchmarks read of processes and the machine from `/proc`: CPU time and memory.

use std::fs;

use anyhow::{Context, Result};
use wgmesh_e2e::netns::sh;

/// (idle, total) jiffies of all cores from /proc/stat (iowait counts as idle).
pub fn cpu_jiffies() -> Result<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    // guest and guest_nice are already part of user and nice.
    let total = v.iter().take(8).sum();
    Ok((idle, total))
}

pub fn clock_ticks() -> f64 {
    sh("getconf", &["CLK_TCK"])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Sum of utime + stime, in seconds, of the processes `pids` (all their threads).
pub fn cpu_seconds(pids: &[u32], tck: f64) -> Result<f64> {
    let mut ticks = 0u64;
    for pid in pids {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // Fields after the command name, which is in parentheses and may hold spaces:
        // state is field 3, utime 14 and stime 15.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .context("malformed stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        for i in [11, 12] {
            ticks += fields
                .get(i)
                .context("short stat")?
                .parse::<u64>()
                .context("parsing stat")?;
        }
    }
    Ok(ticks as f64 / tck)
}

/// A `kB` line of `/proc/PID/status` (`VmHWM:`, `VmRSS:`).
pub fn status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?)
}

pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
