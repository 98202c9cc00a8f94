//! The agent run as the DaemonSet runs it, with exactly the capabilities the manifest adds
//! (parsed from `deploy/node-manager-ipvs.yaml`, every feature on) and nothing else: every
//! feature works — pods reach an external IP through the TC programs, the socket hooks and the
//! INVALID drop's netfilter programs are attached, the nftables and iptables fallbacks install,
//! the probes and the metrics answer on the manifest's port — and with any one capability removed the agent stops with an error that says what failed.
//!
//! "As the DaemonSet runs it": uid 0 whose bounding and inheritable sets hold only those
//! capabilities (so they are its permitted and effective sets, as `capabilities: {drop: [ALL],
//! add: [...]}` gives), no_new_privs (`allowPrivilegeEscalation: false`), in a mount namespace
//! whose root filesystem, /sys and /proc/sys are read-only (`readOnlyRootFilesystem` and the
//! runtime's read-only sysfs and procfs), with the cgroup bound read-only at the path given as
//! `CGROUP_PATH` and a bpffs of its own as `BPFFS`, and the manifest's other environment
//! variables. Needs root, `setpriv` and `unshare` (util-linux).
mod common;

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::{
    agent::{Agent, BIN, Scratch, http_get, lab_service_yaml, wait_for, write},
    deploy::{container, documented_capabilities},
};
use lab::{Lab, Ns};

/// The variant with every feature on.
const MANIFEST: &str = "node-manager-ipvs.yaml";

/// What the agent says when one capability is missing: it checks its capabilities before it
/// touches the kernel (`privileges.rs`).
const WITHOUT: [(&str, &[&str]); 3] = [
    ("BPF", &["missing capabilities: CAP_BPF"]),
    ("NET_ADMIN", &["missing capabilities: CAP_NET_ADMIN"]),
    ("PERFMON", &["missing capabilities: CAP_PERFMON"]),
];

fn manifest_capabilities() -> Vec<String> {
    let c = container(MANIFEST);
    c.security_context.and_then(|s| s.capabilities).and_then(|c| c.add).expect("the manifest adds capabilities")
}

/// The container's environment from the manifest; the node name and the two host paths are
/// replaced by the test's own.
fn manifest_env(scratch: &Scratch, cgroup: &Path) -> Vec<(String, String)> {
    let env = container(MANIFEST).env.unwrap_or_default();
    env.into_iter()
        .map(|e| {
            let value = match e.name.as_str() {
                "NODE_NAME" => "lab-node".to_owned(),
                "BPFFS" => scratch.bpffs.display().to_string(),
                "CGROUP_PATH" => cgroup.display().to_string(),
                name => e.value.unwrap_or_else(|| panic!("{MANIFEST}: env {name} has no plain value")),
            };
            (e.name, value)
        })
        .collect()
}

/// `program <args>` confined as described at the top, in the lab's node namespace.
fn confined(
    lab: &Lab,
    scratch: &Scratch,
    caps: &[String],
    env: &[(String, String)],
    program: &str,
    args: &[&str],
) -> Command {
    let cgroup_dst = scratch.file("host-cgroup");
    std::fs::create_dir_all(&cgroup_dst).unwrap();
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.to_ascii_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let script = r#"set -e
mount --bind "$1" "$2"
mount -o remount,bind,ro "$2"
mount -o remount,bind,ro /
mount -o remount,bind,ro /sys
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
shift 2
exec setpriv --no-new-privs --bounding-set="$CAPS" --inh-caps="$CAPS" -- "$@""#;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", lab.netns_path(Ns::Node).display()))
        .args(["--", "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"])
        .arg(&scratch.cgroup.path)
        .arg(&cgroup_dst)
        .arg(program)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("CAPS", set)
        .envs(env.iter().map(|(k, v)| (k, v)));
    cmd
}

fn start(lab: &Lab, scratch: &Scratch, caps: &[String], extra_env: &[(&str, &str)]) -> Agent {
    let services = scratch.file("services.yaml");
    write(&services, &lab_service_yaml("web"));
    let mut env = manifest_env(scratch, &scratch.file("host-cgroup"));
    env.extend([
        ("SERVICES_FILE".to_owned(), services.display().to_string()),
        ("POD_CIDR_IPV4".to_owned(), lab::POD_CIDR_V4.to_owned()),
        ("POD_CIDR_IPV6".to_owned(), lab::POD_CIDR_V6.to_owned()),
    ]);
    for (k, v) in extra_env {
        env.retain(|(name, _)| name != k);
        env.push(((*k).to_owned(), (*v).to_owned()));
    }
    let log = scratch.file("agent.log");
    let child = confined(lab, scratch, caps, &env, BIN, &["run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Agent { child, log }
}

/// The agent's metrics address as the manifest sets it, reached on the node's loopback.
fn health_addr() -> SocketAddr {
    let env = container(MANIFEST).env.unwrap_or_default();
    let addr: SocketAddr = env
        .iter()
        .find(|e| e.name == "METRICS_ADDR")
        .and_then(|e| e.value.as_deref()?.parse().ok())
        .expect("the manifest sets METRICS_ADDR to an address:port");
    SocketAddr::from(([127, 0, 0, 1], addr.port()))
}

/// GET `path` on the agent's metrics address from inside the node's namespace.
fn get(lab: &Lab, path: &str) -> Result<(u16, String), String> {
    lab::in_netns(lab.netns_path(Ns::Node), || Ok(http_get(health_addr(), path))).map_err(|e| format!("{e:#}"))?
}

/// Waits for `/readyz` to answer 200 (the agent has synced and attached, and handles SIGTERM).
fn wait_ready(lab: &Lab, agent: &Agent) {
    let started = Instant::now();
    while get(lab, "/readyz").map(|(status, _)| status) != Ok(200) {
        assert!(started.elapsed() < Duration::from_secs(30), "not ready: {:?}\n{}", get(lab, "/readyz"), agent.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM; the agent must exit 0.
fn stop(agent: Agent) {
    let log = agent.log.clone();
    assert!(
        agent.stop(),
        "the agent did not exit cleanly on SIGTERM:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

fn pod_reaches(lab: &Lab, ip: IpAddr) -> Result<(), String> {
    let to = SocketAddr::new(ip, lab::SERVICE_PORT);
    let reply = lab.tcp_request(Ns::Pod, to, b"tcp", Duration::from_secs(2)).map_err(|e| format!("{e:#}"))?;
    if reply.data == b"echo:tcp" { Ok(()) } else { Err(format!("reply {:?}", reply.data)) }
}

/// The confinement is what the top says: only these capabilities, no_new_privs, a read-only
/// root filesystem, /sys and /proc/sys, a writable bpffs, the cgroup read-only.
#[test]
fn the_confinement_is_what_a_pod_gets() {
    let caps = manifest_capabilities();
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let cgroup = scratch.file("host-cgroup");
    let probe = "grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; cut -d' ' -f5,6 /proc/self/mountinfo";
    let out = confined(&lab, &scratch, &caps, &[], "sh", &["-c", probe]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    // CAP_NET_ADMIN = 12, CAP_PERFMON = 38, CAP_BPF = 39.
    let bit = |c: &str| match c {
        "NET_ADMIN" => 12,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("bit of {other}?"),
    };
    let mask = caps.iter().fold(0u64, |m, c| m | 1 << bit(c));
    for line in [format!("CapEff:\t{mask:016x}"), format!("CapBnd:\t{mask:016x}"), "NoNewPrivs:\t1".to_owned()] {
        assert!(text.contains(&line), "{line:?} not in:\n{text}");
    }
    // Mount point -> its options, the last mount on a path winning (as path lookup does).
    let mounts: std::collections::HashMap<&str, &str> =
        text.lines().filter_map(|l| l.split_once(' ')).filter(|(_, o)| o.starts_with("r")).collect();
    let bpffs = scratch.bpffs.display().to_string();
    let cgroup = cgroup.display().to_string();
    for (path, mode) in
        [("/", "ro"), ("/sys", "ro"), ("/proc/sys", "ro"), (cgroup.as_str(), "ro"), (bpffs.as_str(), "rw")]
    {
        let opts = mounts.get(path).unwrap_or_else(|| panic!("{path} is not a mount point:\n{text}"));
        assert!(opts.split(',').next() == Some(mode), "{path}: {opts}, expected {mode}");
    }
}

#[test]
fn every_feature_works_with_exactly_the_manifests_capabilities() {
    let caps = manifest_capabilities();
    let documented = documented_capabilities();
    assert!(caps.iter().all(|c| documented.contains(c)), "{caps:?} vs documented {documented:?}");
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    for ip in [IpAddr::from(lab::EXTERNAL_V4), IpAddr::from(lab::EXTERNAL_V6)] {
        assert!(pod_reaches(&lab, ip).is_err(), "{ip} reachable without the agent");
    }

    let mut agent = start(&lab, &scratch, &caps, &[]);
    let ready = |s: &serde_json::Value| {
        s["drop_invalid"]["mode"] == "bpf"
            && s["drop_invalid"]["netfilter_links"].as_array().is_some_and(|l| l.len() == 2)
            && s["cgroup_hooks"].as_array().is_some_and(|h| h.len() == node_manager::kernel::cgroup::HOOKS.len())
            && s["interfaces"].as_array().is_some_and(|i| !i.is_empty())
            && s["frontends"].as_array().is_some_and(|f| f.len() == 6)
    };
    let mut last = serde_json::Value::Null;
    let started = Instant::now();
    while !ready(&last) {
        if let Some(status) = agent.child.try_wait().unwrap() {
            panic!("the confined agent exited ({status}):\n{}", agent.log());
        }
        assert!(started.elapsed() < Duration::from_secs(30), "not ready: {last:#}\nlog:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(200));
        last = scratch.try_inspect().unwrap_or_default();
    }
    for ip in [IpAddr::from(lab::EXTERNAL_V4), IpAddr::from(lab::EXTERNAL_V6)] {
        pod_reaches(&lab, ip)
            .unwrap_or_else(|e| panic!("pod to {ip}:8080 with the confined agent: {e}\n{}", agent.log()));
    }
    // The liveness and readiness probes and the scrape target, at the manifest's METRICS_ADDR
    // port, from inside the node's namespace (where the kubelet and Prometheus reach it).
    for (path, expected) in [("/healthz", "ok"), ("/readyz", "ready"), ("/metrics", "node_manager_ready 1")] {
        let (status, body) = get(&lab, path).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", agent.log()));
        assert!(status == 200 && body.contains(expected), "GET {path}: {status} {body}");
    }
    let log = agent.log();
    assert!(!log.contains("ERROR") && !log.contains("WARN"), "{log}");
    stop(agent);

    // `cleanup` (what CLEANUP_ON_EXIT runs in the pod) with the same privileges.
    let env = manifest_env(&scratch, &scratch.file("host-cgroup"));
    let out = confined(&lab, &scratch, &caps, &env, BIN, &["cleanup"]).output().unwrap();
    assert!(out.status.success(), "confined cleanup: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!scratch.bpffs.join("node-manager").exists(), "pins left after the confined cleanup");
    for ip in [IpAddr::from(lab::EXTERNAL_V4), IpAddr::from(lab::EXTERNAL_V6)] {
        assert!(pod_reaches(&lab, ip).is_err(), "{ip} still reachable after cleanup");
    }
}

#[test]
fn the_fallbacks_work_with_the_same_capabilities() {
    let caps = manifest_capabilities();
    let lab = Lab::new().unwrap();
    let iptables_rule = || {
        let rules = lab.command(Ns::Node, "iptables").args(["-S", "INPUT"]).output().unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout).into_owned();
        rules.contains("--ctstate INVALID") && rules.contains("node-manager")
    };
    for mode in ["nftables", "iptables"] {
        let scratch = Scratch::new(&lab);
        let agent =
            start(&lab, &scratch, &caps, &[("DROP_INVALID_MODE", mode), ("RULE_EXTERNAL_CLUSTER_ENABLE", "false")]);
        // The mode is recorded, and what it installs is in place (the table, or the rule).
        wait_for(&format!("{mode} mode installed"), Duration::from_secs(30), || {
            scratch.try_inspect().is_ok_and(|s| {
                s["drop_invalid"]["mode"] == mode
                    && if mode == "nftables" { s["drop_invalid"]["nftables_table"] == true } else { iptables_rule() }
            })
        });
        wait_ready(&lab, &agent);
        assert!(!agent.log().contains("ERROR"), "{}", agent.log());
        stop(agent);
    }
}

#[test]
fn without_any_one_of_them_the_agent_stops_and_says_why() {
    let caps = manifest_capabilities();
    let lab = Lab::new().unwrap();
    for missing in &caps {
        let expected = WITHOUT
            .iter()
            .find(|(c, _)| c == missing)
            .unwrap_or_else(|| panic!("add what the agent says without {missing} to WITHOUT"))
            .1;
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let scratch = Scratch::new(&lab);
        let mut agent = start(&lab, &scratch, &fewer, &[]);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = agent.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "without {missing} the agent kept running:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let log = agent.log();
        assert!(!status.success(), "without {missing}: exit {status}\n{log}");
        for needle in expected {
            assert!(log.contains(needle), "without {missing}: expected {needle:?} in:\n{log}");
        }
    }
}

/// Only the INVALID drop's `bpf` mode needs CAP_PERFMON (its programs call
/// `bpf_probe_read_kernel`): with the nftables drop the agent's check does not ask for it, and
/// the pod programs and socket hooks load, attach and serve without it. They used to be
/// refused (`R5 tried to add from different maps, paths or scalars, pointer arithmetic with it
/// prohibited for !root`): the compiler had made the zeroing of a key's padding a `memset`
/// subprogram, whose pointer arithmetic on the caller's stack Spectre v1 hardening forbids an
/// unprivileged loader; the keys are now built without such calls (checked for every program
/// by `programs_make_no_subprogram_calls`).
#[test]
fn without_perfmon_the_rewrite_and_socket_hooks_work_with_the_nftables_drop() {
    let caps: Vec<String> = manifest_capabilities().into_iter().filter(|c| c != "PERFMON").collect();
    let lab = Lab::new().unwrap();
    let scratch = Scratch::new(&lab);
    let agent = start(&lab, &scratch, &caps, &[("DROP_INVALID_MODE", "nftables")]);
    wait_for(
        "the socket hooks, the pod interface, the frontends and the nftables drop",
        Duration::from_secs(30),
        || {
            scratch.try_inspect().is_ok_and(|s| {
                s["drop_invalid"]["nftables_table"] == true
                    && s["cgroup_hooks"]
                        .as_array()
                        .is_some_and(|h| h.len() == node_manager::kernel::cgroup::HOOKS.len())
                    && s["interfaces"].as_array().is_some_and(|i| !i.is_empty())
                    && s["frontends"].as_array().is_some_and(|f| f.len() == 6)
            })
        },
    );
    for ip in [IpAddr::from(lab::EXTERNAL_V4), IpAddr::from(lab::EXTERNAL_V6)] {
        pod_reaches(&lab, ip).unwrap_or_else(|e| panic!("pod to {ip}:8080 without CAP_PERFMON: {e}\n{}", agent.log()));
    }
    wait_ready(&lab, &agent);
    let log = agent.log();
    assert!(!log.contains("unavailable") && !log.contains("Permission denied"), "{log}");
    stop(agent);
}
