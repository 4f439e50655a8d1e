//! Meshes that would fight over a node: a node is in one mesh at a time. Two meshes that
//! select the same node would each program an interface, a UDP port and their pools' routes
//! there, and the agent's policy rules, guards and nftables table are the node's, not the
//! mesh's: two agents would remove each other's (the rule selecting a mesh's guards among
//! them, leaving its traffic to the other routes). The older mesh keeps the node; the newer
//! one is held until the conflict is gone.

use std::collections::{BTreeMap, BTreeSet};

use crate::Cidr;

/// What a mesh takes on each node it selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshClaim {
    pub name: String,
    /// Creation time in seconds since the epoch: the older mesh keeps what it has.
    pub created: i64,
    pub interface: String,
    pub listen_port: u16,
    pub tunnel_pools: Vec<Cidr>,
    /// The nodes it selects.
    pub nodes: BTreeSet<String>,
}

/// The meshes that conflict with an older one on some node, each with a message naming the
/// older mesh, the node and what both claim. Oldest first (then by name) keeps its claims;
/// a held mesh claims nothing, so a third mesh is judged against the ones that run.
pub fn conflicts(claims: &[MeshClaim]) -> BTreeMap<String, String> {
    let mut order: Vec<&MeshClaim> = claims.iter().collect();
    order.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
    let mut kept: Vec<&MeshClaim> = Vec::new();
    let mut out = BTreeMap::new();
    for mesh in order {
        let clash = kept.iter().find_map(|older| {
            let node = mesh.nodes.intersection(&older.nodes).next()?;
            let pools = mesh.tunnel_pools.iter().find_map(|a| {
                older
                    .tunnel_pools
                    .iter()
                    .find(|b| a.overlaps(b))
                    .map(|b| (a, b))
            });
            let same = if mesh.interface == older.interface {
                format!(" and uses the same interface {}", mesh.interface)
            } else if mesh.listen_port == older.listen_port {
                format!(" and uses the same UDP port {}", mesh.listen_port)
            } else if let Some((a, b)) = pools {
                format!(" and uses the same tunnel pool {a} (theirs {b})")
            } else {
                String::new()
            };
            Some(format!(
                "held as it is: mesh {} (older) also selects node {node}{same}; a node is in \
                 one mesh at a time (its agent's policy rules, guards and nftables table are \
                 the node's): select other nodes",
                older.name
            ))
        });
        match clash {
            Some(message) => {
                out.insert(mesh.name.clone(), message);
            }
            None => kept.push(mesh),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(
        name: &str,
        created: i64,
        interface: &str,
        port: u16,
        pool: &str,
        nodes: &[&str],
    ) -> MeshClaim {
        MeshClaim {
            name: name.into(),
            created,
            interface: interface.into(),
            listen_port: port,
            tunnel_pools: vec![pool.parse().unwrap()],
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn conflict_table() {
        let base = || claim("default", 1, "wgmesh0", 51820, "10.250.0.0/16", &["a", "b"]);
        // name, the meshes, (held mesh, what its message names)
        type Case<'a> = (&'a str, Vec<MeshClaim>, &'a [(&'a str, &'a str)]);
        let cases: Vec<Case> = vec![
            ("one mesh", vec![base()], &[]),
            (
                "separate nodes may share everything",
                vec![
                    base(),
                    claim("edge", 2, "wgmesh0", 51820, "10.250.0.0/16", &["c"]),
                ],
                &[],
            ),
            (
                "a node shared, even with its own interface, port and pool",
                vec![
                    base(),
                    claim("edge", 2, "wg1", 51821, "10.251.0.0/16", &["b", "c"]),
                ],
                &[(
                    "edge",
                    "also selects node b; a node is in one mesh at a time",
                )],
            ),
            (
                "the same interface",
                vec![
                    base(),
                    claim("edge", 2, "wgmesh0", 51821, "10.251.0.0/16", &["b"]),
                ],
                &[("edge", "interface wgmesh0")],
            ),
            (
                "the same port",
                vec![
                    base(),
                    claim("edge", 2, "wg1", 51820, "10.251.0.0/16", &["b"]),
                ],
                &[("edge", "UDP port 51820")],
            ),
            (
                "overlapping pools",
                vec![
                    base(),
                    claim("edge", 2, "wg1", 51821, "10.250.128.0/17", &["a"]),
                ],
                &[("edge", "tunnel pool 10.250.128.0/17")],
            ),
            (
                "the newer loses, whatever the order given",
                vec![
                    claim("edge", 0, "wgmesh0", 1, "10.9.0.0/16", &["a"]),
                    base(),
                ],
                &[("default", "mesh edge (older)")],
            ),
            (
                "a held mesh claims nothing",
                vec![
                    base(),
                    claim("edge", 2, "wgmesh0", 51821, "10.251.0.0/16", &["a", "c"]),
                    claim("lab", 3, "wg2", 51822, "10.251.0.0/16", &["c"]),
                ],
                &[("edge", "interface wgmesh0")],
            ),
            (
                "three meshes on separate nodes",
                vec![
                    base(),
                    claim("edge", 2, "wgmesh0", 51820, "10.250.0.0/16", &["c"]),
                    claim("lab", 3, "wgmesh0", 51820, "10.250.0.0/16", &["d"]),
                ],
                &[],
            ),
        ];
        for (name, claims, want) in cases {
            let got = conflicts(&claims);
            assert_eq!(got.len(), want.len(), "{name}: {got:?}");
            for (mesh, part) in want {
                let message = got.get(*mesh).unwrap_or_else(|| panic!("{name}: {got:?}"));
                assert!(message.contains(part), "{name}: {message}");
            }
        }
    }
}
