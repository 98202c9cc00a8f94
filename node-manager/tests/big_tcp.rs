//! BIG TCP through the rewrite, with real traffic: every device on the path (pod, the host side
//! of its veth, the node's uplink, the endpoint) allows GSO/GRO aggregates of 185,000 bytes, so
//! TCP hands the devices segments over 64 KiB whose IP length is 0 (IPv4 `tot_len`; IPv6
//! `payload_len`, with or without the Jumbo Payload hop-by-hop header by kernel version). The
//! pod sends 8 MiB to the Service's external address and reads the 8 MiB echo; the aggregates
//! cross the TC programs (IPv4 both ways; IPv6 from the pod, see the test), and an aggregate
//! passed untranslated would reset the connection. The fixed-shape cases (Jumbo Payload header
//! included) are in tests/test_run.rs and tests/fuzz.rs. Needs root.
mod common;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::{
    agent::{Agent, Scratch, lab_agent_args, wait_for, write},
    kube::counter,
};
use lab::{Lab, Ns, in_netns};
use serde_json::json;

/// What the devices allow (what Cilium's BIG TCP option sets).
const BIG: u32 = 185_000;
const PAYLOAD: usize = 8 << 20;
/// The Service port of this test's own echo server: the lab's gives up on a write blocked for a
/// second, and the IPv6 path here stalls for longer at times (see the test).
const PORT: u16 = 8096;

/// An echo server on the endpoint (both families): reads until the client half-closes, then
/// writes `echo:` and everything back, with no time limit on either.
fn bulk_echo(lab: &Lab) -> Vec<std::thread::JoinHandle<()>> {
    let listeners = in_netns(lab.netns_path(Ns::Ep), || {
        Ok([
            std::net::TcpListener::bind(SocketAddr::from((lab::ENDPOINT_V4, PORT)))?,
            std::net::TcpListener::bind(SocketAddr::from((lab::ENDPOINT_V6, PORT)))?,
        ])
    })
    .unwrap();
    listeners
        .into_iter()
        .map(|listener| {
            std::thread::spawn(move || {
                use std::io::{Read as _, Write as _};
                let (mut conn, _) = listener.accept().unwrap();
                let mut data = b"echo:".to_vec();
                conn.read_to_end(&mut data).unwrap();
                conn.write_all(&data).unwrap();
            })
        })
        .collect()
}

/// Raises the GSO and GRO limits of `ifname` in the current namespace: IPv6 (`gso_max_size`,
/// `gro_max_size`) and IPv4 (`gso_ipv4_max_size`, `gro_ipv4_max_size`, Linux ≥ 6.3) by one
/// RTM_NEWLINK, since the iproute2 of Debian 12 does not know the IPv4 attributes.
fn allow_big_aggregates(ifname: &str) -> std::io::Result<()> {
    const IFLA_GSO_MAX_SIZE: u16 = 41;
    const IFLA_GRO_MAX_SIZE: u16 = 58;
    const IFLA_GSO_IPV4_MAX_SIZE: u16 = 63;
    const IFLA_GRO_IPV4_MAX_SIZE: u16 = 64;
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut msg = Vec::new();
    msg.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set below
    msg.extend_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(&[0u8; 4]); // ifi_family, pad, ifi_type
    msg.extend_from_slice(&(index as i32).to_ne_bytes());
    msg.extend_from_slice(&[0u8; 8]); // ifi_flags, ifi_change
    for attr in [IFLA_GSO_MAX_SIZE, IFLA_GRO_MAX_SIZE, IFLA_GSO_IPV4_MAX_SIZE, IFLA_GRO_IPV4_MAX_SIZE] {
        msg.extend_from_slice(&8u16.to_ne_bytes());
        msg.extend_from_slice(&attr.to_ne_bytes());
        msg.extend_from_slice(&BIG.to_ne_bytes());
    }
    let len = msg.len() as u32;
    msg[..4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: plain socket calls on buffers owned here; the fd is closed below.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let sent = libc::send(fd, msg.as_ptr().cast(), msg.len(), 0);
        let mut ack = [0u8; 256];
        let got = if sent < 0 { -1 } else { libc::recv(fd, ack.as_mut_ptr().cast(), ack.len(), 0) };
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        if got < 20 {
            return Err(error);
        }
        // NLMSG_ERROR: struct nlmsgerr's error after the 16-byte header (0 = done).
        let code = i32::from_ne_bytes(ack[16..20].try_into().unwrap());
        if code != 0 {
            return Err(std::io::Error::from_raw_os_error(-code));
        }
    }
    Ok(())
}

/// Frames over 64 KiB (GSO aggregates) on the host side of the pod's veth, counted from an
/// AF_PACKET socket there until `finish`: those to the pod by source address (a packet tap
/// sees them after the TC egress hook, so translated), those from the pod by destination (a tap
/// sees them before the TC ingress hook, so as the pod sent them).
struct BigFrames {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Seen>>,
}

#[derive(Debug, Default)]
struct Seen {
    to_pod_by_source: HashMap<IpAddr, u64>,
    from_pod_by_destination: HashMap<IpAddr, u64>,
}

impl BigFrames {
    fn watch(lab: &Lab) -> BigFrames {
        let ifname = std::ffi::CString::new(lab.pod_host_if()).unwrap();
        let fd = in_netns(lab.netns_path(Ns::Node), || {
            // SAFETY: plain socket calls; the fd is owned by the OwnedFd below.
            unsafe {
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                );
                anyhow::ensure!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
                let fd = OwnedFd::from_raw_fd(fd);
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
                sll.sll_ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
                let bound = libc::bind(
                    fd.as_raw_fd(),
                    (&sll as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                );
                anyhow::ensure!(bound == 0, "binding to the pod's veth: {}", std::io::Error::last_os_error());
                let timeout = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    size_of::<libc::timeval>() as u32,
                );
                Ok(fd)
            }
        })
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Seen::default();
            let mut buf = [0u8; 128];
            while !stopped.load(Ordering::Relaxed) {
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: buffers owned here; MSG_TRUNC returns the frame's real length.
                let len = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_TRUNC,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut from_len,
                    )
                };
                if len <= 65_535 + 14 {
                    continue;
                }
                let (source, destination) = match [buf[12], buf[13]] {
                    [0x08, 0x00] => (
                        IpAddr::from([buf[26], buf[27], buf[28], buf[29]]),
                        IpAddr::from([buf[30], buf[31], buf[32], buf[33]]),
                    ),
                    [0x86, 0xdd] => (
                        IpAddr::from(<[u8; 16]>::try_from(&buf[22..38]).unwrap()),
                        IpAddr::from(<[u8; 16]>::try_from(&buf[38..54]).unwrap()),
                    ),
                    _ => continue,
                };
                let (count, addr) = if from.sll_pkttype == libc::PACKET_OUTGOING {
                    (&mut seen.to_pod_by_source, source)
                } else {
                    (&mut seen.from_pod_by_destination, destination)
                };
                *count.entry(addr).or_insert(0) += 1;
            }
            seen
        });
        BigFrames { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for BigFrames {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn big_tcp_aggregates_are_translated_both_ways() {
    let lab = Lab::new().unwrap();
    let devices = [
        (Ns::Pod, "eth0".to_owned()),
        (Ns::Node, lab.pod_host_if().to_owned()),
        (Ns::Node, "eth0".into()),
        (Ns::Ep, "eth0".into()),
    ];
    for (ns, ifname) in &devices {
        in_netns(lab.netns_path(*ns), || Ok(allow_big_aggregates(ifname)?))
            .unwrap_or_else(|e| panic!("BIG TCP limits on {ifname} in {}: {e:#}", lab.ns_name(*ns)));
    }
    lab.add_service_port(PORT).unwrap();
    let servers = bulk_echo(&lab);
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.json");
    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "lab", "name": "bulk"},
        "spec": {"type": "LoadBalancer", "clusterIP": lab::CLUSTER_V4.to_string(),
                 "clusterIPs": [lab::CLUSTER_V4.to_string(), lab::CLUSTER_V6.to_string()],
                 "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                 "ports": [{"name": "tcp", "port": PORT, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": lab::EXTERNAL_V4.to_string()}, {"ip": lab::EXTERNAL_V6.to_string()}]}},
    });
    write(&services, &service.to_string());
    let agent = Agent::start(&scratch, &lab_agent_args(services.to_str().unwrap()));
    wait_for("both frontends and the pod interface", Duration::from_secs(20), || {
        let state = scratch.try_inspect().unwrap_or_default();
        state["frontends"].as_array().is_some_and(|f| f.len() >= 2)
            && state["interfaces"].as_array().is_some_and(|i| !i.is_empty())
    });
    let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i % 251) as u8).collect();
    for (external, family) in [(IpAddr::V4(lab::EXTERNAL_V4), "v4"), (IpAddr::V6(lab::EXTERNAL_V6), "v6")] {
        let before = scratch.inspect();
        let to = SocketAddr::new(external, PORT);
        let big = BigFrames::watch(&lab);
        let reply = lab::tcp_request_in(lab.netns_path(Ns::Pod), to, &payload, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("8 MiB to {to} and back: {e:#}\n{}", agent.log()));
        let big = big.finish();
        assert_eq!(reply.peer, to, "the pod's socket is connected to the external address");
        assert_eq!(reply.data.len(), PAYLOAD + 5, "the whole echo arrives from {to}");
        assert!(reply.data[5..] == payload[..], "the echo from {to} is intact");
        eprintln!("{to}: frames over 64 KiB on the pod's veth: {big:?}");
        // The request left the pod as aggregates over 64 KiB to the external address: had the
        // ingress program passed them untranslated, the node (which holds the address, with
        // nothing listening) would have reset the connection.
        assert!(
            big.from_pod_by_destination.get(&external).is_some_and(|&n| n > 0),
            "{to}: no BIG TCP aggregate from the pod: {big:?}"
        );
        // Whatever aggregates the node sent the pod carry the external address, never the
        // cluster IP. IPv4 replies arrive aggregated in this lab; IPv6 replies arrived as
        // segments under 64 KiB in every run on Linux 6.18 (whose IPv6 aggregates still carry
        // the Jumbo Payload header), so for IPv6 only the pod's direction is shown with real
        // traffic and the reply direction by tests/test_run.rs.
        assert!(
            big.to_pod_by_source.keys().all(|a| *a == external),
            "{to}: aggregates reached the pod untranslated: {big:?}"
        );
        if external.is_ipv4() {
            assert!(
                big.to_pod_by_source.get(&external).is_some_and(|&n| n > 0),
                "{to}: no BIG TCP aggregate to the pod: {big:?}"
            );
        }
        let after = scratch.inspect();
        // Not asserted: pass_unparsed also counts the ICMPv6 Packet Too Big errors the node
        // sends the pod about some of its forwarded IPv6 aggregates (measured on 6.18: a few
        // dozen per run; ICMP errors about a rewritten flow pass untouched, tests/test_run.rs).
        let unparsed = counter(&after, "pass_unparsed") - counter(&before, "pass_unparsed");
        eprintln!("{to}: {unparsed} packets passed unparsed");
        let name = format!("rewrite_egress_{family}");
        assert!(counter(&after, &name) > counter(&before, &name), "{to}: {name} did not count");
    }
    drop(agent);
    for server in servers {
        server.join().unwrap();
    }
}
