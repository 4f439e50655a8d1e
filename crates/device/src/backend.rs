//! One device, whichever backend implements it: the kernel module when it is there, our
//! userspace device otherwise.

use std::fmt;
use std::str::FromStr;

use super::kernel::{
    ExistingLink, KernelDevice, KernelSupport, delete_link, existing_link,
    kernel_wireguard_available,
};
use super::userspace::UserspaceDevice;
use super::{DeviceChange, DeviceState, Error, InterfaceConfig};

/// Which backend the operator asked for: the choice (the agent's `--backend`, or the mesh's
/// `backend` as the agent converts it in `state::requested_backend`). What then runs is a
/// [`BackendKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Requested {
    /// The kernel module if it is available, else the userspace device.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

impl FromStr for Requested {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Requested::Auto),
            "kernel" => Ok(Requested::Kernel),
            "userspace" => Ok(Requested::Userspace),
            _ => Err(format!(
                "{s:?} is not a device backend (auto, kernel or userspace)"
            )),
        }
    }
}

impl fmt::Display for Requested {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Requested::Auto => "auto",
            Requested::Kernel => "kernel",
            Requested::Userspace => "userspace",
        })
    }
}

/// The backend in use, as [`Device::backend`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Kernel,
    Userspace,
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Kernel => "kernel",
            BackendKind::Userspace => "userspace",
        })
    }
}

pub enum Device {
    // Boxed: the kernel device holds what it knows of its peers inline.
    Kernel(Box<KernelDevice>),
    Userspace(UserspaceDevice),
}

/// The userspace device, its TUN marked as wgmesh's so that while it runs it is told from
/// another program's (`kernel::tun_may_be_taken`). Unmarked, it is still ours once our
/// process lets go of it, so a refusal to mark is only logged.
async fn userspace(config: InterfaceConfig) -> Result<Device, Error> {
    let device = UserspaceDevice::create(config)?;
    if let Err(e) = crate::kernel::mark_tun(device.name()).await {
        tracing::warn!(interface = %device.name(), error = %e, "could not mark the TUN as wgmesh's");
    }
    Ok(Device::Userspace(device))
}

impl Device {
    /// Opens the device with the requested backend, in the calling thread's network
    /// namespace. `Auto` probes the kernel and falls back to the userspace device, saying why
    /// in one log line; `Kernel` fails with [`Error::KernelUnavailable`] when the kernel
    /// has no WireGuard.
    ///
    /// An interface of the name that is the other backend's device (the mesh's `backend`
    /// changed, or `auto` found the kernel module loaded since) is replaced when a backend
    /// is asked for by name, the guard routes dropping the mesh's traffic meanwhile; `auto`
    /// keeps whichever device is there, so a restart changes nothing.
    pub async fn open(requested: Requested, config: InterfaceConfig) -> Result<Device, Error> {
        let existing = existing_link(&config.name).await.unwrap_or(None);
        let name = config.name.clone();
        let replace = |kind: ExistingLink| {
            let name = name.clone();
            async move {
                tracing::warn!(interface = %name, "replacing the other backend's device ({kind:?}) of this name; the guard routes drop the mesh's traffic meanwhile");
                delete_link(&name).await
            }
        };
        if existing == Some(ExistingLink::ForeignTun) {
            return Err(crate::kernel::foreign_tun(&name));
        }
        match requested {
            Requested::Userspace => {
                if existing == Some(ExistingLink::Wireguard) {
                    // Only ours, never another tool's tunnel: opened (which checks whose it
                    // is), then deleted.
                    let ours = KernelDevice::create(config.clone()).await?;
                    tracing::warn!(interface = %name, "replacing the other backend's device (Wireguard) of this name; the guard routes drop the mesh's traffic meanwhile");
                    ours.delete().await?;
                }
                userspace(config).await
            }
            Requested::Kernel => match kernel_wireguard_available().await? {
                KernelSupport::Available => {
                    if existing == Some(ExistingLink::Tun) {
                        replace(ExistingLink::Tun).await?;
                    }
                    Ok(Device::Kernel(Box::new(
                        KernelDevice::create(config).await?,
                    )))
                }
                KernelSupport::Unavailable(reason) => Err(Error::KernelUnavailable(reason)),
            },
            Requested::Auto if existing == Some(ExistingLink::Tun) => {
                tracing::info!(interface = %config.name, "the userspace device of a previous run is there; keeping it");
                userspace(config).await
            }
            Requested::Auto => {
                let reason = match kernel_wireguard_available().await {
                    Ok(KernelSupport::Available) => {
                        return Ok(Device::Kernel(Box::new(
                            KernelDevice::create(config).await?,
                        )));
                    }
                    Ok(KernelSupport::Unavailable(reason)) => reason,
                    Err(e) => e.to_string(),
                };
                tracing::info!(
                    interface = %config.name,
                    "kernel WireGuard unavailable ({reason}); using the userspace device"
                );
                // Created right here (not on a blocking-pool thread) so that its TUN and
                // sockets live in the calling thread's network namespace; it is quick.
                userspace(config).await
            }
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Device::Kernel(d) => d.name(),
            Device::Userspace(d) => d.name(),
        }
    }

    pub fn backend(&self) -> BackendKind {
        match self {
            Device::Kernel(_) => BackendKind::Kernel,
            Device::Userspace(_) => BackendKind::Userspace,
        }
    }

    pub async fn observe(&self) -> Result<DeviceState, Error> {
        match self {
            Device::Kernel(d) => d.observe().await,
            Device::Userspace(d) => Ok(d.observe()),
        }
    }

    pub async fn apply(&self, changes: &[DeviceChange]) -> Result<(), Error> {
        match self {
            Device::Kernel(d) => d.apply(changes).await,
            Device::Userspace(d) => d.apply(changes),
        }
    }

    /// After taking over from a previous run of the agent: the userspace device starts a
    /// handshake with every peer (their sessions were with the previous process); a kernel
    /// device kept its sessions.
    pub fn renew_sessions(&self) {
        match self {
            Device::Kernel(_) => {}
            Device::Userspace(d) => d.initiate_handshakes(),
        }
    }

    /// Whether the interface outlives the process. A kernel link always does. With `keep`,
    /// the userspace device's TUN becomes persistent, so its addresses and routes stay (and
    /// drop traffic) while no process serves it, and the next one attaches to it; without,
    /// it goes with the process.
    pub fn keep_after_exit(&self, keep: bool) -> Result<(), Error> {
        match self {
            Device::Kernel(_) => Ok(()),
            Device::Userspace(d) => d.set_persistent(keep),
        }
    }

    /// Stops the agent's hold on the device: a kernel link stays (and keeps forwarding), the
    /// userspace device stops; its interface disappears unless it was made persistent.
    pub fn shutdown(self) {
        match self {
            Device::Kernel(d) => drop(d),
            Device::Userspace(d) => d.shutdown(),
        }
    }

    /// Removes the device: deletes the kernel link, or stops the userspace device and
    /// removes its interface (persistent or not).
    pub async fn delete(self) -> Result<(), Error> {
        match self {
            Device::Kernel(d) => (*d).delete().await,
            Device::Userspace(d) => d.delete(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent spawns these on a multi-threaded runtime: they must be `Send`.
    #[allow(dead_code)]
    fn futures_are_send(device: &Device, config: InterfaceConfig) {
        fn is_send<T: Send>(_: T) {}
        is_send(Device::open(Requested::Auto, config));
        is_send(device.observe());
        is_send(device.apply(&[]));
        is_send(kernel_wireguard_available());
    }

    #[test]
    fn requested_parses() {
        for (s, want) in [
            ("auto", Requested::Auto),
            ("Kernel", Requested::Kernel),
            ("userspace", Requested::Userspace),
        ] {
            assert_eq!(s.parse::<Requested>(), Ok(want));
            assert_eq!(want.to_string(), s.to_ascii_lowercase());
        }
        assert!("wireguard-go".parse::<Requested>().is_err());
    }
}
