//! Socket-reverse entries: which external address a host socket dialled, per (socket cookie,
//! cluster address, port), so `recvmsg`/`getpeername` can show it again. A connected socket's
//! entry is removed when the socket is released (`sock_release`); the entries of unconnected
//! UDP sends, which the release cannot name, age out of the LRU.
use aya_ebpf::{btf_maps::LruHashMap, macros::btf_map};
use node_manager_common::{SOCK_REV_MAX, SockRev, SockRevKey};

#[btf_map]
static NM_SOCK_REV: LruHashMap<SockRevKey, SockRev, { SOCK_REV_MAX as usize }> = LruHashMap::new();

/// The key of a socket's redirected peer, its padding zeroed by one 8-byte store with the
/// port (as `flow::key` does: a 6-byte array of zeros would compile to a `memset` call, a
/// BPF-to-BPF call the verifier refuses a loader without CAP_PERFMON).
#[inline(always)]
pub fn key(cookie: u64, cluster_addr: [u8; 16], port: u16) -> SockRevKey {
    let mut key = SockRevKey { cookie, cluster_addr, port: 0, pad: [0; 6] };
    // SAFETY: `port` and `pad` are the struct's last 8 bytes (repr(C)), 8-aligned.
    unsafe {
        core::ptr::addr_of_mut!(key.port).cast::<u64>().write_unaligned({
            let [lo, hi] = port.to_ne_bytes();
            u64::from_ne_bytes([lo, hi, 0, 0, 0, 0, 0, 0])
        })
    };
    key
}

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

/// Removes the entry under `key`; whether there was one. A lookup first: it takes no lock, and
/// most released sockets never had one.
#[inline(always)]
pub fn forget(key: SockRevKey) -> bool {
    // SAFETY: only tested for presence.
    unsafe { NM_SOCK_REV.get(key) }.is_some() && NM_SOCK_REV.remove(key).is_ok()
}
