//! `node-manager cleanup`: removes everything the agent made on the node, from the pins
//! alone (no API server, no running agent needed). Idempotent.
use std::{fs, io, path::Path};

use anyhow::{Context as _, Result};

use crate::datapath::{
    attach::{self, DIRECTIONS},
    pins::{self, Pins},
};

#[derive(Debug, Default)]
pub struct Report {
    pub links_removed: usize,
    pub pins_removed: bool,
}

pub fn cleanup(bpffs: &Path) -> Result<Report> {
    let mut report = Report::default();
    let root = Pins::new(bpffs).root;
    // The INVALID drop of every mode: netfilter links, our nftables table, our iptables rules,
    // and the conntrack sysctl restored to what it was (recorded in the pins, so before them).
    let errors = crate::invalid::remove_except(None, &Pins::new(bpffs), None);
    if let Some(first) = errors.first() {
        anyhow::bail!("{first} (and {} more)", errors.len() - 1);
    }
    if pins::is_bpffs(bpffs) && root.exists() {
        // Every layout version's links: unpinning releases the TCX links and so detaches.
        for version in fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))?.flatten() {
            let links = version.path().join("links");
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
    // Netlink filters (kernels without TCX) are not pinned: remove ours from every interface.
    for iface in crate::interfaces::all().unwrap_or_default() {
        for (attach_type, _, _) in DIRECTIONS {
            attach::detach_netlink(&iface.name, attach_type);
        }
    }
    Ok(report)
}
