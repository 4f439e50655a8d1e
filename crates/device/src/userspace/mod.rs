//! Our userspace WireGuard device: a TUN interface, UDP sockets and boringtun's `Tunn` per
//! peer, driven by a few OS threads, configurable in place without dropping sessions.
//!
//! Threads, all started from the creating thread (so all in its network namespace):
//! - `io`: takes turns between the TUN (read, route by allowed IPs, split TCP super-packets,
//!   hand them over) and the IPv4 socket (receive, find the peer, hand transport data over,
//!   answer handshakes), sleeping only when neither has anything (`datapath::run_io`);
//! - `udp6`: the same for the IPv6 socket;
//! - `wk<N>`, one per core: encrypt and send, or decrypt, check sources and write the TUN,
//!   for the peers assigned to them (`workers`);
//! - `ctl`: boringtun's timers every 250 ms, persistent keepalives, socket rebinding, and
//!   the handshakes a configuration change starts (`apply_ops`, `handover`);
//! - `uapi`: the `wg`-compatible control socket.
//!
//! Each runs under `supervise`: a panic, which would be a bug, is logged and the thread's loop
//! started again, rather than leaving the device without a reader or a worker.
//!
//! The peer table is an immutable snapshot behind an `ArcSwap`: the data path loads it
//! without locking, and a configuration change builds a new one around the same per-peer
//! runtime state, so sessions survive changes that do not concern them.

#![deny(unsafe_code)]

mod allowed_ips;
mod datapath;
mod edit;
mod handover;
mod limits;
mod offload;
mod peers;
mod sockets;
mod tun;
mod uapi;
mod uapi_server;
mod workers;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use self::edit::PeerEdit;
use self::handover::Handshakes;
use self::limits::{BUF_LEN, TICK};
use self::peers::{Identity, Peer, PeerTable};
use self::sockets::Sockets;
use self::tun::Tun;
use self::uapi::Op;
pub use self::workers::WorkerPolicy;
use self::workers::Workers;
use super::{DeviceChange, DeviceState, Error, InterfaceConfig, PeerState, validate_name};

/// A running userspace WireGuard device. Dropping it stops it.
pub struct UserspaceDevice {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
    uapi_path: Option<PathBuf>,
}

/// What the device's threads share.
pub(crate) struct Inner {
    name: String,
    tun: Tun,
    table: ArcSwap<PeerTable>,
    sockets: ArcSwap<Sockets>,
    stop: AtomicBool,
    epoch: Instant,
    /// Serialises configuration changes (the data path never takes it).
    writer: Mutex<Writer>,
    /// IPv6 socket readers: replaced when the listen port changes, joined at shutdown.
    udp_threads: Mutex<Vec<JoinHandle<()>>>,
    workers: Workers,
    /// Handshake initiations answered per source address.
    handshake_sources: limits::HandshakeSources,
}

struct Writer {
    control: mpsc::Sender<Control>,
    next_index: u32,
}

/// Work that must run on a device thread: new sockets must be bound, and their readers
/// started, in the device's network namespace, whichever thread calls `apply`; handshakes
/// are sent from there too, so that `apply` never waits on a peer's session lock.
enum Control {
    Rebind {
        port: u16,
        fwmark: u32,
        reply: mpsc::Sender<Result<u16, Error>>,
    },
    /// Start a handshake with each of these peers, whose session a change ended, and send it
    /// again until they have a new one (see `handover`).
    StartHandshakes(Vec<Arc<Peer>>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts the device thread `role`, running `run` under [`supervise`].
fn spawn(
    inner: &Arc<Inner>,
    role: &str,
    run: impl FnMut() + Send + 'static,
) -> Result<JoinHandle<()>, Error> {
    // Thread names are limited to 15 bytes by the kernel; keep the role visible.
    let mut thread_name = format!("{role}-{}", inner.name);
    thread_name.truncate(15);
    let inner = Arc::clone(inner);
    let role = role.to_owned();
    Ok(std::thread::Builder::new()
        .name(thread_name)
        .spawn(move || supervise(&inner.name, &role, || inner.stopping(), run))?)
}

/// Runs a device thread's loop, and runs it again after a panic, so that a bug set off by
/// one packet cannot leave the device half-dead (a reader gone means a direction gone).
/// Nothing here should panic on any input; when something does, it is logged as an error.
/// A loop that returns (the device stops, or its sockets were replaced) ends the thread.
fn supervise(interface: &str, role: &str, stopping: impl Fn() -> bool, mut run: impl FnMut()) {
    // AssertUnwindSafe: each loop sets up its own buffers when it starts, and shared state
    // sits behind locks whose poisoning `lock` ignores (see `workers::contain`).
    while let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut run)) {
        tracing::error!(
            interface,
            thread = role,
            message = %panic_message(&*panic),
            "a userspace device thread panicked; restarting it"
        );
        if stopping() {
            return;
        }
        // A panic on every packet must not spin a core, nor flood the log.
        std::thread::sleep(TICK);
    }
}

/// The text a panic was raised with, when it is text.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

impl UserspaceDevice {
    /// Creates the TUN interface `config.name` (not configured with addresses: the agent does
    /// that with rtnetlink), binds UDP sockets on `config.listen_port` for IPv4 and IPv6
    /// (SO_MARK when `fwmark != 0`, raised buffers), starts the data path, and serves the UAPI
    /// socket at `/var/run/wireguard/<name>.sock`. Everything lives in the calling thread's
    /// network namespace.
    pub fn create(config: InterfaceConfig) -> Result<Self, Error> {
        Self::create_with(config, WorkerPolicy::Auto)
    }

    /// [`UserspaceDevice::create`], with crypto spread over cores as `workers` says.
    pub fn create_with(config: InterfaceConfig, workers: WorkerPolicy) -> Result<Self, Error> {
        validate_name(&config.name)?;
        let tun = Tun::create(&config.name).map_err(|source| Error::Tun {
            name: config.name.clone(),
            source,
        })?;
        let sockets = Arc::new(Sockets::bind(config.listen_port, config.fwmark)?);
        let identity = Arc::new(Identity::new(config.private_key));
        let public_key = identity.public_key;
        let table = PeerTable::build(identity, sockets.port, config.fwmark, Vec::new());
        let (listener, uapi_path) = uapi_server::bind(&config.name)?;
        let (control_tx, control_rx) = mpsc::channel();
        let (workers, queues) = Workers::new(workers);
        // Indices only need to be unique within the device; a varying start makes stale
        // packets from a previous run of the device unlikely to match.
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let inner = Arc::new(Inner {
            name: config.name.clone(),
            tun,
            table: ArcSwap::from_pointee(table),
            sockets: ArcSwap::new(Arc::clone(&sockets)),
            stop: AtomicBool::new(false),
            epoch: Instant::now(),
            writer: Mutex::new(Writer {
                control: control_tx,
                next_index: seed,
            }),
            udp_threads: Mutex::new(Vec::new()),
            workers,
            handshake_sources: limits::HandshakeSources::default(),
        });
        // From here on, an early return drops `device`, which stops what was started.
        let mut device = UserspaceDevice {
            inner: Arc::clone(&inner),
            threads: Vec::new(),
            uapi_path: Some(uapi_path),
        };
        device
            .threads
            .extend(workers::spawn_workers(&inner, queues)?);
        inner.spawn_udp_readers(&sockets)?;
        let i = Arc::clone(&inner);
        device
            .threads
            .push(spawn(&inner, "io", move || datapath::run_io(&i))?);
        let i = Arc::clone(&inner);
        device
            .threads
            .push(spawn(&inner, "ctl", move || i.run_control(&control_rx))?);
        let i = Arc::clone(&inner);
        device.threads.push(spawn(&inner, "uapi", move || {
            uapi_server::serve(&i, &listener)
        })?);
        tracing::info!(
            interface = %config.name,
            listen_port = sockets.port,
            %public_key,
            "userspace WireGuard device started"
        );
        Ok(device)
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The device as it is now: configuration, current endpoints, handshakes and counters.
    pub fn observe(&self) -> DeviceState {
        state_of(&self.inner.table.load())
    }

    /// Applies changes in order, in place. On error, the changes before the failing one stay
    /// applied.
    pub fn apply(&self, changes: &[DeviceChange]) -> Result<(), Error> {
        self.inner
            .apply_ops(|_| changes.iter().map(|c| (c.clone(), false)).collect())
    }

    /// Starts a handshake with every peer that has an endpoint, so that peers holding a
    /// session with a previous run of this device (before an agent restart) get a new one
    /// within a round trip.
    pub fn initiate_handshakes(&self) {
        // A handshake initiation is 148 bytes.
        let mut out = [0u8; 256];
        let table = self.inner.table.load();
        datapath::initiate_handshakes(&self.inner, table.entries.iter().map(|e| &e.peer), &mut out);
    }

    /// Stops every thread and removes the UAPI socket; the TUN interface disappears when its
    /// descriptor closes, as the last reference to it goes.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Whether the interface (with its addresses and routes) outlives this device: see
    /// [`UserspaceDevice::delete`] for removing a persistent one.
    pub fn set_persistent(&self, persistent: bool) -> Result<(), Error> {
        self.inner
            .tun
            .set_persistent(persistent)
            .map_err(|source| Error::Tun {
                name: self.inner.name.clone(),
                source,
            })
    }

    /// Stops the device and removes its interface, persistent or not.
    pub fn delete(self) -> Result<(), Error> {
        let persistent = self.set_persistent(false);
        self.shutdown();
        persistent
    }

    fn stop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The control thread, which starts UDP readers, has ended: the list is final.
        let udp = std::mem::take(&mut *lock(&self.inner.udp_threads));
        for t in udp {
            let _ = t.join();
        }
        if let Some(path) = self.uapi_path.take() {
            let _ = std::fs::remove_file(path);
            tracing::info!(interface = %self.inner.name, "userspace WireGuard device stopped");
        }
    }
}

impl Drop for UserspaceDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

fn state_of(table: &PeerTable) -> DeviceState {
    DeviceState {
        public_key: table.identity.public_key,
        listen_port: table.listen_port,
        fwmark: table.fwmark,
        peers: table
            .entries
            .iter()
            .map(|e| PeerState {
                config: e.config.clone(),
                current_endpoint: e.peer.endpoint(),
                last_handshake: e.peer.last_handshake(),
                rx_bytes: e.peer.rx_bytes(),
                tx_bytes: e.peer.tx_bytes(),
            })
            .collect(),
    }
}

impl Inner {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Milliseconds on a clock that starts a day before the device, so that 0 ("never") is
    /// long enough ago for every keepalive interval.
    fn now_ms(&self) -> u64 {
        const DAY_MS: u64 = 86_400_000;
        DAY_MS + u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - DAY_MS)
    }

    fn spawn_udp_readers(self: &Arc<Self>, sockets: &Arc<Sockets>) -> Result<(), Error> {
        let mut threads = lock(&self.udp_threads);
        threads.retain(|t| !t.is_finished());
        // The IPv4 socket is the I/O thread's (it follows `sockets`).
        if sockets.v6.is_some() {
            let i = Arc::clone(self);
            let s = Arc::clone(sockets);
            threads.push(spawn(self, "udp6", move || {
                datapath::run_udp6_reader(&i, Arc::clone(&s))
            })?);
        }
        Ok(())
    }

    /// The control thread: timers on a fixed tick, and requests from `apply`.
    fn run_control(self: &Arc<Self>, requests: &mpsc::Receiver<Control>) {
        let mut out = vec![0u8; BUF_LEN];
        let mut next_tick = Instant::now();
        let mut handshakes: Handshakes<Arc<Peer>> = Handshakes::new();
        while !self.stopping() {
            let wake = handshakes
                .next_due()
                .map_or(next_tick, |d| d.min(next_tick));
            match requests.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(Control::Rebind {
                    port,
                    fwmark,
                    reply,
                }) => {
                    let _ = reply.send(self.rebind(port, fwmark));
                }
                Ok(Control::StartHandshakes(peers)) => {
                    let now = Instant::now();
                    for peer in peers {
                        handshakes.changed(peer, now);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            let now = Instant::now();
            let table = self.table.load();
            let settled = |peer: &Arc<Peer>| {
                let gone = table
                    .by_key(&peer.public_key)
                    .is_none_or(|e| !Arc::ptr_eq(&e.peer, peer));
                gone || peer.has_session()
            };
            for send in handshakes.due(now, settled) {
                datapath::initiate_handshake(self, &send.peer, send.force, &mut out);
            }
            if now >= next_tick {
                datapath::timer_tick(self, &mut out);
                self.workers.tick();
                next_tick = (next_tick + TICK).max(now);
            }
        }
    }

    /// Binds new sockets and moves the data path to them; the old readers notice and end.
    fn rebind(self: &Arc<Self>, port: u16, fwmark: u32) -> Result<u16, Error> {
        let sockets = Arc::new(Sockets::bind(port, fwmark)?);
        self.sockets.store(Arc::clone(&sockets));
        self.spawn_udp_readers(&sockets)?;
        tracing::info!(interface = %self.name, listen_port = sockets.port, "rebound");
        Ok(sockets.port)
    }

    /// Applies the operations `build` derives from the current peer table, as one
    /// transaction against concurrent writers.
    fn apply_ops(&self, build: impl FnOnce(&PeerTable) -> Vec<Op>) -> Result<(), Error> {
        if self.stopping() {
            return Err(Error::Stopped);
        }
        let mut writer = lock(&self.writer);
        let current = self.table.load_full();
        let ops = build(&current);

        let mut identity = Arc::clone(&current.identity);
        let mut listen_port = current.listen_port;
        let mut fwmark = current.fwmark;
        let mut edit = PeerEdit::new(&current);
        let mut result = Ok(());
        for (change, explicit_endpoint) in ops {
            match change {
                DeviceChange::UpsertPeer(cfg) => {
                    edit.upsert(&identity, &mut writer.next_index, cfg, explicit_endpoint);
                }
                DeviceChange::RemovePeer(key) => edit.remove(&key),
                // Port 0 means "any": an already bound device keeps its port, so that an agent
                // reapplying "0" does not rebind on every reconcile.
                DeviceChange::SetListenPort(port) if port == 0 || port == listen_port => {}
                DeviceChange::SetListenPort(port) => {
                    match self.request_rebind(&writer, port, fwmark) {
                        Ok(bound) => listen_port = bound,
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                DeviceChange::SetFwmark(mark) => {
                    if mark != fwmark {
                        if let Err(e) = self.sockets.load().set_fwmark(mark) {
                            result = Err(e.into());
                            break;
                        }
                        fwmark = mark;
                    }
                }
                DeviceChange::SetPrivateKey(key) => {
                    let new = Identity::new(key);
                    if new.public_key != identity.public_key {
                        identity = Arc::new(new);
                        edit.set_identity(&identity);
                    }
                }
            }
        }
        let (entries, handover) = edit.finish();
        // Publish even after an error: the changes before it already touched runtime state.
        self.table.store(Arc::new(PeerTable::build(
            identity,
            listen_port,
            fwmark,
            entries,
        )));
        if !handover.restart.is_empty() {
            // Only after the table is published: the answer must find the peer.
            let _ = writer
                .control
                .send(Control::StartHandshakes(handover.restart));
        }
        result
    }

    fn request_rebind(&self, writer: &Writer, port: u16, fwmark: u32) -> Result<u16, Error> {
        let (reply, answer) = mpsc::channel();
        writer
            .control
            .send(Control::Rebind {
                port,
                fwmark,
                reply,
            })
            .map_err(|_| Error::Stopped)?;
        answer.recv().map_err(|_| Error::Stopped)?
    }

    /// Answers one UAPI request.
    fn handle_uapi(&self, text: &str) -> String {
        match uapi::parse_request(text) {
            Ok(uapi::Request::Get) => {
                let table = self.table.load();
                uapi::render_get(&table.identity.private_key, &state_of(&table))
            }
            Ok(uapi::Request::Set(req)) => {
                match self.apply_ops(|current| {
                    uapi::set_to_ops(
                        req,
                        &current.identity.public_key,
                        current.entries.iter().map(|e| &e.config),
                    )
                }) {
                    Ok(()) => uapi::render_errno(0),
                    Err(e) => {
                        tracing::debug!(error = %e, "UAPI set");
                        uapi::render_errno(uapi::errno(&e))
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "UAPI request");
                uapi::render_errno(uapi::errno(&e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn a_panicking_thread_loop_is_run_again_until_it_returns() {
        let runs = Cell::new(0);
        supervise(
            "wgtest0",
            "tun",
            || false,
            || {
                runs.set(runs.get() + 1);
                if runs.get() < 3 {
                    panic!("bug number {}", runs.get());
                }
            },
        );
        assert_eq!(runs.get(), 3);
    }

    #[test]
    fn a_stopping_device_does_not_restart_a_panicked_loop() {
        let runs = Cell::new(0);
        supervise(
            "wgtest0",
            "udp4",
            || true,
            || {
                runs.set(runs.get() + 1);
                panic!("bug");
            },
        );
        assert_eq!(runs.get(), 1);
    }

    #[test]
    fn panic_messages_are_text() {
        let text = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(&*text), "plain");
        let formatted = std::panic::catch_unwind(|| panic!("n = {}", 4)).unwrap_err();
        assert_eq!(panic_message(&*formatted), "n = 4");
        let other = std::panic::catch_unwind(|| std::panic::panic_any(7u8)).unwrap_err();
        assert_eq!(panic_message(&*other), "");
    }
}
