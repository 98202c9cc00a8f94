//! Per-CPU packet/byte counters: the datapath counts instead of logging.
use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map, programs::TcContext};
use node_manager_common::{COUNTERS_LEN, Counter, CounterIndex};

#[btf_map]
static NM_COUNTERS: PerCpuArray<Counter, { COUNTERS_LEN as usize }> = PerCpuArray::new();

#[inline(always)]
pub fn count(ctx: &TcContext, index: CounterIndex) {
    if let Some(counter) = NM_COUNTERS.get_ptr_mut(index as u32) {
        // SAFETY: per-CPU slot, valid for the program's run; no other writer on this CPU.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(ctx.len());
        }
    }
}

/// Counts one event of a hook that has no packet (socket-address hooks): bytes stay 0.
#[inline(always)]
pub fn count_event(index: CounterIndex) {
    if let Some(counter) = NM_COUNTERS.get_ptr_mut(index as u32) {
        // SAFETY: per-CPU slot, valid for the program's run; no other writer on this CPU.
        unsafe { (*counter).packets += 1 };
    }
}
