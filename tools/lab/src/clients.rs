//! Clients of the echo servers: one TCP or UDP request from a namespace.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{Lab, Ns, in_netns};

/// Reply to [`Lab::tcp_request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpReply {
    /// Everything the server sent until it closed the connection (`b"echo:" + payload`).
    pub data: Vec<u8>,
    /// The connected socket's peer address (`getpeername`), as the client sees it.
    pub peer: SocketAddr,
}

/// Reply to [`Lab::udp_request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpReply {
    /// The reply datagram (`b"echo:" + payload`).
    pub data: Vec<u8>,
    /// Source address of the reply datagram (`recvfrom`), as the client sees it.
    pub from: SocketAddr,
}

impl Lab {
    /// TCP request from namespace `ns`: connects to `to`, sends `payload`, half-closes, and
    /// reads until the server closes. `timeout` bounds the whole exchange. Errors keep the
    /// [`std::io::Error`] as root cause (e.g. `ErrorKind::ConnectionRefused`, `TimedOut`).
    pub fn tcp_request(&self, ns: Ns, to: SocketAddr, payload: &[u8], timeout: Duration) -> Result<TcpReply> {
        let name = self.ns_name(ns);
        tcp_request_in(self.netns_path(ns), to, payload, timeout).with_context(|| format!("netns {name}"))
    }

    /// UDP request from namespace `ns`: sends one datagram to `to` and waits up to `timeout`
    /// for one reply. `connected` = `connect` + `send` + `recv` (the kernel then only accepts a
    /// reply whose source is exactly `to`, and reports ICMP errors as e.g.
    /// `ConnectionRefused`); otherwise `sendto` + `recvfrom` on an unconnected socket (any
    /// source accepted, reported in [`UdpReply::from`]).
    pub fn udp_request(
        &self,
        ns: Ns,
        to: SocketAddr,
        payload: &[u8],
        timeout: Duration,
        connected: bool,
    ) -> Result<UdpReply> {
        let name = self.ns_name(ns);
        udp_request_in(self.netns_path(ns), to, payload, timeout, connected).with_context(|| format!("netns {name}"))
    }
}

/// [`Lab::tcp_request`] from the network namespace at `netns`, for callers without a [`Lab`]
/// (for example a child process placed in a test cgroup).
pub fn tcp_request_in(netns: impl AsRef<Path>, to: SocketAddr, payload: &[u8], timeout: Duration) -> Result<TcpReply> {
    in_netns(netns, || {
        let deadline = Instant::now() + timeout;
        let mut stream = TcpStream::connect_timeout(&to, timeout).context("connect")?;
        // Before the exchange: once both sides have closed, getpeername fails.
        let peer = stream.peer_addr().context("getpeername")?;
        stream.set_write_timeout(Some(remaining(deadline)?))?;
        stream.write_all(payload).context("send")?;
        stream.shutdown(Shutdown::Write).context("shutdown(SHUT_WR)")?;
        let mut data = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            stream.set_read_timeout(Some(remaining(deadline)?))?;
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => data.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(timed_out(e)).context("receive"),
            }
        }
        Ok(TcpReply { data, peer })
    })
    .with_context(|| format!("TCP request to {to}"))
}

/// [`Lab::udp_request`] from the network namespace at `netns`, for callers without a [`Lab`].
pub fn udp_request_in(
    netns: impl AsRef<Path>,
    to: SocketAddr,
    payload: &[u8],
    timeout: Duration,
    connected: bool,
) -> Result<UdpReply> {
    in_netns(netns, || {
        let any: SocketAddr = match to.ip() {
            IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(any).context("bind")?;
        if connected {
            socket.connect(to).context("connect")?;
            socket.send(payload).context("send")?;
        } else {
            socket.send_to(payload, to).context("sendto")?;
        }
        socket.set_read_timeout(Some(non_zero(timeout)))?;
        let mut buf = vec![0u8; 65536];
        let (n, from) = socket.recv_from(&mut buf).map_err(timed_out).context("receive")?;
        buf.truncate(n);
        Ok(UdpReply { data: buf, from })
    })
    .with_context(|| {
        let mode = if connected { "connected" } else { "unconnected" };
        format!("UDP request ({mode}) to {to}")
    })
}

pub(crate) fn remaining(deadline: Instant) -> io::Result<Duration> {
    match deadline.checked_duration_since(Instant::now()) {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(io::Error::new(ErrorKind::TimedOut, "timed out")),
    }
}

/// Socket timeouts must not be zero.
fn non_zero(d: Duration) -> Duration {
    d.max(Duration::from_millis(1))
}

/// A receive timeout shows up as `WouldBlock` (EAGAIN) on Linux; call it `TimedOut`.
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == ErrorKind::WouldBlock {
        io::Error::new(ErrorKind::TimedOut, "timed out waiting for a reply")
    } else {
        e
    }
}
