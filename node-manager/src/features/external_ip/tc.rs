//! The pod side: the TC programs on every pod interface, attached as interfaces appear and
//! released as they go (or when the feature is turned off).
use std::collections::BTreeSet;

use crate::{
    kernel::{
        Datapath,
        interfaces::{self, Iface, Matcher},
    },
    plan,
};

/// Attaches to new matching interfaces and releases pins of vanished ones; `attached` is what
/// this process attached. Returns false if something failed (reported; retried at the next
/// rescan).
pub fn sync_interfaces(
    datapath: &mut Datapath,
    matcher: &Matcher,
    enabled: bool,
    attached: &mut BTreeSet<Iface>,
) -> bool {
    let wanted: BTreeSet<Iface> = if enabled {
        match interfaces::scan(matcher) {
            Ok(found) => found.into_iter().collect(),
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "listing interfaces failed");
                return false;
            }
        }
    } else {
        BTreeSet::new() // feature off: release whatever an earlier run attached
    };
    let changes = plan::interface_changes(&wanted, attached, &datapath.attached());
    let mut ok = true;
    for iface in changes.attach {
        match datapath.attach(&iface) {
            Ok(()) => {
                tracing::info!(iface = %iface.name, ifindex = iface.index, "attached");
                attached.insert(iface);
            }
            // Vanished meanwhile, or refused: reported, retried at the next rescan.
            Err(e) if interfaces::exists(&iface) => {
                ok = false;
                tracing::error!(iface = %iface.name, error = format!("{e:#}"), "attaching failed")
            }
            Err(_) => {}
        }
    }
    for iface in changes.detach {
        match datapath.detach(&iface) {
            Ok(()) => tracing::info!(iface = %iface.name, ifindex = iface.index, "detached"),
            Err(e) => {
                ok = false;
                tracing::error!(iface = %iface.name, error = format!("{e:#}"), "detaching failed")
            }
        }
        attached.remove(&iface);
    }
    ok
}
