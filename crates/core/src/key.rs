//! WireGuard keys: 32 bytes, written as 44 characters of standard base64 ending in `=`.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

pub const KEY_LEN: usize = 32;
/// Length of a key in base64: 32 bytes -> 43 characters of data plus one `=` of padding.
pub const KEY_BASE64_LEN: usize = 44;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a WireGuard key is {KEY_BASE64_LEN} characters of base64, got {0}")]
    Length(usize),
    #[error("a WireGuard key must be valid base64: {0}")]
    Base64(String),
}

/// Raw key bytes, shared by public keys and preshared keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key([u8; KEY_LEN]);

impl Key {
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Key(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    /// A random key from the OS source, as used for preshared keys (`wg genpsk`).
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        Key(bytes)
    }
}

impl FromStr for Key {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != KEY_BASE64_LEN {
            return Err(KeyError::Length(s.len()));
        }
        // The STANDARD engine rejects non-canonical trailing bits, so every key has exactly
        // one spelling and two spellings never compare unequal for the same bytes.
        let bytes = STANDARD
            .decode(s)
            .map_err(|e| KeyError::Base64(e.to_string()))?;
        let bytes: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|v: Vec<u8>| KeyError::Length(v.len()))?;
        Ok(Key(bytes))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// Redacted: a bare `Key` is usually a preshared key or a mesh secret, and a `?value` in a
/// log line must not leak it. `Display` and [`Key::to_base64`] still write it on purpose;
/// [`PublicKey`]'s `Debug` shows the public key.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// A peer's public key. Safe to log and to put in the API.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(Key);

impl PublicKey {
    pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        PublicKey(Key(bytes))
    }
    pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
        self.0.as_bytes()
    }
    pub fn to_base64(&self) -> String {
        self.0.to_base64()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(PublicKey)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.0)
    }
}

/// A private key. It never prints itself: `Debug` and `Display` are redacted so that a stray
/// `?key` in a log line cannot leak it; use [`PrivateKey::expose_base64`] to write it on purpose.
#[derive(Clone)]
pub struct PrivateKey(x25519_dalek::StaticSecret);

impl PrivateKey {
    /// A new key from the OS random source (`wg genkey`).
    pub fn generate() -> Self {
        PrivateKey(x25519_dalek::StaticSecret::random_from_rng(
            rand_core::OsRng,
        ))
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        PrivateKey(x25519_dalek::StaticSecret::from(bytes))
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_bytes(*x25519_dalek::PublicKey::from(&self.0).as_bytes())
    }

    /// The clamped secret bytes, for handing to the data plane on this node.
    pub fn to_bytes(&self) -> [u8; KEY_LEN] {
        self.0.to_bytes()
    }

    /// The key in base64, for writing to the node-local key file or a user's wg-quick config.
    pub fn expose_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }
}

impl FromStr for PrivateKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key: Key = s.parse()?;
        Ok(PrivateKey::from_bytes(*key.as_bytes()))
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases: &[(&str, Result<(), KeyError>)] = &[
            ("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", Ok(())),
            ("  yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n", Ok(())),
            (
                "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk",
                Err(KeyError::Length(43)),
            ),
            (
                "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk==",
                Err(KeyError::Length(45)),
            ),
            ("", Err(KeyError::Length(0))),
        ];
        for (input, want) in cases {
            let got = input.parse::<Key>().map(|_| ());
            assert_eq!(&got, want, "input {input:?}");
        }
        // Right length, bad alphabet or non-canonical padding bits.
        for bad in [
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBm!=",
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBml=",
            "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk-",
        ] {
            assert!(
                matches!(bad.parse::<Key>(), Err(KeyError::Base64(_))),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn base64_round_trip() {
        let key = Key::generate();
        assert_eq!(key.to_base64().parse::<Key>().unwrap(), key);
        assert_eq!(key.to_base64().len(), KEY_BASE64_LEN);
        assert!(key.to_base64().ends_with('='));
    }

    #[test]
    fn public_key_matches_wg_pubkey() {
        // Vector from `wg genkey | tee priv | wg pubkey` (wireguard-tools).
        let private: PrivateKey = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
            .parse()
            .unwrap();
        assert_eq!(
            private.public_key().to_base64(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn private_key_is_redacted() {
        let private = PrivateKey::generate();
        let debug = format!("{private:?}");
        assert!(!debug.contains(&private.expose_base64()));
        assert_eq!(debug, "PrivateKey(<redacted>)");
    }
}
