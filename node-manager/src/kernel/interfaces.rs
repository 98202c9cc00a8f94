//! Host-side pod interfaces: which exist now (matching the configured globs), and a wake-up
//! whenever links change, from an rtnetlink subscription. The subscription is only a trigger:
//! the agent rescans the whole list each time, so a missed message cannot leave it wrong.
use std::os::fd::{AsRawFd as _, FromRawFd as _};

use anyhow::{Context as _, Result};
use tokio::sync::Notify;

/// An interface we attach to, identified by name and index (names are reused by CNIs).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Iface {
    pub name: String,
    pub index: u32,
}

pub struct Matcher {
    patterns: Vec<glob::Pattern>,
}

impl Matcher {
    pub fn new(globs: &[String]) -> Result<Matcher> {
        let patterns = globs
            .iter()
            .map(|g| glob::Pattern::new(g).with_context(|| format!("bad interface glob {g:?}")))
            .collect::<Result<_>>()?;
        Ok(Matcher { patterns })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }
}

/// All interfaces of this process's network namespace, from `if_nameindex(3)` (netlink):
/// unlike /sys/class/net, it follows the namespace the process is in, not the one sysfs was
/// mounted in.
pub fn all() -> Result<Vec<Iface>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry, freed below.
    let head = unsafe { libc::if_nameindex() };
    if head.is_null() {
        return Err(std::io::Error::last_os_error()).context("listing interfaces (if_nameindex)");
    }
    let mut out = Vec::new();
    let mut cur = head;
    // SAFETY: walking the array until its terminator; names are NUL-terminated C strings.
    unsafe {
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            let name = std::ffi::CStr::from_ptr((*cur).if_name).to_string_lossy().into_owned();
            out.push(Iface { name, index: (*cur).if_index });
            cur = cur.add(1);
        }
        libc::if_freenameindex(head);
    }
    out.sort();
    Ok(out)
}

/// Interfaces whose names match.
pub fn scan(matcher: &Matcher) -> Result<Vec<Iface>> {
    Ok(all()?.into_iter().filter(|i| matcher.matches(&i.name)).collect())
}

/// Whether an interface with this name and index still exists.
pub fn exists(iface: &Iface) -> bool {
    let Ok(name) = std::ffi::CString::new(iface.name.as_bytes()) else { return false };
    // SAFETY: valid NUL-terminated name.
    unsafe { libc::if_nametoindex(name.as_ptr()) == iface.index }
}

/// The current name of an interface index, if it exists.
pub fn name_of(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    Some(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

/// Spawns a thread that notifies on every rtnetlink link message (RTMGRP_LINK).
pub fn watch_links(notify: std::sync::Arc<Notify>) -> Result<()> {
    // SAFETY: plain socket(2)/bind(2) on a netlink socket we own; the fd is closed on exit of
    // the thread (it lives as long as the agent).
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening rtnetlink socket");
    }
    // SAFETY: fd is a valid socket we just opened and now own.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = libc::RTMGRP_LINK as u32;
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("subscribing to link changes");
    }
    std::thread::Builder::new().name("link-watch".into()).spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                // ENOBUFS (overrun) included: a rescan catches up either way.
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            notify.notify_one();
        }
    })?;
    Ok(())
}
