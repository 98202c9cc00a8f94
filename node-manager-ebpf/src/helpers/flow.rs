//! Rewritten flows, remembered so that replies can be given back the external source address.
//! An LRU map: idle flows age out by themselves when the map is full.
use aya_ebpf::{btf_maps::LruHashMap, macros::btf_map};
use node_manager_common::{FLOWS_MAX, Flow, FlowKey};

use crate::helpers::parse::Packet;

#[btf_map]
static NM_FLOWS: LruHashMap<FlowKey, Flow, { FLOWS_MAX as usize }> = LruHashMap::new();

/// Key of a flow from the pod's point of view, built from a packet sent by the pod
/// (after its destination was rewritten to `remote`).
#[inline(always)]
pub fn key_from_pod(pkt: &Packet, remote: [u8; 16]) -> FlowKey {
    FlowKey {
        pod_addr: pkt.saddr,
        remote_addr: remote,
        pod_port: pkt.sport,
        remote_port: pkt.dport,
        proto: pkt.proto,
        pad: [0; 3],
    }
}

/// Key of the flow a packet going to the pod belongs to.
#[inline(always)]
pub fn key_to_pod(pkt: &Packet) -> FlowKey {
    FlowKey {
        pod_addr: pkt.daddr,
        remote_addr: pkt.saddr,
        pod_port: pkt.dport,
        remote_port: pkt.sport,
        proto: pkt.proto,
        pad: [0; 3],
    }
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
    // SAFETY: read once and compared; a concurrent eviction only causes a redundant insert.
    let found = match unsafe { NM_FLOWS.get(key) } {
        Some(f) if f.external_addr == external_addr => return Ok(Remembered::Known),
        Some(_) => Remembered::Replaced,
        None => Remembered::Created,
    };
    NM_FLOWS.insert(key, Flow { external_addr }, 0).map(|_| found)
}

/// Removes the flow remembered under `key`, if any; whether there was one. A lookup first:
/// it takes no lock, and the tuple is almost never remembered.
#[inline(always)]
pub fn forget(key: &FlowKey) -> bool {
    // SAFETY: only tested for presence.
    unsafe { NM_FLOWS.get(key) }.is_some() && NM_FLOWS.remove(key).is_ok()
}

#[inline(always)]
pub fn external_addr(key: &FlowKey) -> Option<[u8; 16]> {
    // SAFETY: copied out immediately.
    unsafe { NM_FLOWS.get(key) }.map(|f| f.external_addr)
}
