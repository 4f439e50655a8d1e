//! Forged service-account tokens for refusal tests: signed with the control plane's real
//! signing key, so the API server rejects them only for the reason under test (expiry).

use anyhow::{Context, Result};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::json;

use crate::ControlPlane;

/// A pod-bound token for `audience` that expired an hour ago.
pub fn expired_token(
    cp: &ControlPlane,
    namespace: &str,
    service_account: &str,
    service_account_uid: &str,
    pod: &k8s_openapi::api::core::v1::Pod,
    audience: &str,
) -> Result<String> {
    let who = (namespace, service_account, service_account_uid);
    signed_token(cp, who, pod, audience, -3600)
}

/// A pod-bound token for `audience` of the service account `(namespace, name, uid)`, signed
/// with the cluster's key, that expires `expires_in` seconds from now (the API server's
/// TokenRequest gives ten minutes at least).
pub fn signed_token(
    cp: &ControlPlane,
    (namespace, service_account, service_account_uid): (&str, &str, &str),
    pod: &k8s_openapi::api::core::v1::Pod,
    audience: &str,
    expires_in: i64,
) -> Result<String> {
    let pem = std::fs::read_to_string(cp.dir().join("sa.key"))?;
    let der = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>();
    let der = base64::engine::general_purpose::STANDARD.decode(der)?;
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng)
        .map_err(|e| anyhow::anyhow!("reading the signing key: {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let header = json!({"alg": "ES256", "typ": "JWT"});
    let claims = json!({
        "iss": cp.url(),
        "aud": [audience],
        "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
        "iat": now - 3600 + expires_in.min(0),
        "nbf": now - 3600 + expires_in.min(0),
        "exp": now + expires_in,
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": service_account_uid},
            "pod": {"name": pod.metadata.name, "uid": pod.metadata.uid},
        }
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims)?)
    );
    let signature = key
        .sign(&rng, signing_input.as_bytes())
        .ok()
        .context("signing")?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    ))
}
