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
use std::{collections::BTreeSet, path::Path};

use serde::{Deserialize, Serialize};

use super::{OBJECT, btf, sys};

/// One probe: what was checked, whether the kernel has it, and the detail (its answer).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Absent from reports pinned by agents older than this probe.
    #[serde(default)]
    pub ipv6_csum_flag: Check,
    pub helpers: Vec<Helpers>,
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
        ipv6_csum_flag: Check::new("BPF_F_IPV6 checksum flag (6.16, stable)", probe_ipv6_csum_flag()),
        helpers: probe_helpers(),
    }
}

/// Whether `bpf_l4_csum_replace` takes `BPF_F_IPV6`: a TC program calls it with the flag on a
/// zero frame (size 0, offset 0: a by-difference update of bytes 0–1) and returns its result;
/// a kernel without the flag answers EINVAL before touching the packet. The datapath decides
/// the same per packet (`rewrite::l4_csum_replace_v6`); this probe is for the report.
fn probe_ipv6_csum_flag() -> Result<String, String> {
    const BPF_F_PSEUDO_HDR: i32 = 1 << 4;
    const BPF_F_IPV6: i32 = 1 << 7;
    const BPF_FUNC_L4_CSUM_REPLACE: i32 = 11;
    let mov = |reg: u64, imm: i32| 0xb7 | (reg << 8) | ((imm as u32 as u64) << 32);
    let insns = [
        mov(2, 0),
        mov(3, 0),
        mov(4, 0),
        mov(5, BPF_F_PSEUDO_HDR | BPF_F_IPV6),
        0x85 | ((BPF_FUNC_L4_CSUM_REPLACE as u64) << 32), // call; r1 is still the skb
        0x95,
    ];
    let prog = sys::prog_load_logged(sys::BPF_PROG_TYPE_SCHED_CLS, 0, "nm_probe", &insns, c"GPL", 4096)
        .map_err(|e| format!("loading the probe: {e}"))?;
    // Ethernet (IPv6 ethertype) and a zero IPv6 header: the shortest frame the test run takes.
    let mut frame = [0u8; 14 + 40];
    frame[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    use std::os::fd::AsFd as _;
    match sys::prog_test_run(prog.as_fd(), &frame, &[]).map(|r| r as i32) {
        Ok(0) => Ok("bpf_l4_csum_replace accepts it: IPv6 rewrites leave skb->csum alone".to_owned()),
        Ok(r) if r == -libc::EINVAL => {
            Err("bpf_l4_csum_replace refuses it (EINVAL): IPv6 rewrites restore skb->csum with bpf_csum_update"
                .to_owned())
        }
        Ok(r) => Err(format!("bpf_l4_csum_replace returned {r}")),
        Err(e) => Err(format!("running the probe: {e}")),
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
        p::POD_INGRESS | p::POD_EGRESS | p::POD_ICMP_ERROR => (sys::BPF_PROG_TYPE_SCHED_CLS, 0),
        p::DROP_INVALID_V4 | p::DROP_INVALID_V6 => (sys::BPF_PROG_TYPE_NETFILTER, sys::BPF_NETFILTER),
        p::SOCK_CONNECT4 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 10),
        p::SOCK_CONNECT6 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 11),
        p::SOCK_SENDMSG4 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 14),
        p::SOCK_SENDMSG6 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 15),
        p::SOCK_RECVMSG4 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 19),
        p::SOCK_RECVMSG6 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 20),
        p::SOCK_GETPEERNAME4 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 29),
        p::SOCK_GETPEERNAME6 => (sys::BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 30),
        p::SOCK_RELEASE => (sys::BPF_PROG_TYPE_CGROUP_SOCK, 34),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_helper_calls_from_instructions() {
        assert_eq!(helper_of(0x85 | (46 << 32)), Some(46));
        assert_eq!(helper_of(0x85 | (1 << 12) | (3 << 32)), None, "a subprogram call");
        assert_eq!(helper_of(0xb7 | (1 << 32)), None);
        assert_eq!(helper_name(113), "bpf_probe_read_kernel");
        assert_eq!(helper_name(999), "helper#999");
    }

    /// No program makes BPF-to-BPF calls (compilers emit them for `memset`/`memcpy` of odd
    /// sizes): a program that tail-calls must not, or kernels whose JIT cannot mix them (arm64
    /// before 6.0) refuse it ("tail_calls are not allowed in programs with bpf-to-bpf calls");
    /// and the verifier refuses a loader without CAP_PERFMON the pointer arithmetic on the
    /// caller's stack such a call does (Spectre v1 hardening).
    #[test]
    fn programs_make_no_subprogram_calls() {
        const BPF_FUNC_TAIL_CALL: u32 = 12;
        let mut obj = aya_obj::Object::parse(OBJECT).unwrap();
        let text_sections = obj.functions.keys().map(|(section, _)| *section).collect();
        obj.relocate_calls(&text_sections).unwrap();
        let mut tail_calling = 0;
        for (name, program) in &obj.programs {
            let raw: Vec<u64> = obj.functions[&program.function_key()]
                .instructions
                .iter()
                // SAFETY: bpf_insn is an 8-byte #[repr(C)] plain-old-data struct.
                .map(|insn| unsafe { std::mem::transmute_copy::<aya_obj::generated::bpf_insn, u64>(insn) })
                .collect();
            tail_calling += usize::from(raw.iter().any(|&insn| helper_of(insn) == Some(BPF_FUNC_TAIL_CALL)));
            let subprogram_calls = raw.iter().filter(|&&insn| insn as u8 == 0x85 && (insn >> 12) & 0xf == 1).count();
            assert_eq!(subprogram_calls, 0, "{name} makes {subprogram_calls} subprogram calls");
        }
        assert!(tail_calling >= 1, "nm_pod_egress tail-calls nm_pod_icmp_error");
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
