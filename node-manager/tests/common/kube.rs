//! Objects for the real apiserver (YAML written by hand, applied with the real kubectl) and the
//! lab's two nodes: `node-a` is the lab's node namespace (the agent's node), `node-b` the
//! endpoint namespace (the node that runs the Service's only endpoint, a hostNetwork pod there).
//!
//! The objects' YAML is `lab::kube::objects` (EndpointSlices written by the lab, and why).
#![allow(dead_code)]
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use lab::{
    Lab, Ns,
    kube::{ApiBridge, Cluster, KubeProxy, Options, ProxyMode, objects},
};
use serde_json::Value;

pub use lab::kube::objects::service_yaml;

use super::{
    agent::{Scratch, wait_for},
    deploy::deploy_dir,
    pod::DaemonSetPod,
};

pub const NODE_A: &str = "node-a";
pub const NODE_B: &str = "node-b";

/// Both Node objects: `spec.podCIDRs` and `status.addresses` (kube-proxy waits for addresses).
pub fn create_nodes(c: &Cluster) {
    for (name, cidrs, addrs) in [
        (NODE_A, ["192.0.2.0/25", "2001:db8:1::/64"], ["192.0.2.129", "2001:db8:2::1"]),
        (NODE_B, ["192.0.2.192/26", "2001:db8:3::/64"], ["192.0.2.130", "2001:db8:2::2"]),
    ] {
        create_node(c, name, &cidrs, &addrs);
    }
}

pub fn create_node(c: &Cluster, name: &str, cidrs: &[&str], addrs: &[&str]) {
    c.create_node(name, cidrs, addrs).unwrap();
}

pub fn create_namespace(c: &Cluster, ns: &str) {
    c.create_namespace(ns).unwrap();
}

pub fn set_lb_ips(c: &Cluster, ns: &str, name: &str, ips: &[&str]) {
    c.set_lb_ips(ns, name, ips).unwrap();
}

/// The lab-written EndpointSlices of a selector-less Service, the endpoint on `node-b`.
pub fn endpoint_slices_yaml(ns: &str, service: &str, endpoints: &[&str], ports: &[u16]) -> String {
    objects::endpoint_slices_yaml(ns, service, endpoints, ports, NODE_B)
}

/// The frontends map as `inspect --json` shows it: "addr:port/proto" → cluster IP (empty while
/// the agent has not pinned its maps).
pub fn frontends(scratch: &Scratch) -> BTreeMap<String, String> {
    let Ok(state) = scratch.try_inspect() else { return BTreeMap::new() };
    state["frontends"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| (f["frontend"].as_str().unwrap().to_owned(), f["cluster_ip"].as_str().unwrap().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

pub fn pod_cidrs(scratch: &Scratch) -> Vec<String> {
    let Ok(state) = scratch.try_inspect() else { return Vec::new() };
    state["pod_cidrs"]
        .as_array()
        .map(|a| a.iter().map(|c| c.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

pub fn counter(state: &Value, name: &str) -> u64 {
    state["counters"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .and_then(|c| c["packets"].as_u64())
        .unwrap_or(0)
}

/// Waits until the frontends map is exactly `want`.
pub fn wait_frontends(
    scratch: &Scratch,
    what: &str,
    timeout: Duration,
    want: &[(&str, &str)],
    log: impl Fn() -> String,
) {
    let want: BTreeMap<String, String> = want.iter().map(|(f, c)| (f.to_string(), c.to_string())).collect();
    let start = std::time::Instant::now();
    loop {
        let have = frontends(scratch);
        if have == want {
            return;
        }
        assert!(start.elapsed() < timeout, "{what}: frontends are {have:#?}, want {want:#?}\nagent log:\n{}", log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The four frontends of one LB IP pair and port (TCP, UDP; IPv4, IPv6) plus their ICMP echo
/// entries, mapped to the cluster IPs.
pub fn lab_frontends<'a>(port: &str, v4: (&'a str, &'a str), v6: (&'a str, &'a str)) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (ext, cluster) in [v4, v6] {
        let host = if ext.contains(':') { format!("[{ext}]") } else { ext.to_owned() };
        out.push((format!("{host}:0/ICMP"), cluster.to_owned()));
        out.push((format!("{host}:{port}/TCP"), cluster.to_owned()));
        out.push((format!("{host}:{port}/UDP"), cluster.to_owned()));
    }
    out
}

pub fn wait_pod_cidrs(scratch: &Scratch, want: &[&str], log: impl Fn() -> String) {
    let start = std::time::Instant::now();
    while pod_cidrs(scratch) != want {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "pod CIDRs are {:?}, want {want:?}\nagent log:\n{}",
            pod_cidrs(scratch),
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until an agent with the rewrite on has attached: the 8 socket hooks and the TC
/// programs on `interfaces` pod interfaces (a restarted agent finds its maps filled already,
/// so the frontends alone do not show that it runs).
pub fn wait_attached(scratch: &Scratch, interfaces: usize, log: impl Fn() -> String) {
    let start = std::time::Instant::now();
    loop {
        let s = scratch.try_inspect().unwrap_or_default();
        let hooks = s["cgroup_hooks"].as_array().map_or(0, Vec::len);
        let ifaces = s["interfaces"].as_array().map_or(0, Vec::len);
        if hooks == node_manager::kernel::cgroup::HOOKS.len() && ifaces == interfaces {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{hooks} socket hooks, {ifaces} interfaces attached:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn wait(what: &str, secs: u64, check: impl FnMut() -> bool) {
    wait_for(what, Duration::from_secs(secs), check)
}

pub const LB_V4: &str = "203.0.113.10";
pub const LB_V6: &str = "2001:db8:e::10";
pub const CLUSTER_V4: &str = "198.51.100.10";
pub const CLUSTER_V6: &str = "2001:db8:5::10";
pub const POD_V4: &str = "192.0.2.10";
pub const NODE_UPLINK_V4: &str = "192.0.2.129";

pub fn manifest(name: &str) -> String {
    deploy_dir().join(name).display().to_string()
}

/// The DaemonSet object as the apiserver holds it.
pub fn daemonset(c: &Cluster) -> Value {
    serde_json::from_str(&c.kubectl_ok(&["get", "ds", "node-manager", "-n", "kube-system", "-o", "json"]).unwrap())
        .unwrap()
}

/// The lab's Service `shop/web` (dual-stack, TCP+UDP 8080, LB IPs set by status, lab-written
/// slices with the endpoint on node-b).
/// The Service of the kubernetes#74839 case: cluster IP 198.51.100.30 (and 2001:db8:5::30),
/// TCP 9000, its endpoint the reset scenario's server in the endpoint namespace.
pub const RESET_CLUSTER_V4: &str = "198.51.100.30";

fn create_reset_service(c: &Cluster) {
    let port = lab::reset::OUTSIDE_PORT;
    c.apply(&objects::cluster_ip_service_yaml("shop", "reset", RESET_CLUSTER_V4, port)).unwrap();
    c.apply(&endpoint_slices_yaml("shop", "reset", &["192.0.2.130"], &[port])).unwrap();
}

/// The pod's connection through kube-proxy's DNAT of the reset Service, then out-of-window
/// segments from the server: (RSTs the node sent, connection alive after).
pub fn provoke_invalid(lab: &Lab) -> (usize, bool) {
    let via: SocketAddr = format!("{RESET_CLUSTER_V4}:{}", lab::reset::OUTSIDE_PORT).parse().unwrap();
    let mut scenario =
        lab::reset::ResetScenario::start_via(lab, false, Some(via)).expect("pod connects via the cluster IP");
    scenario.inject_out_of_window(3).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let alive = scenario.exchange(b"after the injection");
    std::thread::sleep(Duration::from_millis(100));
    (scenario.node_resets(), alive)
}

pub fn create_web_service(c: &Cluster) {
    create_namespace(c, "shop");
    c.apply(&service_yaml("shop", "web", &[CLUSTER_V4, CLUSTER_V6], &[8080])).unwrap();
    set_lb_ips(c, "shop", "web", &[LB_V4, LB_V6]);
    c.apply(&endpoint_slices_yaml("shop", "web", &["192.0.2.130", "2001:db8:2::2"], &[8080])).unwrap();
    create_reset_service(c);
}

/// A ServiceAccount token of node-manager, bound to Secret `secret` (deleting it revokes the token).
pub fn node_manager_token(c: &Cluster, secret: &str) -> String {
    c.kubectl_ok(&["create", "secret", "generic", secret, "-n", "kube-system"]).unwrap();
    c.token("kube-system", "node-manager", "1h", Some(secret)).unwrap()
}

/// A cgroup below the agent's hooked one, where the lab's "pod processes" run (on a node every
/// pod lives below the cgroup root the DaemonSet hooks). Removed on drop.
pub struct PodCgroup(pub PathBuf);

impl PodCgroup {
    pub fn new(parent: &Path) -> PodCgroup {
        let p = parent.join("pods");
        std::fs::create_dir(&p).unwrap();
        PodCgroup(p)
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A client process in network namespace `netns` (and cgroup `cgroup`, if given): socat sends
/// `hello` over TCP, connected UDP or unconnected UDP (`UDP-SENDTO`) and prints the reply.
pub fn client(netns: &Path, cgroup: Option<&Path>, how: &str, to: SocketAddr) -> Result<String, String> {
    let target = match how {
        "tcp" => format!("TCP:{to},connect-timeout=3"),
        "udp" => format!("UDP:{to}"),
        "udp-sendto" => format!("UDP-SENDTO:{to}"),
        other => panic!("client kind {other}"),
    };
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display())).args(["--", "socat", "-t", "1", "-T", "3", "-", &target]);
    if let Some(cg) = cgroup {
        let procs = cg.join("cgroup.procs");
        // SAFETY: only open/write/close between fork and exec.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, "0"));
        }
    }
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(b"hello").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if text.contains("echo:hello") {
        Ok(text)
    } else {
        Err(format!("{how} to {to}: {} {:?} {}", out.status, text, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The source address the endpoint saw for the last exchange.
pub fn last_peer(lab: &Lab) -> String {
    lab.endpoint_peers().last().map(|p| p.ip().to_string()).unwrap_or_default()
}

pub fn lb(port: u16, v6: bool) -> SocketAddr {
    if v6 { format!("[{LB_V6}]:{port}").parse().unwrap() } else { format!("{LB_V4}:{port}").parse().unwrap() }
}

/// The same story for one kube-proxy mode. What node-manager must do: kube-proxy (nftables,
/// iptables) already serves pods and node processes that reach an LB IP of an
/// `externalTrafficPolicy: Local` Service without a local endpoint, so the manifest for these
/// modes keeps the rewrite off and nothing changes; with the rewrite on (the IPVS manifest),
/// pods whose processes are below the hooked cgroup (every pod on a real node) are served by
/// the socket hook and the endpoint still sees the pod's address.
pub fn kube_proxy_story(mode: ProxyMode) {
    let mut cluster = Cluster::start(&Options::default()).unwrap();
    let lab = Lab::for_real_kube_proxy().unwrap();
    let node_ns = lab.netns_path(Ns::Node);
    let pod_ns = lab.netns_path(Ns::Pod);
    let _bridge = ApiBridge::into_netns(&node_ns, cluster.apiserver_port).unwrap();
    create_nodes(&cluster);
    create_web_service(&cluster);
    if mode == ProxyMode::Ipvs {
        load_ipvs_modules();
    }
    let kp = KubeProxy::start(&cluster, &node_ns, NODE_A, mode, "192.0.2.0/25,2001:db8:1::/64").unwrap();
    assert_eq!(kp.reported_mode().unwrap(), mode.name());

    // Without node-manager: kube-proxy serves the LB IP to the pod (the endpoint sees the pod)
    // and to node processes: nftables and iptables mode masquerade them to the node's address;
    // in IPVS mode the LB IP is a local address (kube-ipvs0), so a node process's source
    // address is the LB IP itself and IPVS changes only the destination.
    let node_peer = if mode == ProxyMode::Ipvs { LB_V4 } else { NODE_UPLINK_V4 };
    let served = |who: &str, netns: &Path, cg: Option<&Path>, want_peer: &str| {
        for how in ["tcp", "udp"] {
            let reply = client(netns, cg, how, lb(8080, false));
            assert!(reply.is_ok(), "{} {who} {how} → LB IP: {reply:?}\n{}", mode.name(), node_view(&lab, &kp.log));
            assert_eq!(last_peer(&lab), want_peer, "{} {who} {how}: the endpoint's view of the source", mode.name());
        }
        let reply = client(netns, cg, "tcp", lb(8080, true));
        if mode == ProxyMode::Ipvs && reply.is_err() {
            let cluster6: SocketAddr = format!("[{CLUSTER_V6}]:8080").parse().unwrap();
            let direct6: SocketAddr = "[2001:db8:2::2]:8080".parse().unwrap();
            eprintln!(
                "IPVS-V6 {who}: LB {reply:?}; cluster IP {:?}; endpoint directly {:?}\n{}\n{}",
                client(netns, cg, "tcp", cluster6),
                client(netns, cg, "tcp", direct6),
                node_view(&lab, &kp.log),
                [
                    lab.command(Ns::Node, "ip6tables-save")
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default(),
                    lab.command(Ns::Node, "conntrack")
                        .args(["-L", "-f", "ipv6"])
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default(),
                    lab.command(Ns::Node, "sysctl")
                        .args(["net.ipv6.conf.all.forwarding", "net.ipv4.vs.conntrack"])
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default(),
                ]
                .join("\n")
            );
        }
        assert!(reply.is_ok(), "{} {who} tcp → LB IPv6: {reply:?}\n{}", mode.name(), node_view(&lab, &kp.log));
    };
    if mode == ProxyMode::Ipvs {
        // kube-proxy bound the LB IP on kube-ipvs0 and made it a virtual server with the
        // remote endpoint: kubernetes#75262 would black-hole here, yet v1.34 serves it.
        // (kube-proxy reports healthy before its first sync of the Services is written.)
        let ipvsadm = || {
            let out = lab.command(Ns::Node, "ipvsadm").args(["-Ln"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let started = std::time::Instant::now();
        while !(ipvsadm().contains(&format!("{LB_V4}:8080")) && ipvsadm().contains("192.0.2.130:8080")) {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "no IPVS virtual server for the LB IP:\n{}",
                ipvsadm()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let addrs = lab.command(Ns::Node, "ip").args(["-br", "addr", "show", "kube-ipvs0"]).output().unwrap();
        assert!(String::from_utf8_lossy(&addrs.stdout).contains(LB_V4), "LB IP bound on kube-ipvs0");
    }
    // kube-proxy's first sync of the Services may still be under way.
    wait("kube-proxy serves the LB IP", 60, || {
        client(&pod_ns, None, "tcp", lb(8080, false)).is_ok() && client(&pod_ns, None, "tcp", lb(8080, true)).is_ok()
    });
    served("pod", &pod_ns, None, POD_V4);
    served("node", &node_ns, None, node_peer);
    // kubernetes#74839 through kube-proxy's DNAT, without the agent: the node resets the pod's
    // connection.
    let (resets, alive) = provoke_invalid(&lab);
    assert!(
        resets > 0 && !alive,
        "{}: without node-manager the node resets ({resets} RSTs, alive {alive})",
        mode.name()
    );

    // node-manager as the manifest for this mode runs it: nothing that worked changes.
    cluster.kubectl_ok(&["apply", "--validate=strict", "-f", &manifest("node-manager.yaml")]).unwrap();
    let scratch = Scratch::new(&lab);
    let token = node_manager_token(&cluster, "nm-token");
    let ca = cluster.ca_path();
    let mut pod =
        DaemonSetPod::start(&scratch, &node_ns, &daemonset(&cluster), NODE_A, &token, &ca, cluster.apiserver_port);
    wait_pod_cidrs(&scratch, &["192.0.2.0/25", "2001:db8:1::/64"], || pod.log());
    let pods = PodCgroup::new(&scratch.cgroup.path);
    served("pod (agent, default manifest)", &pod_ns, Some(&pods.0), POD_V4);
    // Node processes live below the hooked cgroup too (on a node everything is below the root).
    served("node (agent, default manifest)", &node_ns, Some(&pods.0), node_peer);
    // kubernetes#74839 through kube-proxy's DNAT: with the agent, the INVALID segment is dropped.
    let (resets, alive) = provoke_invalid(&lab);
    assert_eq!(resets, 0, "{}: no RST from the node with node-manager", mode.name());
    assert!(alive, "{}: the pod's connection survives with node-manager", mode.name());
    pod.stop();

    // With the rewrite on: a pod below the hooked cgroup is served by the socket hook (no TC
    // rewrite, no flow), and the endpoint still sees the pod.
    cluster.kubectl_ok(&["apply", "--validate=strict", "-f", &manifest("node-manager-ipvs.yaml")]).unwrap();
    let mut pod =
        DaemonSetPod::start(&scratch, &node_ns, &daemonset(&cluster), NODE_A, &token, &ca, cluster.apiserver_port);
    let web = lab_frontends("8080", (LB_V4, CLUSTER_V4), (LB_V6, CLUSTER_V6));
    let want: Vec<(&str, &str)> = web.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    wait_frontends(&scratch, "rewrite on", Duration::from_secs(30), &want, || pod.log());
    wait_attached(&scratch, 1, || pod.log());
    let before = scratch.inspect();
    served("pod in the hooked cgroup (rewrite on)", &pod_ns, Some(&pods.0), POD_V4);
    let after = scratch.inspect();
    let delta = |n: &str| counter(&after, n) - counter(&before, n);
    assert!(delta("sock_connect_v4") >= 1, "the socket hook served the pod's TCP connect: {:#}", after["counters"]);
    assert_eq!(delta("rewrite_ingress_v4"), 0, "the TC path did not rewrite: {:#}", after["counters"]);
    // A pod process outside the hooked cgroup (this test's own thread in the pod's namespace):
    // the TC path rewrites it and marks it for masquerading, so the endpoint sees the node.
    let reply = lab::tcp_request_in(&pod_ns, lb(8080, false), b"hello", Duration::from_secs(3)).unwrap();
    assert_eq!(reply.data, b"echo:hello");
    assert_eq!(last_peer(&lab), NODE_UPLINK_V4, "TC path: masqueraded");
    let tc = scratch.inspect();
    assert!(counter(&tc, "rewrite_ingress_v4") > counter(&after, "rewrite_ingress_v4"), "{:#}", tc["counters"]);
    // The socket hook turned the node process's destination into the cluster IP, which every
    // mode masquerades for node processes (measured: in IPVS mode too, although there the LB
    // IP alone left the source as the LB IP).
    served("node process (rewrite on)", &node_ns, Some(&pods.0), NODE_UPLINK_V4);
    if mode == ProxyMode::Ipvs {
        // A stand-in, named: on a real cluster the endpoint's node runs kube-proxy IPVS too and
        // holds the LB IP on its own kube-ipvs0; the lab's endpoint namespace gets it on a dummy.
        // A node process the hooks do not see reaches the endpoint from the LB IP, a local
        // address there, and gets no answer; with the rewrite its source is the node's address.
        let ep = |args: &[&str]| {
            let out = lab.command(Ns::Ep, "ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        };
        ep(&["link", "add", "kube-ipvs0", "type", "dummy"]);
        ep(&["addr", "add", &format!("{LB_V4}/32"), "dev", "kube-ipvs0"]);
        let unhooked = client(&node_ns, None, "tcp", lb(8080, false));
        assert!(unhooked.is_err(), "IPVS alone, the endpoint's node holding the LB IP: {unhooked:?}");
        served(
            "node process (rewrite on, the endpoint's node holding the LB IP)",
            &node_ns,
            Some(&pods.0),
            NODE_UPLINK_V4,
        );
        ep(&["link", "del", "kube-ipvs0"]);
    }
    pod.stop();
    drop(pods);
    drop(scratch);
    drop(kp);
    // kube-proxy --cleanup removed its rules from the node namespace.
    let nft = lab.command(Ns::Node, "nft").args(["list", "tables"]).output().unwrap();
    let tables = String::from_utf8_lossy(&nft.stdout);
    assert!(!tables.contains("kube-proxy"), "kube-proxy's tables are gone: {tables}");
    // IPVS mode: kube-proxy v1.34's own `--cleanup` fails with iptables-nft ("CHAIN_DEL failed
    // (Device or resource busy): chain KUBE-MARK-MASQ") and stops before removing the IPVS
    // services (seen in the 6.12 guest, twice in a row); what it leaves goes with the lab's node
    // namespace, which the lab deletes (and `cargo xtask test` checks).
    if mode == ProxyMode::Iptables {
        let save = lab.command(Ns::Node, "iptables-save").output().unwrap();
        assert!(!String::from_utf8_lossy(&save.stdout).contains("KUBE-SVC"), "KUBE-* chains are gone");
    }
    cluster.quiet();
}

/// What kube-proxy wrote in the node namespace (IPVS services, addresses, IPv6 routes) and its
/// log's tail, for failure messages.
fn node_view(lab: &Lab, kube_proxy_log: &Path) -> String {
    let run = |args: &[&str]| {
        let out = lab.command(Ns::Node, args[0]).args(&args[1..]).output().map(|o| o.stdout).unwrap_or_default();
        format!("$ {}\n{}", args.join(" "), String::from_utf8_lossy(&out))
    };
    [
        run(&["ipvsadm", "-Ln"]),
        run(&["ip", "-br", "addr"]),
        run(&["ip", "-6", "route"]),
        format!("kube-proxy log:\n{}", lab::kube::tail(kube_proxy_log, 40)),
    ]
    .join("\n")
}

/// The ip_vs modules, loaded with the guest's module hook (kube-proxy runs `modprobe` itself,
/// which cannot find the guest kernel's modules on the shared root).
fn load_ipvs_modules() {
    let hook = std::fs::read_to_string("/proc/sys/kernel/modprobe").unwrap_or_default().trim().to_owned();
    for m in [
        "ip_vs",
        "ip_vs_rr",
        "ip_vs_wrr",
        "ip_vs_sh",
        "nf_conntrack",
        "ip_set",
        "ip_set_hash_ip",
        "ip_set_hash_ipport",
        "ip_set_hash_ipportip",
        "ip_set_hash_ipportnet",
        "ip_set_hash_net",
        "ip_set_bitmap_port",
        "xt_set",
        "dummy",
    ] {
        let _ = Command::new(&hook).arg(m).status();
    }
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    assert!(
        modules.lines().any(|l| l.starts_with("ip_vs ")) || std::path::Path::new("/proc/net/ip_vs").exists(),
        "ip_vs is not available on this kernel (kube-proxy's IPVS mode runs in the 6.12 guest: cargo xtask vm --kernel 6.12 --suite ipvs_guest --include-ignored)"
    );
}
