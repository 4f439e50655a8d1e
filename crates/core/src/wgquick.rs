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

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::validate::{
    check_endpoint, is_host_name, is_name_byte, looks_numeric, parse_digits, show,
};
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

/// Parses a wg-quick config. See the module documentation for what is accepted.
pub fn parse(text: &str) -> Result<WgQuickConfig, ParseError> {
    if text.len() > MAX_INPUT_LEN {
        return Err(error(
            0,
            format!(
                "input is {} bytes; a wg-quick config may be at most {MAX_INPUT_LEN} bytes",
                text.len()
            ),
        ));
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut parser = Parser::default();
    for (index, raw) in text.split('\n').enumerate() {
        parser.line(index + 1, raw)?;
    }
    parser.finish()
}

/// Renders a config in canonical wg-quick form: `[Interface]` first, then each `[Peer]` after a
/// blank line (preceded by `# comment` when it has one), `Key = value` lines, lists joined with
/// `", "`, empty lists and unset options left out, and a trailing newline.
///
/// The output contains the private key. Control characters in free-text fields (which [`parse`]
/// never produces) are replaced by spaces so that no field can inject extra lines.
pub fn render(cfg: &WgQuickConfig) -> String {
    let mut out = String::new();
    let i = &cfg.interface;
    out.push_str("[Interface]\n");
    if let Some(key) = &i.private_key {
        key_value(&mut out, "PrivateKey", &key.expose_base64());
    }
    list(
        &mut out,
        "Address",
        i.addresses.iter().map(ToString::to_string),
    );
    if let Some(port) = i.listen_port {
        key_value(&mut out, "ListenPort", &port.to_string());
    }
    if let Some(mark) = i.fwmark {
        key_value(&mut out, "FwMark", &format!("{mark:#x}"));
    }
    list(&mut out, "DNS", i.dns.iter().map(|d| one_line(d)));
    if let Some(mtu) = i.mtu {
        key_value(&mut out, "MTU", &mtu.to_string());
    }
    if let Some(table) = &i.table {
        key_value(&mut out, "Table", &one_line(table));
    }
    for (key, value) in &i.extra {
        key_value(&mut out, &one_line(key), &one_line(value));
    }
    for peer in &cfg.peers {
        out.push('\n');
        out.push_str(&render_peer(peer));
    }
    out
}

/// Renders one `[Peer]` section (with its `# comment` line), as [`render`] writes it: what a
/// node or a remote site hands to the other side of a tunnel. Holds no private key.
pub fn render_peer(peer: &Peer) -> String {
    let mut out = String::new();
    if let Some(comment) = &peer.comment {
        let comment = one_line(comment);
        let comment = comment.trim();
        if !comment.is_empty() {
            // A comment that itself reads as a name tag is wrapped in one, so that it
            // parses back unchanged.
            if name_tag(comment).is_some() {
                out.push_str("# Name = ");
            } else {
                out.push_str("# ");
            }
            out.push_str(comment);
            out.push('\n');
        }
    }
    out.push_str("[Peer]\n");
    key_value(&mut out, "PublicKey", &peer.public_key.to_base64());
    if let Some(psk) = &peer.preshared_key {
        key_value(&mut out, "PresharedKey", &psk.to_base64());
    }
    list(
        &mut out,
        "AllowedIPs",
        peer.allowed_ips.iter().map(ToString::to_string),
    );
    if let Some(endpoint) = &peer.endpoint {
        key_value(&mut out, "Endpoint", &one_line(endpoint));
    }
    if let Some(keepalive) = peer.persistent_keepalive {
        key_value(&mut out, "PersistentKeepalive", &keepalive.to_string());
    }
    out
}

fn key_value(out: &mut String, key: &str, value: &str) {
    out.push_str(key);
    if value.is_empty() {
        out.push_str(" =\n");
    } else {
        out.push_str(" = ");
        out.push_str(value);
        out.push('\n');
    }
}

fn list(out: &mut String, key: &str, items: impl Iterator<Item = String>) {
    let items: Vec<String> = items.collect();
    if !items.is_empty() {
        key_value(out, key, &items.join(", "));
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if is_forbidden_control(c) { ' ' } else { c })
        .collect()
}

fn is_forbidden_control(c: char) -> bool {
    c.is_control() && c != '\t'
}

fn error(line: usize, message: impl Into<String>) -> ParseError {
    ParseError {
        line,
        message: message.into(),
    }
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

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Section {
    #[default]
    None,
    Interface,
    Peer,
}

/// Single-valued keys already seen in a section, with their lines.
#[derive(Default)]
struct Seen(Vec<(&'static str, usize)>);

impl Seen {
    fn once(&mut self, key: &'static str, line: usize) -> Result<(), ParseError> {
        if let Some((_, first)) = self.0.iter().find(|(k, _)| *k == key) {
            return Err(error(
                line,
                format!("duplicate {key} (already set at line {first})"),
            ));
        }
        self.0.push((key, line));
        Ok(())
    }
}

struct PeerBuilder {
    line: usize,
    public_key: Option<PublicKey>,
    preshared_key: Option<Key>,
    allowed_ips: Vec<Cidr>,
    endpoint: Option<String>,
    persistent_keepalive: Option<u16>,
    above_comment: Option<String>,
    name_tag: Option<String>,
    seen: Seen,
}

/// The comment lines since the last non-comment line.
#[derive(Default)]
struct CommentBlock {
    first_name_tag: Option<String>,
    last_nonempty: Option<String>,
}

#[derive(Default)]
struct Parser {
    section: Section,
    /// The interface and the line of its header.
    interface: Option<(usize, Interface, Seen)>,
    peer: Option<PeerBuilder>,
    peers: Vec<Peer>,
    /// Public keys of all peers so far, with the line they were set on.
    peer_keys: HashMap<PublicKey, usize>,
    comments: CommentBlock,
}

const INTERFACE_KEYS: &[&str] = &[
    "privatekey",
    "address",
    "listenport",
    "dns",
    "mtu",
    "fwmark",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
];
const PEER_KEYS: &[&str] = &[
    "publickey",
    "presharedkey",
    "allowedips",
    "endpoint",
    "persistentkeepalive",
];

impl Parser {
    fn line(&mut self, n: usize, raw: &str) -> Result<(), ParseError> {
        if raw.len() > MAX_LINE_LEN {
            return Err(error(
                n,
                format!(
                    "line is {} bytes long; at most {MAX_LINE_LEN} are allowed",
                    raw.len()
                ),
            ));
        }
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if let Some(c) = raw.chars().find(|c| is_forbidden_control(*c)) {
            return Err(error(
                n,
                format!("control character U+{:04X} in line", u32::from(c)),
            ));
        }
        let (content, comment) = match raw.split_once('#') {
            Some((content, comment)) => (content.trim(), Some(comment)),
            None => (raw.trim(), None),
        };
        if content.is_empty() {
            match comment {
                Some(comment) => self.comment_line(comment),
                None => self.flush_comments(),
            }
            return Ok(());
        }
        if content.starts_with('[') {
            self.section_line(n, content)
        } else {
            self.flush_comments();
            self.key_line(n, content)
        }
    }

    fn comment_line(&mut self, comment: &str) {
        let text = comment.trim_start_matches('#').trim();
        if text.is_empty() {
            return;
        }
        if self.comments.first_name_tag.is_none() {
            self.comments.first_name_tag = name_tag(text).map(str::to_owned);
        }
        self.comments.last_nonempty = Some(text.to_owned());
    }

    /// Ends a comment block that is not directly above a `[Peer]`: a name tag in it names the
    /// peer whose section it is in.
    fn flush_comments(&mut self) {
        let block = std::mem::take(&mut self.comments);
        if let (Section::Peer, Some(peer)) = (self.section, self.peer.as_mut())
            && peer.name_tag.is_none()
        {
            peer.name_tag = block.first_name_tag;
        }
    }

    fn section_line(&mut self, n: usize, content: &str) -> Result<(), ParseError> {
        let Some(inner) = content
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
        else {
            return Err(error(
                n,
                format!(
                    "malformed section header {}: expected [Interface] or [Peer]",
                    show(content)
                ),
            ));
        };
        let name = inner.trim();
        if name.eq_ignore_ascii_case("interface") {
            self.flush_comments();
            self.finish_peer()?;
            if let Some((first, _, _)) = &self.interface {
                return Err(error(
                    n,
                    format!(
                        "second [Interface] section (the first is at line {first}); a config has exactly one"
                    ),
                ));
            }
            self.interface = Some((n, Interface::default(), Seen::default()));
            self.section = Section::Interface;
            Ok(())
        } else if name.eq_ignore_ascii_case("peer") {
            let block = std::mem::take(&mut self.comments);
            self.finish_peer()?;
            self.peer = Some(PeerBuilder {
                line: n,
                public_key: None,
                preshared_key: None,
                allowed_ips: Vec::new(),
                endpoint: None,
                persistent_keepalive: None,
                above_comment: block.first_name_tag.or(block.last_nonempty),
                name_tag: None,
                seen: Seen::default(),
            });
            self.section = Section::Peer;
            Ok(())
        } else {
            Err(error(
                n,
                format!(
                    "unknown section {}: expected [Interface] or [Peer]",
                    show(content)
                ),
            ))
        }
    }

    fn key_line(&mut self, n: usize, content: &str) -> Result<(), ParseError> {
        let Some((key, value)) = content.split_once('=') else {
            return Err(error(
                n,
                format!("missing '=' in {}: expected Key = Value", show(content)),
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(error(n, "missing key name before '='"));
        }
        if !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        {
            return Err(error(
                n,
                format!(
                    "invalid key name {}: key names are letters, digits, '_', '-' and '.'",
                    show(key)
                ),
            ));
        }
        let lower = key.to_ascii_lowercase();
        match self.section {
            Section::None => Err(error(
                n,
                format!("{key} outside of a section: put it under [Interface] or [Peer]"),
            )),
            Section::Interface => self.interface_key(n, key, &lower, value),
            Section::Peer => self.peer_key(n, key, &lower, value),
        }
    }

    fn interface_key(
        &mut self,
        n: usize,
        key: &str,
        lower: &str,
        value: &str,
    ) -> Result<(), ParseError> {
        let Some((_, iface, seen)) = self.interface.as_mut() else {
            return Err(error(n, format!("{key} outside of [Interface]")));
        };
        let fail = |message: String| Err(error(n, message));
        match lower {
            "privatekey" => {
                seen.once("PrivateKey", n)?;
                // The value is a secret: never echo it.
                match value.parse::<PrivateKey>() {
                    Ok(k) => iface.private_key = Some(k),
                    Err(e) => return fail(format!("invalid PrivateKey: {}", redacted(&e))),
                }
            }
            "address" => {
                for item in list_items(n, "Address", value)? {
                    match parse_address(item) {
                        Some(net) => iface.addresses.push(net),
                        None => {
                            return fail(format!(
                                "invalid Address {}: expected an IP address with optional /prefix, such as 10.0.0.2/24 or fd00::2/64",
                                show(item)
                            ));
                        }
                    }
                }
            }
            "listenport" => {
                seen.once("ListenPort", n)?;
                match parse_digits::<u16>(value) {
                    Some(port) => iface.listen_port = Some(port),
                    None => {
                        return fail(format!(
                            "invalid ListenPort {}: expected a port number 0-65535",
                            show(value)
                        ));
                    }
                }
            }
            "dns" => {
                for item in list_items(n, "DNS", value)? {
                    check_dns(item).or_else(fail)?;
                    iface.dns.push(item.to_owned());
                }
            }
            "mtu" => {
                seen.once("MTU", n)?;
                match parse_digits::<u16>(value) {
                    Some(mtu) if mtu >= 68 => iface.mtu = Some(mtu),
                    _ => {
                        return fail(format!(
                            "invalid MTU {}: expected a number 68-65535",
                            show(value)
                        ));
                    }
                }
            }
            "fwmark" => {
                seen.once("FwMark", n)?;
                match parse_fwmark(value) {
                    Some(mark) => iface.fwmark = mark,
                    None => {
                        return fail(format!(
                            "invalid FwMark {}: expected off, a decimal number or 0x hex (32 bits)",
                            show(value)
                        ));
                    }
                }
            }
            "table" => {
                seen.once("Table", n)?;
                if value.is_empty() || !value.bytes().all(is_name_byte) {
                    return fail(format!(
                        "invalid Table {}: expected off, auto, a table number or name",
                        show(value)
                    ));
                }
                iface.table = Some(value.to_owned());
            }
            _ if PEER_KEYS.contains(&lower) => {
                return fail(format!(
                    "{key} is a [Peer] key; it is not allowed in [Interface]"
                ));
            }
            _ => iface.extra.push((key.to_owned(), value.to_owned())),
        }
        Ok(())
    }

    fn peer_key(
        &mut self,
        n: usize,
        key: &str,
        lower: &str,
        value: &str,
    ) -> Result<(), ParseError> {
        let Some(peer) = self.peer.as_mut() else {
            return Err(error(n, format!("{key} outside of [Peer]")));
        };
        let fail = |message: String| Err(error(n, message));
        match lower {
            "publickey" => {
                peer.seen.once("PublicKey", n)?;
                let key = match value.parse::<PublicKey>() {
                    Ok(k) => k,
                    Err(e) => return fail(format!("invalid PublicKey {}: {e}", show(value))),
                };
                if let Some(first) = self.peer_keys.get(&key) {
                    return fail(format!(
                        "peer {key} is already defined (PublicKey at line {first})"
                    ));
                }
                self.peer_keys.insert(key, n);
                peer.public_key = Some(key);
            }
            "presharedkey" => {
                peer.seen.once("PresharedKey", n)?;
                // A secret: never echo it.
                match value.parse::<Key>() {
                    Ok(k) => peer.preshared_key = Some(k),
                    Err(e) => return fail(format!("invalid PresharedKey: {}", redacted(&e))),
                }
            }
            "allowedips" => {
                for item in list_items(n, "AllowedIPs", value)? {
                    match Cidr::parse_masked(item) {
                        Ok(cidr) => peer.allowed_ips.push(cidr),
                        Err(_) => {
                            return fail(format!(
                                "invalid AllowedIPs entry {}: expected a CIDR such as 10.0.0.0/24 or fd00::/64",
                                show(item)
                            ));
                        }
                    }
                }
            }
            "endpoint" => {
                peer.seen.once("Endpoint", n)?;
                check_endpoint(value).or_else(fail)?;
                peer.endpoint = Some(value.to_owned());
            }
            "persistentkeepalive" => {
                peer.seen.once("PersistentKeepalive", n)?;
                if value.eq_ignore_ascii_case("off") {
                    peer.persistent_keepalive = None;
                } else {
                    match parse_digits::<u16>(value) {
                        Some(secs) => peer.persistent_keepalive = Some(secs),
                        None => {
                            return fail(format!(
                                "invalid PersistentKeepalive {}: expected off or seconds 0-65535",
                                show(value)
                            ));
                        }
                    }
                }
            }
            _ if INTERFACE_KEYS.contains(&lower) => {
                return fail(format!(
                    "{key} is an [Interface] key; it is not allowed in [Peer]"
                ));
            }
            _ => {
                return fail(format!(
                    "unknown key {key} in [Peer] (expected PublicKey, PresharedKey, AllowedIPs, Endpoint or PersistentKeepalive)"
                ));
            }
        }
        Ok(())
    }

    fn finish_peer(&mut self) -> Result<(), ParseError> {
        let Some(peer) = self.peer.take() else {
            return Ok(());
        };
        let Some(public_key) = peer.public_key else {
            return Err(error(peer.line, "[Peer] has no PublicKey"));
        };
        self.peers.push(Peer {
            public_key,
            preshared_key: peer.preshared_key,
            allowed_ips: peer.allowed_ips,
            endpoint: peer.endpoint,
            persistent_keepalive: peer.persistent_keepalive,
            comment: peer.name_tag.or(peer.above_comment),
        });
        Ok(())
    }

    fn finish(mut self) -> Result<WgQuickConfig, ParseError> {
        self.flush_comments();
        self.finish_peer()?;
        let Some((_, interface, _)) = self.interface else {
            return Err(error(0, "no [Interface] section"));
        };
        Ok(WgQuickConfig {
            interface,
            peers: self.peers,
        })
    }
}

/// Splits a comma-separated list; an empty value is an empty list, an empty entry an error.
fn list_items<'a>(n: usize, key: &str, value: &'a str) -> Result<Vec<&'a str>, ParseError> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    let items: Vec<&str> = value.split(',').map(str::trim).collect();
    if items.iter().any(|item| item.is_empty()) {
        return Err(error(
            n,
            format!("empty entry in {key} list {}", show(value)),
        ));
    }
    Ok(items)
}

fn parse_address(s: &str) -> Option<IpNet> {
    if s.contains('/') {
        s.parse::<IpNet>().ok()
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    }
}

/// `off` is `Some(None)`; a decimal or `0x` hex number is `Some(Some(mark))`.
fn parse_fwmark(s: &str) -> Option<Option<u32>> {
    if s.eq_ignore_ascii_case("off") {
        return Some(None);
    }
    let hex = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"));
    match hex {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u32::from_str_radix(hex, 16).ok().map(Some)
        }
        Some(_) => None,
        None => parse_digits::<u32>(s).map(Some),
    }
}

fn check_dns(s: &str) -> Result<(), String> {
    if s.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if s.contains(':') || looks_numeric(s) {
        return Err(format!("invalid DNS server {}: not an IP address", show(s)));
    }
    if is_host_name(s) {
        return Ok(());
    }
    Err(format!(
        "invalid DNS entry {}: expected a name server IP or a search domain",
        show(s)
    ))
}

#[cfg(test)]
#[path = "wgquick_tests.rs"]
mod tests;

/// What is wrong with a secret key, without any of its characters (the base64 decoder's
/// message names the offending symbol and offset).
fn redacted(e: &crate::KeyError) -> String {
    match e {
        crate::KeyError::Length(n) => {
            format!(
                "a key is {} characters of base64, got {n}",
                crate::key::KEY_BASE64_LEN
            )
        }
        crate::KeyError::Base64(_) => "not valid base64".to_owned(),
    }
}
