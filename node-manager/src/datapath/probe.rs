//! What the running kernel offers, and which mechanism each feature uses on it.
//!
//! Probes ask the kernel with the syscalls the agent itself uses (never by version number):
//! TCX (Linux ≥ 6.6) by querying loopback's TCX hook; BPF netfilter programs (≥ 6.4) and the
//! getpeername socket hooks (≥ 5.8, so cgroup BPF links, ≥ 5.7) by loading a two-instruction
//! program of that type; kernel BTF by reading `struct sk_buff` from it; map BTF from aya's own
//! probe; and, for every program in the object, each helper it calls, by loading a program that
//! calls it (the verifier says "unknown func" for a helper this kernel lacks for that program
//! type), as `bpftool feature probe` does.
//!
//! [`decide`] is the pure part: from the probes and the verifier's verdict on the real programs
//! it picks a mechanism per feature, or says why the feature is unavailable. The agent logs the
//! resulting [`Report`] at start and pins it (`<layout>/kernel_report`), and `inspect` shows it;
//! with no agent installed, `inspect` probes and trial-loads the programs itself.
use std::{collections::BTreeSet, fmt, os::fd::AsFd as _, path::Path};

use serde::{Deserialize, Serialize};

use super::{OBJECT, btf, sys};

/// Pinned next to `maps/` and `links/`: the agent's report, as JSON in a one-entry array map.
pub const REPORT_PIN: &str = "kernel_report";
const REPORT_MAX: usize = 16 * 1024;

/// One probe: what was checked, whether the kernel has it, and the detail (its answer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    fn new(name: &str, result: Result<String, String>) -> Check {
        let (ok, detail) = match result {
            Ok(detail) => (true, detail),
            Err(why) => (false, why),
        };
        Check { name: name.to_owned(), ok, detail }
    }
}

/// The helpers one program calls, and those this kernel lacks for its program type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Helpers {
    pub program: String,
    pub used: Vec<String>,
    pub missing: Vec<String>,
}

/// The kernel's answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probes {
    pub tcx: Check,
    pub netfilter_links: Check,
    pub cgroup_links: Check,
    pub kernel_btf: Check,
    pub map_btf: Check,
    pub helpers: Vec<Helpers>,
}

/// The verifier's verdict on the real programs, per feature: `None` when they were not loaded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loads {
    pub pod_tc: Option<Result<(), String>>,
    pub socket_hooks: Option<Result<(), String>>,
    pub drop_invalid_bpf: Option<Result<(), String>>,
}

/// A feature and the mechanism it uses on this kernel (`available: false`: it is off here,
/// `why` says what the kernel lacks or what the verifier said).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choice {
    pub feature: String,
    pub mechanism: String,
    pub available: bool,
    pub why: String,
}

pub const POD_TC: &str = "pod datapath (TC)";
pub const SOCKET_HOOKS: &str = "host clients (socket hooks)";
pub const DROP_INVALID: &str = "INVALID drop";
pub const MAP_BTF: &str = "map BTF";
pub const UNAVAILABLE: &str = "unavailable";

/// The programs of each feature (helpers are checked per program).
const TC_PROGRAMS: [&str; 2] =
    [node_manager_common::program_names::POD_INGRESS, node_manager_common::program_names::POD_EGRESS];
fn is_socket_program(name: &str) -> bool {
    name.starts_with("nm_sock_")
}
fn is_netfilter_program(name: &str) -> bool {
    name.starts_with("nm_drop_invalid")
}

fn missing_helpers(probes: &Probes, which: impl Fn(&str) -> bool) -> Option<String> {
    let missing: Vec<String> = probes
        .helpers
        .iter()
        .filter(|h| which(&h.program) && !h.missing.is_empty())
        .map(|h| format!("{} needs {}", h.program, h.missing.join(", ")))
        .collect();
    (!missing.is_empty()).then(|| format!("helpers this kernel lacks: {}", missing.join("; ")))
}

/// Why a feature cannot load: missing helpers first (the precise reason), else the verifier's.
fn load_problem(probes: &Probes, load: &Option<Result<(), String>>, which: impl Fn(&str) -> bool) -> Option<String> {
    missing_helpers(probes, which).or_else(|| match load {
        Some(Err(why)) => Some(format!("the verifier rejected it: {why}")),
        _ => None,
    })
}

/// Whether the real programs were verified, for `why`.
fn verified(load: &Option<Result<(), String>>) -> &'static str {
    match load {
        Some(Ok(())) => "programs verified",
        _ => "programs not loaded yet",
    }
}

/// The pure decision: mechanism per feature from the probes and the verifier's verdicts. The
/// INVALID drop's row is the mode `invalid::choose` picked (`drop_invalid`: mode and why).
pub fn decide(probes: &Probes, loads: &Loads, drop_invalid: Option<(String, String)>) -> Vec<Choice> {
    let choice = |feature: &str, mechanism: &str, why: String| Choice {
        feature: feature.to_owned(),
        available: mechanism != UNAVAILABLE,
        mechanism: mechanism.to_owned(),
        why,
    };
    let pod_tc = match load_problem(probes, &loads.pod_tc, |p| TC_PROGRAMS.contains(&p)) {
        Some(why) => choice(POD_TC, UNAVAILABLE, why),
        None if probes.tcx.ok => choice(POD_TC, "tcx", format!("TCX links; {}", verified(&loads.pod_tc))),
        None => choice(
            POD_TC,
            "netlink cls_bpf",
            format!("no TCX ({}): cls_bpf filters on clsact; {}", probes.tcx.detail, verified(&loads.pod_tc)),
        ),
    };
    let socket_hooks = match load_problem(probes, &loads.socket_hooks, is_socket_program) {
        Some(why) => choice(SOCKET_HOOKS, UNAVAILABLE, why),
        None if !probes.cgroup_links.ok => choice(SOCKET_HOOKS, UNAVAILABLE, probes.cgroup_links.detail.clone()),
        None => choice(SOCKET_HOOKS, "cgroup links", verified(&loads.socket_hooks).to_owned()),
    };
    let drop_invalid = match drop_invalid {
        Some((mode, why)) => choice(DROP_INVALID, &mode, why),
        None => choice(DROP_INVALID, "off", "turned off (--drop-invalid-input false)".to_owned()),
    };
    let map_btf = if probes.map_btf.ok {
        choice(MAP_BTF, "BTF", "maps carry BTF (bpftool prints named fields)".to_owned())
    } else {
        choice(MAP_BTF, "none", format!("maps without BTF: {}", probes.map_btf.detail))
    };
    vec![pod_tc, socket_hooks, drop_invalid, map_btf]
}

/// Whether bpf mode of the INVALID drop can work here, and if not, why (for `invalid::choose`).
pub fn drop_invalid_bpf(probes: &Probes) -> Result<(), String> {
    if !probes.netfilter_links.ok {
        return Err(format!("no BPF netfilter links: {}", probes.netfilter_links.detail));
    }
    if !probes.kernel_btf.ok {
        return Err(format!("no kernel BTF for the sk_buff offsets: {}", probes.kernel_btf.detail));
    }
    missing_helpers(probes, is_netfilter_program).map_or(Ok(()), Err)
}

/// The report the agent logs, pins and `inspect` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// `uname -r`.
    pub release: String,
    /// "agent" (recorded by the agent at start) or "probed" (by `inspect`, no agent installed).
    pub source: String,
    pub features: Vec<Choice>,
    pub probes: Probes,
    pub loads: Loads,
}

impl Report {
    pub fn new(source: &str, probes: Probes, loads: Loads, drop_invalid: Option<(String, String)>) -> Report {
        Report {
            release: release(),
            source: source.to_owned(),
            features: decide(&probes, &loads, drop_invalid),
            probes,
            loads,
        }
    }

    /// One log line per feature, and one per probe that failed.
    pub fn log(&self) {
        tracing::info!(kernel = %self.release, "kernel features probed");
        for c in &self.features {
            if c.available {
                tracing::info!(feature = %c.feature, mechanism = %c.mechanism, why = %c.why, "kernel feature");
            } else {
                tracing::warn!(feature = %c.feature, why = %c.why, "feature unavailable on this kernel");
            }
        }
        for check in self.probes.checks().iter().filter(|c| !c.ok) {
            tracing::info!(probe = %check.name, detail = %check.detail, "kernel lacks");
        }
    }
}

impl Probes {
    /// Every probe as a check, helpers included (one per program).
    pub fn checks(&self) -> Vec<Check> {
        let mut all = vec![
            self.tcx.clone(),
            self.netfilter_links.clone(),
            self.cgroup_links.clone(),
            self.kernel_btf.clone(),
            self.map_btf.clone(),
        ];
        all.extend(self.helpers.iter().map(|h| Check {
            name: format!("helpers of {}", h.program),
            ok: h.missing.is_empty(),
            detail: if h.missing.is_empty() { h.used.join(", ") } else { format!("missing {}", h.missing.join(", ")) },
        }));
        all
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = if self.source == "agent" { "recorded by the agent at start" } else { "probed now" };
        writeln!(f, "kernel features (Linux {}, {source}):", self.release)?;
        for c in &self.features {
            writeln!(f, "  {:<30} {:<16} {}", c.feature, c.mechanism, c.why)?;
        }
        writeln!(f, "  probes:")?;
        for c in self.probes.checks() {
            writeln!(f, "    {:<36} {:<4} {}", c.name, if c.ok { "yes" } else { "no" }, c.detail)?;
        }
        Ok(())
    }
}

pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// Probes the running kernel (a few dozen tiny program loads; nothing is attached).
pub fn probe() -> Probes {
    Probes {
        tcx: Check::new("TCX (Linux ≥ 6.6)", probe_tcx()),
        netfilter_links: Check::new(
            "BPF netfilter links (≥ 6.4)",
            probe_prog_type(sys::BPF_PROG_TYPE_NETFILTER, sys::BPF_NETFILTER),
        ),
        cgroup_links: Check::new(
            "cgroup links, getpeername (≥ 5.8)",
            probe_prog_type(sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_GETPEERNAME),
        ),
        kernel_btf: Check::new(
            "kernel BTF",
            btf::member_offset_in(Path::new(btf::VMLINUX), "sk_buff", "_nfct")
                .map(|at| format!("{}: sk_buff._nfct at byte {at}", btf::VMLINUX))
                .map_err(|e| format!("{e:#}")),
        ),
        map_btf: Check::new(
            "map BTF",
            match aya::features().btf() {
                Some(_) => Ok("the kernel loads program/map BTF".to_owned()),
                None => Err("the kernel refused a BTF blob (aya's probe)".to_owned()),
            },
        ),
        helpers: probe_helpers(),
    }
}

const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;

/// Whether the kernel has TCX (the attach mechanism for pod interfaces).
pub fn tcx_available() -> bool {
    probe_tcx().is_ok()
}

fn probe_tcx() -> Result<String, String> {
    aya::programs::SchedClassifier::query_tcx("lo", aya::programs::TcAttachType::Ingress)
        .map(|_| "TCX query on lo answered".to_owned())
        .map_err(|e| format!("TCX query on lo: {}", error_chain(&e)))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `r0 = imm; exit`.
fn return_imm(imm: i32) -> [u64; 2] {
    [0xb7 | ((imm as u32 as u64) << 32), 0x95]
}

fn probe_prog_type(prog_type: u32, expected_attach_type: u32) -> Result<String, String> {
    sys::prog_load_logged(prog_type, expected_attach_type, "nm_probe", &return_imm(1), c"GPL", 4096)
        .map(|_| "a program of this type loads".to_owned())
        .map_err(|e| format!("loading a program of this type: {e}"))
}

/// The verifier's verdict on a program of `name`'s type that reads an uninitialised register
/// (for the fault-injection hook of `Datapath`).
pub fn verifier_rejection(name: &str) -> String {
    let Some((prog_type, attach)) = program_type(name) else { return format!("{name}: no program type") };
    // r0 = *(u64 *)(r9 + 0); exit
    let insns = [0x9079, 0x95];
    match sys::prog_load(prog_type, attach, "nm_rejected", &insns, c"GPL") {
        Ok(_) => "the verifier accepted the faulty program".to_owned(),
        Err(e) => e.to_string(),
    }
}

/// Program type and expected attach type of each program of the object, by name.
pub fn program_type(name: &str) -> Option<(u32, u32)> {
    use node_manager_common::program_names as p;
    Some(match name {
        p::POD_INGRESS | p::POD_EGRESS => (sys::BPF_PROG_TYPE_SCHED_CLS, 0),
        p::DROP_INVALID_V4 | p::DROP_INVALID_V6 => (sys::BPF_PROG_TYPE_NETFILTER, sys::BPF_NETFILTER),
        p::SOCK_CONNECT4 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 10),
        p::SOCK_CONNECT6 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 11),
        p::SOCK_SENDMSG4 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 14),
        p::SOCK_SENDMSG6 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 15),
        p::SOCK_RECVMSG4 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 19),
        p::SOCK_RECVMSG6 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 20),
        p::SOCK_GETPEERNAME4 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 29),
        p::SOCK_GETPEERNAME6 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 30),
        _ => return None,
    })
}

/// The helper ids each program of the object calls (subprograms included), by program name.
pub fn helper_calls(object: &[u8]) -> Result<Vec<(String, BTreeSet<u32>)>, String> {
    let mut obj = aya_obj::Object::parse(object).map_err(|e| format!("parsing the eBPF object: {e}"))?;
    let text_sections = obj.functions.keys().map(|(section, _)| *section).collect();
    obj.relocate_calls(&text_sections).map_err(|e| format!("relocating calls: {e}"))?;
    let mut out: Vec<(String, BTreeSet<u32>)> = obj
        .programs
        .iter()
        .map(|(name, program)| {
            let ids = obj.functions[&program.function_key()]
                .instructions
                .iter()
                .filter_map(|insn| {
                    // SAFETY: bpf_insn is an 8-byte #[repr(C)] plain-old-data struct.
                    let raw = unsafe { std::mem::transmute_copy::<aya_obj::generated::bpf_insn, u64>(insn) };
                    helper_of(raw)
                })
                .collect();
            (name.clone(), ids)
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The helper id of a `call` instruction (BPF_JMP | BPF_CALL, source register 0: a helper, not a
/// subprogram or kfunc).
fn helper_of(insn: u64) -> Option<u32> {
    let code = insn as u8;
    let src_reg = (insn >> 12) & 0xf;
    (code == 0x85 && src_reg == 0).then_some((insn >> 32) as u32)
}

fn probe_helpers() -> Vec<Helpers> {
    let calls = match helper_calls(OBJECT) {
        Ok(calls) => calls,
        Err(e) => {
            return vec![Helpers { program: "(object)".into(), used: Vec::new(), missing: vec![e] }];
        }
    };
    let mut cache: std::collections::HashMap<(u32, u32, u32), bool> = Default::default();
    let mut types: std::collections::HashMap<(u32, u32), bool> = Default::default();
    calls
        .into_iter()
        .filter_map(|(program, ids)| {
            let (prog_type, attach) = program_type(&program)?;
            // A program type the kernel lacks is reported by its own probe, not helper by helper.
            if !*types.entry((prog_type, attach)).or_insert_with(|| probe_prog_type(prog_type, attach).is_ok()) {
                return None;
            }
            let mut missing = Vec::new();
            for &id in &ids {
                let known =
                    *cache.entry((prog_type, attach, id)).or_insert_with(|| helper_known(prog_type, attach, id));
                if !known {
                    missing.push(helper_name(id));
                }
            }
            Some(Helpers { program, used: ids.iter().map(|&id| helper_name(id)).collect(), missing })
        })
        .collect()
}

/// Loads `call <id>; r0 = 0; exit`: the verifier refuses the arguments of a helper it knows, but
/// says "unknown func" / "invalid func" for one this kernel lacks for the program type (or a
/// program type it lacks altogether).
pub fn helper_known(prog_type: u32, expected_attach_type: u32, id: u32) -> bool {
    let [mov, exit] = return_imm(0);
    let insns = [0x85 | (u64::from(id) << 32), mov, exit];
    match sys::prog_load_logged(prog_type, expected_attach_type, "nm_probe", &insns, c"GPL", 4096) {
        Ok(_) => true,
        Err(e) => {
            !(e.verifier_log.contains("unknown func")
                || e.verifier_log.contains("invalid func")
                || e.verifier_log.is_empty())
        }
    }
}

/// Names of the helpers node-manager's programs use (others by number).
fn helper_name(id: u32) -> String {
    let name = match id {
        1 => "map_lookup_elem",
        2 => "map_update_elem",
        3 => "map_delete_elem",
        4 => "probe_read",
        5 => "ktime_get_ns",
        6 => "trace_printk",
        8 => "get_smp_processor_id",
        9 => "skb_store_bytes",
        10 => "l3_csum_replace",
        11 => "l4_csum_replace",
        26 => "skb_load_bytes",
        28 => "csum_diff",
        46 => "get_socket_cookie",
        112 => "probe_read_user",
        113 => "probe_read_kernel",
        _ => return format!("helper#{id}"),
    };
    format!("bpf_{name}")
}

/// The report `inspect` shows: the agent's, pinned at start; with nothing installed, one probed
/// now (programs trial-loaded, the INVALID drop's mode as `auto` would pick it). `None` while an
/// agent is installing (maps pinned, report not yet).
pub fn for_inspect(pins: &super::pins::Pins, installed: bool) -> Option<Report> {
    if let Some(report) = pinned_report(&pins.layout_dir()) {
        return Some(report);
    }
    (!installed).then(live_report)
}

/// Probes, trial-loads every program against private maps (nothing is attached or pinned), and
/// decides as the agent would.
pub fn live_report() -> Report {
    use crate::invalid::{self, Mode, Requested};
    let probes = probe();
    let mut loads = Loads::default();
    match super::Datapath::load_unpinned() {
        Ok(datapath) => {
            loads.pod_tc = Some(datapath.pod_tc_loaded());
            loads.socket_hooks = Some(datapath.socket_hooks_loaded());
            if drop_invalid_bpf(&probes).is_ok() {
                let loaded = super::netfilter::load_programs_with(|name| datapath.map_fd(name));
                loads.drop_invalid_bpf = Some(loaded.map(|_| ()).map_err(|e| format!("{e:#}")));
            }
        }
        Err(e) => {
            let why = format!("loading the object (maps): {e:#}");
            (loads.pod_tc, loads.socket_hooks) = (Some(Err(why.clone())), Some(Err(why)));
        }
    }
    let auto = invalid::choose(Requested::Auto, |mode| match mode {
        Mode::Bpf => drop_invalid_bpf(&probes).and(loads.drop_invalid_bpf.clone().unwrap_or(Ok(()))),
        Mode::Nftables => invalid::nft::probe(),
        Mode::Iptables => invalid::iptables::probe(),
        Mode::Liberal => invalid::liberal::probe(),
    });
    let drop_invalid = match auto {
        Ok((mode, reason)) => (mode.to_string(), invalid::describe(mode, reason.code())),
        Err(why) => (UNAVAILABLE.to_owned(), why),
    };
    Report::new("probed", probes, loads, Some(drop_invalid))
}

/// Pins the report (replacing an earlier agent's).
pub fn pin_report(layout_dir: &Path, report: &Report) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let json = serde_json::to_vec(report)?;
    anyhow::ensure!(json.len() <= REPORT_MAX - 4, "the report is {} bytes, more than the map holds", json.len());
    let mut value = vec![0u8; REPORT_MAX];
    let len = json.len();
    value[..4].copy_from_slice(&(len as u32).to_ne_bytes());
    value[4..4 + len].copy_from_slice(&json[..len]);
    let path = layout_dir.join(REPORT_PIN);
    let map = match sys::obj_get(&path) {
        Ok(fd) if sys::map_value_size_and_btf_id(fd.as_fd()).is_ok_and(|(size, _)| size as usize == REPORT_MAX) => fd,
        _ => {
            super::attach::remove_pin(&path)?;
            let fd = sys::map_create(sys::BPF_MAP_TYPE_ARRAY, 4, REPORT_MAX as u32, 1, "nm_report")
                .context("creating the kernel-report map")?;
            sys::obj_pin(fd.as_fd(), &path).with_context(|| format!("pinning {}", path.display()))?;
            fd
        }
    };
    sys::map_update(map.as_fd(), &0u32.to_ne_bytes(), &value).context("writing the kernel report")?;
    Ok(())
}

/// The report an agent pinned, if any.
pub fn pinned_report(layout_dir: &Path) -> Option<Report> {
    let fd = sys::obj_get(&layout_dir.join(REPORT_PIN)).ok()?;
    let mut value = vec![0u8; REPORT_MAX];
    sys::map_lookup(fd.as_fd(), &0u32.to_ne_bytes(), &mut value).ok()?;
    let len = (u32::from_ne_bytes(value[..4].try_into().ok()?) as usize).min(REPORT_MAX - 4);
    serde_json::from_slice(&value[4..4 + len]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yes(name: &str) -> Check {
        Check { name: name.into(), ok: true, detail: "ok".into() }
    }

    fn no(name: &str, why: &str) -> Check {
        Check { name: name.into(), ok: false, detail: why.into() }
    }

    fn probes(tcx: bool, netfilter: bool) -> Probes {
        Probes {
            tcx: if tcx { yes("tcx") } else { no("tcx", "TCX query on lo: Invalid argument") },
            netfilter_links: if netfilter { yes("nf") } else { no("nf", "loading: Invalid argument") },
            cgroup_links: yes("cgroup"),
            kernel_btf: yes("btf"),
            map_btf: yes("map btf"),
            helpers: vec![
                Helpers { program: "nm_pod_ingress".into(), used: vec!["bpf_l3_csum_replace".into()], missing: vec![] },
                Helpers {
                    program: "nm_sock_connect4".into(),
                    used: vec!["bpf_get_socket_cookie".into()],
                    missing: vec![],
                },
            ],
        }
    }

    fn mechanism<'a>(choices: &'a [Choice], feature: &str) -> &'a Choice {
        choices.iter().find(|c| c.feature == feature).unwrap()
    }

    #[test]
    fn tcx_when_the_kernel_has_it_else_netlink_cls_bpf() {
        let loads = Loads { pod_tc: Some(Ok(())), ..Loads::default() };
        let new = decide(&probes(true, true), &loads, None);
        assert_eq!(mechanism(&new, POD_TC).mechanism, "tcx");
        let old = decide(&probes(false, false), &loads, None);
        let tc = mechanism(&old, POD_TC);
        assert_eq!(tc.mechanism, "netlink cls_bpf");
        assert!(tc.available && tc.why.contains("Invalid argument") && tc.why.contains("verified"), "{tc:?}");
    }

    #[test]
    fn a_rejected_program_makes_its_feature_unavailable_with_the_verifiers_reason() {
        let loads = Loads {
            pod_tc: Some(Err("Permission denied; verifier: R2 invalid mem access".into())),
            socket_hooks: Some(Ok(())),
            ..Loads::default()
        };
        let choices = decide(&probes(true, true), &loads, None);
        let tc = mechanism(&choices, POD_TC);
        assert!(!tc.available && tc.mechanism == UNAVAILABLE, "{tc:?}");
        assert!(tc.why.contains("R2 invalid mem access"), "{tc:?}");
        assert!(mechanism(&choices, SOCKET_HOOKS).available, "the other features stay");
    }

    #[test]
    fn missing_helpers_are_named_before_the_verifier_runs() {
        let mut p = probes(true, true);
        p.helpers[1].missing = vec!["bpf_get_socket_cookie".into()];
        let choices = decide(&p, &Loads::default(), None);
        let hooks = mechanism(&choices, SOCKET_HOOKS);
        assert!(!hooks.available, "{hooks:?}");
        assert!(hooks.why.contains("nm_sock_connect4 needs bpf_get_socket_cookie"), "{hooks:?}");
        assert!(mechanism(&choices, POD_TC).available);
        p.cgroup_links = no("cgroup", "loading: Invalid argument");
        p.helpers[1].missing.clear();
        assert_eq!(mechanism(&decide(&p, &Loads::default(), None), SOCKET_HOOKS).why, "loading: Invalid argument");
    }

    #[test]
    fn bpf_drop_needs_netfilter_links_and_kernel_btf() {
        assert_eq!(drop_invalid_bpf(&probes(true, true)), Ok(()));
        assert!(drop_invalid_bpf(&probes(true, false)).unwrap_err().starts_with("no BPF netfilter links"));
        let mut p = probes(true, true);
        p.kernel_btf = no("btf", "reading kernel BTF: No such file");
        assert!(drop_invalid_bpf(&p).unwrap_err().contains("sk_buff offsets"));
        let row = decide(&p, &Loads::default(), Some(("nftables".into(), "auto: fallback".into())));
        assert_eq!(mechanism(&row, DROP_INVALID).mechanism, "nftables");
    }

    #[test]
    fn reads_helper_calls_from_instructions() {
        assert_eq!(helper_of(0x85 | (46 << 32)), Some(46));
        assert_eq!(helper_of(0x85 | (1 << 12) | (3 << 32)), None, "a subprogram call");
        assert_eq!(helper_of(0xb7 | (1 << 32)), None);
        assert_eq!(helper_name(113), "bpf_probe_read_kernel");
        assert_eq!(helper_name(999), "helper#999");
    }

    #[test]
    fn every_program_of_the_object_has_a_known_type_and_calls_helpers() {
        let calls = helper_calls(OBJECT).unwrap();
        assert!(calls.len() >= 12, "{calls:?}");
        for (program, ids) in &calls {
            assert!(program_type(program).is_some(), "{program} has no program type in probe.rs");
            assert!(!ids.is_empty(), "{program} calls no helper?");
        }
    }
}
