//! Running the real agent binary inside a lab's node namespace, with a private bpffs.
#![allow(dead_code)]
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use lab::{Lab, Ns};

pub const BIN: &str = env!("CARGO_BIN_EXE_node-manager");

/// A cgroup v2 directory of its own under the cgroup2 mount, removed on drop (its processes
/// must have exited by then).
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> TestCgroup {
        static N: AtomicUsize = AtomicUsize::new(0);
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let root = node_manager::kernel::cgroup::cgroup2_mount_in(&mountinfo).expect("a cgroup v2 mount");
        let path = root.join(format!("nml-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        TestCgroup { path }
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("removing test cgroup {}: {e}", self.path.display());
        }
    }
}

/// A scratch directory with a bpffs mounted in it, and a test cgroup; `Drop` runs
/// `node-manager cleanup` against it (so nothing stays attached even if a test failed),
/// unmounts it and removes the cgroup.
pub struct Scratch {
    pub dir: PathBuf,
    pub bpffs: PathBuf,
    /// Given to every agent as `--cgroup-path` unless the test passes its own, so that no test
    /// ever attaches the socket hooks to the machine's root cgroup.
    pub cgroup: TestCgroup,
    /// The namespace the agent runs in; `None`: the test's own (nothing gets attached there:
    /// `--external-cluster` stays off and the INVALID drop is turned off, see `nm`).
    node_netns: Option<PathBuf>,
}

impl Scratch {
    pub fn new(lab: &Lab) -> Scratch {
        Self::in_netns(Some(lab.netns_path(Ns::Node)))
    }

    /// For tests of the maps alone: the agent runs in the test's network namespace.
    pub fn host() -> Scratch {
        Self::in_netns(None)
    }

    fn in_netns(node_netns: Option<PathBuf>) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir =
            std::env::temp_dir().join(format!("nm-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        let bpffs = dir.join("bpffs");
        fs::create_dir_all(&bpffs).unwrap();
        let ok = Command::new("mount").args(["-t", "bpf", "bpffs"]).arg(&bpffs).status().unwrap().success();
        assert!(ok, "mounting a private bpffs at {}", bpffs.display());
        Scratch { dir, bpffs, cgroup: TestCgroup::new(), node_netns }
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `node-manager <args> --bpffs <ours>` in the node namespace (`run` and `cleanup` also get
    /// `--cgroup-path <ours>` unless `args` has one).
    pub fn nm(&self, args: &[&str]) -> Command {
        self.nm_with(Path::new(BIN), &[], args)
    }

    /// Like `nm`, but runs `bin` (another build of the agent), behind `wrapper` (for example
    /// `setpriv ...`) when it is not empty.
    pub fn nm_with(&self, bin: &Path, wrapper: &[&str], args: &[&str]) -> Command {
        let mut cmd = match &self.node_netns {
            Some(netns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", netns.display())).arg("--").args(wrapper).arg(bin);
                cmd
            }
            None if wrapper.is_empty() => Command::new(bin),
            None => {
                let mut cmd = Command::new(wrapper[0]);
                cmd.args(&wrapper[1..]).arg(bin);
                cmd
            }
        };
        cmd.args(args).arg("--bpffs").arg(&self.bpffs);
        if matches!(args.first(), Some(&"run" | &"cleanup")) && !args.contains(&"--cgroup-path") {
            cmd.arg("--cgroup-path").arg(&self.cgroup.path);
        }
        // In the test's own (the machine's) namespace, never install the INVALID drop.
        if self.node_netns.is_none() && args.first() == Some(&"run") && !args.contains(&"--drop-invalid-input") {
            cmd.args(["--drop-invalid-input", "false"]);
        }
        cmd
    }

    pub fn inspect(&self) -> serde_json::Value {
        self.try_inspect().unwrap_or_else(|e| panic!("inspect failed: {e}"))
    }

    /// `inspect`, or its error (while an agent is still creating its pins, for instance).
    pub fn try_inspect(&self) -> Result<serde_json::Value, String> {
        let out = self.nm(&["inspect", "--json"]).output().unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    pub fn cleanup(&self) -> std::process::Output {
        self.nm(&["cleanup"]).output().unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = self.cleanup();
        let _ = Command::new("umount").arg(&self.bpffs).status();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The agent process; killed on drop.
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(scratch: &Scratch, args: &[&str]) -> Agent {
        Self::start_with_env(scratch, args, &[])
    }

    pub fn start_with_env(scratch: &Scratch, args: &[&str], env: &[(&str, &str)]) -> Agent {
        Self::start_bin_env(scratch, Path::new(BIN), args, env, "agent.log")
    }

    /// Runs `bin` (another build of the agent) with `args`, logging to `log_name`.
    pub fn start_bin(scratch: &Scratch, bin: &Path, args: &[&str], log_name: &str) -> Agent {
        Self::start_bin_env(scratch, bin, args, &[], log_name)
    }

    fn start_bin_env(scratch: &Scratch, bin: &Path, args: &[&str], env: &[(&str, &str)], log_name: &str) -> Agent {
        let log = scratch.file(log_name);
        let mut full = vec!["run"];
        full.extend_from_slice(args);
        let child = scratch
            .nm_with(bin, &[], &full)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Agent { child, log }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; returns whether it exited successfully.
    pub fn stop(mut self) -> bool {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status.success()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn write(path: &Path, text: &str) {
    // Write then rename, so the agent never reads half a file.
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// The lab's Service: LoadBalancer, dual-stack, TCP and UDP 8080, externalTrafficPolicy Local.
pub fn lab_service_yaml(name: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{namespace: lab, name: {name}}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  clusterIP: {c4}
  clusterIPs: [{c4}, "{c6}"]
  ipFamilies: [IPv4, IPv6]
  ports:
  - {{name: tcp, port: 8080, protocol: TCP}}
  - {{name: udp, port: 8080, protocol: UDP}}
status:
  loadBalancer:
    ingress: [{{ip: {e4}}}, {{ip: "{e6}"}}]
"#,
        c4 = lab::CLUSTER_V4,
        c6 = lab::CLUSTER_V6,
        e4 = lab::EXTERNAL_V4,
        e6 = lab::EXTERNAL_V6,
    )
}

/// A plain HTTP/1.1 GET (in the caller's network namespace): (status, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read as _, Write as _};
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    write!(conn, "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut response = String::new();
    conn.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("no status line")?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// The address the agent's metrics server bound (`--metrics-addr 127.0.0.1:0`), from its log.
pub fn metrics_addr(log: &str) -> Option<std::net::SocketAddr> {
    log.lines()
        .filter(|l| l.contains("serving /metrics"))
        .find_map(|l| l.split("addr=").nth(1)?.split_whitespace().next()?.parse().ok())
}

/// `run` arguments for the lab: the services file, the rewrite on, the lab's pod CIDRs.
pub fn lab_agent_args(services: &str) -> Vec<&str> {
    vec![
        "--services-file",
        services,
        "--external-cluster",
        "true",
        "--pod-cidr-ipv4",
        lab::POD_CIDR_V4,
        "--pod-cidr-ipv6",
        lab::POD_CIDR_V6,
    ]
}

/// Program names on the lab pod interface's TCX hook (`"ingress"` or `"egress"`), queried from
/// inside the node namespace (none on kernels without TCX).
pub fn tcx_programs(lab: &lab::Lab, hook: &str) -> Vec<String> {
    if !super::kernel::has_tcx() {
        return Vec::new();
    }
    let iface = lab.pod_host_if().to_owned();
    let attach_type =
        if hook == "ingress" { aya::programs::TcAttachType::Ingress } else { aya::programs::TcAttachType::Egress };
    lab::in_netns(lab.netns_path(lab::Ns::Node), move || {
        let (_, progs) = aya::programs::SchedClassifier::query_tcx(&iface, attach_type)?;
        Ok(progs.iter().map(|p| p.name_as_str().unwrap_or("?").to_owned()).collect())
    })
    .unwrap()
}
