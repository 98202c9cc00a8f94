//! ICMP errors about rewritten flows, with real traffic.
//!
//! TCP over a hop with a smaller MTU, through the rewrite. The node's uplink
//! towards the endpoint has MTU 1,280 while the pod and the endpoint keep 1,500, so neither
//! end's MSS tells of the bottleneck and only path MTU discovery can: the node answers the
//! pod's full-sized segments with ICMP fragmentation needed (IPv4) or packet too big (IPv6),
//! which conntrack hands on quoting pod → cluster IP. Translated to quote the external address,
//! they reach the pod's socket (connected to it), TCP lowers its segment size and the 1 MiB
//! arrives. Before ICMP errors were translated the pod retransmitted full-sized segments until
//! the deadline (`tcp_mtu_probing` is 0 in the pod, the kernel's default). The endpoint's
//! answer is short: its own 1,500-byte segments would not fit the node's uplink either, and the
//! veth drops them silently.
//!
//! A UDP datagram to a Service port nothing listens on: the endpoint answers port unreachable,
//! which conntrack hands on from the cluster IP quoting pod → cluster IP. Translated, the pod's
//! connected socket reports "connection refused" (before: nothing, until its timeout). Needs
//! root.
mod common;

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener},
    time::Duration,
};

use common::{
    agent::{Agent, Scratch, lab_agent_args, wait_for, write},
    kube::counter,
};
use lab::{Lab, Ns, in_netns};
use serde_json::json;

const PAYLOAD: usize = 1 << 20;
const PORT: u16 = 8097;
/// A Service port (TCP and UDP) with nothing listening on the endpoint.
const CLOSED_PORT: u16 = 8098;
/// The node's uplink MTU: the IPv6 minimum, under the pod's and the endpoint's 1,500.
const UPLINK_MTU: &str = "1280";

/// A server on the endpoint (both families) that reads until the client half-closes and
/// answers with how many bytes it got and their sum, once per family.
fn counting_server(lab: &Lab) -> Vec<std::thread::JoinHandle<()>> {
    let listeners = in_netns(lab.netns_path(Ns::Ep), || {
        Ok([
            TcpListener::bind(SocketAddr::from((lab::ENDPOINT_V4, PORT)))?,
            TcpListener::bind(SocketAddr::from((lab::ENDPOINT_V6, PORT)))?,
        ])
    })
    .unwrap();
    listeners
        .into_iter()
        .map(|listener| {
            std::thread::spawn(move || {
                let Ok((mut conn, _)) = listener.accept() else { return };
                let mut data = Vec::new();
                if conn.read_to_end(&mut data).is_ok() {
                    let _ = conn.write_all(summary(&data).as_bytes());
                }
            })
        })
        .collect()
}

fn summary(data: &[u8]) -> String {
    format!("got {} bytes, sum {}", data.len(), data.iter().map(|&b| u64::from(b)).sum::<u64>())
}

fn ip(lab: &Lab, ns: Ns, args: &[&str]) {
    let status = lab.command(ns, "ip").args(args).status().unwrap();
    assert!(status.success(), "ip {args:?} in {}", lab.ns_name(ns));
}

/// The lab with a dual-stack LoadBalancer Service on [`PORT`] (TCP) and [`CLOSED_PORT`]
/// (UDP), and the agent serving it.
fn lab_with_agent() -> (Lab, Scratch, Agent) {
    let lab = Lab::new().unwrap();
    lab.add_service_port(PORT).unwrap();
    lab.add_service_port(CLOSED_PORT).unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.json");
    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "lab", "name": "upload"},
        "spec": {"type": "LoadBalancer", "clusterIP": lab::CLUSTER_V4.to_string(),
                 "clusterIPs": [lab::CLUSTER_V4.to_string(), lab::CLUSTER_V6.to_string()],
                 "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                 "ports": [{"name": "tcp", "port": PORT, "protocol": "TCP"},
                           {"name": "closed", "port": CLOSED_PORT, "protocol": "UDP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": lab::EXTERNAL_V4.to_string()}, {"ip": lab::EXTERNAL_V6.to_string()}]}},
    });
    write(&services, &service.to_string());
    let agent = Agent::start(&scratch, &lab_agent_args(services.to_str().unwrap()));
    wait_for("the frontends and the pod interface", Duration::from_secs(20), || {
        let state = scratch.try_inspect().unwrap_or_default();
        state["frontends"].as_array().is_some_and(|f| f.len() >= 4)
            && state["interfaces"].as_array().is_some_and(|i| !i.is_empty())
    });
    (lab, scratch, agent)
}

#[test]
fn tcp_through_a_smaller_mtu_hop_completes_by_translated_icmp_errors() {
    let (lab, scratch, agent) = lab_with_agent();
    ip(&lab, Ns::Node, &["link", "set", lab::NODE_UPLINK_IF, "mtu", UPLINK_MTU]);
    let probing = lab.command(Ns::Pod, "sysctl").args(["-n", "net.ipv4.tcp_mtu_probing"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&probing.stdout).trim(), "0", "the pod must not probe the MTU itself");
    let servers = counting_server(&lab);
    let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i % 251) as u8).collect();
    for external in [IpAddr::V4(lab::EXTERNAL_V4), IpAddr::V6(lab::EXTERNAL_V6)] {
        let before = counter(&scratch.inspect(), "icmp_error_translated");
        let to = SocketAddr::new(external, PORT);
        let reply = lab::tcp_request_in(lab.netns_path(Ns::Pod), to, &payload, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("1 MiB to {to} over a {UPLINK_MTU}-byte hop: {e:#}\n{}", agent.log()));
        assert_eq!(reply.peer, to, "the pod's socket is connected to the external address");
        assert_eq!(String::from_utf8_lossy(&reply.data), summary(&payload), "{to}: everything arrived");
        let translated = counter(&scratch.inspect(), "icmp_error_translated") - before;
        assert!(translated > 0, "{to}: the transfer completed without a translated ICMP error");
        eprintln!("{to}: {translated} ICMP errors translated");
    }
    drop(agent);
    for server in servers {
        server.join().unwrap();
    }
}

#[test]
fn port_unreachable_from_the_service_side_reaches_the_pods_connected_udp_socket() {
    let (lab, scratch, agent) = lab_with_agent();
    for external in [IpAddr::V4(lab::EXTERNAL_V4), IpAddr::V6(lab::EXTERNAL_V6)] {
        let before = counter(&scratch.inspect(), "icmp_error_translated");
        let to = SocketAddr::new(external, CLOSED_PORT);
        let error = lab
            .udp_request(Ns::Pod, to, b"anyone?", Duration::from_secs(3), true)
            .expect_err("nothing listens on the closed port");
        let io = error.root_cause().downcast_ref::<std::io::Error>().map(std::io::Error::kind);
        assert_eq!(io, Some(std::io::ErrorKind::ConnectionRefused), "{to}: {error:#}\n{}", agent.log());
        let translated = counter(&scratch.inspect(), "icmp_error_translated") - before;
        assert_eq!(translated, 1, "{to}: the port unreachable translated");
    }
    drop(agent);
}
