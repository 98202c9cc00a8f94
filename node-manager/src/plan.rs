//! The agent's decisions, pure: which pod CIDRs the datapath serves, which interfaces to attach
//! to and release, when the agent is ready. `agent` applies them; nothing here does I/O, so
//! every rule is a table test below.
use std::collections::BTreeSet;

use ipnet::IpNet;

/// The Node's pod CIDRs, overridden per family by POD_CIDR_IPV4 / POD_CIDR_IPV6 (a CNI such as
/// Calico IPAM does not fill spec.podCIDRs, and may do so for one family only), limited to the
/// families that are on.
pub fn pod_cidrs(overrides: Option<&[IpNet]>, from_node: Option<&[IpNet]>, ipv4: bool, ipv6: bool) -> BTreeSet<IpNet> {
    let overrides = overrides.unwrap_or_default();
    let overridden = |v4: bool| overrides.iter().any(|n| n.addr().is_ipv4() == v4);
    let from_node = from_node.unwrap_or_default().iter().filter(|n| !overridden(n.addr().is_ipv4()));
    overrides.iter().chain(from_node).filter(|n| if n.addr().is_ipv4() { ipv4 } else { ipv6 }).copied().collect()
}

/// What an interface sync does: attach where wanted and not attached by this process yet;
/// release what is attached (by us, or pinned by an earlier run) and no longer wanted.
#[derive(Debug, PartialEq, Eq)]
pub struct InterfaceChanges<I> {
    pub attach: Vec<I>,
    pub detach: Vec<I>,
}

pub fn interface_changes<I: Ord + Clone>(
    wanted: &BTreeSet<I>,
    attached_here: &BTreeSet<I>,
    pinned: &BTreeSet<I>,
) -> InterfaceChanges<I> {
    InterfaceChanges {
        attach: wanted.difference(attached_here).cloned().collect(),
        detach: pinned.union(attached_here).filter(|i| !wanted.contains(i)).cloned().collect(),
    }
}

/// What readiness waits for, beyond the first sync.
pub struct Attachments {
    pub external_cluster: bool,
    pub drop_invalid_input: bool,
    pub taken_over: bool,
    pub interfaces_ok: bool,
    pub drop_invalid_running: bool,
}

/// Ready once this process attached its programs, every wanted interface has them and the
/// INVALID drop (if asked for) is in place.
pub fn attached(a: &Attachments) -> bool {
    let interfaces_done = !a.external_cluster || a.interfaces_ok;
    let drop_invalid_ok = !a.drop_invalid_input || a.drop_invalid_running;
    a.taken_over && interfaces_done && drop_invalid_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn set(list: &[&str]) -> BTreeSet<IpNet> {
        nets(list).into_iter().collect()
    }

    #[test]
    fn pod_cidrs_override_per_family_and_follow_the_families_that_are_on() {
        // (overrides, from the Node, ipv4, ipv6) -> served
        type Case<'a> = (Option<&'a [&'a str]>, Option<&'a [&'a str]>, bool, bool, &'a [&'a str]);
        let cases: &[Case] = &[
            (None, None, true, true, &[]),
            (None, Some(&["10.244.1.0/24", "fd00:1::/64"]), true, true, &["10.244.1.0/24", "fd00:1::/64"]),
            (None, Some(&["10.244.1.0/24", "fd00:1::/64"]), true, false, &["10.244.1.0/24"]),
            (None, Some(&["10.244.1.0/24", "fd00:1::/64"]), false, true, &["fd00:1::/64"]),
            // An IPv4 override replaces the Node's IPv4 CIDR only.
            (
                Some(&["192.0.2.0/24"]),
                Some(&["10.244.1.0/24", "fd00:1::/64"]),
                true,
                true,
                &["192.0.2.0/24", "fd00:1::/64"],
            ),
            (
                Some(&["2001:db8::/64"]),
                Some(&["10.244.1.0/24", "fd00:1::/64"]),
                true,
                true,
                &["10.244.1.0/24", "2001:db8::/64"],
            ),
            (
                Some(&["192.0.2.0/24", "2001:db8::/64"]),
                Some(&["10.244.1.0/24"]),
                true,
                true,
                &["192.0.2.0/24", "2001:db8::/64"],
            ),
            // Overrides without a Node value (Calico IPAM), and a family that is off.
            (Some(&["192.0.2.0/24", "2001:db8::/64"]), None, true, false, &["192.0.2.0/24"]),
        ];
        for (overrides, node, v4, v6, want) in cases {
            let (o, n) = (overrides.map(nets), node.map(nets));
            assert_eq!(pod_cidrs(o.as_deref(), n.as_deref(), *v4, *v6), set(want), "{overrides:?} {node:?} {v4} {v6}");
        }
    }

    #[test]
    fn interface_changes_attach_the_new_and_release_the_unwanted() {
        let s = |l: &[u32]| l.iter().copied().collect::<BTreeSet<u32>>();
        // (wanted, attached by this process, pinned) -> (attach, detach)
        type Case<'a> = (&'a [u32], &'a [u32], &'a [u32], &'a [u32], &'a [u32]);
        let cases: &[Case] = &[
            (&[], &[], &[], &[], &[]),
            (&[1, 2], &[], &[], &[1, 2], &[]),
            // Pinned by the previous agent: attached again (taking over), not released.
            (&[1, 2], &[], &[1, 2], &[1, 2], &[]),
            (&[1, 2], &[1], &[1], &[2], &[]),
            // Gone, or the feature off (nothing wanted): every pinned or attached one released.
            (&[1], &[1, 2], &[1, 2, 3], &[], &[2, 3]),
            (&[], &[1], &[1, 4], &[], &[1, 4]),
        ];
        for (wanted, here, pinned, attach, detach) in cases {
            let got = interface_changes(&s(wanted), &s(here), &s(pinned));
            assert_eq!(
                got,
                InterfaceChanges { attach: attach.to_vec(), detach: detach.to_vec() },
                "{wanted:?} {here:?} {pinned:?}"
            );
        }
    }

    #[test]
    fn readiness_waits_for_what_was_asked_for() {
        let a = |external_cluster, drop_invalid_input, taken_over, interfaces_ok, drop_invalid_running| Attachments {
            external_cluster,
            drop_invalid_input,
            taken_over,
            interfaces_ok,
            drop_invalid_running,
        };
        assert!(attached(&a(true, true, true, true, true)));
        assert!(!attached(&a(true, true, false, true, true)), "not taken over yet");
        assert!(!attached(&a(true, false, true, false, false)), "an interface failed");
        assert!(attached(&a(false, false, true, false, false)), "rewrite off: interfaces do not matter");
        assert!(!attached(&a(false, true, true, true, false)), "drop asked for, not running");
        assert!(attached(&a(false, false, true, true, false)), "drop not asked for");
    }
}
