//! `peer add`, `peer config` and `export node`, and what they share: the Secrets a peer's
//! keys are kept in, and reading keys and CIDRs from the user.

use std::path::Path;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use wgmesh_core::{Cidr, PrivateKey, wgquick};

use crate::exit::{self, err};

mod add;
mod export;

pub use add::{AddArgs, add};
pub use export::{ConfigArgs, config, export_node};

/// Key of the preshared key in its Secret.
const PSK_KEY: &str = "presharedKey";
/// Key of the private key in its Secret (`--store-private-key`).
const PRIVATE_KEY_KEY: &str = "privateKey";

fn psk_secret_name(peer: &str) -> String {
    format!("wgpeer-{peer}-psk")
}

fn private_key_secret_name(peer: &str) -> String {
    format!("wgpeer-{peer}-private-key")
}

async fn read_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<Option<Vec<u8>>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api
        .get_opt(name)
        .await
        .with_context(|| format!("reading Secret {namespace}/{name}"))?;
    Ok(secret
        .and_then(|s| s.data)
        .and_then(|mut d| d.remove(key))
        .map(|b| b.0))
}

fn read_private_key(path: &Path) -> Result<PrivateKey> {
    let text = crate::import::read(path)?;
    if let Ok(key) = text.trim().parse() {
        return Ok(key);
    }
    // Or the config `peer add` printed earlier: its [Interface] holds the key.
    match wgquick::parse(&text) {
        Ok(cfg) => cfg.interface.private_key.ok_or_else(|| {
            err(
                exit::INVALID_INPUT,
                format!("{}: the config has no PrivateKey", path.display()),
            )
        }),
        Err(e) => Err(err(
            exit::INVALID_INPUT,
            format!(
                "{}: neither a private key nor a wg-quick config ({e})",
                path.display()
            ),
        )),
    }
}

fn parse_cidrs(flag: &str, values: &[String]) -> Result<Vec<Cidr>> {
    values
        .iter()
        .map(|v| {
            Cidr::parse_strict(v.trim())
                .map_err(|e| err(exit::INVALID_INPUT, format!("{flag} {v}: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_key_from_a_key_file_or_a_config() {
        let dir = tempfile::tempdir().unwrap();
        let key = PrivateKey::generate();
        let plain = dir.path().join("key");
        std::fs::write(&plain, format!("{}\n", key.expose_base64())).unwrap();
        let conf = dir.path().join("wg0.conf");
        std::fs::write(
            &conf,
            format!("[Interface]\nPrivateKey = {}\n", key.expose_base64()),
        )
        .unwrap();
        for path in [&plain, &conf] {
            assert_eq!(
                read_private_key(path).unwrap().public_key(),
                key.public_key()
            );
        }
        std::fs::write(&plain, "[Interface]\nPrivateKey = nope\n").unwrap();
        let e = read_private_key(&plain).unwrap_err();
        assert_eq!(exit::code_of(&e), exit::INVALID_INPUT);
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
