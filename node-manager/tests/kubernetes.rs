//! The Kubernetes source end to end: the real agent binary, with the real kube-rs client,
//! against `fake-apiserver` (list/watch over HTTP on loopback, since no kube-apiserver can be
//! installed here). Assertions are on the pinned maps, read with `node-manager inspect --json`
//! or directly, never on the agent's internals. Needs root (bpffs, BPF maps).
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
fn services_are_followed_by_diff_through_create_update_delete_and_node_changes() {
    let env = Env::new();
    env.server.apply(service("shop", "web", "198.51.100.10", &["203.0.113.10"], &[8080]));
    let agent = env.agent(&[]);
    env.wait_frontends(
        &agent,
        "created",
        &[("203.0.113.10:0/ICMP", "198.51.100.10"), ("203.0.113.10:8080/TCP", "198.51.100.10")],
    );
    wait_for("the Node's pod CIDRs", WAIT, || env.pod_cidrs() == ["192.0.2.0/25", "2001:db8:1::/64"]);
    // The Node was asked for by name, with a field selector.
    assert!(
        env.server
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/nodes?") && r.contains("fieldSelector=metadata.name=node-a")),
        "{:#?}",
        env.server.requests()
    );

    // The LB IP changes: the old entries go, the new ones come.
    env.server.apply(service("shop", "web", "198.51.100.10", &["203.0.113.11"], &[8080]));
    env.wait_frontends(
        &agent,
        "IP changed",
        &[("203.0.113.11:0/ICMP", "198.51.100.10"), ("203.0.113.11:8080/TCP", "198.51.100.10")],
    );
    // A port is added; a second Service shares the IP on another port; externalIPs of a
    // ClusterIP Service count too.
    env.server.apply(service("shop", "web", "198.51.100.10", &["203.0.113.11"], &[8080, 8443]));
    env.server.apply(service("shop", "api", "198.51.100.20", &["203.0.113.11"], &[9000]));
    env.server.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "ops", "name": "ext"},
        "spec": {"type": "ClusterIP", "clusterIP": "198.51.100.30", "externalIPs": ["203.0.113.30"], "ports": [{"port": 53, "protocol": "UDP"}]}}));
    env.wait_frontends(
        &agent,
        "port added, shared IP, externalIPs",
        &[
            ("203.0.113.11:0/ICMP", "198.51.100.20"), // echo: the Service sorting first (shop/api)
            ("203.0.113.11:8080/TCP", "198.51.100.10"),
            ("203.0.113.11:8443/TCP", "198.51.100.10"),
            ("203.0.113.11:9000/TCP", "198.51.100.20"),
            ("203.0.113.30:0/ICMP", "198.51.100.30"),
            ("203.0.113.30:53/UDP", "198.51.100.30"),
        ],
    );
    // Type changed to ClusterIP (the LB ingress goes with it); headless and malformed Services
    // add nothing, and the malformed one is named in the log.
    env.server.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "web"},
        "spec": {"type": "ClusterIP", "clusterIP": "198.51.100.10", "ports": [{"port": 8080}]}, "status": {"loadBalancer": {}}}));
    env.server
        .apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "shop", "name": "headless"},
        "spec": {"clusterIP": "None", "externalIPs": ["203.0.113.40"], "ports": [{"port": 80}]}}));
    env.server.apply(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "bad", "name": "broken"},
        "spec": {"type": "LoadBalancer", "clusterIP": "198.51.100.50", "ports": [{"port": "eighty"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.50"}]}}}));
    env.wait_frontends(
        &agent,
        "type changed",
        &[
            ("203.0.113.11:0/ICMP", "198.51.100.20"),
            ("203.0.113.11:9000/TCP", "198.51.100.20"),
            ("203.0.113.30:0/ICMP", "198.51.100.30"),
            ("203.0.113.30:53/UDP", "198.51.100.30"),
        ],
    );
    wait_for("a warning naming bad/broken", WAIT, || agent.log().contains("Service bad/broken: malformed spec"));

    // Deleted.
    env.server.delete("services", "ops/ext");
    env.wait_frontends(
        &agent,
        "deleted",
        &[("203.0.113.11:0/ICMP", "198.51.100.20"), ("203.0.113.11:9000/TCP", "198.51.100.20")],
    );

    // The Node's podCIDRs change, applied live; the other node's never appear.
    env.server.apply(node(&["192.0.2.0/26"]));
    wait_for("the new pod CIDRs", WAIT, || env.pod_cidrs() == ["192.0.2.0/26"]);
    env.server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-b"},
                            "spec": {"podCIDRs": ["192.0.2.128/26"]}}));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(env.pod_cidrs(), ["192.0.2.0/26"]);
    assert!(!agent.log().contains("panicked"), "{}", agent.log());
    assert!(agent.stop(), "clean exit on SIGTERM");
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
fn entries_survive_agent_and_api_server_outages_and_stale_ones_are_swept() {
    let mut env = Env::new();
    env.server.set_bookmark_interval(Duration::from_millis(200));
    env.server.apply(service("a", "one", "198.51.100.1", &["203.0.113.1"], &[80]));
    env.server.apply(service("a", "two", "198.51.100.2", &["203.0.113.2"], &[80]));
    let one = [("203.0.113.1:0/ICMP", "198.51.100.1"), ("203.0.113.1:80/TCP", "198.51.100.1")];
    let two = [("203.0.113.2:0/ICMP", "198.51.100.2"), ("203.0.113.2:80/TCP", "198.51.100.2")];
    let three = [("203.0.113.3:0/ICMP", "198.51.100.3"), ("203.0.113.3:80/TCP", "198.51.100.3")];
    let agent = env.agent(&[]);
    env.wait_frontends(&agent, "initial", &[one, two].concat());

    // The agent dies; meanwhile "two" is deleted and "three" created, and the API server is
    // down when the next agent starts: it adopts the maps and keeps serving them as they are.
    drop(agent); // SIGKILL
    env.server.delete("services", "a/two");
    env.server.apply(service("a", "three", "198.51.100.3", &["203.0.113.3"], &[80]));
    env.server.stop();
    let agent = env.agent(&["--metrics-addr", "127.0.0.1:0"]);
    wait_for("the agent to report the API unreachable", WAIT, || agent.log().contains("Kubernetes API: not ready"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(env.frontends().len(), 4, "nothing is flushed while the initial list cannot complete");
    assert!(agent.log().contains("adopting pinned map"), "{}", agent.log());
    let metrics = common::agent::metrics_addr(&agent.log()).expect("the metrics address in the log");
    let (status, body) = common::agent::http_get(metrics, "/readyz").unwrap();
    assert_eq!(status, 503, "not ready while the initial list cannot complete: {body}");
    // The API server is back: the deleted Service's entries are swept, the new one's added.
    env.server.restart().unwrap();
    env.wait_frontends(&agent, "after the outage", &[one, three].concat());
    wait_for("ready", WAIT, || agent.log().contains("Kubernetes API: ready"));
    assert_eq!(common::agent::http_get(metrics, "/readyz").unwrap().0, 200);
    let (_, body) = common::agent::http_get(metrics, "/metrics").unwrap();
    let restarts = body
        .lines()
        .find_map(|l| l.strip_prefix(r#"node_manager_watch_restarts_total{resource="Service"} "#))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(restarts.is_some_and(|n| n >= 1), "the failed watches are counted:\n{body}");

    // The API server restarts while the agent runs; changes made meanwhile arrive.
    env.server.stop();
    env.server.apply(service("a", "two", "198.51.100.2", &["203.0.113.2"], &[80]));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(env.frontends().len(), 4, "the datapath keeps its last state while the API is down");
    env.server.restart().unwrap();
    env.wait_frontends(&agent, "after the restart", &[one, two, three].concat());

    // Dropped connections: the watch resumes from its resourceVersion.
    env.server.drop_connections();
    env.server.delete("services", "a/one");
    env.wait_frontends(&agent, "after dropped connections", &[two, three].concat());

    // The history is compacted: the watch gets 410 Gone and relists; no entry may disappear
    // while it does, and a change made at the same time arrives.
    let lists_before = env.server.requests().iter().filter(|r| is_service_list(r)).count();
    env.server.compact();
    env.server.apply(service("a", "four", "198.51.100.4", &["203.0.113.4"], &[80]));
    let four = [("203.0.113.4:0/ICMP", "198.51.100.4"), ("203.0.113.4:80/TCP", "198.51.100.4")];
    let want: BTreeMap<String, String> =
        [two, three, four].concat().iter().map(|(f, c)| (f.to_string(), c.to_string())).collect();
    let start = Instant::now();
    loop {
        let have = env.frontends();
        assert!(have.len() >= 4, "entries dropped during the relist: {have:#?}");
        if have == want {
            break;
        }
        assert!(start.elapsed() < WAIT, "after 410: {have:#?}\n{}", agent.log());
    }
    let lists_after = env.server.requests().iter().filter(|r| is_service_list(r)).count();
    assert!(lists_after > lists_before, "a 410 must make the watcher relist");
    drop(agent);
}

fn is_service_list(request: &str) -> bool {
    request.starts_with("GET /api/v1/services?") && !request.contains("watch=")
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
