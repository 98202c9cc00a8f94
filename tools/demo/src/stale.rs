//! What an earlier demo left when it was killed outright (SIGKILL) before its guards could run.
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result};

use crate::stage::{CGROUP_PREFIX, DIR_PREFIX, cgroup2_root, is_mount_point, remove_cgroup, run_quiet};

/// Removes what earlier demos left when they were killed before they could clean up (SIGKILL):
/// for each scratch directory `nm-demo-<pid>` of a
/// process that no longer exists, stops a stray agent still using it, runs `node-manager
/// cleanup` on its bpffs, unmounts it, and removes its cgroup, its `nml-<pid>-*` namespaces and
/// the directory. Returns one line per thing removed (or that could not be).
pub fn remove(agent_bin: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(DIR_PREFIX).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue; // a demo that is running
        }
        let dir = entry.path();
        let bpffs = dir.join("bpffs");
        let mut said = |r: Result<String>| match r {
            Ok(line) => removed.push(format!("removed: {line} (left by demo {pid})")),
            Err(e) => removed.push(format!("FAILED: {e:#} (left by demo {pid})")),
        };
        for agent in processes_using(&bpffs) {
            // SAFETY: kill(2) on a process whose command line names this stale bpffs.
            unsafe { libc::kill(agent as i32, libc::SIGKILL) };
            said(Ok(format!("a stray agent process {agent}")));
        }
        let cgroup = cgroup2_root().ok().map(|root| root.join(format!("{CGROUP_PREFIX}{pid}")));
        let namespaces: Vec<String> =
            lab::leftovers().into_iter().filter(|n| n.starts_with(&format!("{}{pid}-", lab::NETNS_PREFIX))).collect();
        if is_mount_point(&bpffs) {
            // In the old node namespace if it still exists (a fallback nftables table lives there).
            let mut cmd = match namespaces.iter().find(|n| n.ends_with("-node")) {
                Some(node) => {
                    let mut c = Command::new("nsenter");
                    c.arg(format!("--net=/var/run/netns/{node}")).arg(agent_bin);
                    c
                }
                None => Command::new(agent_bin),
            };
            cmd.arg("cleanup").arg("--bpffs").arg(&bpffs);
            if let Some(cg) = cgroup.as_ref().filter(|c| c.exists()) {
                cmd.arg("--cgroup-path").arg(cg);
            }
            said(run_quiet(&mut cmd).map(|()| format!("the datapath pinned in {}", bpffs.display())));
            said(run_quiet(Command::new("umount").arg(&bpffs)).map(|()| format!("the bpffs at {}", bpffs.display())));
        }
        if let Some(cg) = cgroup.filter(|c| c.exists()) {
            said(remove_cgroup(&cg));
        }
        for ns in namespaces {
            said(run_quiet(Command::new("ip").args(["netns", "del", &ns])).map(|()| format!("network namespace {ns}")));
        }
        said(fs::remove_dir_all(&dir).map(|()| format!("{}", dir.display())).context("removing the directory"));
    }
    removed
}

/// Processes whose command line has `path` as one argument.
fn processes_using(path: &Path) -> Vec<u32> {
    let Some(wanted) = path.to_str() else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|arg| arg == wanted.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}
