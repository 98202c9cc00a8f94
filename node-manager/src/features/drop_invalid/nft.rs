//! nftables mode: a table of our own, so the rule is atomic to install and remove, independent of
//! kube-proxy's chains and of the xtables lock. Driven through the `nft` command.
use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

pub const TABLE: &str = "node_manager";
pub const CHAIN: &str = "drop_invalid_input";

/// Priority -100: after conntrack and mangle, before filter INPUT (0).
const RULESET: &str = r#"table inet node_manager {
	counter invalid_v4 {
	}
	counter invalid_v6 {
	}
	chain drop_invalid_input {
		type filter hook input priority -100; policy accept;
		meta nfproto ipv4 ct state invalid counter name "invalid_v4" drop comment "node-manager: kubernetes#74839"
		meta nfproto ipv6 ct state invalid counter name "invalid_v6" drop comment "node-manager: kubernetes#74839"
	}
}
"#;

fn nft(args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is the nftables package installed?)")?;
    if let Some(input) = stdin {
        child.stdin.take().context("nft stdin")?.write_all(input.as_bytes()).context("writing to nft")?;
    }
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Can this node run the table? `nft --check` validates the whole ruleset in the kernel
/// (nf_tables, conntrack expressions) without committing it.
pub fn probe() -> Result<(), String> {
    nft(&["--check", "-f", "-"], Some(RULESET)).map(|_| ()).map_err(|e| format!("{e:#}"))
}

fn installed() -> bool {
    nft(&["list", "table", "inet", TABLE], None).is_ok_and(|listing| {
        listing.contains(CHAIN)
            && listing.matches("ct state invalid counter name").count() == 2
            && listing.contains("hook input priority")
    })
}

/// Installs the table unless it is already there intact; a damaged one is replaced atomically
/// (one nft transaction: create-if-missing, delete, create).
pub fn ensure() -> Result<bool> {
    if installed() {
        return Ok(false);
    }
    let script = format!("table inet {TABLE}\ndelete table inet {TABLE}\n{RULESET}");
    nft(&["-f", "-"], Some(&script)).context("installing the nftables table")?;
    Ok(true)
}

/// The bpf mode's conntrack holder: the kernel hooks conntrack into a network namespace only
/// while something there needs it (kube-proxy's rules; ours), and unhooks it the moment the
/// last user goes (`kube-proxy --cleanup`, a proxy replaced). Then every packet reaches
/// LOCAL_IN untracked, exactly like an INVALID one, and the bpf programs would drop the host's
/// traffic for as long as their guard remembers conntrack at work. A `ct` expression makes a
/// table a user; in a chain without a hook it is never evaluated (no per-packet cost).
pub const HOLDER_TABLE: &str = "node_manager_conntrack";
const HOLDER: &str = r#"table inet node_manager_conntrack {
	chain hold {
		ct state invalid counter comment "node-manager: keeps conntrack hooked for the bpf INVALID drop"
	}
}
"#;

/// Installs the holder unless it is there.
pub fn hold_conntrack() -> Result<bool> {
    if nft(&["list", "table", "inet", HOLDER_TABLE], None).is_ok_and(|l| l.contains("ct state invalid")) {
        return Ok(false);
    }
    let script = format!("table inet {HOLDER_TABLE}\ndelete table inet {HOLDER_TABLE}\n{HOLDER}");
    nft(&["-f", "-"], Some(&script)).context("installing the conntrack holder table")?;
    Ok(true)
}

/// The names of the `inet` tables in this namespace (one `nft` run; empty without nft).
pub fn inet_tables() -> Vec<String> {
    nft(&["list", "tables", "inet"], None)
        .map(|l| l.lines().filter_map(|t| t.strip_prefix("table inet ")).map(|t| t.trim().to_owned()).collect())
        .unwrap_or_default()
}

pub fn holding_conntrack() -> bool {
    nft(&["list", "table", "inet", HOLDER_TABLE], None).is_ok()
}

pub fn release_conntrack() -> Result<Vec<String>> {
    match nft(&["list", "table", "inet", HOLDER_TABLE], None) {
        Ok(_) => {
            nft(&["delete", "table", "inet", HOLDER_TABLE], None)?;
            Ok(vec![format!("nftables table inet {HOLDER_TABLE} (the conntrack holder)")])
        }
        Err(_) => Ok(Vec::new()),
    }
}

pub fn remove() -> Result<Vec<String>> {
    match nft(&["list", "table", "inet", TABLE], None) {
        Ok(_) => {
            nft(&["delete", "table", "inet", TABLE], None)?;
            Ok(vec![format!("nftables table inet {TABLE}")])
        }
        Err(_) => Ok(Vec::new()), // no nft, or no table: nothing of ours
    }
}

/// (packets, bytes) dropped per family, from the table's named counters.
pub fn counters() -> Option<((u64, u64), (u64, u64))> {
    let json = nft(&["-j", "list", "counters", "table", "inet", TABLE], None).ok()?;
    parse_counters(&json)
}

fn parse_counters(json: &str) -> Option<((u64, u64), (u64, u64))> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let mut found = [None, None];
    for item in value.get("nftables")?.as_array()? {
        let Some(c) = item.get("counter") else { continue };
        let slot = match c.get("name")?.as_str()? {
            "invalid_v4" => 0,
            "invalid_v6" => 1,
            _ => continue,
        };
        found[slot] = Some((c.get("packets")?.as_u64()?, c.get("bytes")?.as_u64()?));
    }
    Some((found[0]?, found[1]?))
}

#[cfg(test)]
mod tests {
    use super::parse_counters;

    #[test]
    fn reads_named_counters_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"counter": {"family": "inet", "name": "invalid_v4", "table": "node_manager", "handle": 1, "packets": 3, "bytes": 156}},
            {"counter": {"family": "inet", "name": "invalid_v6", "table": "node_manager", "handle": 2, "packets": 0, "bytes": 0}}]}"#;
        assert_eq!(parse_counters(json), Some(((3, 156), (0, 0))));
        assert_eq!(parse_counters(r#"{"nftables": []}"#), None);
        assert_eq!(parse_counters("not json"), None);
    }
}
