//! Fragmented datagrams of rewritten flows. Only the first fragment carries the ports that
//! decide a rewrite; it is rewritten as any packet and leaves here, under its datagram's
//! reassembly key as it arrived (source, destination, identification, protocol), the address
//! it was given. Later fragments carry that key and no ports, and get the same address. An LRU
//! map: a datagram's fragments follow each other closely. A later fragment that overtakes its
//! first finds nothing and passes untouched (the datagram is then lost, as it would be without
//! the rewrite's help), as in Cilium's fragment tracking.
use aya_ebpf::{btf_maps::LruHashMap, macros::btf_map};
use node_manager_common::{FRAGS_MAX, FragKey, FragTarget};

use crate::helpers::parse::Packet;

#[btf_map]
static NM_FRAGS: LruHashMap<FragKey, FragTarget, { FRAGS_MAX as usize }> = LruHashMap::new();

#[inline(always)]
fn key(pkt: &Packet) -> FragKey {
    let mut key = FragKey { saddr: pkt.saddr, daddr: pkt.daddr, id: pkt.frag_id, proto: 0, pad: [0; 3] };
    // The padding zeroed with the protocol in one store, as in `flow::key` (no memset call).
    // SAFETY: `proto` and `pad` are the struct's last 4 bytes (repr(C)), 4-aligned.
    unsafe {
        core::ptr::addr_of_mut!(key.proto).cast::<u32>().write_unaligned(u32::from_ne_bytes([pkt.proto, 0, 0, 0]))
    };
    key
}

/// Remembers what the first fragment `pkt` (as parsed, before the rewrite) was rewritten to.
#[inline(always)]
pub fn remember(pkt: &Packet, addr: [u8; 16]) {
    // A failed insert only loses the later fragments of this datagram; nothing to undo.
    let _ = NM_FRAGS.insert(key(pkt), FragTarget { addr }, 0);
}

/// The address the first fragment of `pkt`'s datagram was rewritten to, if it was.
#[inline(always)]
pub fn target(pkt: &Packet) -> Option<[u8; 16]> {
    // SAFETY: copied out immediately.
    unsafe { NM_FRAGS.get(key(pkt)) }.map(|t| t.addr)
}
