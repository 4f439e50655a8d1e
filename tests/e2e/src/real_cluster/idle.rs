//! What an idle cluster costs: CPU time over a window and resident memory of every process it
//! runs, per program name, read from /proc.

use std::collections::BTreeMap;
use std::time::Duration;

/// One process's name, CPU time (user + system, in clock ticks of 10 ms) and resident memory
/// (kB).
fn usage(pid: u32) -> Option<(String, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    // The fields after the name; utime and stime are the 14th and 15th of the line.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Some((name, ticks, rss))
}

/// The cost of `pids` over `window`: a total line, then one line per program name (percent of
/// one core, resident MB, how many processes).
pub async fn measure(pids: &[u32], window: Duration) -> Vec<String> {
    let before: Vec<_> = pids.iter().map(|p| usage(*p)).collect();
    tokio::time::sleep(window).await;
    let mut by_name: BTreeMap<String, (u64, u64, usize)> = BTreeMap::new();
    for (pid, before) in pids.iter().zip(before) {
        let (Some((name, t0, _)), Some((_, t1, rss))) = (before, usage(*pid)) else {
            continue;
        };
        let e = by_name.entry(name).or_default();
        e.0 += t1.saturating_sub(t0);
        e.1 += rss;
        e.2 += 1;
    }
    let percent = |ticks: u64| ticks as f64 / window.as_secs_f64();
    let (ticks, rss) = by_name.values().fold((0, 0), |a, v| (a.0 + v.0, a.1 + v.1));
    let mut lines = vec![format!(
        "idle over {window:?}: {:.1}% of one core, {} MB resident, {} processes",
        percent(ticks),
        rss / 1024,
        pids.len()
    )];
    for (name, (t, r, count)) in &by_name {
        lines.push(format!(
            "  {name:<24} x{count}: {:>5.1}% {:>5} MB",
            percent(*t),
            r / 1024
        ));
    }
    lines
}
