//! Reading header bytes: the one bounds check the verifier is shown for direct packet access.
//!
//! A header at a constant offset in the skb's linear area (every header of a packet the stack
//! built, in practice) is read in place after a comparison against `data_end`; one beyond it (a non-linear skb whose
//! headers sit in its fragments) through `bpf_skb_load_bytes`, which copies from anywhere in
//! the skb. A helper call per header cost about 10 ns each on the hit path; the comparison
//! costs nothing measurable. Never a `bpf_skb_pull_data`: that would make the skb writable,
//! a copy for every cloned TCP segment, to save a copy of a few bytes. Writes stay with the
//! store and checksum helpers (see [`super::rewrite`]), so no program needs direct write
//! access, and the verifier adds no unclone prologue to every packet.
use core::mem::size_of;

use aya_ebpf::programs::TcContext;

/// The `T` at byte `off` of the packet, if the packet is that long. `off` must be a constant
/// (see [`load`]).
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + off + size_of::<T>() <= end {
        // SAFETY: `off .. off + size_of::<T>()` is inside the linear area (checked just above,
        // in the form the verifier follows); any alignment is fine for a plain read of bytes.
        return Some(unsafe { ((start + off) as *const T).read_unaligned() });
    }
    ctx.load::<T>(off).ok()
}

/// The `T` at byte `off` of the packet, for an offset known only at run time (IPv6's transport
/// header, behind a variable number of extension headers): always `bpf_skb_load_bytes`. A
/// packet pointer plus a register is refused to a loader without CAP_PERFMON (the verifier's
/// Spectre v1 hardening sanitizes that arithmetic only for stack and map pointers), and the
/// agent runs without it when the INVALID drop is not in `bpf` mode.
#[inline(always)]
pub fn load<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}
