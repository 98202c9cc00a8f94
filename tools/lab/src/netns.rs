//! Entering the lab's network namespaces, and finding the ones labs left behind.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::NETNS_PREFIX;
use crate::run::run;

pub(crate) const NETNS_DIR: &str = "/var/run/netns";

/// Runs `f` on a new thread that has first entered the network namespace at `netns`
/// (`setns(CLONE_NEWNET)`), and returns its result. Sockets created in `f` belong to that
/// namespace for their whole life. A panic in `f` is propagated to the caller.
pub fn in_netns<T, F>(netns: impl AsRef<Path>, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    let netns = netns.as_ref();
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("nml-in-netns".into())
            .spawn_scoped(s, || {
                enter_netns(netns)?;
                f()
            })
            .context("spawning a thread")?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves the calling thread into the network namespace at `netns`.
pub(crate) fn enter_netns(netns: &Path) -> Result<()> {
    let file = File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    // SAFETY: plain syscall on a valid, open descriptor; it only affects this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setns({}, CLONE_NEWNET)", netns.display()));
    }
    Ok(())
}

/// Network namespaces under `/var/run/netns` whose name starts with `nml-` (any lab, any
/// process), sorted. Tests use it to check that labs clean up.
pub fn leftovers() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> =
        dir.filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.starts_with(NETNS_PREFIX)).collect();
    names.sort();
    names
}

/// Deletes the `nml-<pid>-…` namespaces of processes that no longer exist (labs of test runs
/// that were killed before their `Drop` ran) and returns their names. Namespaces of live
/// processes, including this one, are left alone.
pub fn remove_stale_leftovers() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for name in leftovers() {
        let pid = name[NETNS_PREFIX.len()..].split('-').next().unwrap_or("");
        if pid.is_empty() || !pid.bytes().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        run(Command::new("ip").args(["netns", "del", &name]), &name)?;
        removed.push(name);
    }
    Ok(removed)
}

pub(crate) fn nsenter_command(netns: &Path, program: &OsStr) -> Command {
    let mut net = std::ffi::OsString::from("--net=");
    net.push(netns);
    let mut cmd = Command::new("nsenter");
    cmd.arg(net).arg("--").arg(program);
    cmd
}
