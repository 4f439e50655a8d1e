//! `graph`: each mesh as a picture. Member nodes (gateways marked), external peers attached to
//! the gateways they handshake with, and every link labeled with the age of its latest
//! handshake. The model ([`mesh_graph`]) is a pure function of the data `status` gathers;
//! it is printed as Graphviz DOT ([`dot`]) or laid out and drawn as SVG here ([`svg`], with
//! the `layout-rs` crate: no Graphviz needed).
//!
//! Names come from the cluster: they are escaped for DOT and XML, and control characters
//! are replaced, so a name can neither end a string nor add a line to a label.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;
use jiff::Timestamp;
use layout::backends::svg::SVGWriter;
use layout::core::base::Orientation;
use layout::core::color::Color;
use layout::core::style::{LineStyleKind, StyleAttr};
use layout::std_shapes::render::get_shape_size;
use layout::std_shapes::shapes::{Arrow, Element, LineEndKind, ShapeKind};
use layout::topo::layout::VisualGraph;

use crate::KubeArgs;
use crate::status::{self, MeshStatus, RECENT_SECS};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Graphviz DOT text (render it with `dot -Tpng`, or paste it in any DOT viewer).
    Dot,
    /// An SVG image, laid out here.
    Svg,
}

pub async fn run(kube: &KubeArgs, mesh: Option<String>, format: Format) -> Result<()> {
    let statuses = status::gather(kube, mesh.as_deref()).await?;
    let now = Timestamp::now();
    let graphs: Vec<MeshGraph> = statuses.iter().map(|s| mesh_graph(s, now)).collect();
    match format {
        Format::Dot => out!("{}", dot(&graphs)),
        Format::Svg => outln!("{}", svg(&graphs)),
    }
    Ok(())
}

/// One mesh: its vertices and the edges between them (indices into `vertices`).
#[derive(Debug, Clone, PartialEq)]
pub struct MeshGraph {
    pub mesh: String,
    pub vertices: Vec<Vertex>,
    pub edges: Vec<Edge>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Vertex {
    /// The Node's name for a member node, the WireGuardPeer's for an external peer.
    pub name: String,
    pub kind: Kind,
    pub ready: bool,
    /// Why it is not Ready (the condition's reason), when it is not.
    pub reason: String,
    /// The gateway carrying external traffic to the other nodes, when there are several.
    pub active: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    Gateway,
    External,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
    /// Node to node links are both ways; an external peer's points at its gateway.
    pub directed: bool,
    /// The age of the latest handshake (`12s`, `3m`), or `never`.
    pub label: String,
    pub freshness: Freshness,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// A handshake within [`RECENT_SECS`]: a live session.
    Recent,
    /// A handshake, but an older one.
    Stale,
    /// No handshake reported.
    Never,
}

/// The graph of one mesh at time `now`. Vertices: the member nodes in the order of the
/// status's rows, then the external peers. Edges: every pair of nodes, with the latest
/// handshake either side reports; each external peer to every node that reports a handshake
/// with it, or, when none does, to every gateway.
pub fn mesh_graph(s: &MeshStatus, now: Timestamp) -> MeshGraph {
    let mut vertices = Vec::new();
    let mut node_rows = Vec::new();
    let mut by_node: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &s.peers {
        let Some(node) = &r.node else { continue };
        let kind = if s.gateways.contains(node) {
            Kind::Gateway
        } else {
            Kind::Node
        };
        by_node.entry(node.as_str()).or_insert(vertices.len());
        node_rows.push((vertices.len(), node.as_str(), r));
        let mut v = vertex(node, kind, r);
        v.active = kind == Kind::Gateway
            && s.gateways.len() > 1
            && s.active_gateway.as_deref() == Some(node.as_str());
        vertices.push(v);
    }
    let edge = |from: usize, to: usize, directed: bool, last: Option<Timestamp>| {
        let (label, freshness) = match last {
            None => ("never".to_owned(), Freshness::Never),
            Some(t) if now.as_second() - t.as_second() > RECENT_SECS => {
                (status::age(now, t), Freshness::Stale)
            }
            Some(t) => (status::age(now, t), Freshness::Recent),
        };
        Edge {
            from,
            to,
            directed,
            label,
            freshness,
        }
    };
    let mut edges = Vec::new();
    for (i, (a, a_node, a_row)) in node_rows.iter().enumerate() {
        for (b, b_node, b_row) in &node_rows[i + 1..] {
            // What a says of b, and b of a: the later of the two.
            let last = b_row
                .handshakes
                .get(*a_node)
                .max(a_row.handshakes.get(*b_node))
                .copied();
            edges.push(edge(*a, *b, false, last));
        }
    }
    for r in s.peers.iter().filter(|r| r.node.is_none()) {
        let v = vertices.len();
        vertices.push(vertex(&r.name, Kind::External, r));
        let seen: Vec<(usize, Timestamp)> = r
            .handshakes
            .iter()
            .filter_map(|(node, t)| by_node.get(node.as_str()).map(|&n| (n, *t)))
            .collect();
        if seen.is_empty() {
            for g in s.gateways.iter().filter_map(|g| by_node.get(g.as_str())) {
                edges.push(edge(v, *g, true, None));
            }
        } else {
            for (n, t) in seen {
                edges.push(edge(v, n, true, Some(t)));
            }
        }
    }
    MeshGraph {
        mesh: s.mesh.clone(),
        vertices,
        edges,
    }
}

fn vertex(name: &str, kind: Kind, r: &status::PeerRow) -> Vertex {
    Vertex {
        name: name.to_owned(),
        kind,
        ready: r.ready,
        reason: if r.ready {
            String::new()
        } else {
            r.reason.clone()
        },
        active: false,
    }
}

impl Vertex {
    /// The label's lines: the name, what it is, and whether it is Ready.
    fn lines(&self) -> Vec<String> {
        let mut lines = vec![clean(&self.name)];
        match self.kind {
            Kind::Gateway if self.active => lines.push("gateway (active)".into()),
            Kind::Gateway => lines.push("gateway".into()),
            Kind::External => lines.push("external".into()),
            Kind::Node => {}
        }
        if !self.ready {
            lines.push(if self.reason.is_empty() {
                "not ready".into()
            } else {
                format!("not ready: {}", clean(&self.reason))
            });
        }
        lines
    }
}

/// `s` with control characters (newlines included) replaced: XML 1.0 cannot carry most of
/// them even escaped, and a newline would add a line to a label.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// `s` as a DOT quoted string; `s` must be [`clean`].
fn quoted(s: &str) -> String {
    format!("\"{}\"", escaped(s))
}

/// `s` escaped for a DOT quoted string. Inside quotes only `"` and `\` are special (a
/// backslash starts an escape like `\n` or `\N` in labels).
fn escaped(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The meshes as one Graphviz digraph, a cluster per mesh. Vertex ids are made up
/// (`m0_v1`); names appear only in quoted labels.
pub fn dot(graphs: &[MeshGraph]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph wgmesh {{");
    let _ = writeln!(out, "  graph [fontname=\"Helvetica\"];");
    let _ = writeln!(out, "  node [fontname=\"Helvetica\"];");
    let _ = writeln!(out, "  edge [fontname=\"Helvetica\", fontsize=10];");
    for (m, g) in graphs.iter().enumerate() {
        let _ = writeln!(out, "  subgraph cluster_{m} {{");
        let _ = writeln!(
            out,
            "    label={};",
            quoted(&format!("mesh {}", clean(&g.mesh)))
        );
        for (i, v) in g.vertices.iter().enumerate() {
            let label = v
                .lines()
                .iter()
                .map(|l| escaped(l))
                .collect::<Vec<_>>()
                .join("\\n");
            let style = match v.kind {
                Kind::Gateway => "shape=box, style=\"filled,bold\", fillcolor=\"lightblue\"",
                Kind::Node => "shape=box, style=filled, fillcolor=\"white\"",
                Kind::External => "shape=ellipse, style=filled, fillcolor=\"lightyellow\"",
            };
            let color = if v.ready { "" } else { ", color=\"red\"" };
            let _ = writeln!(out, "    m{m}_v{i} [label=\"{label}\", {style}{color}];");
        }
        for e in &g.edges {
            let dir = if e.directed { "" } else { ", dir=none" };
            let style = match e.freshness {
                Freshness::Recent => "",
                Freshness::Stale => ", style=dashed, color=\"gray\"",
                Freshness::Never => ", style=dashed, color=\"red\"",
            };
            let _ = writeln!(
                out,
                "    m{m}_v{} -> m{m}_v{} [label={}{dir}{style}];",
                e.from,
                e.to,
                quoted(&e.label)
            );
        }
        let _ = writeln!(out, "  }}");
    }
    let _ = writeln!(out, "}}");
    out
}

const FONT_SIZE: usize = 14;

/// Up to this many member nodes, the SVG draws every pair of them. Beyond, it draws only
/// the pairs without a recent handshake (the ones to look at) and says how many it left
/// out: layout-rs ranks a full mesh of n nodes as a chain n deep, and its layout time grows
/// far faster than the n² edges (24 nodes took minutes in a debug build, 12 a few seconds).
/// The DOT output always has every pair.
pub const SVG_FULL_MESH_MAX: usize = 10;

/// The meshes laid out and drawn as one SVG image. With more than one mesh each label says
/// its mesh; a mesh with no member and no peer is a box saying so. See
/// [`SVG_FULL_MESH_MAX`] for larger meshes.
pub fn svg(graphs: &[MeshGraph]) -> String {
    let dir = Orientation::TopToBottom;
    let mut vg = VisualGraph::new(dir);
    let many = graphs.len() > 1;
    let add = |vg: &mut VisualGraph, shape: ShapeKind, look: StyleAttr| {
        let size = get_shape_size(dir, &shape, FONT_SIZE, false);
        vg.add_node(Element::create(shape, look, dir, size))
    };
    for g in graphs {
        let mesh_line = format!("mesh {}", clean(&g.mesh));
        if g.vertices.is_empty() {
            let text = format!("{mesh_line}\nno nodes, no peers");
            add(&mut vg, ShapeKind::new_box(&text), look("white", "gray", 1));
            continue;
        }
        let handles: Vec<_> = g
            .vertices
            .iter()
            .map(|v| {
                let mut lines = v.lines();
                if many {
                    lines.push(mesh_line.clone());
                }
                let text = lines.join("\n");
                let line = if v.ready { "black" } else { "red" };
                let (shape, look) = match v.kind {
                    Kind::Gateway => (ShapeKind::new_box(&text), look("lightblue", line, 3)),
                    Kind::Node => (ShapeKind::new_box(&text), look("white", line, 1)),
                    Kind::External => (ShapeKind::new_circle(&text), look("lightyellow", line, 1)),
                };
                add(&mut vg, shape, look)
            })
            .collect();
        let members = g.vertices.iter().filter(|v| v.kind != Kind::External);
        let left_out = |e: &&Edge| {
            members.clone().count() > SVG_FULL_MESH_MAX
                && !e.directed
                && e.freshness == Freshness::Recent
        };
        let omitted = g.edges.iter().filter(left_out).count();
        if omitted > 0 {
            let mut text = format!(
                "{omitted} node pairs with a handshake\nwithin {RECENT_SECS} s: not drawn\n(-o dot has them)"
            );
            if many {
                text = format!("{mesh_line}\n{text}");
            }
            add(&mut vg, ShapeKind::new_box(&text), look("white", "gray", 1));
        }
        for e in g.edges.iter().filter(|e| !left_out(e)) {
            let (style, color) = match e.freshness {
                Freshness::Recent => (LineStyleKind::Normal, "black"),
                Freshness::Stale => (LineStyleKind::Dashed, "gray"),
                Freshness::Never => (LineStyleKind::Dashed, "red"),
            };
            let end = if e.directed {
                LineEndKind::Arrow
            } else {
                LineEndKind::None
            };
            let mut look = look("white", color, 1);
            look.font_size = FONT_SIZE - 2;
            let arrow = Arrow::new(LineEndKind::None, end, style, &e.label, &look, &None, &None);
            vg.add_edge(arrow, handles[e.from], handles[e.to]);
        }
    }
    if vg.num_nodes() == 0 {
        add(
            &mut vg,
            ShapeKind::new_box("no mesh"),
            look("white", "gray", 1),
        );
    }
    let mut writer = SVGWriter::new();
    vg.do_it(false, false, false, &mut writer);
    writer.finalize()
}

fn look(fill: &str, line: &str, width: usize) -> StyleAttr {
    StyleAttr::new(
        Color::fast(line),
        width,
        Some(Color::fast(fill)),
        if width > 1 { 4 } else { 0 },
        FONT_SIZE,
    )
}

#[cfg(test)]
#[path = "graph_tests.rs"]
mod tests;
