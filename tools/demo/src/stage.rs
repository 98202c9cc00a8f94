//! Everything the demo creates, in one guard: a scratch directory with a private bpffs, a demo
//! cgroup, the lab's namespaces, and the agent process. Dropping it (normal end, error, Ctrl-C,
//! panic) stops the agent, runs `node-manager cleanup`, and removes the rest, saying what it
//! removed; then it checks that nothing is left.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use lab::{Lab, Ns};
use serde_json::Value;

use crate::interrupt;
use crate::real::RealKube;

/// Prefix of the demo's cgroup under the cgroup v2 root (`nml-demo-<pid>`).
pub const CGROUP_PREFIX: &str = "nml-demo-";
/// Prefix of the demo's scratch directory under the temp dir (`nm-demo-<pid>`).
pub const DIR_PREFIX: &str = "nm-demo-";

pub struct Stage {
    agent_bin: PathBuf,
    /// The scratch directory: services file, agent log, and the bpffs mount point.
    pub dir: PathBuf,
    dir_created: bool,
    bpffs_mounted: bool,
    /// The demo's cgroup: host processes run here, the socket hooks attach here.
    pub cgroup: Option<PathBuf>,
    pub lab: Option<Lab>,
    namespaces: Vec<String>,
    /// The lab's own kube-proxy stand-in runs (no `--kube-proxy`).
    stand_in_kube_proxy: bool,
    /// The real Kubernetes components (`--kube-proxy MODE`).
    pub kube: Option<RealKube>,
    agent: Option<Child>,
    /// Whether an agent was started (so there is a datapath to clean up).
    agent_started: bool,
    torn_down: bool,
    /// Whether the teardown found everything removed.
    pub clean: bool,
}

impl Stage {
    /// Builds everything except the agent. On error, what was created is removed again (by
    /// `Drop`).
    pub fn build(agent_bin: &Path, real_kube_proxy: bool) -> Result<Stage> {
        let pid = std::process::id();
        let mut stage = Stage {
            agent_bin: agent_bin.to_path_buf(),
            dir: std::env::temp_dir().join(format!("{DIR_PREFIX}{pid}")),
            dir_created: false,
            bpffs_mounted: false,
            cgroup: None,
            lab: None,
            namespaces: Vec::new(),
            stand_in_kube_proxy: !real_kube_proxy,
            kube: None,
            agent: None,
            agent_started: false,
            torn_down: false,
            clean: false,
        };
        fs::create_dir(&stage.dir).with_context(|| format!("creating {}", stage.dir.display()))?;
        stage.dir_created = true;
        let bpffs = stage.bpffs();
        fs::create_dir(&bpffs).with_context(|| format!("creating {}", bpffs.display()))?;
        run_quiet(Command::new("mount").args(["-t", "bpf", "bpffs"]).arg(&bpffs))
            .with_context(|| format!("mounting a private bpffs at {}", bpffs.display()))?;
        stage.bpffs_mounted = true;
        interrupt::check()?;

        let root = cgroup2_root()?;
        let cgroup = root.join(format!("{CGROUP_PREFIX}{pid}"));
        fs::create_dir(&cgroup).with_context(|| format!("creating the demo cgroup {}", cgroup.display()))?;
        stage.cgroup = Some(cgroup);
        interrupt::check()?;

        let lab = if real_kube_proxy { Lab::for_real_kube_proxy() } else { Lab::new() }
            .context("building the lab (network namespaces)")?;
        stage.namespaces = [Ns::Pod, Ns::Node, Ns::Ep].map(|ns| lab.ns_name(ns).to_owned()).to_vec();
        stage.lab = Some(lab);
        interrupt::check()?;
        Ok(stage)
    }

    pub fn lab(&self) -> &Lab {
        self.lab.as_ref().expect("the lab exists until teardown")
    }

    pub fn cgroup(&self) -> &Path {
        self.cgroup.as_deref().expect("the cgroup exists until teardown")
    }

    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    pub fn kube(&self) -> Option<&RealKube> {
        self.kube.as_ref()
    }

    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    pub fn services_file(&self) -> PathBuf {
        self.dir.join("services.yaml")
    }

    /// `node-manager <args> --bpffs <ours>` inside the lab's node namespace, in its own process
    /// group: a Ctrl-C in the terminal reaches only the demo, which then finishes or stops what
    /// it runs itself (a second Ctrl-C must not kill `node-manager cleanup` half-way).
    pub fn nm(&self, args: &[&str]) -> Command {
        use std::os::unix::process::CommandExt as _;
        let mut cmd = self.lab().command(Ns::Node, &self.agent_bin);
        cmd.args(args).arg("--bpffs").arg(self.bpffs()).process_group(0);
        cmd
    }

    /// How [`Stage::nm`] looks to a user.
    pub fn nm_shown(&self, args: &str) -> String {
        format!(
            "nsenter --net={} {} {args} --bpffs {}",
            self.lab().netns_path(Ns::Node).display(),
            self.agent_bin.display(),
            self.bpffs().display()
        )
    }

    /// Starts `node-manager run <args>` with `env` in the node namespace (in its own process group, see
    /// [`Stage::nm`]: on Ctrl-C the demo stops it).
    pub fn start_agent(&mut self, args: &[&str], env: &[(String, String)]) -> Result<()> {
        use std::os::unix::process::CommandExt as _;
        let log = fs::File::create(self.agent_log()).context("creating the agent log")?;
        let mut full = vec!["run"];
        full.extend_from_slice(args);
        let mut cmd = self.nm(&full);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        // If the demo itself is killed (SIGKILL: no cleanup), the agent gets SIGTERM instead of
        // running on; the next demo removes the rest (see `stale::remove`). nsenter execs the
        // agent, and the parent-death signal survives exec.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = cmd
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.agent_bin.display()))?;
        self.agent = Some(child);
        self.agent_started = true;
        Ok(())
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Fails (with the end of the agent's log) if the agent has exited.
    pub fn check_agent_alive(&mut self) -> Result<()> {
        if let Some(child) = self.agent.as_mut()
            && let Some(status) = child.try_wait()?
        {
            self.agent = None;
            bail!("the agent exited ({status}); the end of its log:\n{}", self.agent_log_tail(15));
        }
        Ok(())
    }

    pub fn agent_log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.agent_log()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `node-manager inspect --json`.
    pub fn inspect(&self) -> Result<Value> {
        let out = self.nm(&["inspect", "--json"]).stdin(Stdio::null()).output().context("running inspect")?;
        if !out.status.success() {
            bail!("inspect failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        serde_json::from_slice(&out.stdout).context("parsing inspect --json")
    }

    /// Stops and removes everything, printing one line per thing removed; idempotent.
    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        println!();
        println!("==> cleaning up everything the demo made");
        let mut failures = 0;
        let mut report = |what: Result<String>| match what {
            Ok(line) => println!("    removed: {line}"),
            Err(e) => {
                failures += 1;
                println!("    FAILED: {e:#}");
            }
        };
        if let Some(mut child) = self.agent.take() {
            report(stop_agent(&mut child));
        }
        if self.agent_started && self.bpffs_mounted && self.lab.is_some() {
            report(self.cleanup_datapath());
        }
        if self.bpffs_mounted {
            self.bpffs_mounted = false;
            let bpffs = self.bpffs();
            report(
                run_quiet(Command::new("umount").arg(&bpffs))
                    .map(|()| format!("the private bpffs mounted at {}", bpffs.display())),
            );
        }
        if let Some(cgroup) = self.cgroup.take() {
            report(remove_cgroup(&cgroup));
        }
        if let Some(mut kube) = self.kube.take() {
            for line in kube.stop() {
                report(Ok(line));
            }
        }
        if let Some(lab) = self.lab.take() {
            drop(lab);
            report(Ok(format!(
                "network namespaces {} (with the veths, {}the nftables tables and the echo servers in them)",
                self.namespaces.join(", "),
                if self.stand_in_kube_proxy { "kube-ipvs0, " } else { "" }
            )));
        }
        if self.dir_created {
            self.dir_created = false;
            report(
                fs::remove_dir_all(&self.dir)
                    .map(|()| format!("{} (services file or kubeconfig, agent log)", self.dir.display()))
                    .with_context(|| format!("removing {}", self.dir.display())),
            );
        }
        let left = self.leftovers();
        if left.is_empty() && failures == 0 {
            println!("    nothing left behind: no demo namespace, cgroup, pin, program, link or directory remains");
            self.clean = true;
        } else {
            for l in &left {
                println!("    LEFT BEHIND: {l}");
            }
        }
    }

    /// `node-manager cleanup` in the node namespace: links, programs, pins (and an nftables
    /// fallback table, if the INVALID drop had to use one).
    fn cleanup_datapath(&self) -> Result<String> {
        let mut cmd = self.nm(&["cleanup"]);
        if let Some(cg) = &self.cgroup {
            cmd.arg("--cgroup-path").arg(cg);
        }
        let out = cmd.stdin(Stdio::null()).output().context("running node-manager cleanup")?;
        let said = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() {
            bail!("node-manager cleanup failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(format!("the agent's datapath (`node-manager cleanup` said: {said})"))
    }

    /// What still exists of ours after the teardown.
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let existing = lab::leftovers();
        left.extend(self.namespaces.iter().filter(|n| existing.contains(n)).map(|n| format!("network namespace {n}")));
        if self.dir.exists() {
            left.push(format!("directory {}", self.dir.display()));
        }
        let ours = format!("{}{}-", lab::kube::DIR_PREFIX, std::process::id());
        left.extend(
            lab::kube::leftover_dirs()
                .iter()
                .filter(|d| d.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&ours)))
                .map(|d| format!("control-plane directory {}", d.display())),
        );
        if is_mount_point(&self.bpffs()) {
            left.push(format!("bpffs mount {}", self.bpffs().display()));
        }
        if let Ok(root) = cgroup2_root() {
            let cg = root.join(format!("{CGROUP_PREFIX}{}", std::process::id()));
            if cg.exists() {
                left.push(format!("cgroup {}", cg.display()));
            }
        }
        left
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.teardown();
    }
}

pub fn is_mount_point(path: &Path) -> bool {
    let Some(wanted) = path.to_str() else {
        return false;
    };
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(wanted))
}

/// SIGTERM, then SIGKILL after 5 s.
fn stop_agent(child: &mut Child) -> Result<String> {
    let pid = child.id();
    if let Some(status) = child.try_wait()? {
        return Ok(format!("the agent process {pid} (it had already exited: {status})"));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(format!("the agent process {pid} (stopped with SIGTERM: {status})"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let status = child.wait()?;
            return Ok(format!("the agent process {pid} (killed after 5 s: {status})"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// rmdir, retrying briefly: a process that just exited may still be listed in the cgroup.
pub fn remove_cgroup(cgroup: &Path) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(format!("the demo cgroup {}", cgroup.display())),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("removing the demo cgroup {}", cgroup.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The mount point of the cgroup v2 root, from `/proc/self/mountinfo`.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let fields: Vec<&str> = pre.split_whitespace().collect();
            (post.starts_with("cgroup2 ") && fields.get(3) == Some(&"/"))
                .then(|| fields.get(4).map(PathBuf::from))
                .flatten()
        })
        .context(
            "no cgroup v2 hierarchy is mounted: the host-process part of the demo needs one \
             (mount it with `mount -t cgroup2 none /sys/fs/cgroup`)",
        )
}

/// Runs a command to completion in its own process group (see [`Stage::nm`]).
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).process_group(0).output().with_context(|| format!("running {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
