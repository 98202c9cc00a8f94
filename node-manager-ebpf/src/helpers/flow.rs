//! Rewritten flows, remembered so that replies can be given back the external source address.
//! LRU maps: idle flows age out by themselves when a map is full. TCP flows and datagram (UDP,
//! ICMP echo) flows have a map each: a burst of short datagram flows, one per source port,
//! must not evict the entry of an idle TCP connection, whose next reply would then reach the
//! pod untranslated and be reset. A TCP flow also ends at a RST (`forget`).
use aya_ebpf::{btf_maps::LruHashMap, macros::btf_map};
use node_manager_common::{FLOWS_DGRAM_MAX, FLOWS_MAX, Flow, FlowKey, PROTO_TCP};

use crate::helpers::parse::Packet;

#[btf_map]
static NM_FLOWS: LruHashMap<FlowKey, Flow, { FLOWS_MAX as usize }> = LruHashMap::new();

#[btf_map]
static NM_FLOWS_DGRAM: LruHashMap<FlowKey, Flow, { FLOWS_DGRAM_MAX as usize }> = LruHashMap::new();

/// Runs `$body` with `$map` bound to the flow map of `$key`'s protocol. Two call sites rather
/// than one call on a selected map pointer, so each lookup keeps the verifier's inlining.
macro_rules! with_flow_map {
    ($key:expr, |$map:ident| $body:expr) => {
        if $key.proto == PROTO_TCP {
            let $map = &NM_FLOWS;
            $body
        } else {
            let $map = &NM_FLOWS_DGRAM;
            $body
        }
    };
}

/// Key of a flow from the pod's point of view, built from a packet sent by the pod
/// (after its destination was rewritten to `remote`).
#[inline(always)]
pub fn key_from_pod(pkt: &Packet, remote: [u8; 16]) -> FlowKey {
    key(pkt.saddr, remote, pkt.sport, pkt.dport, pkt.proto)
}

/// Key of the flow a packet going to the pod belongs to.
#[inline(always)]
pub fn key_to_pod(pkt: &Packet) -> FlowKey {
    key(pkt.daddr, pkt.saddr, pkt.dport, pkt.sport, pkt.proto)
}

/// A flow key with its padding zeroed by one 4-byte store with the protocol: a 3-byte array
/// of zeros compiles to a call of `memset` (a BPF-to-BPF call), and a program with such calls
/// may not tail-call on kernels whose JIT lacks it (arm64 before 6.0).
#[inline(always)]
pub fn key(pod_addr: [u8; 16], remote_addr: [u8; 16], pod_port: u16, remote_port: u16, proto: u8) -> FlowKey {
    let mut key = FlowKey { pod_addr, remote_addr, pod_port, remote_port, proto: 0, pad: [0; 3] };
    // SAFETY: `proto` and `pad` are the struct's last 4 bytes (repr(C), checked by the
    // size assertions in node-manager-common), 4-aligned.
    unsafe { core::ptr::addr_of_mut!(key.proto).cast::<u32>().write_unaligned(u32::from_ne_bytes([proto, 0, 0, 0])) };
    key
}

/// What `remember` found.
pub enum Remembered {
    /// The same entry was there: nothing written.
    Known,
    /// No entry: one was created.
    Created,
    /// An entry with another external address (the pod's port reused towards another
    /// external address of the same cluster IP): replaced.
    Replaced,
}

/// Remembers the flow; writes only when it is new or its external address changed, so a
/// long-lived flow costs one lookup per packet, not one map write.
#[inline(always)]
pub fn remember(key: &FlowKey, external_addr: [u8; 16]) -> Result<Remembered, i32> {
    with_flow_map!(key, |flows| {
        // SAFETY: read once and compared; a concurrent eviction only causes a redundant insert.
        let found = match unsafe { flows.get(key) } {
            Some(f) if f.external_addr == external_addr => return Ok(Remembered::Known),
            Some(_) => Remembered::Replaced,
            None => Remembered::Created,
        };
        flows.insert(key, Flow { external_addr }, 0).map(|_| found)
    })
}

/// Removes the flow remembered under `key`, if any; whether there was one. A lookup first:
/// it takes no lock, and the tuple is almost never remembered.
#[inline(always)]
pub fn forget(key: &FlowKey) -> bool {
    // SAFETY: only tested for presence.
    with_flow_map!(key, |flows| unsafe { flows.get(key) }.is_some() && flows.remove(key).is_ok())
}

#[inline(always)]
pub fn external_addr(key: &FlowKey) -> Option<[u8; 16]> {
    // SAFETY: copied out immediately.
    with_flow_map!(key, |flows| unsafe { flows.get(key) }.map(|f| f.external_addr))
}
