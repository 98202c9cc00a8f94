//! A rewritten flow lives as long as the node's conntrack tracks its connection, with real
//! traffic through the lab's kube-proxy stand-in and the node's real conntrack. The node's
//! namespace gets 1-second conntrack timeouts for TIME_WAIT and UDP, so connections end
//! quickly. The pod holds one idle TCP connection per family to `EXT:8090` and makes a closed
//! TCP exchange and a UDP exchange per family to `EXT:8080`.
//!
//! With the sweep off (`--flow-sweep-period off`), the closed flows stay in the maps after
//! conntrack has forgotten them: only LRU eviction would end them (the behaviour before the
//! sweep). An agent with `--flow-sweep-period 1s` then adopts the maps and forgets them; the
//! idle connections keep their flows, and the server's writes on them arrive from the external
//! address (`flow_lost` 0); new short flows go the same way; the metric counts what was swept.
//! Needs root.
mod common;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    time::Duration,
};

use common::{
    agent::{Agent, Scratch, http_get, metrics_addr, wait_for, write},
    kube::counter,
};
use lab::{Lab, Ns, in_netns};
use serde_json::json;

const PUSH_PORT: u16 = 8090;
/// Conntrack timeouts of the node's namespace (removed with it): seconds, not minutes.
const SHORT_TIMEOUTS: [&str; 3] = [
    "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1",
    "net.netfilter.nf_conntrack_udp_timeout=1",
    "net.netfilter.nf_conntrack_udp_timeout_stream=1",
];

fn flows(scratch: &Scratch) -> (u64, u64) {
    let state = scratch.inspect();
    (state["flows"].as_u64().unwrap(), state["datagram_flows"].as_u64().unwrap())
}

/// Conntrack entries of the node towards the lab's cluster IPs on the Service's port.
fn tracked_to_service_port(lab: &Lab) -> usize {
    let mut n = 0;
    for family in ["ipv4", "ipv6"] {
        let out = lab
            .command(Ns::Node, "conntrack")
            .args(["-L", "-f", family, "--dport", &lab::SERVICE_PORT.to_string()])
            .output()
            .unwrap();
        n += String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("dport=")).count();
    }
    n
}

/// One closed TCP exchange and one UDP exchange per family, pod → `EXT:8080`.
fn short_flows(lab: &Lab) {
    for ext in [IpAddr::from(lab::EXTERNAL_V4), IpAddr::from(lab::EXTERNAL_V6)] {
        let to = SocketAddr::new(ext, lab::SERVICE_PORT);
        let tcp = lab.tcp_request(Ns::Pod, to, b"hello", Duration::from_secs(5)).unwrap();
        assert_eq!(tcp.data, b"echo:hello", "TCP echo from {to}");
        let udp = lab.udp_request(Ns::Pod, to, b"hello", Duration::from_secs(5), false).unwrap();
        assert_eq!(udp.from, to, "the UDP reply comes from the external address");
    }
}

#[test]
fn flows_end_with_their_conntrack_entries_and_idle_connections_keep_theirs() {
    let lab = Lab::new().unwrap();
    lab.add_service_port(PUSH_PORT).unwrap();
    let set = lab.command(Ns::Node, "sysctl").arg("-qw").args(SHORT_TIMEOUTS).output().unwrap();
    assert!(set.status.success(), "sysctl in the node namespace: {}", String::from_utf8_lossy(&set.stderr));

    // The endpoint's push server: accepts one connection per family, writes on each when told.
    let (push, pushed) = mpsc::channel::<()>();
    let (push6, pushed6) = mpsc::channel::<()>();
    let mut servers = Vec::new();
    for (addr, pushed) in [(IpAddr::from(lab::ENDPOINT_V4), pushed), (IpAddr::from(lab::ENDPOINT_V6), pushed6)] {
        let listener =
            in_netns(lab.netns_path(Ns::Ep), || Ok(TcpListener::bind(SocketAddr::new(addr, PUSH_PORT))?)).unwrap();
        servers.push(std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            if pushed.recv_timeout(Duration::from_secs(120)).is_ok() {
                conn.write_all(b"push").unwrap();
            }
            let _ = conn.read(&mut [0u8; 16]);
        }));
    }

    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.json");
    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "lab", "name": "push"},
        "spec": {"type": "LoadBalancer", "clusterIP": lab::CLUSTER_V4.to_string(),
                 "clusterIPs": [lab::CLUSTER_V4.to_string(), lab::CLUSTER_V6.to_string()],
                 "ipFamilies": ["IPv4", "IPv6"],
                 "ports": [{"name": "push", "port": PUSH_PORT, "protocol": "TCP"},
                           {"name": "tcp", "port": lab::SERVICE_PORT, "protocol": "TCP"},
                           {"name": "udp", "port": lab::SERVICE_PORT, "protocol": "UDP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": lab::EXTERNAL_V4.to_string()}, {"ip": lab::EXTERNAL_V6.to_string()}]}},
    });
    write(&services, &service.to_string());
    let args = |sweep: &'static str| {
        let mut args = common::agent::lab_agent_args(services.to_str().unwrap());
        args.extend(["--flow-sweep-period", sweep, "--metrics-addr", "127.0.0.1:0"]);
        args
    };
    let agent = Agent::start(&scratch, &args("off"));
    wait_for("the frontends and the pod interface", Duration::from_secs(20), || {
        let state = scratch.try_inspect().unwrap_or_default();
        state["frontends"].as_array().is_some_and(|f| f.len() >= 6)
            && state["interfaces"].as_array().is_some_and(|i| !i.is_empty())
    });

    // The idle connections, one per family.
    let mut idle: Vec<TcpStream> = [IpAddr::from(lab::EXTERNAL_V4), IpAddr::from(lab::EXTERNAL_V6)]
        .into_iter()
        .map(|ext| {
            let to = SocketAddr::new(ext, PUSH_PORT);
            let conn =
                in_netns(lab.netns_path(Ns::Pod), || Ok(TcpStream::connect_timeout(&to, Duration::from_secs(5))?))
                    .unwrap_or_else(|e| panic!("connect to {to}: {e:#}\n{}", agent.log()));
            assert_eq!(conn.peer_addr().unwrap(), to);
            conn
        })
        .collect();
    short_flows(&lab);
    assert_eq!(flows(&scratch), (4, 2), "two idle and two closed TCP flows, two UDP flows");

    // Sweep off: conntrack forgets the closed connections, the maps do not.
    wait_for("conntrack to forget the short flows", Duration::from_secs(20), || tracked_to_service_port(&lab) == 0);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(flows(&scratch), (4, 2), "without the sweep only LRU eviction ends a flow");
    assert!(agent.stop(), "the agent stops cleanly");

    // An agent with the sweep adopts the maps and forgets the flows conntrack no longer has.
    let agent = Agent::start(&scratch, &args("1s"));
    wait_for("the sweep to forget the closed flows", Duration::from_secs(15), || flows(&scratch) == (2, 0));
    // New short flows go the same way once conntrack forgets them.
    short_flows(&lab);
    assert_eq!(flows(&scratch), (4, 2), "the new flows are remembered while they live");
    wait_for("the sweep to forget the new flows", Duration::from_secs(20), || flows(&scratch) == (2, 0));

    // The idle connections kept their flows: the server's writes arrive from the external address.
    push.send(()).unwrap();
    push6.send(()).unwrap();
    for conn in &mut idle {
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 4];
        conn.read_exact(&mut got).unwrap_or_else(|e| panic!("the push on the idle connection: {e}\n{}", agent.log()));
        assert_eq!(&got, b"push");
    }
    let state = scratch.inspect();
    assert_eq!(counter(&state, "flow_lost"), 0, "no flow of an open connection was lost");
    let metrics = metrics_addr(&agent.log()).expect("the metrics address in the log");
    let (_, body) = in_netns(lab.netns_path(Ns::Node), || Ok(http_get(metrics, "/metrics"))).unwrap().unwrap();
    let swept: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("node_manager_flows_swept_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("node_manager_flows_swept_total in the metrics:\n{body}"));
    assert_eq!(swept, 8, "four closed flows adopted and four new ones were swept");
    drop(idle);
    for server in servers {
        server.join().unwrap();
    }
    drop(agent);
}
