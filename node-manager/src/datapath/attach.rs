//! Attaching the TC programs to pod interfaces so that they outlive the agent.
//!
//! TCX (Linux ≥ 6.6): one bpf_link per interface and direction, pinned; a restarted or
//! upgraded agent replaces the program inside the pinned link atomically (`bpf_link_update`),
//! so no packet sees a moment without the datapath. Older kernels: a netlink cls_bpf filter
//! on clsact, handed over to the kernel (`take_link` + forget) so it stays after exit.
use std::{
    collections::BTreeSet,
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, TcAttachOptions},
    },
    util::KernelVersion,
};
use node_manager_common::program_names;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    Tcx,
    Netlink,
}

impl Mechanism {
    pub fn detect() -> Mechanism {
        match KernelVersion::current() {
            Ok(v) if v >= KernelVersion::new(6, 6, 0) => Mechanism::Tcx,
            _ => Mechanism::Netlink,
        }
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

/// An interface we attach to, identified by name and index (names are reused by CNIs).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Iface {
    pub name: String,
    pub index: u32,
}

/// Pin of an interface's link, keyed by ifindex: bpffs refuses names with dots, which
/// interface names may contain (`eth0.100`), and an ifindex is not reused within a network
/// namespace, so it also tells a recreated interface of the same name apart.
pub fn link_pin(links_dir: &Path, iface: &Iface, direction: &str) -> PathBuf {
    links_dir.join(format!("if{}_{direction}", iface.index))
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
        .map(|(index, _)| Iface { name: crate::interfaces::name_of(index).unwrap_or_default(), index })
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
        Mechanism::Netlink => attach_netlink(program, iface, attach_type),
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

fn attach_netlink(program: &mut SchedClassifier, iface: &Iface, attach_type: TcAttachType) -> Result<()> {
    if let Err(e) = tc::qdisc_add_clsact(&iface.name)
        && !matches!(&e, tc::TcError::IoError(io) if io.kind() == io::ErrorKind::AlreadyExists)
    {
        tracing::debug!(iface = %iface.name, error = %e, "adding clsact (may already exist)");
    }
    // Ours already there (fixed priority/handle): change its program in place, which cls_bpf
    // does atomically (a netlink change without NLM_F_CREATE). Otherwise add it.
    let existing =
        aya::programs::tc::SchedClassifierLink::attached(&iface.name, attach_type, NL_PRIORITY, NL_HANDLE.into(), None);
    let id = match existing {
        Ok(link) => program
            .attach_to_link(link)
            .with_context(|| format!("replacing our program on {} (netlink cls_bpf)", iface.name))?,
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
            .with_context(|| format!("attaching to {} (netlink cls_bpf)", iface.name))?,
    };
    // Hand the filter to the kernel: it stays attached after the agent exits.
    std::mem::forget(program.take_link(id)?);
    Ok(())
}

/// Removes our netlink filter from an interface, if there is one.
pub fn detach_netlink(iface: &str, attach_type: TcAttachType) {
    if let Ok(link) =
        aya::programs::tc::SchedClassifierLink::attached(iface, attach_type, NL_PRIORITY, NL_HANDLE.into(), None)
    {
        let _ = aya::programs::links::Link::detach(link);
    }
}

pub fn remove_pin(pin: &Path) -> Result<()> {
    match fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing pin {}", pin.display())),
    }
}

/// Detaches from an interface and removes the link pins.
pub fn detach(links_dir: &Path, iface: &Iface) -> Result<()> {
    for (attach_type, direction, _) in DIRECTIONS {
        release_link(&link_pin(links_dir, iface, direction))?;
        if !iface.name.is_empty() {
            detach_netlink(&iface.name, attach_type);
        }
    }
    Ok(())
}

/// Detaches a pinned link now, then removes its pin. Only unpinning would leave the
/// program running until the kernel's deferred release (or for as long as any process still
/// holds the link); BPF_LINK_DETACH takes it off the hook synchronously.
pub fn release_link(pin: &Path) -> Result<()> {
    use std::os::fd::AsFd as _;
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
    }
}
