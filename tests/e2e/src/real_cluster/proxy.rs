//! A TCP forwarder from the underlay to the API server on loopback: the control plane listens
//! on 127.0.0.1 of the root namespace, which the nodes' namespaces cannot reach. It listens in
//! the underlay router's namespace, as an API server on the underlay would: whoever calls,
//! a node or a pod, is routed back. Plain threads,
//! so it keeps forwarding whatever the test's async runtime is doing.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Result;

use crate::netns::Netns;

/// Forwards connections to `listen` (port 0: any) to `target` until dropped.
pub struct TcpForwarder {
    addr: SocketAddr,
    /// The listening socket (a clone of the accept loop's): shutting it down wakes the loop
    /// wherever it listens, which a connection from here could not reach in another
    /// namespace.
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl TcpForwarder {
    /// Listens on `listen` inside `ns` (the underlay router's namespace: it routes back to
    /// every address that calls, pods included) and connects to `target` from this
    /// process's namespace (where the API server's loopback is).
    pub fn start(ns: &Netns, listen: SocketAddr, target: SocketAddr) -> Result<Self> {
        let listener = ns.run(move || Ok(TcpListener::bind(listen)?))?;
        let addr = listener.local_addr()?;
        let listener_handle = listener.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (stop2, open2) = (Arc::clone(&stop), Arc::clone(&open));
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                ) else {
                    continue;
                };
                if let Ok(mut list) = open2.lock() {
                    list.retain(|s| s.peer_addr().is_ok());
                    list.push(c3);
                    list.push(s3);
                }
                std::thread::spawn(move || pipe(client, s2));
                std::thread::spawn(move || pipe(server, c2));
            }
        });
        Ok(TcpForwarder {
            addr,
            listener: listener_handle,
            stop,
            open,
            accept: Some(accept),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop (its `accept` fails), which then sees the flag.
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.listener),
            nix::sys::socket::Shutdown::Both,
        );
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        if let Ok(list) = self.open.lock() {
            for s in list.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}
