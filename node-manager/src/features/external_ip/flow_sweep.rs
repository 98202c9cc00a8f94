//! The flow sweep: a rewritten flow lives as long as the node's conntrack tracks its
//! connection. The flow maps are LRU maps, so without a sweep an entry ends only when a full map
//! evicts it, and a busy node's maps sit full with closed connections. Conntrack already knows
//! when each connection ended (FIN and TIME_WAIT, RST, and its idle timeouts per protocol and
//! state, which the operator tunes with the `nf_conntrack_*_timeout*` sysctls), and every
//! rewritten packet passes it right after the pod interface (the rewrite turns the external
//! address into the cluster IP that kube-proxy's DNAT needs tracked), so its table is the
//! reference: a flow whose tuple it no longer holds is over.
//!
//! [`FlowSweep`] is the pure part: which flows to forget, given the flows in the maps and which
//! of them conntrack tracks; [`sweep_once`] reads both (a ctnetlink dump, then the maps) and deletes.
//! Rules, each for a reason:
//! - a flow is forgotten only when it was untracked at **two consecutive sweeps**: a flow the
//!   datapath has just created may not have reached conntrack yet when the table is dumped;
//! - a family whose dump failed is not swept, and its suspects are dropped, so that the next
//!   sweep cannot delete on one observation;
//! - a family none of whose flows is tracked is not swept: the agent is not in the network
//!   namespace that tracks them, or the node does not track that traffic (a `notrack` rule):
//!   then conntrack is no reference, and the LRU alone ages the flows, as before.
//!
//! The sweep runs on a thread of its own with its own map fds, so that reading a busy node's
//! tables (hundreds of thousands of entries each) never delays the agent loop. It keeps 64-bit
//! hashes of tuples rather than the 40-byte keys, and never holds all the flow keys at once. (A
//! collision of two hashes can only keep an untracked flow one sweep longer, or forget an
//! untracked one a sweep early.)
use std::{
    collections::HashSet,
    hash::{BuildHasher, RandomState},
};

use anyhow::Result;
use node_manager_common::{FlowKey, is_v4_mapped};

use crate::kernel::{FlowMaps, conntrack};

/// What the conntrack dump of each family found (IPv4, IPv6): the hashes of its tuples, or
/// `None` when the dump failed.
pub type Tracked = [Option<HashSet<u64>>; 2];

/// Flows seen untracked at the last sweep, by hash.
#[derive(Debug, Default)]
pub struct FlowSweep {
    hasher: RandomState,
    suspects: HashSet<u64>,
}

fn family(key: &FlowKey) -> usize {
    usize::from(!is_v4_mapped(&key.pod_addr))
}

impl FlowSweep {
    /// The hash a conntrack tuple or a flow key is compared by.
    pub fn hash(&self, key: &FlowKey) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The flows to forget now, among `flows` (the flow maps, read after conntrack was
    /// dumped); remembers the untracked ones for the next sweep.
    pub fn sweep(&mut self, flows: impl IntoIterator<Item = FlowKey>, tracked: &Tracked) -> Vec<FlowKey> {
        let mut any_tracked = [false; 2];
        let mut forget: [Vec<FlowKey>; 2] = Default::default();
        let mut suspects: [HashSet<u64>; 2] = Default::default();
        for key in flows {
            let family = family(&key);
            let Some(tracked) = &tracked[family] else { continue };
            let hash = self.hash(&key);
            if tracked.contains(&hash) {
                any_tracked[family] = true;
            } else if self.suspects.contains(&hash) {
                forget[family].push(key);
            } else {
                suspects[family].insert(hash);
            }
        }
        // A family without one tracked flow is not conntrack's to judge (module doc).
        let [forget4, forget6] = forget;
        let [suspects4, suspects6] = suspects;
        self.suspects = HashSet::new();
        let mut out = Vec::new();
        for (family, forget, suspects) in [(0, forget4, suspects4), (1, forget6, suspects6)] {
            if any_tracked[family] {
                out.extend(forget);
                self.suspects.extend(suspects);
            }
        }
        out
    }

    /// Flows untracked at the last sweep, to be forgotten at the next if still untracked.
    pub fn suspects(&self) -> usize {
        self.suspects.len()
    }
}

/// One sweep: conntrack first, then the flow maps (a flow created in between is merely
/// untracked once), then the removals. Returns the flows removed.
pub fn sweep_once(model: &mut FlowSweep, maps: &mut FlowMaps) -> Result<usize> {
    if maps.is_empty() {
        return Ok(0);
    }
    let mut tracked: Tracked = [None, None];
    for (v6, tracked) in [false, true].into_iter().zip(&mut tracked) {
        let mut hashes = HashSet::new();
        match conntrack::for_each_original_tuple(v6, |key| {
            hashes.insert(model.hash(&key));
        }) {
            Ok(_) => *tracked = Some(hashes),
            Err(e) => tracing::warn!(
                family = if v6 { "IPv6" } else { "IPv4" },
                error = %e,
                "flow sweep: could not read the conntrack table (is nf_conntrack loaded? the agent needs CAP_NET_ADMIN); its flows are kept"
            ),
        }
    }
    let forget = model.sweep(maps.keys(), &tracked);
    if forget.is_empty() { Ok(0) } else { maps.remove(&forget) }
}

#[cfg(test)]
mod tests {
    use node_manager_common::{PROTO_TCP, PROTO_UDP, v4_mapped};

    use super::*;

    fn flow(v6: bool, port: u16, proto: u8) -> FlowKey {
        let pod_addr = if v6 {
            "2001:db8:1::10".parse::<std::net::Ipv6Addr>().unwrap().octets()
        } else {
            v4_mapped([192, 0, 2, 10])
        };
        FlowKey {
            pod_addr,
            remote_addr: v4_mapped([198, 51, 100, 10]),
            pod_port: port,
            remote_port: 80,
            proto,
            pad: [0; 3],
        }
    }

    fn sweep(model: &mut FlowSweep, flows: &[FlowKey], tracked: &[FlowKey], dumped: [bool; 2]) -> Vec<FlowKey> {
        // A dump holds every tracked tuple of its family, ours or not.
        let hashes: HashSet<u64> = tracked.iter().map(|k| model.hash(k)).chain([1, 2, 3]).collect();
        let tracked: Tracked = dumped.map(|ok| ok.then(|| hashes.clone()));
        let mut forget = model.sweep(flows.iter().copied(), &tracked);
        forget.sort_by_key(|k| (k.pod_addr, k.pod_port, k.proto));
        forget
    }

    #[test]
    fn a_flow_is_forgotten_after_two_consecutive_sweeps_without_its_conntrack_entry() {
        let (open, closed) = (flow(false, 1000, PROTO_TCP), flow(false, 1001, PROTO_UDP));
        let mut model = FlowSweep::default();
        let flows = [open, closed];
        // Both tracked: nothing.
        assert!(sweep(&mut model, &flows, &flows, [true, true]).is_empty());
        // `closed` ended: suspect first, forgotten at the next sweep.
        assert!(sweep(&mut model, &flows, &[open], [true, true]).is_empty());
        assert_eq!(model.suspects(), 1);
        assert_eq!(sweep(&mut model, &flows, &[open], [true, true]), [closed]);
        // Once forgotten it is no longer in the maps; nothing is left to forget.
        assert!(sweep(&mut model, &[open], &[open], [true, true]).is_empty());
        assert_eq!(model.suspects(), 0);
    }

    #[test]
    fn a_flow_tracked_again_in_between_is_kept() {
        let (open, new) = (flow(false, 1000, PROTO_TCP), flow(false, 1002, PROTO_TCP));
        let mut model = FlowSweep::default();
        // `new` was created just before the dump and is not tracked yet.
        assert!(sweep(&mut model, &[open, new], &[open], [true, true]).is_empty());
        // Tracked at the next sweep: kept, and no longer a suspect.
        assert!(sweep(&mut model, &[open, new], &[open, new], [true, true]).is_empty());
        assert_eq!(model.suspects(), 0);
        // Untracked once more: it needs two sweeps again.
        assert!(sweep(&mut model, &[open, new], &[open], [true, true]).is_empty());
        assert_eq!(sweep(&mut model, &[open, new], &[open], [true, true]), [new]);
    }

    #[test]
    fn a_failed_dump_sweeps_nothing_of_its_family_and_resets_its_suspects() {
        let (open4, gone4) = (flow(false, 1000, PROTO_TCP), flow(false, 1001, PROTO_TCP));
        let (open6, gone6) = (flow(true, 1000, PROTO_TCP), flow(true, 1001, PROTO_TCP));
        let flows = [open4, gone4, open6, gone6];
        let tracked = [open4, open6];
        let mut model = FlowSweep::default();
        assert!(sweep(&mut model, &flows, &tracked, [true, true]).is_empty());
        // The IPv6 dump fails: IPv4 is swept, IPv6 is not, and its suspect is dropped.
        assert_eq!(sweep(&mut model, &flows, &tracked, [true, false]), [gone4]);
        assert_eq!(model.suspects(), 0);
        // One good dump is not enough after the failure: two are.
        assert!(sweep(&mut model, &[open4, open6, gone6], &tracked, [true, true]).is_empty());
        assert_eq!(sweep(&mut model, &[open4, open6, gone6], &tracked, [true, true]), [gone6]);
    }

    #[test]
    fn a_family_with_no_tracked_flow_is_not_swept() {
        // The agent is in another namespace than the one tracking the flows, or the node has a
        // notrack rule for them: conntrack holds none of them, and none is forgotten.
        let flows: Vec<FlowKey> = (0..100).map(|p| flow(false, p, PROTO_UDP)).collect();
        let tracked6 = flow(true, 1, PROTO_TCP);
        let mut all = flows.clone();
        all.push(tracked6);
        let mut model = FlowSweep::default();
        for _ in 0..3 {
            assert!(sweep(&mut model, &all, &[tracked6], [true, true]).is_empty());
        }
        assert_eq!(model.suspects(), 0);
        // Once one IPv4 flow is tracked, the untracked ones are conntrack's to judge.
        assert!(sweep(&mut model, &all, &[tracked6, flows[0]], [true, true]).is_empty());
        assert_eq!(sweep(&mut model, &all, &[tracked6, flows[0]], [true, true]), flows[1..]);
    }

    #[test]
    fn nothing_is_forgotten_without_flows_or_with_everything_tracked() {
        let mut model = FlowSweep::default();
        assert!(sweep(&mut model, &[], &[], [true, true]).is_empty());
        let flows: Vec<FlowKey> = (0..1000).map(|p| flow(p % 2 == 0, p, PROTO_TCP)).collect();
        for _ in 0..3 {
            assert!(sweep(&mut model, &flows, &flows, [true, true]).is_empty());
        }
    }
}
