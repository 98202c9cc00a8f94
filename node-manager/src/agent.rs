//! The agent: sources → model → datapath. One loop owns the datapath; it reconciles the maps
//! when a new snapshot arrives or the periodic resync fires, and the attachments when links
//! change. Until the first snapshot, the pinned maps keep serving what they held.
use std::{
    collections::{BTreeSet, HashSet},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use ipnet::IpNet;
use node_manager_common::DatapathConfig;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, watch},
};

use crate::{
    config::{Config, SourceConfig},
    datapath::{Datapath, attach::Iface},
    interfaces::{self, Matcher},
    invalid::{self, DropInvalid},
    model,
    source::{Snapshot, file, kubernetes},
};

/// Interfaces are rescanned on every link notification and at least this often.
const RESCAN_PERIOD: Duration = Duration::from_secs(5);
const FILE_POLL: Duration = Duration::from_millis(500);

pub async fn run(cfg: Config) -> Result<()> {
    for warning in &cfg.warnings {
        tracing::warn!("{warning}");
    }
    let (tx, mut rx) = watch::channel::<Option<Snapshot>>(None);
    match &cfg.source {
        SourceConfig::File(path) => {
            tokio::spawn(file::watch(path.clone(), tx, FILE_POLL));
        }
        SourceConfig::Kubernetes { kubeconfig } => {
            let client = kubernetes::client(kubeconfig.as_deref()).await?;
            // Served on /readyz once the agent has an HTTP endpoint; transitions are logged.
            let readiness = kubernetes::Readiness::default();
            tracing::info!(node = %cfg.node_name, "watching Services and this node's Node");
            tokio::spawn(kubernetes::watch(client, cfg.node_name.clone(), tx, readiness));
        }
    }

    let mut datapath = Datapath::load_pinned(&cfg.bpffs)?;
    datapath.set_config(DatapathConfig { masquerade_mark: cfg.masquerade_mark })?;
    tracing::info!(mechanism = datapath.mechanism().name(), bpffs = %cfg.bpffs.display(), "datapath loaded");
    // Not gated on pod CIDRs or on the Service source (network-node-manager dropped nothing
    // without POD_CIDR): INVALID replies hurt every masqueraded connection.
    let drop_invalid = if cfg.drop_invalid_input {
        Some(DropInvalid::start(cfg.drop_invalid_mode, &mut datapath)?)
    } else {
        invalid::disable(&mut datapath);
        None
    };
    // Kernel features: which mechanism each feature uses here, or why it is unavailable (logged,
    // and pinned for `inspect`); unavailable features are skipped, the rest runs.
    let bpf_load = drop_invalid.as_ref().and_then(|d| d.bpf_load.clone());
    datapath.report_features(drop_invalid.as_ref().map(DropInvalid::summary), bpf_load);

    let link_changes = Arc::new(Notify::new());
    interfaces::watch_links(link_changes.clone())?;
    let resync_period = cfg.resync_period;
    let mut agent = Agent::new(cfg, datapath, drop_invalid)?;
    agent.sync_interfaces();
    agent.sync_cgroup()?;

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut resync = tokio::time::interval(resync_period);
    let mut rescan = tokio::time::interval(RESCAN_PERIOD);
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() { bail!("the Service source stopped"); }
                let snapshot = rx.borrow_and_update().clone();
                if let Some(snapshot) = snapshot { agent.sync_maps(snapshot, false); }
            }
            _ = resync.tick() => agent.resync(),
            _ = link_changes.notified() => agent.sync_interfaces(),
            _ = rescan.tick() => { agent.sync_interfaces(); agent.ensure_drop_invalid(true); }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    tracing::info!("stopping; the datapath stays in place and keeps serving (remove it with `node-manager cleanup`)");
    Ok(())
}

struct Agent {
    cfg: Config,
    datapath: Datapath,
    drop_invalid: Option<DropInvalid>,
    matcher: Matcher,
    snapshot: Option<Snapshot>,
    /// Interfaces this process attached to (re-attached once at start to take over).
    attached: BTreeSet<Iface>,
    /// Warnings already logged, so a resync does not repeat them.
    reported: HashSet<String>,
}

impl Agent {
    fn new(cfg: Config, datapath: Datapath, drop_invalid: Option<DropInvalid>) -> Result<Agent> {
        let matcher = Matcher::new(&cfg.pod_interfaces)?;
        Ok(Agent {
            cfg,
            datapath,
            drop_invalid,
            matcher,
            snapshot: None,
            attached: BTreeSet::new(),
            reported: HashSet::new(),
        })
    }

    fn report_once(&mut self, warnings: &[String]) {
        for w in warnings {
            if self.reported.insert(w.clone()) {
                tracing::warn!("{w}");
            }
        }
    }

    /// The Node's pod CIDRs, overridden per family by POD_CIDR_IPV4 / POD_CIDR_IPV6 (a CNI
    /// such as Calico IPAM does not fill spec.podCIDRs, and may do so for one family only).
    fn pod_cidrs(&self, snapshot: &Snapshot) -> BTreeSet<IpNet> {
        let overridden = |v4: bool| self.cfg.pod_cidrs_override.iter().flatten().any(|n| n.addr().is_ipv4() == v4);
        let from_node = snapshot.node_pod_cidrs.iter().flatten().filter(|n| !overridden(n.addr().is_ipv4()));
        self.cfg
            .pod_cidrs_override
            .iter()
            .flatten()
            .chain(from_node)
            .filter(|n| if n.addr().is_ipv4() { self.cfg.ipv4 } else { self.cfg.ipv6 })
            .copied()
            .collect()
    }

    /// `full`: read the maps and repair drift; otherwise diff against what was last written.
    fn sync_maps(&mut self, snapshot: Snapshot, full: bool) {
        self.report_once(&snapshot.warnings);
        let opts = model::Options {
            external_ip_allow: self.cfg.external_ip_allow.clone(),
            ipv4: self.cfg.ipv4,
            ipv6: self.cfg.ipv6,
        };
        let started = std::time::Instant::now();
        let desired = model::desired(&snapshot.services, &opts);
        self.report_once(&desired.warnings);
        let pod_cidrs = self.pod_cidrs(&snapshot);
        if pod_cidrs.is_empty() {
            self.report_once(&[
                "no pod CIDR is known: pods' traffic is not rewritten; set POD_CIDR_IPV4/POD_CIDR_IPV6".to_owned(),
            ]);
        }
        let synced = if full {
            self.datapath.sync_frontends(&desired.frontends)
        } else {
            self.datapath.sync_frontends_incremental(&desired.frontends)
        };
        match synced {
            Ok(stats) => tracing::info!(
                frontends = desired.frontends.len(),
                added = stats.added,
                changed = stats.changed,
                removed = stats.removed,
                elapsed_us = started.elapsed().as_micros() as u64,
                "frontends synced"
            ),
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "syncing frontends failed; retrying at the next resync")
            }
        }
        match self.datapath.sync_pod_cidrs(&pod_cidrs) {
            Ok(stats) if stats.added + stats.removed > 0 => tracing::info!(pod_cidrs = ?pod_cidrs, "pod CIDRs synced"),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "syncing pod CIDRs failed; retrying at the next resync")
            }
        }
        self.snapshot = Some(snapshot);
    }

    fn resync(&mut self) {
        if let Some(snapshot) = self.snapshot.clone() {
            self.sync_maps(snapshot, true);
        }
        self.ensure_drop_invalid(false);
    }

    /// Repairs the INVALID drop if it was removed or changed behind our back. The bpf mode's
    /// check is two syscalls and runs at every rescan; the others run a command (nft, iptables,
    /// which takes the xtables lock) and wait for the resync.
    fn ensure_drop_invalid(&mut self, only_cheap: bool) {
        if let Some(drop_invalid) = &mut self.drop_invalid
            && (!only_cheap || drop_invalid.mode == invalid::Mode::Bpf)
            && let Err(e) = drop_invalid.ensure(&mut self.datapath)
        {
            tracing::error!(mode = %drop_invalid.mode, error = format!("{e:#}"), "drop-invalid: repair failed; retrying");
        }
    }

    /// Host-network clients: the socket hooks on the configured cgroup while external-cluster is
    /// on (re-attached at start, taking over a previous agent's links atomically); detached when
    /// it is off. Failing to attach is fatal: the feature was asked for and would silently miss
    /// every host-network client.
    fn sync_cgroup(&mut self) -> Result<()> {
        // Unavailable on this kernel (reported at start): leave whatever is attached alone.
        if self.datapath.socket_hooks_loaded().is_err() {
            return Ok(());
        }
        if !self.cfg.external_cluster {
            let released = self.datapath.detach_cgroup()?;
            if released > 0 {
                tracing::info!(hooks = released, "external-cluster is off: socket hooks detached");
            }
            return Ok(());
        }
        let path = match &self.cfg.cgroup_path {
            Some(path) => path.clone(),
            None => crate::datapath::cgroup::default_root()?,
        };
        self.datapath.attach_cgroup(&path)?;
        tracing::info!(cgroup = %path.display(), "socket hooks attached (host-network clients)");
        Ok(())
    }

    /// Attaches to new matching interfaces and releases pins of vanished ones.
    fn sync_interfaces(&mut self) {
        // Unavailable on this kernel (reported at start): leave whatever is attached alone.
        if self.datapath.pod_tc_loaded().is_err() {
            return;
        }
        let wanted: BTreeSet<Iface> = if self.cfg.external_cluster {
            match interfaces::scan(&self.matcher) {
                Ok(found) => found.into_iter().collect(),
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "listing interfaces failed");
                    return;
                }
            }
        } else {
            BTreeSet::new() // feature off: release whatever an earlier run attached
        };
        for iface in wanted.difference(&self.attached.clone()) {
            match self.datapath.attach(iface) {
                Ok(()) => {
                    tracing::info!(iface = %iface.name, ifindex = iface.index, "attached");
                    self.attached.insert(iface.clone());
                }
                // Vanished meanwhile, or refused: reported, retried at the next rescan.
                Err(e) if interfaces::exists(iface) => {
                    tracing::error!(iface = %iface.name, error = format!("{e:#}"), "attaching failed")
                }
                Err(_) => {}
            }
        }
        let stale: Vec<Iface> =
            self.datapath.attached().union(&self.attached).filter(|i| !wanted.contains(i)).cloned().collect();
        for iface in stale {
            match self.datapath.detach(&iface) {
                Ok(()) => tracing::info!(iface = %iface.name, ifindex = iface.index, "detached"),
                Err(e) => tracing::error!(iface = %iface.name, error = format!("{e:#}"), "detaching failed"),
            }
            self.attached.remove(&iface);
        }
    }
}
