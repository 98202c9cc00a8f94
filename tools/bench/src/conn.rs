//! New TCP connections per second and their first-packet latency: a connect/close loop in
//! the pod's namespace against a sink in the endpoint's namespace that only accepts.
//!
//! Each iteration opens a socket, connects (SYN, SYN-ACK, ACK: the time of `connect` is the
//! first-packet latency, the SYN being the packet that walks the node's NAT rules) and
//! closes with an RST (`SO_LINGER` 0). Closing with an RST keeps the client's ports out of
//! TIME_WAIT and lets the node's conntrack entries expire in 10 s rather than 120 s, so a
//! run of a few seconds neither runs out of ports nor fills the conntrack table.

use std::{
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, Socket, Type};

use crate::stats::percentile;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKLOG: i32 = 4096;
const TICK_MS: i32 = 50;
/// Runs with more failed connects than this fraction are broken measurements.
const MAX_ERROR_FRACTION: f64 = 0.001;

/// Accepts and closes connections on `addr` (an unspecified address: one family's) in a
/// namespace, on one thread of this process (a dedicated accept loop, so the server is not the
/// bottleneck). Stopped on drop.
pub struct Sink {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    pub fn start(netns: &Path, addr: SocketAddr) -> Result<Sink> {
        let listener = lab::in_netns(netns, || {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            if addr.is_ipv6() {
                // IPv6 only: the IPv4 sink holds 0.0.0.0 on the same port, and counts apart.
                s.set_only_v6(true)?;
            }
            s.set_reuse_address(true)?;
            s.bind(&addr.into()).with_context(|| format!("bind {addr}"))?;
            s.listen(BACKLOG)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .with_context(|| format!("starting the connection sink in {}", netns.display()))?;
        let (stop, accepted) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (stop2, accepted2) = (stop.clone(), accepted.clone());
        let thread = std::thread::Builder::new()
            .name("bench-sink".into())
            .spawn(move || accept_loop(&listener, &stop2, &accepted2))
            .context("spawning the sink thread")?;
        Ok(Sink { stop, accepted, thread: Some(thread) })
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &Socket, stop: &AtomicBool, accepted: &AtomicU64) {
    let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    while !stop.load(Ordering::Relaxed) {
        pfd.revents = 0;
        // SAFETY: one valid pollfd; the listener outlives the call.
        unsafe { libc::poll(&mut pfd, 1, TICK_MS) };
        // Drain the queue; a connection reset before accept() surfaces as an error here.
        loop {
            match listener.accept() {
                Ok(_) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {}
            }
        }
    }
}

/// One run of the connect/close loop.
#[derive(Clone, Debug)]
pub struct ConnRun {
    pub connections: u64,
    pub errors: u64,
    pub elapsed: Duration,
    /// `connect` times, sorted, in microseconds.
    pub connect_us: Vec<f64>,
}

impl ConnRun {
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64()
    }

    pub fn median_us(&self) -> f64 {
        percentile(&self.connect_us, 0.5)
    }

    pub fn p99_us(&self) -> f64 {
        percentile(&self.connect_us, 0.99)
    }
}

/// Connects to `to` from the namespace at `netns` and closes, in a loop, for `duration`.
/// The first connect must succeed (else the path is broken); afterwards failures are counted
/// and the run is an error when they exceed a thousandth.
pub fn connect_loop(netns: &Path, to: SocketAddr, duration: Duration) -> Result<ConnRun> {
    lab::in_netns(netns, || {
        connect_once(to).with_context(|| format!("the first connection to {to} failed: the path is broken"))?;
        let mut connect_us = Vec::with_capacity(65_536);
        let mut errors = 0u64;
        let mut first_error = None;
        let started = Instant::now();
        while started.elapsed() < duration {
            match connect_once(to) {
                Ok(took) => connect_us.push(took.as_secs_f64() * 1e6),
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        let elapsed = started.elapsed();
        let connections = connect_us.len() as u64;
        if connections == 0 || errors as f64 > MAX_ERROR_FRACTION * (connections + errors) as f64 {
            bail!(
                "{errors} of {} connections to {to} failed (first: {})",
                connections + errors,
                first_error.map_or("-".into(), |e| e.to_string())
            );
        }
        connect_us.sort_by(f64::total_cmp);
        Ok(ConnRun { connections, errors, elapsed, connect_us })
    })
}

/// One connection: socket, connect (timed), close with RST.
fn connect_once(to: SocketAddr) -> std::io::Result<Duration> {
    let s = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    s.set_linger(Some(Duration::ZERO))?;
    // connect() honours SO_SNDTIMEO.
    s.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    let started = Instant::now();
    s.connect(&to.into())?;
    Ok(started.elapsed())
}
