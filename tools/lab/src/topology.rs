//! The lab's namespaces, links and kube-proxy-like NAT: [`Lab`] builds and removes them.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail};

use crate::netns::{NETNS_DIR, nsenter_command};
use crate::run::{run, run_with_stdin};
use crate::*;

const MAX_EXTRA_PODS: usize = 64;

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

#[derive(Debug)]
struct ExtraPod {
    ns: String,
    host_if: String,
}

/// The namespaces, links, NAT rules and echo servers of one lab node. Dropping it removes all
/// of them (stops and joins the server threads, then deletes the namespaces).
#[derive(Debug)]
pub struct Lab {
    pub(crate) id: u32,
    pod_ns: String,
    node_ns: String,
    pub(crate) ep_ns: String,
    pod_host_if: String,
    extra_pods: Vec<ExtraPod>,
    /// Namespaces that exist and must be deleted on drop, in creation order.
    created: Vec<String>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) servers: Vec<JoinHandle<()>>,
    pub(crate) peers: Arc<Mutex<Vec<SocketAddr>>>,
    /// Whether the node has the lab's own kube-proxy stand-in (nft table [`NFT_TABLE`] and the
    /// external IPs bound on `kube-ipvs0`), or is left for the real kube-proxy.
    stand_in_kube_proxy: bool,
}

impl Lab {
    /// Builds the whole topology and starts the echo servers. On error, whatever was already
    /// created is removed again before returning.
    pub fn new() -> Result<Lab> {
        Self::build_with(true)
    }

    /// The same namespaces, links, addresses, routes and echo servers, but no kube-proxy: no
    /// [`NFT_TABLE`], no `kube-ipvs0`, nothing bound to the external IPs. For the real
    /// kube-proxy (see `lab::kube`), which writes its own rules in the node namespace.
    pub fn for_real_kube_proxy() -> Result<Lab> {
        Self::build_with(false)
    }

    fn build_with(stand_in_kube_proxy: bool) -> Result<Lab> {
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
            stand_in_kube_proxy,
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
        if self.stand_in_kube_proxy {
            self.add_kube_ipvs0()?;
        }

        let mut b = String::new();
        host_side_of_pod(&mut b, host_if, POD_V4, POD_V6);
        wl(&mut b, &format!("addr add {NODE_UPLINK_V4}/26 dev {NODE_UPLINK_IF}"));
        wl(&mut b, &format!("addr add {NODE_UPLINK_V6}/64 dev {NODE_UPLINK_IF} nodad"));
        wl(&mut b, &format!("link set {NODE_UPLINK_IF} up"));
        // Cluster IPs are bound nowhere (iptables-mode kube-proxy). Pod traffic is DNATed in
        // prerouting before any route lookup; node processes need a route for the output
        // lookup to succeed before the output NAT hook runs.
        wl(&mut b, &format!("route add 198.51.100.0/24 via {ENDPOINT_V4} dev {NODE_UPLINK_IF}"));
        wl(&mut b, &format!("route add 2001:db8:5::/64 via {ENDPOINT_V6} dev {NODE_UPLINK_IF}"));
        if self.stand_in_kube_proxy {
            wl(&mut b, &format!("addr add {EXTERNAL_V4}/32 dev kube-ipvs0"));
            wl(&mut b, &format!("addr add {EXTERNAL_V6}/128 dev kube-ipvs0 nodad"));
        } else {
            // The LB IPs are somewhere outside (the load balancer), reached over the uplink; the
            // route lets node processes' packets reach the output NAT hook, where kube-proxy
            // DNATs them (nftables and iptables modes bind no LB IP).
            wl(&mut b, &format!("route add 203.0.113.0/24 via {ENDPOINT_V4} dev {NODE_UPLINK_IF}"));
            wl(&mut b, &format!("route add 2001:db8:e::/64 via {ENDPOINT_V6} dev {NODE_UPLINK_IF}"));
        }
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

        if self.stand_in_kube_proxy {
            let rules = kube_proxy_ruleset();
            run_with_stdin(self.nsenter(node, "nft").args(["-f", "-"]), node, &rules)?;
        }

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
        host_side_of_pod(&mut b, &host_if, v4, v6);
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

/// Node side of a pod veth (`ip -batch` lines): the gateway addresses, up, routes to the pod.
fn host_side_of_pod(b: &mut String, host_if: &str, v4: Ipv4Addr, v6: Ipv6Addr) {
    wl(b, &format!("addr add {NODE_POD_GW_V4}/32 dev {host_if}"));
    wl(b, &format!("addr add {NODE_POD_GW_V6}/128 dev {host_if} nodad"));
    wl(b, &format!("link set {host_if} up"));
    wl(b, &format!("route add {v4}/32 dev {host_if}"));
    wl(b, &format!("route add {v6}/128 dev {host_if}"));
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Unit tests that predict lab ids must not race with each other.
    pub(crate) static SERIAL: Mutex<()> = Mutex::new(());

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
    fn ruleset_mentions_both_families() {
        let r = kube_proxy_ruleset();
        assert!(r.contains("dnat ip to 192.0.2.130:8080"), "{r}");
        assert!(r.contains("dnat ip6 to [2001:db8:2::2]:8080"), "{r}");
    }
}
