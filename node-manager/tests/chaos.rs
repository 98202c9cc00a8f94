//! Chaos, with stable flows running throughout (`common::stable`: a TCP connection and a
//! connected UDP socket per family from the lab's pod to the external address, a round trip
//! every 20 ms). Each test breaks something while the flows run, then checks that the
//! datapath converges to the desired state by itself (no cleanup, no manual repair; a killed
//! agent is only started again, as the kubelet would) within the bound it states, and that no
//! stable flow was interrupted (no error, no missing echo, no gap over [`GAP_BOUND`]).
//!
//! - the agent's kube-apiserver killed and restarted in the middle of a burst of changes that
//!   goes on through the other apiserver of the (highly available) control plane;
//! - the agent SIGKILLed during its initial sync of 10,000 Services;
//! - every pin removed behind the agent's back;
//! - pod interfaces created and deleted at 50 per second next to the stable flows.
//!
//! The API is the real kube-apiserver and etcd (`lab::kube`, objects created with the real
//! kubectl). `NM_LONG=1` runs longer variants (more outages and kills, a minute of churn). Needs
//! root and the components (`cargo xtask kube`; `cargo xtask test` passes NM_KUBE_BIN).
mod common;

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    agent::{Agent, Scratch, lab_agent_args, wait_for, write},
    scale::{NODE, pinned_frontends, real_frontends, real_service_yaml},
    stable::{STABLE_PORT, StableFlows, service_json},
};
use lab::{
    Lab, Ns,
    kube::{ApiBridge, Cluster, Options, objects},
};
use node_manager::kernel::sys;
use node_manager_common::{Frontend, FrontendKey, v4_mapped};

/// Longest time a stable flow may go without an echo (they send every 20 ms; this leaves room
/// for a loaded 2-core machine, and is far below any timeout an application would notice).
const GAP_BOUND: Duration = Duration::from_secs(1);
/// The agent restores removed pins and releases links of vanished interfaces at its rescan,
/// every 5 s.
const REPAIR_BOUND: Duration = Duration::from_secs(10);

fn long() -> bool {
    std::env::var("NM_LONG").is_ok_and(|v| v == "1")
}

/// The stable Service's frontends: 8080 and 9090, TCP and UDP, and echo, per family.
fn stable_frontends() -> BTreeMap<FrontendKey, Frontend> {
    let mut out = BTreeMap::new();
    for (ext, cluster, icmp) in [
        (v4_mapped(lab::EXTERNAL_V4.octets()), v4_mapped(lab::CLUSTER_V4.octets()), 1),
        (lab::EXTERNAL_V6.octets(), lab::CLUSTER_V6.octets(), 58),
    ] {
        let value = Frontend { cluster_addr: cluster };
        for port in [8080u16, STABLE_PORT] {
            for proto in [6, 17] {
                out.insert(FrontendKey { addr: ext, port: port.to_be(), proto, pad: 0 }, value);
            }
        }
        out.insert(FrontendKey { addr: ext, port: 0, proto: icmp, pad: 0 }, value);
    }
    out
}

/// `real_service_yaml(0..n)` and the stable Service together.
fn expected(n: u32) -> BTreeMap<FrontendKey, Frontend> {
    let mut want = real_frontends(0..n);
    want.extend(stable_frontends());
    want
}

fn wait_frontends(
    scratch: &Scratch,
    agent: &Agent,
    want: &BTreeMap<FrontendKey, Frontend>,
    bound: Duration,
    what: &str,
) -> Duration {
    let started = Instant::now();
    loop {
        let have = pinned_frontends(&scratch.bpffs);
        if have == *want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound,
            "{what}: {} frontends after {bound:?}, want {}\nagent log (tail):\n{}",
            have.len(),
            want.len(),
            tail(&agent.log())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// The agent with the stable Service from a file, attached to the lab's pod interface.
fn file_agent(lab: &Lab, scratch: &Scratch) -> Agent {
    let services = scratch.file("services.json");
    write(&services, &service_json().to_string());
    let agent = Agent::start(scratch, &lab_agent_args(services.to_str().unwrap()));
    wait_attached(lab, scratch, &agent);
    agent
}

fn wait_attached(lab: &Lab, scratch: &Scratch, agent: &Agent) {
    let started = Instant::now();
    loop {
        let ok = scratch.try_inspect().is_ok_and(|s| {
            s["interfaces"].as_array().is_some_and(|i| i.iter().any(|i| i["name"] == lab.pod_host_if()))
                && s["cgroup_hooks"].as_array().is_some_and(|h| h.len() == node_manager::kernel::cgroup::HOOKS.len())
        });
        if ok && pinned_frontends(&scratch.bpffs).len() >= stable_frontends().len() {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "agent not ready:\n{}", tail(&agent.log()));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent watching the apiserver (bridged into the lab's node namespace, where it runs), as
/// the lab's administrator.
fn api_agent(scratch: &Scratch, api: &Api) -> Agent {
    let kubeconfig = api.cluster.admin_kubeconfig();
    Agent::start(
        scratch,
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--node-name",
            NODE,
            "--external-cluster",
            "true",
            "--resync-period",
            "5s",
        ],
    )
}

/// The control plane, bridged into the lab's node namespace, with this node's Node and the
/// stable Service.
struct Api {
    /// Dropped first: the bridge's connections go to the cluster's apiserver.
    _bridge: ApiBridge,
    cluster: Cluster,
}

impl Api {
    fn start(lab: &Lab, opts: &Options) -> Api {
        let cluster = Cluster::start(opts).unwrap();
        let bridge = ApiBridge::into_netns(&lab.netns_path(Ns::Node), cluster.apiserver_port).unwrap();
        cluster.create_node(NODE, &[lab::POD_CIDR_V4, lab::POD_CIDR_V6], &["192.0.2.129"]).unwrap();
        for ns in ["lab", "ok"] {
            cluster.create_namespace(ns).unwrap();
        }
        let clusters = [lab::CLUSTER_V4.to_string(), lab::CLUSTER_V6.to_string()];
        let clusters: Vec<&str> = clusters.iter().map(String::as_str).collect();
        cluster.apply(&objects::service_yaml("lab", "web", &clusters, &[8080, STABLE_PORT])).unwrap();
        let lbs = [lab::EXTERNAL_V4.to_string(), lab::EXTERNAL_V6.to_string()];
        cluster.set_lb_ips("lab", "web", &[&lbs[0], &lbs[1]]).unwrap();
        Api { _bridge: bridge, cluster }
    }

    /// `real_service_yaml(range)`, created by `parallel` kubectl processes.
    fn create_services(&self, range: std::ops::Range<u32>, parallel: u32) {
        let mut lists = vec![String::new(); parallel as usize];
        for n in range {
            lists[(n % parallel) as usize].push_str(&real_service_yaml(n));
        }
        let inputs: Vec<&str> = lists.iter().map(String::as_str).filter(|l| !l.is_empty()).collect();
        self.cluster.kubectl_stdin_parallel(&["create", "-f", "-", "-o", "name"], &inputs).unwrap();
    }
}

#[test]
fn api_server_killed_and_restarted_mid_stream() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let mut api = Api::start(&lab, &Options { standby_apiserver: true, ..Options::default() });
    api.create_services(0..100, 1);
    let agent = api_agent(&scratch, &api);
    wait_attached(&lab, &scratch, &agent);
    wait_frontends(&scratch, &agent, &expected(100), Duration::from_secs(20), "initial sync");
    let flows = StableFlows::start(&lab);

    let outages = if long() { 5 } else { 1 };
    let mut total = 100;
    let mut worst = Duration::ZERO;
    for outage in 0..outages {
        // A burst of 300 new Services in three batches: the agent's apiserver is killed
        // (SIGKILL: every watch cut) after the first, and the other two go through the standby
        // apiserver while it is down.
        let burst = total..total + 300;
        api.create_services(burst.start..burst.start + 100, 1);
        api.cluster.stop_apiserver();
        let mut lowest = pinned_frontends(&scratch.bpffs).len();
        for batch in 1..3 {
            let start = burst.start + 100 * batch;
            api.create_services(start..start + 100, 1);
            lowest = lowest.min(pinned_frontends(&scratch.bpffs).len());
        }
        total = burst.end;
        std::thread::sleep(Duration::from_secs(2));
        // While it was down the maps kept everything they had.
        let during = pinned_frontends(&scratch.bpffs).len();
        assert!(
            lowest.min(during) >= expected(burst.start).len(),
            "entries dropped during the outage: {lowest}, {during}"
        );
        api.cluster.start_apiserver().unwrap();
        let took = wait_frontends(
            &scratch,
            &agent,
            &expected(total),
            Duration::from_secs(60),
            "after the API server came back",
        );
        eprintln!(
            "outage {outage}: converged to {} entries {took:.1?} after the API server restarted",
            expected(total).len()
        );
        worst = worst.max(took);
    }
    flows.assert_uninterrupted(GAP_BOUND, "API server restarts");
    eprintln!("API server killed mid-burst {outages} time(s): converged within {worst:.1?} (bound 60 s)");
    drop(agent);
    api.cluster.quiet();
}

#[test]
fn agent_killed_during_the_initial_sync_of_ten_thousand_services() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let mut api = Api::start(&lab, &Options::default());
    let first = api_agent(&scratch, &api);
    wait_attached(&lab, &scratch, &first);
    let flows = StableFlows::start(&lab);
    // The first agent goes away (SIGKILL too); then 10,000 Services appear.
    drop(first);
    let created = Instant::now();
    api.create_services(0..10_000, 4);
    eprintln!("created 10,000 Services with kubectl in {:.1?}", created.elapsed());
    let want = expected(10_000);

    let kills = if long() { 4 } else { 2 };
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let mut rng = fastrand::Rng::with_seed(u64::from(seed));
    eprintln!("kill delays from seed {seed}");
    let mut killed = 0;
    let mut delay_ms = 1000;
    while killed < kills {
        let mut agent = api_agent(&scratch, &api);
        let delay = Duration::from_millis(rng.u64(200..delay_ms));
        std::thread::sleep(delay);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(agent.child.id() as i32, libc::SIGKILL) };
        let _ = agent.child.wait();
        let log = agent.log();
        if log.contains("frontends synced") {
            eprintln!("agent finished its initial sync within {delay:.1?}; killing earlier next time");
            delay_ms = (delay_ms / 2).max(300);
            continue;
        }
        killed += 1;
        let held = pinned_frontends(&scratch.bpffs).len();
        eprintln!(
            "agent SIGKILLed {delay:.1?} after start, before its initial sync completed; map holds {held} entries"
        );
        // What the datapath had keeps serving: the stable Service's entries are all there.
        let have = pinned_frontends(&scratch.bpffs);
        assert!(stable_frontends().iter().all(|(k, v)| have.get(k) == Some(v)), "stable entries lost");
    }
    // Started again, as the kubelet would: the new agent converges.
    let agent = api_agent(&scratch, &api);
    let took = wait_frontends(&scratch, &agent, &want, Duration::from_secs(60), "after the restart");
    eprintln!("restarted agent converged to {} entries in {took:.1?} (bound 60 s)", want.len());
    wait_attached(&lab, &scratch, &agent);
    flows.assert_uninterrupted(GAP_BOUND, "agent killed during its initial sync");
    api.cluster.quiet();
}

/// Every pin under `dir` (relative name) with the id of the object it refers to.
fn pinned_ids(dir: &Path) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for sub in ["maps", "links"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else { continue };
        for e in entries.flatten() {
            let name = format!("{sub}/{}", e.file_name().to_string_lossy());
            let id = if sub == "maps" {
                aya::maps::MapInfo::from_pin(e.path()).map(|i| i.id()).ok()
            } else {
                sys::obj_get(&e.path()).and_then(|fd| sys::link_info(std::os::fd::AsFd::as_fd(&fd))).map(|i| i.id).ok()
            };
            if let Some(id) = id {
                out.insert(name, id);
            }
        }
    }
    out
}

#[test]
fn pins_removed_behind_the_agents_back_are_restored_and_traffic_goes_on() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let agent = file_agent(&lab, &scratch);
    let flows = StableFlows::start(&lab);
    let dir = scratch.bpffs.join("node-manager/v1");
    let before = pinned_ids(&dir);
    assert!(before.len() >= 9 + 2 + 8 + 2, "pins before: {before:#?}");

    // Everything: maps, TCX links, cgroup links, netfilter links, the directories.
    std::fs::remove_dir_all(&dir).unwrap();
    let removed = Instant::now();
    let mut after = pinned_ids(&dir);
    while after.keys().ne(before.keys()) {
        assert!(
            removed.elapsed() < REPAIR_BOUND,
            "pins not restored after {REPAIR_BOUND:?}: {after:#?}\n{}",
            tail(&agent.log())
        );
        std::thread::sleep(Duration::from_millis(100));
        after = pinned_ids(&dir);
    }
    let took = removed.elapsed();
    // The maps and the TCX and cgroup links are the same live objects; the INVALID drop's
    // netfilter links are new (its module links them again, at the other priority).
    for (name, id) in &before {
        if !name.starts_with("links/netfilter_") {
            assert_eq!(after[name], *id, "{name} must point at the same live object again");
        }
    }
    eprintln!("{} pins removed; all restored after {took:.1?} (bound {REPAIR_BOUND:?})", before.len());
    assert!(agent.log().contains("restored (the object stayed live)"));
    let state = scratch.inspect();
    // The stable flows' entries are in the flow map the restored pin names.
    let remembered = state["flows"].as_u64().unwrap() + state["datagram_flows"].as_u64().unwrap();
    assert!(remembered >= 4, "TCP {} + UDP/ICMP {}", state["flows"], state["datagram_flows"]);

    // The restored pins are usable: a restarted agent adopts the same maps and links.
    assert!(agent.stop());
    let agent = file_agent(&lab, &scratch);
    let adopted = pinned_ids(&dir);
    for (name, id) in &before {
        if name.starts_with("maps/") {
            assert_eq!(adopted[name], *id, "{name}: a restarted agent must adopt the live map");
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    flows.assert_uninterrupted(GAP_BOUND, "pins removed");
    drop(agent);
}

/// Links in the whole system that run one of these programs.
fn links_running(prog_ids: &[u32]) -> usize {
    sys::link_ids()
        .into_iter()
        .filter_map(|id| sys::link_by_id(id).ok())
        .filter_map(|fd| sys::link_info(std::os::fd::AsFd::as_fd(&fd)).ok())
        .filter(|i| prog_ids.contains(&i.prog_id))
        .count()
}

#[test]
fn pod_interfaces_churning_at_50_per_second_leave_stable_flows_alone() {
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let agent = file_agent(&lab, &scratch);
    let links = scratch.bpffs.join("node-manager/v1/links");
    let tc_pins = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&links)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("if"))
            .collect();
        v.sort();
        v
    };
    let main_pins = tc_pins();
    assert_eq!(main_pins.len(), 2, "{main_pins:?}");
    let prog_ids: Vec<u32> = main_pins
        .iter()
        .map(|p| sys::link_info(std::os::fd::AsFd::as_fd(&sys::obj_get(&links.join(p)).unwrap())).unwrap().prog_id)
        .collect();
    let flows = StableFlows::start(&lab);

    // A veth pair created every 20 ms; every 200 ms the ten created before the last ten are
    // deleted at once (one interface group: deleting interfaces one by one costs the kernel
    // ~18 ms each, an RCU grace period under the RTNL lock, which alone caps the rate near
    // 50/s here; kubelet tears pods down concurrently). All through one `ip -batch` process.
    let seconds = if long() { 60 } else { 6 };
    let mut ip = Command::new("ip")
        .args(["-n", lab.ns_name(Ns::Node), "-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Requests are queued to `ip` by a writer thread, so that a kernel falling behind (see
    // below) never slows down the schedule they are made on.
    let mut stdin = ip.stdin.take().unwrap();
    let (queue, requests) = std::sync::mpsc::channel::<String>();
    let writer = std::thread::spawn(move || {
        for lines in requests {
            stdin.write_all(lines.as_bytes()).unwrap();
            stdin.flush().unwrap();
        }
    });
    let started = Instant::now();
    let mut created = 0u32;
    while started.elapsed() < Duration::from_secs(seconds) {
        let group = 1 + created / 10;
        let mut lines =
            format!("link add vethc{created} group {group} up type veth peer name pc{created} group {group}\n");
        if created % 10 == 9 && group > 1 {
            lines.push_str(&format!("link del group {}\n", group - 1));
        }
        queue.send(lines).unwrap();
        created += 1;
        let next = Duration::from_millis(20) * created;
        if let Some(wait) = next.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let last_group = (created - 1) / 10 + 1;
    for group in last_group.saturating_sub(1)..=last_group {
        queue.send(format!("link del group {group}\n")).unwrap();
    }
    let requested = f64::from(created) / started.elapsed().as_secs_f64();
    drop(queue);
    writer.join().unwrap();
    let out = ip.wait_with_output().unwrap();
    let completed = f64::from(created) / started.elapsed().as_secs_f64();
    // Requests go out at 50/s; the kernel completes them more slowly while the agent attaches
    // (every TCX link creation waits for an RCU grace period under the RTNL lock, which
    // `ip link` needs too): reported, not asserted.
    eprintln!(
        "{created} veth pairs requested at {requested:.0}/s (created and deleted); the kernel completed them in {:.1?} ({completed:.0}/s)",
        started.elapsed()
    );
    assert!(requested >= 45.0, "churn requested too slowly: {requested:.1}/s");
    // `-force` goes on past deletions of groups that are already gone; anything else is a
    // failure of the generator.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let unexpected: Vec<&str> =
        stderr.lines().filter(|l| !l.contains("No such device") && !l.starts_with("Command failed")).collect();
    assert!(unexpected.is_empty(), "ip -batch: {unexpected:?}");

    // Converged: only the pod's own interface is attached, and only its two links exist.
    let done = Instant::now();
    wait_for("the links of the deleted interfaces to be released", REPAIR_BOUND, || {
        tc_pins() == main_pins && links_running(&prog_ids) == 2
    });
    let took = done.elapsed();
    let log = agent.log();
    let attached = log.lines().filter(|l| l.contains("attached") && l.contains("vethc")).count();
    let detached = log.lines().filter(|l| l.contains("detached") && l.contains("vethc")).count();
    eprintln!(
        "agent attached {attached} and released {detached} of the churned interfaces; converged {took:.1?} after the churn"
    );
    assert!(attached > 0, "the agent attached none of the new interfaces");
    // A new interface is still picked up.
    let mut ip = lab.command(Ns::Node, "ip");
    assert!(ip.args(["link", "add", "vethlast", "type", "veth", "peer", "name", "plast"]).status().unwrap().success());
    wait_for("a new interface to be attached after the churn", REPAIR_BOUND, || tc_pins().len() == 4);
    flows.assert_uninterrupted(GAP_BOUND, "interface churn");
    drop(agent);
}
