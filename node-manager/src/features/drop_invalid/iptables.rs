//! iptables mode: network-node-manager's own rule (`-m conntrack --ctstate INVALID -j DROP` in
//! INPUT), marked with a comment so it is recognisably ours. For nodes without nft.
use std::process::Command;

use anyhow::{Context as _, Result, bail};

pub const COMMENT: &str = "node-manager: drop conntrack INVALID (kubernetes#74839)";
const BINARIES: [&str; 2] = ["iptables", "ip6tables"];

fn rule() -> [&'static str; 11] {
    ["INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-m", "comment", "--comment", COMMENT, "-j", "DROP"]
}

fn run(bin: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(["-w", "5", "-t", "filter"])
        .args(args)
        .output()
        .with_context(|| format!("running {bin} (is the iptables package installed?)"))?;
    if !out.status.success() {
        bail!("{bin} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn probe() -> Result<(), String> {
    run("iptables", &["-S", "INPUT"]).map(|_| ()).map_err(|e| format!("{e:#}"))
}

/// Inserts the rule first in INPUT for each family that lacks it. ip6tables failing (IPv6 off)
/// is logged, not fatal.
pub fn ensure() -> Result<bool> {
    let mut changed = false;
    for bin in BINARIES {
        let check = [&["-C"][..], &rule()].concat();
        if run(bin, &check).is_ok() {
            continue;
        }
        let insert = [&["-I"][..], &rule()[..1], &["1"], &rule()[1..]].concat();
        match run(bin, &insert) {
            Ok(_) => changed = true,
            Err(e) if bin == "ip6tables" => tracing::warn!(error = format!("{e:#}"), "drop-invalid: no IPv6 rule"),
            Err(e) => return Err(e),
        }
    }
    Ok(changed)
}

pub fn remove() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for bin in BINARIES {
        let delete = [&["-D"][..], &rule()].concat();
        // Every copy (a crash between check and insert could have left two).
        while run(bin, &delete).is_ok() {
            removed.push(format!("{bin} INPUT rule {COMMENT:?}"));
        }
    }
    Ok(removed)
}

/// (packets, bytes) per family from `-S INPUT -v` (`... -c <packets> <bytes>`).
pub fn counters() -> Option<((u64, u64), (u64, u64))> {
    let v4 = run("iptables", &["-S", "INPUT", "-v"]).ok().and_then(|s| parse_counters(&s))?;
    let v6 = run("ip6tables", &["-S", "INPUT", "-v"]).ok().and_then(|s| parse_counters(&s)).unwrap_or((0, 0));
    Some((v4, v6))
}

fn parse_counters(listing: &str) -> Option<(u64, u64)> {
    let line = listing.lines().find(|l| l.contains(COMMENT))?;
    let mut words = line.split_whitespace().skip_while(|w| *w != "-c").skip(1);
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_counters_of_our_rule_only() {
        let listing = format!(
            "-P INPUT ACCEPT -c 10 20\n-A INPUT -m conntrack --ctstate INVALID -m comment --comment \"{COMMENT}\" -c 7 364 -j DROP\n-A INPUT -j ACCEPT -c 1 2\n"
        );
        assert_eq!(parse_counters(&listing), Some((7, 364)));
        assert_eq!(parse_counters("-P INPUT ACCEPT -c 10 20\n"), None);
    }

    #[test]
    fn insert_puts_the_position_after_the_chain() {
        let insert = [&["-I"][..], &rule()[..1], &["1"], &rule()[1..]].concat();
        assert_eq!(&insert[..4], &["-I", "INPUT", "1", "-m"]);
    }
}
