//! The buffer size and the tick every thread of the device shares: the readers
//! (`datapath`), the crypto workers (`workers`), the device loop and the UAPI server. Its
//! own module so that `datapath` depends on `workers` and never the other way round.

use std::time::Duration;

/// Large enough for any IP packet plus WireGuard's overhead, and for any UDP datagram.
pub(crate) const BUF_LEN: usize = 65536 + 256;

/// How often boringtun's timers run (its documentation asks for about 250 ms), and how
/// often blocked loops look at the stop flag.
pub(crate) const TICK: Duration = Duration::from_millis(250);
