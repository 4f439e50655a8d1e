//! The buffer size and the tick every thread of the device shares: the readers
//! (`datapath`), the crypto workers (`workers`), the device loop and the UAPI server. Its
//! own module so that `datapath` depends on `workers` and never the other way round.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// Large enough for any IP packet plus WireGuard's overhead, and for any UDP datagram.
pub(crate) const BUF_LEN: usize = 65536 + 256;

/// How often boringtun's timers run (its documentation asks for about 250 ms), and how
/// often blocked loops look at the stop flag.
pub(crate) const TICK: Duration = Duration::from_millis(250);

/// Handshake initiations one source address may have answered: `SOURCE_BURST` at once, then
/// `SOURCE_PER_SECOND` (the kernel's values). Checked after MAC1 (and, under load, the cookie
/// in MAC2) and before the Diffie-Hellman that finds the sender, so that one address, even
/// one holding a valid cookie, cannot keep a reader busy with X25519.
const SOURCE_BURST: f64 = 5.0;
const SOURCE_PER_SECOND: f64 = 20.0;
/// Sources remembered at once; past it, those with a full budget are forgotten, and if none
/// is, new sources are let through (spoofed sources never pass the cookie under load).
const SOURCES: usize = 4096;

#[derive(Default)]
pub(crate) struct HandshakeSources {
    budgets: Mutex<HashMap<IpAddr, (f64, u64)>>,
}

impl HandshakeSources {
    /// Whether an initiation from `source` at `now_ms` may be answered; counts it if so.
    pub(crate) fn allow(&self, source: IpAddr, now_ms: u64) -> bool {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        let refill = |(tokens, at): (f64, u64)| {
            let elapsed = now_ms.saturating_sub(at) as f64 / 1000.0;
            (tokens + elapsed * SOURCE_PER_SECOND).min(SOURCE_BURST)
        };
        if budgets.len() >= SOURCES && !budgets.contains_key(&source) {
            budgets.retain(|_, b| refill(*b) < SOURCE_BURST);
            if budgets.len() >= SOURCES {
                return true;
            }
        }
        let budget = budgets.entry(source).or_insert((SOURCE_BURST, now_ms));
        let tokens = refill(*budget);
        if tokens < 1.0 {
            *budget = (tokens, now_ms);
            return false;
        }
        *budget = (tokens - 1.0, now_ms);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_gets_a_burst_then_its_rate() {
        let sources = HandshakeSources::default();
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let allowed = |source, at| (0..10).filter(|_| sources.allow(source, at)).count();
        assert_eq!(allowed(a, 0), 5, "the burst");
        assert_eq!(allowed(b, 0), 5, "another source has its own");
        assert_eq!(allowed(a, 50), 1, "20 per second: one in 50 ms");
        assert_eq!(allowed(a, 1050), 5, "refilled, up to the burst");
    }
}
