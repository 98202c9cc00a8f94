//! Which mechanism drops INVALID packets, decided purely: the modes, what was asked for, and
//! `choose`, which asks a probe per mode lazily (so `auto` stops at the first that works).
use std::{fmt, str::FromStr};

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Bpf,
    Nftables,
    Iptables,
    Liberal,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Bpf, Mode::Nftables, Mode::Iptables, Mode::Liberal];
    /// What `auto` tries, in order. `liberal` changes how conntrack judges every TCP flow on the
    /// node, so it is only ever chosen explicitly.
    pub const AUTO_ORDER: [Mode; 3] = [Mode::Bpf, Mode::Nftables, Mode::Iptables];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Bpf => "bpf",
            Mode::Nftables => "nftables",
            Mode::Iptables => "iptables",
            Mode::Liberal => "liberal",
        }
    }

    /// Stored in the pinned `NM_CT_CONFIG` map so `inspect` and `cleanup` know it.
    pub fn code(self) -> u32 {
        match self {
            Mode::Bpf => 1,
            Mode::Nftables => 2,
            Mode::Iptables => 3,
            Mode::Liberal => 4,
        }
    }

    pub fn from_code(code: u32) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.code() == code)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requested {
    Auto,
    Only(Mode),
}

impl FromStr for Requested {
    type Err = String;
    fn from_str(s: &str) -> Result<Requested, String> {
        let s = s.trim().to_ascii_lowercase();
        if s == "auto" {
            return Ok(Requested::Auto);
        }
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .map(Requested::Only)
            .ok_or_else(|| format!("{s:?} is not a mode; use auto, bpf, nftables, iptables or liberal"))
    }
}

/// Why the mode in force is the one it is (stored as a code next to the mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Requested,
    /// `auto`, and every mode before this one in `AUTO_ORDER` was unavailable.
    AutoFirstAvailable,
}

impl Reason {
    pub fn code(self) -> u32 {
        match self {
            Reason::Requested => 1,
            Reason::AutoFirstAvailable => 2,
        }
    }
}

/// Why the chosen mode, in words (for the log and `inspect`).
pub fn describe(mode: Mode, reason_code: u32) -> String {
    match (reason_code, mode) {
        (1, _) => format!("{mode} requested with --drop-invalid-mode"),
        (2, Mode::Bpf) => "auto: this kernel has BPF netfilter links".to_owned(),
        (2, Mode::Nftables) => {
            "auto: no BPF netfilter links in this kernel (< 6.4 or refused); nftables fallback".to_owned()
        }
        (2, Mode::Iptables) => "auto: neither BPF netfilter links nor nftables available; iptables fallback".to_owned(),
        _ => format!("{mode}"),
    }
}

/// The decision, pure: the mode to use and why, or an error naming what the requested mode needs.
/// `probe` is asked lazily, in order, so `auto` stops at the first mode that works.
pub fn choose(
    requested: Requested,
    mut probe: impl FnMut(Mode) -> Result<(), String>,
) -> Result<(Mode, Reason), String> {
    match requested {
        Requested::Only(mode) => probe(mode)
            .map(|()| (mode, Reason::Requested))
            .map_err(|why| format!("--drop-invalid-mode {mode} is not possible on this node: {why}")),
        Requested::Auto => {
            let mut missing = Vec::new();
            for mode in Mode::AUTO_ORDER {
                match probe(mode) {
                    Ok(()) => {
                        for (m, why) in &missing {
                            tracing::info!(mode = %m, why, "drop-invalid: mode unavailable, falling back");
                        }
                        return Ok((mode, Reason::AutoFirstAvailable));
                    }
                    Err(why) => missing.push((mode, why)),
                }
            }
            let all: Vec<String> = missing.iter().map(|(m, why)| format!("{m}: {why}")).collect();
            Err(format!("no way to drop conntrack-INVALID packets on this node ({})", all.join("; ")))
        }
    }
}
