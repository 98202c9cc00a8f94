//! A′: the strongest peer a user without node-manager would write, one nftables set and one
//! map (O(1) lookups, the design of kube-proxy's nftables mode), in its own lab's node
//! namespace: pod traffic to an (external IP, port) in the set is marked for masquerading and
//! DNATed to the cluster IP:port the map gives. One table per family, the same design in each
//! (`ip` with `ipv4_addr`, `ip6` with `ipv6_addr`; a table sees only its family's packets):
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
//! network-node-manager's OUTPUT chain does (it marks them for masquerading too); the benchmark
//! measures them on IPv4.

use std::{
    io::Write as _,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lab::{Lab, Ns};

use crate::services::{Family, Svc};

const TABLE: &str = "nm_bench_peer";

/// The address type of `family`'s elements, and the pod CIDR its rules match.
fn addr_type_and_pods(family: Family) -> (&'static str, &'static str) {
    match family {
        Family::V4 => ("ipv4_addr", lab::POD_CIDR_V4),
        Family::V6 => ("ipv6_addr", lab::POD_CIDR_V6),
    }
}

pub struct NftMap<'a> {
    lab: &'a Lab,
    family: Family,
}

impl<'a> NftMap<'a> {
    pub fn new(lab: &'a Lab, family: Family) -> NftMap<'a> {
        NftMap { lab, family }
    }

    fn table_family(&self) -> &'static str {
        self.family.nft()
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
        let script = ruleset(svcs, self.family);
        let started = Instant::now();
        self.nft(&["-f", "-"], Some(&script)).context("loading the nftables peer")?;
        Ok(started.elapsed())
    }

    pub fn reset(&self) -> Result<()> {
        let family = self.table_family();
        if self.nft(&["list", "table", family, TABLE], None).is_ok() {
            self.nft(&["delete", "table", family, TABLE], None)?;
        }
        Ok(())
    }

    /// One more Service: its elements added to the set and the map in one transaction.
    pub fn add(&self, svc: &Svc) -> Result<Duration> {
        let script = add_script(svc, self.family);
        let started = Instant::now();
        self.nft(&["-f", "-"], Some(&script)).context("adding a Service to the nftables peer")?;
        Ok(started.elapsed())
    }

    /// Packets the DNAT rule of `chain` (`pre` or `out`) counted (only the first packet of a
    /// connection passes a nat chain).
    pub fn dnat_packets(&self, chain: &str) -> Result<u64> {
        let listing = self.nft(&["list", "chain", self.table_family(), TABLE, chain], None)?;
        listing
            .lines()
            .find(|l| l.contains("dnat"))
            .and_then(|l| l.split("counter packets ").nth(1)?.split_whitespace().next()?.parse().ok())
            .context("no counter on the peer's DNAT rule")
    }
}

fn set_elements(svc: &Svc, family: Family) -> Vec<String> {
    let (_, ext) = svc.addrs(family);
    svc.ports.iter().map(|p| format!("{ext} . {p}")).collect()
}

fn map_elements(svc: &Svc, family: Family) -> Vec<String> {
    let (cluster, ext) = svc.addrs(family);
    svc.ports.iter().map(|p| format!("{ext} . {p} : {cluster} . {p}")).collect()
}

/// One more Service's elements, for the set and the map, as one `nft -f` transaction.
fn add_script(svc: &Svc, family: Family) -> String {
    let table_family = family.nft();
    format!(
        "add element {table_family} {TABLE} ext {{ {} }}\nadd element {table_family} {TABLE} extmap {{ {} }}\n",
        set_elements(svc, family).join(", "),
        map_elements(svc, family).join(", ")
    )
}

/// The whole `family` table for `svcs`.
pub fn ruleset(svcs: &[Svc], family: Family) -> String {
    let (ip, (addr_type, pod)) = (family.nft(), addr_type_and_pods(family));
    let set: Vec<String> = svcs.iter().flat_map(|s| set_elements(s, family)).collect();
    let map: Vec<String> = svcs.iter().flat_map(|s| map_elements(s, family)).collect();
    format!(
        "table {ip} {TABLE} {{\n  set ext {{ type {addr_type} . inet_service; elements = {{ {} }} }}\n  \
         map extmap {{ type {addr_type} . inet_service : {addr_type} . inet_service; elements = {{ {} }} }}\n  \
         chain pre {{ type nat hook prerouting priority dstnat; policy accept;\n    \
         {ip} saddr {pod} {ip} daddr . tcp dport @ext meta mark set meta mark | 0x4000\n    \
         {ip} saddr {pod} counter dnat {ip} to {ip} daddr . tcp dport map @extmap\n  }}\n  \
         chain out {{ type nat hook output priority -100; policy accept;\n    \
         {ip} daddr . tcp dport @ext meta mark set meta mark | 0x4000\n    \
         counter dnat {ip} to {ip} daddr . tcp dport map @extmap\n  }}\n}}\n",
        set.join(", "),
        map.join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_has_one_set_and_one_map_element_per_port() {
        let text = ruleset(&crate::services::services(3), Family::V4);
        assert!(
            text.contains("203.0.113.11 . 1000, 203.0.113.12 . 1000, 203.0.113.10 . 9000, 203.0.113.10 . 5201"),
            "{text}"
        );
        assert!(text.contains("203.0.113.11 . 1000 : 198.51.100.11 . 1000"), "{text}");
        assert!(text.contains("dnat ip to ip daddr . tcp dport map @extmap"), "{text}");
        assert!(text.contains("chain out { type nat hook output priority -100;"), "{text}");
    }

    #[test]
    fn the_ipv6_table_has_the_same_design_with_the_ipv6_addresses() {
        let text = ruleset(&crate::services::services(3), Family::V6);
        assert!(text.starts_with("table ip6 nm_bench_peer {"), "{text}");
        assert!(text.contains("set ext { type ipv6_addr . inet_service; elements = { 2001:db8:e:1:: . 1000, 2001:db8:e:1::1 . 1000, 2001:db8:e::10 . 9000, 2001:db8:e::10 . 5201 } }"), "{text}");
        assert!(text.contains("map extmap { type ipv6_addr . inet_service : ipv6_addr . inet_service;"), "{text}");
        assert!(text.contains("2001:db8:e:1::1 . 1000 : 2001:db8:5::101 . 1000"), "{text}");
        assert!(text.contains("2001:db8:e::10 . 9000 : 2001:db8:5::10 . 9000"), "{text}");
        assert!(
            text.contains("ip6 saddr 2001:db8:1::/64 ip6 daddr . tcp dport @ext meta mark set meta mark | 0x4000"),
            "{text}"
        );
        assert!(
            text.contains("ip6 saddr 2001:db8:1::/64 counter dnat ip6 to ip6 daddr . tcp dport map @extmap"),
            "{text}"
        );
        assert!(!text.contains("203.0.113") && !text.contains(" ip "), "{text}");
        let add = add_script(&crate::services::filler(5), Family::V6);
        assert_eq!(
            add,
            "add element ip6 nm_bench_peer ext { 2001:db8:e:1::5 . 1000 }\n\
             add element ip6 nm_bench_peer extmap { 2001:db8:e:1::5 . 1000 : 2001:db8:5::105 . 1000 }\n"
        );
    }
}
