//! Per-CPU packet/byte counters: the datapath counts instead of logging.
use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map, programs::TcContext};
use node_manager_common::{COUNTERS_LEN, Counter, CounterIndex};

#[btf_map]
static NM_COUNTERS: PerCpuArray<Counter, { COUNTERS_LEN as usize }> = PerCpuArray::new();

/// The one counter increment: one more packet (or event) in `slot`, and `bytes` more bytes
/// when given (hooks without a packet pass `None` and leave the byte count alone).
#[inline(always)]
pub fn add(slot: Option<*mut Counter>, bytes: Option<u64>) {
    if let Some(counter) = slot {
        // SAFETY: per-CPU slot, valid for the program's run; no other writer on this CPU.
        unsafe {
            (*counter).packets += 1;
            if let Some(bytes) = bytes {
                (*counter).bytes += bytes;
            }
        }
    }
}

#[inline(always)]
pub fn count(ctx: &TcContext, index: CounterIndex) {
    add(NM_COUNTERS.get_ptr_mut(index as u32), Some(u64::from(ctx.len())));
}

/// Counts one event of a hook that has no packet (socket-address hooks): bytes stay 0.
#[inline(always)]
pub fn count_event(index: CounterIndex) {
    add(NM_COUNTERS.get_ptr_mut(index as u32), None);
}
