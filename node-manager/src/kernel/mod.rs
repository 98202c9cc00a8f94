//! The kernel side, as the agent drives it: load the programs, adopt the pinned maps, attach
//! to pod interfaces, and write the maps by diff.
pub mod attach;
pub mod btf;
pub mod cgroup;
pub mod conntrack;
pub mod fault;
pub mod interfaces;
pub mod maps;
pub mod netfilter;
pub mod netlink;
pub mod pins;
pub mod probe;
pub mod repair;
pub mod report;
pub mod sys;
pub mod tc_netlink;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{Ebpf, EbpfLoader, programs::SchedClassifier};
use ipnet::IpNet;
use node_manager_common::{DatapathConfig, Frontend, FrontendKey, Owner, map_names, program_names};

use self::{
    attach::{DIRECTIONS, Mechanism},
    interfaces::Iface,
    maps::SyncStats,
    pins::{PinState, Pins},
    probe::Probes,
    report::{Loads, Report},
};
use crate::model::{FrontendAddr, Target};

/// A frontends sync: its counts, and the Services with frontends the map had no room for.
#[derive(Debug, Default)]
pub struct FrontendsSynced {
    pub stats: SyncStats,
    /// `namespace/name` of the Services whose frontends did not (all) fit, sorted.
    pub not_fitting_services: Vec<String>,
}

/// The eBPF object built by build.rs from node-manager-ebpf.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/node-manager"));

pub struct Datapath {
    ebpf: Ebpf,
    pins: Option<Pins>,
    mechanism: Mechanism,
    /// The frontends and their owners as this process last wrote them successfully.
    written: Option<Written>,
    fresh_maps: Vec<&'static str>,
    /// Our own references to the links we pinned (see `repair`).
    held: repair::HeldLinks,
    /// The verifier's verdict on each feature's programs: a feature whose programs it rejects
    /// is unavailable, the others run.
    loads: Loads,
    /// The kernel's features, probed on first use.
    probes: Option<Probes>,
}

/// Loads every program of one feature (TC or cgroup socket-address programs); the first refusal
/// is the feature's reason (the verifier's last lines).
fn load_each(ebpf: &mut Ebpf, names: &[&str]) -> Result<(), String> {
    use aya::programs::Program;
    for name in names {
        if let Some(rejection) = fault::injected(name) {
            return Err(format!("{name}: {rejection}"));
        }
        let loaded = match ebpf.program_mut(name) {
            Some(Program::SchedClassifier(p)) => p.load(),
            Some(Program::CgroupSockAddr(p)) => p.load(),
            Some(Program::CgroupSock(p)) => p.load(),
            Some(_) => return Err(format!("{name} is neither a TC nor a cgroup socket(-address) program")),
            None => return Err(format!("program {name} missing from the object")),
        };
        loaded.map_err(|e| format!("{name}: {}", describe_load_error(&e)))?;
    }
    Ok(())
}

/// Puts the programs the TC programs tail-call into `NM_TAIL_CALLS` (pinned, so they stay
/// reachable after the agent exits; a new agent's replace an old one's).
fn fill_tail_calls(ebpf: &mut Ebpf) -> Result<()> {
    use aya::{maps::ProgramArray, programs::Program};
    let fd = match ebpf.program(program_names::POD_ICMP_ERROR) {
        Some(Program::SchedClassifier(p)) => p.fd().context("nm_pod_icmp_error is not loaded")?.try_clone()?,
        _ => bail!("program {} missing from the object", program_names::POD_ICMP_ERROR),
    };
    let map = ebpf.map_mut(map_names::TAIL_CALLS).ok_or_else(|| anyhow!("no map {}", map_names::TAIL_CALLS))?;
    let mut tail_calls = ProgramArray::try_from(map).context("NM_TAIL_CALLS is not a program array")?;
    tail_calls
        .set(node_manager_common::TAIL_CALL_ICMP_ERROR, &fd, 0)
        .context("putting nm_pod_icmp_error into NM_TAIL_CALLS")
}

/// The errno and the end of the verifier's log (which says why), not the whole log.
fn describe_load_error(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.trim().lines().collect();
            let tail = lines[lines.len().saturating_sub(6)..].join(" | ");
            if tail.is_empty() { io_error.to_string() } else { format!("{io_error}; verifier: {tail}") }
        }
        other => other.to_string(),
    }
}

/// Re-pins, under this version's path, a map an older layout version pinned with the layout
/// this build expects. Returns where it came from.
fn adopt_from_other_version(pins: &Pins, name: &str, expected: pins::Layout) -> Option<std::path::PathBuf> {
    use std::os::fd::AsFd as _;
    for dir in pins.other_versions() {
        let old = dir.join("maps").join(name);
        if !matches!(pins::check_pinned_map(&old, expected), Ok(PinState::Matches)) {
            continue;
        }
        let fd = sys::obj_get(&old).ok()?;
        match sys::obj_pin(fd.as_fd(), &pins.map(name)) {
            Ok(()) => return Some(old),
            Err(e) => {
                tracing::warn!(map = name, from = %old.display(), error = %e, "could not re-pin an older version's map")
            }
        }
    }
    None
}

/// The flow maps: TCP, then UDP and ICMP echo.
const FLOW_MAPS: [&str; 2] = [map_names::FLOWS, map_names::FLOWS_DGRAM];

/// NM_FLOWS and NM_FLOWS_DGRAM, opened on their own fds (`Datapath::flow_maps`).
pub struct FlowMaps {
    maps: [aya::maps::HashMap<aya::maps::MapData, node_manager_common::FlowKey, node_manager_common::Flow>; 2],
}

impl FlowMaps {
    /// Neither map has an entry (one syscall each).
    pub fn is_empty(&self) -> bool {
        self.maps.iter().all(|map| map.keys().next().is_none())
    }

    /// Every flow's key, TCP then datagram, read one `get_next_key` at a time (entries added or
    /// removed meanwhile may or may not be seen).
    pub fn keys(&self) -> impl Iterator<Item = node_manager_common::FlowKey> + '_ {
        self.maps.iter().flat_map(|map| map.keys().filter_map(Result::ok))
    }

    /// Removes `keys` from their protocol's map; returns how many were there (one the datapath
    /// removed meanwhile, at a RST, is not an error).
    pub fn remove(&mut self, keys: &[node_manager_common::FlowKey]) -> Result<usize> {
        let mut removed = 0;
        for key in keys {
            let (index, name) =
                if key.proto == node_manager_common::PROTO_TCP { (0, FLOW_MAPS[0]) } else { (1, FLOW_MAPS[1]) };
            match self.maps[index].remove(key) {
                Ok(()) => removed += 1,
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(e).with_context(|| format!("removing a flow from {name}")),
            }
        }
        Ok(removed)
    }
}

fn flow_map_of(key: &node_manager_common::FlowKey) -> &'static str {
    if key.proto == node_manager_common::PROTO_TCP { map_names::FLOWS } else { map_names::FLOWS_DGRAM }
}

/// The frontend entries and (digests of) the owner entries this process wrote.
type Written = (BTreeMap<FrontendKey, Frontend>, BTreeMap<FrontendKey, maps::OwnerDigest>);

impl Datapath {
    /// Loads the programs with their maps pinned under `<bpffs>/node-manager/v<N>/maps`,
    /// reusing pinned maps whose layout matches (their entries keep serving traffic) and
    /// replacing any whose layout does not. A map missing from this layout version but pinned
    /// with the same layout by an older version's agent is adopted too (so live flows survive
    /// an upgrade that changed another map).
    pub fn load_pinned(bpffs: &Path) -> Result<Datapath> {
        pins::ensure_bpffs(bpffs)?;
        let pins = Pins::new(bpffs);
        pins.create_dirs()?;
        let mut loader = EbpfLoader::new();
        let mut fresh = Vec::new();
        for name in map_names::ALL {
            let path = pins.map(name);
            let expected = pins::expected_layout(name).ok_or_else(|| anyhow!("no expected layout for {name}"))?;
            match pins::check_pinned_map(&path, expected)? {
                PinState::Absent => match adopt_from_other_version(&pins, name, expected) {
                    Some(from) => {
                        tracing::info!(map = name, from = %from.display(), "adopting an older version's pinned map (same layout)")
                    }
                    None => {
                        tracing::info!(map = name, "creating map");
                        fresh.push(name);
                    }
                },
                PinState::Matches => tracing::info!(map = name, "adopting pinned map"),
                PinState::Foreign(why) => {
                    tracing::warn!(map = name, pin = %path.display(), %why, "pinned map has a foreign layout: not reusing it; a new map is created, filled from the desired state, and swapped in with the programs (the old programs keep the old map until then)");
                    attach::remove_pin(&path)?;
                    fresh.push(name);
                }
            }
            loader.map_pin_path(name, path);
        }
        let ebpf = loader.load(OBJECT).context("loading the eBPF object (maps)")?;
        let mut datapath = Self::finish(ebpf, Some(pins))?;
        datapath.fresh_maps = fresh;
        match datapath.move_datagram_flows() {
            Ok(0) => {}
            Ok(n) => tracing::info!(flows = n, "moved UDP/ICMP flows of an older agent into their own map"),
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "could not move an older agent's UDP/ICMP flows (their replies pass untranslated until the pod sends again)"
            ),
        }
        Ok(datapath)
    }

    /// Maps this process created (absent or of a foreign layout) rather than adopted: until
    /// they are filled, attaching the new programs would serve from empty maps.
    pub fn fresh_maps(&self) -> &[&'static str] {
        &self.fresh_maps
    }

    /// Removes what agents of other layout versions left: their links are released (after ours
    /// are attached, so a hook is never empty) and their pins removed. Returns what was removed.
    pub fn retire_other_versions(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let Some(pins) = &self.pins else { return Ok(removed) };
        for dir in pins.other_versions() {
            for link in fs::read_dir(dir.join("links")).into_iter().flatten().flatten() {
                attach::release_link(&link.path())?;
                removed.push(link.path().display().to_string());
            }
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            removed.push(dir.display().to_string());
        }
        Ok(removed)
    }

    /// Loads the programs with private, unpinned maps: for BPF_PROG_TEST_RUN tests and
    /// benchmarks. Nothing is attached or left behind.
    pub fn load_unpinned() -> Result<Datapath> {
        let ebpf = EbpfLoader::new().load(OBJECT).context("loading the eBPF object")?;
        Self::finish(ebpf, None)
    }

    fn finish(mut ebpf: Ebpf, pins: Option<Pins>) -> Result<Datapath> {
        // A feature whose programs the kernel refuses is unavailable (the agent's kernel-feature
        // report says why); the others load and run.
        let pod_tc = load_each(&mut ebpf, &DIRECTIONS.map(|(_, _, name)| name))
            .and_then(|()| load_each(&mut ebpf, &[program_names::POD_ICMP_ERROR]))
            .and_then(|()| fill_tail_calls(&mut ebpf).map_err(|e| format!("{e:#}")));
        let socket_hooks = load_each(&mut ebpf, &cgroup::HOOKS.map(|(_, _, name)| name));
        let loads = Loads { pod_tc: Some(pod_tc), socket_hooks: Some(socket_hooks), drop_invalid_bpf: None };
        Ok(Datapath {
            ebpf,
            pins,
            mechanism: Mechanism::detect(),
            written: None,
            fresh_maps: Vec::new(),
            held: Default::default(),
            loads,
            probes: None,
        })
    }

    /// The verifier's verdict on the pod datapath's programs (`Err`: why it is unavailable).
    pub fn pod_tc_loaded(&self) -> Result<(), String> {
        self.loads.pod_tc.clone().unwrap_or(Ok(()))
    }

    /// The same for the socket hooks of host-network clients.
    pub fn socket_hooks_loaded(&self) -> Result<(), String> {
        self.loads.socket_hooks.clone().unwrap_or(Ok(()))
    }

    /// The kernel's features (probed once, on first use).
    pub fn probes(&mut self) -> &Probes {
        self.probes.get_or_insert_with(probe::probe)
    }

    /// The kernel-feature report at start: logged, and pinned for `inspect`. `drop_invalid`:
    /// the mode chosen and why, and the verifier's verdict on the bpf mode's programs if loaded.
    pub fn report_features(&mut self, drop_invalid: Option<(String, String)>, bpf_load: Option<Result<(), String>>) {
        let probes = self.probes().clone();
        let loads = Loads { drop_invalid_bpf: bpf_load, ..self.loads.clone() };
        let report = Report::new("agent", probes, loads, drop_invalid);
        report.log();
        if let Some(pins) = &self.pins
            && let Err(e) = report::pin_report(&pins.layout_dir(), &report)
        {
            tracing::warn!(error = format!("{e:#}"), "could not pin the kernel-feature report (inspect will probe)");
        }
    }

    /// A pinned map's fd by name, from the loaded object (for loading the netfilter programs
    /// against this datapath's maps).
    pub fn map_fd(&self, name: &str) -> Result<std::os::fd::OwnedFd> {
        use aya::maps::Map;
        let data = match self.ebpf.map(name).ok_or_else(|| anyhow!("no map {name}"))? {
            Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) | Map::LpmTrie(d) | Map::PerCpuArray(d) => d,
            _ => anyhow::bail!("map {name} has a type node-manager does not use"),
        };
        Ok(std::os::fd::AsFd::as_fd(data.fd()).try_clone_to_owned()?)
    }

    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    pub fn program(&mut self, name: &str) -> Result<&mut SchedClassifier> {
        self.ebpf.program_mut(name).ok_or_else(|| anyhow!("no program {name}"))?.try_into().context("not a TC program")
    }

    fn pins(&self) -> Result<&Pins> {
        self.pins.as_ref().ok_or_else(|| anyhow!("datapath loaded without pins cannot attach"))
    }

    /// Attaches both programs to the interface, replacing ours atomically if already there.
    pub fn attach(&mut self, iface: &Iface) -> Result<()> {
        self.pod_tc_loaded().map_err(|why| anyhow!("the pod datapath is unavailable on this kernel: {why}"))?;
        let links_dir = self.pins()?.links_dir();
        let mechanism = self.mechanism;
        for (attach_type, direction, name) in DIRECTIONS {
            let program = self.program(name)?;
            attach::attach(program, mechanism, &links_dir, iface, attach_type, direction)?;
            if mechanism == Mechanism::Tcx {
                self.held.hold(&attach::link_pin(&links_dir, iface, direction));
            }
        }
        Ok(())
    }

    pub fn detach(&mut self, iface: &Iface) -> Result<()> {
        let links_dir = self.pins()?.links_dir();
        for (_, direction, _) in DIRECTIONS {
            self.held.release(&attach::link_pin(&links_dir, iface, direction));
        }
        attach::detach(&links_dir, iface)
    }

    /// Attaches the socket hooks for host-network clients to the cgroup v2 directory `path`,
    /// replacing ours atomically where they are already there.
    pub fn attach_cgroup(&mut self, path: &Path) -> Result<()> {
        self.socket_hooks_loaded().map_err(|why| anyhow!("the socket hooks are unavailable on this kernel: {why}"))?;
        let links_dir = self.pins()?.links_dir();
        cgroup::attach_all(&mut self.ebpf, &links_dir, path)?;
        for (hook, _, _) in cgroup::HOOKS {
            self.held.hold(&cgroup::link_pin(&links_dir, hook));
        }
        Ok(())
    }

    /// Detaches our socket hooks, wherever they are; returns how many were attached.
    pub fn detach_cgroup(&mut self) -> Result<usize> {
        let links_dir = self.pins()?.links_dir();
        for (hook, _, _) in cgroup::HOOKS {
            self.held.release(&cgroup::link_pin(&links_dir, hook));
        }
        cgroup::detach_all(&links_dir)
    }

    /// Interfaces that currently have our pinned links.
    pub fn attached(&self) -> BTreeSet<Iface> {
        self.pins.as_ref().map(|p| attach::pinned_ifaces(&p.links_dir())).unwrap_or_default()
    }

    fn map_mut(&mut self, name: &str) -> Result<&mut aya::maps::Map> {
        self.ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing from the object"))
    }

    /// Makes the frontends map (and the owners map beside it) equal to `desired`, reading the
    /// maps first: repairs entries changed behind our back. The periodic resync and the first
    /// sync use this.
    pub fn sync_frontends(&mut self, desired: &BTreeMap<FrontendAddr, Target>) -> Result<FrontendsSynced> {
        self.written = None;
        let map = maps::frontends_of(self.map_mut(map_names::FRONTENDS)?)?;
        let have = maps::read_frontends(&map)?;
        let have_owners = maps::read_hash_as(&self.owners_mut()?, map_names::OWNERS, maps::OwnerDigest::of)?;
        self.write_frontends(desired, (have, have_owners))
    }

    /// Writes only the frontends an update changed (`changed`, from `model::Model::update`)
    /// over what this process last wrote: one Service change costs its own entries, not a diff
    /// of all of them. Falls back to the diff of everything in `desired` when the last write is
    /// unknown, or when the maps would not hold all of `desired` after (an entry that did not
    /// fit before may fit now that another is gone).
    pub fn sync_frontend_changes(
        &mut self,
        changed: &BTreeMap<FrontendAddr, Option<Target>>,
        desired: &BTreeMap<FrontendAddr, Target>,
    ) -> Result<FrontendsSynced> {
        let Some((mut frontends, mut owners)) = self.written.take() else { return self.sync_frontends(desired) };
        // The same diff as a full sync, on the changed keys only: what they held comes out of
        // what was written, what they hold after goes back in.
        let keys: Vec<FrontendKey> = changed.keys().map(maps::frontend_key).collect();
        let have = (
            keys.iter().filter_map(|k| frontends.remove_entry(k)).collect(),
            keys.iter().filter_map(|k| owners.remove_entry(k)).collect(),
        );
        let want: BTreeMap<FrontendAddr, Target> = changed.iter().filter_map(|(f, t)| Some((*f, t.clone()?))).collect();
        let synced = self.write_frontends(&want, have)?;
        let Some((now_frontends, now_owners)) = self.written.take() else { return self.sync_frontends(desired) };
        frontends.extend(now_frontends);
        owners.extend(now_owners);
        if !synced.not_fitting_services.is_empty() || frontends.len() != desired.len() {
            return self.write_frontends(desired, (frontends, owners));
        }
        let mut stats = synced.stats;
        stats.unchanged = desired.len() - stats.added - stats.changed;
        self.written = Some((frontends, owners));
        Ok(FrontendsSynced { stats, not_fitting_services: Vec::new() })
    }

    /// Writes `desired` over what the maps hold (`have`); remembers what they hold after.
    fn write_frontends(&mut self, desired: &BTreeMap<FrontendAddr, Target>, have: Written) -> Result<FrontendsSynced> {
        let mut map = maps::frontends_of(self.map_mut(map_names::FRONTENDS)?)?;
        let frontends = maps::sync_frontends_from(&mut map, have.0, &maps::frontend_entries(desired))?;
        // An owner only for a frontend that is in the map (both maps have the same capacity).
        let not_fitting: BTreeSet<FrontendKey> = frontends.not_fitting.iter().copied().collect();
        let want_owners = maps::owners_wanted(desired, &not_fitting);
        let mut owners = self.owners_mut()?;
        let owners = maps::sync_hash_from(
            &mut owners,
            have.1,
            &want_owners,
            |(digest, _)| *digest,
            |(_, name)| Owner::new(name),
            |k| format!("owner of {:?}", maps::frontend_addr(k)),
        )?;
        let not_fitting = not_fitting
            .iter()
            .filter_map(|k| desired.get(&maps::frontend_addr(k)?))
            .map(|t| t.owner.to_string())
            .collect::<BTreeSet<String>>();
        self.written = Some((frontends.now, owners.now));
        Ok(FrontendsSynced { stats: frontends.stats, not_fitting_services: not_fitting.into_iter().collect() })
    }

    fn owners_mut(
        &mut self,
    ) -> Result<aya::maps::HashMap<&mut aya::maps::MapData, node_manager_common::FrontendKey, node_manager_common::Owner>>
    {
        aya::maps::HashMap::try_from(self.map_mut(map_names::OWNERS)?).context("NM_OWNERS has an unexpected type")
    }

    /// The trie first, then the loop's form: while the loop's form says "use the trie" (more
    /// CIDRs than it holds) the trie is already complete.
    pub fn sync_pod_cidrs(&mut self, desired: &BTreeSet<IpNet>) -> Result<SyncStats> {
        let stats = maps::sync_pod_cidrs(self.map_mut(map_names::POD_CIDRS)?, desired)?;
        maps::write_pod_nets(self.map_mut(map_names::POD_NETS)?, desired)?;
        Ok(stats)
    }

    pub fn set_config(&mut self, config: DatapathConfig) -> Result<()> {
        maps::write_config(self.map_mut(map_names::CONFIG)?, config)
    }

    pub fn ct_config(&self) -> Result<node_manager_common::CtConfig> {
        let map = self.ebpf.map(map_names::CT_CONFIG).ok_or_else(|| anyhow!("no {} map", map_names::CT_CONFIG))?;
        Ok(aya::maps::Array::<_, node_manager_common::CtConfig>::try_from(map)?.get(&0, 0)?)
    }

    pub fn set_ct_config(&mut self, config: node_manager_common::CtConfig) -> Result<()> {
        let map = self.map_mut(map_names::CT_CONFIG)?;
        aya::maps::Array::<_, node_manager_common::CtConfig>::try_from(map)?.set(0, config, 0)?;
        Ok(())
    }

    /// Conntrack-INVALID drop counter totals, by name.
    pub fn ct_counters(&self) -> Result<Vec<(&'static str, node_manager_common::Counter)>> {
        let map = self.ebpf.map(map_names::CT_COUNTERS).ok_or_else(|| anyhow!("no ct counters map"))?;
        maps::read_ct_counters(&aya::maps::PerCpuArray::try_from(map)?)
    }

    pub fn pins_ref(&self) -> Option<&Pins> {
        self.pins.as_ref()
    }

    /// Counter totals, by name.
    pub fn counters(&self) -> Result<Vec<(&'static str, node_manager_common::Counter)>> {
        let map = self.ebpf.map(map_names::COUNTERS).ok_or_else(|| anyhow!("no counters map"))?;
        maps::read_counters(&aya::maps::PerCpuArray::try_from(map)?)
    }

    /// Number of remembered flows, TCP and datagram (iterates the LRU maps; for inspection,
    /// not the hot path).
    pub fn flow_count(&self) -> Result<usize> {
        let mut n = 0;
        for name in FLOW_MAPS {
            n += self.flows_map(name)?.keys().filter(Result::is_ok).count();
        }
        Ok(n)
    }

    /// Every remembered flow, TCP and datagram (iterates the LRU maps; for tests and
    /// inspection).
    pub fn flows(&self) -> Result<std::collections::HashMap<node_manager_common::FlowKey, node_manager_common::Flow>> {
        let mut all = std::collections::HashMap::new();
        for name in FLOW_MAPS {
            all.extend(self.flows_map(name)?.iter().filter_map(Result::ok));
        }
        Ok(all)
    }

    /// The flow maps on fds of their own, for the flow sweep's thread.
    pub fn flow_maps(&self) -> Result<FlowMaps> {
        let open = |name| -> Result<_> {
            let data = aya::maps::MapData::from_fd(self.map_fd(name)?)?;
            Ok(aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))?)
        };
        Ok(FlowMaps { maps: [open(map_names::FLOWS)?, open(map_names::FLOWS_DGRAM)?] })
    }

    /// The flow remembered under `key`, if any, from its protocol's map (a lookup does not
    /// refresh the LRU order: the syscall path does not mark the entry as used).
    pub fn flow(&self, key: &node_manager_common::FlowKey) -> Result<Option<node_manager_common::Flow>> {
        match self.flows_map(flow_map_of(key))?.get(key, 0) {
            Ok(flow) => Ok(Some(flow)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("looking up a flow"),
        }
    }

    fn flows_map(
        &self,
        name: &str,
    ) -> Result<aya::maps::HashMap<&aya::maps::MapData, node_manager_common::FlowKey, node_manager_common::Flow>> {
        let map = self.ebpf.map(name).ok_or_else(|| anyhow!("no map {name}"))?;
        Ok(aya::maps::HashMap::try_from(map)?)
    }

    /// Datagram flows an agent from before the split left in the TCP flow map are copied into
    /// the datagram map this process created, so their replies stay translated across the
    /// upgrade. (The copies in the TCP map are never read again and age out first, being idle.)
    fn move_datagram_flows(&mut self) -> Result<usize> {
        if !self.fresh_maps.contains(&map_names::FLOWS_DGRAM) || self.fresh_maps.contains(&map_names::FLOWS) {
            return Ok(0);
        }
        let datagram: Vec<_> = self
            .flows_map(map_names::FLOWS)?
            .iter()
            .filter_map(Result::ok)
            .filter(|(key, _)| key.proto != node_manager_common::PROTO_TCP)
            .collect();
        let map = self.ebpf.map_mut(map_names::FLOWS_DGRAM).ok_or_else(|| anyhow!("no datagram flows map"))?;
        let mut into: aya::maps::HashMap<
            &mut aya::maps::MapData,
            node_manager_common::FlowKey,
            node_manager_common::Flow,
        > = aya::maps::HashMap::try_from(map)?;
        for (key, flow) in &datagram {
            into.insert(key, flow, 0).context("copying a datagram flow")?;
        }
        Ok(datagram.len())
    }
}
