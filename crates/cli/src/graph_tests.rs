use super::*;
use crate::status::PeerRow;

const NOW: i64 = 100_000;

fn at(ago: i64) -> Timestamp {
    Timestamp::from_second(NOW - ago).unwrap()
}

/// A row: `hs` are (node, seconds ago) of each node's latest handshake with it.
fn row(name: &str, node: Option<&str>, hs: &[(&str, i64)]) -> PeerRow {
    PeerRow {
        name: name.into(),
        node: node.map(Into::into),
        endpoint: None,
        addresses: vec![],
        last_handshake_time: hs.iter().map(|(_, ago)| at(*ago)).max(),
        rx_bytes: 0,
        tx_bytes: 0,
        ready: true,
        reason: "Programmed".into(),
        message: String::new(),
        handshakes: hs
            .iter()
            .map(|(n, ago)| (n.to_string(), at(*ago)))
            .collect(),
        live_sessions: None,
    }
}

fn node(node: &str, hs: &[(&str, i64)]) -> PeerRow {
    row(&format!("node-{node}"), Some(node), hs)
}

fn mesh(gateways: &[&str], peers: Vec<PeerRow>) -> MeshStatus {
    MeshStatus {
        mesh: "default".into(),
        gateways: gateways.iter().map(|g| g.to_string()).collect(),
        active_gateway: gateways.first().map(|g| g.to_string()),
        ready: peers.iter().all(|p| p.ready),
        reason: String::new(),
        message: String::new(),
        peers,
    }
}

/// An edge as (from, to, directed, label, freshness).
type E = (usize, usize, bool, &'static str, Freshness);
/// A case: what it shows, the status, the vertices (name, kind) and the edges.
type Case = (&'static str, MeshStatus, Vec<(&'static str, Kind)>, Vec<E>);

fn edges(g: &MeshGraph) -> Vec<(usize, usize, bool, &str, Freshness)> {
    g.edges
        .iter()
        .map(|e| (e.from, e.to, e.directed, e.label.as_str(), e.freshness))
        .collect()
}

#[test]
fn the_model() {
    use Freshness::*;
    use Kind::*;
    let stale = RECENT_SECS + 60;
    let cases: Vec<Case> = vec![
        (
            "three nodes, one gateway, a laptop the gateway sees",
            mesh(
                &["a"],
                vec![
                    node("a", &[("b", 12), ("c", stale)]),
                    node("b", &[("a", 5)]),
                    node("c", &[]),
                    row("laptop", None, &[("a", 3)]),
                ],
            ),
            vec![
                ("a", Gateway),
                ("b", Node),
                ("c", Node),
                ("laptop", External),
            ],
            vec![
                // b says a 5 s ago, a says b 12 s ago: the later wins.
                (0, 1, false, "5s", Recent),
                (0, 2, false, "4m", Stale),
                (1, 2, false, "never", Never),
                (3, 0, true, "3s", Recent),
            ],
        ),
        (
            "a peer no node has seen goes to every gateway",
            mesh(
                &["a", "b"],
                vec![
                    node("a", &[("b", 1)]),
                    node("b", &[]),
                    node("c", &[]),
                    row("office", None, &[]),
                ],
            ),
            vec![
                ("a", Gateway),
                ("b", Gateway),
                ("c", Node),
                ("office", External),
            ],
            vec![
                (0, 1, false, "1s", Recent),
                (0, 2, false, "never", Never),
                (1, 2, false, "never", Never),
                (3, 0, true, "never", Never),
                (3, 1, true, "never", Never),
            ],
        ),
        (
            "a peer goes to the nodes it handshook with, a gateway or not, and only those",
            mesh(
                &["a"],
                vec![
                    node("a", &[]),
                    node("b", &[]),
                    row("phone", None, &[("b", 7200)]),
                ],
            ),
            vec![("a", Gateway), ("b", Node), ("phone", External)],
            vec![(0, 1, false, "never", Never), (2, 1, true, "2h", Stale)],
        ),
        (
            "a handshake from a node with no row of its own counts as none",
            mesh(
                &["a"],
                vec![node("a", &[]), row("laptop", None, &[("gone", 1)])],
            ),
            vec![("a", Gateway), ("laptop", External)],
            vec![(1, 0, true, "never", Never)],
        ),
        (
            "external peers follow the nodes whatever the rows' order",
            mesh(
                &[],
                vec![row("laptop", None, &[("a", RECENT_SECS)]), node("a", &[])],
            ),
            vec![("a", Node), ("laptop", External)],
            vec![(1, 0, true, "3m", Recent)],
        ),
        ("an empty mesh", mesh(&["a"], vec![]), vec![], vec![]),
    ];
    for (what, status, want_vertices, want_edges) in cases {
        let g = mesh_graph(&status, Timestamp::from_second(NOW).unwrap());
        let vertices: Vec<(&str, Kind)> = g
            .vertices
            .iter()
            .map(|v| (v.name.as_str(), v.kind))
            .collect();
        assert_eq!(vertices, want_vertices, "{what}");
        assert_eq!(edges(&g), want_edges, "{what}");
        assert_eq!(g.mesh, "default", "{what}");
    }
}

#[test]
fn the_active_gateway_is_named_when_there_are_several() {
    let mut status = mesh(
        &["a", "b"],
        vec![node("a", &[]), node("b", &[]), node("c", &[])],
    );
    status.active_gateway = Some("b".into());
    let g = mesh_graph(&status, Timestamp::from_second(NOW).unwrap());
    let lines: Vec<Vec<String>> = g.vertices.iter().map(Vertex::lines).collect();
    assert_eq!(lines[0], ["a", "gateway"]);
    assert_eq!(lines[1], ["b", "gateway (active)"]);
    assert_eq!(lines[2], ["c"]);
    // One gateway: it is the active one, nothing to say.
    let one = mesh_graph(
        &mesh(&["a"], vec![node("a", &[]), node("b", &[])]),
        Timestamp::from_second(NOW).unwrap(),
    );
    assert_eq!(one.vertices[0].lines(), ["a", "gateway"]);
}

#[test]
fn a_peer_that_is_not_ready_says_why() {
    let mut bad = row("bad", None, &[]);
    bad.ready = false;
    bad.reason = "AllowedIPsOverlap".into();
    let g = mesh_graph(
        &mesh(&[], vec![node("a", &[]), bad]),
        Timestamp::from_second(NOW).unwrap(),
    );
    assert!(g.vertices[0].ready);
    assert!(!g.vertices[1].ready);
    assert_eq!(
        g.vertices[1].lines(),
        ["bad", "external", "not ready: AllowedIPsOverlap"]
    );
    let text = dot(&[g]);
    assert!(
        text.contains(
            "m0_v1 [label=\"bad\\nexternal\\nnot ready: AllowedIPsOverlap\", shape=ellipse, \
             style=filled, fillcolor=\"lightyellow\", color=\"red\"];"
        ),
        "{text}"
    );
}

fn sample() -> MeshGraph {
    mesh_graph(
        &mesh(
            &["a"],
            vec![
                node("a", &[("b", 12)]),
                node("b", &[("a", 30)]),
                node("c", &[]),
                row("laptop", None, &[("a", 3)]),
            ],
        ),
        Timestamp::from_second(NOW).unwrap(),
    )
}

#[test]
fn dot_text() {
    let text = dot(&[sample()]);
    let want = r#"digraph wgmesh {
  graph [fontname="Helvetica"];
  node [fontname="Helvetica"];
  edge [fontname="Helvetica", fontsize=10];
  subgraph cluster_0 {
    label="mesh default";
    m0_v0 [label="a\ngateway", shape=box, style="filled,bold", fillcolor="lightblue"];
    m0_v1 [label="b", shape=box, style=filled, fillcolor="white"];
    m0_v2 [label="c", shape=box, style=filled, fillcolor="white"];
    m0_v3 [label="laptop\nexternal", shape=ellipse, style=filled, fillcolor="lightyellow"];
    m0_v0 -> m0_v1 [label="12s", dir=none];
    m0_v0 -> m0_v2 [label="never", dir=none, style=dashed, color="red"];
    m0_v1 -> m0_v2 [label="never", dir=none, style=dashed, color="red"];
    m0_v3 -> m0_v0 [label="3s"];
  }
}
"#;
    assert_eq!(text, want);
}

#[test]
fn every_mesh_is_a_cluster() {
    let mut other = sample();
    other.mesh = "other".into();
    let text = dot(&[sample(), other]);
    assert!(text.contains("subgraph cluster_0 {\n    label=\"mesh default\";"));
    assert!(text.contains("subgraph cluster_1 {\n    label=\"mesh other\";"));
    assert!(text.contains("m1_v3 -> m1_v0 [label=\"3s\"];"), "{text}");
}

/// Names that would end a DOT string, start an escape, add a line or open an XML element.
const HOSTILE: &[(&str, &str)] = &[
    ("quote", "a\"]; x -> y [label=\""),
    ("backslash", "b\\N\\"),
    ("newline", "c\nd"),
    ("markup", "<script>&amp;</script>'"),
    ("control", "e\u{1}\u{7f}f"),
];

fn hostile() -> MeshGraph {
    let mut peers = vec![];
    for (i, (_, name)) in HOSTILE.iter().enumerate() {
        if i % 2 == 0 {
            peers.push(row(&format!("n{i}"), Some(name), &[]));
        } else {
            peers.push(row(name, None, &[]));
        }
    }
    let mut s = mesh(&[HOSTILE[0].1], peers);
    s.mesh = "m\"\\<".into();
    mesh_graph(&s, Timestamp::from_second(NOW).unwrap())
}

/// DOT's quoted strings on a line: the text between unescaped quotes, or None when a quote
/// is left open.
fn dot_strings(line: &str) -> Option<Vec<String>> {
    let mut strings = vec![];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut s = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => {
                    s.push('\\');
                    s.push(chars.next()?);
                }
                c => s.push(c),
            }
        }
        strings.push(s);
    }
    Some(strings)
}

#[test]
fn dot_escapes_names() {
    let text = dot(&[hostile()]);
    let mut labels = vec![];
    for line in text.lines() {
        let strings = dot_strings(line).unwrap_or_else(|| panic!("an open quote: {line}"));
        labels.extend(strings);
        // Outside the strings, only what dot() writes itself.
        let mut outside = line.to_owned();
        for s in dot_strings(line).unwrap() {
            outside = outside.replacen(&format!("\"{s}\""), "\"\"", 1);
        }
        assert!(!outside.contains("x -> y"), "{line}");
    }
    assert_eq!(text.lines().count(), 4 + 2 + 5 + 5 + 2, "{text}");
    let want = [
        r#"mesh m\"\\<"#,
        r#"a\"]; x -> y [label=\"\ngateway"#,
        r"b\\N\\\nexternal",
        "c\u{fffd}d",
        "<script>&amp;</script>'\\nexternal",
        "e\u{fffd}\u{fffd}f",
    ];
    for w in want {
        assert!(
            labels.iter().any(|l| l == w),
            "no label {w:?} in {labels:?}"
        );
    }
}

#[test]
fn svg_is_xml_with_every_name() {
    let text = svg(&[sample()]);
    let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect();
    for want in ["a", "gateway", "b", "c", "laptop", "12s", "never", "3s"] {
        assert!(texts.contains(&want), "no {want:?} in {texts:?}");
    }
    assert!(
        text.contains("stroke-dasharray"),
        "the never edges are dashed"
    );
}

#[test]
fn svg_escapes_names() {
    let text = svg(&[hostile()]);
    let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(!doc.descendants().any(|n| n.has_tag_name("script")));
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect();
    for want in [
        "a\"]; x -> y [label=\"",
        "b\\N\\",
        "c\u{fffd}d",
        "<script>&amp;</script>'",
        "e\u{fffd}\u{fffd}f",
    ] {
        assert!(texts.contains(&want), "no {want:?} in {texts:?}");
    }
}

#[test]
fn svg_of_several_meshes_and_of_nothing() {
    let mut other = sample();
    other.mesh = "other".into();
    let empty = mesh_graph(&mesh(&[], vec![]), Timestamp::from_second(NOW).unwrap());
    let text = svg(&[sample(), other, empty]);
    roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(text.contains("mesh other"), "{text}");
    assert!(text.contains("no nodes, no peers"), "{text}");
    let text = svg(&[]);
    roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(text.contains("no mesh"), "{text}");
}

#[test]
fn svg_of_a_larger_mesh_draws_the_pairs_to_look_at() {
    let names: Vec<String> = (0..24).map(|i| format!("node-{i}")).collect();
    let mut peers: Vec<PeerRow> = names
        .iter()
        .map(|n| {
            // node-0 and node-1 never handshake; every other pair did, 10 s ago.
            let hs: Vec<(&str, i64)> = names
                .iter()
                .filter(|m| *m != n)
                .filter(|m| {
                    !matches!(
                        (n.as_str(), m.as_str()),
                        ("node-0", "node-1") | ("node-1", "node-0")
                    )
                })
                .map(|m| (m.as_str(), 10))
                .collect();
            row(n, Some(n), &hs)
        })
        .collect();
    for i in 0..4 {
        peers.push(row(
            &format!("laptop-{i}"),
            None,
            &[("node-0", 5), ("node-1", 500)],
        ));
    }
    let g = mesh_graph(
        &mesh(&["node-0", "node-1"], peers),
        Timestamp::from_second(NOW).unwrap(),
    );
    assert_eq!(g.edges.len(), 24 * 23 / 2 + 4 * 2);
    let started = std::time::Instant::now();
    let text = svg(&[g]);
    eprintln!("laid out in {:?}", started.elapsed());
    let doc = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect();
    for want in [
        "node-23",
        "laptop-3",
        "never",
        "5s",
        "8m",
        "275 node pairs with a handshake",
    ] {
        assert!(texts.contains(&want), "no {want:?} in {texts:?}");
    }
    assert!(!texts.contains(&"10s"), "the recent pairs are left out");
}

#[test]
fn the_help_says_what_recent_is() {
    use clap::CommandFactory;
    let cli = crate::Cli::command();
    let graph = cli.find_subcommand("graph").unwrap();
    let help = graph
        .get_long_about()
        .or(graph.get_about())
        .unwrap()
        .to_string();
    assert!(help.contains(&format!("{RECENT_SECS} s")), "{help}");
}
