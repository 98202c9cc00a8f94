//! Host-side pod interfaces: which exist now (matching the configured globs), and a wake-up
//! whenever links change, from an rtnetlink subscription. The subscription is only a trigger:
//! the agent rescans the whole list each time, so a missed message cannot leave it wrong.
use std::{
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _},
};

use anyhow::{Context as _, Result};
use tokio::sync::Notify;

use crate::datapath::attach::Iface;

pub struct Matcher {
    patterns: Vec<glob::Pattern>,
}

impl Matcher {
    pub fn new(globs: &[String]) -> Result<Matcher> {
        let patterns = globs.iter().map(|g| glob::Pattern::new(g).with_context(|| format!("bad interface glob {g:?}"))).collect::<Result<_>>()?;
        Ok(Matcher { patterns })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }
}

/// Interfaces of this network namespace whose names match.
pub fn scan(matcher: &Matcher) -> Result<Vec<Iface>> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/sys/class/net").context("listing /sys/class/net")? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !matcher.matches(&name) {
            continue;
        }
        // Gone between listing and reading: skip; the next scan settles it.
        let Ok(index) = fs::read_to_string(entry.path().join("ifindex")) else { continue };
        let Ok(index) = index.trim().parse() else { continue };
        out.push(Iface { name, index });
    }
    out.sort();
    Ok(out)
}

/// Whether an interface with this name and index still exists.
pub fn exists(iface: &Iface) -> bool {
    fs::read_to_string(format!("/sys/class/net/{}/ifindex", iface.name)).is_ok_and(|i| i.trim().parse() == Ok(iface.index))
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
    let rc = unsafe { libc::bind(sock.as_raw_fd(), (&addr as *const libc::sockaddr_nl).cast(), std::mem::size_of::<libc::sockaddr_nl>() as u32) };
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
