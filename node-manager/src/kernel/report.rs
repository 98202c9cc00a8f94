//! The kernel-feature report: which mechanism each feature uses on this kernel, decided
//! purely from the probes (`super::probe`) and the verifier's verdicts; logged by the agent at
//! start, pinned for `inspect` (`<layout>/kernel_report`), rendered as text.
use std::{fmt, os::fd::AsFd as _, path::Path};

use serde::{Deserialize, Serialize};

use super::{
    probe::{Check, Probes, release},
    sys,
};

/// Pinned next to `maps/` and `links/`: the agent's report, as JSON in a one-entry array map.
pub const REPORT_PIN: &str = "kernel_report";
const REPORT_MAX: usize = 16 * 1024;

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
pub const IPV6_CSUM: &str = "IPv6 rewrite checksum";
pub const UNAVAILABLE: &str = "unavailable";

/// The programs of each feature (helpers are checked per program).
const TC_PROGRAMS: [&str; 3] = [
    node_manager_common::program_names::POD_INGRESS,
    node_manager_common::program_names::POD_EGRESS,
    node_manager_common::program_names::POD_ICMP_ERROR,
];
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
    // Both work (tests/test_run.rs checks skb->csum under CHECKSUM_COMPLETE); the row says which
    // one runs, for an operator comparing nodes.
    let ipv6_csum = if probes.ipv6_csum_flag.ok {
        choice(IPV6_CSUM, "BPF_F_IPV6", probes.ipv6_csum_flag.detail.clone())
    } else {
        choice(
            IPV6_CSUM,
            "bpf_csum_update",
            format!("no BPF_F_IPV6 ({}); same result, one more helper call", probes.ipv6_csum_flag.detail),
        )
    };
    vec![pod_tc, socket_hooks, drop_invalid, map_btf, ipv6_csum]
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
            self.ipv6_csum_flag.clone(),
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
    use crate::kernel::probe::Helpers;

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
            ipv6_csum_flag: yes("ipv6 csum flag"),
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
    fn the_ipv6_checksum_row_names_the_mechanism_the_datapath_falls_back_to() {
        let mut p = probes(true, true);
        assert_eq!(mechanism(&decide(&p, &Loads::default(), None), IPV6_CSUM).mechanism, "BPF_F_IPV6");
        p.ipv6_csum_flag = no("ipv6 csum flag", "bpf_l4_csum_replace refuses it (EINVAL)");
        let row = decide(&p, &Loads::default(), None);
        let row = mechanism(&row, IPV6_CSUM);
        assert!(row.available && row.mechanism == "bpf_csum_update" && row.why.contains("EINVAL"), "{row:?}");
    }

    #[test]
    fn a_report_pinned_before_the_ipv6_checksum_probe_still_reads() {
        let mut json = serde_json::to_value(Report::new("agent", probes(true, true), Loads::default(), None)).unwrap();
        json["probes"].as_object_mut().unwrap().remove("ipv6_csum_flag");
        let report: Report = serde_json::from_value(json).unwrap();
        assert!(!report.probes.ipv6_csum_flag.ok);
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
}
