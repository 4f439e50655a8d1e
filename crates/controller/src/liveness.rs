//! Which agents are down, from what they do rather than from heartbeat writes: an agent's
//! peer stream is open while it runs (HTTP/2 keepalive closes it within a minute of a silent
//! death), and it reports when its peers change. Replicas that do not hold the lease forward
//! their streams' openings and closings to the holder, as they forward reports. An agent is
//! down once its last stream closed more than the limit ago with no stream or report since,
//! or when the lease holder has not seen it at all [`UNSEEN`] after taking the lease. Report
//! silence alone proves nothing: a quiet agent sends nothing but its open stream. The status
//! writer uses it to move the active gateway ([`wgmesh_core::gateway`]) off a gateway
//! whose agent went away.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long after its last stream closed (with no stream or report since) an agent is
/// down: long enough for a restart to reconnect.
pub type Limit = Duration;

/// How long a new lease holder waits for an agent it has never seen before counting it down:
/// streams on other replicas are announced within seconds of the change, and after a
/// controller restart every agent reconnects well within it (backoff at most 30 s).
pub const UNSEEN: Duration = Duration::from_secs(120);

/// How often a replica tells the lease holder again every count of open streams it has, and
/// how long the holder believes a count it was not told again: a replica that died (or
/// restarted under a new identity) cannot say its streams closed.
pub const REMOTE_COUNT_REFRESH: Duration = Duration::from_secs(60);
const REMOTE_COUNT_TRUSTED: Duration = Duration::from_secs(180);

/// What happened to an agent's peer stream; forwarded between replicas by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    Opened,
    Closed,
}

impl StreamEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            StreamEvent::Opened => "opened",
            StreamEvent::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "opened" => Some(StreamEvent::Opened),
            "closed" => Some(StreamEvent::Closed),
            _ => None,
        }
    }
}

/// Where a stream is: on this replica, or on another that forwarded its opening or closing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Local,
    Remote,
}

#[derive(Clone, Copy, Debug)]
struct Seen {
    last_heard: Instant,
    local_streams: u32,
    remote_streams: u32,
    /// Until when the other replicas' counts (`remote_streams`) are believed without being
    /// told again; `None` for counts from replicas that tell events, not counts.
    remote_trusted_until: Option<Instant>,
    /// When its last stream closed, if none is open.
    closed_at: Option<Instant>,
}

impl Seen {
    fn new(now: Instant) -> Self {
        Seen {
            last_heard: now,
            local_streams: 0,
            remote_streams: 0,
            remote_trusted_until: None,
            closed_at: None,
        }
    }

    fn streams(&mut self, origin: Origin) -> &mut u32 {
        match origin {
            Origin::Local => &mut self.local_streams,
            Origin::Remote => &mut self.remote_streams,
        }
    }
}

/// By replica identity: the streams an agent has open there, and when the replica said so.
type RemoteCounts = HashMap<String, (u32, Instant)>;

#[derive(Default)]
pub struct Liveness {
    /// (mesh, node) -> what this replica saw of the node's agent.
    seen: Mutex<HashMap<(String, String), Seen>>,
    /// (mesh, node) -> the streams each other replica says the agent has open there, and
    /// when it said so, by the replica's identity ([`Liveness::remote_streams`]);
    /// `Seen::remote_streams` is their sum.
    remote: Mutex<HashMap<(String, String), RemoteCounts>>,
}

impl Liveness {
    /// A report from (or forwarded for) the agent.
    pub fn heard(&self, mesh: &str, node: &str, now: Instant) {
        let mut seen = self.seen.lock().expect("liveness lock");
        let s = seen
            .entry((mesh.to_owned(), node.to_owned()))
            .or_insert(Seen::new(now));
        s.last_heard = now;
    }

    pub fn stream_opened(&self, mesh: &str, node: &str, origin: Origin, now: Instant) {
        let mut seen = self.seen.lock().expect("liveness lock");
        let s = seen
            .entry((mesh.to_owned(), node.to_owned()))
            .or_insert(Seen::new(now));
        s.last_heard = now;
        *s.streams(origin) += 1;
        s.closed_at = None;
    }

    pub fn stream(&self, mesh: &str, node: &str, event: StreamEvent, origin: Origin, now: Instant) {
        match event {
            StreamEvent::Opened => self.stream_opened(mesh, node, origin, now),
            StreamEvent::Closed => self.stream_closed(mesh, node, origin, now),
        }
    }

    /// A close whose opening this replica never saw (it became the lease holder since)
    /// counts too.
    pub fn stream_closed(&self, mesh: &str, node: &str, origin: Origin, now: Instant) {
        let mut seen = self.seen.lock().expect("liveness lock");
        let s = seen
            .entry((mesh.to_owned(), node.to_owned()))
            .or_insert(Seen::new(now));
        let n = s.streams(origin);
        *n = n.saturating_sub(1);
        if s.local_streams + s.remote_streams == 0 {
            s.closed_at = Some(now);
        }
    }

    /// Another replica (`origin`) says how many streams the agent has open there now. Told
    /// in order and as a whole count, so a lost or repeated message is made good by the next.
    pub fn remote_streams(&self, mesh: &str, node: &str, origin: &str, open: u32, now: Instant) {
        let key = (mesh.to_owned(), node.to_owned());
        let total = {
            let mut remote = self.remote.lock().expect("liveness lock");
            let by_origin = remote.entry(key.clone()).or_default();
            if open == 0 {
                by_origin.remove(origin);
            } else {
                by_origin.insert(origin.to_owned(), (open, now));
            }
            // A replica that stopped telling (it died) is not believed any more.
            by_origin
                .retain(|_, (_, told)| now.saturating_duration_since(*told) < REMOTE_COUNT_TRUSTED);
            let total = remote_total(by_origin);
            let trusted_until = by_origin
                .values()
                .map(|(_, told)| *told + REMOTE_COUNT_TRUSTED)
                .max();
            if by_origin.is_empty() {
                remote.remove(&key);
            }
            (total, trusted_until)
        };
        self.set_remote_total(key, total, now);
    }

    fn set_remote_total(
        &self,
        key: (String, String),
        (total, trusted_until): (u32, Option<Instant>),
        now: Instant,
    ) {
        let mut seen = self.seen.lock().expect("liveness lock");
        let s = seen.entry(key).or_insert(Seen::new(now));
        s.remote_streams = total;
        s.remote_trusted_until = trusted_until;
        if s.local_streams + s.remote_streams > 0 {
            s.last_heard = now;
            s.closed_at = None;
        } else {
            // Closed now, or earlier (told again): the earlier time stands.
            s.closed_at = s.closed_at.or(Some(now));
        }
    }

    /// How many streams the agent has open on this replica.
    pub fn local_streams(&self, mesh: &str, node: &str) -> u32 {
        let seen = self.seen.lock().expect("liveness lock");
        seen.get(&(mesh.to_owned(), node.to_owned()))
            .map_or(0, |s| s.local_streams)
    }

    /// The agents with a stream open on this replica, to announce to a new lease holder.
    pub fn open_here(&self) -> Vec<(String, String)> {
        let seen = self.seen.lock().expect("liveness lock");
        seen.iter()
            .filter(|(_, s)| s.local_streams > 0)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Forgets what other replicas said: another holder hears it now.
    pub fn forget_remote(&self) {
        self.remote.lock().expect("liveness lock").clear();
        let mut seen = self.seen.lock().expect("liveness lock");
        for s in seen.values_mut() {
            s.remote_streams = 0;
            s.remote_trusted_until = None;
        }
    }

    /// Of `nodes`, those whose agents are down at `now`. Agents never seen count as down
    /// from `unseen_after` on.
    pub fn down<'a>(
        &self,
        mesh: &str,
        nodes: impl IntoIterator<Item = &'a String>,
        now: Instant,
        limit: Limit,
        unseen_after: Instant,
    ) -> BTreeSet<String> {
        let seen = self.seen.lock().expect("liveness lock");
        nodes
            .into_iter()
            .filter(|n| {
                let s = seen.get(&(mesh.to_owned(), (*n).clone())).copied();
                down_at(s, limit, unseen_after).is_some_and(|at| at <= now)
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
        now: Instant,
        limit: Limit,
        unseen_after: Instant,
    ) -> Option<Instant> {
        let seen = self.seen.lock().expect("liveness lock");
        nodes
            .into_iter()
            .filter_map(|n| {
                let s = seen.get(&(mesh.to_owned(), n.clone())).copied();
                down_at(s, limit, unseen_after)
            })
            .filter(|at| *at > now)
            .min()
    }

    /// Forgets the nodes `keep` rejects.
    pub fn retain(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        let mut seen = self.seen.lock().expect("liveness lock");
        seen.retain(|(mesh, node), _| keep(mesh, node));
        let mut remote = self.remote.lock().expect("liveness lock");
        remote.retain(|(mesh, node), _| seen.contains_key(&(mesh.clone(), node.clone())));
    }
}

fn remote_total(by_origin: &RemoteCounts) -> u32 {
    by_origin
        .values()
        .fold(0u32, |a, (n, _)| a.saturating_add(*n))
}

/// When an agent seen as `s` is down unless heard from before: once its last stream closed,
/// or, never seen, at `unseen_after`; `None` while a stream is open.
fn down_at(s: Option<Seen>, limit: Limit, unseen_after: Instant) -> Option<Instant> {
    let Some(s) = s else {
        return Some(unseen_after);
    };
    match s.closed_at {
        // Closed and not heard of since (no report through any replica).
        Some(closed) if s.local_streams + s.remote_streams == 0 && s.last_heard <= closed => {
            Some(closed + limit)
        }
        // Open only elsewhere, as a replica last said: closed once that is no longer
        // believed, unless heard of since.
        _ if s.local_streams == 0 && s.remote_streams > 0 => s
            .remote_trusted_until
            .filter(|until| s.last_heard <= *until)
            .map(|until| until + limit),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Duration::from_secs(5);

    #[test]
    fn down_table() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let n = "n".to_owned();
        enum Event {
            Open,
            Close,
            Remote,
            RemoteClose,
            Heard,
            /// Replica `r1` or `r2` says the agent has this many streams open there.
            Count(&'static str, u32),
        }
        use Event::*;
        // (what happened, at what second; asked at; down?)
        type Case<'a> = (&'a str, Vec<(Event, u64)>, u64, bool);
        let cases: Vec<Case> = vec![
            ("never seen, before the unseen limit", vec![], 119, false),
            ("never seen, after it", vec![], 121, true),
            ("a stream open, however quiet", vec![(Open, 0)], 1000, false),
            ("a stream open elsewhere", vec![(Remote, 0)], 1000, false),
            (
                "a stream elsewhere, closed",
                vec![(Remote, 0), (RemoteClose, 3)],
                9,
                true,
            ),
            (
                "stream closed, within the limit",
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
                "closed, then a report (reconnected elsewhere)",
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
            (
                "two streams, both closed",
                vec![(Open, 0), (Open, 1), (Close, 10), (Close, 11)],
                17,
                true,
            ),
            (
                "a close for a stream never seen open",
                vec![(Close, 10)],
                20,
                true,
            ),
            (
                "counted open elsewhere, told again in time",
                vec![
                    (Count("r1", 1), 0),
                    (Count("r1", 1), 60),
                    (Count("r1", 1), 120),
                ],
                290,
                false,
            ),
            (
                "counted open, then none",
                vec![(Count("r1", 1), 0), (Count("r1", 0), 3)],
                9,
                true,
            ),
            (
                "a close told before its open (a short stream): none open",
                vec![(Count("r1", 0), 0), (Count("r1", 0), 1)],
                130,
                true,
            ),
            (
                "told twice: counted once",
                vec![
                    (Count("r1", 1), 0),
                    (Count("r1", 1), 1),
                    (Count("r1", 0), 3),
                ],
                9,
                true,
            ),
            (
                "counted open by a replica that said nothing since (it died)",
                vec![(Count("r1", 1), 0)],
                300,
                true,
            ),
            (
                "open on two replicas, closed on one",
                vec![
                    (Count("r1", 1), 0),
                    (Count("r2", 1), 1),
                    (Count("r1", 0), 3),
                ],
                100,
                false,
            ),
        ];
        for (name, events, at, want) in cases {
            let l = Liveness::default();
            for (e, sec) in events {
                match e {
                    Open => l.stream_opened("m", &n, Origin::Local, s(sec)),
                    Close => l.stream_closed("m", &n, Origin::Local, s(sec)),
                    Remote => l.stream_opened("m", &n, Origin::Remote, s(sec)),
                    RemoteClose => l.stream_closed("m", &n, Origin::Remote, s(sec)),
                    Heard => l.heard("m", &n, s(sec)),
                    Count(origin, open) => l.remote_streams("m", &n, origin, open, s(sec)),
                }
            }
            let down = l.down("m", [&n], s(at), LIMIT, s(120));
            assert_eq!(down.contains(&n), want, "{name}");
        }
    }

    #[test]
    fn stream_events_by_name() {
        for e in [StreamEvent::Opened, StreamEvent::Closed] {
            assert_eq!(StreamEvent::parse(e.as_str()), Some(e));
        }
        assert_eq!(StreamEvent::parse("reopened"), None);
    }

    #[test]
    fn next_change_is_when_a_closed_stream_runs_out() {
        let t0 = Instant::now();
        let (a, b) = ("a".to_owned(), "b".to_owned());
        let l = Liveness::default();
        let unseen = t0 + Duration::from_secs(60);
        l.stream_opened("m", &a, Origin::Local, t0);
        l.stream_opened("m", &b, Origin::Remote, t0);
        assert_eq!(l.next_change("m", [&a, &b], t0, LIMIT, unseen), None);
        l.stream_closed("m", &b, Origin::Remote, t0 + Duration::from_secs(1));
        assert_eq!(
            l.next_change("m", [&a, &b], t0 + Duration::from_secs(2), LIMIT, unseen),
            Some(t0 + Duration::from_secs(6))
        );
        assert_eq!(l.open_here(), [("m".to_owned(), "a".to_owned())]);
        let c = "c".to_owned();
        assert_eq!(
            l.next_change("m", [&c], t0, LIMIT, unseen),
            Some(unseen),
            "never seen: down at the unseen limit"
        );
    }
}
