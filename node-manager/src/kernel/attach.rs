//! Attaching the TC programs to pod interfaces so that they outlive the agent.
//!
//! TCX (Linux ≥ 6.6): one bpf_link per interface and direction, pinned; a restarted or
//! upgraded agent replaces the program inside the pinned link atomically (`bpf_link_update`),
//! so no packet sees a moment without the datapath. Older kernels: a netlink cls_bpf filter
//! on clsact at a fixed priority/handle, handed over to the kernel (`take_link` + forget) so it
//! stays after exit; a restarted agent swaps the filter's program in place (a change request
//! on the same priority/handle), also without a gap. There is no link object to pin, so the
//! program is pinned at the link's path as the record of the attachment, and `if<N>_clsact`
//! records a clsact qdisc this agent created, so that detaching removes it again once no
//! filter is left on it (a clsact that was already there, say a CNI's, stays).
use std::{
    collections::BTreeSet,
    fs, io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
};
use node_manager_common::program_names;

use super::{
    interfaces::{self, Iface},
    sys, tc_netlink,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Tcx,
    Netlink,
}

impl Mechanism {
    /// TCX when the kernel answers a TCX query (Linux ≥ 6.6), netlink cls_bpf otherwise.
    pub fn detect() -> Mechanism {
        if super::probe::tcx_available() { Mechanism::Tcx } else { Mechanism::Netlink }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Tcx => "tcx",
            Mechanism::Netlink => "netlink",
        }
    }
}

/// Fixed netlink priority/handle, so our filter is recognisable and replaceable.
const NL_PRIORITY: u16 = 0xc001;
const NL_HANDLE: u32 = 0x4e4d; // "NM"

pub const DIRECTIONS: [(TcAttachType, &str, &str); 2] = [
    (TcAttachType::Ingress, "ingress", program_names::POD_INGRESS),
    (TcAttachType::Egress, "egress", program_names::POD_EGRESS),
];

/// Pin of an interface's link, keyed by ifindex: bpffs refuses names with dots, which
/// interface names may contain (`eth0.100`), and an ifindex is not reused within a network
/// namespace, so it also tells a recreated interface of the same name apart.
pub fn link_pin(links_dir: &Path, iface: &Iface, direction: &str) -> PathBuf {
    links_dir.join(format!("if{}_{direction}", iface.index))
}

/// Pin recording that this agent created the interface's clsact qdisc (netlink mode).
pub fn clsact_pin(links_dir: &Path, iface: &Iface) -> PathBuf {
    links_dir.join(format!("if{}_clsact", iface.index))
}

/// Parses a link pin file name back into the ifindex and direction.
pub fn parse_link_pin(file_name: &str) -> Option<(u32, String)> {
    let (index, direction) = file_name.strip_prefix("if")?.split_once('_')?;
    Some((index.parse().ok()?, direction.to_owned()))
}

/// Interfaces that have a pinned link, with their current names ("" when gone).
pub fn pinned_ifaces(links_dir: &Path) -> BTreeSet<Iface> {
    let Ok(entries) = fs::read_dir(links_dir) else {
        return BTreeSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| parse_link_pin(&e.file_name().to_string_lossy()))
        .map(|(index, _)| Iface { name: interfaces::name_of(index).unwrap_or_default(), index })
        .collect()
}

/// Attaches (or atomically re-attaches) `program` to `iface` in `attach_type`'s direction.
pub fn attach(
    program: &mut SchedClassifier,
    mechanism: Mechanism,
    links_dir: &Path,
    iface: &Iface,
    attach_type: TcAttachType,
    direction: &str,
) -> Result<()> {
    match mechanism {
        Mechanism::Tcx => {
            attach_tcx(program, links_dir, iface, attach_type, direction)?;
            // A filter an agent left on the netlink path (before a kernel upgrade brought
            // TCX) would run beside the new program: remove it once ours is in place.
            detach_netlink(&iface.name, attach_type);
            Ok(())
        }
        Mechanism::Netlink => attach_netlink(program, links_dir, iface, attach_type, direction),
    }
}

fn attach_tcx(
    program: &mut SchedClassifier,
    links_dir: &Path,
    iface: &Iface,
    attach_type: TcAttachType,
    direction: &str,
) -> Result<()> {
    let pin = link_pin(links_dir, iface, direction);
    if pin.exists() {
        match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let link = FdLink::from(pinned).try_into().context("pinned link is not a TC link")?;
                match program.attach_to_link(link) {
                    Ok(id) => {
                        // The pin keeps the link; our handle can go.
                        drop(program.take_link(id)?);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(pin = %pin.display(), error = %e, "pinned link could not be updated; attaching anew")
                    }
                }
            }
            Err(e) => tracing::warn!(pin = %pin.display(), error = %e, "pinned link unreadable; attaching anew"),
        }
        remove_pin(&pin)?;
    }
    let id = program
        .attach_with_options(&iface.name, attach_type, TcAttachOptions::TcxOrder(LinkOrder::default()))
        .with_context(|| format!("attaching {direction} program to {} (TCX)", iface.name))?;
    let link: FdLink = program.take_link(id)?.try_into().context("TCX link is not an fd link")?;
    link.pin(&pin).with_context(|| format!("pinning link at {}", pin.display()))?;
    Ok(())
}

fn attach_netlink(
    program: &mut SchedClassifier,
    links_dir: &Path,
    iface: &Iface,
    attach_type: TcAttachType,
    direction: &str,
) -> Result<()> {
    let prog = program.fd()?.try_clone().context("duplicating the program fd")?;
    match tc::qdisc_add_clsact(&iface.name) {
        Ok(()) => {
            tracing::info!(iface = %iface.name, "created the clsact qdisc");
            pin_program(prog.as_fd(), &clsact_pin(links_dir, iface))?;
        }
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e).with_context(|| format!("adding the clsact qdisc to {}", iface.name)),
    }
    // Swap the program inside our filter if it is there (no gap); add the filter otherwise.
    let ours = SchedClassifierLink::attached(&iface.name, attach_type, NL_PRIORITY, NL_HANDLE.into(), None)
        .with_context(|| format!("interface {}", iface.name))?;
    let id = match program.attach_to_link(ours) {
        Ok(id) => id,
        Err(_) => program
            .attach_with_options(
                &iface.name,
                attach_type,
                TcAttachOptions::Netlink(NlOptions {
                    priority: NL_PRIORITY,
                    handle: NL_HANDLE.into(),
                    ..Default::default()
                }),
            )
            .with_context(|| format!("attaching {direction} program to {} (netlink cls_bpf)", iface.name))?,
    };
    // Hand the filter to the kernel: it stays attached after the agent exits.
    std::mem::forget(program.take_link(id)?);
    pin_program(prog.as_fd(), &link_pin(links_dir, iface, direction))
}

/// Pins a program at `pin`, replacing what is there (the record of a netlink attachment).
fn pin_program(prog: std::os::fd::BorrowedFd<'_>, pin: &Path) -> Result<()> {
    remove_pin(pin)?;
    sys::obj_pin(prog, pin).with_context(|| format!("pinning {}", pin.display()))
}

/// Removes our netlink filter from an interface, if there is one.
pub fn detach_netlink(iface: &str, attach_type: TcAttachType) {
    if let Ok(link) = SchedClassifierLink::attached(iface, attach_type, NL_PRIORITY, NL_HANDLE.into(), None) {
        let _ = aya::programs::links::Link::detach(link);
    }
}

/// Removes the clsact qdisc this agent created on `iface` (netlink mode), once no filter is left
/// on it; a clsact someone else also uses stays (and is no longer ours to remove).
fn release_clsact(links_dir: &Path, iface: &Iface) -> Result<()> {
    let pin = clsact_pin(links_dir, iface);
    if !pin.exists() {
        return Ok(());
    }
    if !iface.name.is_empty() {
        let others: io::Result<usize> =
            [true, false].into_iter().map(|ingress| tc_netlink::filters(iface.index, ingress).map(|f| f.len())).sum();
        match others {
            Ok(0) => match tc_netlink::delete_clsact(iface.index) {
                Ok(()) => tracing::info!(iface = %iface.name, "removed the clsact qdisc it had created"),
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL) | Some(libc::ENODEV)) => {}
                Err(e) => return Err(e).with_context(|| format!("removing the clsact qdisc of {}", iface.name)),
            },
            Ok(n) => tracing::info!(iface = %iface.name, filters = n, "leaving the clsact qdisc: other filters use it"),
            Err(e) => {
                tracing::warn!(iface = %iface.name, error = %e, "leaving the clsact qdisc: its filters could not be listed")
            }
        }
    }
    remove_pin(&pin)
}

pub fn remove_pin(pin: &Path) -> Result<()> {
    match fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing pin {}", pin.display())),
    }
}

/// Detaches from an interface and removes the pins (link, or program records and the clsact
/// record in netlink mode).
pub fn detach(links_dir: &Path, iface: &Iface) -> Result<()> {
    for (attach_type, direction, _) in DIRECTIONS {
        release_link(&link_pin(links_dir, iface, direction))?;
        if !iface.name.is_empty() {
            detach_netlink(&iface.name, attach_type);
        }
    }
    release_clsact(links_dir, iface)
}

/// Detaches a pinned link now, then removes its pin. Only unpinning would leave the
/// program running until the kernel's deferred release (or for as long as any process still
/// holds the link); BPF_LINK_DETACH takes it off the hook synchronously.
pub fn release_link(pin: &Path) -> Result<()> {
    if let Ok(fd) = super::sys::obj_get(pin)
        && let Err(e) = super::sys::link_detach(fd.as_fd())
        // Already detached (its interface is gone), or not a link at all: just unpin.
        && !matches!(e.raw_os_error(), Some(libc::ENOLINK) | Some(libc::ENOENT) | Some(libc::EINVAL))
    {
        return Err(e).with_context(|| format!("detaching link {}", pin.display()));
    }
    remove_pin(pin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_have_no_dots_and_round_trip() {
        let iface = Iface { name: "eth0.100".into(), index: 42 };
        let pin = link_pin(Path::new("/x"), &iface, "egress");
        let name = pin.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(name, "if42_egress");
        assert!(!name.contains('.'), "bpffs refuses dots in names");
        assert_eq!(parse_link_pin(&name), Some((42, "egress".to_owned())));
        assert_eq!(parse_link_pin("garbage"), None);
        let clsact = clsact_pin(Path::new("/x"), &iface);
        assert_eq!(parse_link_pin(&clsact.file_name().unwrap().to_string_lossy()), Some((42, "clsact".to_owned())));
    }
}
