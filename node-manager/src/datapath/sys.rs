//! The few bpf(2) commands aya 0.14 does not expose. Each takes and returns owned file
//! descriptors, so no raw fd outlives this module.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `enum bpf_link_type`'s BPF_LINK_TYPE_CGROUP.
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a zero-initialised attr of 128 bytes (larger than every command's
    // part of union bpf_attr used here); the kernel reads only what the command needs.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Opens a pinned object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes()); // pathname
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches a link from its hook now, whoever else holds it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes()); // link_fd
    bpf(BPF_LINK_DETACH, &mut attr).map(|_| ())
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
    /// For cgroup links: the cgroup's id (its directory's inode number) and the attach type.
    pub cgroup_id: u64,
    pub attach_type: u32,
}

pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id (u32 each), then an 8-aligned union whose
    // cgroup member is { u64 cgroup_id; u32 attach_type; }.
    let mut info = [0u64; 16];
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(link.as_raw_fd() as u32).to_ne_bytes()); // bpf_fd
    attr[4..8].copy_from_slice(&(std::mem::size_of_val(&info) as u32).to_ne_bytes()); // info_len
    attr[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes()); // info
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let bytes: Vec<u8> = info.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap_or_default());
    Ok(LinkInfo {
        link_type: u32_at(0),
        id: u32_at(4),
        prog_id: u32_at(8),
        cgroup_id: u64::from_ne_bytes(bytes[16..24].try_into().unwrap_or_default()),
        attach_type: u32_at(24),
    })
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
    attr[0..4].copy_from_slice(&id.to_ne_bytes()); // link_id
    let fd = bpf(BPF_LINK_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
