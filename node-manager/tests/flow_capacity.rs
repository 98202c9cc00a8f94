//! The flow map at and beyond its capacity, driven by the kernel (BPF_PROG_TEST_RUN on the
//! ingress and egress programs): below the documented capacity no flow is ever evicted and
//! every reply is translated; beyond it the least recently used flows are evicted, their
//! replies pass untranslated (`pass_no_flow`), the next TCP segment of such a flow counts as
//! `flow_lost` and re-creates it, and recently used flows survive. Needs root.
mod common;

use std::collections::{BTreeMap, BTreeSet};

use aya::programs::{TestRun as _, TestRunOptions};
use common::{
    capacity::{LRU_LOCAL_FREE_PER_CPU, documented_capacity, online_cpus, pin_to_cpu, possible_cpus},
    frames::{Spec, frame},
};
use node_manager::{
    kernel::Datapath,
    model::{FrontendAddr, Protocol, Target},
};
use node_manager_common::{FLOWS_MAX, FlowKey, program_names, v4_mapped};

const EXT: &str = "203.0.113.10";
const CLUSTER: &str = "198.51.100.10";
const SKB_CTX_LEN: usize = 192;

fn datapath() -> Datapath {
    let mut dp = Datapath::load_unpinned().expect("load the eBPF object (run as root)");
    let mut fe = BTreeMap::new();
    fe.insert(
        FrontendAddr { addr: EXT.parse().unwrap(), port: 8080, protocol: Protocol::Tcp },
        Target { cluster_ip: CLUSTER.parse().unwrap(), owner: "lab/web".into() },
    );
    dp.sync_frontends(&fe).unwrap();
    dp.sync_pod_cidrs(&BTreeSet::from(["192.0.2.0/25".parse().unwrap()])).unwrap();
    dp
}

/// The n-th flow: pod 192.0.2.(1 + n / 65535), source port 1 + n % 65535.
fn flow_addr(n: u32) -> ([u8; 4], u16) {
    ([192, 0, 2, 1 + (n / 65535) as u8], 1 + (n % 65535) as u16)
}

struct Frames {
    request: Vec<u8>,
    reply: Vec<u8>,
}

impl Frames {
    fn new(tcp_flags: u8) -> Frames {
        let mut request = frame(&Spec::tcp("192.0.2.1", 1, EXT, 8080));
        request[14 + 20 + 13] = tcp_flags;
        let reply = frame(&Spec::tcp(CLUSTER, 8080, "192.0.2.1", 1));
        Frames { request, reply }
    }

    /// The request of flow n (checksums are not fixed: the programs update them
    /// incrementally and never verify them).
    fn request(&mut self, n: u32) -> &[u8] {
        let (addr, port) = flow_addr(n);
        self.request[26..30].copy_from_slice(&addr);
        self.request[34..36].copy_from_slice(&port.to_be_bytes());
        &self.request
    }

    fn reply(&mut self, n: u32) -> &[u8] {
        let (addr, port) = flow_addr(n);
        self.reply[30..34].copy_from_slice(&addr);
        self.reply[36..38].copy_from_slice(&port.to_be_bytes());
        &self.reply
    }
}

/// Runs a program; returns the output frame.
fn run(dp: &mut Datapath, program: &str, input: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; input.len() + 64];
    let ctx_in = [0u8; SKB_CTX_LEN];
    let mut ctx_out = [0u8; SKB_CTX_LEN];
    let r = dp
        .program(program)
        .unwrap()
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
    out.truncate(r.data_size_out as usize);
    out
}

/// Whether the reply of flow n gets the external address back.
fn reply_translated(dp: &mut Datapath, frames: &mut Frames, n: u32) -> bool {
    let out = run(dp, program_names::POD_EGRESS, frames.reply(n));
    out[26..30] == [203, 0, 113, 10]
}

fn counters(dp: &Datapath) -> BTreeMap<&'static str, u64> {
    dp.counters().unwrap().into_iter().map(|(n, c)| (n, c.packets)).collect()
}

/// Inserts flows `range` through the ingress program, spreading the runs over every CPU (as
/// real traffic is), and every `touch_every` inserts runs one request of each flow in
/// `active` again (a live connection sending a segment).
fn insert(dp: &mut Datapath, frames: &mut Frames, range: std::ops::Range<u32>, active: &[u32], touch_every: u32) {
    let cpus = online_cpus();
    for n in range {
        if n.is_multiple_of(1000) {
            pin_to_cpu(cpus[(n / 1000) as usize % cpus.len()]);
        }
        run(dp, program_names::POD_INGRESS, frames.request(n));
        if touch_every > 0 && n % touch_every == 0 {
            for &a in active {
                run(dp, program_names::POD_INGRESS, frames.request(a));
            }
        }
    }
}

/// The flows map's key of flow n.
fn key(n: u32) -> FlowKey {
    let (addr, port) = flow_addr(n);
    FlowKey {
        pod_addr: v4_mapped(addr),
        remote_addr: v4_mapped([198, 51, 100, 10]),
        pod_port: u16::from_ne_bytes(port.to_be_bytes()),
        remote_port: u16::from_ne_bytes(8080u16.to_be_bytes()),
        proto: 6,
        pad: [0; 3],
    }
}

/// Which of flows `range` the map holds, read with syscalls (which, unlike the programs'
/// lookups, do not mark entries as used, so checking does not change what is evicted).
fn held(dp: &Datapath, range: std::ops::Range<u32>) -> Vec<bool> {
    let flows = dp.flows().unwrap();
    range.map(|n| flows.contains_key(&key(n))).collect()
}

#[test]
fn no_flow_is_evicted_up_to_the_documented_capacity_and_beyond_it_the_least_recently_used_go_first() {
    let capacity = documented_capacity();
    eprintln!("flow map: {FLOWS_MAX} entries, {} possible CPUs: documented capacity {capacity}", possible_cpus());
    let mut dp = datapath();
    let mut syn = Frames::new(0x02);
    // Flows 1000..1100 stay in use throughout (their replies and requests keep flowing).
    let active: Vec<u32> = (1000..1100).collect();

    // Up to the documented capacity: every flow stays, every reply is translated.
    insert(&mut dp, &mut syn, 0..capacity, &active, 0);
    let missing = held(&dp, 0..capacity).iter().filter(|h| !**h).count();
    assert_eq!(missing, 0, "flows evicted below the documented capacity");
    assert_eq!(dp.flow_count().unwrap(), capacity as usize);
    for &a in &active {
        assert!(reply_translated(&mut dp, &mut syn, a), "reply of flow {a}");
    }
    let c = counters(&dp);
    assert_eq!(
        (c["flow_created"], c["flow_lost"], c["flow_insert_failed"], c["pass_no_flow"]),
        (u64::from(capacity), 0, 0, 0)
    );

    // Beyond: 10% more new flows while the active ones keep being used. The map never holds
    // more than FLOWS_MAX; idle flows are evicted oldest first, the ones in use are not.
    let extra = FLOWS_MAX / 10;
    let total = capacity + extra;
    insert(&mut dp, &mut syn, capacity..total, &active, 500);
    let held_now = held(&dp, 0..total);
    let count = dp.flow_count().unwrap();
    assert_eq!(held_now.iter().filter(|h| **h).count(), count);
    assert!(count <= FLOWS_MAX as usize && count >= capacity as usize, "{count} flows held after overflow");
    let evicted: Vec<u32> = (0..total).filter(|&n| !held_now[n as usize]).collect();
    eprintln!(
        "{total} flows inserted, {count} held, {} evicted (first {:?}, last {:?})",
        evicted.len(),
        evicted.first(),
        evicted.last()
    );
    assert_eq!(evicted.len() + count, total as usize, "every flow is either held or evicted");
    assert!(!evicted.iter().any(|n| active.contains(n)), "a flow in use was evicted");
    // The evicted ones are the oldest idle ones: all of them among the first
    // (evicted + active + slack of one CPU-local batch per CPU) inserted.
    let oldest = evicted.len() as u32 + active.len() as u32 + LRU_LOCAL_FREE_PER_CPU * possible_cpus();
    assert!(evicted.iter().all(|&n| n < oldest), "evicted flows beyond the oldest {oldest}: last {:?}", evicted.last());

    // An evicted flow's reply passes untranslated and is counted; the next segment of that
    // TCP connection (no SYN) counts as lost and re-creates the flow.
    let before = counters(&dp);
    let victim = evicted[0];
    assert!(!reply_translated(&mut dp, &mut syn, victim));
    let mut ack = Frames::new(0x10);
    run(&mut dp, program_names::POD_INGRESS, ack.request(victim));
    assert!(reply_translated(&mut dp, &mut syn, victim));
    for &a in &active {
        assert!(reply_translated(&mut dp, &mut syn, a), "reply of flow {a} in use");
    }
    let after = counters(&dp);
    assert_eq!(after["pass_no_flow"] - before["pass_no_flow"], 1);
    assert_eq!(after["flow_lost"], 1, "{after:?}");
    assert_eq!(after["flow_insert_failed"], 0);
}
