//! Lab topology checks. Need root: `cargo test -p lab -- --test-threads=1`.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use lab::{
    CLUSTER_V4, CLUSTER_V6, ENDPOINT_V4, ENDPOINT_V6, EXTERNAL_V4, EXTERNAL_V6, EXTRA_POD_V4, EXTRA_POD_V6, Lab, Ns,
    POD_V4, POD_V6, SERVICE_PORT,
};

const T: Duration = Duration::from_secs(2);
const SHORT: Duration = Duration::from_millis(500);

fn sa(ip: impl Into<IpAddr>) -> SocketAddr {
    SocketAddr::new(ip.into(), SERVICE_PORT)
}

fn io_kind(err: &anyhow::Error) -> Option<ErrorKind> {
    err.chain().find_map(|e| e.downcast_ref::<std::io::Error>()).map(|e| e.kind())
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pod_reaches_cluster_ips_tcp_and_udp() -> Result<()> {
    let lab = Lab::new()?;
    for (cluster, pod) in [(sa(CLUSTER_V4), sa(POD_V4)), (sa(CLUSTER_V6), sa(POD_V6))] {
        let r = lab.tcp_request(Ns::Pod, cluster, b"hello tcp", T)?;
        assert_eq!(r.data, b"echo:hello tcp");
        assert_eq!(r.peer, cluster);
        for connected in [true, false] {
            let r = lab.udp_request(Ns::Pod, cluster, b"hello udp", T, connected)?;
            assert_eq!(r.data, b"echo:hello udp", "connected={connected}");
            assert_eq!(r.from, cluster, "connected={connected}");
        }
        // Pod traffic is not masqueraded: the endpoint sees the pod's address.
        let peers = lab.endpoint_peers();
        assert!(peers.iter().any(|p| p.ip() == pod.ip()), "{peers:?}");
    }
    Ok(())
}

#[test]
fn external_ips_fail_without_agent() -> Result<()> {
    let lab = Lab::new()?;
    for ext in [sa(EXTERNAL_V4), sa(EXTERNAL_V6)] {
        let err = lab.tcp_request(Ns::Pod, ext, b"x", T).expect_err("TCP to the external IP must fail");
        assert_eq!(io_kind(&err), Some(ErrorKind::ConnectionRefused), "{err:#}");
        assert!(format!("{err:#}").contains(lab.ns_name(Ns::Pod)), "{err:#}");
        // Connected UDP sees the ICMP port unreachable, unconnected simply gets nothing.
        let err = lab.udp_request(Ns::Pod, ext, b"x", SHORT, true).expect_err("no UDP echo");
        assert_eq!(io_kind(&err), Some(ErrorKind::ConnectionRefused), "{err:#}");
        let err = lab.udp_request(Ns::Pod, ext, b"x", SHORT, false).expect_err("no UDP echo");
        assert_eq!(io_kind(&err), Some(ErrorKind::TimedOut), "{err:#}");
    }
    Ok(())
}

#[test]
fn node_processes_reach_cluster_ips_and_are_masqueraded() -> Result<()> {
    let lab = Lab::new()?;
    for cluster in [sa(CLUSTER_V4), sa(CLUSTER_V6)] {
        let r = lab.tcp_request(Ns::Node, cluster, b"from node", T)?;
        assert_eq!(r.data, b"echo:from node");
        assert_eq!(r.peer, cluster);
        let r = lab.udp_request(Ns::Node, cluster, b"from node", T, true)?;
        assert_eq!(r.data, b"echo:from node");
    }
    // Node-originated traffic is marked for masquerading (source outside the pod CIDR) and the
    // postrouting chain clears the mark and masquerades it.
    let out = lab.command(Ns::Node, "nft").args(["list", "chain", "inet", lab::NFT_TABLE, "postrouting"]).output()?;
    let chain = String::from_utf8_lossy(&out.stdout);
    let packets: u64 = chain
        .split("counter packets ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(packets >= 4, "{chain}");
    let peers = lab.endpoint_peers();
    assert!(peers.iter().any(|p| p.ip() == IpAddr::from([192, 0, 2, 129])), "{peers:?}");
    // The endpoint is also directly reachable from the pod (plain routing through the node).
    let r = lab.tcp_request(Ns::Pod, sa(ENDPOINT_V6), b"direct", T)?;
    assert_eq!(r.data, b"echo:direct");
    assert_eq!(r.peer, sa(ENDPOINT_V6));
    let r = lab.udp_request(Ns::Pod, sa(ENDPOINT_V4), b"direct", T, false)?;
    assert_eq!(r.from, sa(ENDPOINT_V4));
    Ok(())
}

#[test]
fn command_runs_in_namespace_and_names_are_sane() -> Result<()> {
    let lab = Lab::new()?;
    let host_if = lab.pod_host_if().to_owned();
    assert!(host_if.starts_with("veth") && host_if.len() <= 15, "{host_if}");
    let out = lab.command(Ns::Node, "ip").args(["-o", "link", "show"]).output()?;
    assert!(out.status.success());
    let links = String::from_utf8_lossy(&out.stdout);
    assert!(links.contains(&format!(" {host_if}@")), "{links}");
    assert!(links.contains(" kube-ipvs0:"), "{links}");
    // The only veth* in the node is the pod's (the uplink to the endpoint is not a pod).
    let veths: Vec<&str> =
        links.lines().filter_map(|l| l.split(": ").nth(1)).filter(|n| n.starts_with("veth")).collect();
    assert_eq!(veths.len(), 1, "{links}");
    let out = lab.command(Ns::Node, "nft").args(["list", "table", "inet", lab::NFT_TABLE]).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // nsenter keeps the caller's mount namespace: /sys/fs/bpf is what the caller sees.
    let path = lab.netns_path(Ns::Pod);
    assert!(path.starts_with("/var/run/netns") && path.exists());
    Ok(())
}

#[test]
fn extra_pod_is_wired_and_cleaned() -> Result<()> {
    let mut lab = Lab::new()?;
    let host_if = lab.add_extra_pod("x1")?;
    assert_eq!(host_if, "vethx1");
    let r = lab.tcp_request(Ns::ExtraPod(0), sa(CLUSTER_V6), b"extra", T)?;
    assert_eq!(r.data, b"echo:extra");
    let r = lab.udp_request(Ns::ExtraPod(0), sa(CLUSTER_V4), b"extra", T, true)?;
    assert_eq!(r.data, b"echo:extra");
    let peers = lab.endpoint_peers();
    assert!(peers.iter().any(|p| p.ip() == IpAddr::from(EXTRA_POD_V4)), "{peers:?}");
    assert!(lab.add_extra_pod("x1").is_err(), "duplicate suffix");
    assert!(lab.add_extra_pod("way-too-long-suffix").is_err());
    let second = lab.add_extra_pod("x2")?;
    let r = lab.tcp_request(Ns::ExtraPod(1), sa(ENDPOINT_V4), b"2", T)?;
    assert_eq!(r.data, b"echo:2");
    let out = lab.command(Ns::ExtraPod(1), "ip").args(["-6", "-o", "addr"]).output()?;
    let addrs = String::from_utf8_lossy(&out.stdout);
    let expected = std::net::Ipv6Addr::from(u128::from(EXTRA_POD_V6) + 1);
    assert!(addrs.contains(&expected.to_string()), "{addrs}");
    assert_eq!(second, "vethx2");
    let names: Vec<String> = (0..2).map(|n| lab.ns_name(Ns::ExtraPod(n)).to_owned()).collect();
    drop(lab);
    let list = netns_list();
    for n in names {
        assert!(!list.contains(&n), "{n} left in {list}");
    }
    Ok(())
}

#[test]
fn two_labs_coexist_and_drop_cleans_everything() -> Result<()> {
    let a = Lab::new()?;
    let b = Lab::new()?;
    let names: Vec<String> =
        [&a, &b].iter().flat_map(|l| [Ns::Pod, Ns::Node, Ns::Ep].map(|ns| l.ns_name(ns).to_owned())).collect();
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 6, "{names:?}");
    let left = lab::leftovers();
    for n in &names {
        assert!(left.contains(n), "{n} not in {left:?}");
    }
    for l in [&a, &b] {
        let r = l.tcp_request(Ns::Pod, sa(CLUSTER_V4), b"ab", T)?;
        assert_eq!(r.data, b"echo:ab");
    }
    drop(a);
    drop(b);
    let list = netns_list();
    let left = lab::leftovers();
    for n in &names {
        assert!(!list.contains(n.as_str()), "{n} left in {list}");
        assert!(!left.contains(n), "{n} left in {left:?}");
    }
    Ok(())
}

#[test]
fn labs_can_be_built_concurrently() -> Result<()> {
    let handles: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(|| -> Result<Vec<u8>> {
                let lab = Lab::new()?;
                Ok(lab.tcp_request(Ns::Pod, sa(CLUSTER_V6), b"c", T)?.data)
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap()?, b"echo:c");
    }
    Ok(())
}

#[test]
fn in_netns_runs_in_the_namespace() -> Result<()> {
    let lab = Lab::new()?;
    // A socket bound to the endpoint address only works inside the ep namespace.
    let ok = lab::in_netns(lab.netns_path(Ns::Ep), || Ok(std::net::UdpSocket::bind((ENDPOINT_V4, 0)).is_ok()))?;
    assert!(ok);
    assert!(std::net::UdpSocket::bind((ENDPOINT_V4, 0)).is_err());
    let err = lab::in_netns("/var/run/netns/nml-does-not-exist", || Ok(())).expect_err("missing namespace");
    assert!(format!("{err:#}").contains("nml-does-not-exist"), "{err:#}");
    Ok(())
}

#[test]
fn stale_namespaces_of_dead_processes_are_removed() -> Result<()> {
    // Beyond pid_max (at most 2^22), so no such process can exist.
    let stale = "nml-999999999-0-pod";
    let ok = Command::new("ip").args(["netns", "add", stale]).status()?;
    assert!(ok.success());
    let lab = Lab::new()?;
    let removed = lab::remove_stale_leftovers()?;
    assert!(removed.iter().any(|n| n == stale), "{removed:?}");
    let left = lab::leftovers();
    assert!(!left.iter().any(|n| n == stale), "{left:?}");
    // A live lab (this process) is left alone.
    assert!(left.iter().any(|n| n == lab.ns_name(Ns::Node)), "{left:?}");
    Ok(())
}

#[test]
fn add_service_port_dnats_the_cluster_ips_on_that_port() -> Result<()> {
    const PORT: u16 = 9000;
    let lab = Lab::new()?;
    let (l4, l6) = lab::in_netns(lab.netns_path(Ns::Ep), || {
        Ok((
            std::net::TcpListener::bind(SocketAddr::new(ENDPOINT_V4.into(), PORT))?,
            std::net::TcpListener::bind(SocketAddr::new(ENDPOINT_V6.into(), PORT))?,
        ))
    })?;
    let connect = |ip: IpAddr| {
        lab::in_netns(lab.netns_path(Ns::Pod), || Ok(std::net::TcpStream::connect_timeout(&(ip, PORT).into(), SHORT)?))
    };
    let targets = [(IpAddr::from(CLUSTER_V4), IpAddr::from(POD_V4), &l4), (CLUSTER_V6.into(), POD_V6.into(), &l6)];
    for (cluster, _, _) in &targets {
        assert!(connect(*cluster).is_err(), "{cluster}:{PORT} must not work before the port is added");
    }
    lab.add_service_port(PORT)?;
    for (cluster, pod, listener) in targets {
        let stream = connect(cluster)?;
        assert_eq!(stream.peer_addr()?, SocketAddr::new(cluster, PORT));
        let (_, peer) = listener.accept()?;
        assert_eq!(peer.ip(), pod, "DNATed to the endpoint, not masqueraded");
    }
    let err = lab.add_service_port(SERVICE_PORT).expect_err("the Service's own port");
    assert!(format!("{err:#}").contains("already"), "{err:#}");
    Ok(())
}
