//! The live datapath's state, decoded from the pins alone (works with or without a running
//! agent): what `inspect` renders and `/metrics` exports, so the two cannot disagree.
use std::path::Path;

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use node_manager_common::{DatapathConfig, Flow, FlowKey, FrontendKey, Owner, SockRev, SockRevKey, map_names};
use serde::Serialize;

use crate::{
    features::drop_invalid::{self, Mode, Requested},
    kernel::{
        Datapath,
        attach::{self, Mechanism},
        cgroup, maps, netfilter,
        pins::Pins,
        probe::probe,
        report::{Loads, Report, UNAVAILABLE, drop_invalid_bpf, pinned_report},
    },
};

#[derive(Debug, Serialize)]
pub struct State {
    pub pins: String,
    pub installed: bool,
    pub features: Vec<Feature>,
    pub interfaces: Vec<Interface>,
    /// Socket hooks for host-network clients (cgroup v2 socket-address programs).
    pub cgroup_hooks: Vec<CgroupHook>,
    /// Host sockets remembered for getpeername/recvmsg.
    pub sockets: usize,
    pub pod_cidrs: Vec<String>,
    pub frontends: Vec<FrontendEntry>,
    /// TCP flows (`NM_FLOWS`), and UDP/ICMP echo flows (`NM_FLOWS_DGRAM`).
    pub flows: usize,
    #[serde(default)]
    pub datagram_flows: usize,
    pub masquerade_mark: Option<String>,
    pub counters: Vec<CounterEntry>,
    /// Which path rewrote connections to external IPs (from the counters).
    pub served_by: ServedBy,
    pub drop_invalid: DropInvalidState,
    /// Which mechanism each feature uses on this kernel, or why it is unavailable.
    pub kernel_features: Option<Report>,
}

/// The conntrack-INVALID drop: the mode recorded by the agent, why, what is installed in the
/// kernel for each mode (so leftovers show), and the counters.
#[derive(Debug, Default, Serialize)]
pub struct DropInvalidState {
    pub mode: Option<crate::features::drop_invalid::Mode>,
    pub why: Option<String>,
    /// Netfilter links found pinned: "ipv4 link 12 prog 34 LOCAL_IN priority -100".
    pub netfilter_links: Vec<String>,
    pub nftables_table: bool,
    /// bpf mode's guard: how long ago conntrack was last seen tracking a packet on each
    /// family's hook (drops happen only within the window). None: never.
    /// The bpf mode's table that keeps conntrack hooked (`nft::HOLDER_TABLE`) is there.
    pub conntrack_holder: bool,
    pub conntrack_seen_v4_ms_ago: Option<u64>,
    pub conntrack_seen_v6_ms_ago: Option<u64>,
    pub counters: crate::features::drop_invalid::Counters,
}

#[derive(Debug, Serialize)]
pub struct Feature {
    pub name: &'static str,
    pub active: bool,
    pub mechanism: String,
}

#[derive(Debug, Serialize)]
pub struct Interface {
    pub name: String,
    pub ifindex: u32,
    pub present: bool,
    /// Programs on the interface's TCX hooks, in run order (ours and others', e.g. a CNI's).
    pub tcx_ingress: Vec<String>,
    pub tcx_egress: Vec<String>,
    /// Kernels without TCX: the cls_bpf filters on the clsact hooks (program names), in run order.
    pub tc_ingress: Vec<String>,
    pub tc_egress: Vec<String>,
}

/// Names of the cls_bpf programs on an interface's clsact hook (other filters by kind).
fn tc_filters(ifindex: u32, ingress: bool) -> Vec<String> {
    crate::kernel::tc_netlink::filters(ifindex, ingress)
        .map(|f| f.into_iter().map(|f| f.name.unwrap_or(f.kind)).collect())
        .unwrap_or_default()
}

/// Names of the programs attached to an interface's TCX hook, in order.
fn tcx_programs(iface: &str, attach_type: aya::programs::TcAttachType) -> Vec<String> {
    aya::programs::SchedClassifier::query_tcx(iface, attach_type)
        .map(|(_, progs)| progs.iter().map(|p| p.name_as_str().unwrap_or("?").to_owned()).collect())
        .unwrap_or_default()
}

#[derive(Debug, Serialize)]
pub struct CgroupHook {
    pub hook: String,
    pub attach_type: &'static str,
    pub cgroup_id: u64,
    /// The cgroup's directory, when found under the cgroup v2 mount.
    pub cgroup_path: Option<String>,
    pub link_id: u32,
    pub prog_id: u32,
    pub program: String,
}

#[derive(Debug, Serialize)]
pub struct FrontendEntry {
    pub frontend: String,
    pub cluster_ip: String,
    /// The Service (`namespace/name`) the frontend belongs to; None in an older agent's pins.
    pub service: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CounterEntry {
    pub name: &'static str,
    /// Which path counts it: `tc` (the pod interfaces' programs), `socket` (the cgroup
    /// socket hooks), `netfilter`.
    pub path: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

/// Which path rewrote connections to external IPs: the socket hooks (at `connect()`/`sendmsg()`
/// of every process below the hooked cgroup, pods' included: no NAT, the endpoint sees the
/// client) or the TC programs (packets of pods whose sockets the hooks did not see: marked for
/// masquerading, the endpoint sees the node).
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct ServedBy {
    /// Socket-hook rewrites (TCP connects and UDP sends, both families).
    pub socket: u64,
    /// Packets the TC programs rewrote towards a cluster IP.
    pub tc: u64,
}

impl ServedBy {
    pub fn from_counters(counters: &[CounterEntry]) -> ServedBy {
        let sum = |names: &[&str]| counters.iter().filter(|c| names.contains(&c.name)).map(|c| c.packets).sum();
        ServedBy {
            socket: sum(&["sock_connect_v4", "sock_connect_v6", "sock_sendmsg_v4", "sock_sendmsg_v6"]),
            tc: sum(&["rewrite_ingress_v4", "rewrite_ingress_v6"]),
        }
    }
}

fn counter_path(kind: node_manager_common::CounterKind) -> &'static str {
    use node_manager_common::CounterKind;
    match kind {
        CounterKind::Tc | CounterKind::TcFailure => "tc",
        CounterKind::Sock => "socket",
        CounterKind::Netfilter => "netfilter",
    }
}

fn open(pins: &Pins, name: &str) -> Result<Map> {
    let path = pins.map(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("{name}: unsupported map type"))
}

pub fn read(bpffs: &Path) -> Result<State> {
    let pins = Pins::new(bpffs);
    // Every map the pod datapath needs (NM_SOCK_REV may be missing from an older agent's pins):
    // an agent that is starting pins them one by one, and reading half of them would fail.
    let installed =
        [map_names::FRONTENDS, map_names::POD_CIDRS, map_names::FLOWS, map_names::CONFIG, map_names::COUNTERS]
            .iter()
            .all(|name| pins.map(name).exists());
    let mut state = State {
        pins: pins.layout_dir().display().to_string(),
        installed,
        features: Vec::new(),
        interfaces: Vec::new(),
        cgroup_hooks: Vec::new(),
        sockets: 0,
        pod_cidrs: Vec::new(),
        frontends: Vec::new(),
        flows: 0,
        datagram_flows: 0,
        masquerade_mark: None,
        counters: Vec::new(),
        served_by: ServedBy::default(),
        drop_invalid: drop_invalid_state(&pins),
        kernel_features: kernel_report(&pins, installed),
    };
    if let Some(mode) = state.drop_invalid.mode {
        state.features.push(Feature {
            name: "drop-invalid-input",
            active: true,
            mechanism: format!("{mode}: {}", state.drop_invalid.why.as_deref().unwrap_or("")),
        });
    }
    if !installed {
        return Ok(state);
    }
    let mut ifaces: Vec<_> = attach::pinned_ifaces(&pins.links_dir()).into_iter().collect();
    ifaces.sort();
    state.interfaces = ifaces
        .iter()
        .map(|i| Interface {
            name: i.name.clone(),
            ifindex: i.index,
            present: !i.name.is_empty(),
            tcx_ingress: tcx_programs(&i.name, aya::programs::TcAttachType::Ingress),
            tcx_egress: tcx_programs(&i.name, aya::programs::TcAttachType::Egress),
            tc_ingress: tc_filters(i.index, true),
            tc_egress: tc_filters(i.index, false),
        })
        .collect();
    let mechanism = Mechanism::detect();
    state.features.push(Feature {
        name: "external-cluster (pods, TC)",
        active: !state.interfaces.is_empty(),
        mechanism: format!("{} on {} interface(s)", mechanism.name(), state.interfaces.len()),
    });

    let hooks = cgroup::pinned_hooks(&pins.links_dir());
    let names: std::collections::HashMap<u32, String> = aya::programs::loaded_programs()
        .flatten()
        .map(|p| (p.id(), p.name_as_str().unwrap_or("?").to_owned()))
        .collect();
    let mut paths = std::collections::HashMap::new();
    for h in hooks {
        let path = paths.entry(h.cgroup_id).or_insert_with(|| cgroup::path_of(h.cgroup_id)).clone();
        state.cgroup_hooks.push(CgroupHook {
            attach_type: cgroup::attach_type_name(h.attach_type),
            cgroup_id: h.cgroup_id,
            cgroup_path: path.map(|p| p.display().to_string()),
            link_id: h.link_id,
            prog_id: h.prog_id,
            program: names.get(&h.prog_id).cloned().unwrap_or_else(|| "?".to_owned()),
            hook: h.hook,
        });
    }
    let cgroups: std::collections::BTreeSet<String> = state
        .cgroup_hooks
        .iter()
        .map(|h| h.cgroup_path.clone().unwrap_or_else(|| format!("cgroup id {}", h.cgroup_id)))
        .collect();
    state.features.push(Feature {
        name: "external-cluster (host, cgroup)",
        active: !state.cgroup_hooks.is_empty(),
        mechanism: format!(
            "{}/{} socket hooks on {}",
            state.cgroup_hooks.len(),
            cgroup::HOOKS.len(),
            if cgroups.is_empty() {
                "no cgroup".to_owned()
            } else {
                cgroups.into_iter().collect::<Vec<_>>().join(", ")
            }
        ),
    });

    let frontends: HashMap<MapData, _, _> = HashMap::try_from(open(&pins, map_names::FRONTENDS)?)?;
    let owners: std::collections::BTreeMap<FrontendKey, Owner> = match open(&pins, map_names::OWNERS) {
        Ok(map) => maps::read_hash(&HashMap::<_, FrontendKey, Owner>::try_from(map)?, map_names::OWNERS)?,
        Err(_) => Default::default(), // pins of an agent that predates the owners map
    };
    for (key, value) in maps::read_frontends(&frontends)? {
        let frontend = maps::frontend_addr(&key).map_or_else(|| format!("{key:?}"), |f| f.to_string());
        state.frontends.push(FrontendEntry {
            frontend,
            cluster_ip: maps::addr_from16(value.cluster_addr).to_string(),
            service: owners.get(&key).and_then(|o| o.as_str()).map(str::to_owned),
        });
    }
    let trie: LpmTrie<MapData, [u8; 16], u8> = LpmTrie::try_from(open(&pins, map_names::POD_CIDRS)?)?;
    state.pod_cidrs = maps::read_pod_cidrs(&trie)?.iter().map(ToString::to_string).collect();
    let flows: HashMap<MapData, FlowKey, Flow> = HashMap::try_from(open(&pins, map_names::FLOWS)?)?;
    state.flows = flows.keys().filter(Result::is_ok).count();
    // Absent when the pins predate the datagram map (an older agent's).
    if pins.map(map_names::FLOWS_DGRAM).exists() {
        let dgram: HashMap<MapData, FlowKey, Flow> = HashMap::try_from(open(&pins, map_names::FLOWS_DGRAM)?)?;
        state.datagram_flows = dgram.keys().filter(Result::is_ok).count();
    }
    // Absent when the pins predate the socket hooks (an older agent's).
    if pins.map(map_names::SOCK_REV).exists() {
        let socks: HashMap<MapData, SockRevKey, SockRev> = HashMap::try_from(open(&pins, map_names::SOCK_REV)?)?;
        state.sockets = socks.keys().filter(Result::is_ok).count();
    }
    let config: Array<MapData, DatapathConfig> = Array::try_from(open(&pins, map_names::CONFIG)?)?;
    state.masquerade_mark = maps::read_config(&config).ok().map(|c| format!("{:#x}", c.masquerade_mark));
    let counters: PerCpuArray<MapData, node_manager_common::Counter> =
        PerCpuArray::try_from(open(&pins, map_names::COUNTERS)?)?;
    state.counters = maps::read_counters(&counters)?
        .into_iter()
        // read_counters yields them in CounterIndex::ALL order.
        .zip(node_manager_common::CounterIndex::ALL)
        .map(|((name, c), index)| CounterEntry {
            name,
            path: counter_path(index.kind()),
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    state.served_by = ServedBy::from_counters(&state.counters);
    Ok(state)
}

fn drop_invalid_state(pins: &Pins) -> DropInvalidState {
    use crate::features::drop_invalid::nft;
    let recorded = crate::features::drop_invalid::recorded(pins);
    // One `nft` run for both of our tables (this is read at every metrics scrape).
    let tables = nft::inet_tables();
    DropInvalidState {
        mode: recorded.as_ref().map(|(m, _)| *m),
        why: recorded.map(|(_, why)| why),
        netfilter_links: crate::kernel::netfilter::linked(&pins.links_dir())
            .iter()
            .map(|(family, info)| {
                let (_, hook, priority) = info.netfilter;
                let hook =
                    if hook == crate::kernel::sys::NF_INET_LOCAL_IN { "LOCAL_IN".into() } else { hook.to_string() };
                format!("{} link {} prog {} {hook} priority {priority}", family.name, info.id, info.prog_id)
            })
            .collect(),
        nftables_table: tables.iter().any(|t| t == nft::TABLE),
        conntrack_holder: tables.iter().any(|t| t == nft::HOLDER_TABLE),
        conntrack_seen_v4_ms_ago: crate::features::drop_invalid::bpf::conntrack_seen_ms_ago(
            pins,
            node_manager_common::CT_FAMILY_V4,
        ),
        conntrack_seen_v6_ms_ago: crate::features::drop_invalid::bpf::conntrack_seen_ms_ago(
            pins,
            node_manager_common::CT_FAMILY_V6,
        ),
        counters: crate::features::drop_invalid::counters(pins),
    }
}

/// The report `inspect` shows: the agent's, pinned at start; with nothing installed, one probed
/// now (programs trial-loaded, the INVALID drop's mode as `auto` would pick it). `None` while an
/// agent is installing (maps pinned, report not yet).
pub fn kernel_report(pins: &Pins, installed: bool) -> Option<Report> {
    if let Some(report) = pinned_report(&pins.layout_dir()) {
        return Some(report);
    }
    (!installed).then(live_report)
}

/// Probes, trial-loads every program against private maps (nothing is attached or pinned), and
/// decides as the agent would.
pub fn live_report() -> Report {
    let probes = probe();
    let mut loads = Loads::default();
    match Datapath::load_unpinned() {
        Ok(datapath) => {
            loads.pod_tc = Some(datapath.pod_tc_loaded());
            loads.socket_hooks = Some(datapath.socket_hooks_loaded());
            if drop_invalid_bpf(&probes).is_ok() {
                let loaded = netfilter::load_programs_with(|name| datapath.map_fd(name));
                loads.drop_invalid_bpf = Some(loaded.map(|_| ()).map_err(|e| format!("{e:#}")));
            }
        }
        Err(e) => {
            let why = format!("loading the object (maps): {e:#}");
            (loads.pod_tc, loads.socket_hooks) = (Some(Err(why.clone())), Some(Err(why)));
        }
    }
    let auto = drop_invalid::choose(Requested::Auto, |mode| match mode {
        Mode::Bpf => drop_invalid_bpf(&probes).and(loads.drop_invalid_bpf.clone().unwrap_or(Ok(()))),
        Mode::Nftables => drop_invalid::nft::probe(),
        Mode::Iptables => drop_invalid::iptables::probe(),
        Mode::Liberal => drop_invalid::liberal::probe(),
    });
    let drop_invalid = match auto {
        Ok((mode, reason)) => (mode.to_string(), drop_invalid::describe(mode, reason.code())),
        Err(why) => (UNAVAILABLE.to_owned(), why),
    };
    Report::new("probed", probes, loads, Some(drop_invalid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_by_sums_the_socket_hook_rewrites_and_the_tc_rewrites_apart() {
        let c = |name, path, packets| CounterEntry { name, path, packets, bytes: 0 };
        let counters = [
            c("sock_connect_v4", "socket", 2),
            c("sock_sendmsg_v6", "socket", 3),
            c("sock_recvmsg_v4", "socket", 7), // replies shown as the external IP: no rewrite
            c("rewrite_ingress_v4", "tc", 5),
            c("rewrite_egress_v4", "tc", 4), // replies back to the pod: not a new rewrite
            c("sock_pass_no_frontend", "socket", 9),
        ];
        assert_eq!(ServedBy::from_counters(&counters), ServedBy { socket: 5, tc: 5 });
        assert_eq!(ServedBy::from_counters(&[]), ServedBy::default());
    }

    #[test]
    fn every_counter_has_a_path() {
        for i in node_manager_common::CounterIndex::ALL {
            assert!(["tc", "socket", "netfilter"].contains(&counter_path(i.kind())), "{}", i.name());
        }
    }
}
