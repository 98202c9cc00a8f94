//! Kernel feature probing, checked against the kernel it runs on (the kernel matrix runs this on
//! 5.10, 6.1, 6.12 and newer): the probes agree with what each kernel version has, the agent
//! reports and uses the mechanism they pick (netlink cls_bpf and nftables where TCX and BPF
//! netfilter links are missing), and a program the verifier rejects costs only its own feature,
//! never the agent. Needs root.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::{
    agent::{Agent, Scratch, lab_agent_args, lab_service_yaml, wait_for, write},
    kernel,
};
use lab::{Lab, Ns};
use node_manager::kernel::{
    probe,
    report::{DROP_INVALID, POD_TC, SOCKET_HOOKS},
    sys,
};
use serde_json::Value;

#[test]
fn probes_match_what_this_kernel_version_has() {
    let p = probe::probe();
    let (major, minor) = kernel::version();
    assert_eq!(p.tcx.ok, kernel::has_tcx(), "TCX on {major}.{minor}: {:?}", p.tcx);
    assert_eq!(p.netfilter_links.ok, kernel::has_netfilter_links(), "netfilter links on {major}.{minor}: {p:?}");
    assert_eq!(p.cgroup_links.ok, kernel::at_least(5, 8), "{:?}", p.cgroup_links);
    // Every kernel the project supports (Debian's since 5.10) has BTF.
    assert!(p.kernel_btf.ok && p.map_btf.ok, "{:?} {:?}", p.kernel_btf, p.map_btf);
    // Helpers are checked for every program whose type the kernel has, and none is missing.
    let programs: Vec<&str> = p.helpers.iter().map(|h| h.program.as_str()).collect();
    assert!(programs.contains(&"nm_pod_ingress") && programs.contains(&"nm_sock_getpeername6"), "{programs:?}");
    assert_eq!(programs.contains(&"nm_drop_invalid4"), kernel::has_netfilter_links(), "{programs:?}");
    for h in &p.helpers {
        assert!(h.missing.is_empty(), "{} lacks {:?}", h.program, h.missing);
        assert!(h.used.iter().any(|u| u == "bpf_map_lookup_elem"), "{h:?}");
    }
    // The helper probe tells a helper the kernel has from one it does not.
    assert!(probe::helper_known(sys::BPF_PROG_TYPE_SCHED_CLS, 0, 1), "bpf_map_lookup_elem");
    assert!(!probe::helper_known(sys::BPF_PROG_TYPE_SCHED_CLS, 0, 100_000), "helper #100000");
}

fn feature<'a>(state: &'a Value, name: &str) -> &'a Value {
    let features = state["kernel_features"]["features"].as_array().unwrap_or_else(|| panic!("no report: {state:#}"));
    features.iter().find(|f| f["feature"] == name).unwrap_or_else(|| panic!("no {name} in {state:#}"))
}

#[test]
fn the_agent_reports_the_mechanisms_it_uses_and_inspect_shows_them() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    let agent = Agent::start(&scratch, &lab_agent_args(services.to_str().unwrap()));
    wait_for("the agent's report, the interface and the socket hooks", Duration::from_secs(30), || {
        scratch.try_inspect().is_ok_and(|s| {
            s["kernel_features"]["source"] == "agent"
                && s["interfaces"].as_array().is_some_and(|i| !i.is_empty())
                && s["cgroup_hooks"].as_array().is_some_and(|h| h.len() == node_manager::kernel::cgroup::HOOKS.len())
        })
    });
    let state = scratch.inspect();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(state["kernel_features"]["release"], release.trim());

    let (tc, other_hook) = if kernel::has_tcx() { ("tcx", "tc") } else { ("netlink cls_bpf", "tcx") };
    assert_eq!(feature(&state, POD_TC)["mechanism"], tc, "{state:#}");
    assert_eq!(feature(&state, SOCKET_HOOKS)["mechanism"], "cgroup links");
    let drop = if kernel::has_netfilter_links() { "bpf" } else { "nftables" };
    assert_eq!(feature(&state, DROP_INVALID)["mechanism"], drop, "{state:#}");
    assert_eq!(state["drop_invalid"]["mode"], drop);
    if !kernel::has_netfilter_links() {
        assert!(feature(&state, DROP_INVALID)["why"].as_str().unwrap().contains("nftables fallback"), "{state:#}");
    }

    // The interface carries our two programs on that mechanism's hooks, nothing on the other.
    let iface = state["interfaces"].as_array().unwrap().iter().find(|i| i["name"] == lab.pod_host_if()).unwrap();
    let hook = if kernel::has_tcx() { "tcx" } else { "tc" };
    assert_eq!(iface[format!("{hook}_ingress")], serde_json::json!(["nm_pod_ingress"]), "{iface:#}");
    assert_eq!(iface[format!("{hook}_egress")], serde_json::json!(["nm_pod_egress"]), "{iface:#}");
    assert_eq!(iface[format!("{other_hook}_ingress")], serde_json::json!([]), "{iface:#}");
    // ... and it works.
    let to = SocketAddr::new(lab::EXTERNAL_V4.into(), lab::SERVICE_PORT);
    let reply =
        lab.tcp_request(Ns::Pod, to, b"x", Duration::from_secs(3)).unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));
    assert_eq!(reply.data, b"echo:x");

    let log = agent.log();
    assert!(log.contains("kernel features probed") && log.contains(tc), "{log}");
    assert!(!log.contains("feature unavailable"), "{log}");
    let text = scratch.nm(&["inspect"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("kernel features (Linux {}, recorded by the agent at start)", release.trim())),
        "{text}"
    );
    assert!(agent.stop());
}

#[test]
fn a_program_the_verifier_rejects_costs_only_its_feature() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    let fault = [(node_manager::kernel::fault::FAULT_ENV, "nm_pod_ingress")];
    let mut agent = Agent::start_with_env(&scratch, &lab_agent_args(services.to_str().unwrap()), &fault);
    wait_for("the agent's report and the socket hooks", Duration::from_secs(30), || {
        scratch.try_inspect().is_ok_and(|s| {
            s["kernel_features"]["source"] == "agent"
                && s["cgroup_hooks"].as_array().is_some_and(|h| h.len() == node_manager::kernel::cgroup::HOOKS.len())
                && s["drop_invalid"]["mode"].is_string()
        })
    });
    std::thread::sleep(Duration::from_secs(2)); // a rescan or two of the interfaces
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent exited:\n{}", agent.log());
    let state = scratch.inspect();
    let tc = feature(&state, POD_TC);
    assert_eq!(tc["available"], false, "{state:#}");
    assert_eq!(tc["mechanism"], "unavailable");
    // The verifier's own words for the faulty program of the same type.
    let why = tc["why"].as_str().unwrap();
    assert!(why.contains("nm_pod_ingress") && why.contains("R9 !read_ok"), "{why}");
    assert_eq!(state["interfaces"], serde_json::json!([]), "nothing attached without the programs");
    assert_eq!(feature(&state, SOCKET_HOOKS)["available"], true);
    assert!(agent.log().contains("feature unavailable on this kernel"), "{}", agent.log());
    // The pod path is not served; the rest of the agent is.
    let to = SocketAddr::new(lab::EXTERNAL_V4.into(), lab::SERVICE_PORT);
    assert!(lab.tcp_request(Ns::Pod, to, b"x", Duration::from_secs(2)).is_err());
    assert!(agent.stop());
}
