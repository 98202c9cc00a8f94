//! The socket-address hooks for host-network clients, attached to a cgroup v2 directory as
//! BPF links pinned under `<bpffs>/node-manager/v<N>/links/cgroup_<hook>`, so that they outlive
//! the agent. A restarted agent replaces the program inside each pinned link atomically
//! (`BPF_LINK_UPDATE`); if the link sits on another cgroup (the path changed) or cannot be
//! updated, it is detached first, so two of ours never stay attached to one hook.
//!
//! Socket-address programs apply to every process in the cgroup and its descendants; with the
//! default (the cgroup v2 root) that is the whole node. Needs Linux ≥ 5.9 (the release hook;
//! 5.8 brought cgroup links and the getpeername hooks).
use std::{
    fs,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::programs::{
    CgroupAttachMode, CgroupSock, CgroupSockAddr, CgroupSockAddrAttachType, CgroupSockAttachType, ProgramFd,
    links::FdLink,
};
use node_manager_common::program_names;

use super::{attach, sys};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// Where a cgroup v2 hierarchy is mounted when the host has none mounted.
pub const DEFAULT_MOUNT: &str = "/sys/fs/cgroup";
/// Prefix of the link pins of the socket hooks in the links directory.
pub const PIN_PREFIX: &str = "cgroup_";

/// Which kind of cgroup program a hook runs: a socket-address one (`cgroup_sock_addr`) or a
/// socket one (`cgroup_sock`, for the release).
#[derive(Clone, Copy, Debug)]
pub enum Attach {
    SockAddr(CgroupSockAddrAttachType),
    Sock(CgroupSockAttachType),
}

/// Hook name (pin suffix), attach type and program.
pub const HOOKS: [(&str, Attach, &str); 9] = [
    ("connect4", Attach::SockAddr(CgroupSockAddrAttachType::Connect4), program_names::SOCK_CONNECT4),
    ("connect6", Attach::SockAddr(CgroupSockAddrAttachType::Connect6), program_names::SOCK_CONNECT6),
    ("sendmsg4", Attach::SockAddr(CgroupSockAddrAttachType::UDPSendMsg4), program_names::SOCK_SENDMSG4),
    ("sendmsg6", Attach::SockAddr(CgroupSockAddrAttachType::UDPSendMsg6), program_names::SOCK_SENDMSG6),
    ("recvmsg4", Attach::SockAddr(CgroupSockAddrAttachType::UDPRecvMsg4), program_names::SOCK_RECVMSG4),
    ("recvmsg6", Attach::SockAddr(CgroupSockAddrAttachType::UDPRecvMsg6), program_names::SOCK_RECVMSG6),
    ("getpeername4", Attach::SockAddr(CgroupSockAddrAttachType::GetPeerName4), program_names::SOCK_GETPEERNAME4),
    ("getpeername6", Attach::SockAddr(CgroupSockAddrAttachType::GetPeerName6), program_names::SOCK_GETPEERNAME6),
    ("sock_release", Attach::Sock(CgroupSockAttachType::SockRelease), program_names::SOCK_RELEASE),
];

/// The kernel's `enum bpf_attach_type` value of a hook, by name, for display.
pub fn attach_type_name(value: u32) -> &'static str {
    match value {
        10 => "cgroup_inet4_connect",
        11 => "cgroup_inet6_connect",
        14 => "cgroup_udp4_sendmsg",
        15 => "cgroup_udp6_sendmsg",
        19 => "cgroup_udp4_recvmsg",
        20 => "cgroup_udp6_recvmsg",
        29 => "cgroup_inet4_getpeername",
        30 => "cgroup_inet6_getpeername",
        34 => "cgroup_inet_sock_release",
        _ => "other",
    }
}

pub fn link_pin(links_dir: &Path, hook: &str) -> PathBuf {
    links_dir.join(format!("{PIN_PREFIX}{hook}"))
}

/// Unescapes a mountinfo field (`\040` for a space, and so on).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(digits) = std::str::from_utf8(&bytes[i + 1..i + 4])
            && let Ok(v) = u8::from_str_radix(digits, 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mount point of the cgroup v2 hierarchy's root in a `/proc/self/mountinfo` text (the
/// first `cgroup2` mount whose root is `/`).
pub fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let fstype = post.split_whitespace().next()?;
        let fields: Vec<&str> = pre.split_whitespace().collect();
        let (root, mount_point) = (fields.get(3)?, fields.get(4)?);
        (fstype == "cgroup2" && *root == "/").then(|| PathBuf::from(unescape(mount_point)))
    })
}

/// The cgroup v2 mount directly usable for a configured path that is not itself cgroup v2:
/// the shallowest `cgroup2` mount below it (a hybrid host's `/sys/fs/cgroup/unified` when the
/// path is `/sys/fs/cgroup`, the v1 tmpfs; also when a container sees it as
/// `/host/sys/fs/cgroup`). `None` if there is none or several at the same depth.
pub fn cgroup2_mount_below(mountinfo: &str, path: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2").then_some(())?;
            let mount_point = PathBuf::from(unescape(pre.split_whitespace().nth(4)?));
            (mount_point != path && mount_point.starts_with(path)).then_some(mount_point)
        })
        .collect();
    found.sort_by_key(|p| p.components().count());
    found.dedup();
    match found.as_slice() {
        [] => None,
        [one] => Some(one.clone()),
        [a, b, ..] if a.components().count() < b.components().count() => Some(a.clone()),
        _ => None,
    }
}

/// The directory the socket hooks attach to for a configured `--cgroup-path`: the path itself
/// when it is cgroup v2; on a hybrid host, where the path names the v1 tmpfs, the cgroup2
/// mount below it (logged, so the operator sees which). Otherwise the error of [`validate`].
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if fs::metadata(path).is_ok_and(|m| m.is_dir()) && !is_cgroup2(path) {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        if let Some(below) = cgroup2_mount_below(&mountinfo, path).filter(|p| is_cgroup2(p)) {
            tracing::info!(
                configured = %path.display(),
                using = %below.display(),
                "CGROUP_PATH is not cgroup v2 (a hybrid cgroup layout); using the cgroup2 mount below it"
            );
            return Ok(below);
        }
    }
    validate(path)?;
    Ok(path.to_owned())
}

pub fn is_cgroup2(path: &Path) -> bool {
    super::pins::fs_magic(path) == Some(CGROUP2_SUPER_MAGIC)
}

/// Checks that `path` is a directory of a cgroup v2 hierarchy; the error names the path and
/// what to do.
pub fn validate(path: &Path) -> Result<()> {
    const HOW: &str = "give a directory of the cgroup v2 hierarchy (where cgroup2 is mounted, often /sys/fs/cgroup \
                       or /sys/fs/cgroup/unified), or leave --cgroup-path / CGROUP_PATH unset for the cgroup v2 root";
    match fs::metadata(path) {
        Err(e) => bail!("--cgroup-path / CGROUP_PATH: {} cannot be used ({e}); {HOW}", path.display()),
        Ok(m) if !m.is_dir() => bail!("--cgroup-path / CGROUP_PATH: {} is not a directory; {HOW}", path.display()),
        Ok(_) if !is_cgroup2(path) => bail!(
            "--cgroup-path / CGROUP_PATH: {} is not in a cgroup v2 hierarchy (its filesystem is not cgroup2; \
             cgroup v1 cannot carry socket hooks); {HOW}",
            path.display()
        ),
        Ok(_) => Ok(()),
    }
}

/// The cgroup v2 root: where cgroup2 is mounted, or — when the host has none mounted —
/// cgroup2 mounted at /sys/fs/cgroup if that directory exists and is empty (never on top of
/// anything).
pub fn default_root() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    if let Some(path) = cgroup2_mount_in(&mountinfo) {
        return Ok(path);
    }
    let target = Path::new(DEFAULT_MOUNT);
    let empty = fs::read_dir(target).map(|mut d| d.next().is_none()).unwrap_or(false);
    if !empty {
        bail!(
            "no cgroup v2 hierarchy is mounted and {DEFAULT_MOUNT} is missing or not empty; mount one \
             (`mount -t cgroup2 none <dir>`) and pass it as --cgroup-path / CGROUP_PATH"
        );
    }
    let c = std::ffi::CString::new(DEFAULT_MOUNT)?;
    // SAFETY: plain mount(2) with valid NUL-terminated strings.
    let rc = unsafe { libc::mount(c"cgroup2".as_ptr(), c.as_ptr(), c"cgroup2".as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "no cgroup v2 hierarchy is mounted, and mounting one at {DEFAULT_MOUNT} failed ({err}); mount one and \
             pass it as --cgroup-path / CGROUP_PATH"
        );
    }
    tracing::info!(path = DEFAULT_MOUNT, "mounted the cgroup v2 hierarchy (the host had none mounted)");
    Ok(target.to_owned())
}

/// The cgroup's id as the kernel reports it in link info: its directory's inode number.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.ino())
}

/// Attaches (or atomically re-attaches) every socket hook to the cgroup at `path`.
pub fn attach_all(ebpf: &mut aya::Ebpf, links_dir: &Path, path: &Path) -> Result<()> {
    let cgroup = fs::File::open(path).with_context(|| format!("opening cgroup {}", path.display()))?;
    let id = cgroup_id(path)?;
    for (hook, attach, name) in HOOKS {
        let program = ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?;
        let pin = link_pin(links_dir, hook);
        // With a link the kernel always allows other programs (a CNI's) next to ours; the
        // mode's flags are for the legacy attach only and must be 0 here.
        let link = match attach {
            Attach::SockAddr(_) => {
                let program: &mut CgroupSockAddr =
                    program.try_into().with_context(|| format!("{name} is not a cgroup socket-address program"))?;
                if pin.exists() && update_pinned(program.fd()?, &pin, id, hook) {
                    continue;
                }
                attach::release_link(&pin)?;
                let link_id =
                    program.attach(&cgroup, CgroupAttachMode::Single).with_context(|| attach_failed(name, path))?;
                program.take_link(link_id)?.try_into()
            }
            Attach::Sock(_) => {
                let program: &mut CgroupSock =
                    program.try_into().with_context(|| format!("{name} is not a cgroup socket program"))?;
                if pin.exists() && update_pinned(program.fd()?, &pin, id, hook) {
                    continue;
                }
                attach::release_link(&pin)?;
                let link_id =
                    program.attach(&cgroup, CgroupAttachMode::Single).with_context(|| attach_failed(name, path))?;
                program.take_link(link_id)?.try_into()
            }
        };
        let link: FdLink =
            link.map_err(|_| anyhow!("{name}: the kernel gave no BPF link for the cgroup attach (needs Linux ≥ 5.7)"))?;
        link.pin(&pin).with_context(|| format!("pinning link at {}", pin.display()))?;
    }
    Ok(())
}

fn attach_failed(name: &str, path: &Path) -> String {
    format!("attaching {name} to cgroup {} (needs Linux ≥ 5.9 and cgroup v2)", path.display())
}

/// Swaps our program into the pinned link if it is a cgroup link on the same cgroup; false if
/// the caller must detach it and attach anew.
fn update_pinned(prog: &ProgramFd, pin: &Path, cgroup_id: u64, hook: &str) -> bool {
    let result = (|| -> Result<bool> {
        let link = sys::obj_get(pin)?;
        let info = sys::link_info(link.as_fd())?;
        if info.link_type != sys::BPF_LINK_TYPE_CGROUP || info.cgroup_id != cgroup_id {
            tracing::info!(hook, old_cgroup_id = info.cgroup_id, cgroup_id, "socket hook moves to another cgroup");
            return Ok(false);
        }
        sys::link_update(link.as_fd(), prog.as_fd())?;
        Ok(true)
    })();
    match result {
        Ok(updated) => updated,
        Err(e) => {
            tracing::warn!(hook, pin = %pin.display(), error = format!("{e:#}"), "pinned socket hook could not be updated; attaching anew");
            false
        }
    }
}

/// Detaches every socket hook of ours (from whichever cgroup) and removes the pins. Returns
/// how many were released.
pub fn detach_all(links_dir: &Path) -> Result<usize> {
    let mut released = 0;
    for (hook, _, _) in HOOKS {
        let pin = link_pin(links_dir, hook);
        if pin.exists() {
            attach::release_link(&pin)?;
            released += 1;
        }
    }
    Ok(released)
}

/// Detaches every link on the cgroup `cgroup_id` that runs one of our socket programs, pinned
/// or not (for example held by an agent that is starting right now). Returns how many.
pub fn detach_unpinned(cgroup_id: u64) -> Result<usize> {
    let names: std::collections::HashMap<u32, String> = aya::programs::loaded_programs()
        .flatten()
        .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_owned()))
        .collect();
    let mut released = 0;
    for id in sys::link_ids() {
        let Ok(fd) = sys::link_by_id(id) else { continue };
        let Ok(info) = sys::link_info(fd.as_fd()) else { continue };
        // Kernel program names are cut at 15 characters; the prefix survives.
        let ours = names.get(&info.prog_id).is_some_and(|n| n.starts_with("nm_sock_"));
        if info.link_type == sys::BPF_LINK_TYPE_CGROUP && info.cgroup_id == cgroup_id && ours {
            match sys::link_detach(fd.as_fd()) {
                Ok(()) => released += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {}
                Err(e) => return Err(e).with_context(|| format!("detaching link {id} from cgroup {cgroup_id}")),
            }
        }
    }
    Ok(released)
}

/// A pinned socket hook as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    pub hook: String,
    pub link_id: u32,
    pub prog_id: u32,
    pub cgroup_id: u64,
    pub attach_type: u32,
}

pub fn pinned_hooks(links_dir: &Path) -> Vec<Hook> {
    HOOKS
        .iter()
        .filter_map(|(hook, _, _)| {
            let fd = sys::obj_get(&link_pin(links_dir, hook)).ok()?;
            let info = sys::link_info(fd.as_fd()).ok()?;
            Some(Hook {
                hook: (*hook).to_owned(),
                link_id: info.id,
                prog_id: info.prog_id,
                cgroup_id: info.cgroup_id,
                attach_type: info.attach_type,
            })
        })
        .collect()
}

/// The directory of the cgroup with this id under the cgroup v2 mount, searched breadth-first
/// (for display; `None` when not found within a few thousand directories).
pub fn path_of(cgroup_id: u64) -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let root = cgroup2_mount_in(&mountinfo)?;
    let mut queue = std::collections::VecDeque::from([root]);
    let mut seen = 0;
    while let Some(dir) = queue.pop_front() {
        if fs::metadata(&dir).is_ok_and(|m| m.ino() == cgroup_id) {
            return Some(dir);
        }
        seen += 1;
        if seen > 5000 {
            return None;
        }
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(entry.path());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_root_mount_in_mountinfo() {
        let hybrid = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
";
        assert_eq!(cgroup2_mount_in(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        // A container's bind mount of a sub-cgroup is not the root; escapes are decoded.
        let nested = "\
40 30 0:30 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw
41 30 0:30 / /host\\040cgroup rw - cgroup2 cgroup2 rw
";
        assert_eq!(cgroup2_mount_in(nested), Some(PathBuf::from("/host cgroup")));
        assert_eq!(cgroup2_mount_in("22 1 0:21 / /sys rw - sysfs sysfs rw\n"), None);
    }

    #[test]
    fn finds_the_cgroup2_mount_below_a_hybrid_hosts_v1_tmpfs() {
        let hybrid = "\
25 30 0:22 / /host/sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 /nml-test-1 /host/sys/fs/cgroup/unified ro,nosuid - cgroup2 cgroup2 rw,nsdelegate
27 25 0:24 / /host/sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
28 26 0:23 / /host/sys/fs/cgroup/unified/deeper rw - cgroup2 cgroup2 rw
";
        let base = Path::new("/host/sys/fs/cgroup");
        assert_eq!(cgroup2_mount_below(hybrid, base), Some(PathBuf::from("/host/sys/fs/cgroup/unified")));
        // Not a prefix match of names: /host/sys/fs/cgroupX is not below /host/sys/fs/cgroup.
        let sibling = "26 25 0:23 / /host/sys/fs/cgroupX rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount_below(sibling, base), None);
        // Two candidates at one depth: ambiguous, the operator must choose.
        let two = "1 0 0:1 / /c/a rw - cgroup2 cgroup2 rw\n2 0 0:1 / /c/b rw - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_mount_below(two, Path::new("/c")), None);
        assert_eq!(cgroup2_mount_below("", base), None);
    }

    #[test]
    fn validate_names_the_path_and_the_fix() {
        let err = validate(Path::new("/nonexistent/cg")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/cg") && err.contains("CGROUP_PATH"), "{err}");
        let err = validate(Path::new("/proc")).unwrap_err().to_string();
        assert!(err.contains("/proc is not in a cgroup v2 hierarchy"), "{err}");
    }
}
