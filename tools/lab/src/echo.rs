//! Echo servers: the lab's own on the endpoint (request, half-close, `echo:` + request), and
//! plain ones that send back every byte or datagram as it comes, for tests that run their own
//! servers (see [`tcp_echo_server`], [`udp_echo_server`]).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::clients::remaining;
use crate::{ENDPOINT_V4, ENDPOINT_V6, Lab, Ns, SERVICE_PORT, in_netns};

/// How long the echo servers wait for a request before giving up on a connection.
const SERVER_IO_LIMIT: Duration = Duration::from_secs(10);
/// Poll period of the echo servers' stop flag.
const SERVER_TICK: Duration = Duration::from_millis(50);
const MAX_PEERS_LOGGED: usize = 4096;

impl Lab {
    pub(crate) fn start_echo_servers(&mut self) -> Result<()> {
        let ep_path = self.netns_path(Ns::Ep);
        // Sockets belong to the namespace they were created in, whichever thread uses them
        // later: bind here (errors surface now), serve on plain threads.
        let (tcp4, tcp6, udp4, udp6) = in_netns(&ep_path, || {
            let v4 = SocketAddr::from((ENDPOINT_V4, SERVICE_PORT));
            let v6 = SocketAddr::from((ENDPOINT_V6, SERVICE_PORT));
            Ok((
                TcpListener::bind(v4).with_context(|| format!("bind TCP {v4}"))?,
                TcpListener::bind(v6).with_context(|| format!("bind TCP {v6}"))?,
                UdpSocket::bind(v4).with_context(|| format!("bind UDP {v4}"))?,
                UdpSocket::bind(v6).with_context(|| format!("bind UDP {v6}"))?,
            ))
        })
        .with_context(|| format!("netns {}: starting the echo servers", self.ep_ns))?;
        let prefix = self.thread_prefix();
        for (tag, listener) in [("t4", tcp4), ("t6", tcp6)] {
            let (stop, peers, conn_thread) = (self.stop.clone(), self.peers.clone(), format!("{prefix}c"));
            self.spawn_server(format!("{prefix}{tag}"), move || {
                serve_tcp(listener, &stop, &conn_thread, |peer| log_peer(&peers, peer), reply_after_half_close);
            })?;
        }
        for (tag, socket) in [("u4", udp4), ("u6", udp6)] {
            let (stop, peers) = (self.stop.clone(), self.peers.clone());
            self.spawn_server(format!("{prefix}{tag}"), move || {
                serve_udp(socket, &stop, b"echo:", |from| log_peer(&peers, from))
            })?;
        }
        Ok(())
    }

    fn spawn_server(&mut self, name: String, f: impl FnOnce() + Send + 'static) -> Result<()> {
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(f)
            .with_context(|| format!("spawning echo server thread {name}"))?;
        self.servers.push(handle);
        Ok(())
    }

    /// Prefix of the names of this lab's server threads.
    fn thread_prefix(&self) -> String {
        format!("nml{}-", self.id)
    }
}

fn log_peer(peers: &Mutex<Vec<SocketAddr>>, peer: SocketAddr) {
    if let Ok(mut p) = peers.lock() {
        if p.len() >= MAX_PEERS_LOGGED {
            p.drain(..MAX_PEERS_LOGGED / 2);
        }
        p.push(peer);
    }
}

/// A plain TCP echo server: until `stop` is set, serves every connection accepted on
/// `listener` with [`echo_stream`], each on its own thread. Returns once `stop` is set and the
/// connection threads have ended. Run it on a thread of its own; bind the listener in the
/// namespace it should serve (see [`in_netns`]).
pub fn tcp_echo_server(listener: TcpListener, stop: &Arc<AtomicBool>) {
    serve_tcp(listener, stop, "nml-echo", |_| {}, echo_stream);
}

/// Sends back everything read on `stream` as it comes, until the peer closes, an error (e.g. a
/// reset) or `stop`.
pub fn echo_stream(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    if stream.set_read_timeout(Some(SERVER_TICK)).is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => return,
        }
    }
}

/// A plain UDP echo server: until `stop` is set, answers every datagram with the same bytes.
pub fn udp_echo_server(socket: UdpSocket, stop: &AtomicBool) {
    serve_udp(socket, stop, b"", |_| {});
}

/// The accept loop of the TCP servers: each accepted connection goes to `on_accept`, then to
/// `serve` on a thread named `conn_thread`, until `stop`; joins those threads before returning.
fn serve_tcp(
    listener: TcpListener,
    stop: &Arc<AtomicBool>,
    conn_thread: &str,
    mut on_accept: impl FnMut(SocketAddr),
    serve: fn(TcpStream, &AtomicBool),
) {
    if let Err(e) = listener.set_nonblocking(true) {
        eprintln!("lab: echo server: set_nonblocking: {e}");
        return;
    }
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    while !stop.load(Ordering::SeqCst) {
        conns.retain(|h| !h.is_finished());
        pfd.revents = 0;
        // SAFETY: one valid pollfd, the listener outlives the call.
        unsafe { libc::poll(&mut pfd, 1, SERVER_TICK.as_millis() as libc::c_int) };
        loop {
            match listener.accept() {
                Ok((stream, peer)) => {
                    on_accept(peer);
                    let stop = stop.clone();
                    let spawned =
                        std::thread::Builder::new().name(conn_thread.to_owned()).spawn(move || serve(stream, &stop));
                    match spawned {
                        Ok(h) => conns.push(h),
                        Err(e) => eprintln!("lab: echo server: spawning a connection thread: {e}"),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("lab: echo server: accept: {e}");
                    std::thread::sleep(SERVER_TICK);
                    break;
                }
            }
        }
    }
    for h in conns {
        let _ = h.join();
    }
}

/// One connection to the lab's endpoint: read until the client half-closes (or
/// [`SERVER_IO_LIMIT`]), answer `echo:` + request, close. Gives up when the lab stops.
fn reply_after_half_close(mut stream: TcpStream, stop: &AtomicBool) {
    let deadline = Instant::now() + SERVER_IO_LIMIT;
    let mut reply = b"echo:".to_vec();
    let mut buf = [0u8; 16 * 1024];
    let _ = stream.set_nonblocking(false);
    loop {
        let Ok(left) = remaining(deadline) else {
            return;
        };
        if stop.load(Ordering::SeqCst) {
            return;
        }
        if stream.set_read_timeout(Some(left.min(SERVER_TICK))).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => return,
        }
    }
    let _ = stream.set_write_timeout(Some(SERVER_TICK * 20));
    let _ = stream.write_all(&reply);
    let _ = stream.shutdown(Shutdown::Both);
}

/// The loop of the UDP servers: answers every datagram with `prefix` + datagram, after
/// `on_datagram` has seen its source, until `stop`.
fn serve_udp(socket: UdpSocket, stop: &AtomicBool, prefix: &[u8], mut on_datagram: impl FnMut(SocketAddr)) {
    if let Err(e) = socket.set_read_timeout(Some(SERVER_TICK)) {
        eprintln!("lab: echo server: set_read_timeout: {e}");
        return;
    }
    let mut buf = vec![0u8; 65536];
    let mut reply = Vec::with_capacity(65536 + prefix.len());
    while !stop.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                on_datagram(from);
                reply.clear();
                reply.extend_from_slice(prefix);
                reply.extend_from_slice(&buf[..n]);
                if let Err(e) = socket.send_to(&reply, from) {
                    eprintln!("lab: echo server: reply to {from}: {e}");
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            // e.g. ECONNREFUSED left by an ICMP error for an earlier reply: keep serving.
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CLUSTER_V4;

    fn threads_named(prefix: &str) -> Vec<String> {
        let mut names = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").expect("read /proc/self/task").flatten() {
            if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
                let comm = comm.trim_end();
                if comm.starts_with(prefix) {
                    names.push(comm.to_owned());
                }
            }
        }
        names
    }

    #[test]
    fn server_threads_are_joined_on_drop() -> Result<()> {
        let _serial = crate::topology::tests::SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let lab = Lab::new()?;
        let prefix = lab.thread_prefix();
        // Leave a connection that never half-closes, to check it does not block the drop.
        let ep = lab.netns_path(Ns::Pod);
        let _idle = in_netns(&ep, || {
            Ok(TcpStream::connect_timeout(&SocketAddr::from((CLUSTER_V4, SERVICE_PORT)), Duration::from_secs(2))?)
        })?;
        let reply = lab.tcp_request(Ns::Pod, (CLUSTER_V4, SERVICE_PORT).into(), b"x", Duration::from_secs(2))?;
        assert_eq!(reply.data, b"echo:x");
        let running = threads_named(&prefix);
        assert!(running.len() >= 4, "server threads {running:?}");
        let started = Instant::now();
        drop(lab);
        assert!(started.elapsed() < Duration::from_secs(2), "drop took {:?}", started.elapsed());
        assert_eq!(threads_named(&prefix), Vec::<String>::new());
        Ok(())
    }
}
