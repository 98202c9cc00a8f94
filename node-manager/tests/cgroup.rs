//! Host-network clients end to end: the cgroup v2 socket hooks, with real traffic in the lab.
//!
//! Client processes run in the lab's node namespace. The ones that should be served are placed
//! in a test cgroup created for the test (never the machine's root cgroup), which the agent is
//! given as `--cgroup-path`; processes outside it, this test process included, must be
//! untouched. A client is this test binary re-executed to run only [`sock_client`], which
//! moves itself into the cgroup, enters the namespace, does one request and prints the result
//! as JSON. Needs root.
mod common;

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use common::agent::{Agent, Scratch, TestCgroup, lab_service_yaml, wait_for, write};
use lab::{Lab, Ns};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(2);
/// The lab node's uplink address (IPv6), what a masqueraded IPv6 connection comes from.
const NODE_UPLINK_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
const CLIENT_ENV: &str = "NM_TEST_SOCK_CLIENT";
const RESULT_PREFIX: &str = "NM_TEST_RESULT ";

/// What a client is asked to do: `tcp`, `udp` (unconnected sendto/recvfrom) or `udp-connected`;
/// or `UdpConnectedThroughChurn`: a connected UDP socket's request, then [`CHURN`] UDP sockets
/// each connected, asked for their peer and closed, then the first socket's second request.
#[derive(Clone, Copy, Debug)]
enum Req {
    Tcp,
    Udp,
    UdpConnected,
    UdpConnectedThroughChurn,
}

/// Three times as many sockets as NM_SOCK_REV holds. Measured without the release hook: with
/// 4,096 more than it holds the long-lived socket's entry survived (the LRU spares entries used
/// after their insert for a while), with three times as many it was gone.
const CHURN: usize = 3 * node_manager_common::SOCK_REV_MAX as usize;

/// Runs one client request in the node namespace, inside `cgroup` (or outside any test cgroup
/// when `None`). Ok: (reply data, the peer the client saw: getpeername for TCP, the reply's
/// source for UDP); Err: the client's error.
fn client(lab: &Lab, cgroup: Option<&TestCgroup>, req: Req, to: SocketAddr) -> Result<(String, SocketAddr), String> {
    client_in(lab, Ns::Node, cgroup.map(|c| c.path.as_path()), req, to)
}

/// [`client`] in namespace `ns` (the node's, or a pod's) and the cgroup at `cgroup`.
fn client_in(
    lab: &Lab,
    ns: Ns,
    cgroup: Option<&Path>,
    req: Req,
    to: SocketAddr,
) -> Result<(String, SocketAddr), String> {
    let request = json!({
        "req": format!("{req:?}"),
        "to": to.to_string(),
        "netns": lab.netns_path(ns),
        "cgroup": cgroup,
    });
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "sock_client", "--nocapture", "--test-threads=1"])
        .env(CLIENT_ENV, request.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.split_once(RESULT_PREFIX).map(|(_, r)| r)).unwrap_or_else(|| {
        panic!("client printed no result ({}):\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr))
    });
    let v: Value = serde_json::from_str(line).unwrap();
    match v["error"].as_str() {
        Some(e) => Err(e.to_owned()),
        None => Ok((v["data"].as_str().unwrap().to_owned(), v["peer"].as_str().unwrap().parse().unwrap())),
    }
}

/// The client side, run in a re-executed test binary (a no-op in a normal test run).
#[test]
fn sock_client() {
    let Ok(request) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let r: Value = serde_json::from_str(&request).unwrap();
    if let Some(cgroup) = r["cgroup"].as_str() {
        // Before any socket exists: a socket belongs to the cgroup its creator was in.
        fs::write(Path::new(cgroup).join("cgroup.procs"), std::process::id().to_string()).unwrap();
    }
    let netns = PathBuf::from(r["netns"].as_str().unwrap());
    let to: SocketAddr = r["to"].as_str().unwrap().parse().unwrap();
    let result = match r["req"].as_str().unwrap() {
        "Tcp" => lab::tcp_request_in(&netns, to, b"x", T).map(|r| (r.data, r.peer)),
        "Udp" => lab::udp_request_in(&netns, to, b"x", T, false).map(|r| (r.data, r.from)),
        "UdpConnectedThroughChurn" => lab::in_netns(&netns, || through_churn(to)),
        _ => lab::udp_request_in(&netns, to, b"x", T, true).map(|r| (r.data, r.from)),
    };
    let out = match result {
        Ok((data, peer)) => json!({"data": String::from_utf8_lossy(&data), "peer": peer.to_string()}),
        Err(e) => json!({"error": format!("{e:#}")}),
    };
    println!("{RESULT_PREFIX}{out}");
}

/// [`Req::UdpConnectedThroughChurn`], in the client's namespace: the long-lived socket's second
/// reply, with `" churned <n>, <m> from <to>"` appended (how many churn sockets there were and
/// how many of them saw `to` as their peer).
fn through_churn(to: SocketAddr) -> anyhow::Result<(Vec<u8>, SocketAddr)> {
    use std::net::UdpSocket;
    let any: SocketAddr = if to.is_ipv4() { sa(Ipv4Addr::UNSPECIFIED, 0) } else { sa(Ipv6Addr::UNSPECIFIED, 0) };
    let request = |socket: &UdpSocket| -> anyhow::Result<(Vec<u8>, SocketAddr)> {
        socket.set_read_timeout(Some(T))?;
        socket.send(b"x")?;
        let mut buf = [0u8; 64];
        let (n, from) = socket.recv_from(&mut buf)?;
        Ok((buf[..n].to_vec(), from))
    };
    let long_lived = UdpSocket::bind(any)?;
    long_lived.connect(to)?;
    let (_, first) = request(&long_lived)?;
    anyhow::ensure!(first == to, "the long-lived socket's first reply came from {first}");
    let mut from_to = 0;
    for _ in 0..CHURN {
        let socket = UdpSocket::bind(any)?;
        socket.connect(to)?;
        // The getpeername hook reads the entry: it is used after its insert, as a live socket's
        // is (an LRU entry never used again would be the first evicted anyway), and no packet
        // is sent (the guest on TCG runs this too).
        from_to += usize::from(socket.peer_addr()? == to);
    }
    let (mut data, from) = request(&long_lived)?;
    data.extend_from_slice(format!(" churned {CHURN}, {from_to} from {to}").as_bytes());
    Ok((data, from))
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn mapped(v4: Ipv4Addr) -> Ipv6Addr {
    v4.to_ipv6_mapped()
}

/// TCP and unconnected UDP (and connected UDP) to `to` work from inside the cgroup, and the
/// client sees `to` as its peer and as the reply's source.
fn assert_served(lab: &Lab, cg: &TestCgroup, to: SocketAddr, agent: Option<&Agent>) {
    for req in [Req::Tcp, Req::Udp, Req::UdpConnected] {
        match client(lab, Some(cg), req, to) {
            Ok((data, peer)) => {
                assert_eq!(data, "echo:x", "{req:?} to {to}");
                assert_eq!(peer, to, "{req:?} to {to}: the peer must read as the address dialled");
            }
            Err(e) => panic!(
                "{req:?} to {to} from the cgroup: {e}\nagent log:\n{}",
                agent.map(Agent::log).unwrap_or_default()
            ),
        }
    }
}

fn assert_fails(lab: &Lab, cg: Option<&TestCgroup>, to: SocketAddr, why: &str) {
    for req in [Req::Tcp, Req::Udp] {
        let r = client(lab, cg, req, to);
        assert!(r.is_err(), "{req:?} to {to} must fail ({why}): {r:?}");
    }
}

fn counter(state: &Value, name: &str) -> u64 {
    state["counters"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()["packets"].as_u64().unwrap()
}

/// Programs linked to the cgroup itself (not inherited): (attach type, program name), from
/// bpftool's link and program lists. (bpftool 7.1's `cgroup show` lists nothing on Linux 5.10.)
fn attached_to(cg: &TestCgroup) -> Vec<(String, String)> {
    let json = |args: &[&str]| -> Value {
        let out = Command::new("bpftool").args(args).output().unwrap();
        assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(Vec::new()))
    };
    let id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&cg.path).unwrap());
    let progs = json(&["-j", "prog", "show"]);
    let name = |prog_id: &Value| {
        progs.as_array().unwrap().iter().find(|p| p["id"] == *prog_id).and_then(|p| p["name"].as_str()).unwrap_or("?")
    };
    json(&["-j", "link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["type"] == "cgroup" && l["cgroup_id"].as_u64() == Some(id))
        .map(|l| (l["attach_type"].as_str().unwrap_or("?").to_owned(), name(&l["prog_id"]).to_owned()))
        .collect()
}

fn agent_args<'a>(services: &'a str, cg: &'a TestCgroup, external_cluster: &'a str) -> Vec<&'a str> {
    vec![
        "--services-file",
        services,
        "--external-cluster",
        external_cluster,
        "--cgroup-path",
        cg.path_str(),
        "--pod-cidr-ipv4",
        lab::POD_CIDR_V4,
        "--pod-cidr-ipv6",
        lab::POD_CIDR_V6,
    ]
}

fn hooks_ready(scratch: &Scratch) -> bool {
    let s = scratch.inspect();
    s["cgroup_hooks"].as_array().is_some_and(|h| h.len() == node_manager::kernel::cgroup::HOOKS.len())
        && s["frontends"].as_array().is_some_and(|f| f.len() == 6)
}

#[test]
fn host_processes_in_the_cgroup_reach_the_external_ip_and_see_it_as_their_peer() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let cg = &scratch.cgroup;
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    let services = services.to_str().unwrap().to_owned();
    let (ext4, ext6) = (sa(lab::EXTERNAL_V4, 8080), sa(lab::EXTERNAL_V6, 8080));

    // Without the agent: the external IP is local to the node with nothing behind it.
    assert_fails(&lab, Some(cg), ext4, "no agent");
    assert_fails(&lab, Some(cg), ext6, "no agent");

    let agent = Agent::start(&scratch, &agent_args(&services, cg, "true"));
    wait_for("the socket hooks and frontends", Duration::from_secs(15), || hooks_ready(&scratch));

    assert_served(&lab, cg, ext4, Some(&agent));
    assert_served(&lab, cg, ext6, Some(&agent));
    // A dual-stack IPv6 socket dialling the IPv4 external address as ::ffff:a.b.c.d.
    assert_served(&lab, cg, sa(mapped(lab::EXTERNAL_V4), 8080), Some(&agent));

    // Processes outside the cgroup, in the same namespace, are untouched (this test process
    // is one of them too).
    assert_fails(&lab, None, ext4, "outside the cgroup");
    assert_fails(&lab, None, ext6, "outside the cgroup");
    assert!(lab.tcp_request(Ns::Node, ext4, b"x", T).is_err(), "the test process is outside the cgroup");
    // Other ports and other destinations are untouched: no rewrite, and no reverse rewrite of
    // a peer that was dialled directly.
    assert_fails(&lab, Some(cg), sa(lab::EXTERNAL_V4, 8081), "port 8081 is no frontend");
    assert_fails(&lab, Some(cg), sa(lab::EXTERNAL_V6, 8081), "port 8081 is no frontend");
    for direct in [sa(lab::CLUSTER_V4, 8080), sa(lab::CLUSTER_V6, 8080), sa(lab::ENDPOINT_V4, 8080)] {
        for req in [Req::Tcp, Req::Udp] {
            let (data, peer) = client(&lab, Some(cg), req, direct).unwrap_or_else(|e| panic!("{req:?} {direct}: {e}"));
            assert_eq!((data.as_str(), peer), ("echo:x", direct), "{req:?} to {direct} is not rewritten");
        }
    }

    let state = scratch.inspect();
    for name in [
        "sock_connect_v4",
        "sock_connect_v6",
        "sock_sendmsg_v4",
        "sock_sendmsg_v6",
        "sock_recvmsg_v4",
        "sock_recvmsg_v6",
        "sock_getpeername_v4",
        "sock_getpeername_v6",
        "sock_pass_no_frontend",
        // The clients' connected sockets closed: their entries went with them.
        "sock_rev_released",
    ] {
        assert!(counter(&state, name) >= 1, "{name} must have counted: {state:#}");
    }
    // The pod path did not see any of it.
    assert_eq!(counter(&state, "rewrite_ingress_v4"), 0, "{state:#}");
    let hooks = state["cgroup_hooks"].as_array().unwrap();
    assert!(hooks.iter().all(|h| h["cgroup_path"] == cg.path_str()), "{state:#}");
    assert!(hooks.iter().any(|h| h["hook"] == "getpeername6" && h["attach_type"] == "cgroup_inet6_getpeername"));
    let link_ids: Vec<Value> = hooks.iter().map(|h| h["link_id"].clone()).collect();
    assert_eq!(attached_to(cg).len(), node_manager::kernel::cgroup::HOOKS.len(), "{:?}", attached_to(cg));

    // A restarted agent adopts the pinned links: same links, new programs, never two of ours.
    drop(agent); // SIGKILL
    assert_served(&lab, cg, ext4, None); // while no agent runs
    let second = Agent::start(&scratch, &agent_args(&services, cg, "true"));
    wait_for("the second agent's socket hooks", Duration::from_secs(15), || {
        second.log().contains("socket hooks attached")
    });
    let state = scratch.inspect();
    let hooks = state["cgroup_hooks"].as_array().unwrap();
    assert_eq!(hooks.iter().map(|h| h["link_id"].clone()).collect::<Vec<_>>(), link_ids, "links kept: {state:#}");
    let attached = attached_to(cg);
    assert_eq!(attached.len(), node_manager::kernel::cgroup::HOOKS.len(), "exactly one program per hook: {attached:?}");
    assert_served(&lab, cg, ext6, Some(&second));
    assert!(second.stop());

    // The cgroup path changes: the hooks move; the old cgroup keeps none of ours.
    let other = TestCgroup::new();
    let moved = Agent::start(&scratch, &agent_args(&services, &other, "true"));
    wait_for("the hooks to move", Duration::from_secs(15), || moved.log().contains("socket hooks attached"));
    assert_eq!(attached_to(cg), Vec::<(String, String)>::new(), "{}", moved.log());
    assert_eq!(attached_to(&other).len(), node_manager::kernel::cgroup::HOOKS.len());
    assert_fails(&lab, Some(cg), ext4, "the hooks moved to another cgroup");
    assert_served(&lab, &other, ext4, Some(&moved));
    assert!(moved.stop());
    // Cleanup with --cgroup-path pointing at the old one still finds the pinned links.

    // cleanup detaches the hooks too; a second run finds nothing.
    let out = scratch.cleanup();
    assert!(out.status.success(), "cleanup: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(attached_to(cg), Vec::<(String, String)>::new());
    assert_fails(&lab, Some(cg), ext4, "after cleanup");
    let again = scratch.cleanup();
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 link(s)"), "{}", String::from_utf8_lossy(&again.stdout));

    // external-cluster on, then off: the hooks come, then go.
    let on = Agent::start(&scratch, &agent_args(&services, cg, "true"));
    wait_for("hooks attached", Duration::from_secs(15), || hooks_ready(&scratch));
    assert!(on.stop());
    let off = Agent::start(&scratch, &agent_args(&services, cg, "false"));
    wait_for("hooks detached", Duration::from_secs(15), || off.log().contains("socket hooks detached"));
    assert_eq!(attached_to(cg), Vec::<(String, String)>::new());
    assert_fails(&lab, Some(cg), ext4, "external-cluster is off");
    assert!(off.stop());
}

#[test]
fn a_cgroup_path_that_is_missing_or_not_cgroup_v2_exits_2_naming_it() {
    let plain_dir = std::env::temp_dir();
    for (path, expect) in [
        (PathBuf::from("/nonexistent/nml-cgroup"), "/nonexistent/nml-cgroup cannot be used"),
        (plain_dir.clone(), "is not in a cgroup v2 hierarchy"),
    ] {
        let out = Command::new(common::agent::BIN)
            .args(["run", "--services-file", "/nonexistent", "--external-cluster", "true", "--cgroup-path"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {err}", path.display());
        assert!(err.contains(expect) && err.contains(path.to_str().unwrap()), "{err}");
        assert!(err.contains("CGROUP_PATH"), "says what to set: {err}");
    }
    // Through the environment too.
    let out = Command::new(common::agent::BIN)
        .args(["run", "--services-file", "/nonexistent"])
        .env("CGROUP_PATH", "/nonexistent/nml-cgroup")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A pod whose processes live below the hooked cgroup (on a node, every pod's do: the DaemonSet
/// hooks the cgroup root) is served at the socket, as Cilium's socket-LB serves it: its TCP,
/// connected-UDP and unconnected-UDP sockets reach the cluster IP directly, see the external
/// address as their peer, and the backend sees the pod's own address: the connection is a pod
/// → cluster IP connection, and kube-proxy's rules for those decide on masquerading (the lab's
/// masquerades only sources outside the pod CIDR). No masquerade mark can be set there: the
/// socket is in the pod's namespace and crossing the veth clears skb->mark. A pod process
/// outside the hooked cgroup is served on its interface instead, with `MASQUERADE_MARK`, and
/// the backend sees the node's address. docs/architecture.md ("Which path serves a client").
#[test]
fn a_pod_below_the_hooked_cgroup_is_served_at_the_socket_and_the_backend_sees_the_pod() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let cg = &scratch.cgroup;
    let pod_cgroup = cg.path.join("pod");
    fs::create_dir(&pod_cgroup).unwrap();
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    let agent = Agent::start(&scratch, &agent_args(services.to_str().unwrap(), cg, "true"));
    wait_for("the socket hooks, pod interface and frontends", Duration::from_secs(15), || {
        hooks_ready(&scratch) && scratch.inspect()["interfaces"].as_array().is_some_and(|i| !i.is_empty())
    });
    let ext4 = sa(lab::EXTERNAL_V4, 8080);
    let ext6 = sa(lab::EXTERNAL_V6, 8080);
    // (where the pod process runs, the source the backend must see, which counter moves)
    let cases = [
        (Some(pod_cgroup.as_path()), ext4, IpAddr::from(lab::POD_V4), "sock_connect_v4"),
        (Some(pod_cgroup.as_path()), ext6, IpAddr::from(lab::POD_V6), "sock_connect_v6"),
        (None, ext4, IpAddr::from(lab::NODE_UPLINK_V4), "rewrite_ingress_v4"),
        (None, ext6, IpAddr::from(NODE_UPLINK_V6), "rewrite_ingress_v6"),
    ];
    for (cgroup, to, backend_sees, path_counter) in cases {
        for req in [Req::Tcp, Req::UdpConnected, Req::Udp] {
            let what = format!(
                "{req:?} to {to} from the pod ({})",
                if cgroup.is_some() { "below the hooked cgroup" } else { "outside it" }
            );
            let before = (lab.endpoint_peers().len(), counter(&scratch.inspect(), path_counter));
            let (data, peer) =
                client_in(&lab, Ns::Pod, cgroup, req, to).unwrap_or_else(|e| panic!("{what}: {e}\n{}", agent.log()));
            assert_eq!(
                (data.as_str(), peer),
                ("echo:x", to),
                "{what}: served, and the peer reads as the address dialled"
            );
            let peers = lab.endpoint_peers();
            let seen: Vec<IpAddr> = peers[before.0.min(peers.len())..].iter().map(SocketAddr::ip).collect();
            assert!(
                !seen.is_empty() && seen.iter().all(|ip| *ip == backend_sees),
                "{what}: the backend saw {seen:?}, not {backend_sees}"
            );
            // UDP from an unconnected socket is rewritten at sendmsg, not connect.
            let moved = counter(&scratch.inspect(), path_counter) > before.1
                || (path_counter.starts_with("sock_") && matches!(req, Req::Udp));
            assert!(moved, "{what}: {path_counter} did not count");
        }
    }
    let state = scratch.inspect();
    assert!(counter(&state, "sock_sendmsg_v4") >= 1 && counter(&state, "sock_sendmsg_v6") >= 1, "{state:#}");
    drop(agent);
    fs::remove_dir(&pod_cgroup).unwrap();
}

/// Issue 17 (6): a connected UDP socket's reverse entry must survive more sockets opening and
/// closing than NM_SOCK_REV holds. Its later replies are read through recvmsg only (no send
/// with an address re-creates the entry), so once evicted it would show the cluster IP for
/// good. With the `sock_release` hook every closed socket's entry goes with it and the map never
/// fills; without it (measured by disabling the hook) the churn evicted the long-lived socket's
/// entry and its reply came from the cluster IP. IPv4 and IPv6.
#[test]
fn a_connected_udp_socket_keeps_its_peer_through_more_closed_sockets_than_the_map_holds() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let cg = &scratch.cgroup;
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    let agent = Agent::start(&scratch, &agent_args(services.to_str().unwrap(), cg, "true"));
    wait_for("the socket hooks and frontends", Duration::from_secs(15), || hooks_ready(&scratch));
    for to in [sa(lab::EXTERNAL_V4, 8080), sa(lab::EXTERNAL_V6, 8080)] {
        let before = counter(&scratch.inspect(), "sock_rev_released");
        let started = std::time::Instant::now();
        let (data, peer) = client(&lab, Some(cg), Req::UdpConnectedThroughChurn, to)
            .unwrap_or_else(|e| panic!("{to}: {e}\n{}", agent.log()));
        eprintln!("{to}: {CHURN} sockets churned in {:.1?}", started.elapsed());
        assert_eq!(data, format!("echo:x churned {CHURN}, {CHURN} from {to}"), "{to}");
        assert_eq!(peer, to, "{to}: the long-lived socket's reply must still read as coming from the address dialled");
        let released = counter(&scratch.inspect(), "sock_rev_released") - before;
        assert!(released > CHURN as u64, "{to}: only {released} entries released");
    }
    drop(agent);
}
