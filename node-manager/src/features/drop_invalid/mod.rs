//! The INVALID drop: drop packets conntrack marks INVALID before the host answers them with an RST that
//! kills a pod's masqueraded connection (kubernetes#74839, #117924). network-node-manager does it
//! with `-m conntrack --ctstate INVALID -j DROP` in INPUT. Four mechanisms, one chosen:
//!
//! | mode | how | kernels |
//! |---|---|---|
//! | `bpf` | netfilter programs on IPv4/IPv6 LOCAL_IN reading conntrack's verdict | ≥ 6.4 |
//! | `nftables` | our own table `inet node_manager`: `ct state invalid counter drop` | any |
//! | `iptables` | the network-node-manager rule, commented as ours | any |
//! | `liberal` | `net.netfilter.nf_conntrack_tcp_be_liberal=1` (kube-proxy ≥ 1.29's way) | any |
//!
//! `auto` picks the first that works of bpf, nftables, iptables, and says why. A mode asked for
//! explicitly that cannot work is an error naming what is missing, never a silent fallback.
pub mod bpf;
pub mod choose;
pub mod ctstat;
pub mod iptables;
pub mod liberal;
pub mod nft;

use std::fmt;

use anyhow::{Context as _, Result};
use serde::Serialize;

pub use self::choose::{Mode, Reason, Requested, choose, describe};
use crate::kernel::{Datapath, pins::Pins};

/// The counters of whichever mechanism is (or was) in force, and conntrack's own statistics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Counters {
    /// Packets and bytes dropped, per family (`bpf`, `nftables`, `iptables`).
    pub dropped_v4: Option<(u64, u64)>,
    pub dropped_v6: Option<(u64, u64)>,
    /// `bpf` only: packets without a conntrack entry accepted because conntrack was not seen
    /// active in this namespace recently.
    pub unverified_v4: Option<u64>,
    pub unverified_v6: Option<u64>,
    /// Conntrack's own count of INVALID packets in this network namespace (all modes).
    pub conntrack_invalid: Option<u64>,
}

/// Removes every mechanism except `keep`: a mode switch or the feature turned off leaves nothing
/// of the others behind. Errors are collected, not fatal: the rest is still removed.
pub fn remove_except(keep: Option<Mode>, pins: &Pins, datapath: Option<&mut Datapath>) -> Vec<String> {
    let mut errors = Vec::new();
    let mut note = |what: &str, r: Result<Vec<String>>| match r {
        Ok(removed) => removed.iter().for_each(|r| tracing::info!(removed = %r, "drop-invalid: {what} removed")),
        Err(e) => errors.push(format!("removing {what}: {e:#}")),
    };
    if keep != Some(Mode::Bpf) {
        note("bpf", crate::kernel::netfilter::detach(&pins.links_dir()));
        note("the conntrack holder", nft::release_conntrack());
    }
    if keep != Some(Mode::Nftables) {
        note("nftables", nft::remove());
    }
    if keep != Some(Mode::Iptables) {
        note("iptables", iptables::remove());
    }
    if keep != Some(Mode::Liberal) {
        note("liberal", liberal::restore(pins, datapath));
    }
    errors
}

/// A mode that cannot work on this node was asked for: a configuration error (exit code 2).
#[derive(Debug)]
pub struct NotPossible(pub String);

impl fmt::Display for NotPossible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotPossible {}

/// The feature as the agent runs it.
pub struct DropInvalid {
    pub mode: Mode,
    pub reason: Reason,
    bpf: Option<bpf::Prepared>,
    /// The verifier's verdict on the bpf mode's programs, when they were loaded.
    pub bpf_load: Option<Result<(), String>>,
    /// bpf mode: the conntrack holder is installed (checked with nft again at a thorough
    /// ensure), or installing it failed (said once; retried at a thorough ensure).
    holder: Holder,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    NotYet,
    Held,
    Failed,
}

impl DropInvalid {
    /// Chooses the mode, installs it, records it in the pinned config and removes the others'
    /// leftovers. A mode that cannot work here is a [`NotPossible`] error (configuration).
    pub fn start(requested: Requested, datapath: &mut Datapath) -> Result<DropInvalid> {
        let (mut prepared, mut bpf_load) = (None, None);
        let (mode, reason) = choose(requested, |mode| match mode {
            Mode::Bpf => {
                // What the kernel lacks, named, before the verifier is asked.
                crate::kernel::report::drop_invalid_bpf(datapath.probes())?;
                let loaded = bpf::prepare(datapath);
                bpf_load = Some(loaded.as_ref().map(|_| ()).map_err(Clone::clone));
                loaded.map(|p| prepared = Some(p))
            }
            Mode::Nftables => nft::probe(),
            Mode::Iptables => iptables::probe(),
            Mode::Liberal => liberal::probe(),
        })
        .map_err(NotPossible)?;
        let mut this =
            DropInvalid { mode, reason, bpf: prepared.filter(|_| mode == Mode::Bpf), bpf_load, holder: Holder::NotYet };
        tracing::info!(mode = %mode, why = describe(mode, reason.code()), "drop-invalid: mode chosen");
        let config = datapath.ct_config()?;
        datapath.set_ct_config(node_manager_common::CtConfig { mode: mode.code(), reason: reason.code(), ..config })?;
        this.ensure(datapath, true).with_context(|| format!("installing drop-invalid mode {mode}"))?;
        if let Some(pins) = datapath.pins_ref().cloned() {
            for error in remove_except(Some(mode), &pins, Some(datapath)) {
                tracing::error!("drop-invalid: {error}");
            }
        }
        Ok(this)
    }

    /// The mode and why, in words (for the kernel-feature report).
    pub fn summary(&self) -> (String, String) {
        (self.mode.to_string(), describe(self.mode, self.reason.code()))
    }

    /// Installs the mechanism, or repairs it if something removed or changed it behind our back.
    /// `thorough`: also what takes a command to check (the conntrack holder).
    pub fn ensure(&mut self, datapath: &mut Datapath, thorough: bool) -> Result<()> {
        let repaired = match self.mode {
            Mode::Bpf => {
                let pins = datapath.pins_ref().cloned().context("no pins")?;
                let linked = bpf::ensure(&pins, self.bpf.as_ref().context("bpf programs not loaded")?)?;
                self.hold_conntrack(&pins, thorough);
                linked
            }
            Mode::Nftables => nft::ensure()?,
            Mode::Iptables => iptables::ensure()?,
            Mode::Liberal => liberal::ensure(datapath)?,
        };
        if repaired {
            tracing::info!(mode = %self.mode, "drop-invalid: installed");
        }
        Ok(())
    }
}

impl DropInvalid {
    /// bpf mode: once conntrack is seen at work in this namespace, keep it hooked (see
    /// `nft::HOLDER_TABLE`), so that an untracked-looking packet is an INVALID one for as long as
    /// the programs drop. Not before: on a node where nothing uses conntrack the programs drop
    /// nothing, and the agent must not start tracking its traffic.
    fn hold_conntrack(&mut self, pins: &crate::kernel::pins::Pins, thorough: bool) {
        if thorough && self.holder != Holder::NotYet {
            self.holder = if nft::holding_conntrack() { Holder::Held } else { Holder::NotYet };
        }
        if self.holder != Holder::NotYet {
            return;
        }
        let window = u64::from(bpf::TRACKED_WINDOW_MS);
        let seen = [node_manager_common::CT_FAMILY_V4, node_manager_common::CT_FAMILY_V6]
            .iter()
            .any(|f| bpf::conntrack_seen_ms_ago(pins, *f).is_some_and(|ms| ms < window));
        if !seen {
            return;
        }
        match nft::hold_conntrack() {
            Ok(installed) => {
                if installed {
                    tracing::info!(
                        table = nft::HOLDER_TABLE,
                        "drop-invalid: conntrack seen at work; holding it hooked"
                    );
                }
                self.holder = Holder::Held;
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "drop-invalid: cannot hold conntrack hooked; if every other user of conntrack goes (kube-proxy's \
                     rules removed), the host's traffic is dropped for up to 5 s"
                );
                self.holder = Holder::Failed;
            }
        }
    }
}

/// The feature off: nothing of any mode stays, and the recorded mode is cleared.
pub fn disable(datapath: &mut Datapath) {
    if let Some(pins) = datapath.pins_ref().cloned() {
        for error in remove_except(None, &pins, Some(datapath)) {
            tracing::error!("drop-invalid: {error}");
        }
    }
    if let Ok(config) = datapath.ct_config() {
        let _ = datapath.set_ct_config(node_manager_common::CtConfig { mode: 0, reason: 0, ..config });
    }
}

/// Counters of the mode recorded in the pinned config (works without a running agent).
pub fn counters(pins: &Pins) -> Counters {
    let config = liberal::pinned_config(&pins.map(node_manager_common::map_names::CT_CONFIG)).unwrap_or_default();
    let mut counters = Counters { conntrack_invalid: ctstat::invalid_total(), ..Counters::default() };
    match Mode::from_code(config.mode) {
        Some(Mode::Bpf) => {
            if let Some(c) = pinned_ct_counters(pins) {
                let get = |name: &str| c.iter().find(|(n, _)| *n == name).map(|(_, c)| (c.packets, c.bytes));
                counters.dropped_v4 = get("invalid_dropped_v4");
                counters.dropped_v6 = get("invalid_dropped_v6");
                counters.unverified_v4 = get("invalid_unverified_v4").map(|c| c.0);
                counters.unverified_v6 = get("invalid_unverified_v6").map(|c| c.0);
            }
        }
        Some(Mode::Nftables) => {
            if let Some((v4, v6)) = nft::counters() {
                (counters.dropped_v4, counters.dropped_v6) = (Some(v4), Some(v6));
            }
        }
        Some(Mode::Iptables) => {
            if let Some((v4, v6)) = iptables::counters() {
                (counters.dropped_v4, counters.dropped_v6) = (Some(v4), Some(v6));
            }
        }
        Some(Mode::Liberal) | None => {}
    }
    counters
}

fn pinned_ct_counters(pins: &Pins) -> Option<Vec<(&'static str, node_manager_common::Counter)>> {
    let data = aya::maps::MapData::from_pin(pins.map(node_manager_common::map_names::CT_COUNTERS)).ok()?;
    let array = aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).ok()?;
    crate::kernel::maps::read_ct_counters(&array).ok()
}

/// The recorded mode and why, from the pins.
pub fn recorded(pins: &Pins) -> Option<(Mode, String)> {
    let config = liberal::pinned_config(&pins.map(node_manager_common::map_names::CT_CONFIG))?;
    let mode = Mode::from_code(config.mode)?;
    Some((mode, describe(mode, config.reason)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_case_insensitively_and_reject_others() {
        assert_eq!("auto".parse::<Requested>(), Ok(Requested::Auto));
        assert_eq!(" BPF ".parse::<Requested>(), Ok(Requested::Only(Mode::Bpf)));
        assert_eq!("liberal".parse::<Requested>(), Ok(Requested::Only(Mode::Liberal)));
        assert!("xdp".parse::<Requested>().unwrap_err().contains("auto, bpf, nftables, iptables or liberal"));
        for mode in Mode::ALL {
            assert_eq!(Mode::from_code(mode.code()), Some(mode));
        }
        assert_eq!(Mode::from_code(0), None);
    }

    fn probe_with(available: &'static [Mode]) -> impl FnMut(Mode) -> Result<(), String> {
        move |m| if available.contains(&m) { Ok(()) } else { Err(format!("no {m}")) }
    }

    #[test]
    fn auto_takes_the_first_available_in_order_and_never_liberal() {
        let auto = |available| choose(Requested::Auto, probe_with(available));
        assert_eq!(auto(&Mode::ALL), Ok((Mode::Bpf, Reason::AutoFirstAvailable)));
        assert_eq!(auto(&[Mode::Nftables, Mode::Iptables]), Ok((Mode::Nftables, Reason::AutoFirstAvailable)));
        assert_eq!(auto(&[Mode::Iptables, Mode::Liberal]), Ok((Mode::Iptables, Reason::AutoFirstAvailable)));
        let err = auto(&[Mode::Liberal]).unwrap_err();
        assert!(err.contains("bpf: no bpf") && err.contains("nftables: no nftables"), "{err}");
    }

    #[test]
    fn an_explicit_mode_never_falls_back() {
        let only = |mode, available| choose(Requested::Only(mode), probe_with(available));
        assert_eq!(only(Mode::Liberal, &[Mode::Liberal]), Ok((Mode::Liberal, Reason::Requested)));
        let err = only(Mode::Bpf, &[Mode::Nftables, Mode::Iptables]).unwrap_err();
        assert_eq!(err, "--drop-invalid-mode bpf is not possible on this node: no bpf");
    }

    #[test]
    fn auto_probes_lazily() {
        let mut asked = Vec::new();
        let _ = choose(Requested::Auto, |m| {
            asked.push(m);
            Ok(())
        });
        assert_eq!(asked, [Mode::Bpf]);
    }

    #[test]
    fn reasons_are_described() {
        assert!(describe(Mode::Nftables, Reason::AutoFirstAvailable.code()).contains("fallback"));
        assert!(describe(Mode::Liberal, Reason::Requested.code()).contains("requested"));
    }
}
