//! A Kubernetes node built from network namespaces, for tests, the demo and benchmarks.
//!
//! [`Lab::new`] builds three namespaces with `ip` (iproute2) and `nft` (nftables):
//!
//! ```text
//!  pod ns                     node ns                                     ep ns
//!  eth0 192.0.2.10/32  <-->  veth<id> 192.0.2.1/32                        (the Service endpoint)
//!       2001:db8:1::10/128           2001:db8:1::1/128
//!                            kube-ipvs0 203.0.113.10/32, 2001:db8:e::10/128
//!                            eth0 192.0.2.129/26        <-->  eth0 192.0.2.130/26
//!                                 2001:db8:2::1/64                  2001:db8:2::2/64
//!                            nft table inet nml_kubeproxy:          TCP + UDP echo servers
//!                              198.51.100.10:8080 -> 192.0.2.130:8080     on :8080 (both families)
//!                              [2001:db8:5::10]:8080 -> [2001:db8:2::2]:8080
//! ```
//!
//! * The **pod** reaches everything through the host-side veth (`veth*`, see [`Lab::pod_host_if`]),
//!   which is where node-manager attaches its TC programs.
//! * The **node** routes and forwards (forwarding is enabled in that namespace only), does
//!   kube-proxy-like DNAT of the cluster IPs ([`CLUSTER_V4`], [`CLUSTER_V6`]) to the endpoint in
//!   a prerouting hook (pod traffic) and an output hook (node processes), and masquerades what
//!   carries mark `0x4000/0x4000` (KUBE-MARK-MASQ; node-originated traffic to a cluster IP gets it,
//!   as kube-proxy does for sources outside the cluster CIDR). The external/LoadBalancer IPs
//!   ([`EXTERNAL_V4`], [`EXTERNAL_V6`]) are bound on `kube-ipvs0` with nothing listening — what
//!   kube-proxy IPVS does for `externalTrafficPolicy: Local` on a node without a local endpoint —
//!   so without the agent, TCP from the pod to them is refused and UDP gets no echo.
//!   Like kube-proxy's, `kube-ipvs0` is left down (local routes exist anyway); it is a `dummy`
//!   device, or an `ifb` device on kernels built without the dummy driver.
//! * Duplicate address detection is off in every lab namespace (`accept_dad=0`), so IPv6 works
//!   as soon as [`Lab::new`] returns.
//! * The **ep** namespace plays the endpoint on another node. It runs in-process echo servers
//!   (threads of this process): TCP reads the request until the client half-closes, answers
//!   `b"echo:" + request` and closes; UDP answers every datagram with `b"echo:" + datagram`.
//!
//! Everything is removed when the [`Lab`] is dropped (also when [`Lab::new`] fails half-way).
//! Only documentation address ranges are used and nothing is configured in the caller's own
//! network namespace. Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN).

pub mod reset;

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// The pod's IPv4 address (on `eth0` in the pod namespace).
pub const POD_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// The pod's IPv6 address (on `eth0` in the pod namespace).
pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
/// IPv4 pod CIDR of the node (kube-proxy's cluster CIDR as far as masquerading goes).
pub const POD_CIDR_V4: &str = "192.0.2.0/25";
/// IPv6 pod CIDR of the node.
pub const POD_CIDR_V6: &str = "2001:db8:1::/64";
/// IPv4 cluster IP of the Service (DNATed by the node's nftables, bound nowhere).
pub const CLUSTER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// IPv6 cluster IP of the Service.
pub const CLUSTER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x10);
/// IPv4 external/LoadBalancer IP of the Service (bound on the node's `kube-ipvs0`).
pub const EXTERNAL_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// IPv6 external/LoadBalancer IP of the Service (bound on the node's `kube-ipvs0`).
pub const EXTERNAL_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0x10);
/// IPv4 address of the Service endpoint (in the ep namespace).
pub const ENDPOINT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 130);
/// IPv6 address of the Service endpoint (in the ep namespace).
pub const ENDPOINT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
/// Service port, TCP and UDP, on the cluster IPs, the external IPs and the endpoint.
pub const SERVICE_PORT: u16 = 8080;
/// IPv4 address of the first pod added with [`Lab::add_extra_pod`]; the n-th (0-based) gets
/// this plus n in the last octet.
pub const EXTRA_POD_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
/// IPv6 address of the first pod added with [`Lab::add_extra_pod`]; the n-th (0-based) gets
/// this plus n.
pub const EXTRA_POD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x11);
/// Name of the kube-proxy nftables table in the node namespace (family `inet`).
pub const NFT_TABLE: &str = "nml_kubeproxy";
/// Name, in the node namespace, of the interface towards the endpoint (the node's "uplink").
/// It does not match `veth*`.
pub const NODE_UPLINK_IF: &str = "eth0";
/// Prefix of every network namespace a lab creates (see [`leftovers`]).
pub const NETNS_PREFIX: &str = "nml-";

const NETNS_DIR: &str = "/var/run/netns";
const NODE_POD_GW_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const NODE_POD_GW_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const NODE_UPLINK_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 129);
const NODE_UPLINK_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
const MAX_EXTRA_PODS: usize = 64;
/// How long the echo servers wait for a request before giving up on a connection.
const SERVER_IO_LIMIT: Duration = Duration::from_secs(10);
/// Poll period of the echo servers' stop flag.
const SERVER_TICK: Duration = Duration::from_millis(50);
const MAX_PEERS_LOGGED: usize = 4096;

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// One of the lab's network namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ns {
    /// The pod (`eth0` = [`POD_V4`], [`POD_V6`]).
    Pod,
    /// The Kubernetes node: host-side veths, kube-ipvs0, kube-proxy NAT.
    Node,
    /// The Service endpoint with the echo servers.
    Ep,
    /// The n-th (0-based) pod added with [`Lab::add_extra_pod`].
    ExtraPod(usize),
}

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

#[derive(Debug)]
struct ExtraPod {
    ns: String,
    host_if: String,
}

/// The namespaces, links, NAT rules and echo servers of one lab node. Dropping it removes all
/// of them (stops and joins the server threads, then deletes the namespaces).
#[derive(Debug)]
pub struct Lab {
    id: u32,
    pod_ns: String,
    node_ns: String,
    ep_ns: String,
    pod_host_if: String,
    extra_pods: Vec<ExtraPod>,
    /// Namespaces that exist and must be deleted on drop, in creation order.
    created: Vec<String>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl Lab {
    /// Builds the whole topology and starts the echo servers. On error, whatever was already
    /// created is removed again before returning.
    pub fn new() -> Result<Lab> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let base = format!("{NETNS_PREFIX}{pid}-{id}");
        // The guard exists before anything is created: dropping it cleans up what exists.
        let mut lab = Lab {
            id,
            pod_ns: format!("{base}-pod"),
            node_ns: format!("{base}-node"),
            ep_ns: format!("{base}-ep"),
            pod_host_if: format!("veth{:04x}{:02x}", pid & 0xffff, id & 0xff),
            extra_pods: Vec::new(),
            created: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            peers: Arc::new(Mutex::new(Vec::new())),
        };
        lab.build()?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        // The node is a router, in its own namespace only.
        let router = ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", "net.ipv6.conf.default.forwarding=1"];
        self.create_netns(&self.pod_ns.clone(), &[])?;
        self.create_netns(&self.node_ns.clone(), &router)?;
        self.create_netns(&self.ep_ns.clone(), &[])?;
        let (pod, node, ep, host_if) = (&self.pod_ns, &self.node_ns, &self.ep_ns, &self.pod_host_if);

        // Links are created from inside the node namespace with their peers placed directly in
        // the pod/ep namespaces: nothing ever appears in the caller's namespace.
        let mut b = String::new();
        wl(&mut b, "link set lo up");
        wl(&mut b, &format!("link add {host_if} type veth peer name eth0 netns {pod}"));
        wl(&mut b, &format!("link add {NODE_UPLINK_IF} type veth peer name eth0 netns {ep}"));
        ip_batch(node, &b)?;
        self.add_kube_ipvs0()?;

        let mut b = String::new();
        wl(&mut b, &format!("addr add {NODE_POD_GW_V4}/32 dev {host_if}"));
        wl(&mut b, &format!("addr add {NODE_POD_GW_V6}/128 dev {host_if} nodad"));
        wl(&mut b, &format!("link set {host_if} up"));
        wl(&mut b, &format!("route add {POD_V4}/32 dev {host_if}"));
        wl(&mut b, &format!("route add {POD_V6}/128 dev {host_if}"));
        wl(&mut b, &format!("addr add {NODE_UPLINK_V4}/26 dev {NODE_UPLINK_IF}"));
        wl(&mut b, &format!("addr add {NODE_UPLINK_V6}/64 dev {NODE_UPLINK_IF} nodad"));
        wl(&mut b, &format!("link set {NODE_UPLINK_IF} up"));
        // Cluster IPs are bound nowhere (iptables-mode kube-proxy). Pod traffic is DNATed in
        // prerouting before any route lookup; node processes need a route for the output
        // lookup to succeed before the output NAT hook runs.
        wl(&mut b, &format!("route add 198.51.100.0/24 via {ENDPOINT_V4} dev {NODE_UPLINK_IF}"));
        wl(&mut b, &format!("route add 2001:db8:5::/64 via {ENDPOINT_V6} dev {NODE_UPLINK_IF}"));
        wl(&mut b, &format!("addr add {EXTERNAL_V4}/32 dev kube-ipvs0"));
        wl(&mut b, &format!("addr add {EXTERNAL_V6}/128 dev kube-ipvs0 nodad"));
        ip_batch(node, &b)?;

        configure_pod(pod, POD_V4, POD_V6)?;

        let mut b = String::new();
        wl(&mut b, "link set lo up");
        wl(&mut b, &format!("addr add {ENDPOINT_V4}/26 dev eth0"));
        wl(&mut b, &format!("addr add {ENDPOINT_V6}/64 dev eth0 nodad"));
        wl(&mut b, "link set eth0 up");
        wl(&mut b, &format!("route add default via {NODE_UPLINK_V4} dev eth0"));
        wl(&mut b, &format!("route add ::/0 via {NODE_UPLINK_V6} dev eth0"));
        ip_batch(ep, &b)?;

        let rules = kube_proxy_ruleset();
        run_with_stdin(self.nsenter(node, "nft").args(["-f", "-"]), node, &rules)?;

        self.start_echo_servers()
    }

    /// kube-proxy IPVS uses a dummy device, left down. Kernels without the dummy driver get an
    /// ifb device instead (also NOARP, also never carries a packet here); local routes of
    /// addresses exist whether or not the device is up.
    fn add_kube_ipvs0(&self) -> Result<()> {
        let node = &self.node_ns;
        let dummy = ip_batch(node, "link add kube-ipvs0 type dummy\n");
        if let Err(dummy_err) = dummy {
            ip_batch(node, "link add kube-ipvs0 type ifb\n").with_context(|| {
                format!("netns {node}: neither a dummy nor an ifb kube-ipvs0 (dummy: {dummy_err:#})")
            })?;
        }
        Ok(())
    }

    /// `ip netns add`, then sysctls inside it: no DAD (see below) plus `extra_sysctls`.
    fn create_netns(&mut self, name: &str, extra_sysctls: &[&str]) -> Result<()> {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("netns {name}: cannot run `ip netns add {name}`"))?;
        if !out.status.success() {
            bail!(
                "netns {name}: `ip netns add {name}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        self.created.push(name.to_owned());
        // Without this, link-local addresses stay tentative for a second or two after the
        // links come up, and a router cannot send neighbour solicitations for packets it
        // forwards (their source is not one of its own addresses, so the NS must come from a
        // usable link-local): the first forwarded IPv6 packets are lost and TCP takes ~2 s
        // (SYN retransmissions) to connect.
        run(
            self.nsenter(name, "sysctl")
                .args(["-q", "-w"])
                .args(["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"])
                .args(extra_sysctls),
            name,
        )
    }

    fn start_echo_servers(&mut self) -> Result<()> {
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
            let (stop, peers, prefix2) = (self.stop.clone(), self.peers.clone(), prefix.clone());
            self.spawn_server(format!("{prefix}{tag}"), move || tcp_echo_server(listener, &stop, &peers, &prefix2))?;
        }
        for (tag, socket) in [("u4", udp4), ("u6", udp6)] {
            let (stop, peers) = (self.stop.clone(), self.peers.clone());
            self.spawn_server(format!("{prefix}{tag}"), move || udp_echo_server(socket, &stop, &peers))?;
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

    /// Adds another pod: a new namespace with `eth0` = [`EXTRA_POD_V4`] + n and
    /// [`EXTRA_POD_V6`] + n (n = number of extra pods added before), wired like the first pod
    /// to a new host-side veth `veth<name_suffix>` in the node namespace. Returns that host
    /// interface name. Use [`Ns::ExtraPod`]`(n)` to run things in the new pod. Removed on drop.
    pub fn add_extra_pod(&mut self, name_suffix: &str) -> Result<String> {
        let host_if = format!("veth{name_suffix}");
        let n = self.extra_pods.len();
        if name_suffix.is_empty()
            || host_if.len() > 15
            || !name_suffix.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        {
            bail!(
                "extra pod suffix {name_suffix:?}: need 1-11 characters of [A-Za-z0-9_-] \
                 (interface name veth<suffix> at most 15 characters)"
            );
        }
        if host_if == self.pod_host_if || self.extra_pods.iter().any(|p| p.host_if == host_if) {
            bail!("extra pod suffix {name_suffix:?}: interface {host_if} already exists");
        }
        if n >= MAX_EXTRA_PODS {
            bail!("at most {MAX_EXTRA_PODS} extra pods");
        }
        let v4 = Ipv4Addr::from(u32::from(EXTRA_POD_V4) + n as u32);
        let v6 = Ipv6Addr::from(u128::from(EXTRA_POD_V6) + n as u128);
        let ns = format!("{NETNS_PREFIX}{}-{}-x{name_suffix}", std::process::id(), self.id);
        self.create_netns(&ns, &[])?;
        // Registered right away so that Ns::ExtraPod(n) exists even if wiring fails below.
        self.extra_pods.push(ExtraPod { ns: ns.clone(), host_if: host_if.clone() });
        let node = &self.node_ns;
        let mut b = String::new();
        wl(&mut b, &format!("link add {host_if} type veth peer name eth0 netns {ns}"));
        wl(&mut b, &format!("addr add {NODE_POD_GW_V4}/32 dev {host_if}"));
        wl(&mut b, &format!("addr add {NODE_POD_GW_V6}/128 dev {host_if} nodad"));
        wl(&mut b, &format!("link set {host_if} up"));
        wl(&mut b, &format!("route add {v4}/32 dev {host_if}"));
        wl(&mut b, &format!("route add {v6}/128 dev {host_if}"));
        ip_batch(node, &b)?;
        configure_pod(&ns, v4, v6)?;
        Ok(host_if)
    }

    /// Name of a namespace (under `/var/run/netns`).
    ///
    /// # Panics
    /// For an [`Ns::ExtraPod`] index that [`Lab::add_extra_pod`] has not created.
    pub fn ns_name(&self, ns: Ns) -> &str {
        match ns {
            Ns::Pod => &self.pod_ns,
            Ns::Node => &self.node_ns,
            Ns::Ep => &self.ep_ns,
            Ns::ExtraPod(n) => match self.extra_pods.get(n) {
                Some(p) => &p.ns,
                None => panic!("lab has {} extra pods, no Ns::ExtraPod({n})", self.extra_pods.len()),
            },
        }
    }

    /// `/var/run/netns/<name>`: for `setns`, `nsenter --net=` or [`in_netns`].
    ///
    /// # Panics
    /// As [`Lab::ns_name`].
    pub fn netns_path(&self, ns: Ns) -> PathBuf {
        Path::new(NETNS_DIR).join(self.ns_name(ns))
    }

    /// Name, in the node namespace, of the pod's host-side veth (matches `veth*`).
    pub fn pod_host_if(&self) -> &str {
        &self.pod_host_if
    }

    /// A command that runs `program` inside the namespace, via
    /// `nsenter --net=<netns path> -- program` (unlike `ip netns exec`, this leaves the mount
    /// namespace alone, so `/sys/fs/bpf` pins stay visible). Add arguments as usual.
    ///
    /// # Panics
    /// As [`Lab::ns_name`].
    pub fn command(&self, ns: Ns, program: impl AsRef<OsStr>) -> Command {
        nsenter_command(&self.netns_path(ns), program.as_ref())
    }

    fn nsenter(&self, ns_name: &str, program: &str) -> Command {
        nsenter_command(&Path::new(NETNS_DIR).join(ns_name), OsStr::new(program))
    }

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

    /// Makes the Service serve one more port: kube-proxy's DNAT of the cluster IPs on `port`
    /// (TCP and UDP) to the endpoint on the same port, like [`SERVICE_PORT`]. The lab runs no
    /// server on it: the caller starts one in [`Ns::Ep`] (for example a benchmark's sink).
    pub fn add_service_port(&self, port: u16) -> Result<()> {
        if port == SERVICE_PORT {
            bail!("port {port} is already the Service's port");
        }
        let node = &self.node_ns;
        let script: String =
            service_port_rules(port).iter().map(|r| format!("add rule inet {NFT_TABLE} services {r}\n")).collect();
        run_with_stdin(self.nsenter(node, "nft").args(["-f", "-"]), node, &script)
    }

    /// Client addresses the echo servers have seen (TCP: accepted peer; UDP: datagram source),
    /// oldest first (the most recent few thousand). Shows whether traffic reached the
    /// endpoint with the pod's address or a masqueraded one.
    pub fn endpoint_peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for handle in self.servers.drain(..) {
            let name = handle.thread().name().unwrap_or("?").to_owned();
            if handle.join().is_err() {
                eprintln!("lab: echo server thread {name} panicked");
            }
        }
        // Reverse creation order: extra pods, ep, node (takes the veths with it), pod.
        for ns in self.created.drain(..).rev() {
            match Command::new("ip").args(["netns", "del", &ns]).stdin(Stdio::null()).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "lab: netns {ns}: `ip netns del {ns}` failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("lab: netns {ns}: cannot run `ip netns del {ns}`: {e}"),
            }
        }
    }
}

/// Runs `f` on a new thread that has first entered the network namespace at `netns`
/// (`setns(CLONE_NEWNET)`), and returns its result. Sockets created in `f` belong to that
/// namespace for their whole life. A panic in `f` is propagated to the caller.
pub fn in_netns<T, F>(netns: impl AsRef<Path>, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    let netns = netns.as_ref();
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("nml-in-netns".into())
            .spawn_scoped(s, || {
                enter_netns(netns)?;
                f()
            })
            .context("spawning a thread")?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
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

/// Moves the calling thread into the network namespace at `netns`.
fn enter_netns(netns: &Path) -> Result<()> {
    let file = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    // SAFETY: plain syscall on a valid, open descriptor; it only affects this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setns({}, CLONE_NEWNET)", netns.display()));
    }
    Ok(())
}

/// Network namespaces under `/var/run/netns` whose name starts with `nml-` (any lab, any
/// process), sorted. Tests use it to check that labs clean up.
pub fn leftovers() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> =
        dir.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with(NETNS_PREFIX)).collect();
    names.sort();
    names
}

/// Deletes the `nml-<pid>-…` namespaces of processes that no longer exist (labs of test runs
/// that were killed before their `Drop` ran) and returns their names. Namespaces of live
/// processes, including this one, are left alone.
pub fn remove_stale_leftovers() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in leftovers() {
        let pid = name[NETNS_PREFIX.len()..].split('-').next().unwrap_or("");
        if pid.is_empty() || !pid.bytes().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        run(Command::new("ip").args(["netns", "del", &name]), &name)?;
        removed.push(name);
    }
    Ok(removed)
}

fn nsenter_command(netns: &Path, program: &OsStr) -> Command {
    let mut net = std::ffi::OsString::from("--net=");
    net.push(netns);
    let mut cmd = Command::new("nsenter");
    cmd.arg(net).arg("--").arg(program);
    cmd
}

/// Pod side of a pod veth: `eth0` with /32 and /128, routes via the node.
fn configure_pod(ns: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<()> {
    let mut b = String::new();
    wl(&mut b, "link set lo up");
    wl(&mut b, &format!("addr add {v4}/32 dev eth0"));
    wl(&mut b, &format!("addr add {v6}/128 dev eth0 nodad"));
    wl(&mut b, "link set eth0 up");
    wl(&mut b, &format!("route add {NODE_POD_GW_V4}/32 dev eth0"));
    wl(&mut b, &format!("route add default via {NODE_POD_GW_V4} dev eth0"));
    wl(&mut b, &format!("route add {NODE_POD_GW_V6}/128 dev eth0"));
    wl(&mut b, &format!("route add ::/0 via {NODE_POD_GW_V6} dev eth0"));
    ip_batch(ns, &b)
}

/// kube-proxy's rules for one port of the Service (cluster IP:port → endpoint:port, TCP and
/// UDP, both families; marked for masquerading unless the source is a pod), as the lines of
/// the `services` chain.
fn service_port_rules(p: u16) -> [String; 4] {
    [
        format!(
            "ip daddr {CLUSTER_V4} meta l4proto {{ tcp, udp }} th dport {p} ip saddr != {POD_CIDR_V4} meta mark set meta mark | 0x4000"
        ),
        format!("ip daddr {CLUSTER_V4} meta l4proto {{ tcp, udp }} th dport {p} dnat ip to {ENDPOINT_V4}:{p}"),
        format!(
            "ip6 daddr {CLUSTER_V6} meta l4proto {{ tcp, udp }} th dport {p} ip6 saddr != {POD_CIDR_V6} meta mark set meta mark | 0x4000"
        ),
        format!("ip6 daddr {CLUSTER_V6} meta l4proto {{ tcp, udp }} th dport {p} dnat ip6 to [{ENDPOINT_V6}]:{p}"),
    ]
}

fn kube_proxy_ruleset() -> String {
    let services: String = service_port_rules(SERVICE_PORT).iter().map(|r| format!("        {r}\n")).collect();
    format!(
        "table inet {NFT_TABLE} {{
    chain services {{
{services}    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump services
    }}
    chain output {{
        type nat hook output priority -100; policy accept;
        jump services
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        meta mark & 0x4000 == 0x4000 counter meta mark set meta mark ^ 0x4000 masquerade
    }}
}}
"
    )
}

/// Appends one line to an `ip -batch` script.
fn wl(batch: &mut String, line: &str) {
    let _ = writeln!(batch, "{line}");
}

/// Runs an `ip -batch` script inside namespace `ns` (`ip -n <ns> -batch -`).
fn ip_batch(ns: &str, script: &str) -> Result<()> {
    run_with_stdin(Command::new("ip").args(["-n", ns, "-batch", "-"]), ns, script)
        .with_context(|| format!("netns {ns}: ip batch:\n{}", script.trim_end()))
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn run(cmd: &mut Command, ns: &str) -> Result<()> {
    let what = describe(cmd);
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("netns {ns}: cannot run `{what}`"))?;
    check(&out, ns, &what)
}

fn run_with_stdin(cmd: &mut Command, ns: &str, input: &str) -> Result<()> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("netns {ns}: cannot run `{what}`"))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let written = stdin.write_all(input.as_bytes());
    drop(stdin);
    let out = child.wait_with_output().with_context(|| format!("netns {ns}: waiting for `{what}`"))?;
    check(&out, ns, &what)?;
    written.with_context(|| format!("netns {ns}: writing the input of `{what}`"))
}

fn check(out: &std::process::Output, ns: &str, what: &str) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    let mut msg = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if msg.is_empty() {
        msg = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    }
    Err(anyhow!("netns {ns}: `{what}` failed ({}): {msg}", out.status))
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
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

fn log_peer(peers: &Mutex<Vec<SocketAddr>>, peer: SocketAddr) {
    if let Ok(mut p) = peers.lock() {
        if p.len() >= MAX_PEERS_LOGGED {
            p.drain(..MAX_PEERS_LOGGED / 2);
        }
        p.push(peer);
    }
}

fn tcp_echo_server(listener: TcpListener, stop: &Arc<AtomicBool>, peers: &Arc<Mutex<Vec<SocketAddr>>>, prefix: &str) {
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
                    log_peer(peers, peer);
                    let stop = stop.clone();
                    let spawned = std::thread::Builder::new()
                        .name(format!("{prefix}c"))
                        .spawn(move || tcp_echo_conn(stream, &stop));
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

/// One echo connection: read until the client half-closes (or [`SERVER_IO_LIMIT`]), answer
/// `echo:` + request, close. Gives up when the lab stops.
fn tcp_echo_conn(mut stream: TcpStream, stop: &AtomicBool) {
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

fn udp_echo_server(socket: UdpSocket, stop: &AtomicBool, peers: &Arc<Mutex<Vec<SocketAddr>>>) {
    if let Err(e) = socket.set_read_timeout(Some(SERVER_TICK)) {
        eprintln!("lab: echo server: set_read_timeout: {e}");
        return;
    }
    let mut buf = vec![0u8; 65536];
    let mut reply = Vec::with_capacity(65536 + 5);
    while !stop.load(Ordering::SeqCst) {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                log_peer(peers, from);
                reply.clear();
                reply.extend_from_slice(b"echo:");
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

    /// Unit tests that predict lab ids must not race with each other.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn failed_construction_removes_what_it_created() -> Result<()> {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        // Make the third namespace of the next lab impossible to create.
        let id = NEXT_ID.load(Ordering::SeqCst);
        let base = format!("{NETNS_PREFIX}{}-{id}", std::process::id());
        let squatter = format!("{base}-ep");
        run(Command::new("ip").args(["netns", "add", &squatter]), &squatter)?;
        let result = Lab::new();
        let left = leftovers();
        run(Command::new("ip").args(["netns", "del", &squatter]), &squatter)?;
        let err = result.expect_err("the ep namespace already exists");
        assert!(format!("{err:#}").contains(&squatter), "{err:#}");
        assert!(!left.contains(&format!("{base}-pod")), "{left:?}");
        assert!(!left.contains(&format!("{base}-node")), "{left:?}");
        assert!(left.contains(&squatter), "not ours, must stay: {left:?}");
        Ok(())
    }

    #[test]
    fn server_threads_are_joined_on_drop() -> Result<()> {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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

    #[test]
    fn ruleset_mentions_both_families() {
        let r = kube_proxy_ruleset();
        assert!(r.contains("dnat ip to 192.0.2.130:8080"), "{r}");
        assert!(r.contains("dnat ip6 to [2001:db8:2::2]:8080"), "{r}");
    }
}
