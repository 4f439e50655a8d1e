//! `status`: every node and external peer of each mesh, and a node-by-node handshake matrix.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde::Serialize;
use wgmesh_api::{WireGuardMesh, WireGuardPeer};

use crate::KubeArgs;
use crate::cluster;
use crate::config::ready_condition;
use crate::exit::{self, err};
use crate::output::{self, Format};

/// A handshake younger than this is "recent": WireGuard session keys last 180 s, so a pair
/// that exchanges traffic handshakes again before that (and the status lags by up to the
/// controller's status interval, 30 s by default).
pub const RECENT_SECS: i64 = 180 + 30;

#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MeshStatus {
    pub mesh: String,
    pub gateways: Vec<String>,
    /// The gateway carrying the traffic between external peers and the other nodes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_gateway: Option<String>,
    /// The mesh's own Ready condition is True and so is every peer's.
    pub ready: bool,
    /// The mesh's own Ready condition, when it is not True (held, no members, being
    /// deleted, disabled, or not judged yet): its reason and message.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    pub peers: Vec<PeerRow>,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PeerRow {
    pub name: String,
    /// The Node, for node peers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub addresses: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_handshake_time: Option<Timestamp>,
    pub rx_bytes: i64,
    pub tx_bytes: i64,
    pub ready: bool,
    pub reason: String,
    pub message: String,
    /// Each node's latest handshake with this peer (for node peers, in meshes small enough
    /// to keep them: `wgmesh_core::report`).
    pub handshakes: BTreeMap<String, Timestamp>,
    /// For a node: how many other nodes it holds a live session with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_sessions: Option<i32>,
}

pub async fn run(kube: &KubeArgs, mesh: Option<String>, format: Format) -> Result<()> {
    let statuses = gather(kube, mesh.as_deref()).await?;
    if format == Format::Table {
        let now = Timestamp::now();
        for (i, s) in statuses.iter().enumerate() {
            if i > 0 {
                outln!();
            }
            out!("{}", table(s, now));
        }
    } else {
        output::print(format, &statuses)?;
    }
    if statuses.iter().all(|s| s.ready) {
        Ok(())
    } else {
        Err(err(
            exit::NOT_READY,
            "not every mesh, node and peer is Ready",
        ))
    }
}

/// The status of mesh `mesh`, or of every mesh (an error if there is none).
pub async fn gather(kube: &KubeArgs, mesh: Option<&str>) -> Result<Vec<MeshStatus>> {
    let client = cluster::client(kube).await?;
    let meshes: Vec<WireGuardMesh> = match mesh {
        Some(name) => vec![cluster::mesh_objects(&client, name).await?.mesh],
        None => {
            Api::<WireGuardMesh>::all(client.clone())
                .list(&ListParams::default())
                .await?
                .items
        }
    };
    if meshes.is_empty() {
        return Err(err(exit::NOT_FOUND, "there is no WireGuardMesh"));
    }
    let peers = cluster::all_peers(&client).await?;
    Ok(meshes.iter().map(|m| mesh_status(m, &peers)).collect())
}

pub fn mesh_status(mesh: &WireGuardMesh, peers: &[WireGuardPeer]) -> MeshStatus {
    let name = mesh.name_any();
    let rows: Vec<PeerRow> = peers
        .iter()
        .filter(|p| p.spec.mesh.as_str() == name)
        .map(row)
        .collect();
    let condition = mesh
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let (reason, message) = match condition {
        Some(c) if c.status == "True" => (String::new(), String::new()),
        Some(c) => (c.reason.clone(), c.message.clone()),
        None => (
            "NotJudged".to_owned(),
            "the controller has not judged the mesh yet (is it running?)".to_owned(),
        ),
    };
    let (reason, message) = if mesh.metadata.deletion_timestamp.is_some() {
        (
            "Deleting".to_owned(),
            "the mesh is being deleted; its nodes are leaving".to_owned(),
        )
    } else {
        (reason, message)
    };
    MeshStatus {
        gateways: mesh
            .status
            .as_ref()
            .map(|s| s.gateways.clone())
            .unwrap_or_default(),
        active_gateway: mesh.status.as_ref().and_then(|s| s.active_gateway.clone()),
        ready: reason.is_empty() && rows.iter().all(|r| r.ready),
        reason,
        message,
        mesh: name,
        peers: rows,
    }
}

fn row(p: &WireGuardPeer) -> PeerRow {
    let status = p.status.clone().unwrap_or_default();
    let cond = ready_condition(p);
    PeerRow {
        name: p.name_any(),
        node: p.spec.node.as_ref().map(|n| n.0.clone()),
        endpoint: status
            .endpoint
            .clone()
            .or_else(|| p.spec.endpoint.as_ref().map(|e| e.0.clone())),
        addresses: status.addresses.clone(),
        last_handshake_time: status.last_handshake_time.as_ref().map(|t| t.0),
        rx_bytes: status.rx_bytes,
        tx_bytes: status.tx_bytes,
        ready: cond.is_some_and(|c| c.status == "True"),
        reason: cond.map(|c| c.reason.clone()).unwrap_or_default(),
        message: cond.map(|c| c.message.clone()).unwrap_or_default(),
        handshakes: status
            .handshakes
            .iter()
            .map(|h| (h.node.clone(), h.last_handshake_time.0))
            .collect(),
        live_sessions: status.live_sessions,
    }
}

/// The human view: a table of peers, then the matrix (rows: reporting nodes; columns: every
/// peer, numbered as in the table).
pub fn table(s: &MeshStatus, now: Timestamp) -> String {
    let mut out = String::new();
    let gateways = if s.gateways.is_empty() {
        "none".to_owned()
    } else {
        s.gateways.join(", ")
    };
    let active = match &s.active_gateway {
        Some(a) if s.gateways.len() > 1 => format!(" (active: {a})"),
        _ => String::new(),
    };
    let _ = writeln!(out, "MESH {}   gateways: {gateways}{active}", s.mesh);
    if !s.reason.is_empty() {
        let _ = writeln!(out, "  not Ready ({}): {}", s.reason, s.message);
    }
    let node_peers = s
        .peers
        .iter()
        .filter(|r| r.node.is_some())
        .count()
        .saturating_sub(1);
    // Above the limit, nobody observes node pairs one by one: no matrix, no node traffic.
    let per_node = wgmesh_core::report::node_peers_in_detail(
        node_peers,
        wgmesh_core::report::NODE_PEER_DETAIL_LIMIT,
    );
    let header = [
        "#",
        "NAME",
        "KIND",
        "ENDPOINT",
        "ADDRESS",
        "HANDSHAKE",
        "SESSIONS",
        "RX",
        "TX",
        "READY",
    ];
    let mut cells: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for (i, r) in s.peers.iter().enumerate() {
        let kind = match &r.node {
            Some(n) if s.gateways.contains(n) => "node (gw)".to_owned(),
            Some(_) => "node".to_owned(),
            None => "external".to_owned(),
        };
        cells.push(vec![
            (i + 1).to_string(),
            r.name.clone(),
            kind,
            r.endpoint.clone().unwrap_or_else(|| "-".into()),
            r.addresses.first().cloned().unwrap_or_else(|| "-".into()),
            r.last_handshake_time
                .map(|t| format!("{} ago", age(now, t)))
                .unwrap_or_else(|| "never".into()),
            match (&r.node, r.live_sessions) {
                (Some(_), Some(live)) => format!("{live}/{node_peers}"),
                _ => "-".into(),
            },
            if r.node.is_some() && !per_node {
                "-".into()
            } else {
                bytes(r.rx_bytes)
            },
            if r.node.is_some() && !per_node {
                "-".into()
            } else {
                bytes(r.tx_bytes)
            },
            if r.ready {
                "True".into()
            } else {
                format!("False ({})", r.reason)
            },
        ]);
    }
    write_columns(&mut out, &cells);
    for r in s.peers.iter().filter(|r| !r.ready && !r.message.is_empty()) {
        let _ = writeln!(out, "  {}: {}", r.name, r.message);
    }

    let observers: Vec<&PeerRow> = s.peers.iter().filter(|r| r.node.is_some()).collect();
    if observers.is_empty() {
        return out;
    }
    if !per_node {
        let _ = writeln!(
            out,
            "\nHANDSHAKES: not kept node by node in a mesh of more than {} nodes (SESSIONS \
             counts each node's live sessions; the agents' metrics have every pair's \
             handshake age)",
            wgmesh_core::report::NODE_PEER_DETAIL_LIMIT + 1
        );
        return out;
    }
    let _ = writeln!(
        out,
        "\nHANDSHAKES (row: node, column: peer #; age of the last handshake, \"-\" never, \
         \"old\" over {RECENT_SECS}s)"
    );
    let mut grid: Vec<Vec<String>> = Vec::new();
    let mut head = vec!["".to_owned()];
    head.extend((1..=s.peers.len()).map(|i| i.to_string()));
    grid.push(head);
    for o in observers {
        let node = o.node.clone().unwrap_or_default();
        let mut line = vec![node.clone()];
        for col in &s.peers {
            line.push(if col.name == o.name {
                "\\".into()
            } else {
                match col.handshakes.get(&node) {
                    None => "-".into(),
                    Some(t) if now.as_second() - t.as_second() > RECENT_SECS => "old".into(),
                    Some(t) => age(now, *t),
                }
            });
        }
        grid.push(line);
    }
    write_columns(&mut out, &grid);
    out
}

fn write_columns(out: &mut String, rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let _ = write!(line, "{cell:<w$}  ", w = widths[c]);
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

/// A short age: `42s`, `5m`, `3h`, `2d`.
pub fn age(now: Timestamp, then: Timestamp) -> String {
    let s = (now.as_second() - then.as_second()).max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n.max(0) as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgmesh_api::condition::Reason;

    fn row(name: &str, node: Option<&str>, hs: &[(&str, i64)], ready: bool) -> PeerRow {
        PeerRow {
            name: name.into(),
            node: node.map(Into::into),
            endpoint: Some("192.168.0.1:51820".into()),
            addresses: vec!["10.250.0.1".into()],
            last_handshake_time: hs
                .iter()
                .map(|(_, t)| Timestamp::from_second(*t).unwrap())
                .max(),
            rx_bytes: 2048,
            tx_bytes: 10,
            ready,
            reason: if ready {
                Reason::Programmed
            } else {
                Reason::AllowedIpsOverlap
            }
            .as_str()
            .into(),
            message: if ready { "" } else { "10.0.0.0/8 overlaps" }.into(),
            handshakes: hs
                .iter()
                .map(|(n, t)| (n.to_string(), Timestamp::from_second(*t).unwrap()))
                .collect(),
            live_sessions: node.map(|_| 1),
        }
    }

    #[test]
    fn the_matrix_shows_a_broken_pair() {
        let now = Timestamp::from_second(10_000).unwrap();
        let s = MeshStatus {
            mesh: "default".into(),
            gateways: vec!["a".into()],
            active_gateway: Some("a".into()),
            ready: false,
            reason: String::new(),
            message: String::new(),
            peers: vec![
                row("node-a", Some("a"), &[("b", 9_990)], true),
                row("node-b", Some("b"), &[("a", 9_995)], true),
                row("laptop", None, &[("a", 5_000)], true),
                row("bad", None, &[], false),
            ],
        };
        let text = table(&s, now);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("MESH default   gateways: a"), "{text}");
        assert!(text.contains("node (gw)"), "{text}");
        assert!(text.contains("False (AllowedIPsOverlap)"), "{text}");
        assert!(text.contains("  bad: 10.0.0.0/8 overlaps"), "{text}");
        assert!(text.contains("2.0 KiB"), "{text}");
        let a = lines.iter().find(|l| l.starts_with("a ")).unwrap();
        let b = lines.iter().find(|l| l.starts_with("b ")).unwrap();
        assert_eq!(
            a.split_whitespace().collect::<Vec<_>>(),
            ["a", "\\", "5s", "old", "-"]
        );
        assert_eq!(
            b.split_whitespace().collect::<Vec<_>>(),
            ["b", "10s", "\\", "-", "-"]
        );
    }

    #[test]
    fn a_large_mesh_has_sessions_and_no_matrix() {
        let now = Timestamp::from_second(10_000).unwrap();
        let nodes = wgmesh_core::report::NODE_PEER_DETAIL_LIMIT + 2;
        let mut peers: Vec<PeerRow> = (0..nodes)
            .map(|i| {
                let mut r = row(&format!("node-{i}"), Some(&format!("n{i}")), &[], true);
                r.live_sessions = Some(i as i32);
                r
            })
            .collect();
        peers.push(row("laptop", None, &[("n0", 9_990)], true));
        let s = MeshStatus {
            mesh: "big".into(),
            gateways: vec![],
            active_gateway: None,
            ready: true,
            reason: String::new(),
            message: String::new(),
            peers,
        };
        let text = table(&s, now);
        assert!(text.contains("HANDSHAKES: not kept node by node"), "{text}");
        let last = text
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some("node-65"))
            .unwrap();
        let cells: Vec<&str> = last.split_whitespace().collect();
        assert!(cells.contains(&"65/65"), "{last}");
        assert_eq!(
            &cells[cells.len() - 3..cells.len() - 1],
            ["-", "-"],
            "no node traffic: {last}"
        );
        let laptop = text.lines().find(|l| l.contains("laptop")).unwrap();
        assert!(
            laptop.contains("2.0 KiB"),
            "external peers keep their traffic: {laptop}"
        );

        let small = MeshStatus {
            peers: s.peers[..3].to_vec(),
            ..s.clone()
        };
        let text = table(&small, now);
        assert!(text.contains("HANDSHAKES (row"), "{text}");
        assert!(text.contains("1/2"), "{text}");
    }

    #[test]
    fn the_mesh_is_ready_only_when_its_own_condition_is() {
        let mesh_with = |condition: Option<(&str, &str)>, deleting: bool| {
            let mut value = serde_json::json!({
                "apiVersion": "wgmesh.io/v1alpha1",
                "kind": "WireGuardMesh",
                "metadata": {"name": "default"},
                "spec": {},
            });
            if let Some((status, reason)) = condition {
                value["status"] = serde_json::json!({"conditions": [{
                    "type": "Ready", "status": status, "reason": reason,
                    "message": "why", "lastTransitionTime": "2026-12-06T00:00:00Z",
                }]});
            }
            if deleting {
                value["metadata"]["deletionTimestamp"] = "2026-12-06T00:00:00Z".into();
            }
            serde_json::from_value::<WireGuardMesh>(value).unwrap()
        };
        // (mesh condition, being deleted, ready, reason shown)
        let cases = [
            (Some(("True", "AllPeersProgrammed")), false, true, ""),
            (
                Some(("False", "MeshConflict")),
                false,
                false,
                "MeshConflict",
            ),
            (Some(("False", "NoMembers")), false, false, "NoMembers"),
            (None, false, false, "NotJudged"),
            (
                Some(("True", "AllPeersProgrammed")),
                true,
                false,
                "Deleting",
            ),
        ];
        for (condition, deleting, ready, reason) in cases {
            let s = mesh_status(&mesh_with(condition, deleting), &[]);
            assert_eq!(
                (s.ready, s.reason.as_str()),
                (ready, reason),
                "{condition:?}"
            );
            let text = table(&s, Timestamp::now());
            assert_eq!(text.contains("not Ready ("), !ready, "{text}");
        }
    }

    #[test]
    fn ages() {
        let now = Timestamp::from_second(100_000).unwrap();
        let at = |s: i64| Timestamp::from_second(100_000 - s).unwrap();
        assert_eq!(age(now, at(5)), "5s");
        assert_eq!(age(now, at(125)), "2m");
        assert_eq!(age(now, at(7200)), "2h");
        assert_eq!(age(now, at(200_000 - 100_000 + 86_400)), "2d");
    }
}
