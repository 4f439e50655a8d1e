//! Crypto workers: where the device encrypts and decrypts when there is bulk to move, one
//! thread per core.
//!
//! Every peer belongs to one worker (by its index), and each worker takes its jobs in order, so
//! one peer's packets, and with them every flow's, are encrypted and sent, or decrypted and
//! delivered, in the order they came, while different peers use different cores. A job is a
//! whole batch (a TCP super-packet split into segments, or a GRO run of datagrams): one
//! hand-over, one lock of the peer's session and one syscall serve dozens of packets.
//!
//! The readers keep the work that fetches packets (TUN reads and TSO splitting, UDP receives
//! and peer lookup) and the workers do the rest, so even one flow is spread over two threads.
//!
//! A hand-over costs work of its own (a wake-up, and the batch moving between caches), which
//! only pays when another core is free to take it. So under the default policy the readers
//! hand batches over only while the node has an idle core (sampled every tick from
//! `/proc/stat`); on a saturated node they do everything themselves, as they do for small
//! batches (request/response traffic is spared two wake-ups). A reader processes a batch
//! itself only when its worker has nothing of the same direction pending, so nothing is ever
//! overtaken.

use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use boringtun::noise::{Tunn, TunnResult};

use super::limits::{BUF_LEN, TICK};
use super::offload::Coalescer;
use super::peers::Peer;
use super::sockets::{MAX_GSO_BYTES, MAX_GSO_SEGMENTS};
use super::{Error, Inner, lock, panic_message, spawn};

/// Jobs a worker may have queued; a reader that finds the queue full waits, which pushes back
/// on the TUN queue or the socket buffer rather than growing memory.
const QUEUE_DEPTH: usize = 16;

/// Most workers, whatever the core count: a device rarely has more busy peers at once.
const MAX_WORKERS: usize = 8;

/// Batches of at most this many packets are processed by their reader when it may.
const INLINE_MAX_PACKETS: usize = 2;

/// Batches (64 KiB each) kept for reuse: enough for two busy workers' queues. More are
/// allocated when a burst needs them and freed when returned past this.
const POOL_SIZE: usize = 4 * QUEUE_DEPTH;

/// How a device spreads its crypto over cores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WorkerPolicy {
    /// One worker per core (none on one core); batches go to them while a core is idle.
    #[default]
    Auto,
    /// This many workers, always given every batch larger than a couple of packets (0: the
    /// readers do everything).
    Fixed(usize),
}

impl FromStr for WorkerPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<WorkerPolicy, String> {
        match s {
            "auto" => Ok(WorkerPolicy::Auto),
            n => n
                .parse::<usize>()
                .ok()
                .filter(|&n| n <= MAX_WORKERS)
                .map(WorkerPolicy::Fixed)
                .ok_or_else(|| format!("expected `auto` or 0 to {MAX_WORKERS} workers, got `{s}`")),
        }
    }
}

/// Packets back to back in `buf`, with their lengths.
pub(crate) struct Batch {
    pub buf: Vec<u8>,
    pub lens: Vec<usize>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            buf: vec![0u8; BUF_LEN],
            lens: Vec::with_capacity(128),
        }
    }

    /// The packets, in order (a length past the buffer, which filling never makes, ends
    /// them rather than yielding an empty packet, which would encrypt as a keepalive).
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        let mut at = 0;
        self.lens.iter().map_while(move |&len| {
            let p = self.buf.get(at..at + len)?;
            at += len;
            Some(p)
        })
    }
}

pub(crate) enum Job {
    /// Plaintext packets for `peer`, to encrypt and send to `endpoint`.
    Encrypt {
        peer: Arc<Peer>,
        endpoint: SocketAddr,
        batch: Batch,
    },
    /// Transport-data datagrams from `src` that carry `peer`'s receiver index.
    Decrypt {
        peer: Arc<Peer>,
        src: SocketAddr,
        batch: Batch,
    },
}

struct Worker {
    queue: SyncSender<Job>,
    /// Jobs queued or running, per direction: a reader may only do a job itself (and so
    /// overtake nothing) when its direction has none.
    encrypting: AtomicUsize,
    decrypting: AtomicUsize,
}

/// The workers of one device and the buffers they pass around.
pub(crate) struct Workers {
    workers: Vec<Worker>,
    pool: Mutex<Vec<Batch>>,
    /// Whether large batches go to workers now (always under `Fixed`, while a core is idle
    /// under `Auto`).
    hand_over: AtomicBool,
    policy: WorkerPolicy,
    idle: Mutex<IdleCores>,
}

/// What one thread reuses to encrypt or decrypt batches.
pub(crate) struct Scratch {
    /// Encrypted datagrams, or decrypted packets, back to back.
    out: Vec<u8>,
    lens: Vec<usize>,
    /// Where each decrypted packet lies in `out`, and its inner source address.
    decrypted: Vec<(usize, usize, IpAddr)>,
    coalescer: Coalescer,
}

impl Scratch {
    pub(crate) fn new() -> Scratch {
        Scratch {
            // Room for a batch plus WireGuard's 32 bytes per packet.
            out: vec![0u8; 2 * BUF_LEN],
            lens: Vec::with_capacity(256),
            decrypted: Vec::with_capacity(256),
            coalescer: Coalescer::new(),
        }
    }
}

impl Workers {
    /// The workers `policy` asks for, and the queues their threads will take jobs from.
    pub(crate) fn new(policy: WorkerPolicy) -> (Workers, Vec<Receiver<Job>>) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let count = match policy {
            WorkerPolicy::Auto if cores > 1 => cores.min(MAX_WORKERS),
            WorkerPolicy::Auto => 0,
            WorkerPolicy::Fixed(n) => n.min(MAX_WORKERS),
        };
        let (workers, queues) = (0..count)
            .map(|_| {
                let (tx, rx) = mpsc::sync_channel(QUEUE_DEPTH);
                let worker = Worker {
                    queue: tx,
                    encrypting: AtomicUsize::new(0),
                    decrypting: AtomicUsize::new(0),
                };
                (worker, rx)
            })
            .unzip();
        (
            Workers {
                workers,
                pool: Mutex::new(Vec::new()),
                hand_over: AtomicBool::new(matches!(policy, WorkerPolicy::Fixed(_))),
                policy,
                idle: Mutex::new(IdleCores { cores, last: None }),
            },
            queues,
        )
    }

    /// An empty batch.
    pub(crate) fn batch(&self) -> Batch {
        let mut b = lock(&self.pool).pop().unwrap_or_else(Batch::new);
        b.lens.clear();
        b
    }

    fn recycle(&self, batch: Batch) {
        let mut pool = lock(&self.pool);
        if pool.len() < POOL_SIZE {
            pool.push(batch);
        }
    }

    /// Called every tick: under `Auto`, hand over while at least one core was idle over the
    /// last tick, and stop below half a core (hysteresis, so that the pipeline's own
    /// wake-up gaps do not make it flap).
    pub(crate) fn tick(&self) {
        if self.policy != WorkerPolicy::Auto || self.workers.is_empty() {
            return;
        }
        let Some(idle) = lock(&self.idle).sample() else {
            return;
        };
        let on = self.hand_over.load(Ordering::Relaxed);
        if !on && idle >= 1.0 {
            self.hand_over.store(true, Ordering::Relaxed);
        } else if on && idle < 0.5 {
            self.hand_over.store(false, Ordering::Relaxed);
        }
    }

    /// The worker to hand a batch of `packets` of `peer`'s to, or `None` when its reader does
    /// it: a worker takes it while it has some of the same direction pending (so nothing is
    /// overtaken), else when the batch is large and a core is free for it.
    pub(crate) fn take(
        &self,
        peer: &Peer,
        direction: Direction,
        packets: usize,
    ) -> Option<Handoff<'_>> {
        let n = self.workers.len();
        if n == 0 {
            return None;
        }
        let worker = &self.workers[peer.index as usize % n];
        let pending = worker.pending(direction).load(Ordering::Acquire) > 0;
        (pending || (packets > INLINE_MAX_PACKETS && self.hand_over.load(Ordering::Relaxed)))
            .then_some(Handoff { worker, direction })
    }
}

/// Which way a batch goes through the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    Encrypt,
    Decrypt,
}

impl Worker {
    fn pending(&self, direction: Direction) -> &AtomicUsize {
        match direction {
            Direction::Encrypt => &self.encrypting,
            Direction::Decrypt => &self.decrypting,
        }
    }

    fn send(&self, direction: Direction, job: Job) {
        let pending = self.pending(direction);
        pending.fetch_add(1, Ordering::AcqRel);
        if self.queue.send(job).is_err() {
            pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A worker chosen by [`Workers::take`] for one direction.
#[derive(Clone, Copy)]
pub(crate) struct Handoff<'w> {
    worker: &'w Worker,
    direction: Direction,
}

impl Handoff<'_> {
    /// Plaintext packets for `peer`, to encrypt and send to `endpoint`.
    pub(crate) fn encrypt(&self, peer: &Arc<Peer>, endpoint: SocketAddr, batch: Batch) {
        debug_assert_eq!(self.direction, Direction::Encrypt);
        let peer = Arc::clone(peer);
        let job = Job::Encrypt {
            peer,
            endpoint,
            batch,
        };
        self.worker.send(self.direction, job);
    }

    /// Transport-data datagrams from `src` for `peer`, to decrypt and deliver.
    pub(crate) fn decrypt(&self, peer: &Arc<Peer>, src: SocketAddr, batch: Batch) {
        debug_assert_eq!(self.direction, Direction::Decrypt);
        let peer = Arc::clone(peer);
        self.worker
            .send(self.direction, Job::Decrypt { peer, src, batch });
    }
}

/// Starts the worker threads; they end once the device stops and their queue is drained.
pub(crate) fn spawn_workers(
    inner: &Arc<Inner>,
    queues: Vec<Receiver<Job>>,
) -> Result<Vec<JoinHandle<()>>, Error> {
    queues
        .into_iter()
        .enumerate()
        .map(|(i, jobs)| {
            let worker = Arc::clone(inner);
            spawn(inner, &format!("wk{i}"), move || {
                run_worker(&worker, i, &jobs)
            })
        })
        .collect()
}

fn run_worker(inner: &Inner, index: usize, jobs: &Receiver<Job>) {
    let workers = &inner.workers;
    let me = &workers.workers[index];
    let mut scratch = Scratch::new();
    loop {
        let job = match jobs.recv_timeout(TICK) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) if inner.stopping() => break,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match job {
            Job::Encrypt {
                peer,
                endpoint,
                batch,
            } => {
                contain(Direction::Encrypt, &me.encrypting, || {
                    seal(inner, &mut scratch, &peer, endpoint, |sealer| {
                        batch.packets().for_each(|p| sealer.push(p));
                    });
                });
                workers.recycle(batch);
            }
            Job::Decrypt { peer, src, batch } => {
                contain(Direction::Decrypt, &me.decrypting, || {
                    open(inner, &mut scratch, &peer, src, batch.packets());
                });
                workers.recycle(batch);
            }
        }
    }
}

/// Runs one queued batch, then counts it as no longer pending, also when it panicked. Nothing
/// in it should panic on any input; if a bug does, that batch's packets are lost and logged,
/// and the worker goes on. A count left above zero would make the readers queue that
/// worker's peers' batches behind a job that never ends.
fn contain(direction: Direction, pending: &AtomicUsize, work: impl FnOnce()) {
    // AssertUnwindSafe: what the work may leave half-done is the batch (recycled, its lengths
    // reset), the scratch buffers (rewritten before every use) and at worst the peer's session,
    // whose poisoned lock `lock` ignores: a session broken by a bug fails to decrypt until the
    // next handshake replaces it, which beats a worker that is gone.
    if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        tracing::error!(
            ?direction,
            message = %panic_message(&*panic),
            "a crypto worker's batch panicked; its packets were dropped"
        );
    }
    pending.fetch_sub(1, Ordering::AcqRel);
}

/// Room `out` must have for one more encrypted packet of `len` bytes (boringtun wants
/// `len + 32`, and 148 for a handshake initiation).
fn room_for(len: usize) -> usize {
    (len + 32).max(148)
}

/// Encrypts the packets `fill` pushes, for `peer`, under as few locks of its session as
/// `out` allows (one for a super-packet), and sends them to `endpoint` with as few syscalls,
/// never holding the lock during one.
pub(crate) fn seal(
    inner: &Inner,
    s: &mut Scratch,
    peer: &Peer,
    endpoint: SocketAddr,
    fill: impl FnOnce(&mut Sealer<'_>),
) {
    s.lens.clear();
    let mut sealer = Sealer {
        inner,
        peer,
        endpoint,
        tunn: None,
        out: &mut s.out,
        lens: &mut s.lens,
        used: 0,
    };
    fill(&mut sealer);
    sealer.flush();
}

/// Encrypts packets one by one into a shared buffer; see [`seal`].
pub(crate) struct Sealer<'a> {
    inner: &'a Inner,
    peer: &'a Peer,
    endpoint: SocketAddr,
    tunn: Option<MutexGuard<'a, Tunn>>,
    out: &'a mut [u8],
    lens: &'a mut Vec<usize>,
    used: usize,
}

impl Sealer<'_> {
    pub(crate) fn push(&mut self, packet: &[u8]) {
        if self.out.len() - self.used < room_for(packet.len()) {
            self.flush();
            if self.out.len() < room_for(packet.len()) {
                return;
            }
        }
        let peer = self.peer;
        let tunn = self.tunn.get_or_insert_with(|| peer.tunn());
        match tunn.encapsulate(packet, &mut self.out[self.used..]) {
            TunnResult::WriteToNetwork(buf) => {
                self.used += buf.len();
                self.lens.push(buf.len());
            }
            TunnResult::Err(e) => tracing::trace!(error = ?e, "encapsulate"),
            _ => {}
        }
    }

    /// Unlocks the session and sends what is encrypted.
    fn flush(&mut self) {
        self.tunn = None;
        if self.used > 0 {
            let out = &self.out[..self.used];
            send_batch(self.inner, self.peer, out, self.lens, self.endpoint);
        }
        self.used = 0;
        self.lens.clear();
    }
}

/// Sends datagrams that lie back to back in `buf` with lengths `lens`: each run of equal
/// lengths (the run's last may be shorter) in one GSO send ([`gso_runs`]).
fn send_batch(inner: &Inner, peer: &Peer, buf: &[u8], lens: &[usize], to: SocketAddr) {
    let started = inner.now_ms();
    let sockets = inner.sockets.load();
    for run in gso_runs(lens) {
        let Some(datagrams) = buf.get(run.start..run.start + run.bytes) else {
            return;
        };
        match sockets.send_segments(datagrams, run.segment, to) {
            Ok(n) => peer.count_tx(n, started, inner.now_ms()),
            Err(e) => tracing::trace!(error = %e, %to, "send failed"),
        }
    }
}

/// Datagrams sent in one GSO send: `bytes` from `start`, in segments of `segment` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GsoRun {
    start: usize,
    bytes: usize,
    segment: usize,
}

/// How datagrams with lengths `lens`, back to back, go out: runs of equal lengths (the last
/// may be shorter), at most [`MAX_GSO_SEGMENTS`] and [`MAX_GSO_BYTES`] each. A datagram larger
/// than UDP carries (an MTU above what the underlay can send) is left out, never sent.
fn gso_runs(lens: &[usize]) -> impl Iterator<Item = GsoRun> + '_ {
    let (mut start, mut i) = (0, 0);
    std::iter::from_fn(move || {
        while i < lens.len() {
            let segment = lens[i];
            let mut bytes = 0;
            let mut j = i;
            while j < lens.len()
                && j - i < MAX_GSO_SEGMENTS
                && bytes + lens[j] <= MAX_GSO_BYTES
                && (lens[j] == segment || (lens[j] < segment && j > i))
            {
                bytes += lens[j];
                j += 1;
                if lens[j - 1] < segment {
                    break;
                }
            }
            let run = GsoRun {
                start,
                bytes,
                segment,
            };
            if j == i {
                // Too large for one datagram: skipped (it stalled the batch for good).
                start += segment;
                i += 1;
                continue;
            }
            start += bytes;
            i = j;
            return Some(run);
        }
        None
    })
}

/// Decrypts transport-data datagrams from `src` for `peer` under one lock of its session,
/// then hands what they carried to the kernel through the coalescer, checking each packet's
/// source against the peer's allowed IPs. Roaming and counters follow only datagrams that
/// authenticate.
pub(crate) fn open<'d>(
    inner: &Inner,
    s: &mut Scratch,
    peer: &Peer,
    src: SocketAddr,
    datagrams: impl Iterator<Item = &'d [u8]>,
) {
    let table = inner.table.load();
    let now = inner.now_ms();
    s.decrypted.clear();
    s.coalescer.reset();
    let mut authenticated = 0;
    let mut used = 0;
    {
        let mut tunn = peer.tunn();
        for datagram in datagrams {
            // A decrypted packet is 32 bytes shorter than its datagram; `out` holds a batch.
            let Some(out) = s.out.get_mut(used..) else {
                break;
            };
            match tunn.decapsulate(Some(src.ip()), datagram, out) {
                TunnResult::WriteToTunnelV4(p, inner_src) => {
                    s.decrypted.push((used, p.len(), IpAddr::V4(inner_src)));
                    used += p.len();
                    authenticated += datagram.len();
                }
                TunnResult::WriteToTunnelV6(p, inner_src) => {
                    s.decrypted.push((used, p.len(), IpAddr::V6(inner_src)));
                    used += p.len();
                    authenticated += datagram.len();
                }
                // A keepalive: authenticated, carries nothing.
                TunnResult::Done => authenticated += datagram.len(),
                TunnResult::WriteToNetwork(_) => {}
                TunnResult::Err(e) => tracing::trace!(error = ?e, %src, "decapsulate"),
            }
        }
    }
    if authenticated > 0 {
        peer.set_endpoint(src);
        peer.count_rx(authenticated, now);
    }
    if !s.decrypted.is_empty() {
        peer.data_received(now);
    }
    let write = &mut |iov: &[IoSlice<'_>]| write_tun(inner, iov);
    for &(at, len, inner_src) in &s.decrypted {
        if !table.routes_to(inner_src, peer) {
            tracing::trace!(%inner_src, peer = %peer.public_key, "source not in allowed IPs");
            continue;
        }
        s.coalescer.push(&mut s.out, at, len, write);
    }
    s.coalescer.flush(&mut s.out, write);
}

/// One virtio-net header and its packet, in pieces, to the kernel.
fn write_tun(inner: &Inner, iov: &[IoSlice<'_>]) {
    if let Err(e) = inner.tun.write_vectored(iov) {
        tracing::trace!(error = %e, "TUN write");
    }
}

/// Idle time of the whole node between two samples of `/proc/stat`, in cores.
struct IdleCores {
    /// The cores the idle fraction is scaled to (the device's count, found once).
    cores: usize,
    /// Idle (with iowait) and total jiffies at the last sample.
    last: Option<(u64, u64)>,
}

impl IdleCores {
    fn sample(&mut self) -> Option<f64> {
        let cores = self.cores;
        let now = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_cpu_line(&s))?;
        let (idle, total) = now;
        let previous = self.last.replace(now)?;
        let busy_window = total.checked_sub(previous.1).filter(|&t| t > 0)?;
        let idle_window = idle.saturating_sub(previous.0);
        Some(idle_window as f64 / busy_window as f64 * cores as f64)
    }
}

/// Idle and total jiffies from the aggregate `cpu` line of `/proc/stat`.
fn parse_cpu_line(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice], the guests being
    // counted in user and nice already.
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    let total = fields.iter().take(8).sum();
    Some((idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_parses() {
        let cases = [
            ("auto", Ok(WorkerPolicy::Auto)),
            ("0", Ok(WorkerPolicy::Fixed(0))),
            ("2", Ok(WorkerPolicy::Fixed(2))),
            ("9", Err(())),
            ("-1", Err(())),
            ("", Err(())),
        ];
        for (text, want) in cases {
            assert_eq!(
                text.parse::<WorkerPolicy>().map_err(|_| ()),
                want,
                "{text:?}"
            );
        }
    }

    #[test]
    fn gso_runs_table() {
        let run = |start, bytes, segment| GsoRun {
            start,
            bytes,
            segment,
        };
        let too_big = MAX_GSO_BYTES + 1;
        let cases: Vec<(&str, Vec<usize>, Vec<GsoRun>)> = vec![
            ("nothing", vec![], vec![]),
            (
                "equal, then a shorter last",
                vec![100, 100, 60],
                vec![run(0, 260, 100)],
            ),
            (
                "a longer one starts a run",
                vec![60, 100, 100],
                vec![run(0, 60, 60), run(60, 200, 100)],
            ),
            ("too large for UDP: left out", vec![too_big], vec![]),
            (
                "too large between others",
                vec![100, too_big, 100],
                vec![run(0, 100, 100), run(100 + too_big, 100, 100)],
            ),
            (
                "at most MAX_GSO_SEGMENTS per run",
                vec![10; MAX_GSO_SEGMENTS + 1],
                vec![
                    run(0, 10 * MAX_GSO_SEGMENTS, 10),
                    run(10 * MAX_GSO_SEGMENTS, 10, 10),
                ],
            ),
        ];
        for (case, lens, want) in cases {
            assert_eq!(gso_runs(&lens).collect::<Vec<_>>(), want, "{case}");
        }
    }

    #[test]
    fn a_panicking_batch_is_no_longer_pending_and_the_worker_goes_on() {
        let pending = AtomicUsize::new(2);
        contain(Direction::Decrypt, &pending, || panic!("a bug"));
        assert_eq!(pending.load(Ordering::Acquire), 1);
        let mut ran = false;
        contain(Direction::Decrypt, &pending, || ran = true);
        assert!(ran);
        assert_eq!(pending.load(Ordering::Acquire), 0);
    }

    #[test]
    fn reads_the_cpu_line() {
        let stat = "cpu  100 5 50 1000 20 3 2 1 7 0\ncpu0 50 2 25 500 10 1 1 0 3 0\n";
        assert_eq!(parse_cpu_line(stat), Some((1020, 1181)));
        assert_eq!(parse_cpu_line("cpu0 1 2 3\n"), None);
        assert_eq!(parse_cpu_line("cpu  1 x 3\n"), None);
        assert_eq!(parse_cpu_line("cpu  1 2 3\n"), None);
    }
}
