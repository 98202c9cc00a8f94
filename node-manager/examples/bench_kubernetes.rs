//! The Kubernetes source, measured on the real agent binary against `fake-apiserver`:
//! the initial sync of N Services (agent start → every entry in the pinned map), the agent's
//! resident memory holding them, and the time from a Service event to its map entry (median,
//! p99). Run as root, with the agent built:
//! `NODE_MANAGER_BIN=target/release/node-manager cargo run --release -p node-manager --example bench_kubernetes [-- --quick]`
//! (`cargo xtask bench` does both).
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{HashMap, Map, MapData};
use fake_apiserver::FakeApiServer;
use node_manager::{
    datapath::maps,
    model::{FrontendAddr, Protocol},
};
use node_manager_common::{Frontend, FrontendKey};
use serde_json::{Value, json};

const NODE: &str = "bench-node";
/// LB addresses are spread over this many IPs of 203.0.113.0/24, ports over the rest.
const LB_IPS: usize = 250;

fn service(i: usize, port: u16) -> (Value, FrontendAddr) {
    let last = (i % LB_IPS + 1) as u8;
    let lb = Ipv4Addr::new(203, 0, 113, last);
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": format!("ns{}", i % 50), "name": format!("svc-{i}"),
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\",\"kind\":\"Service\"}"},
                     "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1"}]},
        "spec": {"type": "LoadBalancer", "clusterIP": format!("198.51.100.{last}"), "clusterIPs": [format!("198.51.100.{last}")],
                 "ipFamilies": ["IPv4"], "externalTrafficPolicy": "Local", "selector": {"app": format!("app-{i}")},
                 "ports": [{"name": "tcp", "port": port, "protocol": "TCP", "targetPort": 8080, "nodePort": 30000 + (i % 2000)}]},
        "status": {"loadBalancer": {"ingress": [{"ip": lb.to_string(), "ipMode": "VIP"}]}},
    });
    (svc, FrontendAddr { addr: lb.into(), port, protocol: Protocol::Tcp })
}

/// A bpffs of our own; `node-manager cleanup` and unmount on drop.
struct Bpffs {
    dir: PathBuf,
    bin: PathBuf,
}

impl Bpffs {
    fn new(bin: &Path) -> Result<Bpffs> {
        let dir = std::env::temp_dir().join(format!("nm-bench-k8s-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bpffs"))?;
        let ok = Command::new("mount").args(["-t", "bpf", "bpffs"]).arg(dir.join("bpffs")).status()?.success();
        if !ok {
            bail!("mounting a bpffs (run as root)");
        }
        Ok(Bpffs { dir, bin: bin.to_owned() })
    }

    fn path(&self) -> PathBuf {
        self.dir.join("bpffs")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin).args(["cleanup", "--bpffs"]).arg(self.path()).output();
        let _ = Command::new("umount").arg(self.path()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field}"))?;
    Ok(line.split_whitespace().nth(1).context("malformed")?.parse()?)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let (n, samples) = if quick { (1_000, 20) } else { (10_000, 200) };
    let bin = PathBuf::from(std::env::var("NODE_MANAGER_BIN").unwrap_or_else(|_| {
        let exe = std::env::current_exe().unwrap();
        exe.parent().and_then(Path::parent).unwrap().join("node-manager").to_string_lossy().into_owned()
    }));
    if !bin.is_file() {
        bail!("{} not found: build it (cargo build --release -p node-manager) or set NODE_MANAGER_BIN", bin.display());
    }
    let server = FakeApiServer::start()?;
    server.apply(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}, "spec": {"podCIDRs": ["192.0.2.0/25"]}}),
    );
    for i in 0..n {
        server.apply(service(i, 1000 + (i / LB_IPS) as u16).0);
    }
    let bpffs = Bpffs::new(&bin)?;
    let kubeconfig = bpffs.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig())?;
    let log = bpffs.dir.join("agent.log");

    let started = Instant::now();
    let agent = AgentProcess(
        Command::new(&bin)
            .args(["run", "--node-name", NODE, "--kubeconfig"])
            .arg(&kubeconfig)
            .arg("--bpffs")
            .arg(bpffs.path())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?,
    );
    let pin = bpffs.path().join("node-manager/v1/maps/NM_FRONTENDS");
    // One TCP entry per Service plus one echo entry per LB address.
    let want = n + n.min(LB_IPS);
    let map = loop {
        if let Ok(data) = MapData::from_pin(&pin) {
            break HashMap::<_, FrontendKey, Frontend>::try_from(Map::HashMap(data))?;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("no pinned map after 30 s:\n{}", std::fs::read_to_string(&log)?);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    loop {
        if map.keys().count() >= want {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("initial sync incomplete after 60 s:\n{}", std::fs::read_to_string(&log)?);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let initial = started.elapsed();
    let pid = agent.0.id();
    let rss_synced = status_kib(pid, "VmRSS:")?;
    let text = std::fs::read_to_string(&log)?;
    // The log is coloured (ANSI escapes between field names and values): strip them.
    let text: String = {
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
    };
    let sync_us: Option<u64> = text
        .lines()
        .find(|l| l.contains("frontends synced"))
        .and_then(|l| l.split("elapsed_us=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok());

    let mut latencies = Vec::with_capacity(samples);
    for k in 0..samples {
        let (svc, frontend) = service(n + k, 40_000 + k as u16);
        let key = maps::frontend_key(&frontend);
        let t0 = Instant::now();
        server.apply(svc);
        while map.get(&key, 0).is_err() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("Service {k} never reached the map");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        latencies.push(t0.elapsed());
        // Events further apart than the source's coalescing window: each is published at
        // once, so this measures the path, not the throttle.
        std::thread::sleep(node_manager::source::kubernetes::COALESCE + Duration::from_millis(10));
    }
    latencies.sort();
    let rss = status_kib(pid, "VmRSS:")?;
    let hwm = status_kib(pid, "VmHWM:")?;

    println!(
        "Kubernetes source, agent binary against fake-apiserver over loopback HTTP ({n} Services{})",
        if quick { ", --quick" } else { "" }
    );
    println!(
        "  initial sync, agent start → {want} entries in the pinned map: {:.0} ms (of which the model and map diff-write: {})",
        initial.as_secs_f64() * 1000.0,
        sync_us.map_or("?".into(), |us| format!("{:.1} ms", us as f64 / 1000.0))
    );
    println!(
        "  Service event → map entry ({samples} Services created one at a time, {n}+ present): median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().unwrap().as_secs_f64() * 1000.0,
    );
    println!(
        "  agent resident memory: VmRSS {:.1} MiB after the initial sync of {n} Services, {:.1} MiB after {samples} more (peak VmHWM {:.1} MiB)",
        rss_synced as f64 / 1024.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    drop(agent);
    let kept = std::env::temp_dir().join("bench_kubernetes-agent.log");
    std::fs::copy(&log, &kept)?;
    println!("  (agent log: {})", kept.display());
    Ok(())
}
