//! Which agents are live, from what they do rather than from heartbeat writes: an open peer
//! stream and status reports (every agent reports every few seconds, to whichever replica it
//! is connected to, which forwards to the lease holder). The status writer uses it to move
//! the active gateway ([`wgmesh_core::gateway`]) off a gateway whose agent went away.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When an agent counts as down.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// After its stream to this replica closed, without a report since: the agent or its
    /// node stopped (a restart reconnects well within it).
    pub closed: Duration,
    /// Without any report or stream: the agent is partitioned or served by another replica
    /// that lost it.
    pub silent: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Seen {
    last_heard: Instant,
    open_streams: u32,
    /// When its last stream to this replica closed, if none is open.
    closed_at: Option<Instant>,
}

#[derive(Default)]
pub struct Liveness {
    /// (mesh, node) -> what this replica saw of the node's agent.
    seen: Mutex<HashMap<(String, String), Seen>>,
}

impl Liveness {
    /// A report from (or forwarded for) the agent.
    pub fn heard(&self, mesh: &str, node: &str, now: Instant) {
        let mut seen = self.seen.lock().expect("liveness lock");
        let s = seen
            .entry((mesh.to_owned(), node.to_owned()))
            .or_insert(Seen {
                last_heard: now,
                open_streams: 0,
                closed_at: None,
            });
        s.last_heard = now;
    }

    pub fn stream_opened(&self, mesh: &str, node: &str, now: Instant) {
        let mut seen = self.seen.lock().expect("liveness lock");
        let s = seen
            .entry((mesh.to_owned(), node.to_owned()))
            .or_insert(Seen {
                last_heard: now,
                open_streams: 0,
                closed_at: None,
            });
        s.last_heard = now;
        s.open_streams += 1;
        s.closed_at = None;
    }

    pub fn stream_closed(&self, mesh: &str, node: &str, now: Instant) {
        let mut seen = self.seen.lock().expect("liveness lock");
        if let Some(s) = seen.get_mut(&(mesh.to_owned(), node.to_owned())) {
            s.open_streams = s.open_streams.saturating_sub(1);
            if s.open_streams == 0 {
                s.closed_at = Some(now);
            }
        }
    }

    /// Of `nodes`, those whose agents are down at `now`. `since` is when this replica began
    /// to hear every agent (it became the lease holder, to which reports are forwarded):
    /// nobody is silent for longer than that.
    pub fn down<'a>(
        &self,
        mesh: &str,
        nodes: impl IntoIterator<Item = &'a String>,
        since: Instant,
        now: Instant,
        limits: Limits,
    ) -> BTreeSet<String> {
        let seen = self.seen.lock().expect("liveness lock");
        nodes
            .into_iter()
            .filter(|n| {
                let s = seen.get(&(mesh.to_owned(), (*n).clone())).copied();
                down_at(s, since, limits).is_some_and(|at| at <= now)
            })
            .cloned()
            .collect()
    }

    /// The next time after `now` one of `nodes` goes down unless heard from: when to look
    /// again.
    pub fn next_change<'a>(
        &self,
        mesh: &str,
        nodes: impl IntoIterator<Item = &'a String>,
        since: Instant,
        now: Instant,
        limits: Limits,
    ) -> Option<Instant> {
        let seen = self.seen.lock().expect("liveness lock");
        nodes
            .into_iter()
            .filter_map(|n| {
                down_at(
                    seen.get(&(mesh.to_owned(), n.clone())).copied(),
                    since,
                    limits,
                )
            })
            .filter(|at| *at > now)
            .min()
    }

    /// Forgets the nodes `keep` rejects.
    pub fn retain(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        let mut seen = self.seen.lock().expect("liveness lock");
        seen.retain(|(mesh, node), _| keep(mesh, node));
    }
}

/// When an agent seen as `s` is down, unless heard from before; `None`: not while a stream is
/// open and reports keep coming.
fn down_at(s: Option<Seen>, since: Instant, limits: Limits) -> Option<Instant> {
    let Some(s) = s else {
        return Some(since + limits.silent);
    };
    let heard = s.last_heard.max(since);
    match s.closed_at {
        // Closed here and not heard of since (not even through another replica).
        Some(closed) if s.last_heard <= closed => Some(closed + limits.closed),
        _ => Some(heard + limits.silent),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        closed: Duration::from_secs(5),
        silent: Duration::from_secs(30),
    };

    #[test]
    fn down_table() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let n = "n".to_owned();
        // (what happened, at what second (stream opened, closed, heard), asked at, down?)
        enum Event {
            Open,
            Close,
            Heard,
        }
        use Event::*;
        type Case<'a> = (&'a str, Vec<(Event, u64)>, u64, bool);
        let cases: Vec<Case> = vec![
            (
                "never seen, within the silence limit of becoming holder",
                vec![],
                29,
                false,
            ),
            ("never seen, past it", vec![], 31, true),
            (
                "a stream open and reports coming",
                vec![(Open, 0), (Heard, 20), (Heard, 40)],
                60,
                false,
            ),
            (
                "a stream open, but silent too long",
                vec![(Open, 0), (Heard, 10)],
                41,
                true,
            ),
            (
                "stream closed, within the closed limit",
                vec![(Open, 0), (Close, 10)],
                14,
                false,
            ),
            (
                "stream closed, past it",
                vec![(Open, 0), (Close, 10)],
                16,
                true,
            ),
            (
                "closed and reopened (a restart)",
                vec![(Open, 0), (Close, 10), (Open, 11)],
                20,
                false,
            ),
            (
                "closed here, reporting through another replica",
                vec![(Open, 0), (Close, 10), (Heard, 12)],
                20,
                false,
            ),
            (
                "two streams, one closed",
                vec![(Open, 0), (Open, 1), (Close, 10)],
                20,
                false,
            ),
        ];
        for (name, events, at, want) in cases {
            let l = Liveness::default();
            for (e, sec) in events {
                match e {
                    Open => l.stream_opened("m", &n, s(sec)),
                    Close => l.stream_closed("m", &n, s(sec)),
                    Heard => l.heard("m", &n, s(sec)),
                }
            }
            let down = l.down("m", [&n], t0, s(at), LIMITS);
            assert_eq!(down.contains(&n), want, "{name}");
            if !want {
                let next = l.next_change("m", [&n], t0, s(at), LIMITS);
                assert!(next.is_some_and(|t| t > s(at)), "{name}: {next:?}");
            }
        }
    }

    #[test]
    fn leadership_starts_the_silence_clock() {
        let t0 = Instant::now();
        let n = "n".to_owned();
        let l = Liveness::default();
        l.heard("m", &n, t0);
        // Heard long before this replica became the holder: counted from then.
        let since = t0 + Duration::from_secs(100);
        assert!(
            l.down("m", [&n], since, since + Duration::from_secs(29), LIMITS)
                .is_empty()
        );
        assert!(
            !l.down("m", [&n], since, since + Duration::from_secs(31), LIMITS)
                .is_empty()
        );
    }
}
