//! `cargo xtask bench disruption`: what each fault of the chaos suite (tests/e2e/tests/
//! chaos.rs) costs the traffic between pods, with longer outages than the tests use. On a
//! local mesh of real agents and controller (the e2e harness), with a TCP stream and pings
//! running between pods on different nodes and a capture on every node's underlay link, each
//! fault is injected once, and agent restarts `--rounds` times. Per fault: the longest stall
//! of the stream, pings lost, plaintext pod packets seen, and whether the TCP connection
//! broke; medians over rounds. Writes `target/bench/disruption.json`. Root only.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Result, bail};
use serde_json::{Value, json};
use wgmesh_e2e::chaos::{Chaos, Fault, FaultReport, Options};
use wgmesh_e2e::mesh::NetworkMode;

use super::stats::median;
use crate::setup::{DEBIAN_PACKAGES, ensure_debian_packages, repo_root, step};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Cni,
    Addon,
    Both,
}

#[derive(clap::Args)]
pub struct Args {
    /// Rounds of the agent restarts (SIGTERM and SIGKILL); medians are over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds the API server and etcd stay down.
    #[arg(long, default_value_t = 60)]
    outage_secs: u64,
    /// Seconds an agent or the controller stays down before it is started again.
    #[arg(long, default_value_t = 5)]
    down_secs: u64,
    /// Seconds the controller runs without the right to read Secrets.
    #[arg(long, default_value_t = 30)]
    secrets_denied_secs: u64,
    /// Network mode of the mesh (both: one mesh after the other).
    #[arg(long, value_enum, default_value_t = Mode::Cni)]
    mode: Mode,
}

pub async fn run(args: Args) -> Result<()> {
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if !nix::unistd::Uid::effective().is_root() {
        bail!("the disruption benchmark creates network namespaces: run it as root");
    }
    step("checking tools: tcpdump, iproute2, the CNI plugins");
    ensure_debian_packages(DEBIAN_PACKAGES)?;
    let modes = match args.mode {
        Mode::Cni => vec![NetworkMode::Cni],
        Mode::Addon => vec![NetworkMode::Addon],
        Mode::Both => vec![NetworkMode::Cni, NetworkMode::Addon],
    };
    let mut by_mode = serde_json::Map::new();
    let mut broken = Vec::new();
    for mode in modes {
        let options = Options {
            down: Duration::from_secs(args.down_secs),
            outage: Duration::from_secs(args.outage_secs),
            secrets_denied: Duration::from_secs(args.secrets_denied_secs),
            ..Options::full(mode)
        };
        step(&format!(
            "{mode:?} mode: starting a mesh of 3 nodes with traffic"
        ));
        let mut chaos = Chaos::start(options).await?;
        let mut runs: BTreeMap<&'static str, Vec<FaultReport>> = BTreeMap::new();
        for fault in schedule(args.rounds) {
            step(&format!("{mode:?} mode: {}", fault.name()));
            let report = chaos.run(fault).await?;
            println!("    {}", report.summary());
            if !report.kept_the_promise() {
                broken.push(format!("{mode:?} {}", fault.name()));
            }
            runs.entry(fault.name()).or_default().push(report);
        }
        drop(chaos);
        println!("\n{mode:?} mode (medians over rounds):");
        println!(
            "| fault | rounds | longest stall ms | pings lost | plaintext packets | TCP reset |"
        );
        println!("|---|---|---|---|---|---|");
        let mut faults = serde_json::Map::new();
        for fault in Fault::ALL {
            let Some(reports) = runs.get(fault.name()) else {
                continue;
            };
            let s = summarise(reports);
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                fault.name(),
                reports.len(),
                s["longest_stall_ms"],
                s["pings_lost"],
                s["plaintext_packets"],
                s["tcp_reset"]
            );
            faults.insert(fault.name().to_owned(), s);
        }
        by_mode.insert(
            format!("{mode:?}").to_lowercase(),
            json!({"faults": faults}),
        );
    }
    let report = json!({
        "options": {
            "rounds": args.rounds,
            "outage_secs": args.outage_secs,
            "down_secs": args.down_secs,
            "secrets_denied_secs": args.secrets_denied_secs,
            "stream_interval_ms": wgmesh_e2e::chaos::meter::STREAM_INTERVAL.as_millis() as u64,
            "ping_interval_ms": wgmesh_e2e::chaos::meter::PING_INTERVAL.as_millis() as u64,
        },
        "modes": by_mode,
        "broke_the_promise": broken,
    });
    let dir = repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("disruption.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("\nwrote {}", path.display());
    if !broken.is_empty() {
        println!(
            "{} fault(s) broke the promise (plaintext, a TCP reset, or no recovery): {}",
            broken.len(),
            broken.join(", ")
        );
    }
    Ok(())
}

/// The faults in order: agent restarts `rounds` times each, then every other fault once.
fn schedule(rounds: usize) -> Vec<Fault> {
    let mut faults = Vec::new();
    for fault in Fault::ALL {
        let n = match fault {
            Fault::AgentTerm | Fault::AgentKill => rounds,
            _ => 1,
        };
        faults.extend(std::iter::repeat_n(fault, n));
    }
    faults
}

/// Medians over the rounds of one fault (plaintext summed: any is too many), and every run.
fn summarise(reports: &[FaultReport]) -> Value {
    let values =
        |f: fn(&FaultReport) -> u64| -> Vec<f64> { reports.iter().map(|r| f(r) as f64).collect() };
    let recovered: Vec<f64> = reports
        .iter()
        .filter_map(|r| r.recovered_after_start_ms.map(|ms| ms as f64))
        .collect();
    let recovered = if recovered.is_empty() {
        Value::Null
    } else {
        json!(median(&recovered))
    };
    json!({
        "rounds": reports.len(),
        "longest_stall_ms": median(&values(|r| r.longest_stall_ms)),
        "pings_lost": median(&values(|r| r.pings_lost)),
        "recovered_after_start_ms": recovered,
        "plaintext_packets": reports.iter().map(|r| r.plaintext_packets).sum::<u64>(),
        "tcp_reset": reports.iter().any(|r| r.tcp_reset),
        "kept_the_promise": reports.iter().all(FaultReport::kept_the_promise),
        "runs": reports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_restarts_repeat_and_a_node_joins_before_it_leaves() {
        let s = schedule(3);
        assert_eq!(s.len(), Fault::ALL.len() + 4);
        assert_eq!(s.iter().filter(|f| **f == Fault::AgentTerm).count(), 3);
        assert_eq!(s.iter().filter(|f| **f == Fault::AgentKill).count(), 3);
        let join = s.iter().position(|f| *f == Fault::NodeJoin).unwrap();
        let leave = s.iter().position(|f| *f == Fault::NodeLeave).unwrap();
        assert!(join < leave);
    }
}
