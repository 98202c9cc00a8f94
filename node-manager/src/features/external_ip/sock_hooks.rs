//! The host side: cgroup socket hooks (connect, sendmsg, recvmsg, getpeername) for
//! host-network clients, on the configured cgroup (default: the cgroup v2 root).
use std::path::Path;

use anyhow::Result;

use crate::kernel::{Datapath, cgroup};

/// The socket hooks on `cgroup_path` while the feature is on (re-attached at start, taking over
/// a previous agent's links atomically); detached when it is off. Failing to attach is fatal:
/// the feature was asked for and would silently miss every host-network client.
pub fn sync(datapath: &mut Datapath, enabled: bool, cgroup_path: Option<&Path>) -> Result<()> {
    // Unavailable on this kernel (reported at start): leave whatever is attached alone.
    if datapath.socket_hooks_loaded().is_err() {
        return Ok(());
    }
    if !enabled {
        let released = datapath.detach_cgroup()?;
        if released > 0 {
            tracing::info!(hooks = released, "external-cluster is off: socket hooks detached");
        }
        return Ok(());
    }
    let path = match cgroup_path {
        Some(path) => path.to_owned(),
        None => cgroup::default_root()?,
    };
    datapath.attach_cgroup(&path)?;
    tracing::info!(cgroup = %path.display(), "socket hooks attached (host-network clients)");
    Ok(())
}
