//! Conntrack harmony: rewritten flows must look to conntrack exactly like flows a pod or a
//! host process opened to the cluster IP itself. In the lab (kube-proxy-like nftables DNAT and
//! masquerade), with `-m conntrack --ctstate INVALID` counting rules in every chain of the
//! node and the pod, 1,000 TCP connections and 1,000 UDP exchanges from the pod and as many
//! from a host process (socket hooks) to the external IP, IPv4 and IPv6 alternating, must
//! leave: no packet counted INVALID by the rules, no change in conntrack's `invalid`,
//! `insert_failed`, `drop`, `early_drop` and `error` statistics, and no half-flow — no entry
//! left `[UNREPLIED]`, none whose tuple shows the external address (conntrack saw the flow
//! before the rewrite in one direction only), every TCP entry assured. Needs root.
mod common;

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::agent::{Agent, Scratch, lab_agent_args, lab_service_yaml, wait_for, write};
use lab::{Lab, Ns};
use serde_json::{Value, json};

/// Exchanges per kind (TCP, UDP) and per source (pod, host).
const N: usize = 1000;
const T: Duration = Duration::from_secs(3);
const CLIENT_ENV: &str = "NM_TEST_CT_CLIENT";
const RESULT_PREFIX: &str = "NM_TEST_RESULT ";
const STATS: [&str; 5] = ["invalid", "insert_failed", "drop", "early_drop", "error"];

fn ext(i: usize) -> SocketAddr {
    let ip: IpAddr = if i.is_multiple_of(2) { lab::EXTERNAL_V4.into() } else { lab::EXTERNAL_V6.into() };
    SocketAddr::new(ip, lab::SERVICE_PORT)
}

/// `n` TCP requests then `n` UDP exchanges (a new socket each) to the external addresses,
/// alternating families, from the network namespace at `netns`. Returns the failures.
fn exchanges(netns: &Path, n: usize) -> Vec<String> {
    let mut failures = Vec::new();
    for i in 0..n {
        let payload = format!("tcp{i}");
        match lab::tcp_request_in(netns, ext(i), payload.as_bytes(), T) {
            Ok(r) if r.data == format!("echo:{payload}").as_bytes() && r.peer == ext(i) => {}
            Ok(r) => failures.push(format!("TCP {i}: {:?} from {}", String::from_utf8_lossy(&r.data), r.peer)),
            Err(e) => failures.push(format!("TCP {i}: {e:#}")),
        }
    }
    for i in 0..n {
        let payload = format!("udp{i}");
        match lab::udp_request_in(netns, ext(i), payload.as_bytes(), T, i % 4 < 2) {
            Ok(r) if r.data == format!("echo:{payload}").as_bytes() && r.from == ext(i) => {}
            Ok(r) => failures.push(format!("UDP {i}: {:?} from {}", String::from_utf8_lossy(&r.data), r.from)),
            Err(e) => failures.push(format!("UDP {i}: {e:#}")),
        }
    }
    failures
}

/// The host-network client, run in a re-executed test binary (a no-op in a normal run): moves
/// itself into the test cgroup, then runs the exchanges in the node namespace.
#[test]
fn host_client() {
    let Ok(request) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let r: Value = serde_json::from_str(&request).unwrap();
    let cgroup = r["cgroup"].as_str().unwrap();
    fs::write(Path::new(cgroup).join("cgroup.procs"), std::process::id().to_string()).unwrap();
    let failures = exchanges(&PathBuf::from(r["netns"].as_str().unwrap()), r["n"].as_u64().unwrap() as usize);
    println!("{RESULT_PREFIX}{}", json!({ "failures": failures }));
}

fn host_exchanges(lab: &Lab, scratch: &Scratch, n: usize) -> Vec<String> {
    let request = json!({"netns": lab.netns_path(Ns::Node), "cgroup": scratch.cgroup.path, "n": n});
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "host_client", "--nocapture", "--test-threads=1"])
        .env(CLIENT_ENV, request.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.split_once(RESULT_PREFIX).map(|(_, r)| r)).unwrap_or_else(|| {
        panic!("host client printed no result ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr))
    });
    let v: Value = serde_json::from_str(line).unwrap();
    v["failures"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_owned()).collect()
}

fn run(lab: &Lab, ns: Ns, program: &str, args: &[&str]) -> String {
    let out = lab.command(ns, program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} in {ns:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const CHAINS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];
const COMMENT: &str = "nml-count-invalid";

/// A counting rule (no target) for conntrack-INVALID packets in every mangle chain.
fn add_invalid_counters(lab: &Lab, ns: Ns) {
    for tool in ["iptables", "ip6tables"] {
        for chain in CHAINS {
            run(
                lab,
                ns,
                tool,
                &[
                    "-t",
                    "mangle",
                    "-A",
                    chain,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "INVALID",
                    "-m",
                    "comment",
                    "--comment",
                    COMMENT,
                ],
            );
        }
    }
}

/// Packets the counting rules matched, by "tool/chain".
fn invalid_counted(lab: &Lab, ns: Ns) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for tool in ["iptables", "ip6tables"] {
        for chain in CHAINS {
            let listing = run(lab, ns, tool, &["-t", "mangle", "-L", chain, "-v", "-x", "-n"]);
            let line = listing
                .lines()
                .find(|l| l.contains(COMMENT))
                .unwrap_or_else(|| panic!("{tool} {chain}: rule gone:\n{listing}"));
            out.insert(format!("{tool}/{chain}"), line.split_whitespace().next().unwrap().parse().unwrap());
        }
    }
    out
}

/// conntrack's statistics summed over CPUs (`conntrack -S`), for the fields in [`STATS`].
fn ct_stats(lab: &Lab, ns: Ns) -> BTreeMap<&'static str, u64> {
    let text = run(lab, ns, "conntrack", &["-S"]);
    let mut out: BTreeMap<&'static str, u64> = STATS.iter().map(|s| (*s, 0)).collect();
    for field in text.split_whitespace() {
        if let Some((name, value)) = field.split_once('=')
            && let Some(slot) = STATS.iter().find(|s| **s == name)
        {
            *out.get_mut(slot).unwrap() += value.parse::<u64>().unwrap();
        }
    }
    out
}

/// conntrack entries of the Service port, both families, as `conntrack -L` prints them.
fn entries(lab: &Lab, ns: Ns) -> Vec<String> {
    let mut out = Vec::new();
    for family in ["ipv4", "ipv6"] {
        let text = run(lab, ns, "conntrack", &["-L", "-f", family]);
        // The first dport= is the original direction's.
        let to_service = |l: &&str| l.split_whitespace().find(|f| f.starts_with("dport=")) == Some("dport=8080");
        out.extend(text.lines().filter(to_service).map(str::to_owned));
    }
    out
}

/// Entries that are half-flows: never answered, or TCP not assured; in the node, also any
/// entry showing the external address (conntrack saw one direction before the rewrite and the
/// other after it); in the pod, any entry not to the external address (a reply that was not
/// translated back).
fn half_flows(ns: Ns, entries: &[String]) -> Vec<&String> {
    let externals = [format!("={}", lab::EXTERNAL_V4), format!("={}", lab::EXTERNAL_V6)];
    let shows_external = |e: &str| e.split_whitespace().any(|f| externals.iter().any(|x| f.ends_with(x.as_str())));
    entries
        .iter()
        .filter(|e| {
            e.contains("[UNREPLIED]")
                || (e.starts_with("tcp") && !e.contains("[ASSURED]"))
                || (ns == Ns::Node && shows_external(e))
                || (ns == Ns::Pod && !shows_external(e))
        })
        .collect()
}

#[test]
fn rewritten_flows_leave_no_invalid_conntrack_entries_and_no_half_flows() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    add_invalid_counters(&lab, Ns::Node);
    add_invalid_counters(&lab, Ns::Pod);
    // UDP entries must outlive the run, to be listed at the end (the default is 30 s).
    run(&lab, Ns::Node, "sysctl", &["-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=600"]);
    run(&lab, Ns::Pod, "sysctl", &["-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=600"]);
    // The INVALID drop stays off: nothing may hide an INVALID packet from the counters.
    let mut args = lab_agent_args(services.to_str().unwrap());
    args.extend(["--drop-invalid-input", "false"]);
    let agent = Agent::start(&scratch, &args);
    wait_for("the agent to attach and fill the maps", Duration::from_secs(15), || {
        scratch.try_inspect().is_ok_and(|s| {
            s["interfaces"].as_array().is_some_and(|i| !i.is_empty())
                && s["frontends"].as_array().is_some_and(|f| f.len() == 6)
                && s["cgroup_hooks"].as_array().is_some_and(|h| h.len() == node_manager::kernel::cgroup::HOOKS.len())
        })
    });
    for ns in [Ns::Node, Ns::Pod] {
        run(&lab, ns, "conntrack", &["-F"]);
    }
    let before = [ct_stats(&lab, Ns::Node), ct_stats(&lab, Ns::Pod)];

    let started = std::time::Instant::now();
    let pod_failures = exchanges(&lab.netns_path(Ns::Pod), N);
    assert!(
        pod_failures.is_empty(),
        "{} pod exchanges failed: {:?}\nagent log:\n{}",
        pod_failures.len(),
        &pod_failures[..pod_failures.len().min(5)],
        agent.log()
    );
    let host_failures = host_exchanges(&lab, &scratch, N);
    assert!(
        host_failures.is_empty(),
        "{} host exchanges failed: {:?}",
        host_failures.len(),
        &host_failures[..host_failures.len().min(5)]
    );
    eprintln!("{} exchanges in {:.1?}", 4 * N, started.elapsed());

    for (ns, before) in [Ns::Node, Ns::Pod].into_iter().zip(before) {
        let counted = invalid_counted(&lab, ns);
        assert!(counted.values().all(|&n| n == 0), "{ns:?}: packets counted INVALID: {counted:?}");
        let after = ct_stats(&lab, ns);
        for stat in STATS {
            assert_eq!(
                after[stat], before[stat],
                "{ns:?}: conntrack statistic {stat} changed: {before:?} -> {after:?}"
            );
        }
        let entries = entries(&lab, ns);
        let half = half_flows(ns, &entries);
        assert!(
            half.is_empty(),
            "{ns:?}: {} half-flows of {} entries, e.g. {:#?}",
            half.len(),
            entries.len(),
            &half[..half.len().min(5)]
        );
        // Pod: N TCP and N UDP flows of its own; node: the pod's, forwarded, plus the host's.
        // Every TCP connection has its own entry; a UDP source port the kernel happened to
        // pick twice shares one.
        let sources = if ns == Ns::Pod { 1 } else { 2 };
        let tcp = entries.iter().filter(|e| e.starts_with("tcp")).count();
        let udp = entries.iter().filter(|e| e.starts_with("udp")).count();
        assert_eq!(tcp, sources * N, "{ns:?}: TCP conntrack entries for port 8080");
        assert!(
            udp <= sources * N && udp >= sources * N * 95 / 100,
            "{ns:?}: {udp} UDP conntrack entries for port 8080"
        );
        eprintln!("{ns:?}: {tcp} TCP and {udp} UDP entries, none INVALID or half, statistics unchanged: {after:?}");
    }
    // The rules do count: a TCP segment with SYN and FIN from the pod is INVALID to conntrack,
    // in the pod and, rewritten, in the node.
    inject_syn_fin(&lab);
    for (ns, chain) in [(Ns::Pod, "iptables/OUTPUT"), (Ns::Node, "iptables/PREROUTING")] {
        let counted = invalid_counted(&lab, ns);
        assert_eq!(counted[chain], 1, "{ns:?}: the SYN|FIN segment must be counted INVALID: {counted:?}");
    }

    let state = scratch.inspect();
    let counter = |name: &str| {
        state["counters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .map_or(0, |c| c["packets"].as_u64().unwrap())
    };
    assert!(counter("rewrite_ingress_v4") + counter("rewrite_ingress_v6") >= 2 * N as u64);
    assert!(counter("sock_connect_v4") + counter("sock_connect_v6") >= N as u64);
    assert_eq!(counter("flow_lost"), 0);
}

/// Sends one TCP segment with SYN and FIN set from the pod to EXT:8080 (raw socket).
fn inject_syn_fin(lab: &Lab) {
    let spec = common::frames::Spec::tcp(&lab::POD_V4.to_string(), 40999, &lab::EXTERNAL_V4.to_string(), 8080);
    let mut seg = common::frames::l4(&spec);
    // Flags PSH|ACK (0x18) -> SYN|FIN (0x03); checksum updated (RFC 1624).
    let (old, new) = (u16::from_be_bytes([seg[12], seg[13]]), u16::from_be_bytes([seg[12], 0x03]));
    seg[13] = 0x03;
    let sum = u32::from(!u16::from_be_bytes([seg[16], seg[17]])) + u32::from(!old) + u32::from(new);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    seg[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    lab::in_netns(lab.netns_path(Ns::Pod), move || {
        // SAFETY: a raw socket owned here, closed below; sendto with a valid sockaddr_in.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let mut to: libc::sockaddr_in = std::mem::zeroed();
            to.sin_family = libc::AF_INET as u16;
            to.sin_addr.s_addr = u32::from_ne_bytes(lab::EXTERNAL_V4.octets());
            let n = libc::sendto(
                fd,
                seg.as_ptr().cast(),
                seg.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(n, seg.len() as isize, "sendto: {err}");
        }
        Ok(())
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
}
