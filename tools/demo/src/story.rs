//! What the demo shows, in order: the node, both bugs without the agent, the agent starting,
//! both fixed with it, what `inspect` and bpftool show, and the cleanup.
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use lab::reset::{self, ResetScenario};
use lab::{Ns, SERVICE_PORT};
use serde_json::Value;

use crate::host;
use crate::interrupt;
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
    pub detail: String,
}

/// Where the agent gets the Service from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A services file (`--services-file`).
    File,
    /// The test API server (`--kubeconfig`), with this node's Node carrying the pod CIDR.
    ApiServer,
}

/// Runs the whole demo. The stage is torn down before returning (or while unwinding on an
/// error or Ctrl-C); the bool says whether the teardown left nothing behind.
pub fn run(agent_bin: &Path, source: Source, say: &Say) -> Result<(Vec<Verdict>, bool)> {
    intro(say);
    let stale = crate::stale::remove(agent_bin);
    if !stale.is_empty() {
        say.step("removing what an earlier demo left behind when it was killed");
        for line in &stale {
            say.text(line);
        }
    }
    say.step("building the node: network namespaces, a demo cgroup and a private bpffs");
    let started = Instant::now();
    let mut stage = Stage::build(agent_bin)?;
    describe_stage(say, &stage, started);
    let source_args = match source {
        Source::File => write_service(say, &stage)?,
        Source::ApiServer => serve_service(say, &mut stage)?,
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
        "A Kubernetes node built from network namespaces on this machine. Nothing outside them is
touched, except a demo cgroup and a private bpffs, both removed at the end (also on Ctrl-C).

  pod {pod} ──veth── node ──eth0── endpoint {ep} (the Service's backend, on \"another node\")
                      │ kube-proxy (nftables): cluster IP {c}:{p} → {ep}:{p}
                      │ kube-ipvs0: LoadBalancer IP {e} bound locally, as kube-proxy IPVS does;
                      │   externalTrafficPolicy: Local and no endpoint on this node: nothing behind it
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

/// Writes the services file; returns the agent's arguments for it.
fn write_service(say: &Say, stage: &Stage) -> Result<Vec<String>> {
    let yaml = service_yaml();
    std::fs::write(stage.services_file(), &yaml).context("writing the services file")?;
    say.step("the Service (node-manager reads it from a file here; in a cluster, from the API server)");
    say.command(&format!("cat {}", stage.services_file().display()), &yaml);
    Ok(vec![
        "--services-file".into(),
        stage.services_file().display().to_string(),
        "--pod-cidr-ipv4".into(),
        lab::POD_CIDR_V4.into(),
    ])
}

/// Starts the test API server with this node's Node and the Service; returns the agent's
/// arguments for it (the pod CIDR then comes from the Node).
fn serve_service(say: &Say, stage: &mut Stage) -> Result<Vec<String>> {
    let kubeconfig = stage.start_api_server()?;
    let node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE_NAME},
        "spec": {"podCIDR": lab::POD_CIDR_V4, "podCIDRs": [lab::POD_CIDR_V4]}
    });
    let service = service_json();
    stage.api().apply(node.clone());
    stage.api().apply(service.clone());
    say.step(&format!(
        "the Service and this node's Node, served by the test API server at {} (list and watch, as \
         kube-apiserver; node-manager watches it with kube-rs)",
        stage.api().url()
    ));
    for object in [&node, &service] {
        say.output(&serde_json::to_string_pretty(object).unwrap_or_default());
    }
    Ok(vec!["--kubeconfig".into(), kubeconfig.display().to_string()])
}

/// [`service_yaml`] as the API serves it.
fn service_json() -> Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "demo", "name": "web"},
        "spec": {
            "type": "LoadBalancer", "externalTrafficPolicy": "Local",
            "clusterIP": lab::CLUSTER_V4.to_string(), "clusterIPs": [lab::CLUSTER_V4.to_string()],
            "ports": [{"name": "tcp", "port": SERVICE_PORT, "protocol": "TCP"}]
        },
        "status": {"loadBalancer": {"ingress": [{"ip": lab::EXTERNAL_V4.to_string()}]}}
    })
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

fn verdict(say: &Say, case: &'static str, what: &str, with_agent: bool, ok: bool, detail: String) -> Verdict {
    let phase = if with_agent { "with node-manager" } else { "without node-manager" };
    say.result(&format!("{what} {phase}"), ok, &detail);
    Verdict { case, with_agent, ok, detail }
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
    let Some(before) = before else {
        let detail = match &result {
            Err(e) if io_kind(e) == Some(std::io::ErrorKind::ConnectionRefused) => format!(
                "connection refused: the node owns {} on kube-ipvs0, IPVS-style, and has no local endpoint",
                lab::EXTERNAL_V4
            ),
            Err(e) => format!("{:#}", e.root_cause()),
            Ok(r) => format!("unexpected: it answered {:?}", String::from_utf8_lossy(&r.data)),
        };
        return Ok(verdict(say, POD_CASE, &what, false, result.is_ok(), detail));
    };
    let after = stage.inspect()?;
    let (there, back) = (
        counter(&after, "rewrite_ingress_v4") - counter(before, "rewrite_ingress_v4"),
        counter(&after, "rewrite_egress_v4") - counter(before, "rewrite_egress_v4"),
    );
    let seen_by_endpoint = lab.endpoint_peers().last().map(|p| p.ip());
    Ok(match result {
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
            verdict(say, POD_CASE, &what, true, true, detail)
        }
        Ok(r) => verdict(
            say,
            POD_CASE,
            &what,
            true,
            false,
            format!("reply {:?} from {}, {there} packet(s) rewritten", String::from_utf8_lossy(&r.data), r.peer),
        ),
        Err(e) => verdict(say, POD_CASE, &what, true, false, format!("{:#}", e.root_cause())),
    })
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
    let Some(before) = before else {
        let detail = match reply.error {
            Some(e) if e == "connection refused" => {
                format!("{e}: the LoadBalancer IP is local to the node and nothing listens on it")
            }
            Some(e) => e,
            None => format!("unexpected: it answered {:?}", reply.stdout),
        };
        return Ok(verdict(say, HOST_CASE, &what, false, answered, detail));
    };
    let after = stage.inspect()?;
    let connects = counter(&after, "sock_connect_v4") - counter(before, "sock_connect_v4");
    let detail = match reply.error {
        None if answered && connects > 0 => format!(
            "reply {:?}; {connects} connect() rewritten to the cluster IP {} in the kernel (counter sock_connect_v4)",
            reply.stdout,
            lab::CLUSTER_V4
        ),
        None => format!("reply {:?}, {connects} connect() rewritten", reply.stdout),
        Some(e) => e,
    };
    Ok(verdict(say, HOST_CASE, &what, true, answered && connects > 0, detail))
}

fn reset_case(say: &Say, stage: &Stage, with_agent: bool) -> Result<Verdict> {
    interrupt::check()?;
    let lab = stage.lab();
    if with_agent {
        println!();
    }
    let mut scenario = ResetScenario::start(lab, false).context("connecting the pod to the outside server")?;
    let server = SocketAddr::from((lab::ENDPOINT_V4, reset::OUTSIDE_PORT));
    say.text(&format!(
        "pod {} → server outside {server}, masqueraded by the node: connected, \"hello\" echoed",
        lab::POD_V4
    ));
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
    Ok(verdict(say, RESET_CASE, what, with_agent, alive && resets == 0, detail))
}

fn start_agent(say: &Say, stage: &mut Stage, source_args: &[String]) -> Result<()> {
    let cgroup = stage.cgroup().display().to_string();
    let mut args: Vec<&str> = source_args.iter().map(String::as_str).collect();
    args.extend(["--external-cluster", "true", "--cgroup-path", cgroup.as_str(), "--node-name", NODE_NAME]);
    say.command(&stage.nm_shown(&format!("run {}", args.join(" "))), "");
    say.text(&format!("(the INVALID drop is on by default; its log goes to {})", stage.agent_log().display()));
    let started = Instant::now();
    stage.start_agent(&args)?;
    let host_if = stage.lab().pod_host_if().to_owned();
    let state = loop {
        interrupt::sleep(Duration::from_millis(200))?;
        stage.check_agent_alive()?;
        if let Ok(state) = stage.inspect()
            && ready(&state, &host_if)
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

/// The agent has attached the pod programs, the socket hooks and the INVALID drop, and filled
/// the frontends (TCP 8080 and the ICMP echo entry).
fn ready(state: &Value, host_if: &str) -> bool {
    let attached = state["interfaces"]
        .as_array()
        .is_some_and(|is| is.iter().any(|i| i["name"] == host_if && i["present"] == true));
    let frontends = state["frontends"].as_array().is_some_and(|f| f.len() >= 2);
    let hooks = state["cgroup_hooks"].as_array().is_some_and(|h| h.len() == 8);
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
    attached && frontends && hooks && drop
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
