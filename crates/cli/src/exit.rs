//! Exit codes scripts can rely on (listed in `--help`), carried through `anyhow` errors.

use std::fmt;

pub const OTHER: u8 = 1;
pub const CLUSTER: u8 = 3;
pub const NOT_FOUND: u8 = 4;
pub const INVALID_INPUT: u8 = 5;
pub const NOT_READY: u8 = 6;
pub const TIMEOUT: u8 = 7;

/// An error that decides the exit code.
#[derive(Debug)]
pub struct Coded {
    pub code: u8,
    pub message: String,
}

impl fmt::Display for Coded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Coded {}

pub fn err(code: u8, message: impl Into<String>) -> anyhow::Error {
    Coded {
        code,
        message: message.into(),
    }
    .into()
}

/// The exit code of an error: the first coded error in its chain, else what a Kubernetes
/// error means, else 1.
pub fn code_of(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<Coded>() {
            return c.code;
        }
        if let Some(k) = cause.downcast_ref::<kube::Error>() {
            return kube_code(k);
        }
        if cause
            .downcast_ref::<kube::config::KubeconfigError>()
            .is_some()
            || cause
                .downcast_ref::<kube::config::InferConfigError>()
                .is_some()
        {
            return CLUSTER;
        }
    }
    OTHER
}

fn kube_code(e: &kube::Error) -> u8 {
    match e {
        kube::Error::Api(s) if s.code == 404 || s.code == 409 => NOT_FOUND,
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => INVALID_INPUT,
        kube::Error::Api(s) if s.code == 401 || s.code == 403 => CLUSTER,
        kube::Error::Api(_) => OTHER,
        _ => CLUSTER,
    }
}
