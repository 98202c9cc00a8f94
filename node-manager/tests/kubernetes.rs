//! The Kubernetes source's settings against the real kube-apiserver (`lab::kube::Cluster`,
//! objects created with the real kubectl): pod CIDR overrides, the legacy POD_NODE_NAME, the
//! periodic resync repairing a map edited behind the agent's back, bad settings, and a Service
//! created in the apiserver making the pod's traffic to its LB IP work (on the lab's stand-in
//! IPVS black hole, the case the rewrite exists for). The controller's behaviour against the
//! API (changes, outages, 410 Gone, bookmarks, refused objects) is in `real_kubernetes.rs`.
//! The agents here use the lab's admin kubeconfig; the DaemonSet's own RBAC is tested there.
//! Assertions are on the pinned maps (`inspect --json`). Needs root and the components
//! (`cargo xtask kube`; `cargo xtask test` passes NM_KUBE_BIN).
mod common;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use common::agent::{Agent, BIN, Scratch, wait_for};
use lab::{
    Lab, Ns,
    kube::{ApiBridge, Cluster, Options, objects},
};

const NODE: &str = "node-a";
const WAIT: Duration = Duration::from_secs(30);

/// A LoadBalancer Service `a/<name>` (TCP ports), its LB IP set through the status subresource.
fn create_service(c: &Cluster, name: &str, cluster: &str, lb: &str, ports: &[u16]) {
    let mut yaml = objects::service_yaml("a", name, &[cluster], ports);
    // TCP only: drop the UDP port lines.
    yaml = yaml.lines().filter(|l| !l.contains("protocol: UDP")).map(|l| format!("{l}\n")).collect();
    c.apply(&yaml).unwrap();
    c.set_lb_ips("a", name, &[lb]).unwrap();
}

/// The apiserver, this node's Node (and another, which the field selector must keep out), and a
/// scratch bpffs.
struct Env {
    cluster: Cluster,
    scratch: Scratch,
    /// Reaches the apiserver from the lab's node namespace, if the agent runs there.
    _bridge: Option<ApiBridge>,
}

impl Env {
    fn new() -> Env {
        Self::with(Scratch::host(), None)
    }

    fn with(scratch: Scratch, node_netns: Option<&std::path::Path>) -> Env {
        let cluster = Cluster::start(&Options::default()).unwrap();
        let bridge = node_netns.map(|ns| ApiBridge::into_netns(ns, cluster.apiserver_port).unwrap());
        cluster.create_node(NODE, &["192.0.2.0/25", "2001:db8:1::/64"], &["192.0.2.129"]).unwrap();
        cluster.create_node("node-b", &["192.0.2.128/25"], &["192.0.2.130"]).unwrap();
        cluster.create_namespace("a").unwrap();
        Env { cluster, scratch, _bridge: bridge }
    }

    fn kubeconfig(&self) -> String {
        self.cluster.admin_kubeconfig().display().to_string()
    }

    fn agent(&self, extra: &[&str]) -> Agent {
        let kubeconfig = self.kubeconfig();
        let mut args = vec!["--kubeconfig", kubeconfig.as_str(), "--node-name", NODE];
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
    // spec.podCIDRs is immutable once set: the Node is replaced, as when a node re-registers.
    env.cluster.kubectl_ok(&["delete", "node", NODE]).unwrap();
    env.cluster.create_node(NODE, &["192.0.2.0/25", "2001:db8:1:2::/64"], &["192.0.2.129"]).unwrap();
    wait_for("the Node's IPv6 change", WAIT, || env.pod_cidrs() == ["192.0.2.64/27", "2001:db8:1:2::/64"]);
    drop(agent);
}

#[test]
fn legacy_pod_node_name_selects_the_node_with_a_deprecation_warning() {
    let env = Env::new();
    let log = env.scratch.file("legacy.log");
    let child = env
        .scratch
        .nm(&["run", "--kubeconfig", &env.kubeconfig()])
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
    create_service(&env.cluster, "one", "198.51.100.21", "203.0.113.1", &[80]);
    let agent = env.agent(&["--resync-period", "1s"]);
    let want = [("203.0.113.1:0/ICMP", "198.51.100.21"), ("203.0.113.1:80/TCP", "198.51.100.21")];
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

/// The whole path once: a Service created in the apiserver → a pod reaches EXT:port (on the
/// lab's stand-in IPVS black hole: the LB IP bound on kube-ipvs0 with nothing behind it).
#[test]
fn a_service_created_in_the_api_server_makes_the_pods_traffic_to_its_lb_ip_work() {
    let lab = Lab::new().unwrap();
    // The agent runs in the lab's node namespace: the apiserver is bridged into it.
    let env = Env::with(Scratch::new(&lab), Some(&lab.netns_path(Ns::Node)));
    env.cluster.kubectl_ok(&["delete", "node", NODE]).unwrap();
    env.cluster.create_node(NODE, &[lab::POD_CIDR_V4, lab::POD_CIDR_V6], &["192.0.2.129"]).unwrap();
    let agent = env.agent(&["--external-cluster", "true", "--pod-interfaces", "veth*"]);
    wait_for("the agent to attach", WAIT, || {
        env.scratch.inspect()["interfaces"].as_array().is_some_and(|i| !i.is_empty())
    });
    let to = std::net::SocketAddr::new(lab::EXTERNAL_V4.into(), lab::SERVICE_PORT);
    assert!(lab.tcp_request(Ns::Pod, to, b"x", Duration::from_secs(1)).is_err(), "no Service yet: no rewrite");

    let (c4, c6) = (lab::CLUSTER_V4.to_string(), lab::CLUSTER_V6.to_string());
    env.cluster.create_namespace("lab").unwrap();
    env.cluster.apply(&objects::service_yaml("lab", "web", &[&c4, &c6], &[lab::SERVICE_PORT])).unwrap();
    env.cluster.set_lb_ips("lab", "web", &[&lab::EXTERNAL_V4.to_string(), &lab::EXTERNAL_V6.to_string()]).unwrap();
    wait_for("the Service's frontends", WAIT, || env.frontends().len() == 6);
    for ip in [IpAddr::from(lab::EXTERNAL_V4), IpAddr::from(lab::EXTERNAL_V6)] {
        let to = std::net::SocketAddr::new(ip, lab::SERVICE_PORT);
        let reply = lab
            .tcp_request(Ns::Pod, to, b"tcp", Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("TCP to {to}: {e:#}\n{}", agent.log()));
        assert_eq!(reply.data, b"echo:tcp");
        assert_eq!(reply.peer, to, "the pod sees the external address as its peer");
    }
    env.cluster.kubectl_ok(&["delete", "svc", "web", "-n", "lab"]).unwrap();
    wait_for("the frontends to go", WAIT, || env.frontends().is_empty());
    assert!(lab.tcp_request(Ns::Pod, to, b"x", Duration::from_secs(1)).is_err());
    drop(agent);
}
