//! Updates in parts: split by the controller ([`crate::encode::peer_update_parts`]), joined by
//! the agent ([`crate::decode::PartsJoiner`]) into exactly the message sent whole.

use std::sync::Arc;

use wgmesh_core::desired::{DesiredMesh, MeshInput, NodeInput, PeerInput, compute};
use wgmesh_core::node_config::{NodeConfig, NodeDelta, NodeUpdate};
use wgmesh_core::{Cidr, PublicKey};

use prost::Message;

use crate::decode::PartsJoiner;
use crate::encode;
use crate::{MeshSettings, PeerUpdate, peer_update as wire};

/// What the agent receives: the served message, decoded as `v1`.
fn received(served: &crate::served::PeerUpdate) -> PeerUpdate {
    PeerUpdate::decode(&served.encode_to_vec()[..]).expect("a served update decodes")
}

fn peer_update(
    epoch: &str,
    revision: u64,
    view: &NodeConfig<MeshSettings>,
    update: &NodeUpdate<MeshSettings>,
) -> PeerUpdate {
    received(&encode::peer_update(epoch, revision, view, update))
}

fn peer_update_parts<'a>(
    epoch: &'a str,
    revision: u64,
    view: &'a NodeConfig<MeshSettings>,
    update: &'a NodeUpdate<MeshSettings>,
    max: usize,
) -> impl Iterator<Item = PeerUpdate> + 'a {
    encode::peer_update_parts(epoch, revision, view, update, max).map(|p| received(&p))
}

pub(crate) fn key(n: u16) -> PublicKey {
    let mut k = [0u8; 32];
    k[..2].copy_from_slice(&n.to_le_bytes());
    k[31] = 1;
    PublicKey::from_bytes(k)
}

/// A mesh of `n` nodes `n0`.., each with a pod CIDR and a tunnel address.
fn mesh(n: u16) -> Arc<DesiredMesh> {
    mesh_with(n, MeshInput::default(), Vec::new())
}

/// [`mesh`] with the mesh's settings from `input` (its name and pools are set here) and
/// `external` peers besides the nodes.
pub(crate) fn mesh_with(n: u16, input: MeshInput, external: Vec<PeerInput>) -> Arc<DesiredMesh> {
    let nodes: Vec<NodeInput> = (0..n)
        .map(|i| NodeInput {
            name: format!("n{i}"),
            uid: format!("uid-{i}"),
            selected: true,
            gateway: true,
            pod_cidrs: vec![
                format!("10.{}.{}.0/24", 100 + i / 256, i % 256)
                    .parse()
                    .unwrap(),
            ],
            ..NodeInput::default()
        })
        .collect();
    let peers: Vec<PeerInput> = (0..n)
        .map(|i| PeerInput {
            name: format!("n{i}"),
            created: i64::from(i),
            previously_programmed: false,
            seniority: 0,
            public_key: key(i),
            allowed_ips: vec![],
            endpoint: Some(format!("192.0.2.1:{}", 1000 + i)),
            last_seen_endpoint: None,
            persistent_keepalive: None,
            preshared_key: None,
            responder: false,
            disabled: false,
            node: Some(format!("n{i}")),
            node_owner_uid: Some(format!("uid-{i}")),
            tunnel_addresses: vec![format!("10.250.{}.{}", i / 256, i % 256).parse().unwrap()],
        })
        .chain(external)
        .collect();
    let input = MeshInput {
        name: "m".into(),
        tunnel_pools: vec!["10.250.0.0/16".parse::<Cidr>().unwrap()],
        ..input
    };
    Arc::new(compute(&input, &nodes, &peers))
}

fn view(n: u16) -> NodeConfig<MeshSettings> {
    let settings = MeshSettings {
        interface_name: "wgmesh0".into(),
        ..MeshSettings::default()
    };
    NodeConfig::of("n0", Some(Arc::new(settings)), mesh(n))
}

fn join(parts: impl IntoIterator<Item = PeerUpdate>) -> (usize, PeerUpdate) {
    let mut joiner = PartsJoiner::default();
    let mut count = 0;
    let mut joined = None;
    for part in parts {
        count += 1;
        assert!(joined.is_none(), "a part after the last one");
        joined = joiner.push(part).expect("parts join");
    }
    (count, joined.expect("the last part completes the update"))
}

#[test]
fn split_updates_join_back_into_the_whole_message() {
    let view = view(130);
    let removed: Vec<PublicKey> = (1000..1120).map(key).collect();
    let upserted: Vec<_> = view.peers().take(7).cloned().collect();
    let delta = NodeUpdate::Delta(NodeDelta {
        upserted,
        removed,
        settings: view.settings.clone(),
        addresses_changed: true,
        pod_cidrs_changed: false,
        allowed_ips_changes: (2000..2060)
            .map(|n| wgmesh_core::diff::AllowedIpsChange {
                public_key: key(n),
                added: vec!["192.168.1.0/24".parse().unwrap()],
                removed: vec!["192.168.2.0/24".parse().unwrap()],
            })
            .collect(),
    });
    struct Case<'a> {
        name: &'a str,
        update: &'a NodeUpdate<MeshSettings>,
        max: usize,
        parts: usize,
    }
    let cases = [
        Case {
            name: "snapshot of 129 peers by 50",
            update: &NodeUpdate::Snapshot,
            max: 50,
            parts: 3,
        },
        Case {
            name: "snapshot that fits",
            update: &NodeUpdate::Snapshot,
            max: 500,
            parts: 1,
        },
        Case {
            name: "delta of 7 upserted, 120 removed, 60 changed by 50",
            update: &delta,
            max: 50,
            parts: 3,
        },
        Case {
            name: "delta that fits",
            update: &delta,
            max: 120,
            parts: 1,
        },
    ];
    for case in cases {
        let whole = peer_update("e", 9, &view, case.update);
        let parts: Vec<PeerUpdate> =
            peer_update_parts("e", 9, &view, case.update, case.max).collect();
        let flags: Vec<bool> = parts.iter().map(|p| p.more_parts).collect();
        let mut want = vec![true; case.parts - 1];
        want.push(false);
        assert_eq!(flags, want, "{}", case.name);
        for later in &parts[1..] {
            let size = match &later.update {
                Some(wire::Update::Snapshot(s)) => {
                    assert!(
                        s.mesh.is_none() && s.tunnel_addresses.is_empty(),
                        "{}: only peers",
                        case.name
                    );
                    s.peers.len()
                }
                Some(wire::Update::Delta(d)) => {
                    assert!(
                        d.mesh.is_none() && d.tunnel_addresses.is_empty(),
                        "{}: only peers",
                        case.name
                    );
                    d.upserted
                        .len()
                        .max(d.removed.len())
                        .max(d.changed_allowed_ips.len())
                }
                None => panic!("{}: an empty part", case.name),
            };
            assert!(size <= case.max, "{}: a part of {size}", case.name);
        }
        let (count, joined) = join(parts);
        assert_eq!(count, case.parts, "{}", case.name);
        assert_eq!(
            joined, whole,
            "{}: joined equals the whole message",
            case.name
        );
    }
}

#[test]
fn parts_that_do_not_belong_together_are_refused() {
    let view = view(10);
    let parts: Vec<PeerUpdate> =
        peer_update_parts("e", 9, &view, &NodeUpdate::Snapshot, 4).collect();
    assert_eq!(parts.len(), 3);

    let mut other_revision = parts[1].clone();
    other_revision.revision = 10;
    let mut other_kind = parts[1].clone();
    other_kind.update = Some(wire::Update::Delta(crate::PeerDelta::default()));
    for (name, second) in [
        ("another revision", other_revision),
        ("another kind", other_kind),
    ] {
        let mut joiner = PartsJoiner::default();
        assert_eq!(joiner.push(parts[0].clone()), Ok(None));
        let e = joiner.push(second).expect_err(name);
        assert_eq!(e.field, "more_parts", "{name}");
    }
}
