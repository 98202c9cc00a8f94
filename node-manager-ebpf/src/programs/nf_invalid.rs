//! Conntrack-INVALID drop on the LOCAL_IN netfilter hooks (kubernetes#74839).
//!
//! A reply conntrack marks INVALID is not de-NATed, reaches the host's own stack, and the host
//! answers with an RST that kills a pod's masqueraded connection. These programs run after
//! conntrack and drop such packets, using conntrack's own verdict: `skb->_nfct == 0` after
//! conntrack has seen the packet is exactly iptables' `--ctstate INVALID` (untracked packets carry
//! IP_CT_UNTRACKED, non-zero, and pass).
//!
//! The programs are BPF_PROG_TYPE_NETFILTER. aya 0.14 knows neither the section nor the program
//! type, so they live in a section aya parses but never loads here ("socket"); the agent relocates
//! and loads them itself (see the agent's `datapath::netfilter`). Field offsets of `struct sk_buff`
//! come from the running kernel's BTF through `NM_CT_CONFIG`.
use crate::helpers::counters;
use aya_ebpf::{
    btf_maps::{Array, PerCpuArray},
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::btf_map,
};
use node_manager_common::{CT_COUNTERS_LEN, CT_FAMILY_V4, CT_FAMILY_V6, Counter, CtConfig, CtCounterIndex};

const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;

/// Refresh the "conntrack seen" timestamp at most this often (one shared cache line).
const SEEN_REFRESH_NS: u64 = 100_000_000;

#[btf_map]
static NM_CT_CONFIG: Array<CtConfig, 1> = Array::new();

/// Per family: bpf_ktime_get_ns when conntrack last tracked a packet on this hook.
#[btf_map]
static NM_CT_SEEN: Array<u64, 2> = Array::new();

#[btf_map]
static NM_CT_COUNTERS: PerCpuArray<Counter, { CT_COUNTERS_LEN as usize }> = PerCpuArray::new();

/// `struct bpf_nf_ctx`, the context of a netfilter program.
#[repr(C)]
pub struct NfCtx {
    state: *const u8,
    skb: *const u8,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "socket")]
pub extern "C" fn nm_drop_invalid4(ctx: *mut NfCtx) -> i32 {
    verdict(ctx, CT_FAMILY_V4)
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "socket")]
pub extern "C" fn nm_drop_invalid6(ctx: *mut NfCtx) -> i32 {
    verdict(ctx, CT_FAMILY_V6)
}

#[inline(always)]
fn verdict(ctx: *mut NfCtx, family: u32) -> i32 {
    let Some(config) = NM_CT_CONFIG.get(0) else { return NF_ACCEPT };
    if config.nfct_offset == 0 {
        return NF_ACCEPT;
    }
    // SAFETY: the kernel hands a valid context; `skb` is read as the pointer value only.
    let skb = unsafe { (*ctx).skb };
    // SAFETY: bpf_probe_read_kernel checks the address; a failed read accepts the packet.
    let Ok(nfct) = (unsafe { bpf_probe_read_kernel(skb.wrapping_add(config.nfct_offset as usize) as *const u64) })
    else {
        return NF_ACCEPT;
    };
    let Some(seen) = NM_CT_SEEN.get_ptr_mut(family) else { return NF_ACCEPT };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: array slot valid for the program's run; racing writers store equally good values.
    let last_seen = unsafe { *seen };
    if nfct != 0 {
        if now.saturating_sub(last_seen) > SEEN_REFRESH_NS {
            // SAFETY: as above.
            unsafe { *seen = now };
        }
        return NF_ACCEPT;
    }
    let len = unsafe { bpf_probe_read_kernel(skb.wrapping_add(config.len_offset as usize) as *const u32) }.unwrap_or(0);
    if now.saturating_sub(last_seen) > u64::from(config.tracked_window_ms) * 1_000_000 {
        count(CtCounterIndex::UnverifiedV4 as u32 + family, len);
        return NF_ACCEPT;
    }
    count(CtCounterIndex::DroppedV4 as u32 + family, len);
    NF_DROP
}

#[inline(always)]
fn count(index: u32, len: u32) {
    counters::add(NM_CT_COUNTERS.get_ptr_mut(index), Some(u64::from(len)));
}
