//! An idle TCP connection to an external address survives a flood of short UDP flows to the
//! same Service, with real traffic: the pod holds a connection to `EXT:8090` that carries
//! nothing, then sends one datagram from each of 64,512 source ports to five UDP ports of the
//! Service (322,560 flows: more than the TCP flow map holds, five times the datagram map), then
//! the server writes on the idle connection. The node does not track the flood (a `notrack`
//! rule in its namespace), so it does not fill the machine's conntrack table. TCP and datagram flows live in separate LRU maps, so the flood evicts
//! only datagram flows: the write arrives from the external address and `flow_lost` stays 0.
//! (With one shared map the connection's entry was evicted, the write reached the pod from the
//! cluster IP and the pod's TCP answered it with a reset.) At the end the pod resets the
//! connection and its flow is forgotten at once. Needs root.
mod common;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::mpsc,
    time::Duration,
};

use common::{
    agent::{Agent, Scratch, lab_agent_args, wait_for, write},
    kube::counter,
};
use lab::{Lab, Ns, in_netns};
use node_manager_common::{FLOWS_DGRAM_MAX, FLOWS_MAX};
use serde_json::json;

const PUSH_PORT: u16 = 8090;
const UDP_PORTS: [u16; 5] = [8091, 8092, 8093, 8094, 8095];
/// The lab node's rule that keeps the flood out of conntrack (removed with the namespace).
const NOTRACK: &str = "table inet nm_test_notrack {
    chain pre { type filter hook prerouting priority raw; udp dport 8091-8095 notrack; }
}";

#[test]
fn an_idle_tcp_connection_keeps_its_flow_through_a_flood_of_udp_flows() {
    let lab = Lab::new().unwrap();
    lab.add_service_port(PUSH_PORT).unwrap();
    let mut nft = lab.command(Ns::Node, "nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().unwrap();
    nft.stdin.take().unwrap().write_all(NOTRACK.as_bytes()).unwrap();
    assert!(nft.wait().unwrap().success(), "nft: the notrack rule");
    // The endpoint: accepts one connection and writes on it when told to.
    let listener =
        in_netns(lab.netns_path(Ns::Ep), || Ok(TcpListener::bind(SocketAddr::from((lab::ENDPOINT_V4, PUSH_PORT)))?))
            .unwrap();
    let (push, pushed) = mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        if pushed.recv_timeout(Duration::from_secs(120)).is_ok() {
            conn.write_all(b"push").unwrap();
        }
        // Held until the client resets it.
        let _ = conn.read(&mut [0u8; 16]);
    });

    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.json");
    let mut ports = vec![json!({"name": "push", "port": PUSH_PORT, "protocol": "TCP"})];
    ports.extend(UDP_PORTS.iter().map(|port| json!({"name": format!("udp-{port}"), "port": port, "protocol": "UDP"})));
    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "lab", "name": "push"},
        "spec": {"type": "LoadBalancer", "clusterIP": lab::CLUSTER_V4.to_string(), "ports": ports},
        "status": {"loadBalancer": {"ingress": [{"ip": lab::EXTERNAL_V4.to_string()}]}},
    });
    write(&services, &service.to_string());
    let agent = Agent::start(&scratch, &lab_agent_args(services.to_str().unwrap()));
    wait_for("the frontends and the pod interface", Duration::from_secs(20), || {
        let state = scratch.try_inspect().unwrap_or_default();
        state["frontends"].as_array().is_some_and(|f| f.len() > UDP_PORTS.len())
            && state["interfaces"].as_array().is_some_and(|i| !i.is_empty())
    });

    let external = SocketAddr::from((lab::EXTERNAL_V4, PUSH_PORT));
    let mut conn =
        in_netns(lab.netns_path(Ns::Pod), || Ok(TcpStream::connect_timeout(&external, Duration::from_secs(5))?))
            .unwrap_or_else(|e| panic!("connect to {external}: {e:#}\n{}", agent.log()));
    assert_eq!(conn.peer_addr().unwrap(), external);
    let before = scratch.inspect();
    assert_eq!(before["flows"], 1, "the connection's flow: {before}");

    // The flood: short UDP flows, one datagram per (source port, Service port).
    let sent = in_netns(lab.netns_path(Ns::Pod), || {
        let mut sent = 0u32;
        for port in 1024..=u16::MAX {
            let Ok(socket) = UdpSocket::bind(SocketAddr::from((lab::POD_V4, port))) else { continue };
            for to in UDP_PORTS {
                // Two datagrams: the second finds the flow, which marks it used, as a reply
                // would (the kernel's LRU evicts entries never used after their insert first).
                socket.send_to(b"x", SocketAddr::from((lab::EXTERNAL_V4, to)))?;
                socket.send_to(b"y", SocketAddr::from((lab::EXTERNAL_V4, to)))?;
                sent += 1;
            }
        }
        Ok(sent)
    })
    .unwrap();
    assert!(u64::from(sent) > u64::from(FLOWS_MAX), "only {sent} datagram flows sent");
    let flooded = scratch.inspect();
    let datagram_flows = flooded["datagram_flows"].as_u64().unwrap();
    assert!(
        datagram_flows > u64::from(FLOWS_DGRAM_MAX) / 2 && datagram_flows <= u64::from(FLOWS_DGRAM_MAX),
        "{sent} UDP flows sent: the datagram map holds {datagram_flows} (capacity {FLOWS_DGRAM_MAX})"
    );
    assert!(counter(&flooded, "rewrite_ingress_v4") >= 2 * u64::from(sent), "every datagram was rewritten");
    assert_eq!(flooded["flows"], 1, "the TCP flow map still holds the idle connection: {flooded}");

    // The server writes on the idle connection: translated, so the pod's socket gets it.
    push.send(()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = [0u8; 4];
    conn.read_exact(&mut got).unwrap_or_else(|e| panic!("the push on the idle connection: {e}\n{}", agent.log()));
    assert_eq!(&got, b"push");
    assert_eq!(counter(&scratch.inspect(), "flow_lost"), 0, "no flow was lost");

    // A reset ends the flow at once (SO_LINGER 0: close sends RST).
    let fd = std::os::fd::AsRawFd::as_raw_fd(&conn);
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on the open socket with a correctly sized value.
    let set = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(set, 0);
    drop(conn);
    wait_for("the reset connection's flow to be forgotten", Duration::from_secs(5), || {
        scratch.try_inspect().is_ok_and(|s| s["flows"] == 0)
    });
    server.join().unwrap();
    drop(agent);
}
