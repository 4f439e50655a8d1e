//! The peer table the data path reads: an immutable snapshot (swapped whole on every
//! configuration change) of per-peer runtime state that lives as long as the peer.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519;
use wgmesh_core::{Cidr, Key, PrivateKey, PublicKey};

use super::allowed_ips::AllowedIps;
use crate::PeerConfig;

/// How long a WireGuard session may be used after its handshake (`REJECT_AFTER_TIME`).
const SESSION_LIFETIME: Duration = Duration::from_secs(180);

/// Handshake messages per second the device counts before it asks for cookies. Each
/// initiation counts twice (the data path's check and the `Tunn`'s, one limiter for one
/// cookie secret): 500 initiations a second (about 7% of a core in X25519) before anyone
/// needs a cookie, where 50 spoofed ones a second used to put every peer's next handshake
/// behind a cookie round trip. One source gets far fewer ([`super::limits`]).
const DEVICE_HANDSHAKE_RATE_LIMIT: u64 = 1000;

/// Our static identity, with the device-wide rate limiter keyed to it (its MAC1 key derives
/// from our public key, so it is replaced together with the key).
///
/// Every peer's `Tunn` shares this one limiter: the data path checks MAC1 and load with it
/// before finding the peer, and the `Tunn` checks again. Two limiters would hold two cookie
/// secrets, so under load a peer's retry carrying one's cookie would be refused by the
/// other, forever (issue #12, item 6).
pub(crate) struct Identity {
    pub private_key: PrivateKey,
    pub public_key: PublicKey,
    pub secret: x25519::StaticSecret,
    pub public: x25519::PublicKey,
    /// Its count is reset by the device's timer tick (a `Tunn` given a limiter does not).
    pub rate_limiter: Arc<RateLimiter>,
}

impl Identity {
    pub(crate) fn new(private_key: PrivateKey) -> Identity {
        let secret = x25519::StaticSecret::from(private_key.to_bytes());
        let public = x25519::PublicKey::from(&secret);
        Identity {
            public_key: PublicKey::from_bytes(*public.as_bytes()),
            rate_limiter: Arc::new(RateLimiter::new(&public, DEVICE_HANDSHAKE_RATE_LIMIT)),
            private_key,
            secret,
            public,
        }
    }
}

/// One peer's runtime state. It survives configuration changes of the peer (allowed IPs,
/// endpoint, keepalive); only its `Tunn` is replaced when the session must restart.
pub(crate) struct Peer {
    pub public_key: PublicKey,
    /// Our 24-bit index for this peer; boringtun puts it in the top bits of every receiver
    /// index it hands out, which is how an incoming packet finds its peer.
    pub index: u32,
    tunn: Mutex<Tunn>,
    /// Read for every TUN read and compared on every received batch: lock-free, and only
    /// replaced (one allocation) when the peer roams.
    endpoint: ArcSwapOption<SocketAddr>,
    keepalive: AtomicU16,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    /// Unix time of the last completed handshake in nanoseconds; 0 is never.
    last_handshake_nanos: AtomicU64,
    /// Milliseconds since the device epoch of the last authenticated packet either way; the
    /// persistent keepalive fires when it is older than the interval.
    last_activity_ms: AtomicU64,
    /// When data came in with nothing sent back since (ms since the device epoch; 0: nothing
    /// owed): the passive keepalive is due [`KEEPALIVE_TIMEOUT_MS`] later, as in the kernel.
    /// boringtun's own check compares 250 ms timer ticks and misses a reply that arrives in
    /// the tick its request left in; the peer then renews the session 15 s later.
    keepalive_owed_since_ms: AtomicU64,
    /// When the latest data came in (ms since the device epoch; 0: never).
    last_data_rx_ms: AtomicU64,
}

/// WireGuard's KEEPALIVE_TIMEOUT: how long a peer that received data waits for something of
/// its own to send back before it sends an empty packet.
pub(crate) const KEEPALIVE_TIMEOUT_MS: u64 = 10_000;

/// Whether a send that started at `started_ms` answers data owed since `owed_ms` (0: none).
/// Within the same millisecond the order is unknown: the keepalive stays owed (an extra
/// keepalive costs 32 bytes; a missing one costs the peer a new handshake).
fn answers(owed_ms: u64, started_ms: u64) -> bool {
    owed_ms != 0 && owed_ms < started_ms
}

/// Whether the passive keepalive owed since `owed_ms` (0: none) is due at `now_ms`.
fn keepalive_due(owed_ms: u64, now_ms: u64) -> bool {
    owed_ms != 0 && now_ms.saturating_sub(owed_ms) >= KEEPALIVE_TIMEOUT_MS
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn new_tunn(identity: &Identity, public_key: &PublicKey, psk: Option<Key>, index: u32) -> Tunn {
    // Persistent keepalive is ours (Tunn cannot change it in place), so Tunn gets none.
    Tunn::new(
        identity.secret.clone(),
        x25519::PublicKey::from(*public_key.as_bytes()),
        psk.map(|k| *k.as_bytes()),
        None,
        index,
        Some(identity.rate_limiter.clone()),
    )
}

impl Peer {
    pub(crate) fn new(identity: &Identity, config: &PeerConfig, index: u32) -> Peer {
        Peer {
            public_key: config.public_key,
            index,
            tunn: Mutex::new(new_tunn(
                identity,
                &config.public_key,
                config.preshared_key,
                index,
            )),
            endpoint: ArcSwapOption::new(config.endpoint.map(Arc::new)),
            keepalive: AtomicU16::new(config.persistent_keepalive),
            rx_bytes: AtomicU64::new(0),
            tx_bytes: AtomicU64::new(0),
            last_handshake_nanos: AtomicU64::new(0),
            last_activity_ms: AtomicU64::new(0),
            keepalive_owed_since_ms: AtomicU64::new(0),
            last_data_rx_ms: AtomicU64::new(0),
        }
    }

    /// The session, locked: for encrypting a run of packets under one lock.
    pub(crate) fn tunn(&self) -> MutexGuard<'_, Tunn> {
        lock(&self.tunn)
    }

    /// Encrypts `src` into `dst`. The Tunn is locked only for the call.
    pub(crate) fn encapsulate<'a>(&self, src: &[u8], dst: &'a mut [u8]) -> TunnResult<'a> {
        lock(&self.tunn).encapsulate(src, dst)
    }

    /// Decrypts `datagram` into `dst` (an empty datagram flushes queued packets).
    pub(crate) fn decapsulate<'a>(
        &self,
        src: Option<IpAddr>,
        datagram: &[u8],
        dst: &'a mut [u8],
    ) -> TunnResult<'a> {
        lock(&self.tunn).decapsulate(src, datagram, dst)
    }

    pub(crate) fn update_timers<'a>(&self, dst: &'a mut [u8]) -> TunnResult<'a> {
        lock(&self.tunn).update_timers(dst)
    }

    /// Whether there is a session to send on: one we initiated and got the answer for, or
    /// one we answered and then got a packet on. Answering alone is not enough: the
    /// initiator may never use that session (another handshake crossed it, or our answer was
    /// lost).
    pub(crate) fn has_session(&self) -> bool {
        lock(&self.tunn).time_since_last_handshake().is_some()
    }

    /// Restarts the session with a new preshared key.
    pub(crate) fn reset_session(&self, identity: &Identity, psk: Option<Key>) {
        *lock(&self.tunn) = new_tunn(identity, &self.public_key, psk, self.index);
    }

    /// Switches to a new private key of ours; every session restarts.
    pub(crate) fn set_identity(&self, identity: &Identity) {
        lock(&self.tunn).set_static_private(
            identity.secret.clone(),
            identity.public,
            Some(identity.rate_limiter.clone()),
        );
    }

    pub(crate) fn endpoint(&self) -> Option<SocketAddr> {
        self.endpoint.load().as_deref().copied()
    }

    pub(crate) fn set_endpoint(&self, endpoint: SocketAddr) {
        if self.endpoint() != Some(endpoint) {
            self.endpoint.store(Some(Arc::new(endpoint)));
        }
    }

    pub(crate) fn keepalive(&self) -> u16 {
        self.keepalive.load(Ordering::Relaxed)
    }

    pub(crate) fn set_keepalive(&self, seconds: u16) {
        self.keepalive.store(seconds, Ordering::Relaxed);
    }

    /// Counts a packet sent to the peer, whose send started at `started_ms`. Any
    /// authenticated packet answers the data received before it was sent, so no passive
    /// keepalive is owed for that; data that came in while it was being sent (the peer's
    /// answer to it, on a busy machine) still is.
    pub(crate) fn count_tx(&self, bytes: usize, started_ms: u64, now_ms: u64) {
        self.tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_activity_ms.store(now_ms, Ordering::Relaxed);
        // SeqCst from here: the two fields are read and written in opposite orders by the
        // sending and the receiving threads.
        let owed = self.keepalive_owed_since_ms.load(Ordering::SeqCst);
        if answers(owed, started_ms) {
            let _ = self.keepalive_owed_since_ms.compare_exchange(
                owed,
                0,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
            // Data that came in since the send started is still owed an answer: from no later
            // than the send's start (read after clearing, so a concurrent arrival either sees
            // the cleared value and sets its own time, or is seen here).
            if self.last_data_rx_ms.load(Ordering::SeqCst) >= started_ms {
                let _ = self.keepalive_owed_since_ms.compare_exchange(
                    0,
                    started_ms.max(1),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
            }
        }
    }

    /// Data (not a keepalive) came from the peer: a passive keepalive is owed unless something
    /// is sent back first. The first such packet starts the clock.
    pub(crate) fn data_received(&self, now_ms: u64) {
        self.last_data_rx_ms.fetch_max(now_ms, Ordering::SeqCst);
        let _ = self.keepalive_owed_since_ms.compare_exchange(
            0,
            now_ms.max(1),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Whether the passive keepalive is due now; when it is, it is no longer owed (sent or
    /// not, it is asked for once per received burst, as the kernel's timer fires once).
    pub(crate) fn take_due_keepalive(&self, now_ms: u64) -> bool {
        let since = self.keepalive_owed_since_ms.load(Ordering::Relaxed);
        keepalive_due(since, now_ms)
            && self
                .keepalive_owed_since_ms
                .compare_exchange(since, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    pub(crate) fn count_rx(&self, bytes: usize, now_ms: u64) {
        self.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_activity_ms.store(now_ms, Ordering::Relaxed);
    }

    pub(crate) fn touch(&self, now_ms: u64) {
        self.last_activity_ms.store(now_ms, Ordering::Relaxed);
    }

    pub(crate) fn last_activity_ms(&self) -> u64 {
        self.last_activity_ms.load(Ordering::Relaxed)
    }

    pub(crate) fn rx_bytes(&self) -> u64 {
        self.rx_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn tx_bytes(&self) -> u64 {
        self.tx_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn handshake_completed(&self, at: SystemTime) {
        let nanos = at
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(1);
        self.last_handshake_nanos
            .store(nanos.max(1), Ordering::Relaxed);
    }

    /// Whether the peer may have had a session until now: a handshake completed within the
    /// time a session lives (WireGuard's `REJECT_AFTER_TIME`), so traffic went lately.
    pub(crate) fn had_session_lately(&self) -> bool {
        self.last_handshake()
            .and_then(|at| at.elapsed().ok())
            .is_some_and(|age| age < SESSION_LIFETIME)
    }

    pub(crate) fn last_handshake(&self) -> Option<SystemTime> {
        match self.last_handshake_nanos.load(Ordering::Relaxed) {
            0 => None,
            n => Some(UNIX_EPOCH + Duration::from_nanos(n)),
        }
    }
}

/// A peer's configuration with its runtime state.
#[derive(Clone)]
pub(crate) struct PeerEntry {
    pub config: PeerConfig,
    pub peer: Arc<Peer>,
}

/// The entry each allowed IP belongs to. Hashed with foldhash (seeded per process): built
/// for every change, over every peer's allowed IPs.
pub(crate) type OwnerMap = HashMap<Cidr, usize, foldhash::fast::RandomState>;

/// Everything the data path needs, immutable once built.
pub(crate) struct PeerTable {
    pub identity: Arc<Identity>,
    pub listen_port: u16,
    pub fwmark: u32,
    /// In configuration order.
    pub entries: Vec<PeerEntry>,
    by_key: HashMap<PublicKey, usize>,
    /// Sorted by index: a binary search per packet is cheaper than SipHash.
    by_index: Vec<(u32, usize)>,
    allowed: AllowedIps<usize>,
    /// The entry each allowed IP belongs to, for the next change (`PeerEdit`).
    owner: OwnerMap,
}

impl PeerTable {
    pub(crate) fn build(
        identity: Arc<Identity>,
        listen_port: u16,
        fwmark: u32,
        entries: Vec<PeerEntry>,
    ) -> PeerTable {
        let mut by_key = HashMap::with_capacity(entries.len());
        let mut by_index = Vec::with_capacity(entries.len());
        let mut allowed = AllowedIps::new();
        let mut owner = OwnerMap::default();
        for (i, e) in entries.iter().enumerate() {
            by_key.insert(e.config.public_key, i);
            by_index.push((e.peer.index, i));
            for cidr in &e.config.allowed_ips {
                allowed.insert(cidr.net(), i);
                owner.insert(*cidr, i);
            }
        }
        by_index.sort_unstable();
        PeerTable {
            identity,
            listen_port,
            fwmark,
            entries,
            by_key,
            by_index,
            allowed,
            owner,
        }
    }

    /// The peer that owns the longest allowed-IPs prefix containing `addr`.
    pub(crate) fn by_allowed_ip(&self, addr: IpAddr) -> Option<&Arc<Peer>> {
        self.allowed.lookup(addr).map(|&i| &self.entries[i].peer)
    }

    /// Whether `addr` routes to `peer`: the check on the inner source of a decrypted packet.
    pub(crate) fn routes_to(&self, addr: IpAddr, peer: &Peer) -> bool {
        self.allowed
            .lookup(addr)
            .is_some_and(|&i| std::ptr::eq(Arc::as_ptr(&self.entries[i].peer), peer))
    }

    /// The peer a receiver index of ours belongs to.
    pub(crate) fn by_receiver_index(&self, receiver_index: u32) -> Option<&Arc<Peer>> {
        let key = receiver_index >> 8;
        let at = self
            .by_index
            .binary_search_by_key(&key, |&(index, _)| index)
            .ok()?;
        self.by_index.get(at).map(|&(_, i)| &self.entries[i].peer)
    }

    pub(crate) fn by_key(&self, key: &PublicKey) -> Option<&PeerEntry> {
        self.by_key.get(key).map(|&i| &self.entries[i])
    }

    /// The table's lookups as a change starts from them: entry by key, allowed IP by owner.
    pub(crate) fn lookups(&self) -> (HashMap<PublicKey, usize>, OwnerMap) {
        (self.by_key.clone(), self.owner.clone())
    }

    /// Whether a receiver index is taken in this table.
    pub(crate) fn index_in_use(&self, index: u32) -> bool {
        self.by_index
            .binary_search_by_key(&index, |&(i, _)| i)
            .is_ok()
    }
}

#[cfg(test)]
mod keepalive_tests {
    use super::{answers, keepalive_due};

    #[test]
    fn what_a_send_answers() {
        // (owed since, send started, answered)
        let cases = [
            (0, 500, false),   // nothing owed
            (100, 101, true),  // data, then our send
            (100, 100, false), // same millisecond: order unknown, stays owed
            (105, 100, false), // the answer to our send came in while we were sending
        ];
        for (owed, started, want) in cases {
            assert_eq!(
                answers(owed, started),
                want,
                "owed {owed}, started {started}"
            );
        }
    }

    #[test]
    fn when_the_passive_keepalive_is_due() {
        // (owed since, now, due)
        let cases = [
            (0, 1_000_000, false),
            (1_000, 10_999, false),
            (1_000, 11_000, true),
            (1_000, 500, false), // a clock read before the data: not due
        ];
        for (owed, now, want) in cases {
            assert_eq!(keepalive_due(owed, now), want, "owed {owed}, now {now}");
        }
    }
}
