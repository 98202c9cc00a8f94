//! Host-network clients: a process of the node (its network namespace) connecting to
//! `EXT:port`. node-manager serves it at the socket (its cgroup `connect4` hook rewrites the
//! destination before routing: no NAT, no conntrack entry for the rewrite), network-node-manager
//! and the nftables peer with DNAT in the nat OUTPUT hook, the floor by connecting to the
//! cluster IP.
//!
//! cgroup v2 places a whole process, not a thread, so the benchmark moves itself into a cgroup
//! for each side's host rounds and back afterwards: into node-manager's hooked cgroup for B, and
//! into an empty sibling of it for every other side (the same depth below the root, so every
//! side inherits the same programs from above).

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

/// An empty cgroup beside node-manager's, for the sides without socket hooks; removed on drop.
pub struct PlainCgroup {
    pub path: PathBuf,
}

impl PlainCgroup {
    pub fn new() -> Result<PlainCgroup> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let root = node_manager::kernel::cgroup::cgroup2_mount_in(&mountinfo).context("no cgroup v2 mount")?;
        // Named like the tests' cgroups, so `cargo xtask test` reports it if it is left over.
        let path = root.join(format!("nml-test-bench-plain-{}", std::process::id()));
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(PlainCgroup { path })
    }
}

impl Drop for PlainCgroup {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("bench: removing cgroup {}: {e}", self.path.display());
        }
    }
}

/// This process inside `cgroup` until dropped, then back where it was.
pub struct InCgroup {
    home: PathBuf,
}

impl InCgroup {
    pub fn enter(cgroup: &Path) -> Result<InCgroup> {
        let home = current_cgroup()?;
        move_self(cgroup)?;
        Ok(InCgroup { home })
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        if let Err(e) = move_self(&self.home) {
            eprintln!("bench: moving back to cgroup {}: {e:#}", self.home.display());
        }
    }
}

/// This process's cgroup v2 directory (`0::/path` in /proc/self/cgroup, below the mount).
fn current_cgroup() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    let root = node_manager::kernel::cgroup::cgroup2_mount_in(&mountinfo).context("no cgroup v2 mount")?;
    let own = fs::read_to_string("/proc/self/cgroup")?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::")).context("no cgroup v2 line in /proc/self/cgroup")?;
    Ok(root.join(rel.trim_start_matches('/')))
}

fn move_self(cgroup: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string()).with_context(|| format!("writing {}", procs.display()))
}
