//! liberal mode: `net.netfilter.nf_conntrack_tcp_be_liberal=1`, as kube-proxy ≥ 1.29 offers
//! (`--conntrack-tcp-be-liberal`): conntrack stops marking out-of-window TCP segments INVALID, so
//! they are de-NATed and reach the pod, whose stack handles them. The value found before is kept
//! in the pinned `NM_CT_CONFIG` map, so `cleanup` restores it even after agent restarts.
use std::{fs, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{Array, Map, MapData};
use node_manager_common::{CtConfig, map_names};

use crate::kernel::{Datapath, pins::Pins};

pub const SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal";

pub fn probe() -> Result<(), String> {
    read().map(|_| ()).map_err(|e| format!("{e:#}"))
}

fn read() -> Result<u32> {
    let text =
        fs::read_to_string(SYSCTL).with_context(|| format!("reading {SYSCTL} (is the nf_conntrack module loaded?)"))?;
    text.trim().parse().with_context(|| format!("{SYSCTL} holds {text:?}"))
}

fn write(value: u32) -> Result<()> {
    fs::write(SYSCTL, format!("{value}\n")).with_context(|| format!("writing {value} to {SYSCTL}"))
}

/// Sets the sysctl to 1, remembering the value found (once: a restarted agent keeps the
/// original it recorded, not its own 1).
pub fn ensure(datapath: &mut Datapath) -> Result<bool> {
    let current = read()?;
    if current == 1 {
        return Ok(false);
    }
    let mut config = datapath.ct_config()?;
    if config.liberal_restore == 0 {
        config.liberal_restore = current + 1;
        datapath.set_ct_config(config)?;
    }
    write(1)?;
    Ok(true)
}

/// Puts back the value recorded before we changed it, if we did.
pub fn restore(pins: &Pins, datapath: Option<&mut Datapath>) -> Result<Vec<String>> {
    let (saved, datapath) = match datapath {
        Some(dp) => (dp.ct_config()?, Some(dp)),
        None => match pinned_config(&pins.map(map_names::CT_CONFIG)) {
            Some(config) => (config, None),
            None => return Ok(Vec::new()),
        },
    };
    if saved.liberal_restore == 0 {
        return Ok(Vec::new());
    }
    let original = saved.liberal_restore - 1;
    write(original)?;
    if let Some(dp) = datapath {
        dp.set_ct_config(CtConfig { liberal_restore: 0, ..saved })?;
    }
    Ok(vec![format!("{SYSCTL} restored to {original}")])
}

/// The agent's record in the pinned map, readable without a running agent.
pub fn pinned_config(path: &Path) -> Option<CtConfig> {
    let data = MapData::from_pin(path).ok()?;
    Array::<_, CtConfig>::try_from(Map::Array(data)).ok()?.get(&0, 0).ok()
}
