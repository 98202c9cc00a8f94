//! Per-packet cost of the pod ingress program (BPF_PROG_TEST_RUN) for a hit and a miss at N
//! frontends, side by side with an empty TC program (the floor: what entering any program
//! costs), and a frontend hit from a source outside the pod CIDRs (the program stops after the
//! pod-CIDR test). The four split a hit's time into where it goes: entering a program
//! (empty), parsing and the frontend hash lookup (miss − empty), the pod-CIDR test
//! (not-pod − miss), and the rewrite with its checksums, the mark and the flow lookup
//! (hit − not-pod).
//!
//! The kernel runs the program `repeat` times on the same skb, so a rewritten frame would be a
//! miss from the second run on. The map therefore also maps the cluster address back to the
//! external one: every repetition is a real hit (external→cluster, then cluster→external).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    os::fd::{FromRawFd as _, OwnedFd, RawFd},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun as _, TestRunOptions};
use node_manager::{
    kernel::Datapath,
    model::{FrontendAddr, Protocol, Target},
};
use node_manager_common::program_names;

use crate::{interrupt, stats::Summary};

const POD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const CLUSTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const PORT: u16 = 8080;
/// Outside the lab's pod CIDR (192.0.2.0/25).
const NOT_POD: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);

/// ns per packet at one N.
#[derive(Clone, Copy, Debug)]
pub struct ProgCost {
    pub hit: Summary,
    pub miss: Summary,
    pub empty: Summary,
    /// A frontend hit from outside the pod CIDRs: parse, frontend lookup, pod-CIDR test.
    pub not_pod: Summary,
}

impl ProgCost {
    /// Where a hit's time goes (medians, ns): entering a program, parse + frontend lookup,
    /// the pod-CIDR test, the rewrite + flow.
    pub fn breakdown(&self) -> [(&'static str, f64); 4] {
        let (e, m, p, h) = (self.empty.median, self.miss.median, self.not_pod.median, self.hit.median);
        [
            ("entering a TC program", e),
            ("parsing and the frontend hash lookup", m - e),
            ("the pod-CIDR test (the masks of NM_POD_NETS)", p - m),
            ("the rewrite (address, IP and L4 checksums, mark) and the flow lookup", h - p),
        ]
    }
}

/// Measures each N in `ns`: `rounds` runs of `repeat` repetitions each for the hit, the miss
/// and the empty program; fails if the hit or miss path never ran.
pub fn measure_all(ns: &[usize], repeat: u32, rounds: usize) -> Result<BTreeMap<usize, ProgCost>> {
    let mut dp = Datapath::load_unpinned().context("loading the datapath (run as root)")?;
    dp.sync_pod_cidrs(&BTreeSet::from([lab::POD_CIDR_V4.parse()?]))?;
    let empty = EmptyProgram::load()?;
    let hit = tcp_frame(EXT, PORT);
    let miss = tcp_frame(EXT, PORT + 1); // known address, unknown port: a full lookup that misses
    let not_pod = tcp_frame_from(NOT_POD, EXT, PORT); // a frontend, from outside the pod CIDRs
    let mut out = BTreeMap::new();
    for &n in ns {
        interrupt::check()?;
        dp.sync_frontends(&frontends(n))?;
        let h = measure(rounds, || run(&mut dp, &hit, repeat))?;
        let m = measure(rounds, || run(&mut dp, &miss, repeat))?;
        let e = measure(rounds, || empty.run(&hit, repeat))?;
        let p = measure(rounds, || run(&mut dp, &not_pod, repeat))?;
        out.insert(n, ProgCost { hit: h, miss: m, empty: e, not_pod: p });
    }
    let counters: BTreeMap<_, _> = dp.counters()?.into_iter().collect();
    if counters["rewrite_ingress_v4"].packets == 0
        || counters["pass_no_frontend"].packets == 0
        || counters["pass_not_pod"].packets == 0
    {
        bail!("broken measurement: the hit, the miss or the not-a-pod path never ran ({counters:?})");
    }
    Ok(out)
}

/// `n` frontends; the last-listed one (highest port of the last address) is the one hit.
fn frontends(n: usize) -> BTreeMap<FrontendAddr, Target> {
    let target = |ip: Ipv4Addr| Target { cluster_ip: IpAddr::V4(ip), owner: "bench/svc".into() };
    let mut map = BTreeMap::new();
    for i in 0..n.saturating_sub(1) {
        // Fillers: other addresses in 203.0.113.0/24 and other ports.
        let addr = Ipv4Addr::new(203, 0, 113, 11 + (i / 60_000) as u8);
        map.insert(
            FrontendAddr { addr: addr.into(), port: 1 + (i % 60_000) as u16, protocol: Protocol::Tcp },
            target(CLUSTER),
        );
    }
    map.insert(FrontendAddr { addr: EXT.into(), port: PORT, protocol: Protocol::Tcp }, target(CLUSTER));
    // The way back, so repeated runs on one skb stay hits (see the module comment).
    map.insert(FrontendAddr { addr: CLUSTER.into(), port: PORT, protocol: Protocol::Tcp }, target(EXT));
    map
}

fn run(dp: &mut Datapath, frame: &[u8], repeat: u32) -> Result<Duration> {
    let r = dp.program(program_names::POD_INGRESS)?.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    })?;
    Ok(r.duration)
}

fn measure(rounds: usize, mut f: impl FnMut() -> Result<Duration>) -> Result<Summary> {
    let ns: Vec<f64> = (0..rounds).map(|_| f().map(|d| d.as_nanos() as f64)).collect::<Result<_>>()?;
    Summary::of(&ns).filter(Summary::is_sane).with_context(|| format!("broken measurement: {ns:?}"))
}

fn tcp_frame(dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    tcp_frame_from(POD, dst, dport)
}

fn tcp_frame_from(src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    f.extend_from_slice(&ip);
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x10;
    f.extend_from_slice(&tcp);
    f
}

/// The floor: a two-instruction TC program (`r0 = -1; exit`) loaded through the raw bpf(2)
/// syscall, so the product's object carries no test-only program.
struct EmptyProgram {
    fd: OwnedFd,
}

impl EmptyProgram {
    fn load() -> Result<EmptyProgram> {
        // BPF_MOV64_IMM(R0, -1); BPF_EXIT_INSN()
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0x00, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = c"GPL";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&3u32.to_ne_bytes()); // BPF_PROG_TYPE_SCHED_CLS
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes()); // insn_cnt
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        let fd = bpf(5 /* BPF_PROG_LOAD */, &mut attr).context("loading the empty program")?;
        // SAFETY: a new fd returned by the kernel, owned here.
        Ok(EmptyProgram { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    fn run(&self, frame: &[u8], repeat: u32) -> Result<Duration> {
        use std::os::fd::AsRawFd as _;
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(self.fd.as_raw_fd() as u32).to_ne_bytes()); // prog_fd
        attr[8..12].copy_from_slice(&(frame.len() as u32).to_ne_bytes()); // data_size_in
        attr[16..24].copy_from_slice(&(frame.as_ptr() as u64).to_ne_bytes()); // data_in
        attr[32..36].copy_from_slice(&repeat.to_ne_bytes()); // repeat
        bpf(10 /* BPF_PROG_TEST_RUN */, &mut attr).context("running the empty program")?;
        let duration = u32::from_ne_bytes(attr[36..40].try_into()?);
        Ok(Duration::from_nanos(u64::from(duration)))
    }
}

fn bpf(cmd: i64, attr: &mut [u8; 128]) -> Result<RawFd> {
    // SAFETY: bpf(2) with a zero-initialised attr of sufficient size, as the kernel expects.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(rc as RawFd)
}
