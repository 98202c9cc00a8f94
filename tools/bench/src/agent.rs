//! B: the node-manager agent binary in a lab's node namespace, attached to that lab's pod
//! interface, fed by the real kube-apiserver (`lab::kube`, bridged into the node namespace;
//! the agent with a ServiceAccount token, as deployed), with a private bpffs and an empty test
//! cgroup for its socket hooks. The apiserver's audit log dates the agent's first list of
//! Services and every write, so apply and change are timed from the API's side.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use lab::{
    Lab, Ns,
    kube::{ApiBridge, Cluster, Options},
};
use node_manager::{
    kernel::maps,
    model::{FrontendAddr, Protocol},
};
use node_manager_common::{Counter, Frontend, FrontendKey, map_names};
use serde_json::Value;

use crate::{
    etcd_fill, interrupt,
    services::{self, Family},
};

/// How long an agent may take from start to its first map sync (100,000 Services included).
const SYNC_WITHIN: Duration = Duration::from_secs(180);
const CHANGE_WITHIN: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(2);

/// A private bpffs and an empty cgroup; `node-manager cleanup` against both, unmount and
/// removal on drop.
struct Scratch {
    dir: PathBuf,
    cgroup: PathBuf,
    bin: PathBuf,
}

impl Scratch {
    fn new(bin: &Path) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("nm-bench-{}", std::process::id()));
        fs::create_dir_all(dir.join("bpffs")).with_context(|| format!("creating {}", dir.display()))?;
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let root = node_manager::kernel::cgroup::cgroup2_mount_in(&mountinfo).context("no cgroup v2 mount")?;
        // Named like the tests' cgroups, so `cargo xtask test` reports it if it is left over.
        let cgroup = root.join(format!("nml-test-bench-{}", std::process::id()));
        let scratch = Scratch { dir, cgroup, bin: bin.to_owned() };
        let mounted = Command::new("mount").args(["-t", "bpf", "bpffs"]).arg(scratch.bpffs()).status()?.success();
        if !mounted {
            bail!("mounting a bpffs at {} (run as root)", scratch.bpffs().display());
        }
        fs::create_dir(&scratch.cgroup).with_context(|| format!("creating cgroup {}", scratch.cgroup.display()))?;
        Ok(scratch)
    }

    fn bpffs(&self) -> PathBuf {
        self.dir.join("bpffs")
    }

    fn map_pin(&self, name: &str) -> PathBuf {
        self.bpffs().join("node-manager/v1/maps").join(name)
    }

    /// Removes every program, link and pin an agent left (as after a stop).
    fn cleanup(&self) -> Result<()> {
        let out = Command::new(&self.bin)
            .args(["cleanup", "--bpffs"])
            .arg(self.bpffs())
            .arg("--cgroup-path")
            .arg(&self.cgroup)
            .output()?;
        if !out.status.success() {
            bail!("node-manager cleanup failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("bench: {e:#}");
        }
        let _ = Command::new("umount").arg(self.bpffs()).status();
        if self.cgroup.exists()
            && let Err(e) = fs::remove_dir(&self.cgroup)
        {
            eprintln!("bench: removing cgroup {}: {e}", self.cgroup.display());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl AgentProcess {
    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Drop kills.
    }

    /// The agent's `frontends synced` log lines, decoded.
    fn syncs(&self) -> Vec<SyncLine> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        strip_ansi(&text).lines().filter_map(SyncLine::parse).collect()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `frontends synced` line of the agent's log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SyncLine {
    frontends: usize,
    elapsed: Duration,
    /// The line's own timestamp (the agent logs right after the map write).
    at: Option<jiff::Timestamp>,
}

impl SyncLine {
    fn parse(line: &str) -> Option<SyncLine> {
        if !line.contains("frontends synced") {
            return None;
        }
        let field = |name: &str| -> Option<u64> {
            line.split_whitespace().find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
        };
        let at = line.split_whitespace().next().and_then(|w| w.parse().ok());
        Some(SyncLine {
            frontends: field("frontends")? as usize,
            elapsed: Duration::from_micros(field("elapsed_us")?),
            at,
        })
    }
}

/// The log is coloured even into a file: drop the ANSI escape sequences.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// An agent started from nothing (no pins) with N Services in the API server.
#[derive(Clone, Copy, Debug)]
pub struct Start {
    /// Agent start → its log says the maps hold all N Services' entries (programs loaded,
    /// Services and Node listed, model computed, maps written).
    pub end_to_end: Duration,
    /// Of which the model and the map writes (the agent's own `elapsed_us`).
    pub sync: Duration,
    /// The apiserver's answer to the agent's first list of Services (its audit log) → the log
    /// line of the sync that wrote the last entry.
    pub from_first_event: Duration,
    /// Of which the list itself: the apiserver's answers to the agent's list requests for
    /// Services before the sync (the watcher pages by 500), first → last.
    pub listing: Duration,
    /// How many list requests (pages) those were.
    pub list_pages: usize,
    /// VmRSS right after that sync, KiB.
    pub rss_kib: u64,
}

/// One more Service created in the API server while the agent holds N.
#[derive(Clone, Copy, Debug)]
pub struct Change {
    /// The apiserver received the create (its audit log) → the new entry is in the pinned map
    /// (polled every 0.2 ms while kubectl runs).
    pub end_to_end: Duration,
    /// Of which the model and the map diff-write (the agent's `elapsed_us`).
    pub sync: Duration,
    /// Of which the apiserver's own handling of the create (request received → response
    /// complete, its audit log): admission, the cluster IP's allocation, the etcd write.
    pub apiserver: Duration,
}

/// The agent side of the benchmark, in one lab.
pub struct AgentSide<'a> {
    // Dropped in this order: the agent, then the API server, then the pins and cgroup.
    agent: Option<AgentProcess>,
    api: Option<Api>,
    scratch: Scratch,
    lab: &'a Lab,
    bin: PathBuf,
    frontends: Option<HashMap<MapData, FrontendKey, Frontend>>,
    starts: u32,
}

impl<'a> AgentSide<'a> {
    pub fn new(lab: &'a Lab, bin: &Path) -> Result<AgentSide<'a>> {
        Ok(AgentSide {
            agent: None,
            api: None,
            scratch: Scratch::new(bin)?,
            lab,
            bin: bin.to_owned(),
            frontends: None,
            starts: 0,
        })
    }

    /// Stops the agent (the datapath stays, as in production) and removes its datapath.
    pub fn stop_and_clean(&mut self) -> Result<()> {
        self.frontends = None;
        if let Some(agent) = self.agent.take() {
            agent.stop();
        }
        self.scratch.cleanup()
    }

    /// The apiserver (started at the first call) holding this lab's Node and exactly `svcs`
    /// (created and deleted by diff with what it held).
    /// Fillers numbered `api_fillers` and up that the apiserver lacks are written straight to
    /// etcd ([`crate::etcd_fill`]); the rest are created through the API.
    pub fn serve(&mut self, svcs: &[services::Svc], api_fillers: usize) -> Result<()> {
        self.stop_and_clean()?;
        if self.api.is_none() {
            self.api = Some(Api::start(self.lab, &self.scratch.dir)?);
        }
        self.api.as_mut().context("the API server")?.hold(svcs, api_fillers)
    }

    /// Removes any datapath, starts the agent and waits for its first sync, which must hold
    /// `expected` frontends.
    pub fn start_from_nothing(&mut self, expected: usize) -> Result<Start> {
        self.stop_and_clean()?;
        self.starts += 1;
        let log = self.scratch.dir.join(format!("agent-{}.log", self.starts));
        let started = Instant::now();
        let started_at = jiff::Timestamp::now();
        let child = self
            .lab
            .command(Ns::Node, &self.bin)
            .args(["run", "--node-name", services::NODE, "--kubeconfig"])
            .arg(&self.api.as_ref().context("serve() first")?.kubeconfig)
            .arg("--bpffs")
            .arg(self.scratch.bpffs())
            .arg("--cgroup-path")
            .arg(&self.scratch.cgroup)
            .args(["--external-cluster", "true", "--drop-invalid-input", "false", "--resync-period", "1h"])
            .args(["--pod-interfaces", self.lab.pod_host_if()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let agent = self.agent.insert(AgentProcess { child, log: log.clone() });
        let sync = loop {
            if let Some(first) = agent.syncs().first() {
                break *first;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                bail!("the agent exited ({status}):\n{}", fs::read_to_string(&log).unwrap_or_default());
            }
            if started.elapsed() > SYNC_WITHIN {
                bail!("no map sync within {SYNC_WITHIN:?}:\n{}", fs::read_to_string(&log).unwrap_or_default());
            }
            interrupt::check()?;
            std::thread::sleep(POLL);
        };
        let end_to_end = started.elapsed();
        let rss_kib = vm_rss_kib(agent.child.id())?;
        if sync.frontends != expected {
            bail!("the agent synced {} frontends, expected {expected}", sync.frontends);
        }
        let data = MapData::from_pin(self.scratch.map_pin(map_names::FRONTENDS)).context("opening the pinned map")?;
        let map = HashMap::try_from(Map::HashMap(data))?;
        let in_map = map.keys().count();
        if in_map != expected {
            bail!("the pinned map holds {in_map} frontends, expected {expected}");
        }
        self.frontends = Some(map);
        let api = self.api.as_ref().context("the API server")?;
        let synced_at = sync.at.context("the sync line has no timestamp")?;
        let pages = api.services_lists_between(started_at, synced_at)?;
        let (Some(&first_list), Some(&last_page)) = (pages.first(), pages.last()) else {
            bail!("the audit log has no list of Services by the agent before its sync");
        };
        let since = |from: jiff::Timestamp, to: jiff::Timestamp| -> Result<Duration> {
            to.duration_since(from).try_into().map_err(|_| anyhow::anyhow!("{to} precedes {from}"))
        };
        Ok(Start {
            end_to_end,
            sync: sync.elapsed,
            from_first_event: since(first_list, synced_at)?,
            listing: since(first_list, last_page)?,
            list_pages: pages.len(),
            rss_kib,
        })
    }

    /// Creates `svc` in the API server and waits for its entry in the pinned map.
    pub fn change(&mut self, svc: &services::Svc) -> Result<Change> {
        let (Some(agent), Some(api), Some(map)) = (&self.agent, &mut self.api, &self.frontends) else {
            bail!("no agent running");
        };
        let ext = svc.api_external_ips()[0];
        let key = maps::frontend_key(&FrontendAddr { addr: ext, port: svc.ports[0], protocol: Protocol::Tcp });
        let before = agent.syncs().len();
        let started = Instant::now();
        let mut kubectl = api.create_in_background(svc)?;
        let seen_at = loop {
            if map.get(&key, 0).is_ok() {
                break jiff::Timestamp::now();
            }
            if started.elapsed() > CHANGE_WITHIN {
                let _ = kubectl.kill();
                bail!("Service {} never reached the map", svc.key());
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let out = kubectl.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl create {}: {}", svc.key(), String::from_utf8_lossy(&out.stderr).trim());
        }
        let (written, answered) =
            api.create_times(svc)?.with_context(|| format!("no create of {} in the audit log", svc.key()))?;
        let apiserver = answered.duration_since(written).try_into().unwrap_or_default();
        let end_to_end = seen_at
            .duration_since(written)
            .try_into()
            .map_err(|_| anyhow::anyhow!("{}: in the map ({seen_at}) before the write ({written})", svc.key()))?;
        // The log line follows the map write.
        let sync = loop {
            let syncs = agent.syncs();
            if syncs.len() > before {
                break syncs[syncs.len() - 1];
            }
            if started.elapsed() > CHANGE_WITHIN {
                bail!("no `frontends synced` line after Service {}", svc.key());
            }
            std::thread::sleep(POLL);
        };
        // Further apart than the source's coalescing window, so the next change is published
        // at once: this measures the path, not the throttle.
        std::thread::sleep(node_manager::source::kubernetes::COALESCE + Duration::from_millis(10));
        Ok(Change { end_to_end, sync: sync.elapsed, apiserver })
    }

    /// The cgroup its socket hooks are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.scratch.cgroup
    }

    /// Packets of `family` the pod ingress program rewrote, which shows the pod's connections
    /// went through the agent's datapath.
    pub fn rewrites(&self, family: Family) -> Result<u64> {
        self.counter(match family {
            Family::V4 => "rewrite_ingress_v4",
            Family::V6 => "rewrite_ingress_v6",
        })
    }

    /// A datapath counter's packets (calls, for the socket hooks), by name.
    pub fn counter(&self, name: &str) -> Result<u64> {
        let data = MapData::from_pin(self.scratch.map_pin(map_names::COUNTERS)).context("opening the counters")?;
        let counters: PerCpuArray<_, Counter> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
        let all = maps::read_counters(&counters)?;
        all.iter().find(|(n, _)| *n == name).map(|(_, c)| c.packets).with_context(|| format!("no counter {name}"))
    }
}

/// The real control plane for B: etcd and kube-apiserver, bridged into the node namespace,
/// the Node, the Services it holds, and the agent's kubeconfig (a ServiceAccount token bound
/// to cluster-admin: the benchmark measures speed, `real_kubernetes.rs` the least privilege).
struct Api {
    /// Dropped before the cluster: its connections go to the apiserver.
    _bridge: ApiBridge,
    cluster: Cluster,
    kubeconfig: PathBuf,
    /// "namespace/name" of every Service created.
    held: std::collections::BTreeSet<String>,
}

/// The agent's ServiceAccount, as the audit log names it.
const AGENT_USER: &str = "system:serviceaccount:bench:agent";
/// kubectl processes creating Services at once (kubectl sends one request at a time).
const CREATORS: usize = 4;

impl Api {
    fn start(lab: &Lab, dir: &Path) -> Result<Api> {
        let mut cluster = Cluster::start(&Options::default()).context("starting etcd and kube-apiserver")?;
        cluster.quiet();
        let bridge = ApiBridge::into_netns(&lab.netns_path(Ns::Node), cluster.apiserver_port)?;
        cluster.create_node(services::NODE, &[lab::POD_CIDR_V4, lab::POD_CIDR_V6], &["192.0.2.129"])?;
        let namespaces: String = (0..50)
            .map(|k| format!("ns{k}"))
            .chain(["bench".to_owned()])
            .map(|ns| format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n"))
            .collect();
        cluster.apply(&namespaces)?;
        cluster.apply(
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: agent, namespace: bench}\n---\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: bench-agent}\n\
             roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: cluster-admin}\n\
             subjects: [{kind: ServiceAccount, name: agent, namespace: bench}]\n",
        )?;
        let token = cluster.token("bench", "agent", "24h", None)?;
        let kubeconfig = dir.join("kubeconfig");
        fs::copy(cluster.write_kubeconfig("agent.kubeconfig", &token)?, &kubeconfig)?;
        Ok(Api { _bridge: bridge, cluster, kubeconfig, held: Default::default() })
    }

    /// Creates what `svcs` has and the apiserver not (fillers from `api_fillers` up in etcd,
    /// the others through the API), deletes what it holds beyond `svcs`.
    fn hold(&mut self, svcs: &[services::Svc], api_fillers: usize) -> Result<()> {
        let wanted: std::collections::BTreeSet<String> = svcs.iter().map(services::Svc::key).collect();
        let extra: Vec<String> = self.held.difference(&wanted).cloned().collect();
        let mut by_namespace: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for key in &extra {
            let (ns, name) = key.split_once('/').context("namespace/name")?;
            by_namespace.entry(ns).or_default().push(name);
        }
        for (ns, names) in by_namespace {
            for chunk in names.chunks(500) {
                let mut args = vec!["delete", "service", "-n", ns];
                args.extend_from_slice(chunk);
                self.cluster.kubectl_ok(&args)?;
            }
        }
        for key in &extra {
            self.held.remove(key);
        }
        let (missing, to_etcd): (Vec<&services::Svc>, Vec<&services::Svc>) = svcs
            .iter()
            .filter(|s| !self.held.contains(&s.key()))
            .partition(|s| s.index.is_none_or(|i| i < api_fillers));
        self.create(&missing)?;
        if !to_etcd.is_empty() {
            etcd_fill::write(&self.cluster.etcd_url, &to_etcd)?;
            self.held.extend(to_etcd.iter().map(|s| s.key()));
            self.check_written(to_etcd[0])?;
        }
        Ok(())
    }

    /// A filler written to etcd, read back through the API, against filler 0 as the API made it.
    fn check_written(&self, written: &services::Svc) -> Result<()> {
        let created = services::filler(0);
        if !self.held.contains(&created.key()) {
            bail!("filler 0 must be created through the API to compare the fillers written to etcd with");
        }
        let get = |s: &services::Svc| -> Result<Value> {
            let json = self.cluster.kubectl_ok(&["get", "service", "-n", &s.namespace, &s.name, "-o", "json"])?;
            serde_json::from_str(&json).with_context(|| format!("kubectl get service {}", s.key()))
        };
        etcd_fill::check_same_as_api(&get(written)?, &get(&created)?)
    }

    /// `kubectl create` of `missing`, CREATORS at a time, and the target's ingress IPs.
    fn create(&mut self, missing: &[&services::Svc]) -> Result<()> {
        if missing.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let mut inputs = vec![String::new(); CREATORS];
        for (k, svc) in missing.iter().enumerate() {
            inputs[k % CREATORS].push_str(&svc.to_api_yaml());
        }
        let inputs: Vec<&str> = inputs.iter().map(String::as_str).filter(|i| !i.is_empty()).collect();
        self.cluster.kubectl_stdin_parallel(&["create", "-f", "-", "-o", "name"], &inputs)?;
        for svc in missing {
            if svc.index.is_none() {
                let ips: Vec<String> = svc.api_external_ips().iter().map(ToString::to_string).collect();
                self.cluster.set_lb_ips(
                    &svc.namespace,
                    &svc.name,
                    &ips.iter().map(String::as_str).collect::<Vec<_>>(),
                )?;
            }
            self.held.insert(svc.key());
        }
        println!(
            "  the apiserver holds {} Services ({} created in {:.1} s)",
            self.held.len(),
            missing.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// `kubectl create` of `svc`, running.
    fn create_in_background(&mut self, svc: &services::Svc) -> Result<Child> {
        use std::io::Write as _;
        let mut child = self
            .cluster
            .kubectl(&["create", "-f", "-", "-o", "name"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting kubectl")?;
        child.stdin.take().context("kubectl's stdin")?.write_all(svc.to_api_yaml().as_bytes())?;
        self.held.insert(svc.key());
        Ok(child)
    }

    /// The audit events of `verb` on Services by `user` (ResponseComplete), as JSON.
    fn service_events(&self, verb: &str, user: Option<&str>) -> Vec<Value> {
        self.cluster
            .audit_lines()
            .iter()
            .filter(|l| l.contains("\"ResponseComplete\"") && l.contains(&format!("\"verb\":\"{verb}\"")))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["objectRef"]["resource"] == "services")
            .filter(|e| user.is_none_or(|u| e["user"]["username"] == u))
            .collect()
    }

    /// When the apiserver completed each of the agent's lists of Services (the pages of its
    /// first list, and any relist) from `since` to `until`, in order.
    fn services_lists_between(&self, since: jiff::Timestamp, until: jiff::Timestamp) -> Result<Vec<jiff::Timestamp>> {
        let mut times: Vec<jiff::Timestamp> = self
            .service_events("list", Some(AGENT_USER))
            .iter()
            .filter_map(|e| e["stageTimestamp"].as_str()?.parse().ok())
            .filter(|t| *t >= since && *t <= until)
            .collect();
        times.sort();
        Ok(times)
    }

    /// When the apiserver received the (latest) create of `svc`, and when it answered it.
    fn create_times(&self, svc: &services::Svc) -> Result<Option<(jiff::Timestamp, jiff::Timestamp)>> {
        Ok(self
            .service_events("create", None)
            .iter()
            .filter(|e| {
                e["objectRef"]["namespace"] == svc.namespace.as_str() && e["objectRef"]["name"] == svc.name.as_str()
            })
            .filter_map(|e| {
                let received: jiff::Timestamp = e["requestReceivedTimestamp"].as_str()?.parse().ok()?;
                Some((received, e["stageTimestamp"].as_str()?.parse().ok()?))
            })
            .max())
    }
}

fn vm_rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("malformed VmRSS")?.parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sync_lines() {
        let line = "2026-11-22T03:49:30.1Z  \x1b[32m INFO\x1b[0m \x1b[2mnode_manager::agent\x1b[0m\x1b[2m:\x1b[0m frontends synced \x1b[3mfrontends\x1b[0m\x1b[2m=\x1b[0m10250 \x1b[3madded\x1b[0m\x1b[2m=\x1b[0m10250 \x1b[3melapsed_us\x1b[0m\x1b[2m=\x1b[0m23000";
        let parsed = SyncLine::parse(&strip_ansi(line)).unwrap();
        let at = "2026-11-22T03:49:30.1Z".parse().ok();
        assert_eq!(parsed, SyncLine { frontends: 10250, elapsed: Duration::from_millis(23), at });
        assert_eq!(SyncLine::parse("datapath loaded"), None);
    }
}
