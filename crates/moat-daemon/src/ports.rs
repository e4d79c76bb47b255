//! Published ports: a listener on the host's loopback whose connections are
//! carried into the sandbox through a door, a socket made in the sandbox's
//! network namespace and connected there to the sandbox's port.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moat_api::PortMapping;
use moat_sandbox::control::{self, NetnsId};
use nix::sys::socket::{connect, SockaddrIn};

use crate::DaemonError;

pub struct Forwarder {
    pub mapping: PortMapping,
    stop: Arc<AtomicBool>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Forwarder {
    pub fn start(
        mapping: PortMapping,
        control_path: PathBuf,
        netns: NetnsId,
    ) -> Result<Forwarder, DaemonError> {
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, mapping.host_port);
        let listener = TcpListener::bind(addr).map_err(|e| {
            DaemonError::BadRequest(format!(
                "cannot listen on 127.0.0.1:{}: {e}; pick another host port",
                mapping.host_port
            ))
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| DaemonError::io("listener", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        std::thread::spawn(move || accept_loop(listener, flag, mapping, control_path, netns));
        Ok(Forwarder { mapping, stop })
    }
}

fn accept_loop(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    mapping: PortMapping,
    control_path: PathBuf,
    netns: NetnsId,
) {
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(200u16));
        match listener.accept() {
            Ok((client, _)) => {
                let control_path = control_path.clone();
                std::thread::spawn(move || {
                    if let Err(e) = carry(client, &control_path, netns, mapping.sandbox_port) {
                        tracing::debug!("published port {}: {e}", mapping.host_port);
                    }
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn carry(
    client: TcpStream,
    control_path: &std::path::Path,
    netns: NetnsId,
    port: u16,
) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let door: OwnedFd =
        control::door_socket(control_path, netns, false).map_err(io::Error::other)?;
    let target = SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    connect(std::os::fd::AsRawFd::as_raw_fd(&door), &target).map_err(io::Error::from)?;
    let inside = TcpStream::from(door);
    let (mut c_read, mut i_write) = (client.try_clone()?, inside.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut c_read, &mut i_write);
        let _ = i_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut i_read, mut c_write) = (inside, client);
    let _ = io::copy(&mut i_read, &mut c_write);
    let _ = c_write.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
    Ok(())
}
