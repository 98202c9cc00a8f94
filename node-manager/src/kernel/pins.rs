//! Where the datapath lives in bpffs, and the check that a pinned map has the layout this
//! build expects before it is reused (aya would reuse any object pinned at the path).
//!
//! ```text
//! <bpffs>/node-manager/v<LAYOUT_VERSION>/maps/NM_FRONTENDS ...   pinned maps
//! <bpffs>/node-manager/v<LAYOUT_VERSION>/links/if<ifindex>_<ingress|egress>   TCX links (netlink
//!                                               cls_bpf: the attached program, as the record)
//! <bpffs>/node-manager/v<LAYOUT_VERSION>/links/if<ifindex>_clsact   netlink: we created the clsact
//! <bpffs>/node-manager/v<LAYOUT_VERSION>/links/netfilter_<ipv4|ipv6>     INVALID-drop links
//! <bpffs>/node-manager/v<LAYOUT_VERSION>/links/cgroup_<hook>   cgroup socket-hook links
//! <bpffs>/node-manager/v<LAYOUT_VERSION>/kernel_report   the agent's kernel-feature report
//! ```
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{MapInfo, MapType};
use node_manager_common::{
    COUNTERS_LEN, CT_COUNTERS_LEN, Counter, CtConfig, DatapathConfig, FLOWS_DGRAM_MAX, FLOWS_MAX, FRAGS_MAX,
    FRONTENDS_MAX, Flow, FlowKey, FragKey, FragTarget, Frontend, FrontendKey, LAYOUT_VERSION, OWNERS_MAX, Owner,
    POD_CIDRS_MAX, PodNets, SOCK_REV_MAX, SockRev, SockRevKey, TAIL_CALLS_LEN, map_names,
};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Clone, Debug)]
pub struct Pins {
    /// `<bpffs>/node-manager`
    pub root: PathBuf,
}

impl Pins {
    pub fn new(bpffs: &Path) -> Pins {
        Pins { root: bpffs.join("node-manager") }
    }

    pub fn layout_dir(&self) -> PathBuf {
        self.root.join(format!("v{LAYOUT_VERSION}"))
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.layout_dir().join("maps")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.layout_dir().join("links")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// Directories of other layout versions (`v<N>` beside ours), left by older or newer agents.
    pub fn other_versions(&self) -> Vec<PathBuf> {
        let ours = self.layout_dir();
        let mut dirs: Vec<PathBuf> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p != &ours && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('v')))
            .collect();
        dirs.sort();
        dirs
    }

    pub fn create_dirs(&self) -> Result<()> {
        for dir in [self.maps_dir(), self.links_dir()] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {} (is bpffs writable?)", dir.display()))?;
        }
        Ok(())
    }
}

/// Makes sure `bpffs` is a mounted BPF filesystem; mounts one there if the directory exists
/// and is not (what a DaemonSet's hostPath usually needs on first start).
pub fn ensure_bpffs(bpffs: &Path) -> Result<()> {
    if is_bpffs(bpffs) {
        return Ok(());
    }
    if !bpffs.is_dir() {
        bail!(
            "{} does not exist or is not a directory; pass --bpffs pointing at a mounted BPF filesystem \
             (in a DaemonSet, mount the host's /sys/fs/bpf there)",
            bpffs.display()
        );
    }
    let target = std::ffi::CString::new(bpffs.as_os_str().as_encoded_bytes())?;
    // SAFETY: plain mount(2) with valid NUL-terminated strings.
    let rc = unsafe { libc::mount(c"bpffs".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "{} is not a BPF filesystem and mounting one failed ({err}); mount it with `mount -t bpf bpffs {}` \
             (needs CAP_SYS_ADMIN) or pass --bpffs pointing at a mounted bpffs",
            bpffs.display(),
            bpffs.display()
        );
    }
    tracing::info!(path = %bpffs.display(), "mounted bpffs");
    Ok(())
}

pub fn is_bpffs(path: &Path) -> bool {
    fs_magic(path) == Some(BPF_FS_MAGIC)
}

/// The filesystem type (statfs `f_type`) of `path`, if it can be read.
pub fn fs_magic(path: &Path) -> Option<i64> {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return None;
    };
    // SAFETY: statfs into a zeroed struct owned here.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

/// The layout this build expects of each pinned map.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Layout {
    pub map_type: MapType,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

pub fn expected_layout(name: &str) -> Option<Layout> {
    use std::mem::size_of;
    let l = |map_type, key: usize, value: usize, max_entries| Layout {
        map_type,
        key_size: key as u32,
        value_size: value as u32,
        max_entries,
    };
    Some(match name {
        map_names::FRONTENDS => l(MapType::Hash, size_of::<FrontendKey>(), size_of::<Frontend>(), FRONTENDS_MAX),
        map_names::POD_CIDRS => l(MapType::LpmTrie, 4 + 16, 1, POD_CIDRS_MAX),
        map_names::POD_NETS => l(MapType::Array, 4, size_of::<PodNets>(), 1),
        map_names::FLOWS => l(MapType::LruHash, size_of::<FlowKey>(), size_of::<Flow>(), FLOWS_MAX),
        map_names::FLOWS_DGRAM => l(MapType::LruHash, size_of::<FlowKey>(), size_of::<Flow>(), FLOWS_DGRAM_MAX),
        map_names::FRAGS => l(MapType::LruHash, size_of::<FragKey>(), size_of::<FragTarget>(), FRAGS_MAX),
        map_names::CONFIG => l(MapType::Array, 4, size_of::<DatapathConfig>(), 1),
        map_names::COUNTERS => l(MapType::PerCpuArray, 4, size_of::<Counter>(), COUNTERS_LEN),
        map_names::SOCK_REV => l(MapType::LruHash, size_of::<SockRevKey>(), size_of::<SockRev>(), SOCK_REV_MAX),
        map_names::CT_CONFIG => l(MapType::Array, 4, size_of::<CtConfig>(), 1),
        map_names::CT_SEEN => l(MapType::Array, 4, 8, 2),
        map_names::CT_COUNTERS => l(MapType::PerCpuArray, 4, size_of::<Counter>(), CT_COUNTERS_LEN),
        map_names::OWNERS => l(MapType::Hash, size_of::<FrontendKey>(), size_of::<Owner>(), OWNERS_MAX),
        map_names::TAIL_CALLS => l(MapType::ProgramArray, 4, 4, TAIL_CALLS_LEN),
        _ => return None,
    })
}

/// What is pinned at `path`, if anything, compared with what is expected.
pub enum PinState {
    Absent,
    Matches,
    Foreign(String),
}

pub fn check_pinned_map(path: &Path, expected: Layout) -> Result<PinState> {
    if !path.exists() {
        return Ok(PinState::Absent);
    }
    let info = MapInfo::from_pin(path).with_context(|| format!("reading pinned map {}", path.display()))?;
    let found = Layout {
        map_type: info.map_type().with_context(|| format!("map type of {}", path.display()))?,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
    };
    Ok(if found == expected {
        PinState::Matches
    } else {
        PinState::Foreign(format!("found {found:?}, expected {expected:?}"))
    })
}
