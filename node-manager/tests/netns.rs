//! The pod datapath end to end, with real traffic in network namespaces: a pod behind a veth,
//! a node with kube-proxy-like nftables DNAT of the cluster IP and the external IP bound
//! locally with nothing behind it (IPVS with externalTrafficPolicy: Local on a node without a
//! local endpoint), and the Service endpoint in its own namespace. Needs root.
mod common;

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use common::agent::{Agent, Scratch, lab_agent_args, lab_service_yaml, tcx_programs, wait_for, write};
use lab::{Lab, Ns};

const T: Duration = Duration::from_secs(2);

fn ext(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// TCP and UDP (connected and not) from `ns` to `ip:8080`: Ok with the address the pod saw
/// as its peer, or the first failure.
fn request_all(lab: &Lab, ns: Ns, ip: IpAddr) -> Result<(), String> {
    let to = ext(ip, lab::SERVICE_PORT);
    let tcp = lab.tcp_request(ns, to, b"tcp", T).map_err(|e| format!("TCP to {to}: {e:#}"))?;
    if tcp.data != b"echo:tcp" || tcp.peer != to {
        return Err(format!("TCP to {to}: reply {:?} from peer {}", String::from_utf8_lossy(&tcp.data), tcp.peer));
    }
    for connected in [true, false] {
        let udp = lab
            .udp_request(ns, to, b"udp", T, connected)
            .map_err(|e| format!("UDP (connected={connected}) to {to}: {e:#}"))?;
        if udp.data != b"echo:udp" || udp.from != to {
            return Err(format!("UDP to {to}: reply {:?} from {}", String::from_utf8_lossy(&udp.data), udp.from));
        }
    }
    Ok(())
}

fn counter(state: &serde_json::Value, name: &str) -> u64 {
    state["counters"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap()["packets"].as_u64().unwrap()
}

fn assert_nothing_of_ours(lab: &Lab, scratch: &Scratch) {
    assert!(!scratch.bpffs.join("node-manager").exists(), "pins left under {}", scratch.bpffs.display());
    let progs = Command::new("bpftool").args(["prog", "show"]).output().unwrap();
    let progs = String::from_utf8_lossy(&progs.stdout);
    assert!(
        !progs.contains("nm_pod_ingress") && !progs.contains("nm_pod_egress") && !progs.contains("nm_sock_"),
        "programs still loaded:\n{progs}"
    );
    let links = Command::new("bpftool").args(["link", "show"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&links.stdout).contains("nm_pod_"), "links still present");
    for args in [
        vec!["filter", "show", "dev", lab.pod_host_if(), "ingress"],
        vec!["filter", "show", "dev", lab.pod_host_if(), "egress"],
        vec!["qdisc", "show", "dev", lab.pod_host_if()],
    ] {
        let out = lab.command(Ns::Node, "tc").args(&args).output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(!out.contains("bpf") && !out.contains("clsact"), "tc {args:?} still shows: {out}");
    }
    // TCX hooks (bpftool 7.1 cannot list them): nothing of ours on the pod interface.
    for hook in ["ingress", "egress"] {
        let attached = tcx_programs(lab, hook);
        assert!(!attached.iter().any(|p| p.starts_with("nm_")), "still on TCX {hook}: {attached:?}");
    }
}

#[test]
fn pods_reach_the_external_ip_only_with_the_agent_and_cleanup_removes_everything() {
    let mut lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));

    // Without the agent: the external IP is local to the node with nothing behind it.
    for ip in [IpAddr::from(lab::EXTERNAL_V4), IpAddr::from(lab::EXTERNAL_V6)] {
        assert!(lab.tcp_request(Ns::Pod, ext(ip, 8080), b"x", T).is_err(), "TCP to {ip} must fail without the agent");
        assert!(
            lab.udp_request(Ns::Pod, ext(ip, 8080), b"x", T, false).is_err(),
            "UDP to {ip} must fail without the agent"
        );
    }

    // v4 pod CIDR narrowed to the first pod, so a second pod's IPv4 source is "not a pod".
    let agent = Agent::start(
        &scratch,
        &[
            "--services-file",
            services.to_str().unwrap(),
            "--external-cluster",
            "true",
            "--pod-cidr-ipv4",
            "192.0.2.10/32",
            "--pod-cidr-ipv6",
            lab::POD_CIDR_V6,
            "--pod-interfaces",
            "veth*",
        ],
    );
    wait_for("the agent to attach and fill the maps", Duration::from_secs(15), || {
        let s = scratch.inspect();
        s["interfaces"].as_array().is_some_and(|i| !i.is_empty())
            && s["frontends"].as_array().is_some_and(|f| f.len() == 6)
    });

    for ip in [IpAddr::from(lab::EXTERNAL_V4), IpAddr::from(lab::EXTERNAL_V6)] {
        request_all(&lab, Ns::Pod, ip).unwrap_or_else(|e| panic!("with the agent: {e}\nagent log:\n{}", agent.log()));
    }
    // The masquerade mark made kube-proxy's postrouting masquerade the rewritten flow.
    assert!(
        lab.endpoint_peers().iter().any(|p| p.ip() == IpAddr::from(std::net::Ipv4Addr::new(192, 0, 2, 129))),
        "rewritten pod traffic must be masqueraded: {:?}",
        lab.endpoint_peers()
    );
    // The cluster IP still works directly; other ports on the external IP stay untouched.
    request_all(&lab, Ns::Pod, lab::CLUSTER_V4.into()).unwrap();
    request_all(&lab, Ns::Pod, lab::CLUSTER_V6.into()).unwrap();
    assert!(lab.tcp_request(Ns::Pod, ext(lab::EXTERNAL_V4, 8081), b"x", T).is_err(), "port 8081 is no frontend");
    // A host process in the node is no pod: the TC path does not touch it.
    assert!(
        lab.tcp_request(Ns::Node, ext(lab::EXTERNAL_V4, 8080), b"x", T).is_err(),
        "node-originated traffic is not the TC path's"
    );

    // An interface that appears later is attached; its IPv4 source is outside the pod CIDR.
    let late_if = lab.add_extra_pod("late").unwrap();
    wait_for("the late interface to be attached", Duration::from_secs(10), || {
        scratch.inspect()["interfaces"].as_array().unwrap().iter().any(|i| i["name"] == late_if.as_str())
    });
    request_all(&lab, Ns::ExtraPod(0), lab::EXTERNAL_V6.into()).unwrap_or_else(|e| panic!("late pod over IPv6: {e}"));
    assert!(
        lab.tcp_request(Ns::ExtraPod(0), ext(lab::EXTERNAL_V4, 8080), b"x", T).is_err(),
        "source outside the pod CIDR must be untouched"
    );

    // The maps carry BTF: bpftool prints named fields, not hex.
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(scratch.bpffs.join("node-manager/v1/maps/NM_FRONTENDS"))
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("\"cluster_addr\"") && dump.contains("\"proto\"") && dump.contains("\"port\""), "{dump}");

    let state = scratch.inspect();
    assert!(counter(&state, "rewrite_ingress_v4") >= 4 && counter(&state, "rewrite_egress_v6") >= 4, "{state:#}");
    assert!(counter(&state, "pass_not_pod") >= 1);

    // The file changes: the Service is deleted → the rewrite stops; restored → it works again.
    write(&services, "");
    wait_for("the frontends to be removed", Duration::from_secs(10), || {
        scratch.inspect()["frontends"].as_array().unwrap().is_empty()
    });
    assert!(lab.tcp_request(Ns::Pod, ext(lab::EXTERNAL_V4, 8080), b"x", T).is_err());
    // A broken file keeps the previous state (empty here) and says so; fixing it applies it.
    write(&services, "kind: Service\n  bad: [indent");
    wait_for("the agent to report the invalid file", Duration::from_secs(10), || {
        agent.log().contains("services file is invalid")
    });
    write(&services, &lab_service_yaml("web"));
    wait_for("the frontends to return", Duration::from_secs(10), || {
        scratch.inspect()["frontends"].as_array().unwrap().len() == 6
    });
    request_all(&lab, Ns::Pod, lab::EXTERNAL_V4.into()).unwrap();

    // The agent stops: the datapath stays and keeps serving.
    assert!(agent.stop(), "agent exits cleanly on SIGTERM");
    request_all(&lab, Ns::Pod, lab::EXTERNAL_V4.into()).unwrap_or_else(|e| panic!("after the agent stopped: {e}"));

    // cleanup removes all of it; a second run finds nothing and is fine.
    let out = scratch.cleanup();
    assert!(out.status.success(), "cleanup: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        lab.tcp_request(Ns::Pod, ext(lab::EXTERNAL_V4, 8080), b"x", T).is_err(),
        "after cleanup the rewrite is gone"
    );
    assert_nothing_of_ours(&lab, &scratch);
    let again = scratch.cleanup();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 link(s)"), "{}", String::from_utf8_lossy(&again.stdout));
}

#[test]
fn a_restarted_agent_adopts_the_pinned_datapath_and_replaces_its_programs() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    let args = lab_agent_args(services.to_str().unwrap());
    let first = Agent::start(&scratch, &args);
    wait_for("first agent ready", Duration::from_secs(15), || {
        scratch.inspect()["frontends"].as_array().is_some_and(|f| f.len() == 6)
            && !scratch.inspect()["interfaces"].as_array().unwrap().is_empty()
    });
    request_all(&lab, Ns::Pod, lab::EXTERNAL_V4.into()).unwrap();
    drop(first); // SIGKILL: no chance to clean anything

    request_all(&lab, Ns::Pod, lab::EXTERNAL_V4.into()).unwrap_or_else(|e| panic!("while no agent runs: {e}"));
    let second = Agent::start(&scratch, &args);
    wait_for("second agent adopted the pins", Duration::from_secs(15), || {
        second.log().contains("adopting pinned map") && second.log().contains("attached")
    });
    assert!(!second.log().contains("creating map"), "maps must be adopted, not recreated:\n{}", second.log());
    // Exactly one program per direction is attached to the interface: the old one was
    // replaced inside the same link (TCX) or filter (netlink cls_bpf), not joined by a second.
    let state = scratch.inspect();
    let iface =
        state["interfaces"].as_array().unwrap().iter().find(|i| i["name"] == lab.pod_host_if()).unwrap().clone();
    let hook = if common::kernel::has_tcx() { "tcx" } else { "tc" };
    assert_eq!(iface[format!("{hook}_ingress")], serde_json::json!(["nm_pod_ingress"]), "{state:#}");
    assert_eq!(iface[format!("{hook}_egress")], serde_json::json!(["nm_pod_egress"]), "{state:#}");
    request_all(&lab, Ns::Pod, lab::EXTERNAL_V6.into()).unwrap();
    assert!(second.stop());
}

/// TCP from `pod` (bound to `port`, SO_REUSEADDR) to `to`: the echo, and the peer the pod's
/// socket saw.
fn tcp_from_port(lab: &Lab, pod: IpAddr, port: u16, to: SocketAddr) -> Result<(Vec<u8>, SocketAddr), String> {
    use socket2::{Domain, Socket, Type};
    use std::io::{Read as _, Write as _};
    lab::in_netns(lab.netns_path(Ns::Pod), || {
        let s = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&SocketAddr::new(pod, port).into())?;
        s.connect_timeout(&to.into(), T)?;
        let mut stream = std::net::TcpStream::from(s);
        let peer = stream.peer_addr()?;
        stream.set_read_timeout(Some(T))?;
        stream.write_all(b"tcp")?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut data = Vec::new();
        stream.read_to_end(&mut data)?;
        Ok((data, peer))
    })
    .map_err(|e| format!("TCP {pod}:{port} -> {to}: {e:#}"))
}

/// UDP from `pod:port` to `to` (unconnected): the echo and the address it came from.
fn udp_from_port(lab: &Lab, pod: IpAddr, port: u16, to: SocketAddr) -> Result<(Vec<u8>, SocketAddr), String> {
    lab::in_netns(lab.netns_path(Ns::Pod), || {
        let s = std::net::UdpSocket::bind(SocketAddr::new(pod, port))?;
        s.set_read_timeout(Some(T))?;
        s.send_to(b"udp", to)?;
        let mut buf = [0u8; 64];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok((buf[..n].to_vec(), from))
    })
    .map_err(|e| format!("UDP {pod}:{port} -> {to}: {e:#}"))
}

/// A pod port used first towards the external IP (rewritten, remembered) and then towards the
/// cluster IP itself, as ephemeral ports are reused: the replies of the second connection
/// must come from the cluster IP the pod dialled, not be given the external address of the
/// earlier flow (which would reset TCP and lose UDP). And back again.
#[test]
fn a_pod_port_reused_towards_the_cluster_ip_gets_the_cluster_ips_replies() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    let agent = Agent::start(&scratch, &lab_agent_args(services.to_str().unwrap()));
    wait_for("agent ready", Duration::from_secs(15), || {
        scratch.inspect()["frontends"].as_array().is_some_and(|f| f.len() == 6)
            && !scratch.inspect()["interfaces"].as_array().unwrap().is_empty()
    });
    let cases = [
        (IpAddr::from(lab::POD_V4), IpAddr::from(lab::EXTERNAL_V4), IpAddr::from(lab::CLUSTER_V4)),
        (IpAddr::from(lab::POD_V6), IpAddr::from(lab::EXTERNAL_V6), IpAddr::from(lab::CLUSTER_V6)),
    ];
    for (k, (pod, external, cluster)) in cases.into_iter().enumerate() {
        let port = 41000 + k as u16;
        for to in [external, cluster, external, cluster] {
            let to = ext(to, lab::SERVICE_PORT);
            let (data, peer) = tcp_from_port(&lab, pod, port, to).unwrap();
            assert_eq!((data.as_slice(), peer), (&b"echo:tcp"[..], to), "TCP from port {port}");
            let (data, from) = udp_from_port(&lab, pod, port, to).unwrap();
            assert_eq!((data.as_slice(), from), (&b"echo:udp"[..], to), "UDP from port {port}");
        }
    }
    // Each turn to the cluster IP found the flow the turn before had made: TCP (SYN) and UDP,
    // twice per family.
    assert_eq!(counter(&scratch.inspect(), "flow_direct_reuse"), 8, "{:#}", scratch.inspect());
    assert!(agent.stop());
}

/// A CNI's clsact qdisc and filter on the pod interface: ours run after theirs, inspect lists both,
/// and cleanup takes only ours (on kernels without TCX, ours are cls_bpf filters on that very
/// qdisc; with TCX, the qdisc is not ours to touch at all).
#[test]
fn a_clsact_qdisc_and_filters_of_others_stay() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    let dev = lab.pod_host_if().to_owned();
    let tc = |args: &[&str]| {
        let out = lab.command(Ns::Node, "tc").args(args).output().unwrap();
        assert!(out.status.success(), "tc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    tc(&["qdisc", "add", "dev", &dev, "clsact"]);
    // A classic-BPF filter that matches nothing (`ret #0`): the next filter (ours) still runs.
    tc(&["filter", "add", "dev", &dev, "ingress", "pref", "100", "bpf", "bytecode", "1,6 0 0 0,"]);
    let agent = Agent::start(&scratch, &lab_agent_args(services.to_str().unwrap()));
    wait_for("the agent to attach", Duration::from_secs(15), || {
        scratch.try_inspect().is_ok_and(|s| s["interfaces"].as_array().is_some_and(|i| !i.is_empty()))
    });
    request_all(&lab, Ns::Pod, lab::EXTERNAL_V4.into()).unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    let state = scratch.inspect();
    let iface = state["interfaces"].as_array().unwrap().iter().find(|i| i["name"] == dev.as_str()).unwrap().clone();
    if common::kernel::has_tcx() {
        assert_eq!(iface["tc_ingress"], serde_json::json!(["bpf"]), "{iface:#}");
        assert_eq!(iface["tcx_ingress"], serde_json::json!(["nm_pod_ingress"]), "{iface:#}");
    } else {
        assert_eq!(iface["tc_ingress"], serde_json::json!(["bpf", "nm_pod_ingress"]), "{iface:#}");
    }
    assert!(agent.stop());
    assert!(scratch.cleanup().status.success());
    assert!(tc(&["qdisc", "show", "dev", &dev]).contains("clsact"), "their clsact qdisc must stay");
    let filters = tc(&["filter", "show", "dev", &dev, "ingress"]);
    assert!(filters.contains("pref 100 bpf") && !filters.contains("nm_pod"), "only ours go: {filters}");
    assert!(tcx_programs(&lab, "ingress").is_empty());
    tc(&["qdisc", "del", "dev", &dev, "clsact"]);
}

#[test]
fn bad_configuration_exits_2_with_a_message_naming_the_setting() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 4] = [
        (&["--external-cluster", "yes"], &[], "--external-cluster"),
        (&[], &[("RULE_DROP_INVALID_INPUT_ENABLE", "maybe")], "RULE_DROP_INVALID_INPUT_ENABLE"),
        (&["--pod-cidr-ipv4", "2001:db8::/64"], &[], "POD_CIDR_IPV4"),
        (&[], &[("NET_STACK", "ipv5")], "NET_STACK"),
    ];
    for (args, env, expect) in cases {
        let out = Command::new(common::agent::BIN)
            .arg("run")
            .args(args)
            .envs(env.iter().copied())
            .arg("--services-file")
            .arg("/nonexistent")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{args:?} {env:?}: {err}");
    }
    // Legacy names still work, with a deprecation warning; the run then stops at the missing
    // bpffs with a message saying what to do (configuration itself was accepted).
    let out = Command::new(common::agent::BIN)
        .args(["run", "--services-file", "/nonexistent", "--bpffs", "/nonexistent/bpffs"])
        .env("RULE_EXTERNAL_CLUSTER", "TRUE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("RULE_EXTERNAL_CLUSTER is deprecated"), "{err}");
    assert!(err.contains("/nonexistent/bpffs does not exist") && err.contains("--bpffs"), "{err}");
    assert!(!std::path::Path::new("/nonexistent").exists(), "the agent must not create directories to mount on");
}
