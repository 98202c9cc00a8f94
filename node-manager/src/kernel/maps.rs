//! Typed access to the datapath maps and their reconciliation by diff: only entries that
//! differ are written, stale ones removed; a map is never flushed, so traffic keeps flowing
//! on entries that stay.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};

use anyhow::{Context as _, Result};
use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
};
use ipnet::IpNet;
use node_manager_common::{
    Counter, CounterIndex, DatapathConfig, Frontend, FrontendKey, Owner, POD_NETS_INLINE, POD_NETS_USE_TRIE,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, PodNet, PodNets, map_names, v4_mapped,
};

use crate::model::{FrontendAddr, Protocol, Target};

/// Counts of map writes made by one sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Entries wanted that the map had no room for (not written; retried at the next sync).
    pub not_fitting: usize,
}

/// What a sync did: its counts, the keys that did not fit, and what the map holds after it.
pub struct Synced<K, V> {
    pub stats: SyncStats,
    pub not_fitting: Vec<K>,
    pub now: BTreeMap<K, V>,
}

pub fn addr16(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

pub fn addr_from16(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn frontend_key(f: &FrontendAddr) -> FrontendKey {
    let proto = match (f.protocol, f.addr) {
        (Protocol::Tcp, _) => PROTO_TCP,
        (Protocol::Udp, _) => PROTO_UDP,
        (Protocol::IcmpEcho, IpAddr::V4(_)) => PROTO_ICMP,
        (Protocol::IcmpEcho, IpAddr::V6(_)) => PROTO_ICMPV6,
    };
    FrontendKey { addr: addr16(f.addr), port: f.port.to_be(), proto, pad: 0 }
}

/// Decodes a frontend key for display; `None` for a protocol this build never writes.
pub fn frontend_addr(k: &FrontendKey) -> Option<FrontendAddr> {
    let protocol = match k.proto {
        PROTO_TCP => Protocol::Tcp,
        PROTO_UDP => Protocol::Udp,
        PROTO_ICMP | PROTO_ICMPV6 => Protocol::IcmpEcho,
        _ => return None,
    };
    Some(FrontendAddr { addr: addr_from16(k.addr), port: u16::from_be(k.port), protocol })
}

pub fn cidr_key(net: &IpNet) -> Key<[u8; 16]> {
    match net {
        IpNet::V4(n) => Key::new(96 + u32::from(n.prefix_len()), v4_mapped(n.network().octets())),
        IpNet::V6(n) => Key::new(u32::from(n.prefix_len()), n.network().octets()),
    }
}

pub fn cidr_from_key(key: &Key<[u8; 16]>) -> Option<IpNet> {
    let (len, data) = (key.prefix_len(), key.data());
    match addr_from16(data) {
        IpAddr::V4(a) if len >= 96 => IpNet::new(IpAddr::V4(a), (len - 96) as u8).ok(),
        IpAddr::V4(_) => None,
        IpAddr::V6(a) => IpNet::new(IpAddr::V6(a), len as u8).ok(),
    }
}

pub type FrontendMap<T> = HashMap<T, FrontendKey, Frontend>;

pub fn frontends_of(map: &mut Map) -> Result<FrontendMap<&mut MapData>> {
    HashMap::try_from(map).context("NM_FRONTENDS has an unexpected type")
}

/// Reads every frontend currently in the map.
pub fn read_frontends<T: std::borrow::Borrow<MapData>>(
    map: &HashMap<T, FrontendKey, Frontend>,
) -> Result<BTreeMap<FrontendKey, Frontend>> {
    read_hash(map, map_names::FRONTENDS)
}

/// Reads every entry of a hash map.
pub fn read_hash<T: std::borrow::Borrow<MapData>, K: Pod + Ord, V: Pod>(
    map: &HashMap<T, K, V>,
    name: &str,
) -> Result<BTreeMap<K, V>> {
    read_hash_as(map, name, |v| *v)
}

/// Reads every entry of a hash map, keeping of each value what `keep` makes of it.
pub fn read_hash_as<T: std::borrow::Borrow<MapData>, K: Pod + Ord, V: Pod, D>(
    map: &HashMap<T, K, V>,
    name: &str,
    keep: impl Fn(&V) -> D,
) -> Result<BTreeMap<K, D>> {
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        match entry {
            Ok((k, v)) => {
                out.insert(k, keep(&v));
            }
            // An entry deleted while iterating: skip it, the next sync sees the rest.
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e).with_context(|| format!("iterating {name}")),
        }
    }
    Ok(out)
}

pub fn frontend_entries(desired: &BTreeMap<FrontendAddr, Target>) -> BTreeMap<FrontendKey, Frontend> {
    desired.iter().map(|(f, t)| (frontend_key(f), Frontend { cluster_addr: addr16(t.cluster_ip) })).collect()
}

/// An owner entry as the agent remembers having written it: a digest of its name, not its
/// 128 bytes (at 100,000 frontends the bytes were 13 MB per copy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerDigest(u64);

impl OwnerDigest {
    /// The name up to the first NUL, hashed (what `Owner::as_str` reads).
    pub fn of(owner: &Owner) -> OwnerDigest {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        owner.name_bytes().hash(&mut hasher);
        OwnerDigest(hasher.finish())
    }
}

/// The owner entries wanted for `desired`'s frontends other than `skip`: each as its digest and
/// the name the entry is made from when it has to be written.
pub fn owners_wanted<'a>(
    desired: &'a BTreeMap<FrontendAddr, Target>,
    skip: &BTreeSet<FrontendKey>,
) -> BTreeMap<FrontendKey, (OwnerDigest, &'a str)> {
    desired
        .iter()
        .map(|(f, t)| (frontend_key(f), t.owner.as_str()))
        .filter(|(k, _)| !skip.contains(k))
        .map(|(k, owner)| (k, (OwnerDigest::of(&Owner::new(owner)), owner)))
        .collect()
}

/// Makes the map hold exactly `want` (or all of it that fits), reading what it holds first
/// (repairs any drift).
pub fn sync_frontends(
    map: &mut FrontendMap<&mut MapData>,
    want: &BTreeMap<FrontendKey, Frontend>,
) -> Result<Synced<FrontendKey, Frontend>> {
    let have = read_frontends(map)?;
    sync_frontends_from(map, have, want)
}

/// Writes the differences between `have` (what the map is believed to hold) and `want`.
pub fn sync_frontends_from(
    map: &mut FrontendMap<&mut MapData>,
    have: BTreeMap<FrontendKey, Frontend>,
    want: &BTreeMap<FrontendKey, Frontend>,
) -> Result<Synced<FrontendKey, Frontend>> {
    sync_hash_from(map, have, want, |w| *w, |w| *w, |k| format!("frontend {:?}", frontend_addr(k)))
}

/// Writes the differences between `have` and `want` into a hash map keyed by frontend.
/// `have` holds each entry as it is remembered (`remembered` of a wanted one: the value
/// itself, or a digest of it); `value` is what is written. Removals come first: on a full map
/// the entries that go make room for those that come (a sync that added first would fail at
/// the first new key and never remove the stale ones). Entries the map has no room for are
/// skipped and returned, the rest is still written.
pub fn sync_hash_from<K: Pod + Ord, V: Pod, W, D: Copy + PartialEq>(
    map: &mut HashMap<&mut MapData, K, V>,
    have: BTreeMap<K, D>,
    want: &BTreeMap<K, W>,
    remembered: impl Fn(&W) -> D,
    value: impl Fn(&W) -> V,
    describe: impl Fn(&K) -> String,
) -> Result<Synced<K, D>> {
    let mut stats = SyncStats::default();
    let stale: Vec<K> = have.keys().filter(|k| !want.contains_key(k)).copied().collect();
    let mut now = have;
    for key in &stale {
        match map.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {
                stats.removed += 1;
                now.remove(key);
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", describe(key))),
        }
    }
    let mut not_fitting = Vec::new();
    for (key, wanted) in want {
        let remember = remembered(wanted);
        let found = now.get(key);
        if found == Some(&remember) {
            stats.unchanged += 1;
            continue;
        }
        let existed = found.is_some();
        match map.insert(key, value(wanted), 0) {
            Ok(()) => {
                if existed {
                    stats.changed += 1
                } else {
                    stats.added += 1
                }
                now.insert(*key, remember);
            }
            Err(e) if is_map_full(&e) => not_fitting.push(*key),
            Err(e) => return Err(e).with_context(|| format!("writing {}", describe(key))),
        }
    }
    stats.not_fitting = not_fitting.len();
    Ok(Synced { stats, not_fitting, now })
}

/// The kernel's answer to a new key in a full hash map (E2BIG; ENOMEM when a non-preallocated
/// map cannot allocate).
pub fn is_map_full(e: &aya::maps::MapError) -> bool {
    matches!(e, aya::maps::MapError::SyscallError(aya::sys::SyscallError { io_error, .. })
        if matches!(io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM)))
}

pub fn read_pod_cidrs<T: std::borrow::Borrow<MapData>>(map: &LpmTrie<T, [u8; 16], u8>) -> Result<BTreeSet<IpNet>> {
    let mut out = BTreeSet::new();
    for key in map.keys() {
        match key {
            Ok(k) => out.extend(cidr_from_key(&k)),
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(e).context("iterating NM_POD_CIDRS"),
        }
    }
    Ok(out)
}

pub fn sync_pod_cidrs(map: &mut Map, desired: &BTreeSet<IpNet>) -> Result<SyncStats> {
    let mut trie: LpmTrie<&mut MapData, [u8; 16], u8> =
        LpmTrie::try_from(map).context("NM_POD_CIDRS has an unexpected type")?;
    let have = read_pod_cidrs(&trie)?;
    let mut stats = SyncStats::default();
    for net in desired {
        if have.contains(net) {
            stats.unchanged += 1;
        } else {
            trie.insert(&cidr_key(net), 1, 0).with_context(|| format!("writing pod CIDR {net}"))?;
            stats.added += 1;
        }
    }
    for net in have.difference(desired) {
        match trie.remove(&cidr_key(net)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => stats.removed += 1,
            Err(e) => return Err(e).with_context(|| format!("removing pod CIDR {net}")),
        }
    }
    Ok(stats)
}

/// The pod CIDRs as the programs' loop reads them (`PodNets`): each as its network and mask
/// in the 16-byte form; more than fit, and the programs are told to walk the trie instead.
pub fn pod_nets(desired: &BTreeSet<IpNet>) -> PodNets {
    let mut out = PodNets::default();
    if desired.len() > POD_NETS_INLINE {
        out.count = POD_NETS_USE_TRIE;
        return out;
    }
    for (slot, net) in out.nets.iter_mut().zip(desired) {
        let key = cidr_key(net);
        let mask = u128::MAX.checked_shl(128 - key.prefix_len()).unwrap_or(0).to_be_bytes();
        let network: [u8; 16] = std::array::from_fn(|i| key.data()[i] & mask[i]);
        let halves = |b: [u8; 16]| {
            [
                u64::from_ne_bytes(b[..8].try_into().expect("8 bytes")),
                u64::from_ne_bytes(b[8..].try_into().expect("8 bytes")),
            ]
        };
        *slot = PodNet { addr: halves(network), mask: halves(mask) };
    }
    out.count = desired.len() as u32;
    out
}

/// Writes the pod CIDRs' loop form (one value: a reader sees the old or the new set, or for
/// the moment of the write a mix of the two; the CIDRs of a node do not change in its life).
pub fn write_pod_nets(map: &mut Map, desired: &BTreeSet<IpNet>) -> Result<()> {
    let mut array: Array<&mut MapData, PodNets> = Array::try_from(map).context("NM_POD_NETS has an unexpected type")?;
    let want = pod_nets(desired);
    if array.get(&0, 0).ok() != Some(want) {
        array.set(0, want, 0).context("writing NM_POD_NETS")?;
    }
    Ok(())
}

pub fn write_config(map: &mut Map, config: DatapathConfig) -> Result<()> {
    let mut array: Array<&mut MapData, DatapathConfig> =
        Array::try_from(map).context("NM_CONFIG has an unexpected type")?;
    if array.get(&0, 0).ok() != Some(config) {
        array.set(0, config, 0).context("writing NM_CONFIG")?;
    }
    Ok(())
}

pub fn read_config<T: std::borrow::Borrow<MapData>>(array: &Array<T, DatapathConfig>) -> Result<DatapathConfig> {
    array.get(&0, 0).context("reading NM_CONFIG")
}

/// Counter totals over all CPUs, by name, in `CounterIndex::ALL` order.
pub fn read_counters<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, Counter>,
) -> Result<Vec<(&'static str, Counter)>> {
    sum_per_cpu(array, CounterIndex::ALL.iter().map(|i| (*i as u32, i.name())))
}

/// The conntrack-INVALID drop's counters, summed over CPUs.
pub fn read_ct_counters<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, Counter>,
) -> Result<Vec<(&'static str, Counter)>> {
    sum_per_cpu(array, node_manager_common::CtCounterIndex::ALL.iter().map(|i| (*i as u32, i.name())))
}

fn sum_per_cpu<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, Counter>,
    indices: impl Iterator<Item = (u32, &'static str)>,
) -> Result<Vec<(&'static str, Counter)>> {
    let mut out = Vec::new();
    for (index, name) in indices {
        let per_cpu = array.get(&index, 0).with_context(|| format!("reading counter {name}"))?;
        let total = per_cpu.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        });
        out.push((name, total));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_16_byte_form() {
        for a in ["203.0.113.10", "2001:db8::1", "::ffff:0:0", "0.0.0.0"] {
            let ip: IpAddr = a.parse().unwrap();
            let back = addr_from16(addr16(ip));
            // ::ffff:0:0 is the mapped form of 0.0.0.0; both directions agree on the bytes.
            assert_eq!(addr16(back), addr16(ip), "{a}");
        }
    }

    #[test]
    fn frontend_keys_use_network_byte_order_and_family_icmp() {
        let k =
            frontend_key(&FrontendAddr { addr: "203.0.113.10".parse().unwrap(), port: 8080, protocol: Protocol::Tcp });
        assert_eq!(k.port.to_ne_bytes(), 8080u16.to_be_bytes());
        assert_eq!(k.addr[10..], [0xff, 0xff, 203, 0, 113, 10]);
        let echo6 =
            frontend_key(&FrontendAddr { addr: "2001:db8::1".parse().unwrap(), port: 0, protocol: Protocol::IcmpEcho });
        assert_eq!(echo6.proto, PROTO_ICMPV6);
        assert_eq!(frontend_addr(&echo6).unwrap().protocol, Protocol::IcmpEcho);
    }

    #[test]
    fn cidr_keys_round_trip_both_families() {
        for c in ["192.0.2.0/25", "10.0.0.0/8", "2001:db8:1::/64", "0.0.0.0/0"] {
            let net: IpNet = c.parse().unwrap();
            assert_eq!(cidr_from_key(&cidr_key(&net)), Some(net), "{c}");
        }
        assert_eq!(cidr_key(&"192.0.2.0/25".parse().unwrap()).prefix_len(), 96 + 25);
    }
}
