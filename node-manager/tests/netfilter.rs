//! The conntrack-INVALID drop programs, loaded through the agent's own bpf(2) shim and run by the
//! kernel on crafted packets (BPF_PROG_TEST_RUN for BPF_PROG_TYPE_NETFILTER). A test-run skb has
//! no conntrack entry (`_nfct == 0`), which is exactly what an INVALID packet looks like, so this
//! shows the verdict logic and its guard; the network-namespace tests show it on real conntrack.
//! Needs root. Nothing is linked to a hook here.
mod common;

use std::{os::fd::AsFd as _, path::Path};

use aya::maps::{Array, MapData};
use common::{
    bpffs::Bpffs,
    frames::{Spec, frame},
};
use node_manager::kernel::{Datapath, btf, netfilter, pins::Pins, sys};
use node_manager_common::{CtConfig, map_names};

const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;

fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime into a local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn set_seen(bpffs: &Path, family: u32, when: u64) {
    let data = MapData::from_pin(Pins::new(bpffs).map(map_names::CT_SEEN)).unwrap();
    let mut seen: Array<_, u64> = Array::try_from(aya::maps::Map::Array(data)).unwrap();
    seen.set(family, when, 0).unwrap();
}

/// `struct nf_hook_state` as BPF_PROG_TEST_RUN takes it: only `hook` and `pf` may be set.
fn hook_state(pf: u8) -> Vec<u8> {
    let mut ctx = vec![0u8; 48];
    ctx[0] = sys::NF_INET_LOCAL_IN as u8;
    ctx[1] = pf;
    ctx
}

#[test]
fn drops_untracked_looking_packets_only_while_conntrack_is_seen_active() {
    let bpffs = Bpffs::new();
    let mut dp = Datapath::load_pinned(&bpffs.0).expect("load (run as root)");
    let vmlinux = Path::new(btf::VMLINUX);
    let config = CtConfig {
        nfct_offset: btf::member_offset_in(vmlinux, "sk_buff", "_nfct").unwrap(),
        len_offset: btf::member_offset_in(vmlinux, "sk_buff", "len").unwrap(),
        tracked_window_ms: 5_000,
        ..CtConfig::default()
    };
    dp.set_ct_config(config).unwrap();
    let loaded = netfilter::load_programs(&Pins::new(&bpffs.0));
    if !common::kernel::has_netfilter_links() {
        // Before Linux 6.4 the program type does not exist: the load fails (and the agent's
        // probe says so, which makes auto mode fall back to nftables; see kernel_features.rs).
        let err = format!("{:#}", loaded.expect_err("no netfilter programs before 6.4"));
        assert!(err.contains("as a netfilter program") && err.contains("Invalid argument"), "{err}");
        assert!(!node_manager::kernel::probe::probe().netfilter_links.ok);
        return;
    }
    let programs = loaded.expect("the verifier accepts both programs");
    assert_eq!(programs.len(), 2);

    let v4 = frame(&Spec::tcp("203.0.113.100", 8080, "192.0.2.1", 40000));
    let v6 = frame(&Spec::tcp("2001:db8:e::100", 8080, "2001:db8:1::1", 40000));
    let run = |family: usize, data: &[u8], pf: u8| {
        sys::prog_test_run(programs[family].1.as_fd(), data, &hook_state(pf)).expect("test run")
    };
    let counters = |dp: &Datapath| -> Vec<(String, u64, u64)> {
        dp.ct_counters().unwrap().into_iter().map(|(n, c)| (n.to_string(), c.packets, c.bytes)).collect()
    };

    // Conntrack never seen active: nothing is dropped, each packet is counted as unverified.
    set_seen(&bpffs.0, 0, 0);
    set_seen(&bpffs.0, 1, 0);
    assert_eq!(run(0, &v4, 2), NF_ACCEPT);
    assert_eq!(run(1, &v6, 10), NF_ACCEPT);
    let c = counters(&dp);
    assert_eq!(c[0].1, 0, "{c:?}");
    assert_eq!(c[2].1, 1, "{c:?}");
    assert_eq!(c[3].1, 1, "{c:?}");

    // Conntrack seen just now on IPv4 only: IPv4 packets without an entry are dropped and counted
    // (packets and bytes), IPv6 still passes.
    set_seen(&bpffs.0, 0, now_ns());
    for _ in 0..3 {
        assert_eq!(run(0, &v4, 2), NF_DROP);
    }
    assert_eq!(run(1, &v6, 10), NF_ACCEPT);
    let c = counters(&dp);
    assert_eq!((c[0].0.as_str(), c[0].1), ("invalid_dropped_v4", 3), "{c:?}");
    // skb->len at LOCAL_IN covers the IP packet (the test run pulls the Ethernet header).
    assert_eq!(c[0].2, 3 * (v4.len() as u64 - 14), "{c:?}");
    assert_eq!(c[1].1, 0, "{c:?}");

    set_seen(&bpffs.0, 1, now_ns());
    assert_eq!(run(1, &v6, 10), NF_DROP);
    assert_eq!(counters(&dp)[1].1, 1);

    // Seen longer ago than the window: back to accepting.
    set_seen(&bpffs.0, 0, now_ns().saturating_sub(6_000_000_000));
    assert_eq!(run(0, &v4, 2), NF_ACCEPT);

    // No offset configured (a kernel without the BTF field): never drops.
    set_seen(&bpffs.0, 0, now_ns());
    dp.set_ct_config(CtConfig { nfct_offset: 0, ..config }).unwrap();
    assert_eq!(run(0, &v4, 2), NF_ACCEPT);
}

#[test]
fn shim_reports_the_verifiers_reason() {
    // r0 = *(u64 *)(r1 + 4096); exit — an out-of-bounds context read. A netfilter program where
    // the kernel has them (6.4), a TC program before.
    let insns: [u64; 2] = [0x0000_1000_0000_1079u64, 0x0000_0000_0000_0095];
    let (prog_type, attach) = if common::kernel::has_netfilter_links() {
        (sys::BPF_PROG_TYPE_NETFILTER, sys::BPF_NETFILTER)
    } else {
        (sys::BPF_PROG_TYPE_SCHED_CLS, 0)
    };
    // Kernels before 5.11 charge BPF objects to RLIMIT_MEMLOCK against everything root has
    // loaded, maps of earlier tests still being freed included: once seen in the 5.10 guest as
    // EPERM before the verifier ran. This test is about the verifier's message, so it lifts the
    // limit for itself where it may (CAP_SYS_RESOURCE; without it, on kernels that account by
    // memory cgroup, the limit does not apply anyway).
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a plain syscall on a stack value; its failure leaves the limit as it was.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    let err = sys::prog_load(prog_type, attach, "nm_bad", &insns, c"GPL").unwrap_err();
    let text = err.to_string();
    assert!(!err.verifier_log.is_empty(), "{text}");
    assert!(text.contains("Permission denied") || text.contains("Invalid argument"), "{text}");
}
