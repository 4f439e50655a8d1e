//! The node's nftables rules (pod egress masquerade, MSS clamping, controller replies) against the real kernel's
//! nf_tables, in a network namespace: the batch is accepted, applying it again replaces the
//! table whole, and removing works whether or not the table exists. What the rules do to
//! packets is checked end to end (`tests/e2e/tests/pod_egress.rs`, `mss_clamp.rs`). Needs
//! root.

use wgmesh_agent::netfilter::{ControllerConnections, Egress, MssClamp, NodeRules, apply};

#[path = "../../device/tests/common/mod.rs"]
mod common;

use common::{Netns, is_root};

#[test]
fn the_kernel_takes_the_batch_and_it_replaces_and_removes_the_table() {
    if !is_root("masquerade") {
        return;
    }
    let ns = Netns::new(format!("wgmq-{}", std::process::id()));
    ns.run(move || async move {
        // Removing what is not there is not an error (a node that never had the rules).
        apply(None).await.unwrap();
        let egress = Egress {
            pod_cidrs: vec![
                "10.244.1.0/24".parse().unwrap(),
                "fd00:10:244:1::/64".parse().unwrap(),
            ],
            keep_source_via: vec!["wgmesh0".into(), "wgmesh-br0".into()],
        };
        let clamp = MssClamp {
            interface: "wgmesh0".into(),
            mtu: 1420,
        };
        let replies = ControllerConnections {
            port: 9443,
            mark: 0x5157,
            tunnel: "wgmesh0".into(),
        };
        let both = NodeRules {
            egress: Some(egress.clone()),
            mss_clamp: Some(clamp.clone()),
            controller_connections: Some(replies.clone()),
        };
        apply(Some(&both)).await.unwrap();
        // Again, and with another pod CIDR and MTU: the table is replaced, not appended to.
        apply(Some(&both)).await.unwrap();
        let other = NodeRules {
            egress: Some(Egress {
                pod_cidrs: vec!["10.244.9.0/24".parse().unwrap()],
                ..egress
            }),
            mss_clamp: Some(MssClamp { mtu: 1320, ..clamp }),
            controller_connections: Some(ControllerConnections {
                port: 443,
                ..replies
            }),
        };
        apply(Some(&other)).await.unwrap();
        apply(Some(&NodeRules {
            egress: None,
            ..other
        }))
        .await
        .unwrap();
        apply(None).await.unwrap();
        apply(None).await.unwrap();
    });
}
