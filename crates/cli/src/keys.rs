//! `genkey`, `pubkey`, `genpsk`: the same input and output as `wg`.

use std::io::Read;

use anyhow::{Context, Result};
use wgmesh_core::{Key, PrivateKey};

pub fn genkey() -> Result<()> {
    outln!("{}", PrivateKey::generate().expose_base64());
    Ok(())
}

pub fn pubkey(mut input: impl Read) -> Result<()> {
    let mut text = String::new();
    input
        .read_to_string(&mut text)
        .context("reading a private key from stdin")?;
    let key: PrivateKey = text.parse().context("invalid private key on stdin")?;
    outln!("{}", key.public_key());
    Ok(())
}

pub fn genpsk() -> Result<()> {
    outln!("{}", Key::generate());
    Ok(())
}
