//! The agent: sources → model → plan → features → kernel, applied. It decides nothing itself
//! (`plan` does, purely). One loop owns the datapath; it reconciles the maps
//! when a new snapshot arrives or the periodic resync fires, and the attachments when links
//! change. Until the first snapshot, the pinned maps keep serving what they held.
use std::{
    collections::{BTreeSet, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use node_manager_common::DatapathConfig;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Notify, watch},
};

use crate::{
    config::{Config, SourceConfig},
    features::{
        drop_invalid::{self, DropInvalid},
        external_ip::{flow_sweep, sock_hooks, tc},
    },
    kernel::{
        Datapath,
        interfaces::{self, Iface, Matcher},
    },
    metrics::{self, Telemetry},
    model, plan,
    source::{Snapshot, file, kubernetes},
};

/// Interfaces are rescanned on every link notification and at least this often; removed pins
/// are restored at the same period (`datapath::repair`).
const RESCAN_PERIOD: Duration = Duration::from_secs(5);
const FILE_POLL: Duration = Duration::from_millis(500);

pub async fn run(cfg: Config) -> Result<()> {
    for warning in &cfg.warnings {
        tracing::warn!("{warning}");
    }
    let telemetry = Telemetry::new(cfg.bpffs.clone());
    // First, so that /healthz answers while the rest starts (and a busy port fails fast).
    if let Some(addr) = cfg.metrics_addr {
        metrics::serve(addr, telemetry.clone()).await?;
    }
    crate::privileges::check(&cfg)?;
    let (tx, mut rx) = watch::channel::<Option<Snapshot>>(None);
    match &cfg.source {
        SourceConfig::File(path) => {
            tokio::spawn(file::watch(path.clone(), tx, FILE_POLL));
        }
        SourceConfig::Kubernetes { kubeconfig } => {
            let client = kubernetes::client(kubeconfig.as_deref()).await?;
            let readiness = kubernetes::Readiness::default();
            tracing::info!(node = %cfg.node_name, "watching Services and this node's Node");
            tokio::spawn(kubernetes::watch(client, cfg.node_name.clone(), tx, readiness, telemetry.clone()));
        }
    }

    let mut datapath = Datapath::load_pinned(&cfg.bpffs)?;
    datapath.set_config(DatapathConfig { masquerade_mark: cfg.masquerade_mark })?;
    tracing::info!(mechanism = datapath.mechanism().name(), bpffs = %cfg.bpffs.display(), "datapath loaded");
    // Maps adopted from the previous agent keep serving, so its programs can be replaced at
    // once. Maps created anew are empty: the previous programs (holding the previous maps)
    // keep serving until the first sync has filled the new ones.
    let attach_after_sync = !datapath.fresh_maps().is_empty();
    if attach_after_sync {
        tracing::info!(
            maps = ?datapath.fresh_maps(),
            "new maps: programs are attached after the first sync fills them"
        );
    }
    // Not gated on pod CIDRs or on the Service source (network-node-manager dropped nothing
    // without POD_CIDR): INVALID replies hurt every masqueraded connection.
    let drop_invalid = if cfg.drop_invalid_input {
        Some(DropInvalid::start(cfg.drop_invalid_mode, &mut datapath)?)
    } else {
        drop_invalid::disable(&mut datapath);
        None
    };
    // Kernel features: which mechanism each feature uses here, or why it is unavailable (logged,
    // and pinned for `inspect`); unavailable features are skipped, the rest runs.
    let bpf_load = drop_invalid.as_ref().and_then(|d| d.bpf_load.clone());
    datapath.report_features(drop_invalid.as_ref().map(DropInvalid::summary), bpf_load);

    let link_changes = Arc::new(Notify::new());
    interfaces::watch_links(link_changes.clone())?;
    let resync_period = cfg.resync_period;
    // Flows end with their conntrack entries: a thread of its own reads conntrack and the flow
    // maps on its own fds, so a sweep of a busy node's tables never delays the agent loop.
    if let Some(period) = cfg.flow_sweep_period {
        spawn_flow_sweep(period, datapath.flow_maps()?, telemetry.clone()).context("starting the flow sweep")?;
    }
    let mut agent = Agent::new(cfg, datapath, drop_invalid, telemetry)?;
    if !attach_after_sync {
        agent.take_over()?;
    }

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
            _ = link_changes.notified(), if agent.taken_over => agent.sync_interfaces(),
            _ = rescan.tick(), if agent.taken_over => {
                agent.datapath.repair_pins();
                agent.sync_interfaces();
                agent.ensure_drop_invalid(true);
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        if !agent.taken_over && agent.synced {
            agent.take_over()?;
        }
    }
    if agent.cfg.cleanup_on_exit {
        let (bpffs, cgroup_path) = (agent.cfg.bpffs.clone(), agent.cfg.cgroup_path.clone());
        drop(agent); // close our map and program fds first
        tracing::info!("stopping; --cleanup-on-exit: removing the datapath");
        let report = crate::cleanup::cleanup(&bpffs, cgroup_path.as_deref())?;
        tracing::info!(links = report.links_removed, pins_removed = report.pins_removed, "datapath removed");
    } else {
        tracing::info!(
            "stopping; the datapath stays in place and keeps serving (remove it with `node-manager cleanup`)"
        );
    }
    Ok(())
}

/// Gives the heap's free memory back to the kernel. glibc keeps what a burst of allocations
/// freed resident (in every thread's arena) unless asked, and the agent's RSS would then carry
/// its biggest moment for good: at 10,000 Services, the first list of them.
fn release_free_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim(3) only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs a sweep every `period` on a thread of its own; its duration and failures go to the
/// `flow_sweep` reconcile step, the flows it removes to `node_manager_flows_swept_total`.
fn spawn_flow_sweep(
    period: Duration,
    mut maps: crate::kernel::FlowMaps,
    telemetry: Arc<Telemetry>,
) -> std::io::Result<()> {
    let mut model = flow_sweep::FlowSweep::default();
    std::thread::Builder::new().name("flow-sweep".into()).spawn(move || {
        loop {
            std::thread::sleep(period);
            let started = Instant::now();
            let swept = flow_sweep::sweep_once(&mut model, &mut maps);
            telemetry.reconciled("flow_sweep", started.elapsed(), swept.is_ok());
            // The sweep's sets are freed by now.
            release_free_heap();
            match swept {
                Ok(forgotten) => {
                    telemetry.flows_swept(forgotten);
                    tracing::debug!(forgotten, suspects = model.suspects(), took = ?started.elapsed(), "flow sweep");
                }
                Err(e) => tracing::warn!(error = format!("{e:#}"), "flow sweep failed; retrying at the next"),
            }
        }
    })?;
    Ok(())
}

struct Agent {
    cfg: Config,
    datapath: Datapath,
    drop_invalid: Option<DropInvalid>,
    matcher: Matcher,
    snapshot: Option<Snapshot>,
    /// The desired frontends of the last snapshot, updated per changed Service.
    model: model::Model,
    /// Interfaces this process attached to (re-attached once at start to take over).
    attached: BTreeSet<Iface>,
    /// Warnings already logged, so a resync does not repeat them.
    reported: HashSet<String>,
    telemetry: Arc<Telemetry>,
    /// The first snapshot was written to the maps.
    synced: bool,
    /// This process attached its programs (replacing a previous agent's).
    taken_over: bool,
    /// The last interface sync attached every wanted interface (nothing failed).
    interfaces_ok: bool,
}

impl Agent {
    fn new(
        cfg: Config,
        datapath: Datapath,
        drop_invalid: Option<DropInvalid>,
        telemetry: Arc<Telemetry>,
    ) -> Result<Agent> {
        let matcher = Matcher::new(&cfg.pod_interfaces)?;
        let model = model::Model::new(model::Options {
            external_ip_allow: cfg.external_ip_allow.clone(),
            ipv4: cfg.ipv4,
            ipv6: cfg.ipv6,
        });
        Ok(Agent {
            cfg,
            model,
            datapath,
            drop_invalid,
            matcher,
            snapshot: None,
            attached: BTreeSet::new(),
            reported: HashSet::new(),
            telemetry,
            synced: false,
            taken_over: false,
            interfaces_ok: false,
        })
    }

    /// Attaches our programs, replacing a previous agent's atomically, then removes what
    /// agents of other layout versions left attached.
    fn take_over(&mut self) -> Result<()> {
        let started = Instant::now();
        self.sync_interfaces();
        let cgroup = self.sync_cgroup();
        self.telemetry.reconciled("socket_hooks", started.elapsed(), cgroup.is_ok());
        cgroup?;
        self.taken_over = true;
        match self.datapath.retire_other_versions() {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(removed = ?removed, "removed what an agent of another layout version left")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = format!("{e:#}"), "removing another version's datapath failed"),
        }
        self.update_attached();
        Ok(())
    }

    /// Ready once every wanted interface has our programs (and the INVALID drop is in place).
    fn update_attached(&self) {
        self.telemetry.set_attached(plan::attached(&plan::Attachments {
            external_cluster: self.cfg.external_cluster,
            drop_invalid_input: self.cfg.drop_invalid_input,
            taken_over: self.taken_over,
            interfaces_ok: self.interfaces_ok,
            drop_invalid_running: self.drop_invalid.is_some(),
        }));
    }

    fn report_once(&mut self, warnings: &[String]) {
        for w in warnings {
            if self.reported.insert(w.clone()) {
                tracing::warn!("{w}");
            }
        }
    }

    /// `full`: read the maps and repair drift; otherwise diff against what was last written.
    fn sync_maps(&mut self, snapshot: Snapshot, full: bool) {
        self.report_once(&snapshot.warnings);
        let started = Instant::now();
        // A full resync rebuilds the model from scratch (as the first sync does); an event
        // recomputes only the Services that changed.
        let update = if full || !self.synced {
            self.model.rebuild(&snapshot.services)
        } else {
            self.model.update(&snapshot.services)
        };
        self.report_once(&update.warnings);
        let pod_cidrs = plan::pod_cidrs(
            self.cfg.pod_cidrs_override.as_deref(),
            snapshot.node_pod_cidrs.as_deref(),
            self.cfg.ipv4,
            self.cfg.ipv6,
        );
        if pod_cidrs.is_empty() {
            self.report_once(&[
                "no pod CIDR is known: pods' traffic is not rewritten; set POD_CIDR_IPV4/POD_CIDR_IPV6".to_owned(),
            ]);
        }
        let synced = if full {
            self.datapath.sync_frontends(self.model.frontends())
        } else {
            self.datapath.sync_frontend_changes(&update.changed, self.model.frontends())
        };
        let took = started.elapsed();
        self.telemetry.reconciled("maps", took, synced.is_ok());
        // A first sync and a full resync follow the big allocations (the list of every Service,
        // decoded; the maps read back): give what they freed back to the kernel.
        if full || !self.synced {
            release_free_heap();
        }
        if let Ok(synced) = &synced {
            self.telemetry.set_frontends_not_applied(synced.stats.not_fitting);
            if let Some(warning) = not_fitting_warning(synced) {
                self.report_once(&[warning]);
            }
        }
        if synced.is_ok() && !self.synced {
            self.synced = true;
            self.telemetry.set_synced();
        }
        match synced {
            Ok(synced) => tracing::info!(
                frontends = self.model.frontends().len(),
                added = synced.stats.added,
                changed = synced.stats.changed,
                removed = synced.stats.removed,
                not_fitting = synced.stats.not_fitting,
                elapsed_us = took.as_micros() as u64,
                "frontends synced"
            ),
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "syncing frontends failed; retrying at the next resync")
            }
        }
        let cidrs_started = Instant::now();
        let cidrs_synced = self.datapath.sync_pod_cidrs(&pod_cidrs);
        self.telemetry.reconciled("pod_cidrs", cidrs_started.elapsed(), cidrs_synced.is_ok());
        match cidrs_synced {
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
            && (!only_cheap || drop_invalid.mode == drop_invalid::Mode::Bpf)
        {
            let started = Instant::now();
            let ensured = drop_invalid.ensure(&mut self.datapath, !only_cheap);
            self.telemetry.reconciled("drop_invalid", started.elapsed(), ensured.is_ok());
            if let Err(e) = ensured {
                tracing::error!(mode = %drop_invalid.mode, error = format!("{e:#}"), "drop-invalid: repair failed; retrying");
            }
        }
    }

    fn sync_cgroup(&mut self) -> Result<()> {
        sock_hooks::sync(&mut self.datapath, self.cfg.external_cluster, self.cfg.cgroup_path.as_deref())
    }

    /// Attaches to new matching interfaces and releases pins of vanished ones.
    fn sync_interfaces(&mut self) {
        // Unavailable on this kernel (reported at start): leave whatever is attached alone.
        if self.datapath.pod_tc_loaded().is_err() {
            return;
        }
        let started = Instant::now();
        let ok = tc::sync_interfaces(&mut self.datapath, &self.matcher, self.cfg.external_cluster, &mut self.attached);
        self.interfaces_ok = ok;
        self.telemetry.reconciled("interfaces", started.elapsed(), ok);
        self.update_attached();
    }
}

/// The warning for frontends the map had no room for, naming their Services (the first 20).
fn not_fitting_warning(synced: &crate::kernel::FrontendsSynced) -> Option<String> {
    let names = &synced.not_fitting_services;
    if synced.stats.not_fitting == 0 {
        return None;
    }
    let shown: Vec<&str> = names.iter().take(20).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    let more = if more > 0 { format!(" and {more} more") } else { String::new() };
    Some(format!(
        "{} frontends of Services {}{more} do not fit into NM_FRONTENDS ({} entries): not applied, \
         retried at every sync; every other Service is served. Remove Services or external IPs to make room",
        synced.stats.not_fitting,
        shown.join(", "),
        node_manager_common::FRONTENDS_MAX
    ))
}
