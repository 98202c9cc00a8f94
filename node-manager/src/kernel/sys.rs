//! The few bpf(2) commands aya 0.14 does not expose (netfilter programs and links, explicit link
//! detach). Each takes and returns owned file descriptors and plain Rust values, so no raw fd or
//! pointer outlives a call; the attr layouts are those of `union bpf_attr` in linux/bpf.h.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `enum bpf_link_type`'s BPF_LINK_TYPE_CGROUP.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;

pub const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
pub const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
pub const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
pub const BPF_PROG_TYPE_NETFILTER: u32 = 32;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub const BPF_NETFILTER: u32 = 45;
pub const NFPROTO_IPV4: u32 = 2;
pub const NFPROTO_IPV6: u32 = 10;
pub const NF_INET_LOCAL_IN: u32 = 1;

/// Attr buffer: larger than every command's part of `union bpf_attr` used here.
type Attr = [u8; 128];

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a zero-initialised attr of 128 bytes; every pointer stored in it by the
    // callers below points into a buffer that outlives this call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn put_u32(attr: &mut Attr, at: usize, value: u32) {
    attr[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put_u64(attr: &mut Attr, at: usize, value: u64) {
    attr[at..at + 8].copy_from_slice(&value.to_ne_bytes());
}

fn get_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel returned a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Opens a pinned object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    let mut attr = [0u8; 128];
    put_u64(&mut attr, 0, c.as_ptr() as u64); // pathname
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// Pins an object at `path` (which must not exist).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    let mut attr = [0u8; 128];
    put_u64(&mut attr, 0, c.as_ptr() as u64); // pathname
    put_u32(&mut attr, 8, fd.as_raw_fd() as u32); // bpf_fd
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Detaches a link from its hook now, whoever else holds it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, link.as_raw_fd() as u32); // link_fd
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

/// A program the verifier refused, with its log.
#[derive(Debug)]
pub struct LoadError {
    pub errno: io::Error,
    pub verifier_log: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let log = self.verifier_log.trim();
        // The end of the log says why.
        let tail: Vec<&str> = log.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect();
        write!(f, "{}", self.errno)?;
        if !tail.is_empty() {
            write!(f, "; verifier: {}", tail.join(" | "))?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

/// Loads a program of `prog_type` from raw instructions (8 bytes each, already relocated).
pub fn prog_load(
    prog_type: u32,
    expected_attach_type: u32,
    name: &str,
    instructions: &[u64],
    license: &std::ffi::CStr,
) -> Result<OwnedFd, LoadError> {
    prog_load_logged(prog_type, expected_attach_type, name, instructions, license, 1 << 20)
}

/// [`prog_load`] with a verifier log of `log_size` bytes on failure (probes need little).
pub fn prog_load_logged(
    prog_type: u32,
    expected_attach_type: u32,
    name: &str,
    instructions: &[u64],
    license: &std::ffi::CStr,
    log_size: usize,
) -> Result<OwnedFd, LoadError> {
    let load = |log_level: u32, log: &mut [u8]| {
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, prog_type);
        put_u32(&mut attr, 4, instructions.len() as u32); // insn_cnt
        put_u64(&mut attr, 8, instructions.as_ptr() as u64); // insns
        put_u64(&mut attr, 16, license.as_ptr() as u64); // license
        if log_level > 0 {
            put_u32(&mut attr, 24, log_level);
            put_u32(&mut attr, 28, log.len() as u32);
            put_u64(&mut attr, 32, log.as_mut_ptr() as u64);
        }
        let short = &name.as_bytes()[..name.len().min(15)];
        attr[48..48 + short.len()].copy_from_slice(short); // prog_name
        put_u32(&mut attr, 68, expected_attach_type);
        bpf(BPF_PROG_LOAD, &mut attr).map(owned)
    };
    // First without a log (fast); on failure again with one, for the reason.
    load(0, &mut []).or_else(|_| {
        let mut log = vec![0u8; log_size];
        load(1, &mut log).map_err(|errno| {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            LoadError { errno, verifier_log: String::from_utf8_lossy(&log[..end]).into_owned() }
        })
    })
}

/// Links a netfilter program to hook `hooknum` of protocol family `pf` at `priority`.
pub fn link_create_netfilter(prog: BorrowedFd<'_>, pf: u32, hooknum: u32, priority: i32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32); // prog_fd
    put_u32(&mut attr, 8, BPF_NETFILTER); // attach_type
    put_u32(&mut attr, 16, pf); // netfilter.pf
    put_u32(&mut attr, 20, hooknum); // netfilter.hooknum
    put_u32(&mut attr, 24, priority as u32); // netfilter.priority
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Replaces the program inside a link atomically (the hook never runs without one).
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes()); // link_fd
    attr[4..8].copy_from_slice(&(new_prog.as_raw_fd() as u32).to_ne_bytes()); // new_prog_fd
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// The parts of `struct bpf_link_info` node-manager reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// For netfilter links: (pf, hooknum, priority).
    pub netfilter: (u32, u32, i32),
    /// For cgroup links: the cgroup's id (its directory's inode number) and the attach type.
    pub cgroup_id: u64,
    pub attach_type: u32,
    /// For TCX links: the interface index (0 once detached).
    pub tcx_ifindex: u32,
}

pub const BPF_LINK_TYPE_NETFILTER: u32 = 10;
pub const BPF_LINK_TYPE_TCX: u32 = 11;

pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-aligned union: cgroup is
    // { u64 cgroup_id; u32 attach_type; }, netfilter is { u32 pf, hooknum; s32 priority; u32 flags; },
    // tcx is { u32 ifindex; u32 attach_type; }.
    let mut info = [0u8; 128];
    obj_info(link, &mut info)?;
    Ok(LinkInfo {
        link_type: get_u32(&info, 0),
        id: get_u32(&info, 4),
        prog_id: get_u32(&info, 8),
        netfilter: (get_u32(&info, 16), get_u32(&info, 20), get_u32(&info, 24) as i32),
        cgroup_id: u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes")),
        attach_type: get_u32(&info, 24),
        tcx_ifindex: get_u32(&info, 16),
    })
}

/// BPF_OBJ_GET_INFO_BY_FD into `info` (the kernel fills at most its length).
fn obj_info(fd: BorrowedFd<'_>, info: &mut [u8]) -> io::Result<()> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, fd.as_raw_fd() as u32); // info.bpf_fd
    put_u32(&mut attr, 4, info.len() as u32); // info.info_len
    put_u64(&mut attr, 8, info.as_mut_ptr() as u64); // info.info
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(|_| ())
}

/// Ids of every BPF link in the system.
pub fn link_ids() -> Vec<u32> {
    let mut ids = Vec::new();
    let mut start = 0u32;
    loop {
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&start.to_ne_bytes()); // start_id
        if bpf(BPF_LINK_GET_NEXT_ID, &mut attr).is_err() {
            return ids; // ENOENT: no more
        }
        start = u32::from_ne_bytes([attr[4], attr[5], attr[6], attr[7]]); // next_id
        ids.push(start);
    }
}

/// Opens a link by id.
pub fn link_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, id); // link_id
    bpf(BPF_LINK_GET_FD_BY_ID, &mut attr).map(owned)
}

/// Runs a program once on `data` with context `ctx` (BPF_PROG_TEST_RUN); returns its return value.
pub fn prog_test_run(prog: BorrowedFd<'_>, data: &[u8], ctx: &[u8]) -> io::Result<u32> {
    prog_test_run_with(prog, data, None, ctx, 0).map(|(retval, _)| retval)
}

/// `BPF_F_TEST_SKB_CHECKSUM_COMPLETE` (Linux ≥ 6.11): the skb gets CHECKSUM_COMPLETE with
/// skb->csum computed from the input, and the run fails with EBADMSG if the program leaves
/// skb->csum disagreeing with the packet it outputs.
pub const BPF_F_TEST_SKB_CHECKSUM_COMPLETE: u32 = 1 << 2;

/// [`prog_test_run`] with test-run `flags` and the output packet copied to `data_out`;
/// returns the return value and the output's length.
pub fn prog_test_run_with(
    prog: BorrowedFd<'_>,
    data: &[u8],
    data_out: Option<&mut [u8]>,
    ctx: &[u8],
    flags: u32,
) -> io::Result<(u32, usize)> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32); // prog_fd
    put_u32(&mut attr, 8, data.len() as u32); // data_size_in
    put_u64(&mut attr, 16, data.as_ptr() as u64); // data_in
    if let Some(out) = data_out {
        put_u32(&mut attr, 12, out.len() as u32); // data_size_out
        put_u64(&mut attr, 24, out.as_mut_ptr() as u64); // data_out
    }
    put_u32(&mut attr, 32, 1); // repeat
    if !ctx.is_empty() {
        put_u32(&mut attr, 40, ctx.len() as u32); // ctx_size_in
        put_u64(&mut attr, 48, ctx.as_ptr() as u64); // ctx_in
    }
    put_u32(&mut attr, 64, flags);
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((get_u32(&attr, 4), get_u32(&attr, 12) as usize)) // retval, data_size_out
}

/// Creates a map (no BTF): `BPF_MAP_CREATE` with `name` cut to 15 bytes.
pub fn map_create(map_type: u32, key_size: u32, value_size: u32, max_entries: u32, name: &str) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, map_type);
    put_u32(&mut attr, 4, key_size);
    put_u32(&mut attr, 8, value_size);
    put_u32(&mut attr, 12, max_entries);
    let short = &name.as_bytes()[..name.len().min(15)];
    attr[28..28 + short.len()].copy_from_slice(short); // map_name
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

/// `BPF_MAP_UPDATE_ELEM` (flags `BPF_ANY`); `key` and `value` must have the map's sizes.
pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, map.as_raw_fd() as u32); // map_fd
    put_u64(&mut attr, 8, key.as_ptr() as u64);
    put_u64(&mut attr, 16, value.as_ptr() as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// `BPF_MAP_LOOKUP_ELEM` into `value`, which must have the map's value size.
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<()> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, map.as_raw_fd() as u32); // map_fd
    put_u64(&mut attr, 8, key.as_ptr() as u64);
    put_u64(&mut attr, 16, value.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).map(|_| ())
}

/// The parts of `struct bpf_map_info` node-manager reads: (value size, BTF object id; 0 when the
/// map was created without BTF).
pub fn map_value_size_and_btf_id(map: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    // type, id, key_size, value_size, max_entries, map_flags (u32 each), name[16], ifindex,
    // btf_vmlinux_value_type_id (u32), netns_dev, netns_ino (u64), btf_id (u32).
    let mut info = [0u8; 80];
    obj_info(map, &mut info)?;
    Ok((get_u32(&info, 12), get_u32(&info, 64)))
}

/// The kernel's id of a loaded program (`struct bpf_prog_info.id`).
pub fn prog_id(prog: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = [0u8; 256];
    obj_info(prog, &mut info)?;
    Ok(get_u32(&info, 4))
}
