//! Socket-reverse entries: which external address a host socket dialled, per (socket cookie,
//! cluster address, port), so `recvmsg`/`getpeername` can show it again (LRU: closed sockets'
//! entries age out).
use aya_ebpf::{btf_maps::LruHashMap, macros::btf_map};
use node_manager_common::{SOCK_REV_MAX, SockRev, SockRevKey};

#[btf_map]
static NM_SOCK_REV: LruHashMap<SockRevKey, SockRev, { SOCK_REV_MAX as usize }> = LruHashMap::new();

/// Remembers `external_addr` under `key`, writing only what is new (unconnected UDP sends
/// every datagram through here). Err if the map update failed.
#[inline(always)]
pub fn remember(key: SockRevKey, external_addr: [u8; 16]) -> Result<(), i64> {
    // SAFETY: read once and compared; a concurrent eviction only causes a redundant insert.
    let known = unsafe { NM_SOCK_REV.get(key) }.is_some_and(|r| r.external_addr == external_addr);
    if !known {
        NM_SOCK_REV.insert(key, SockRev { external_addr }, 0).map_err(i64::from)?;
    }
    Ok(())
}

/// The external address remembered under `key`, if any.
#[inline(always)]
pub fn external_addr(key: SockRevKey) -> Option<[u8; 16]> {
    // SAFETY: copied out immediately.
    unsafe { NM_SOCK_REV.get(key) }.map(|r| r.external_addr)
}
