//! Sessions a configuration change ends, and the handshakes that start the new ones.
//!
//! Both ends of a pair change in turn, each when the controller's update reaches it: a key
//! rotation gives the rotated node a new key (and, with a mesh secret, every pair of it a new
//! preshared key), which the other end learns a moment before or after. A handshake started
//! by the end that changed first fails (the other end does not know the new key, or still
//! has the old preshared key), and WireGuard tries again only after `REKEY_TIMEOUT` (5 s),
//! or when the other end has a packet to send: a TCP stream stalled that long.
//!
//! So the end that changes a session that was in use (our new key, a peer's new preshared
//! key, or a new peer taking over a live one's allowed IPs: the other node's new key) starts
//! the new one itself, without waiting for a packet; whichever end changes last does so with
//! both ends agreed, and its handshake completes. Where the other end cannot start one (the
//! kernel and wireguard-go keep their session through a new preshared key and never start a
//! handshake for it), ours is sent again at short, doubling intervals until there is a
//! session to send on, so the pair waits for the other end's change plus one interval, not
//! for `REKEY_TIMEOUT`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wgmesh_core::Cidr;

use super::peers::Peer;

/// How long after a change its first handshake is sent. An initiation sent before the change
/// (with the old key or preshared key, by the data path) may reach the other end just before
/// ours, and WireGuard ignores a peer's initiations that come less than 20 ms apart
/// (`INITIATIONS_PER_SECOND`, a flood guard): ours would be dropped and retried only after
/// `REKEY_TIMEOUT`.
const HANDSHAKE_AFTER_CHANGE: Duration = Duration::from_millis(50);

/// The wait before the first resend; each later one waits twice the one before, so that a
/// distant peer's answer (a phone on a mobile network) still finds the initiation it answers
/// (boringtun accepts answers to its latest two).
const FIRST_RESEND: Duration = Duration::from_millis(250);

/// Resends stop this long after the change: WireGuard's own retries (`REKEY_TIMEOUT`) take
/// over from there.
const RESEND_UNTIL: Duration = Duration::from_secs(5);

/// Sessions a configuration change ended or moved, within one `apply_ops` transaction.
#[derive(Default)]
pub(crate) struct Handover {
    /// Allowed IPs that peers with a session in use gave up (removed, or taken by another
    /// peer): a new peer taking them (a node's new key) takes over that traffic.
    pub released: HashSet<Cidr>,
    /// Peers to start a handshake with once the change is published.
    pub restart: Vec<Arc<Peer>>,
}

/// What names a peer's runtime state (not its configuration: a peer removed and added
/// again is another one).
pub(crate) trait PeerId {
    fn peer_id(&self) -> usize;
}

impl PeerId for Arc<Peer> {
    fn peer_id(&self) -> usize {
        Arc::as_ptr(self) as usize
    }
}

/// One handshake to send now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Send<T> {
    pub peer: T,
    /// Replace a handshake under way (one the data path started may be with the other end's
    /// old keys): every send after the first.
    pub force: bool,
}

struct Pending<T> {
    peer: T,
    changed: Instant,
    next: Instant,
    /// The wait after `next` for the send after it.
    interval: Duration,
    sent: bool,
}

/// The handshakes changes asked for, on the control thread: when each is sent, again and
/// again, until the peer has a session to send on or `RESEND_UNTIL` has passed.
pub(crate) struct Handshakes<T> {
    /// By [`PeerId`]: a node's new key restarts every session at once.
    pending: HashMap<usize, Pending<T>>,
}

impl<T: Clone + PeerId> Handshakes<T> {
    pub(crate) fn new() -> Handshakes<T> {
        Handshakes {
            pending: HashMap::new(),
        }
    }

    /// A change ended `peer`'s session, and reached the control thread at `now`; a later
    /// change to the same peer starts its schedule again.
    pub(crate) fn changed(&mut self, peer: T, now: Instant) {
        let pending = Pending {
            peer,
            changed: now,
            next: now + HANDSHAKE_AFTER_CHANGE,
            interval: FIRST_RESEND,
            sent: false,
        };
        self.pending.insert(pending.peer.peer_id(), pending);
    }

    /// When the next send is due, if any is pending.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.next).min()
    }

    /// The sends due at `now`. `settled(peer)`: the peer has a session to send on again (the
    /// new one: the change ended the old), or is gone; either ends its sends.
    pub(crate) fn due(&mut self, now: Instant, settled: impl Fn(&T) -> bool) -> Vec<Send<T>> {
        let mut sends = Vec::new();
        self.pending.retain(|_, p| {
            if settled(&p.peer) {
                return false;
            }
            if now < p.next {
                return true;
            }
            sends.push(Send {
                peer: p.peer.clone(),
                force: p.sent,
            });
            p.sent = true;
            p.next = now + p.interval;
            p.interval *= 2;
            p.next.duration_since(p.changed) < RESEND_UNTIL
        });
        sends
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl PeerId for u8 {
        fn peer_id(&self) -> usize {
            usize::from(*self)
        }
    }

    /// The sends at each of `steps` (ms after the change), with the peer settled from
    /// `settled_ms` on.
    fn run(steps: &[u64], settled_ms: Option<u64>) -> Vec<(u64, bool)> {
        let start = Instant::now();
        let mut h = Handshakes::new();
        h.changed(7u8, start);
        let mut sent = Vec::new();
        for &ms in steps {
            let now = start + Duration::from_millis(ms);
            let settled = settled_ms.is_some_and(|s| ms >= s);
            for s in h.due(now, |_| settled) {
                assert_eq!(s.peer, 7);
                sent.push((ms, s.force));
            }
        }
        sent
    }

    #[test]
    fn resends_at_doubling_intervals_until_a_handshake_or_rekey_timeout() {
        let every_10ms: Vec<u64> = (0..800).map(|i| i * 10).collect();
        struct Case {
            name: &'static str,
            settled_ms: Option<u64>,
            sends: &'static [(u64, bool)],
        }
        let cases = [
            Case {
                name: "never answered: at 50 ms, then 250, 500, 1000 and 2000 ms later",
                settled_ms: None,
                sends: &[
                    (50, false),
                    (300, true),
                    (800, true),
                    (1800, true),
                    (3800, true),
                ],
            },
            Case {
                name: "answered after the second send",
                settled_ms: Some(500),
                sends: &[(50, false), (300, true)],
            },
            Case {
                name: "answered at once",
                settled_ms: Some(60),
                sends: &[(50, false)],
            },
        ];
        for c in cases {
            assert_eq!(run(&every_10ms, c.settled_ms), c.sends, "{}", c.name);
        }
    }

    #[test]
    fn nothing_is_sent_once_the_new_session_is_up() {
        // The data path's handshake, started by a packet right after the change, completed.
        assert_eq!(run(&[0, 10, 50, 300], Some(10)), vec![]);
    }

    #[test]
    fn a_new_change_restarts_the_schedule_and_nothing_is_due_when_nothing_is_pending() {
        let start = Instant::now();
        let mut h = Handshakes::new();
        assert_eq!(h.next_due(), None);
        h.changed(1u8, start);
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(h.due(at(50), |_| false).len(), 1);
        h.changed(1u8, at(100));
        assert_eq!(h.next_due(), Some(at(150)));
        let again = h.due(at(150), |_| false);
        assert_eq!(
            again,
            vec![Send {
                peer: 1,
                force: false
            }]
        );
        h.changed(2u8, at(160));
        assert_eq!(h.next_due(), Some(at(210)));
    }
}
