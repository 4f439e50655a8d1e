//! The wg-quick configuration format (`wg0.conf`): parse it from any text, render it back.
//!
//! Parsing is strict where a mistake would silently change the tunnel (bad keys, CIDRs, ports,
//! duplicate single-valued keys, unknown `[Peer]` keys) and lenient where wg-quick is (case of
//! section and key names, comments, blank lines, CRLF, a UTF-8 byte order mark, repeated
//! `Address`/`AllowedIPs`/`DNS` lines). Every error names its 1-based line. Any input, however
//! malformed or large, yields a value or an error, never a panic.
//!
//! [`render`] writes the canonical form, and `parse(&render(&cfg)) == Ok(cfg)` for every `cfg`
//! that [`parse`] can produce.
//!
//! Decisions:
//! - Exactly one `[Interface]` is required; `[Peer]` sections may come before or after it.
//! - Unknown keys in `[Interface]` (`PreUp`, `PostUp`, `PreDown`, `PostDown`, `SaveConfig`, ...)
//!   are kept in order in [`Interface::extra`]; unknown keys in `[Peer]` are rejected, as
//!   `wg setconf` does, so that a typo such as `AllowedIP` cannot silently drop routes.
//! - Two peers with the same public key are rejected (wg would merge them silently).
//! - Only `#` starts a comment, anywhere on a line (as in wg-quick); `;` is an ordinary character.
//! - A peer's [`Peer::comment`] comes from a `# Name = x` (or `# Name: x`) comment inside its
//!   section, or else from the comment block directly above its `[Peer]` line (its `Name` line
//!   if it has one, otherwise its last line).
//! - Control characters other than tab are rejected anywhere, so no value can smuggle a line
//!   break into a rendered config.

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;

use crate::{Cidr, Key, PrivateKey, PublicKey};

/// The largest input [`parse`] accepts, in bytes.
pub const MAX_INPUT_LEN: usize = 1 << 20;
/// The longest line [`parse`] accepts, in bytes (without the line break).
pub const MAX_LINE_LEN: usize = 4096;

/// A whole wg-quick file: one interface and its peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WgQuickConfig {
    pub interface: Interface,
    pub peers: Vec<Peer>,
}

/// The `[Interface]` section.
#[derive(Debug, Clone, Default)]
pub struct Interface {
    pub private_key: Option<PrivateKey>,
    /// Tunnel addresses; host bits are kept (`10.0.0.2/24`), a bare address is a `/32` or `/128`.
    pub addresses: Vec<IpNet>,
    pub listen_port: Option<u16>,
    /// Name servers (IP addresses) and search domains, as written.
    pub dns: Vec<String>,
    pub mtu: Option<u16>,
    /// `None` for an absent key or `off`.
    pub fwmark: Option<u32>,
    /// `off`, `auto`, a table number or name, as written.
    pub table: Option<String>,
    /// Every other key (`PostUp`, `SaveConfig`, ...), in file order, key spelled as written.
    pub extra: Vec<(String, String)>,
}

impl PartialEq for Interface {
    fn eq(&self, other: &Self) -> bool {
        // PrivateKey has no PartialEq on purpose (no casual comparisons of secrets); comparing
        // configs is a legitimate need, and the bytes never leave this function.
        self.private_key.as_ref().map(PrivateKey::to_bytes)
            == other.private_key.as_ref().map(PrivateKey::to_bytes)
            && self.addresses == other.addresses
            && self.listen_port == other.listen_port
            && self.dns == other.dns
            && self.mtu == other.mtu
            && self.fwmark == other.fwmark
            && self.table == other.table
            && self.extra == other.extra
    }
}

impl Eq for Interface {}

/// A `[Peer]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub public_key: PublicKey,
    pub preshared_key: Option<Key>,
    /// Masked networks, as `wg` programs them (`10.0.0.1/24` reads as `10.0.0.0/24`).
    pub allowed_ips: Vec<Cidr>,
    /// `host:port`, `[v6]:port` or `dns-name:port`, validated, as written.
    pub endpoint: Option<String>,
    /// `None` for an absent key or `off`.
    pub persistent_keepalive: Option<u16>,
    /// A human name for the peer, from a `# Name = x` or the comment line above `[Peer]`.
    pub comment: Option<String>,
}

impl Peer {
    /// A peer with only its public key set.
    pub fn new(public_key: PublicKey) -> Self {
        Peer {
            public_key,
            preshared_key: None,
            allowed_ips: Vec::new(),
            endpoint: None,
            persistent_keepalive: None,
            comment: None,
        }
    }
}

/// Why a text is not a valid wg-quick config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number; 0 when the error concerns the whole input (too large, no
    /// `[Interface]`).
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(&self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

impl std::error::Error for ParseError {}

impl FromStr for WgQuickConfig {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

// Deliberately no `Display` for `WgQuickConfig`: the rendered text holds the private key, and
// `PrivateKey` itself refuses to print by accident. Call `render` on purpose.

// Shared by the parser (which refuses these) and the renderer (which blanks them out).

fn is_forbidden_control(c: char) -> bool {
    c.is_control() && c != '\t'
}

/// A parse error. Messages quote the input to say what is wrong, and the input may be a
/// private key anywhere (on a line without `=`, as a key name, `PrivateKey: ...`): every run
/// of 20 or more base64 characters in the message is replaced by `<redacted>`, so no error
/// prints a key, whole or most of it.
fn error(line: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line,
        message: redact_key_like(&message.into()),
    }
}

/// `s` with every run of at least 20 base64 characters (`A-Za-z0-9+/=`) replaced by
/// `<redacted>`: nothing left is a usable part of a 44-character key.
fn redact_key_like(s: &str) -> String {
    const RUN: usize = 20;
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=';
    let mut out = String::with_capacity(s.len());
    let mut run = String::new();
    for c in s.chars().chain(std::iter::once('\n')) {
        if is_b64(c) {
            run.push(c);
            continue;
        }
        if run.len() >= RUN {
            out.push_str("<redacted>");
        } else {
            out.push_str(&run);
        }
        run.clear();
        out.push(c);
    }
    out.pop();
    out
}

/// The value of a `Name = x` or `Name: x` comment (already stripped of its `#`).
fn name_tag(text: &str) -> Option<&str> {
    let head = text.get(..4)?;
    if !head.eq_ignore_ascii_case("name") {
        return None;
    }
    let rest = text.get(4..)?.trim_start();
    let rest = rest.strip_prefix('=').or_else(|| rest.strip_prefix(':'))?;
    let value = rest.trim();
    (!value.is_empty()).then_some(value)
}

mod parse;
mod render;
mod validate;

pub use parse::parse;
pub use render::{render, render_peer};

#[cfg(test)]
mod tests;
