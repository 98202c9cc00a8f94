//! The demo (`cargo xtask demo`) as CI runs it, non-interactively: both bugs fail without the
//! agent, both are fixed with it, and nothing is left behind; and interrupted by Ctrl-C (SIGINT)
//! while the agent runs, it still removes everything and says so. `--kube-proxy nftables` runs it
//! on the real etcd, kube-apiserver and kube-proxy (NM_KUBE_BIN, set by `cargo xtask test`).
//!
//! The demo runs in a child process (this test binary re-executed to run only [`demo_process`],
//! which calls `demo::main` exactly as the `node-manager-demo` binary does) with the agent
//! binary cargo built for these tests. Needs root.
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver},
    time::{Duration, Instant},
};

const BIN: &str = env!("CARGO_BIN_EXE_node-manager");
const CHILD_ENV: &str = "NM_TEST_DEMO_ARGS";
/// Generous: on the real components the control plane starts first (seconds, more when loaded).
const LIMIT: Duration = Duration::from_secs(180);

/// The demo itself, in a re-executed test binary (a no-op in a normal test run).
#[test]
fn demo_process() {
    let Ok(args) = std::env::var(CHILD_ENV) else {
        return;
    };
    let args: Vec<String> = serde_json::from_str(&args).unwrap();
    let code = demo::main(std::iter::once("node-manager-demo".to_owned()).chain(args));
    std::process::exit(i32::from(code));
}

struct DemoRun {
    child: Child,
    lines: Receiver<String>,
    output: Vec<String>,
}

impl DemoRun {
    fn start(args: &[&str]) -> DemoRun {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "demo_process", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, serde_json::to_string(args).unwrap())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("demo| {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        DemoRun { child, lines, output: Vec::new() }
    }

    /// Reads output until a line contains `text`.
    fn wait_for_line(&mut self, text: &str) {
        let deadline = Instant::now() + LIMIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(text);
                    self.output.push(line);
                    if found {
                        return;
                    }
                }
                Err(e) => panic!("no line with {text:?} ({e}); output so far:\n{}", self.output.join("\n")),
            }
        }
    }

    /// Waits for the exit and the rest of the output; returns the exit code.
    fn finish(&mut self) -> Option<i32> {
        let deadline = Instant::now() + LIMIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the demo did not finish within {LIMIT:?}:\n{}", self.output.join("\n"));
            }
            while let Ok(line) = self.lines.try_recv() {
                self.output.push(line);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // The reader thread ends at EOF.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.output.push(line);
        }
        status.code()
    }

    fn text(&self) -> String {
        self.output.join("\n")
    }

    /// (case, phase) -> (result, detail) from the `verdict` lines.
    fn verdicts(&self) -> Vec<(String, String, String, String)> {
        self.output
            .iter()
            .filter_map(|l| l.strip_prefix("verdict "))
            .map(|l| {
                let mut w = l.splitn(4, ' ');
                let mut next = || w.next().unwrap_or("").to_owned();
                (next(), next(), next(), next())
            })
            .collect()
    }

    /// The detail of the `verdict` line of `case` in `phase` (empty if there is none).
    fn detail(&self, case: &str, phase: &str) -> String {
        self.verdicts().into_iter().find(|v| v.0 == case && v.1 == phase).map(|v| v.3).unwrap_or_default()
    }

    /// The (program ids, link ids) of the running demo's agent (`socket_hooks` of them and the
    /// INVALID drop's two netfilter links), from `inspect --json` on its
    /// private bpffs in its node namespace.
    fn agent_ids(&self, socket_hooks: usize) -> (Vec<u64>, Vec<u64>) {
        let pid = self.child.id();
        let bpffs = std::env::temp_dir().join(format!("{}{pid}/bpffs", demo::DIR_PREFIX));
        let node = format!("/var/run/netns/nml-{pid}-0-node");
        let out = Command::new("nsenter")
            .arg(format!("--net={node}"))
            .args([BIN, "inspect", "--json", "--bpffs"])
            .arg(&bpffs)
            .output()
            .unwrap();
        assert!(out.status.success(), "inspect: {}", String::from_utf8_lossy(&out.stderr));
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let hooks = state["cgroup_hooks"].as_array().cloned().unwrap_or_default();
        let mut progs: Vec<u64> = hooks.iter().map(|h| h["prog_id"].as_u64().unwrap()).collect();
        let mut links: Vec<u64> = hooks.iter().map(|h| h["link_id"].as_u64().unwrap()).collect();
        // "ipv4 link 965 prog 7486 LOCAL_IN priority -100"
        for l in state["drop_invalid"]["netfilter_links"].as_array().unwrap() {
            let words: Vec<&str> = l.as_str().unwrap().split_whitespace().collect();
            links.push(words[2].parse().unwrap());
            progs.push(words[4].parse().unwrap());
        }
        let want = socket_hooks + 2;
        assert_eq!(
            (progs.len(), links.len()),
            (want, want),
            "{socket_hooks} socket hooks and 2 netfilter links: {state:#}"
        );
        (progs, links)
    }

    /// Asserts that nothing the demo process made is left: its namespaces, cgroup, scratch
    /// directory and bpffs mount, and the agent's programs and links (`ids`).
    fn assert_nothing_left(&self, (progs, links): &(Vec<u64>, Vec<u64>)) {
        let pid = self.child.id();
        let ours: Vec<String> =
            lab::leftovers().into_iter().filter(|n| n.starts_with(&format!("nml-{pid}-"))).collect();
        assert!(ours.is_empty(), "namespaces left: {ours:?}");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let dir = std::env::temp_dir().join(format!("{}{pid}", demo::DIR_PREFIX));
        assert!(!dir.exists(), "{} left", dir.display());
        assert!(!mountinfo.contains(dir.to_str().unwrap()), "bpffs still mounted:\n{mountinfo}");
        for root in cgroup2_roots(&mountinfo) {
            let cg = Path::new(&root).join(format!("{}{pid}", demo::CGROUP_PREFIX));
            assert!(!cg.exists(), "cgroup {} left", cg.display());
        }
        for (kind, ids) in [("prog", progs), ("link", links)] {
            for id in ids {
                let out = Command::new("bpftool").args([kind, "show", "id", &id.to_string()]).output().unwrap();
                assert!(!out.status.success(), "{kind} {id} still exists: {}", String::from_utf8_lossy(&out.stdout));
            }
        }
    }
}

impl Drop for DemoRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cgroup2_roots(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            post.starts_with("cgroup2 ").then(|| pre.split_whitespace().nth(4).map(str::to_owned))?
        })
        .collect()
}

/// Both bugs fail without the agent (for the right reason), both are fixed with it (counted),
/// and the teardown found nothing left.
fn assert_verdicts(run: &DemoRun) {
    let verdicts = run.verdicts();
    let expect = [
        (demo::POD_CASE, "without-agent", "FAILED"),
        (demo::HOST_CASE, "without-agent", "FAILED"),
        (demo::RESET_CASE, "without-agent", "FAILED"),
        (demo::POD_CASE, "with-agent", "OK"),
        (demo::HOST_CASE, "with-agent", "OK"),
        (demo::RESET_CASE, "with-agent", "OK"),
        ("cleanup", "-", "OK"),
    ];
    let got: Vec<(&str, &str, &str)> =
        verdicts.iter().map(|(c, p, r, _)| (c.as_str(), p.as_str(), r.as_str())).collect();
    assert_eq!(got, expect, "{}", run.text());
    let detail = |case: &str, phase: &str| run.detail(case, phase);
    // The failures are the bugs, not something else.
    assert!(detail(demo::POD_CASE, "without-agent").starts_with("connection refused"), "{}", run.text());
    assert!(detail(demo::HOST_CASE, "without-agent").starts_with("connection refused"), "{}", run.text());
    assert!(detail(demo::RESET_CASE, "without-agent").starts_with("reset"), "{}", run.text());
    // The fixes are counted: packets rewritten, a connect rewritten, INVALID segments dropped.
    assert!(detail(demo::POD_CASE, "with-agent").contains("packet(s) rewritten"), "{}", run.text());
    assert!(detail(demo::HOST_CASE, "with-agent").contains("1 connect() rewritten"), "{}", run.text());
    assert!(detail(demo::RESET_CASE, "with-agent").contains("0 RSTs from the node, 3 dropped"), "{}", run.text());
}

#[test]
fn the_demo_shows_both_bugs_and_both_fixes_and_leaves_nothing_behind() {
    let mut run = DemoRun::start(&["--yes", "--agent", BIN]);
    run.wait_for_line("ready after");
    let ids = run.agent_ids(node_manager::kernel::cgroup::HOOKS.len());
    let code = run.finish();
    assert_eq!(code, Some(0), "exit code; output:\n{}", run.text());
    assert_verdicts(&run);
    // What inspect and bpftool showed meanwhile.
    let text = run.text();
    for shown in ["node-manager inspect", "203.0.113.10:8080/TCP", "bpftool map lookup pinned", "nm_sock_connect4"] {
        assert!(text.contains(shown), "{shown:?} not shown:\n{text}");
    }
    run.assert_nothing_left(&ids);
}

/// `--kube-proxy nftables`: the real etcd, kube-apiserver and kube-proxy (from NM_KUBE_BIN, as
/// `cargo xtask test` builds them). kube-proxy serves the LB IP itself, so those cases work
/// without the agent and are unchanged with it (the manifest's rewrite is off); the reset
/// through kube-proxy's DNAT fails without it and is fixed with it.
#[test]
fn the_demo_on_the_real_components_names_them_and_changes_only_what_needs_fixing() {
    let mut run = DemoRun::start(&["--yes", "--kube-proxy", "nftables", "--agent", BIN]);
    run.wait_for_line("ready after");
    // The manifest's settings: the INVALID drop, no rewrite (no socket hook).
    let ids = run.agent_ids(0);
    assert_eq!(run.finish(), Some(0), "exit code; output:\n{}", run.text());
    let verdicts = run.verdicts();
    let got: Vec<(&str, &str, &str)> =
        verdicts.iter().map(|(c, p, r, _)| (c.as_str(), p.as_str(), r.as_str())).collect();
    let expect = [
        (demo::POD_CASE, "without-agent", "OK"),
        (demo::HOST_CASE, "without-agent", "OK"),
        (demo::RESET_CASE, "without-agent", "FAILED"),
        (demo::POD_CASE, "with-agent", "OK"),
        (demo::HOST_CASE, "with-agent", "OK"),
        (demo::RESET_CASE, "with-agent", "OK"),
        ("cleanup", "-", "OK"),
    ];
    assert_eq!(got, expect, "{}", run.text());
    let detail = |case: &str, phase: &str| run.detail(case, phase);
    let text = run.text();
    let version = |component: &str| {
        text.lines()
            .find_map(|l| l.split(&format!("{component} v")).nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(|v| format!("v{v}"))
            .unwrap_or_else(|| panic!("the demo names {component}'s version:\n{text}"))
    };
    assert!(version("kube-apiserver").starts_with("v1."), "{text}");
    let proxy = version("kube-proxy");
    assert!(
        detail(demo::POD_CASE, "without-agent")
            .starts_with(&format!("served by kube-proxy {proxy} (nftables mode) alone")),
        "{text}"
    );
    assert!(detail(demo::POD_CASE, "without-agent").ends_with("the pod's own address 192.0.2.10"), "{text}");
    assert!(detail(demo::POD_CASE, "with-agent").contains("the endpoint still saw 192.0.2.10; 0 packet(s)"), "{text}");
    assert!(detail(demo::HOST_CASE, "with-agent").contains("0 connect() rewritten"), "{text}");
    assert!(detail(demo::RESET_CASE, "without-agent").starts_with("reset"), "{text}");
    assert!(detail(demo::RESET_CASE, "with-agent").contains("0 RSTs from the node, 3 dropped"), "{text}");
    for said in [
        "DNATed by kube-proxy",
        "RULE_EXTERNAL_CLUSTER_ENABLE=false",
        "run --kubeconfig",
        "removed: kube-proxy",
        "`kube-proxy --cleanup` removed its rules",
        "removed: kube-apiserver",
    ] {
        assert!(text.contains(said), "{said:?} not said:\n{text}");
    }
    run.assert_nothing_left(&ids);
    let pid = run.child.id();
    let dirs: Vec<_> = lab::kube::leftover_dirs()
        .into_iter()
        .filter(|d| d.to_string_lossy().contains(&format!("{}{pid}-", lab::kube::DIR_PREFIX)))
        .collect();
    assert!(dirs.is_empty(), "control-plane directories left: {dirs:?}");
}

#[test]
fn ctrl_c_while_the_agent_runs_removes_everything_and_says_so() {
    let mut run = DemoRun::start(&["--yes", "--agent", BIN]);
    run.wait_for_line("ready after");
    let agent_pid: u32 = run
        .output
        .iter()
        .find_map(|l| l.split("agent pid ").nth(1))
        .and_then(|rest| rest.split(')').next()?.parse().ok())
        .expect("the demo names the agent's pid");
    let ids = run.agent_ids(node_manager::kernel::cgroup::HOOKS.len());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(run.child.id() as i32, libc::SIGINT) };
    let code = run.finish();
    let text = run.text();
    assert_eq!(code, Some(i32::from(demo::EXIT_INTERRUPTED)), "{text}");
    for said in [
        "==> interrupted",
        "removed: the agent process",
        "removed: the agent's datapath",
        "removed: the demo cgroup",
        "removed: network namespaces",
        "nothing left behind",
        "==> demo interrupted",
    ] {
        assert!(text.contains(said), "{said:?} not said:\n{text}");
    }
    assert!(!text.contains("verdict cleanup"), "an interrupted demo gives no verdicts:\n{text}");
    assert!(!Path::new(&format!("/proc/{agent_pid}")).exists(), "the agent {agent_pid} still runs");
    run.assert_nothing_left(&ids);
}

#[test]
fn what_a_killed_demo_left_is_removed_by_the_next_run() {
    let mut killed = DemoRun::start(&["--yes", "--agent", BIN]);
    killed.wait_for_line("ready after");
    let ids = killed.agent_ids(node_manager::kernel::cgroup::HOOKS.len());
    let pid = killed.child.id();
    killed.child.kill().unwrap(); // SIGKILL: no cleanup at all
    killed.finish();
    let node = format!("nml-{pid}-0-node");
    assert!(lab::leftovers().contains(&node), "the killed demo's namespaces are still there");
    // The agent was told to stop (parent-death signal) instead of running on.
    let agent_gone = || {
        !std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&format!("{}{pid}/bpffs", demo::DIR_PREFIX)))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent_gone() {
        assert!(Instant::now() < deadline, "the killed demo's agent still runs");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut next = DemoRun::start(&["--yes", "--agent", BIN]);
    assert_eq!(next.finish(), Some(0), "{}", next.text());
    let text = next.text();
    for said in [
        "removing what an earlier demo left behind".to_owned(),
        format!("removed: network namespace {node} (left by demo {pid})"),
        "removed: the demo cgroup /sys/fs/cgroup".to_owned(),
        format!(
            "removed: the datapath pinned in {}",
            std::env::temp_dir().join(format!("{}{pid}/bpffs", demo::DIR_PREFIX)).display()
        ),
    ] {
        assert!(text.contains(&said), "{said:?} not said:\n{text}");
    }
    killed.assert_nothing_left(&ids);
}

#[test]
fn a_missing_agent_binary_is_named_with_what_to_do() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "demo_process", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, r#"["--yes", "--agent", "/nonexistent/node-manager"]"#)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("/nonexistent/node-manager does not exist: build it"), "{stdout}");
}
