//! What the demo shows, in order: the node, both bugs without the agent, the agent starting,
//! both fixed with it, what `inspect` and bpftool show, and the cleanup.
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use lab::kube::ProxyMode;
use lab::reset::{self, ResetScenario};
use lab::{Ns, SERVICE_PORT};
use serde_json::Value;

use crate::host;
use crate::interrupt;
use crate::real::RealKube;
use crate::say::Say;
use crate::stage::Stage;

/// The cases, as named in the machine-readable `verdict` lines.
pub const POD_CASE: &str = "lb-ip-from-pod";
pub const HOST_CASE: &str = "lb-ip-from-host";
pub const RESET_CASE: &str = "pod-connection-after-invalid-segment";
/// Segments injected beyond the window.
const INJECTED: u32 = 3;
const T: Duration = Duration::from_secs(3);
/// The lab node's name (for the agent and, with the API server, its Node object).
const NODE_NAME: &str = "demo-node";
/// How long the agent may take to load, attach and fill its maps.
const READY_LIMIT: Duration = Duration::from_secs(30);

pub struct Verdict {
    pub case: &'static str,
    pub with_agent: bool,
    pub ok: bool,
    /// What the case should come out as: a bug fails without the agent and works with it;
    /// what kube-proxy already serves works both times.
    pub expected: bool,
    pub detail: String,
}

/// Which Kubernetes the node runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kube {
    /// The lab's stand-ins: a kube-proxy-like nftables DNAT and the LB IP bound on kube-ipvs0
    /// with nothing behind it, as kube-proxy IPVS did before kubernetes PR #97081; the Service
    /// from a services file.
    StandIn,
    /// The real etcd, kube-apiserver and kube-proxy in this mode, built in `bin`.
    Real { mode: ProxyMode, bin: PathBuf },
}

impl Kube {
    fn is_real(&self) -> bool {
        matches!(self, Kube::Real { .. })
    }
}

/// Runs the whole demo. The stage is torn down before returning (or while unwinding on an
/// error or Ctrl-C); the bool says whether the teardown left nothing behind.
pub fn run(agent_bin: &Path, kube: &Kube, say: &Say) -> Result<(Vec<Verdict>, bool)> {
    match kube {
        Kube::StandIn => intro(say),
        Kube::Real { mode, .. } => intro_real(say, *mode),
    }
    let stale = crate::stale::remove(agent_bin);
    if !stale.is_empty() {
        say.step("removing what an earlier demo left behind when it was killed");
        for line in &stale {
            say.text(line);
        }
    }
    say.step("building the node: network namespaces, a demo cgroup and a private bpffs");
    let started = Instant::now();
    let mut stage = Stage::build(agent_bin, kube.is_real())?;
    describe_stage(say, &stage, started);
    let source_args = match kube {
        Kube::StandIn => write_service(say, &stage)?,
        Kube::Real { mode, bin } => start_kubernetes(say, &mut stage, bin, *mode)?,
    };
    say.pause()?;

    let mut verdicts = Vec::new();
    say.step("1/5 without node-manager: a pod and a host process dial the LoadBalancer IP");
    verdicts.push(pod_to_lb(say, &stage, None)?);
    verdicts.push(host_to_lb(say, &stage, None)?);
    say.pause()?;

    say.step("2/5 without node-manager: a pod's connection to a server outside meets an out-of-window segment");
    verdicts.push(reset_case(say, &stage, false)?);
    say.pause()?;

    say.step("3/5 starting node-manager");
    start_agent(say, &mut stage, &source_args)?;
    say.pause()?;

    say.step("4/5 the same, with node-manager");
    let before = stage.inspect()?;
    verdicts.push(pod_to_lb(say, &stage, Some(&before))?);
    let before = stage.inspect()?;
    verdicts.push(host_to_lb(say, &stage, Some(&before))?);
    let mut v = reset_case(say, &stage, true)?;
    let dropped = dropped_v4(&stage.inspect()?);
    let _ = write!(v.detail, ", {dropped} dropped by node-manager (counter dropped_v4)");
    say.text(&format!("node-manager's INVALID drop counted {dropped} packet(s) dropped on IPv4 so far"));
    verdicts.push(v);
    say.pause()?;

    say.step("5/5 what node-manager inspect and bpftool show meanwhile");
    show_inspect(say, &stage)?;
    if say.interactive() {
        say.text(
            "The agent is still running: try these commands in another terminal, then press Enter\n\
             to stop it and clean up.",
        );
    }
    say.pause()?;

    stage.check_agent_alive()?;
    stage.teardown();
    Ok((verdicts, stage.clean))
}

fn intro(say: &Say) {
    say.step("node-manager demo");
    say.text(&format!(
        "A Kubernetes node built from network namespaces on this machine, with the lab's stand-ins for
kube-proxy (`--kube-proxy nftables` runs the real one instead). Nothing outside the namespaces is
touched, except a demo cgroup and a private bpffs, both removed at the end (also on Ctrl-C).

  pod {pod} ──veth── node ──eth0── endpoint {ep} (the Service's backend, on \"another node\")
                      │ kube-proxy stand-in (nftables DNAT): cluster IP {c}:{p} → {ep}:{p}
                      │ kube-ipvs0: LoadBalancer IP {e} bound locally, as kube-proxy IPVS did before
                      │   kubernetes PR #97081 for externalTrafficPolicy: Local on a node without a
                      │   local endpoint: nothing behind it
                      │ masquerade of pods' traffic to the outside
                      └ host process: socat, in the demo cgroup, in the node's network namespace

It shows two Kubernetes bugs without node-manager, then the same traffic with it:
  1. kubernetes#75262 / #93456: pods and host processes cannot reach a LoadBalancer IP of a
     Service with externalTrafficPolicy: Local under IPVS on a node without a local endpoint.
  2. kubernetes#74839 / #117924: a reply conntrack marks INVALID (far beyond the TCP window) is
     not de-NATed, reaches the node itself, and the node's RST kills the pod's connection.",
        pod = lab::POD_V4,
        ep = lab::ENDPOINT_V4,
        c = lab::CLUSTER_V4,
        e = lab::EXTERNAL_V4,
        p = SERVICE_PORT,
    ));
}

fn intro_real(say: &Say, mode: ProxyMode) {
    say.step("node-manager demo, on the real Kubernetes components");
    say.text(&format!(
        "A Kubernetes node built from network namespaces on this machine, with the real kube-apiserver,
etcd and kube-proxy ({mode} mode). Nothing outside the namespaces is touched, except a demo cgroup,
a private bpffs and the control plane's scratch directory, all removed at the end (also on Ctrl-C).

  pod {pod} ──veth── node ──eth0── endpoint {ep} (the Service's backend, on \"another node\")
                      │ kube-proxy ({mode}): cluster IP {c}:{p} and LoadBalancer IP {e}:{p}
                      │   → {ep}:{p}; externalTrafficPolicy: Local, no endpoint on this node
                      └ host process: socat, in the demo cgroup, in the node's network namespace

What it shows, without node-manager and then with it as deploy/node-manager.yaml runs it:
  1. kubernetes#75262: pods and host processes reach the LoadBalancer IP. kube-proxy serves this
     itself since kubernetes PR #97081 (IPVS) and always did in iptables and nftables mode, so
     node-manager's manifest keeps its rewrite off and nothing changes. Older kube-proxy IPVS
     releases black-holed it: `cargo xtask demo` without --kube-proxy shows that case.
  2. kubernetes#74839 / #117924: a reply conntrack marks INVALID (far beyond the TCP window) is
     not de-NATed by kube-proxy's DNAT, reaches the node itself, and the node's RST kills the
     pod's connection. This still happens with kube-proxy {mode}; node-manager drops it.",
        mode = mode.name(),
        pod = lab::POD_V4,
        ep = lab::ENDPOINT_V4,
        c = lab::CLUSTER_V4,
        e = lab::EXTERNAL_V4,
        p = SERVICE_PORT,
    ));
}

fn describe_stage(say: &Say, stage: &Stage, started: Instant) {
    let lab = stage.lab();
    say.text(&format!(
        "built in {:.1} s:
  network namespaces  pod {}, node {}, endpoint {}
  pod interface       {} on the node (node-manager attaches its TC programs here)
  demo cgroup         {}
                      (host processes run here and the socket hooks attach here, never to
                      this machine's root cgroup)
  private bpffs       {} (node-manager pins its maps and links here)",
        started.elapsed().as_secs_f64(),
        lab.ns_name(Ns::Pod),
        lab.ns_name(Ns::Node),
        lab.ns_name(Ns::Ep),
        lab.pod_host_if(),
        stage.cgroup().display(),
        stage.bpffs().display(),
    ));
}

/// Where the agent gets its Services (and pod CIDR) from.
struct AgentSource {
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// Writes the services file; returns the agent's arguments for it.
fn write_service(say: &Say, stage: &Stage) -> Result<AgentSource> {
    let yaml = service_yaml();
    std::fs::write(stage.services_file(), &yaml).context("writing the services file")?;
    say.step("the Service (node-manager reads it from a file here; in a cluster, from the API server)");
    say.command(&format!("cat {}", stage.services_file().display()), &yaml);
    Ok(AgentSource {
        args: vec![
            "--services-file".into(),
            stage.services_file().display().to_string(),
            "--pod-cidr-ipv4".into(),
            lab::POD_CIDR_V4.into(),
        ],
        env: Vec::new(),
    })
}

/// Starts etcd, kube-apiserver and kube-proxy, creates the Nodes, the Services and their
/// EndpointSlices with kubectl, applies node-manager's manifest; returns the agent's kubeconfig
/// and the manifest's env.
fn start_kubernetes(say: &Say, stage: &mut Stage, bin: &Path, mode: ProxyMode) -> Result<AgentSource> {
    say.step(&format!("starting the real Kubernetes components from {}", bin.display()));
    let started = Instant::now();
    let kube = RealKube::start(stage.lab(), bin, mode, NODE_NAME)?;
    say.text(&format!(
        "in {:.1} s: kube-apiserver {} with etcd on this machine's loopback (RBAC, a lab CA; reachable from the\n\
         node namespace at the same address), kube-proxy {} in {} mode in the node namespace (kube-proxy\n\
         reports {:?} at /proxyMode); the Nodes, Services and EndpointSlices created with kubectl, the\n\
         LoadBalancer IPs set through the status subresource as a load-balancer controller does",
        started.elapsed().as_secs_f64(),
        kube.apiserver_version,
        kube.kube_proxy_version,
        mode.name(),
        mode.name(),
    ));
    for args in [
        "get services -n demo -o wide",
        "get endpointslices -n demo",
        "get daemonset,serviceaccount -n kube-system -l app.kubernetes.io/name=node-manager",
    ] {
        let argv: Vec<&str> = args.split(' ').collect();
        say.command(&kube.kubectl_shown(args), &kube.kubectl(&argv)?);
    }
    say.text(
        "(deploy/node-manager.yaml applied with kubectl: no kubelet runs its DaemonSet here, the demo\n\
         starts the agent the way the pod would: its env, its ServiceAccount's token)",
    );
    let source = AgentSource {
        args: vec!["--kubeconfig".into(), kube.kubeconfig.display().to_string()],
        env: kube.manifest_env.clone(),
    };
    stage.kube = Some(kube);
    Ok(source)
}

fn service_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{namespace: demo, name: web}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  clusterIP: {c}
  ports:
  - {{name: tcp, port: {p}, protocol: TCP}}
status:
  loadBalancer:
    ingress: [{{ip: {e}}}]
"#,
        c = lab::CLUSTER_V4,
        e = lab::EXTERNAL_V4,
        p = SERVICE_PORT,
    )
}

fn lb_addr() -> SocketAddr {
    SocketAddr::from((lab::EXTERNAL_V4, SERVICE_PORT))
}

/// A case's outcome; `expected` is what it should be (see [`Verdict::expected`]).
fn verdict(
    say: &Say,
    case: &'static str,
    what: &str,
    (with_agent, expected): (bool, bool),
    ok: bool,
    detail: String,
) -> Verdict {
    let phase = if with_agent { "with node-manager" } else { "without node-manager" };
    say.result(&format!("{what} {phase}"), ok, &detail);
    Verdict { case, with_agent, ok, expected, detail }
}

fn counter(state: &Value, name: &str) -> u64 {
    state["counters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .and_then(|c| c["packets"].as_u64())
        .unwrap_or(0)
}

fn dropped_v4(state: &Value) -> u64 {
    state["drop_invalid"]["counters"]["dropped_v4"][0].as_u64().unwrap_or(0)
}

/// Without the agent `before` is `None`; with it, the inspect state before the request, for
/// the counters.
fn pod_to_lb(say: &Say, stage: &Stage, before: Option<&Value>) -> Result<Verdict> {
    interrupt::check()?;
    let lab = stage.lab();
    let to = lb_addr();
    let what = format!("pod {} → LoadBalancer IP {to}", lab::POD_V4);
    let result = lab.tcp_request(Ns::Pod, to, b"hello from the pod", T);
    let seen_by_endpoint = lab.endpoint_peers().last().map(|p| p.ip());
    if let Some(kube) = stage.kube() {
        return Ok(pod_to_lb_real(say, kube, &what, stage, before, result, seen_by_endpoint));
    }
    let with_agent = before.is_some();
    let Some(before) = before else {
        let detail = match &result {
            Err(e) if io_kind(e) == Some(std::io::ErrorKind::ConnectionRefused) => format!(
                "connection refused: the node owns {} on kube-ipvs0, IPVS-style, and has no local endpoint",
                lab::EXTERNAL_V4
            ),
            Err(e) => format!("{:#}", e.root_cause()),
            Ok(r) => format!("unexpected: it answered {:?}", String::from_utf8_lossy(&r.data)),
        };
        return Ok(verdict(say, POD_CASE, &what, (false, false), result.is_ok(), detail));
    };
    let after = stage.inspect()?;
    let (there, back) = (
        counter(&after, "rewrite_ingress_v4") - counter(before, "rewrite_ingress_v4"),
        counter(&after, "rewrite_egress_v4") - counter(before, "rewrite_egress_v4"),
    );
    let (ok, detail) = match result {
        Ok(r) if r.data == b"echo:hello from the pod" && r.peer == to && there > 0 => {
            let masq = match seen_by_endpoint {
                Some(ip) => format!("the endpoint saw it from {ip}, masqueraded by kube-proxy"),
                None => "the endpoint answered".to_owned(),
            };
            let detail = format!(
                "reply {:?} from {}; {there} packet(s) rewritten to the cluster IP {} and {back} reply packet(s) \
                 back (counters rewrite_ingress_v4, rewrite_egress_v4); {masq}",
                String::from_utf8_lossy(&r.data),
                r.peer,
                lab::CLUSTER_V4,
            );
            (true, detail)
        }
        Ok(r) => (
            false,
            format!("reply {:?} from {}, {there} packet(s) rewritten", String::from_utf8_lossy(&r.data), r.peer),
        ),
        Err(e) => (false, format!("{:#}", e.root_cause())),
    };
    Ok(verdict(say, POD_CASE, &what, (with_agent, true), ok, detail))
}

/// With the real kube-proxy the pod is served without node-manager, and with it (the manifest
/// keeps the rewrite off) nothing changes: same reply, same source address at the endpoint,
/// no packet rewritten.
fn pod_to_lb_real(
    say: &Say,
    kube: &RealKube,
    what: &str,
    stage: &Stage,
    before: Option<&Value>,
    result: Result<lab::TcpReply>,
    seen_by_endpoint: Option<std::net::IpAddr>,
) -> Verdict {
    let rewritten = before.map(|b| {
        let after = stage.inspect().unwrap_or_default();
        counter(&after, "rewrite_ingress_v4") - counter(b, "rewrite_ingress_v4")
    });
    let seen = seen_by_endpoint.map_or("nobody".to_owned(), |ip| ip.to_string());
    let pod_seen = seen_by_endpoint == Some(lab::POD_V4.into());
    let (ok, detail) = match (&result, rewritten) {
        (Ok(r), None) if r.data == b"echo:hello from the pod" => (
            pod_seen,
            format!(
                "served by kube-proxy {} ({} mode) alone: reply {:?} from {}; the endpoint saw the pod's own address {seen}",
                kube.kube_proxy_version,
                kube.mode.name(),
                String::from_utf8_lossy(&r.data),
                r.peer
            ),
        ),
        (Ok(r), Some(n)) if r.data == b"echo:hello from the pod" => (
            pod_seen && n == 0,
            format!(
                "unchanged: reply {:?} from {}, the endpoint still saw {seen}; {n} packet(s) rewritten by node-manager \
                 (node-manager.yaml keeps the rewrite off where kube-proxy serves the LB IP)",
                String::from_utf8_lossy(&r.data),
                r.peer
            ),
        ),
        (Ok(r), _) => (false, format!("unexpected reply {:?} from {}", String::from_utf8_lossy(&r.data), r.peer)),
        (Err(e), _) => (false, format!("{:#}", e.root_cause())),
    };
    verdict(say, POD_CASE, what, (before.is_some(), true), ok, detail)
}

fn host_to_lb(say: &Say, stage: &Stage, before: Option<&Value>) -> Result<Verdict> {
    interrupt::check()?;
    let lab = stage.lab();
    let to = lb_addr();
    let netns = lab.netns_path(Ns::Node);
    let what = format!("host process → LoadBalancer IP {to}");
    println!();
    let payload = "hello-from-the-node";
    say.command(&host::shown(stage.cgroup(), &netns, to, payload), "");
    let reply = host::request(stage.cgroup(), &netns, to, payload)?;
    say.output(&reply.stdout);
    let answered = reply.error.is_none() && reply.stdout == format!("echo:{payload}");
    let real = stage.kube();
    let with_agent = before.is_some();
    let connects = before.map(|b| {
        let after = stage.inspect().unwrap_or_default();
        counter(&after, "sock_connect_v4") - counter(b, "sock_connect_v4")
    });
    let seen = lab.endpoint_peers().last().map_or("nobody".to_owned(), |p| p.ip().to_string());
    let (ok, detail) = match (real, reply.error, connects) {
        (Some(kube), None, None) if answered => (
            true,
            format!(
                "served by kube-proxy {} ({} mode) alone: reply {:?}; the endpoint saw {seen} (kube-proxy masquerades node processes)",
                kube.kube_proxy_version,
                kube.mode.name(),
                reply.stdout
            ),
        ),
        (Some(_), None, Some(n)) if answered => (
            n == 0,
            format!(
                "unchanged: reply {:?}, the endpoint saw {seen}; {n} connect() rewritten by node-manager",
                reply.stdout
            ),
        ),
        (None, Some(e), None) if e == "connection refused" => {
            (false, format!("{e}: the LoadBalancer IP is local to the node and nothing listens on it"))
        }
        (None, None, Some(n)) if answered && n > 0 => (
            true,
            format!(
                "reply {:?}; {n} connect() rewritten to the cluster IP {} in the kernel (counter sock_connect_v4)",
                reply.stdout,
                lab::CLUSTER_V4
            ),
        ),
        (_, Some(e), _) => (false, e),
        // Answered where the bug should have shown (ok, against the expectation), or answered
        // otherwise than expected.
        (_, None, n) => {
            (answered && n.is_none(), format!("unexpected: it answered {:?}, {n:?} connect() rewritten", reply.stdout))
        }
    };
    let expected = with_agent || real.is_some();
    Ok(verdict(say, HOST_CASE, &what, (with_agent, expected), ok, detail))
}

fn reset_case(say: &Say, stage: &Stage, with_agent: bool) -> Result<Verdict> {
    interrupt::check()?;
    let lab = stage.lab();
    if with_agent {
        println!();
    }
    let server = SocketAddr::from((lab::ENDPOINT_V4, reset::OUTSIDE_PORT));
    let via = stage.kube().map(|_| RealKube::reset_via());
    let mut scenario = ResetScenario::start_via(lab, false, via).context("connecting the pod to the outside server")?;
    match via {
        Some(via) => say.text(&format!(
            "pod {} → Service {via}, DNATed by kube-proxy to {server} on the other node and masqueraded: \
             connected, \"hello\" echoed",
            lab::POD_V4
        )),
        None => say.text(&format!(
            "pod {} → server outside {server}, masqueraded by the node: connected, \"hello\" echoed",
            lab::POD_V4
        )),
    }
    let before = reset::invalid_counter(lab)?;
    scenario.inject_out_of_window(INJECTED)?;
    interrupt::sleep(Duration::from_millis(300))?;
    let alive = scenario.exchange(b"are you still there?");
    interrupt::sleep(Duration::from_millis(100))?;
    let resets = scenario.node_resets();
    let invalid = reset::invalid_counter(lab)? - before;
    say.text(&format!(
        "the server side sent {INJECTED} segments 2^30 bytes beyond the TCP window; conntrack on the node\n\
         marked {invalid} packet(s) INVALID; the node sent {resets} RST(s) to the server"
    ));
    let what = "pod's connection after out-of-window segments";
    let detail = match (alive, resets) {
        (true, 0) => format!("still echoing; {invalid} INVALID, 0 RSTs from the node"),
        (false, r) if r > 0 => format!(
            "reset: the INVALID packets were not de-NATed, reached the node's own stack, and its {r} RST(s) \
             killed the connection; the next message got no echo"
        ),
        (alive, r) => format!("connection alive: {alive}, {r} RST(s) from the node, {invalid} INVALID"),
    };
    Ok(verdict(say, RESET_CASE, what, (with_agent, with_agent), alive && resets == 0, detail))
}

fn start_agent(say: &Say, stage: &mut Stage, source: &AgentSource) -> Result<()> {
    let cgroup = stage.cgroup().display().to_string();
    let mut args: Vec<&str> = source.args.iter().map(String::as_str).collect();
    if stage.kube().is_none() {
        args.extend(["--external-cluster", "true"]);
    }
    args.extend(["--cgroup-path", cgroup.as_str(), "--node-name", NODE_NAME]);
    let env: String = source.env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
    say.command(&format!("{env}{}", stage.nm_shown(&format!("run {}", args.join(" ")))), "");
    if stage.kube().is_some() {
        say.text(&format!(
            "(the env of the DaemonSet object the apiserver holds, from deploy/node-manager.yaml; the demo's own\n\
             bpffs and cgroup; node-manager's ServiceAccount token; its log goes to {})",
            stage.agent_log().display()
        ));
    } else {
        say.text(&format!("(the INVALID drop is on by default; its log goes to {})", stage.agent_log().display()));
    }
    let started = Instant::now();
    let rewrite = stage.kube().is_none();
    stage.start_agent(&args, &source.env)?;
    let host_if = stage.lab().pod_host_if().to_owned();
    let state = loop {
        interrupt::sleep(Duration::from_millis(200))?;
        stage.check_agent_alive()?;
        if let Ok(state) = stage.inspect()
            && ready(&state, &host_if, rewrite)
        {
            break state;
        }
        if started.elapsed() > READY_LIMIT {
            bail!(
                "node-manager did not attach and fill its maps within {READY_LIMIT:?}; the end of its log:\n{}",
                stage.agent_log_tail(15)
            );
        }
    };
    let features: Vec<String> = state["features"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| format!("{:<32} {}", f["name"].as_str().unwrap_or("?"), f["mechanism"].as_str().unwrap_or("")))
        .collect();
    say.text(&format!(
        "ready after {:.1} s (agent pid {}), with {} frontends in its map:\n  {}",
        started.elapsed().as_secs_f64(),
        stage.agent_pid().unwrap_or(0),
        state["frontends"].as_array().map_or(0, Vec::len),
        features.join("\n  ")
    ));
    Ok(())
}

/// The agent's socket hooks: connect, sendmsg, recvmsg and getpeername for both families, and
/// the socket release (the demo does not link the agent's library for `cgroup::HOOKS`).
const SOCKET_HOOKS: usize = 9;

/// The agent has attached the INVALID drop and, with the `rewrite`, the pod programs and the
/// socket hooks, and filled the frontends (TCP 8080 and the ICMP echo entry).
fn ready(state: &Value, host_if: &str, rewrite: bool) -> bool {
    let attached = state["interfaces"]
        .as_array()
        .is_some_and(|is| is.iter().any(|i| i["name"] == host_if && i["present"] == true));
    let frontends = state["frontends"].as_array().is_some_and(|f| f.len() >= 2);
    let hooks = state["cgroup_hooks"].as_array().is_some_and(|h| h.len() == SOCKET_HOOKS);
    let d = &state["drop_invalid"];
    let drop = match d["mode"].as_str() {
        // The bpf mode drops only while it has seen conntrack at work recently (its guard).
        Some("bpf") => {
            d["netfilter_links"].as_array().is_some_and(|l| l.len() == 2)
                && d["conntrack_seen_v4_ms_ago"].as_u64().is_some_and(|ms| ms < 3000)
        }
        Some("nftables") => d["nftables_table"] == true,
        Some(_) => true,
        None => false,
    };
    (!rewrite || (attached && frontends && hooks)) && drop
}

fn show_inspect(say: &Say, stage: &Stage) -> Result<()> {
    let out = stage.nm(&["inspect"]).output().context("running inspect")?;
    let text = String::from_utf8_lossy(&out.stdout);
    say.command(&stage.nm_shown("inspect"), &text);

    let frontends = stage.bpffs().join("node-manager/v1/maps/NM_FRONTENDS");
    let ext = lab::EXTERNAL_V4.octets();
    let port = SERVICE_PORT.to_be_bytes();
    let key =
        format!("0 0 0 0 0 0 0 0 0 0 255 255 {} {} {} {} {} {} 6 0", ext[0], ext[1], ext[2], ext[3], port[0], port[1]);
    say.text(&format!(
        "\nThe maps carry BTF, so bpftool prints named fields. The key of {}/TCP: the address\n\
         IPv4-mapped in 16 bytes, the port in network byte order, protocol 6:",
        lb_addr()
    ));
    bpftool(say, &["map", "lookup", "pinned", &frontends.display().to_string(), "key"], &key)?;
    say.text("\nThe socket hooks on the demo cgroup (host processes below it are served):");
    bpftool(say, &["cgroup", "show", &stage.cgroup().display().to_string()], "")?;
    let state = stage.inspect()?;
    let links: Vec<String> = state["drop_invalid"]["netfilter_links"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l.as_str()?.split_whitespace().skip_while(|w| *w != "link").nth(1).map(str::to_owned))
        .collect();
    if !links.is_empty() {
        say.text(
            "\nThe INVALID drop's netfilter links (LOCAL_IN, after conntrack; bpftool 7.1 does not name\n\
             this link type, 10 = netfilter, nor list TCX attachments: inspect does both):",
        );
        for id in links {
            bpftool(say, &["link", "show", "id", &id], "")?;
        }
    }
    Ok(())
}

fn bpftool(say: &Say, args: &[&str], key: &str) -> Result<()> {
    let mut cmd = std::process::Command::new("bpftool");
    cmd.args(args);
    if !key.is_empty() {
        cmd.args(key.split(' '));
    }
    let shown = if key.is_empty() { args.join(" ") } else { format!("{} {key}", args.join(" ")) };
    match cmd.output() {
        Ok(out) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            say.command(&format!("bpftool {shown}"), &text);
        }
        Err(e) => say.command(&format!("bpftool {shown}"), &format!("(could not run bpftool: {e})")),
    }
    Ok(())
}

fn io_kind(err: &anyhow::Error) -> Option<std::io::ErrorKind> {
    err.chain().find_map(|e| e.downcast_ref::<std::io::Error>()).map(std::io::Error::kind)
}
