//! An exact reproduction of kubernetes#74839: a pod's connection to a server outside, masqueraded
//! by the node, killed by the node's RST after the server side sends a segment conntrack marks
//! INVALID (far beyond the receive window).
//!
//! ```text
//! pod 192.0.2.10 ──► node (masquerade to 192.0.2.129) ──► "outside" server 192.0.2.130:9000 (ep ns)
//!                      ▲                                    │ injects seq = snd_nxt + 2^30
//!                      └── INVALID: not de-NATed, delivered to the node's own stack → RST ──┘
//! ```
//! The server side learns the live sequence numbers from an AF_PACKET capture of the flow and
//! injects with a raw socket; the same capture counts the RSTs the node sends.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::run::run_with_stdin;
use crate::{ENDPOINT_V4, ENDPOINT_V6, Lab, NODE_UPLINK_IF, NODE_UPLINK_V4, NODE_UPLINK_V6, Ns, in_netns};

/// The outside server's port (in the endpoint namespace, which plays "the internet" here).
pub const OUTSIDE_PORT: u16 = 9000;
/// The test's own table in the node namespace: masquerade of pod → outside, and a counter of
/// what conntrack marks INVALID on input (priority after conntrack, before any drop).
pub const TABLE: &str = "nml_reset";

const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
const TCP_RST: u8 = 0x04;

fn ruleset() -> String {
    format!(
        "table inet {TABLE} {{
    counter invalid_in {{ }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname \"{NODE_UPLINK_IF}\" ip saddr 192.0.2.0/25 tcp dport {OUTSIDE_PORT} masquerade
        oifname \"{NODE_UPLINK_IF}\" ip6 saddr 2001:db8:1::/64 tcp dport {OUTSIDE_PORT} masquerade
    }}
    chain input {{
        type filter hook input priority -190; policy accept;
        ct state invalid counter name \"invalid_in\"
    }}
}}
"
    )
}

/// A TCP segment as seen on the endpoint's eth0.
#[derive(Clone, Debug)]
pub struct Segment {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload_len: u32,
}

/// One pod → outside connection under observation.
pub struct ResetScenario {
    v6: bool,
    ep_netns: std::path::PathBuf,
    client: TcpStream,
    /// The masqueraded address the server sees (node uplink : port).
    masqueraded: SocketAddr,
    server: SocketAddr,
    segments: Arc<Mutex<Vec<Segment>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl ResetScenario {
    /// Installs the masquerade (once per lab), starts the capture and the echo server, connects
    /// from the pod and exchanges one message.
    pub fn start(lab: &Lab, v6: bool) -> Result<ResetScenario> {
        Self::start_via(lab, v6, None)
    }

    /// Like [`ResetScenario::start`], but the pod connects to `via` (a Service's cluster
    /// IP:[`OUTSIDE_PORT`], which the real kube-proxy DNATs to the server): the INVALID segment
    /// then also misses kube-proxy's reverse DNAT.
    pub fn start_via(lab: &Lab, v6: bool, via: Option<SocketAddr>) -> Result<ResetScenario> {
        let node = lab.ns_name(Ns::Node).to_owned();
        let listed = lab.command(Ns::Node, "nft").args(["list", "table", "inet", TABLE]).output()?;
        if !listed.status.success() {
            run_with_stdin(lab.command(Ns::Node, "nft").args(["-f", "-"]), &node, &ruleset())?;
        }
        let server = if v6 {
            SocketAddr::from((ENDPOINT_V6, OUTSIDE_PORT))
        } else {
            SocketAddr::from((ENDPOINT_V4, OUTSIDE_PORT))
        };
        let ep_netns = lab.netns_path(Ns::Ep);
        let stop = Arc::new(AtomicBool::new(false));
        let segments = Arc::new(Mutex::new(Vec::new()));
        let (listener, capture) = in_netns(&ep_netns, || {
            let listener = TcpListener::bind(server).with_context(|| format!("bind {server}"))?;
            Ok((listener, packet_socket()?))
        })?;
        let mut threads = Vec::new();
        let (stop2, segs2) = (stop.clone(), segments.clone());
        threads.push(std::thread::spawn(move || capture_loop(&capture, &stop2, &segs2)));
        let stop2 = stop.clone();
        threads.push(std::thread::spawn(move || crate::echo::tcp_echo_server(listener, &stop2)));

        let to = via.unwrap_or(server);
        let client = in_netns(lab.netns_path(Ns::Pod), || {
            TcpStream::connect_timeout(&to, Duration::from_secs(3)).with_context(|| format!("connect {to}"))
        })?;
        client.set_read_timeout(Some(Duration::from_secs(2)))?;
        client.set_nodelay(true)?;
        let port = client.local_addr()?.port();
        let node_addr: IpAddr = if v6 { NODE_UPLINK_V6.into() } else { NODE_UPLINK_V4.into() };
        let mut scenario = ResetScenario {
            v6,
            ep_netns,
            client,
            masqueraded: SocketAddr::new(node_addr, port),
            server,
            segments,
            stop,
            threads,
        };
        if !scenario.exchange(b"hello") {
            bail!("the pod's connection to {server} does not carry data before any injection");
        }
        // Masquerade keeps the pod's source port when it is free; make sure we saw the flow.
        scenario.wait_for_client_segment()?;
        Ok(scenario)
    }

    /// Sends `payload` from the pod and expects the echo: is the connection alive?
    pub fn exchange(&mut self, payload: &[u8]) -> bool {
        if self.client.write_all(payload).is_err() {
            return false;
        }
        let mut buf = vec![0u8; payload.len()];
        self.client.read_exact(&mut buf).is_ok() && buf == payload
    }

    fn wait_for_client_segment(&mut self) -> Result<Segment> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let last = self.segments.lock().unwrap().iter().rev().find(|s| s.dst == self.server).cloned();
            if let Some(s) = last {
                self.masqueraded = s.src;
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("no segment of the pod's flow captured at {}", self.server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Injects `count` segments from the server side that conntrack judges out of window:
    /// sequence 2^30 beyond what the server has sent, acknowledging exactly what it received
    /// (so the node's RST in answer would carry an acceptable sequence number).
    pub fn inject_out_of_window(&mut self, count: u32) -> Result<()> {
        std::thread::sleep(Duration::from_millis(100)); // let the last ACK land in the capture
        let last = self.wait_for_client_segment()?;
        let (snd_nxt, rcv_nxt) = (last.ack, last.seq.wrapping_add(last.payload_len));
        let (src, dst) = (self.server, self.masqueraded);
        in_netns(&self.ep_netns, || {
            for i in 0..count {
                let segment = tcp_segment(
                    src,
                    dst,
                    snd_nxt.wrapping_add(1 << 30).wrapping_add(i * 64),
                    rcv_nxt,
                    b"out-of-window",
                );
                send_raw(src, dst, &segment)?;
            }
            Ok(())
        })
    }

    /// RSTs the node sent to the server on this flow so far.
    pub fn node_resets(&self) -> usize {
        let segments = self.segments.lock().unwrap();
        segments.iter().filter(|s| s.src == self.masqueraded && s.dst == self.server && s.flags & TCP_RST != 0).count()
    }

    pub fn is_v6(&self) -> bool {
        self.v6
    }
}

impl Drop for ResetScenario {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.shutdown(std::net::Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The table's INVALID counter (packets) in the lab's node namespace.
pub fn invalid_counter(lab: &Lab) -> Result<u64> {
    let out = lab.command(Ns::Node, "nft").args(["-j", "list", "counter", "inet", TABLE, "invalid_in"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let at = text.find("\"packets\":").context("nft counter output without packets")?;
    let digits: String = text[at + 10..].trim_start().chars().take_while(char::is_ascii_digit).collect();
    Ok(digits.parse()?)
}

fn packet_socket() -> Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto)) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new("eth0")?;
    // SAFETY: NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: zeroed sockaddr_ll filled below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: bind with a valid sockaddr_ll of the right size.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const sll).cast(), size_of::<libc::sockaddr_ll>() as u32) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("bind AF_PACKET to eth0");
    }
    let tv = libc::timeval { tv_sec: 0, tv_usec: 50_000 };
    // SAFETY: setsockopt with a timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    Ok(fd)
}

fn capture_loop(fd: &OwnedFd, stop: &AtomicBool, segments: &Mutex<Vec<Segment>>) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: recv into a buffer we own.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        if let Some(s) = parse_tcp(&buf[..n as usize]) {
            segments.lock().unwrap().push(s);
        }
    }
}

/// Parses an IPv4 or IPv6 (no extension headers) packet carrying TCP.
pub fn parse_tcp(p: &[u8]) -> Option<Segment> {
    let (src, dst, l4) = match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if *p.get(9)? != 6 {
                return None;
            }
            let a: [u8; 4] = p.get(12..16)?.try_into().ok()?;
            let b: [u8; 4] = p.get(16..20)?.try_into().ok()?;
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            (IpAddr::from(a), IpAddr::from(b), p.get(ihl..total.min(p.len()))?)
        }
        6 => {
            if *p.get(6)? != 6 {
                return None;
            }
            let a: [u8; 16] = p.get(8..24)?.try_into().ok()?;
            let b: [u8; 16] = p.get(24..40)?.try_into().ok()?;
            let len = usize::from(u16::from_be_bytes([p[4], p[5]]));
            (IpAddr::from(a), IpAddr::from(b), p.get(40..(40 + len).min(p.len()))?)
        }
        _ => return None,
    };
    let be16 = |at: usize| Some(u16::from_be_bytes(l4.get(at..at + 2)?.try_into().ok()?));
    let be32 = |at: usize| Some(u32::from_be_bytes(l4.get(at..at + 4)?.try_into().ok()?));
    let data_off = usize::from(l4.get(12)? >> 4) * 4;
    Some(Segment {
        src: SocketAddr::new(src, be16(0)?),
        dst: SocketAddr::new(dst, be16(2)?),
        seq: be32(4)?,
        ack: be32(8)?,
        flags: *l4.get(13)?,
        payload_len: l4.len().saturating_sub(data_off) as u32,
    })
}

fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for chunk in chunks {
        for pair in chunk.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP ACK+PSH segment with payload and a correct checksum over the pseudo-header.
pub fn tcp_segment(src: SocketAddr, dst: SocketAddr, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20 + payload.len());
    seg.extend_from_slice(&src.port().to_be_bytes());
    seg.extend_from_slice(&dst.port().to_be_bytes());
    seg.extend_from_slice(&seq.to_be_bytes());
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.extend_from_slice(&[5 << 4, TCP_ACK | TCP_PSH]);
    seg.extend_from_slice(&65535u16.to_be_bytes()); // window
    seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    seg.extend_from_slice(payload);
    let len = seg.len() as u32;
    let sum = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let pseudo = [&s.octets()[..], &d.octets()[..], &[0, 6], &(len as u16).to_be_bytes()].concat();
            checksum(&[&pseudo, &seg])
        }
        (s, d) => {
            let (IpAddr::V6(s), IpAddr::V6(d)) = (s, d) else { unreachable!("mixed families") };
            let pseudo = [&s.octets()[..], &d.octets()[..], &len.to_be_bytes(), &[0, 0, 0, 6]].concat();
            checksum(&[&pseudo, &seg])
        }
    };
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    seg
}

/// Sends a TCP segment from `src` with a raw socket; the kernel adds the IP header.
fn send_raw(src: SocketAddr, dst: SocketAddr, segment: &[u8]) -> Result<()> {
    let socket = socket2::Socket::new(
        if src.is_ipv6() { socket2::Domain::IPV6 } else { socket2::Domain::IPV4 },
        socket2::Type::RAW,
        Some(socket2::Protocol::TCP),
    )
    .context("raw socket")?;
    socket.bind(&SocketAddr::new(src.ip(), 0).into()).with_context(|| format!("bind raw socket to {}", src.ip()))?;
    // Raw IPv6 sockets take the port field as the protocol: zero it.
    socket.send_to(segment, &SocketAddr::new(dst.ip(), 0).into()).with_context(|| format!("send to {dst}"))?;
    Ok(())
}
