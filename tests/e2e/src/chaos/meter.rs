//! The traffic and stall meter: a steady TCP stream from one pod to another (a sequence
//! number every 10 ms; the receiver records when each arrives), and UDP pings from the same
//! pod to a third (every 20 ms, echoed back). From these: the longest stall of the stream in a
//! time window, pings lost, and whether the TCP connection broke (a reset, or any end of it
//! we did not ask for). Threads enter the pods' network namespaces; nothing else runs there.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

pub const STREAM_PORT: u16 = 7100;
pub const PING_PORT: u16 = 7101;
/// Between two messages of the stream: the resolution of the stall figures.
pub const STREAM_INTERVAL: Duration = Duration::from_millis(10);
pub const PING_INTERVAL: Duration = Duration::from_millis(20);
/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// The longest time, in ms, without a stream message arriving within `[from, to]`: gaps
/// between consecutive arrivals, counting from the last arrival before `from` (or `from`)
/// and up to `to` when nothing arrived since the last one. `arrivals` is sorted.
pub fn longest_gap(arrivals: &[u64], from: u64, to: u64) -> u64 {
    let first = arrivals.partition_point(|&t| t < from);
    let last = arrivals.partition_point(|&t| t <= to);
    let mut prev = if first > 0 { arrivals[first - 1] } else { from };
    let mut longest = 0;
    for &t in &arrivals[first..last] {
        longest = longest.max(t - prev);
        prev = t;
    }
    longest.max(to.saturating_sub(prev))
}

/// Pings sent within `[from, to)` and, of those, how many got no reply. `sent[i]` is when
/// ping `i` was sent (sorted), `replied[i]` whether its echo came back.
pub fn pings_lost(sent: &[u64], replied: &[bool], from: u64, to: u64) -> (u64, u64) {
    let first = sent.partition_point(|&t| t < from);
    let last = sent.partition_point(|&t| t < to);
    let lost = (first..last)
        .filter(|&i| !replied.get(i).copied().unwrap_or(false))
        .count();
    ((last - first) as u64, lost as u64)
}

#[derive(Default)]
struct State {
    /// When each stream message arrived (ms since the meter started).
    arrivals: Vec<u64>,
    /// Messages whose sequence number was not the one after the previous (within one
    /// connection TCP makes this impossible: a non-zero count is a meter bug).
    sequence_errors: u64,
    /// Ends of the stream's connection we did not ask for: (ms, what happened).
    breaks: Vec<(u64, String)>,
    /// When each ping was sent, by sequence number.
    ping_sent: Vec<u64>,
    ping_replied: Vec<bool>,
}

/// What the meter saw within a time window.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Window {
    pub longest_stall_ms: u64,
    pub messages: u64,
    pub pings_sent: u64,
    pub pings_lost: u64,
    /// Breaks of the TCP connection in the window (resets, unexpected ends, failed writes).
    pub breaks: Vec<String>,
}

/// A running meter; dropping it stops its threads.
pub struct Meter {
    start: Instant,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<State>>,
    threads: Vec<JoinHandle<()>>,
}

impl Meter {
    /// Streams from `src` to `tcp_ip` (inside `tcp_ns`) and pings `ping_ip` (inside
    /// `ping_ns`).
    pub fn start(
        src: &Netns,
        (tcp_ns, tcp_ip): (&Netns, &str),
        (ping_ns, ping_ip): (&Netns, &str),
    ) -> Result<Self> {
        let mut meter = Meter {
            start: Instant::now(),
            stop: Arc::new(AtomicBool::new(false)),
            state: Arc::new(Mutex::new(State::default())),
            threads: Vec::new(),
        };
        let tcp_to: SocketAddr = format!("{tcp_ip}:{STREAM_PORT}").parse()?;
        let ping_to: SocketAddr = format!("{ping_ip}:{PING_PORT}").parse()?;

        let listener = in_netns(tcp_ns, || {
            let l = TcpListener::bind(("0.0.0.0", STREAM_PORT))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let (stop, state, start) = (meter.stop.clone(), meter.state.clone(), meter.start);
        meter.threads.push(std::thread::spawn(move || {
            receive_stream(listener, &stop, &state, start)
        }));

        let echo = in_netns(ping_ns, || {
            let s = UdpSocket::bind(("0.0.0.0", PING_PORT))?;
            s.set_read_timeout(Some(POLL))?;
            Ok(s)
        })?;
        let stop = meter.stop.clone();
        meter
            .threads
            .push(std::thread::spawn(move || echo_pings(echo, &stop)));

        let path = src.path();
        let (stop, state) = (meter.stop.clone(), meter.state.clone());
        meter.threads.push(std::thread::spawn(move || {
            if enter(&path).is_ok() {
                send_stream(tcp_to, &stop, &state, start);
            }
        }));

        let pinger = in_netns(src, move || {
            let s = UdpSocket::bind(("0.0.0.0", 0))?;
            s.set_read_timeout(Some(POLL))?;
            Ok(s)
        })?;
        let replies = pinger.try_clone()?;
        let (stop, state) = (meter.stop.clone(), meter.state.clone());
        meter.threads.push(std::thread::spawn(move || {
            send_pings(pinger, ping_to, &stop, &state, start)
        }));
        let (stop, state) = (meter.stop.clone(), meter.state.clone());
        meter.threads.push(std::thread::spawn(move || {
            receive_pongs(replies, &stop, &state)
        }));
        Ok(meter)
    }

    /// Milliseconds since the meter started: the time base of windows.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stream messages received so far.
    pub fn received(&self) -> u64 {
        self.state().arrivals.len() as u64
    }

    pub fn sequence_errors(&self) -> u64 {
        self.state().sequence_errors
    }

    /// What the meter saw between `from` and `to` (ms, see [`Meter::now_ms`]).
    pub fn window(&self, from: u64, to: u64) -> Window {
        let s = self.state();
        let first = s.arrivals.partition_point(|&t| t < from);
        let last = s.arrivals.partition_point(|&t| t <= to);
        let (pings_sent, pings_lost) = pings_lost(&s.ping_sent, &s.ping_replied, from, to);
        Window {
            longest_stall_ms: longest_gap(&s.arrivals, from, to),
            messages: (last - first) as u64,
            pings_sent,
            pings_lost,
            breaks: s
                .breaks
                .iter()
                .filter(|(t, _)| (from..=to).contains(t))
                .map(|(t, what)| format!("at {t} ms: {what}"))
                .collect(),
        }
    }

    /// When the first ping sent at or after `after` (ms) that got a reply was sent: the data
    /// path works again from then on.
    pub fn first_answered_ping(&self, after: u64) -> Option<u64> {
        let s = self.state();
        let first = s.ping_sent.partition_point(|&t| t < after);
        (first..s.ping_sent.len())
            .find(|&i| s.ping_replied[i])
            .map(|i| s.ping_sent[i])
    }

    /// Waits until `messages` stream messages and a ping reply arrived after `after` (ms):
    /// the traffic flows.
    pub async fn wait_flowing(&self, after: u64, messages: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let (got, pong) = {
                let s = self.state();
                let got = s.arrivals.len() - s.arrivals.partition_point(|&t| t <= after);
                let first = s.ping_sent.partition_point(|&t| t <= after);
                (got as u64, s.ping_replied[first..].iter().any(|&r| r))
            };
            if got >= messages && pong {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the traffic did not flow again in {timeout:?}: {got} of {messages} stream messages, {} ping replies",
                    if pong { "some" } else { "no" }
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn enter(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {path}"))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering {path}"))
}

/// Runs `f` on a thread inside `ns`: sockets it makes live there, whichever thread uses them.
fn in_netns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = ns.path();
    std::thread::spawn(move || enter(&path).and_then(|()| f()))
        .join()
        .map_err(|_| anyhow::anyhow!("a thread panicked"))?
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}

fn receive_stream(listener: TcpListener, stop: &AtomicBool, state: &Mutex<State>, start: Instant) {
    while !stop.load(Ordering::Relaxed) {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(_) => continue,
        };
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(POLL));
        read_messages(conn, stop, state, start);
    }
}

/// Reads 8-byte sequence numbers until the connection ends or the meter stops.
fn read_messages(mut conn: TcpStream, stop: &AtomicBool, state: &Mutex<State>, start: Instant) {
    let mut buf = [0u8; 4096];
    let mut pending: Vec<u8> = Vec::new();
    let mut expected: Option<u64> = None;
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => {
                lock(state).breaks.push((
                    ms(start),
                    "receiver: the sender closed the connection".into(),
                ));
                return;
            }
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                let now = ms(start);
                let mut s = lock(state);
                let whole = pending.len() / 8 * 8;
                for chunk in pending[..whole].chunks_exact(8) {
                    let seq = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
                    if expected.is_some_and(|e| e != seq) {
                        s.sequence_errors += 1;
                    }
                    expected = Some(seq + 1);
                    s.arrivals.push(now);
                }
                pending.drain(..whole);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                lock(state)
                    .breaks
                    .push((ms(start), format!("receiver: {e}")));
                return;
            }
        }
    }
}

fn send_stream(to: SocketAddr, stop: &AtomicBool, state: &Mutex<State>, start: Instant) {
    let mut seq: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut conn = match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(c) => c,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let _ = conn.set_nodelay(true);
        // While the path is down the send buffer fills (each unacknowledged 8-byte segment is
        // charged a whole packet buffer) and writes block for seconds: a stall, not a break.
        // The timeout only lets the loop see the stop flag.
        let _ = conn.set_write_timeout(Some(POLL));
        let mut next = Instant::now();
        'connection: while !stop.load(Ordering::Relaxed) {
            let message = seq.to_be_bytes();
            let mut written = 0;
            while written < message.len() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                match conn.write(&message[written..]) {
                    Ok(n) => written += n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                        ) => {}
                    Err(e) => {
                        lock(state).breaks.push((ms(start), format!("sender: {e}")));
                        break 'connection;
                    }
                }
            }
            seq += 1;
            // Steady pace, without catching up in bursts after a slow write.
            next = (next + STREAM_INTERVAL).max(Instant::now());
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    }
}

fn echo_pings(socket: UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}

fn send_pings(
    socket: UdpSocket,
    to: SocketAddr,
    stop: &AtomicBool,
    state: &Mutex<State>,
    start: Instant,
) {
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let seq = {
            let mut s = lock(state);
            s.ping_sent.push(ms(start));
            s.ping_replied.push(false);
            (s.ping_sent.len() - 1) as u64
        };
        // A failed send (no route, for a moment) is a lost ping like any other.
        let _ = socket.send_to(&seq.to_be_bytes(), to);
        next = (next + PING_INTERVAL).max(Instant::now());
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

fn receive_pongs(socket: UdpSocket, stop: &AtomicBool, state: &Mutex<State>) {
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        if let Ok(n) = socket.recv(&mut buf)
            && n == 8
        {
            let seq = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")) as usize;
            if let Some(r) = lock(state).ping_replied.get_mut(seq) {
                *r = true;
            }
        }
    }
}

/// UDP datagrams from a pod to an address every 10 ms, until dropped: traffic that must
/// not leak while the mesh converges (whether anything answers does not matter).
pub struct Spray {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

pub const SPRAY_PORT: u16 = 7102;

impl Spray {
    pub fn start(src: &Netns, to: std::net::Ipv4Addr) -> Result<Self> {
        let socket = in_netns(src, || Ok(UdpSocket::bind(("0.0.0.0", 0))?))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let _ = socket.send_to(b"spray", (to, SPRAY_PORT));
                std::thread::sleep(STREAM_INTERVAL);
            }
        });
        Ok(Spray {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Spray {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_gap_in_a_window() {
        let arrivals = [0, 10, 20, 30, 530, 540, 550];
        // The 500 ms hole, seen from a window that starts inside it.
        assert_eq!(longest_gap(&arrivals, 25, 600), 500);
        assert_eq!(longest_gap(&arrivals, 100, 540), 500);
        // Steady traffic only; the window's end counts when nothing came since.
        assert_eq!(longest_gap(&arrivals, 0, 30), 10);
        assert_eq!(longest_gap(&arrivals, 540, 600), 50);
        // Nothing ever arrived: the whole window is a stall.
        assert_eq!(longest_gap(&[], 100, 400), 300);
        // Nothing arrived before the window either: counted from its start.
        assert_eq!(longest_gap(&[300], 100, 300), 200);
    }

    #[test]
    fn pings_lost_in_a_window() {
        let sent = [0, 20, 40, 60, 80];
        let replied = [true, false, false, true, true];
        assert_eq!(pings_lost(&sent, &replied, 0, 100), (5, 2));
        assert_eq!(pings_lost(&sent, &replied, 20, 60), (2, 2));
        assert_eq!(pings_lost(&sent, &replied, 60, 100), (2, 0));
        assert_eq!(pings_lost(&[], &[], 0, 100), (0, 0));
        // A reply flag not recorded yet counts as lost.
        assert_eq!(pings_lost(&sent, &replied[..3], 0, 100), (5, 4));
    }
}
