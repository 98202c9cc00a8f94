//! A′: the strongest peer a user without node-manager would write, one nftables set and one
//! map (O(1) lookups, the design of kube-proxy's nftables mode), in its own lab's node
//! namespace: pod traffic to an (external IP, port) in the set is marked for masquerading and
//! DNATed to the cluster IP:port the map gives. IPv4, as the other sides.
//!
//! ```text
//! table ip nm_bench_peer {
//!   set ext { type ipv4_addr . inet_service; elements = { EXT . PORT, ... } }
//!   map extmap { type ipv4_addr . inet_service : ipv4_addr . inet_service; elements = { ... } }
//!   chain pre { type nat hook prerouting priority dstnat; policy accept;
//!     ip saddr POD_CIDR ip daddr . tcp dport @ext meta mark set meta mark | 0x4000
//!     ip saddr POD_CIDR counter dnat ip to ip daddr . tcp dport map @extmap }
//!   chain out { type nat hook output priority -100; policy accept;
//!     ip daddr . tcp dport @ext meta mark set meta mark | 0x4000
//!     counter dnat ip to ip daddr . tcp dport map @extmap } }
//! ```
//!
//! The output chain serves the node's own processes (host-network clients), as
//! network-node-manager's OUTPUT chain does (it marks them for masquerading too).

use std::{
    io::Write as _,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lab::{Lab, Ns};

use crate::services::Svc;

const TABLE: &str = "nm_bench_peer";

pub struct NftMap<'a> {
    lab: &'a Lab,
}

impl<'a> NftMap<'a> {
    pub fn new(lab: &'a Lab) -> NftMap<'a> {
        NftMap { lab }
    }

    fn nft(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let mut child = self
            .lab
            .command(Ns::Node, "nft")
            .args(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft")?;
        if let Some(text) = stdin {
            child.stdin.take().context("nft stdin")?.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Removes the table (if there) and loads it with `svcs` in one `nft -f`: the time of that
    /// `nft -f` (apply from nothing).
    pub fn load(&self, svcs: &[Svc]) -> Result<Duration> {
        self.reset()?;
        let script = ruleset(svcs);
        let started = Instant::now();
        self.nft(&["-f", "-"], Some(&script)).context("loading the nftables peer")?;
        Ok(started.elapsed())
    }

    pub fn reset(&self) -> Result<()> {
        if self.nft(&["list", "table", "ip", TABLE], None).is_ok() {
            self.nft(&["delete", "table", "ip", TABLE], None)?;
        }
        Ok(())
    }

    /// One more Service: its elements added to the set and the map in one transaction.
    pub fn add(&self, svc: &Svc) -> Result<Duration> {
        let script = format!(
            "add element ip {TABLE} ext {{ {} }}\nadd element ip {TABLE} extmap {{ {} }}\n",
            set_elements(svc).join(", "),
            map_elements(svc).join(", ")
        );
        let started = Instant::now();
        self.nft(&["-f", "-"], Some(&script)).context("adding a Service to the nftables peer")?;
        Ok(started.elapsed())
    }

    /// Packets the DNAT rule of `chain` (`pre` or `out`) counted (only the first packet of a
    /// connection passes a nat chain).
    pub fn dnat_packets(&self, chain: &str) -> Result<u64> {
        let listing = self.nft(&["list", "chain", "ip", TABLE, chain], None)?;
        listing
            .lines()
            .find(|l| l.contains("dnat"))
            .and_then(|l| l.split("counter packets ").nth(1)?.split_whitespace().next()?.parse().ok())
            .context("no counter on the peer's DNAT rule")
    }
}

fn set_elements(svc: &Svc) -> Vec<String> {
    svc.ports.iter().map(|p| format!("{} . {p}", svc.lb)).collect()
}

fn map_elements(svc: &Svc) -> Vec<String> {
    svc.ports.iter().map(|p| format!("{} . {p} : {} . {p}", svc.lb, svc.cluster)).collect()
}

/// The whole table for `svcs`.
pub fn ruleset(svcs: &[Svc]) -> String {
    let set: Vec<String> = svcs.iter().flat_map(set_elements).collect();
    let map: Vec<String> = svcs.iter().flat_map(map_elements).collect();
    format!(
        "table ip {TABLE} {{\n  set ext {{ type ipv4_addr . inet_service; elements = {{ {} }} }}\n  \
         map extmap {{ type ipv4_addr . inet_service : ipv4_addr . inet_service; elements = {{ {} }} }}\n  \
         chain pre {{ type nat hook prerouting priority dstnat; policy accept;\n    \
         ip saddr {pod} ip daddr . tcp dport @ext meta mark set meta mark | 0x4000\n    \
         ip saddr {pod} counter dnat ip to ip daddr . tcp dport map @extmap\n  }}\n  \
         chain out {{ type nat hook output priority -100; policy accept;\n    \
         ip daddr . tcp dport @ext meta mark set meta mark | 0x4000\n    \
         counter dnat ip to ip daddr . tcp dport map @extmap\n  }}\n}}\n",
        set.join(", "),
        map.join(", "),
        pod = lab::POD_CIDR_V4
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_has_one_set_and_one_map_element_per_port() {
        let text = ruleset(&crate::services::services(3));
        assert!(
            text.contains("203.0.113.11 . 1000, 203.0.113.12 . 1000, 203.0.113.10 . 9000, 203.0.113.10 . 5201"),
            "{text}"
        );
        assert!(text.contains("203.0.113.11 . 1000 : 198.51.100.11 . 1000"), "{text}");
        assert!(text.contains("dnat ip to ip daddr . tcp dport map @extmap"), "{text}");
        assert!(text.contains("chain out { type nat hook output priority -100;"), "{text}");
    }
}
