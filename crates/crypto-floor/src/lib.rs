//! The crypto floor of `cargo xtask bench dataplane`: what one seal and one open of every
//! packet cost with the AEAD our device uses, on one core, with nothing else around them.
//!
//! Our device's transport-data crypto is boringtun's `noise::Session`, which seals and opens
//! with `ring::aead::LessSafeKey` and `CHACHA20_POLY1305` (counter nonce, empty AAD, tag after
//! the ciphertext, no padding). This calls exactly that, in place, with no copies, no lock and
//! no syscall, so the figure is a lower bound for any device built on boringtun's noise. The
//! workspace has one `ring` (see the test), so it is the same code the agent runs.
//!
//! A crate of its own, with a binary, because the bench must time optimised code: ring built
//! for `cargo xtask` (the dev profile) takes about 40% longer per packet here than in release
//! (2.2-2.4 against 1.6 us per seal + open). The bench builds this binary in release together
//! with the agent and runs it once per round.

#![forbid(unsafe_code)]

use anyhow::{Context, Result, bail, ensure};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use std::fs;

/// Plaintext of one sealed packet: a full-MTU inner IP packet, as the bench's MTU is 1420.
pub const PACKET: usize = 1420;
/// TCP payload in one such packet: 1420 minus the IPv4 header (20) and the TCP header with
/// the timestamp option Linux sends by default (32). The bench's CPU s/GB counts iperf3's
/// payload bytes, so the floor is per GB of this payload to compare with it.
pub const TCP_PAYLOAD: usize = PACKET - 20 - 32;
/// Tag appended by ChaCha20-Poly1305.
const TAG: usize = 16;
/// What the floor measures, for the report.
pub const AEAD: &str = "ring::aead::CHACHA20_POLY1305 (LessSafeKey, as boringtun's noise)";

/// One measurement of the floor.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    /// Seal + open pairs timed.
    pub packets: usize,
    /// CPU seconds of this thread for all of them.
    pub cpu_s: f64,
}

impl Floor {
    /// CPU nanoseconds for one seal and one open of a 1420-byte packet.
    pub fn ns_per_packet(&self) -> f64 {
        self.cpu_s * 1e9 / self.packets as f64
    }

    /// CPU seconds per GB of TCP payload for one seal and one open of every packet: the
    /// bench's "CPU s/GB (both ends)" unit, where one end seals and the other opens.
    pub fn cpu_s_per_gb(&self) -> f64 {
        self.cpu_s / (self.packets as f64 * TCP_PAYLOAD as f64 / 1e9)
    }
}

/// Seals and opens `packets` packets of [`PACKET`] bytes in place with one key on this thread
/// and returns the thread's CPU time for it; fails if any packet does not open to its
/// plaintext.
pub fn measure(packets: usize) -> Result<Floor> {
    ensure!(packets > 0, "no packets to measure");
    let key = LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, &[0x5a; 32])
            .map_err(|_| anyhow::anyhow!("ChaCha20-Poly1305 key"))?,
    );
    let plaintext: Vec<u8> = (0..PACKET).map(|i| (i * 7 + 3) as u8).collect();
    let mut buf = plaintext.clone();
    buf.resize(PACKET + TAG, 0);
    // Warm up (CPU feature detection, caches), untimed.
    for counter in 0..(packets / 100).clamp(1, 1000) as u64 {
        seal_open(&key, counter, &mut buf)?;
    }
    let t0 = thread_cpu_ns()?;
    for counter in 0..packets as u64 {
        seal_open(&key, counter, &mut buf)?;
    }
    let t1 = thread_cpu_ns()?;
    if buf[..PACKET] != plaintext[..] {
        bail!("a sealed and opened packet differs from its plaintext");
    }
    Ok(Floor {
        packets,
        cpu_s: t1.saturating_sub(t0) as f64 / 1e9,
    })
}

/// Seals `buf[..PACKET]` in place (tag into the last 16 bytes) under `counter`, as boringtun's
/// sender does, then opens it in place as its receiver does, leaving the plaintext again.
fn seal_open(key: &LessSafeKey, counter: u64, buf: &mut [u8]) -> Result<()> {
    let (data, tag) = buf.split_at_mut(PACKET);
    let sealed = key
        .seal_in_place_separate_tag(nonce(counter), Aad::empty(), data)
        .map_err(|_| anyhow::anyhow!("seal failed"))?;
    tag.copy_from_slice(sealed.as_ref());
    let opened = key
        .open_in_place(nonce(counter), Aad::empty(), buf)
        .map_err(|_| anyhow::anyhow!("a sealed packet did not open"))?;
    ensure!(opened.len() == PACKET, "opened {} bytes", opened.len());
    Ok(())
}

/// WireGuard's nonce: 4 zero bytes, then the 64-bit counter little-endian.
fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// This thread's time on a CPU, in nanoseconds (the first field of its schedstat). The kernel
/// brings a running thread's figure up to date only at a tick or a pass through the scheduler,
/// so yield first: that updates it to the nanosecond.
fn thread_cpu_ns() -> Result<u64> {
    std::thread::yield_now();
    let s = fs::read_to_string("/proc/thread-self/schedstat")
        .context("reading /proc/thread-self/schedstat")?;
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("malformed /proc/thread-self/schedstat")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_returns_a_positive_figure() {
        let f = measure(200).unwrap();
        assert_eq!(f.packets, 200);
        assert!(f.cpu_s > 0.0, "{f:?}");
        assert!(f.ns_per_packet() > 0.0 && f.cpu_s_per_gb() > 0.0);
        // 1 s of CPU for 1e9 / 1368 packets is 1 s/GB.
        let one = Floor {
            packets: 1_000_000_000 / TCP_PAYLOAD,
            cpu_s: 1.0,
        };
        assert!((one.cpu_s_per_gb() - 1.0).abs() < 1e-3);
        assert!(measure(0).is_err());
    }

    #[test]
    fn a_tampered_packet_does_not_open() {
        let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &[1; 32]).unwrap());
        let mut buf = vec![9u8; PACKET + TAG];
        let (data, tag) = buf.split_at_mut(PACKET);
        let t = key
            .seal_in_place_separate_tag(nonce(7), Aad::empty(), data)
            .unwrap();
        tag.copy_from_slice(t.as_ref());
        buf[100] ^= 1;
        assert!(key.open_in_place(nonce(7), Aad::empty(), &mut buf).is_err());
    }

    /// The floor must use the device's AEAD: boringtun's noise seals with `ring`, and the
    /// lockfile holds one `ring`, so xtask's is the agent's.
    #[test]
    fn the_workspace_has_one_ring_and_boringtun_uses_it() {
        let lock =
            fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock")).unwrap();
        let packages: Vec<&str> = lock.split("[[package]]").collect();
        let rings = packages
            .iter()
            .filter(|p| p.contains("\nname = \"ring\"\n"))
            .count();
        assert_eq!(rings, 1, "more than one ring in Cargo.lock");
        let boringtun = packages
            .iter()
            .find(|p| p.contains("\nname = \"boringtun\"\n"))
            .expect("boringtun in Cargo.lock");
        assert!(boringtun.contains("\n \"ring\","), "{boringtun}");
    }
}
