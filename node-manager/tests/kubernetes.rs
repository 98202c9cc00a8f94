//! The Kubernetes source's settings against `fake-apiserver`, the lab's stand-in (list/watch over
//! HTTP on loopback). The controller's behaviour against the API — changes, outages, restarts,
//! 410 Gone, bookmarks, refused objects — is tested against the real kube-apiserver in
//! `real_kubernetes.rs`; what stays here are agent settings whose API side is trivial (pod CIDR
//! overrides, the legacy POD_NODE_NAME, the periodic resync repairing a map edited behind the
//! agent's back, bad settings, a Service making pod traffic work), not yet moved to the real
//! apiserver. Assertions are on the pinned maps (`inspect --json`). Needs root.
mod common;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use common::agent::{Agent, BIN, Scratch, wait_for};
use fake_apiserver::FakeApiServer;
use lab::{Lab, Ns};
use serde_json::{Value, json};

const NODE: &str = "node-a";
const WAIT: Duration = Duration::from_secs(15);

fn service(ns: &str, name: &str, cluster: &str, ingress: &[&str], ports: &[u16]) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name,
                     "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}]},
        "spec": {"type": "LoadBalancer", "clusterIP": cluster, "clusterIPs": [cluster], "ipFamilies": ["IPv4"],
                 "externalTrafficPolicy": "Local",
                 "ports": ports.iter().map(|p| json!({"port": p, "protocol": "TCP", "targetPort": p})).collect::<Vec<_>>()},
        "status": {"loadBalancer": {"ingress": ingress.iter().map(|ip| json!({"ip": ip, "ipMode": "VIP"})).collect::<Vec<_>>()}},
    })
}

fn node(pod_cidrs: &[&str]) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
           "spec": {"podCIDR": pod_cidrs.first(), "podCIDRs": pod_cidrs}})
}

/// The fake API server, a kubeconfig for it, and a scratch bpffs.
struct Env {
    server: FakeApiServer,
    scratch: Scratch,
    kubeconfig: PathBuf,
}

impl Env {
    fn new() -> Env {
        Self::with(FakeApiServer::start().unwrap(), Scratch::host())
    }

    fn with(server: FakeApiServer, scratch: Scratch) -> Env {
        let kubeconfig = scratch.file("kubeconfig");
        std::fs::write(&kubeconfig, server.kubeconfig()).unwrap();
        server.apply(node(&["192.0.2.0/25", "2001:db8:1::/64"]));
        // Another node: the field selector must keep its CIDRs out.
        server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"},
                            "spec": {"podCIDRs": ["192.0.2.128/25"]}}));
        Env { server, scratch, kubeconfig }
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        let mut args = vec!["--kubeconfig", self.kubeconfig.to_str().unwrap(), "--node-name", NODE];
        args.extend_from_slice(extra);
        Agent::start(&self.scratch, &args)
    }

    /// The frontends map: "addr:port/proto" → cluster IP (empty until the agent has pinned
    /// its maps).
    fn frontends(&self) -> BTreeMap<String, String> {
        let Ok(state) = self.scratch.try_inspect() else { return BTreeMap::new() };
        state["frontends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["frontend"].as_str().unwrap().to_owned(), f["cluster_ip"].as_str().unwrap().to_owned()))
            .collect()
    }

    fn pod_cidrs(&self) -> Vec<String> {
        let Ok(state) = self.scratch.try_inspect() else { return Vec::new() };
        state["pod_cidrs"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect()
    }

    fn wait_frontends(&self, agent: &Agent, what: &str, want: &[(&str, &str)]) {
        let want: BTreeMap<String, String> = want.iter().map(|(f, c)| (f.to_string(), c.to_string())).collect();
        let start = Instant::now();
        loop {
            let have = self.frontends();
            if have == want {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "{what}: frontends are {have:#?}, want {want:#?}\nagent log:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn pod_cidr_override_wins_per_family_over_the_node() {
    let env = Env::new();
    let agent = env.agent(&["--pod-cidr-ipv4", "192.0.2.64/27"]);
    // IPv4 from the override (the Node says 192.0.2.0/25), IPv6 still from the Node.
    wait_for("pod CIDRs", WAIT, || env.pod_cidrs() == ["192.0.2.64/27", "2001:db8:1::/64"]);
    env.server.apply(node(&["192.0.2.0/25", "2001:db8:1:2::/64"]));
    wait_for("the Node's IPv6 change", WAIT, || env.pod_cidrs() == ["192.0.2.64/27", "2001:db8:1:2::/64"]);
    drop(agent);
}

#[test]
fn legacy_pod_node_name_selects_the_node_with_a_deprecation_warning() {
    let env = Env::new();
    let log = env.scratch.file("legacy.log");
    let child = env
        .scratch
        .nm(&["run", "--kubeconfig", env.kubeconfig.to_str().unwrap()])
        .env("POD_NODE_NAME", NODE)
        .env_remove("NODE_NAME")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let agent = Agent { child, log };
    wait_for("node-a's pod CIDRs", WAIT, || env.pod_cidrs() == ["192.0.2.0/25", "2001:db8:1::/64"]);
    assert!(agent.log().contains("POD_NODE_NAME is deprecated"), "{}", agent.log());
}

#[test]
fn the_periodic_resync_repairs_entries_changed_behind_the_agents_back() {
    use node_manager::{kernel::maps, model::FrontendAddr};
    let env = Env::new();
    env.server.apply(service("a", "one", "198.51.100.1", &["203.0.113.1"], &[80]));
    let agent = env.agent(&["--resync-period", "1s"]);
    let want = [("203.0.113.1:0/ICMP", "198.51.100.1"), ("203.0.113.1:80/TCP", "198.51.100.1")];
    env.wait_frontends(&agent, "initial", &want);

    // Another process (as bpftool would) deletes one entry, redirects none to a wrong
    // cluster IP and adds one the API never had.
    let pin = env.scratch.bpffs.join("node-manager/v1/maps/NM_FRONTENDS");
    let mut map: aya::maps::HashMap<_, node_manager_common::FrontendKey, node_manager_common::Frontend> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(aya::maps::MapData::from_pin(&pin).unwrap())).unwrap();
    let fe = |s: &str, port: u16| FrontendAddr {
        addr: s.parse::<IpAddr>().unwrap(),
        port,
        protocol: node_manager::model::Protocol::Tcp,
    };
    map.remove(&maps::frontend_key(&fe("203.0.113.1", 80))).unwrap();
    let bogus = node_manager_common::Frontend { cluster_addr: maps::addr16("198.51.100.99".parse().unwrap()) };
    map.insert(maps::frontend_key(&fe("203.0.113.99", 80)), bogus, 0).unwrap();
    assert_eq!(env.frontends().len(), 2);
    assert!(env.frontends().contains_key("203.0.113.99:80/TCP"));
    env.wait_frontends(&agent, "repaired by the resync", &want);
    drop(agent);
}

#[test]
fn bad_settings_exit_2_naming_them() {
    for (args, env, expect) in [
        (vec!["--resync-period", "soon"], vec![], "--resync-period"),
        (vec![], vec![("RESYNC_PERIOD", "0s")], "RESYNC_PERIOD"),
    ] {
        let out = Command::new(BIN).arg("run").args(&args).envs(env.iter().copied()).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(expect), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The whole path once: a Service created in the API server → a pod reaches EXT:port.
#[test]
fn a_service_created_in_the_api_server_makes_the_pods_traffic_to_its_lb_ip_work() {
    let lab = Lab::new().unwrap();
    // The agent runs in the lab's node namespace, so the API server listens on that
    // namespace's loopback.
    let server = lab::in_netns(lab.netns_path(Ns::Node), || Ok(FakeApiServer::start()?)).unwrap();
    let env = Env::with(server, Scratch::new(&lab));
    env.server.apply(node(&[lab::POD_CIDR_V4, lab::POD_CIDR_V6]));
    let agent = env.agent(&["--external-cluster", "true", "--pod-interfaces", "veth*"]);
    wait_for("the agent to attach", WAIT, || {
        env.scratch.inspect()["interfaces"].as_array().is_some_and(|i| !i.is_empty())
    });
    let to = std::net::SocketAddr::new(lab::EXTERNAL_V4.into(), lab::SERVICE_PORT);
    assert!(lab.tcp_request(Ns::Pod, to, b"x", Duration::from_secs(1)).is_err(), "no Service yet: no rewrite");

    let svc: Value = serde_yaml_from_lab();
    env.server.apply(svc);
    wait_for("the Service's frontends", WAIT, || env.frontends().len() == 6);
    for ip in [IpAddr::from(lab::EXTERNAL_V4), IpAddr::from(lab::EXTERNAL_V6)] {
        let to = std::net::SocketAddr::new(ip, lab::SERVICE_PORT);
        let reply = lab
            .tcp_request(Ns::Pod, to, b"tcp", Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("TCP to {to}: {e:#}\n{}", agent.log()));
        assert_eq!(reply.data, b"echo:tcp");
        assert_eq!(reply.peer, to, "the pod sees the external address as its peer");
    }
    env.server.delete("services", "lab/web");
    wait_for("the frontends to go", WAIT, || env.frontends().is_empty());
    assert!(lab.tcp_request(Ns::Pod, to, b"x", Duration::from_secs(1)).is_err());
    drop(agent);
}

/// The lab's Service (as `tests/netns.rs` uses from a file) as the API would serve it.
fn serde_yaml_from_lab() -> Value {
    let yaml = common::agent::lab_service_yaml("web");
    let v: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    serde_json::to_value(v).unwrap()
}
