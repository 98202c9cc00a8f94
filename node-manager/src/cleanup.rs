//! `node-manager cleanup`: removes everything the agent made on the node, from the pins
//! alone (no API server, no running agent needed). Idempotent. Every pinned link is detached
//! (BPF_LINK_DETACH) before its pin goes: TCX links on pod interfaces and the cgroup
//! socket-hook links alike.
use std::{fs, io, path::Path};

use anyhow::{Context as _, Result};

use crate::kernel::{
    attach::{self, DIRECTIONS},
    cgroup,
    pins::{self, Pins},
};

#[derive(Debug, Default)]
pub struct Report {
    pub links_removed: usize,
    pub pins_removed: bool,
}

/// `cgroup_path`: also detach links of our socket programs on that cgroup that have no pin
/// (pinned ones are released wherever they are attached).
pub fn cleanup(bpffs: &Path, cgroup_path: Option<&Path>) -> Result<Report> {
    let mut report = Report::default();
    let root = Pins::new(bpffs).root;
    // The INVALID drop of every mode: netfilter links, our nftables table, our iptables rules,
    // and the conntrack sysctl restored to what it was (recorded in the pins, so before them).
    // Errors are reported at the end: everything else is still removed.
    let errors = crate::features::drop_invalid::remove_except(None, &Pins::new(bpffs), None);
    if pins::is_bpffs(bpffs) && root.exists() {
        // Every layout version's links: unpinning releases the TCX links and so detaches.
        for version in fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))?.flatten() {
            let links = version.path().join("links");
            // Pod interfaces first: in netlink mode that also removes a clsact qdisc we created.
            for iface in attach::pinned_ifaces(&links) {
                attach::detach(&links, &iface)?;
                report.links_removed += 1;
            }
            for link in fs::read_dir(&links).into_iter().flatten().flatten() {
                attach::release_link(&link.path())?;
                report.links_removed += 1;
            }
        }
        match fs::remove_dir_all(&root) {
            Ok(()) => report.pins_removed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", root.display())),
        }
    }
    if let Some(path) = cgroup_path
        && let Ok(id) = cgroup::cgroup_id(path)
    {
        report.links_removed += cgroup::detach_unpinned(id)?;
    }
    // Netlink filters (kernels without TCX) are not pinned: remove ours from every interface.
    for iface in crate::kernel::interfaces::all().unwrap_or_default() {
        for (attach_type, _, _) in DIRECTIONS {
            attach::detach_netlink(&iface.name, attach_type);
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("{}", errors.join("; "));
    }
    Ok(report)
}
