//! Any bytes, decoded as one of the requests agents send the controller (the first byte picks
//! which): decoding and `wgmesh_proto::checked` must not panic, and what they accept must
//! keep the checked invariants (valid names, bounded sizes, reports scoped to the peer set
//! with no handshake in the future).
#![no_main]

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use wgmesh_proto::checked::{self, MAX_ENDPOINT_ADDRESSES, MAX_REPORTED_PEERS, is_object_name};
use wgmesh_proto::{RegisterRequest, ReportStatusRequest, WatchPeersRequest};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            let Ok(req) = RegisterRequest::decode(bytes) else { return };
            if let Ok(r) = checked::register(&req) {
                assert!(is_object_name(&r.node) && is_object_name(&r.mesh));
                assert!(r.listen_port != 0);
                assert!(r.endpoint_addresses.len() <= MAX_ENDPOINT_ADDRESSES);
                assert!(r.agent_version.len() <= checked::MAX_AGENT_VERSION);
            }
        }
        1 => {
            let Ok(req) = WatchPeersRequest::decode(bytes) else { return };
            if let Ok(w) = checked::watch(&req) {
                assert!(is_object_name(&w.node) && is_object_name(&w.mesh));
            }
        }
        _ => {
            let Ok(req) = ReportStatusRequest::decode(bytes) else { return };
            let Ok(report) = checked::report(&req) else { return };
            assert!(report.peers.len() <= MAX_REPORTED_PEERS);
            // The node's peer set: every other key it reported, so both sides are exercised.
            let peer_set: BTreeSet<_> =
                report.peers.iter().step_by(2).map(|p| p.public_key).collect();
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
            let total = report.peers.len();
            let (kept, dropped) = checked::scope(report.peers, |k| peer_set.contains(k), now);
            assert_eq!(kept.len() + dropped, total);
            assert!(kept.len() <= peer_set.len());
            let mut seen = BTreeSet::new();
            for o in &kept {
                assert!(peer_set.contains(&o.public_key), "a key outside the peer set");
                assert!(seen.insert(o.public_key), "a key kept twice");
                assert!(o.last_handshake.is_none_or(|t| t <= now), "a future handshake");
                if let Some(e) = &o.endpoint {
                    assert!(e.parse::<std::net::SocketAddr>().is_ok(), "endpoint {e:?}");
                }
            }
        }
    }
});
