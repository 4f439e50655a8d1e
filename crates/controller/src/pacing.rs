//! How long the loops that go over everything (the reconciler's recomputation, the status
//! writer's walk) rest between two runs.
//!
//! A run is O(objects). Under a flood of events (thousands of agents reporting after a
//! restart) back-to-back runs would take a whole core from the streams and the other loop, so
//! each loop spends a budget of busy time that refills at half the wall time. An isolated
//! change (a node joining: a recomputation, and another once its status is written) finds
//! the budget full and waits for nothing; only a flood drains it, and then the loop rests.

use std::time::{Duration, Instant};

/// A budget of busy time: each run spends its duration, and the budget refills at `share`
/// of the wall time, up to `burst`.
#[derive(Debug, Clone)]
pub struct Pacer {
    share: f64,
    burst: f64,
    max_rest: Duration,
    /// Seconds of busy time left; negative while the loop owes rest.
    balance: f64,
    at: Instant,
}

impl Pacer {
    /// Half a core over time, a second of runs in a burst, and never more than `max_rest` of
    /// rest at once (a run longer than that is not made to wait its whole length again).
    pub fn new(max_rest: Duration, now: Instant) -> Self {
        Self::with(0.5, Duration::from_secs(1), max_rest, now)
    }

    fn with(share: f64, burst: Duration, max_rest: Duration, now: Instant) -> Self {
        Pacer {
            share,
            burst: burst.as_secs_f64(),
            max_rest,
            balance: burst.as_secs_f64(),
            at: now,
        }
    }

    /// Records a run that took `busy` and ended at `now`; returns how long to rest before
    /// the next one.
    pub fn ran(&mut self, busy: Duration, now: Instant) -> Duration {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.share;
        self.at = now;
        // Owing more than the longest rest repays would only delay a change after a flood.
        let floor = -self.max_rest.as_secs_f64() * self.share;
        self.balance = ((self.balance + refill).min(self.burst) - busy.as_secs_f64()).max(floor);
        if self.balance >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.balance / self.share).min(self.max_rest)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// Each case is a sequence of runs: (idle before the run, how long it ran), and the rest
    /// the pacer asks for after each.
    #[test]
    fn rest_table() {
        type Run = (u64, u64, u64);
        let cases: &[(&str, &[Run])] = &[
            (
                "an isolated pair of runs (a join) rests not at all",
                &[(0, 300, 0), (20, 300, 0)],
            ),
            (
                "back-to-back runs drain the burst, then rest as long as they ran",
                &[
                    (0, 400, 0),
                    (0, 400, 0),
                    (0, 400, 0),
                    (0, 400, 0),
                    (0, 400, 400),
                    (400, 400, 400),
                    (400, 400, 400),
                ],
            ),
            (
                "idle time refills the budget",
                &[(0, 1000, 0), (0, 1000, 500), (2000, 300, 0), (0, 300, 0)],
            ),
            (
                "a run longer than the longest rest rests the longest rest",
                &[(0, 3000, 500), (500, 3000, 500), (500, 3000, 500)],
            ),
        ];
        for (name, runs) in cases {
            let start = Instant::now();
            let mut pacer = Pacer::new(MS(500), start);
            let mut now = start;
            for (i, (idle, busy, want)) in runs.iter().enumerate() {
                now += MS(*idle) + MS(*busy);
                let rest = pacer.ran(MS(*busy), now);
                let diff = rest.as_millis().abs_diff(u128::from(*want));
                assert!(diff <= 1, "{name}: run {i}: rest {rest:?}, want {want} ms");
            }
        }
    }

    #[test]
    fn under_a_flood_a_loop_is_busy_half_the_time() {
        let start = Instant::now();
        let mut pacer = Pacer::new(MS(500), start);
        let (mut now, mut busy) = (start, Duration::ZERO);
        for _ in 0..1000 {
            now += MS(120);
            busy += MS(120);
            now += pacer.ran(MS(120), now);
        }
        let share = busy.as_secs_f64() / (now - start).as_secs_f64();
        assert!((0.49..0.52).contains(&share), "{share}");
    }
}
