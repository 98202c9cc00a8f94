//! Pins removed behind the agent's back (an operator's `rm`, a tool cleaning bpffs, a bpffs
//! remounted). A pin is only a name: the agent keeps its own reference to every map (the
//! loaded object) and to every TCX and cgroup link it pinned (a file descriptor held here), so
//! removing a pin frees no map and detaches no link — traffic goes on — and `repair` puts
//! the missing pins back, pointing at the live objects, so that `inspect`, `cleanup` and a
//! restarted agent find them again. The agent calls it at every interface rescan.
//!
//! Not covered here: the INVALID-drop netfilter links (their module re-creates them when
//! their pins vanish), and pins removed while no agent runs (nothing holds the links then, so
//! they are detached with their pins; the next agent attaches anew).
use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use node_manager_common::map_names;

use super::{Datapath, sys};

/// The agent's own references to the links it pinned, by pin path.
#[derive(Debug, Default)]
pub struct HeldLinks {
    links: BTreeMap<PathBuf, OwnedFd>,
}

impl HeldLinks {
    /// Takes a reference to the link pinned at `pin` (just attached or updated by us).
    pub fn hold(&mut self, pin: &Path) {
        match sys::obj_get(pin) {
            Ok(fd) => {
                self.links.insert(pin.to_owned(), fd);
            }
            Err(e) => tracing::warn!(pin = %pin.display(), error = %e, "cannot hold a reference to a link just pinned"),
        }
    }

    /// Drops our reference (the link was released on purpose).
    pub fn release(&mut self, pin: &Path) {
        self.links.remove(pin);
    }

    pub fn len(&self) -> usize {
        self.links.len()
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }
}

/// Whether a held link is still on its hook: the kernel reports the interface index (TCX) or
/// cgroup id (cgroup) of a detached link as 0 (its interface is gone, or someone ran
/// `node-manager cleanup`). Such a link is not pinned again.
fn still_attached(fd: &OwnedFd) -> io::Result<bool> {
    let info = sys::link_info(fd.as_fd())?;
    Ok(match info.link_type {
        sys::BPF_LINK_TYPE_TCX => info.tcx_ifindex != 0,
        sys::BPF_LINK_TYPE_CGROUP => info.cgroup_id != 0,
        _ => true,
    })
}

impl Datapath {
    /// Puts back every missing pin of our maps and of the links we hold; returns the pins
    /// restored. Links found detached are let go instead.
    pub fn repair_pins(&mut self) -> Vec<PathBuf> {
        let Some(pins) = self.pins.clone() else { return Vec::new() };
        let mut restored = Vec::new();
        let missing_dirs = !pins.maps_dir().is_dir() || !pins.links_dir().is_dir();
        if missing_dirs && let Err(e) = pins.create_dirs() {
            tracing::error!(error = format!("{e:#}"), "pin directories removed and cannot be created again");
            return restored;
        }
        for name in map_names::ALL {
            let path = pins.map(name);
            if path.exists() {
                continue;
            }
            let Some(map) = self.ebpf.map(name) else { continue };
            match map.pin(&path) {
                Ok(()) => restored.push(path),
                Err(e) => tracing::error!(pin = %path.display(), error = %e, "re-pinning a map failed; retrying"),
            }
        }
        let mut gone = Vec::new();
        for (pin, fd) in &self.held.links {
            if pin.exists() {
                continue;
            }
            match still_attached(fd) {
                Ok(true) => match sys::obj_pin(fd.as_fd(), pin) {
                    Ok(()) => restored.push(pin.clone()),
                    Err(e) => tracing::error!(pin = %pin.display(), error = %e, "re-pinning a link failed; retrying"),
                },
                Ok(false) | Err(_) => gone.push(pin.clone()),
            }
        }
        for pin in gone {
            self.held.release(&pin);
        }
        for pin in &restored {
            tracing::warn!(pin = %pin.display(), "pin was removed behind the agent's back; restored (the object stayed live)");
        }
        restored
    }
}
