//! The Grafana dashboard under deploy/grafana: valid JSON with a schema version, and every
//! metric its queries use is one the agent exports (`wgmesh_agent::metrics::METRIC_NAMES`).

use anyhow::{Context, Result};
use wgmesh_agent::metrics::METRIC_NAMES;
use wgmesh_e2e::install::repo_root;

/// The `wgmesh_*` identifiers of a PromQL expression.
fn metric_names(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|word| word.starts_with("wgmesh_"))
        .collect()
}

#[test]
fn metric_names_of_expressions() {
    for (expr, want) in [
        (
            "rate(wgmesh_agent_updates_total[5m])",
            vec!["wgmesh_agent_updates_total"],
        ),
        (
            "wgmesh_agent_peers{node=~\"$node\"} / on(node) wgmesh_agent_controller_connected",
            vec!["wgmesh_agent_peers", "wgmesh_agent_controller_connected"],
        ),
        ("up{job=\"wgmesh\"}", vec![]),
    ] {
        assert_eq!(metric_names(expr), want, "{expr}");
    }
}

#[test]
fn dashboard_queries_only_exported_metrics() -> Result<()> {
    let path = repo_root().join("deploy/grafana/wgmesh-dashboard.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let dashboard: serde_json::Value = serde_json::from_str(&text)?;
    assert!(
        dashboard["schemaVersion"].as_u64().is_some(),
        "no schemaVersion"
    );
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let panels = dashboard["panels"].as_array().context("no panels")?;
    let mut used = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().context("a panel without a title")?;
        let targets = panel["targets"].as_array().context(title.to_owned())?;
        assert!(!targets.is_empty(), "{title}: no queries");
        for target in targets {
            let expr = target["expr"].as_str().context(title.to_owned())?;
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{title}: {expr} uses no wgmesh metric");
            for name in names {
                assert!(
                    METRIC_NAMES.contains(&name),
                    "{title}: {name} is not exported by the agent ({METRIC_NAMES:?})"
                );
                used.push(name);
            }
        }
    }
    // The panels: throughput per peer, handshake age, peers per node.
    for name in [
        "wgmesh_agent_peer_receive_bytes_total",
        "wgmesh_agent_peer_transmit_bytes_total",
        "wgmesh_agent_peer_handshake_age_seconds",
        "wgmesh_agent_peers",
    ] {
        assert!(used.contains(&name), "no panel shows {name}");
    }
    Ok(())
}
