//! bpf mode: the netfilter programs of `node-manager-ebpf/src/invalid.rs` on the IPv4 and IPv6
//! LOCAL_IN hooks, and the loopback heartbeat that keeps their conntrack-liveness guard armed on
//! an idle node.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
    sync::Once,
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::maps::MapData;
use node_manager_common::CtConfig;

use crate::kernel::{
    Datapath, btf,
    netfilter::{self, Family},
    pins::Pins,
    sys,
};

/// Drops happen only while conntrack tracked a packet on the same hook this recently.
pub const TRACKED_WINDOW_MS: u32 = 5_000;
/// The heartbeat's period: well inside the window.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The programs, loaded and verified, ready to link.
pub struct Prepared {
    programs: Vec<(Family, OwnedFd)>,
    ids: Vec<u32>,
}

/// Reads the running kernel's `struct sk_buff` offsets from BTF, hands them to the programs, and
/// loads them. Any failure (no BTF, no netfilter program type, verifier) says why.
pub fn prepare(datapath: &mut Datapath) -> Result<Prepared, String> {
    let vmlinux = Path::new(btf::VMLINUX);
    let offset = |member| btf::member_offset_in(vmlinux, "sk_buff", member).map_err(|e| format!("{e:#}"));
    let (nfct_offset, len_offset) = (offset("_nfct")?, offset("len")?);
    let pins = datapath.pins_ref().cloned().ok_or("the datapath has no pins")?;
    let config = datapath.ct_config().map_err(|e| format!("{e:#}"))?;
    datapath
        .set_ct_config(CtConfig { nfct_offset, len_offset, tracked_window_ms: TRACKED_WINDOW_MS, ..config })
        .map_err(|e| format!("{e:#}"))?;
    let programs = netfilter::load_programs(&pins).map_err(|e| format!("{e:#}"))?;
    let ids = programs.iter().map(|(_, fd)| sys::prog_id(fd.as_fd()).unwrap_or(0)).collect();
    tracing::debug!(nfct_offset, len_offset, "drop-invalid: sk_buff offsets from BTF");
    Ok(Prepared { programs, ids })
}

/// Links the programs (replacing links of an earlier agent) unless exactly ours are linked.
pub fn ensure(pins: &Pins, prepared: &Prepared) -> Result<bool> {
    let linked: Vec<u32> = netfilter::linked(&pins.links_dir()).iter().map(|(_, info)| info.prog_id).collect();
    if linked == prepared.ids {
        return Ok(false);
    }
    netfilter::attach(pins, &prepared.programs).context("linking the netfilter programs")?;
    start_heartbeat();
    Ok(true)
}

/// Sends a datagram to ourselves over loopback, IPv4 and IPv6, every second. Loopback packets
/// cross LOCAL_IN and are tracked whenever conntrack is active, which keeps the programs' guard
/// armed on a node with no other local traffic. If conntrack is not active, they are not tracked
/// and the guard stays open: nothing is dropped.
fn start_heartbeat() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let sockets: Vec<UdpSocket> =
            [SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), SocketAddr::from((Ipv6Addr::LOCALHOST, 0))]
                .into_iter()
                .filter_map(|addr| {
                    let socket = UdpSocket::bind(addr).ok()?;
                    socket.connect(socket.local_addr().ok()?).ok()?;
                    socket.set_nonblocking(true).ok()?;
                    Some(socket)
                })
                .collect();
        let spawned = std::thread::Builder::new().name("ct-heartbeat".into()).spawn(move || {
            let mut buf = [0u8; 16];
            loop {
                for socket in &sockets {
                    let _ = socket.send(b"node-manager");
                    while socket.recv(&mut buf).is_ok() {}
                }
                std::thread::sleep(HEARTBEAT);
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "drop-invalid: no heartbeat thread; drops rely on other local traffic");
        }
    });
}

/// How long ago the bpf INVALID drop saw conntrack track a packet of `family`.
pub fn conntrack_seen_ms_ago(pins: &Pins, family: u32) -> Option<u64> {
    let data = MapData::from_pin(pins.map(node_manager_common::map_names::CT_SEEN)).ok()?;
    let seen: aya::maps::Array<MapData, u64> = aya::maps::Array::try_from(aya::maps::Map::Array(data)).ok()?;
    let at = seen.get(&family, 0).ok().filter(|&t| t != 0)?;
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime into a local timespec. CLOCK_MONOTONIC is bpf_ktime_get_ns's clock.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    Some(now.saturating_sub(at) / 1_000_000)
}
