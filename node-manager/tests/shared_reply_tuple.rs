//! Two frontend addresses of one Service (its LoadBalancer IP and an external IP, same port)
//! lead to the same cluster IP:port, so once rewritten, a pod socket's requests to both are one
//! 5-tuple: one flow entry in node-manager's map and one conntrack entry for kube-proxy's
//! DNAT. Their replies are indistinguishable on the wire; only a source-port change (a NAT
//! that allocates ports, which node-manager does not do) could tell them apart. This test
//! shows the limit the docs state (docs/architecture.md, "Limits"): one unconnected UDP socket
//! with requests to both addresses in flight gets both replies from the address it sent to
//! last; a socket per destination (connected, or simply another source port) gets each reply
//! from its own address. Needs root.
mod common;

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::agent::{Agent, Scratch, lab_agent_args, wait_for, write};
use lab::{Lab, Ns, in_netns};
use serde_json::json;

/// The Service's UDP port, answered by a server that waits before it replies, so that both
/// requests are on their way before either reply comes back.
const PORT: u16 = 8081;
const REPLY_AFTER: Duration = Duration::from_millis(300);
/// The Service's second frontend address: an external IP beside its LoadBalancer IP.
const SECOND: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);

/// A UDP server on the endpoint that answers each datagram `echo:<data>` after `REPLY_AFTER`.
fn slow_echo(lab: &Lab, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let socket =
        in_netns(lab.netns_path(Ns::Ep), || Ok(UdpSocket::bind(SocketAddr::from((lab::ENDPOINT_V4, PORT)))?)).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = socket.recv_from(&mut buf) else { continue };
            let reply = [b"echo:".as_slice(), &buf[..n]].concat();
            let socket = socket.try_clone().unwrap();
            std::thread::spawn(move || {
                std::thread::sleep(REPLY_AFTER);
                let _ = socket.send_to(&reply, from);
            });
        }
    })
}

/// Sends `a` to the LB IP and `b` to the external IP from one socket each (`shared`: the same
/// socket for both), then reads the two replies: (reply text, the address it came from).
fn both_in_flight(lab: &Lab, shared: bool) -> Vec<(String, SocketAddr)> {
    in_netns(lab.netns_path(Ns::Pod), || {
        let lb = SocketAddr::from((lab::EXTERNAL_V4, PORT));
        let second = SocketAddr::from((SECOND, PORT));
        let first = UdpSocket::bind("0.0.0.0:0")?;
        let other = if shared { first.try_clone()? } else { UdpSocket::bind("0.0.0.0:0")? };
        first.send_to(b"a", lb)?;
        other.send_to(b"b", second)?;
        let mut out = Vec::new();
        for socket in if shared { vec![&first, &first] } else { vec![&first, &other] } {
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut buf = [0u8; 64];
            let (n, from) = socket.recv_from(&mut buf)?;
            out.push((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
        }
        out.sort();
        Ok(out)
    })
    .unwrap()
}

#[test]
fn two_frontends_of_one_service_share_the_reply_tuple_of_one_socket() {
    let lab = Lab::new().unwrap();
    lab.add_service_port(PORT).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let server = slow_echo(&lab, stop.clone());
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.json");
    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "lab", "name": "dns"},
        "spec": {"type": "LoadBalancer", "clusterIP": lab::CLUSTER_V4.to_string(), "externalIPs": [SECOND.to_string()],
                 "ports": [{"name": "udp", "port": PORT, "protocol": "UDP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": lab::EXTERNAL_V4.to_string()}]}},
    });
    write(&services, &service.to_string());
    let agent = Agent::start(&scratch, &lab_agent_args(services.to_str().unwrap()));
    wait_for("both frontends and the pod interface", Duration::from_secs(20), || {
        let state = scratch.try_inspect().unwrap_or_default();
        let frontends: Vec<String> = state["frontends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["frontend"].as_str().map(str::to_owned))
            .collect();
        frontends.contains(&format!("{}:{PORT}/UDP", lab::EXTERNAL_V4))
            && frontends.contains(&format!("{SECOND}:{PORT}/UDP"))
            && state["interfaces"].as_array().is_some_and(|i| !i.is_empty())
    });
    let lb = SocketAddr::from((lab::EXTERNAL_V4, PORT));
    let second = SocketAddr::from((SECOND, PORT));

    // One socket per destination: separate tuples, each reply from the address it asked.
    let separate = both_in_flight(&lab, false);
    assert_eq!(separate, [("echo:a".to_owned(), lb), ("echo:b".to_owned(), second)], "{}", agent.log());

    // One socket, both requests in flight: one tuple after the rewrite; the flow entry holds the
    // address sent to last, so both replies come from it. The documented limit.
    let flushed = lab.command(Ns::Node, "conntrack").arg("-F").output().unwrap();
    assert!(flushed.status.success(), "conntrack -F: {}", String::from_utf8_lossy(&flushed.stderr));
    let shared = both_in_flight(&lab, true);
    assert_eq!(shared, [("echo:a".to_owned(), second), ("echo:b".to_owned(), second)], "{}", agent.log());
    // conntrack agrees: the two requests to two addresses were one entry (one tuple to the
    // cluster IP, DNATed by the lab's kube-proxy stand-in).
    let ct =
        lab.command(Ns::Node, "conntrack").args(["-L", "-p", "udp", "--dport", &PORT.to_string()]).output().unwrap();
    let entries = String::from_utf8_lossy(&ct.stdout);
    assert_eq!(
        entries.lines().filter(|l| l.contains(&format!("dst={}", lab::CLUSTER_V4))).count(),
        1,
        "one conntrack entry for the socket, not one per frontend address:\n{entries}"
    );
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    drop(agent);
}
