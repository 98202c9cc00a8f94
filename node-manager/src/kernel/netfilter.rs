//! The conntrack-INVALID drop's netfilter programs. aya 0.14 can neither load
//! BPF_PROG_TYPE_NETFILTER nor link it, so: aya-obj relocates the programs against the pinned
//! maps (the same maps aya created), and the `sys` shim loads and links them. Links are pinned
//! as `links/netfilter_ipv4` and `links/netfilter_ipv6` so they outlive the agent.
use std::{
    collections::HashSet,
    fs,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use node_manager_common::{CT_FAMILY_V4, CT_FAMILY_V6, program_names};

use super::{OBJECT, pins::Pins, sys};

/// After conntrack (PRE_ROUTING -200 for received packets, defrag before it) and mangle INPUT
/// (-150), before filter INPUT (0) where network-node-manager's rule sat. The kernel allows one
/// BPF link per (family, hook, priority), so a replacement is linked at the other of the two
/// priorities before the old link is detached.
pub const PRIORITIES: [i32; 2] = [-100, -99];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    pub name: &'static str,
    pub pf: u32,
    pub program: &'static str,
    /// Index into NM_CT_SEEN and offset of the per-family counters.
    pub index: u32,
}

pub const FAMILIES: [Family; 2] = [
    Family { name: "ipv4", pf: sys::NFPROTO_IPV4, program: program_names::DROP_INVALID_V4, index: CT_FAMILY_V4 },
    Family { name: "ipv6", pf: sys::NFPROTO_IPV6, program: program_names::DROP_INVALID_V6, index: CT_FAMILY_V6 },
];

pub fn link_pin(pins: &Pins, family: &Family) -> PathBuf {
    pins.links_dir().join(format!("netfilter_{}", family.name))
}

/// Loads both programs, their map references bound to the maps pinned under `pins`.
/// An error carries the verifier's reason (the kernel may not know the program type).
pub fn load_programs(pins: &Pins) -> Result<Vec<(Family, OwnedFd)>> {
    load_programs_with(|name| {
        let path = pins.map(name);
        sys::obj_get(&path).with_context(|| format!("opening pinned map {}", path.display()))
    })
}

/// Loads both programs, their map references bound to the maps `map_fd` returns by name.
pub fn load_programs_with(map_fd: impl Fn(&str) -> Result<OwnedFd>) -> Result<Vec<(Family, OwnedFd)>> {
    let mut obj = aya_obj::Object::parse(OBJECT).context("parsing the eBPF object")?;
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    let maps = obj.maps.clone();
    let fds = maps.keys().map(|name| Ok((name.clone(), map_fd(name)?))).collect::<Result<Vec<(String, OwnedFd)>>>()?;
    obj.relocate_maps(fds.iter().map(|(name, fd)| (name.as_str(), fd.as_raw_fd(), &maps[name])), &text_sections)
        .map_err(|e| anyhow!("relocating map references: {e}"))?;
    obj.relocate_calls(&text_sections).map_err(|e| anyhow!("relocating calls: {e}"))?;

    FAMILIES
        .iter()
        .map(|family| {
            let program = obj.programs.get(family.program).ok_or_else(|| anyhow!("{} missing", family.program))?;
            let function = &obj.functions[&program.function_key()];
            let instructions: Vec<u64> = function
                .instructions
                .iter()
                .map(|insn| {
                    // SAFETY: bpf_insn is an 8-byte #[repr(C)] plain-old-data struct.
                    unsafe { std::mem::transmute_copy::<aya_obj::generated::bpf_insn, u64>(insn) }
                })
                .collect();
            let fd = sys::prog_load(
                sys::BPF_PROG_TYPE_NETFILTER,
                sys::BPF_NETFILTER,
                family.program,
                &instructions,
                &program.license,
            )
            .map_err(|e| anyhow!("loading {} as a netfilter program: {e}", family.program))?;
            Ok((*family, fd))
        })
        .collect()
}

/// Links each program to its family's LOCAL_IN hook, replacing a link left by an earlier agent:
/// the new link is made before the old one is detached (dropping an INVALID packet twice is
/// harmless; a gap would let one through), so there is never a moment without the drop.
pub fn attach(pins: &Pins, programs: &[(Family, OwnedFd)]) -> Result<()> {
    for (family, prog) in programs {
        let pin = link_pin(pins, family);
        let old = pin.exists().then(|| sys::obj_get(&pin)).transpose()?;
        let old_priority = old.as_ref().and_then(|fd| sys::link_info(fd.as_fd()).ok()).map(|i| i.netfilter.2);
        let (first, second) = if old_priority == Some(PRIORITIES[0]) {
            (PRIORITIES[1], PRIORITIES[0])
        } else {
            (PRIORITIES[0], PRIORITIES[1])
        };
        // EBUSY: that priority is taken by a link we have no pin for here (an agent of another
        // layout version, retired once we are linked): take the other one.
        let link = match sys::link_create_netfilter(prog.as_fd(), family.pf, sys::NF_INET_LOCAL_IN, first) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                sys::link_create_netfilter(prog.as_fd(), family.pf, sys::NF_INET_LOCAL_IN, second)
                    .map(|link| (link, second))
            }
            other => other.map(|link| (link, first)),
        };
        let (link, priority) = link.with_context(|| {
            format!("linking {} to the {} LOCAL_IN hook at priority {first} or {second}", family.program, family.name)
        })?;
        tracing::debug!(family = family.name, priority, "netfilter link created");
        if old.is_some() {
            fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
        }
        sys::obj_pin(link.as_fd(), &pin).with_context(|| format!("pinning {}", pin.display()))?;
        if let Some(old) = old {
            sys::link_detach(old.as_fd()).with_context(|| format!("detaching the previous {} link", family.name))?;
        }
    }
    Ok(())
}

/// Detaches and unpins our netfilter links (also when the pins are all that is left of an agent).
/// Returns what was removed.
pub fn detach(links_dir: &Path) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for family in &FAMILIES {
        let pin = links_dir.join(format!("netfilter_{}", family.name));
        if !pin.exists() {
            continue;
        }
        let link = sys::obj_get(&pin).with_context(|| format!("opening {}", pin.display()))?;
        sys::link_detach(link.as_fd()).with_context(|| format!("detaching {}", pin.display()))?;
        fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
        removed.push(format!("netfilter link {} ({})", family.name, pin.display()));
    }
    Ok(removed)
}

/// The kernel's view of our pinned netfilter links: (family, link info), for inspect and checks.
pub fn linked(links_dir: &Path) -> Vec<(Family, sys::LinkInfo)> {
    FAMILIES
        .iter()
        .filter_map(|family| {
            let pin = links_dir.join(format!("netfilter_{}", family.name));
            let fd = sys::obj_get(&pin).ok()?;
            sys::link_info(fd.as_fd()).ok().map(|info| (*family, info))
        })
        .collect()
}
