//! What the running kernel is, for tests whose expectation depends on it (the kernel matrix runs
//! every test on 5.10, 6.1, 6.12 and newer).
#![allow(dead_code)]

/// (major, minor) of the running kernel.
pub fn version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
    let mut next = || parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (next(), next())
}

pub fn at_least(major: u32, minor: u32) -> bool {
    version() >= (major, minor)
}

/// TCX (Linux ≥ 6.6): else pod interfaces get netlink cls_bpf filters.
pub fn has_tcx() -> bool {
    at_least(6, 6)
}

/// BPF netfilter links (Linux ≥ 6.4): else the INVALID drop falls back to nftables/iptables.
pub fn has_netfilter_links() -> bool {
    at_least(6, 4)
}
