//! Load through the rewrite, in the lab: 1,000 TCP connections open at the same time from the
//! pod to the external IP (IPv4 and IPv6), and 1,000 UDP sockets open at the same time,
//! with the flow map filled to just below its documented capacity by other flows. Every
//! connection must carry its data and see the external IP as its peer, no flow may be evicted
//! (the map's pre-existing entries all stay), and `flow_lost` stays 0. `NM_LOAD_CONNS`
//! raises the number of connections. Needs root.
mod common;

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use common::{
    agent::{Agent, Scratch, lab_agent_args, lab_service_yaml, wait_for, write},
    capacity::{documented_capacity, online_cpus, pin_to_cpu},
};
use lab::{Lab, Ns};
use node_manager_common::{Flow, FlowKey, v4_mapped};

const T: Duration = Duration::from_secs(10);

fn conns() -> usize {
    std::env::var("NM_LOAD_CONNS").ok().filter(|s| !s.is_empty()).map_or(1000, |s| s.parse().expect("NM_LOAD_CONNS"))
}

fn ext(i: usize) -> SocketAddr {
    let ip: IpAddr = if i.is_multiple_of(2) { lab::EXTERNAL_V4.into() } else { lab::EXTERNAL_V6.into() };
    SocketAddr::new(ip, lab::SERVICE_PORT)
}

/// Key of the n-th filler flow: pods 192.0.2.64.. (inside the pod CIDR, no such pod), one per
/// 65,535 source ports, towards the cluster IP.
fn filler(n: u32) -> FlowKey {
    let port = 1 + (n % 65535) as u16;
    FlowKey {
        pod_addr: v4_mapped([192, 0, 2, 64 + (n / 65535) as u8]),
        remote_addr: v4_mapped(lab::CLUSTER_V4.octets()),
        pod_port: u16::from_ne_bytes(port.to_be_bytes()),
        remote_port: u16::from_ne_bytes(9999u16.to_be_bytes()),
        proto: 6,
        pad: [0; 3],
    }
}

fn flows_map(scratch: &Scratch) -> HashMap<MapData, FlowKey, Flow> {
    let pin = scratch.bpffs.join("node-manager/v1/maps/NM_FLOWS");
    let data = MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    HashMap::try_from(Map::LruHashMap(data)).unwrap()
}

/// 1,000 (n) TCP connections opened one after the other and all kept open, then each sends
/// its payload, then all half-close, then all replies are read. Returns the failures.
fn concurrent_tcp(netns: &std::path::Path, n: usize) -> Vec<String> {
    lab::in_netns(netns, || {
        let mut failures = Vec::new();
        let mut streams = Vec::with_capacity(n);
        for i in 0..n {
            match TcpStream::connect_timeout(&ext(i), T) {
                // The peer as the pod sees it, before the connection closes.
                Ok(s) => streams.push((i, s.peer_addr().ok(), s)),
                Err(e) => failures.push(format!("connect {i}: {e}")),
            }
        }
        for (i, _, s) in &mut streams {
            if let Err(e) = s.write_all(format!("c{i}").as_bytes()).and_then(|()| s.shutdown(Shutdown::Write)) {
                failures.push(format!("send {i}: {e}"));
            }
        }
        for (i, peer, mut s) in streams {
            let mut reply = Vec::new();
            s.set_read_timeout(Some(T))?;
            match s.read_to_end(&mut reply) {
                Ok(_) if reply == format!("echo:c{i}").as_bytes() && peer == Some(ext(i)) => {}
                Ok(_) => failures.push(format!("conn {i}: {:?} from {peer:?}", String::from_utf8_lossy(&reply))),
                Err(e) => failures.push(format!("receive {i}: {e}")),
            }
        }
        Ok(failures)
    })
    .unwrap()
}

/// n UDP sockets, all open (and their flows live) at the same time, each exchanging one
/// datagram; sent in waves of 50 so that the echo server's receive buffer (not the datapath)
/// never overflows.
fn concurrent_udp(netns: &std::path::Path, n: usize) -> Vec<String> {
    lab::in_netns(netns, || {
        let mut failures = Vec::new();
        let mut sockets = Vec::with_capacity(n);
        for i in 0..n {
            let any: SocketAddr = if i.is_multiple_of(2) { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
            let s = UdpSocket::bind(any)?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            sockets.push((i, s));
        }
        for wave in sockets.chunks(50) {
            for (i, s) in wave {
                s.send_to(format!("u{i}").as_bytes(), ext(*i))?;
            }
            for (i, s) in wave {
                let mut buf = [0u8; 64];
                match s.recv_from(&mut buf) {
                    Ok((len, from)) if buf[..len] == *format!("echo:u{i}").as_bytes() && from == ext(*i) => {}
                    Ok((len, from)) => {
                        failures.push(format!("udp {i}: {:?} from {from}", String::from_utf8_lossy(&buf[..len])))
                    }
                    Err(e) => failures.push(format!("udp {i}: {e}")),
                }
            }
        }
        Ok(failures)
    })
    .unwrap()
}

#[test]
fn a_thousand_concurrent_connections_through_the_rewrite_with_the_flow_map_near_capacity() {
    let n = conns();
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    // The filler flows are not connections, so conntrack does not track them: the flow sweep
    // (which would remove them once real, tracked flows exist) stays off here.
    let mut args = lab_agent_args(services.to_str().unwrap());
    args.extend(["--flow-sweep-period", "off"]);
    let agent = Agent::start(&scratch, &args);
    wait_for("the agent to attach and fill the maps", Duration::from_secs(15), || {
        scratch.try_inspect().is_ok_and(|s| {
            s["interfaces"].as_array().is_some_and(|i| !i.is_empty())
                && s["frontends"].as_array().is_some_and(|f| f.len() == 6)
        })
    });

    // Fill the flow map to the documented capacity minus the flows this test opens (and a
    // margin for the echo traffic of the readiness checks), from every CPU.
    let capacity = documented_capacity();
    let fill = capacity - 2 * n as u32 - 16;
    let mut flows = flows_map(&scratch);
    let cpus = online_cpus();
    let started = Instant::now();
    for i in 0..fill {
        if i.is_multiple_of(1000) {
            pin_to_cpu(cpus[(i / 1000) as usize % cpus.len()]);
        }
        flows.insert(filler(i), Flow { external_addr: v4_mapped(lab::EXTERNAL_V4.octets()) }, 0).unwrap();
    }
    eprintln!("flow map filled with {fill} flows in {:.1?} (documented capacity {capacity})", started.elapsed());

    let started = Instant::now();
    let failures = concurrent_tcp(&lab.netns_path(Ns::Pod), n);
    let tcp_took = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} of {n} connections failed: {:?}\nagent log:\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        agent.log()
    );
    let started = Instant::now();
    let failures = concurrent_udp(&lab.netns_path(Ns::Pod), n);
    assert!(
        failures.is_empty(),
        "{} of {n} UDP exchanges failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    eprintln!(
        "{n} concurrent TCP connections in {tcp_took:.1?}, {n} concurrent UDP exchanges in {:.1?}",
        started.elapsed()
    );

    // Nothing was evicted: every filler flow is still there.
    let held = (0..fill).filter(|&i| flows.get(&filler(i), 0).is_ok()).count();
    assert_eq!(held, fill as usize, "filler flows evicted below the documented capacity");
    let state = scratch.inspect();
    let counter = |name: &str| {
        state["counters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .map_or(0, |c| c["packets"].as_u64().unwrap())
    };
    assert_eq!(counter("flow_lost"), 0);
    assert_eq!(counter("flow_insert_failed"), 0);
    assert!(counter("flow_created") >= 2 * n as u64, "flow_created {}", counter("flow_created"));
    eprintln!("flows held: {}, flow_created {}", fill as u64 + counter("flow_created"), counter("flow_created"));
}
