//! Capabilities the agent needs, checked before it touches the kernel, so a missing one is
//! named instead of surfacing as a bare EPERM from deep inside a load or attach.
use anyhow::{Result, bail};

use crate::config::Config;

/// Linux capability numbers (include/uapi/linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// One requirement: `cap`, or CAP_SYS_ADMIN (which the kernel accepts in its place, and is the
/// only option before Linux 5.8).
struct Need {
    cap: u32,
    name: &'static str,
    why: &'static str,
}

fn needs(cfg: &Config) -> Vec<Need> {
    let mut needs = vec![Need { cap: CAP_BPF, name: "CAP_BPF", why: "create maps, load programs, pin them in bpffs" }];
    // Without CAP_PERFMON the verifier treats the loader as unprivileged and does not offer
    // bpf_probe_read_kernel (the INVALID drop's bpf mode reads skb->_nfct). The pod programs
    // and socket hooks load without it (on Linux 6.18: tests/least_privilege.rs) since they make
    // no BPF-to-BPF calls; a kernel whose verifier still refuses them reports the feature
    // unavailable with its reason. deploy/README.md.
    let bpf_mode_possible = matches!(
        cfg.drop_invalid_mode,
        crate::features::drop_invalid::Requested::Auto
            | crate::features::drop_invalid::Requested::Only(crate::features::drop_invalid::Mode::Bpf)
    );
    if cfg.drop_invalid_input && bpf_mode_possible {
        needs.push(Need {
            cap: CAP_PERFMON,
            name: "CAP_PERFMON",
            why: "load the INVALID-drop program, which reads kernel memory (or set DROP_INVALID_MODE=nftables)",
        });
    }
    if cfg.external_cluster || cfg.drop_invalid_input {
        needs.push(Need {
            cap: CAP_NET_ADMIN,
            name: "CAP_NET_ADMIN",
            why: "attach TC and netfilter programs, run nft/iptables, set conntrack sysctls",
        });
    }
    needs
}

/// Effective capability set of this process, from /proc/self/status.
fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// What is missing from `have` (an effective set) for `needs`.
fn missing(have: u64, needs: &[Need]) -> Vec<String> {
    let has = |cap: u32| have & (1 << cap) != 0;
    needs.iter().filter(|n| !has(n.cap) && !has(CAP_SYS_ADMIN)).map(|n| format!("{} (to {})", n.name, n.why)).collect()
}

pub fn check(cfg: &Config) -> Result<()> {
    let Some(have) = effective() else {
        return Ok(()); // no /proc: let the kernel answer
    };
    let missing = missing(have, &needs(cfg));
    if !missing.is_empty() {
        bail!(
            "missing capabilities: {}. Run as root, or add them to the container's \
             securityContext.capabilities.add (see deploy/README.md)",
            missing.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn all_needs() -> Vec<Need> {
        vec![
            Need { cap: CAP_BPF, name: "CAP_BPF", why: "a" },
            Need { cap: CAP_PERFMON, name: "CAP_PERFMON", why: "b" },
            Need { cap: CAP_NET_ADMIN, name: "CAP_NET_ADMIN", why: "c" },
        ]
    }

    #[test]
    fn names_each_missing_capability() {
        let have = (1 << CAP_BPF) | (1 << CAP_NET_ADMIN);
        let m = missing(have, &all_needs());
        assert_eq!(m.len(), 1);
        assert!(m[0].starts_with("CAP_PERFMON"), "{m:?}");
        assert_eq!(missing(0, &all_needs()).len(), 3);
    }

    fn config(external_cluster: bool, drop_invalid_input: bool, mode: &str) -> Config {
        let args = crate::config::Cli::parse_from([
            "node-manager",
            "run",
            "--external-cluster",
            if external_cluster { "true" } else { "false" },
            "--drop-invalid-input",
            if drop_invalid_input { "true" } else { "false" },
            "--drop-invalid-mode",
            mode,
        ]);
        let crate::config::Command::Run(args) = args.command else { unreachable!() };
        Config::from_run_args(*args).unwrap()
    }

    fn needed(cfg: &Config) -> Vec<&'static str> {
        needs(cfg).iter().map(|n| n.name).collect()
    }

    #[test]
    fn perfmon_only_where_the_bpf_drop_may_load() {
        // The pod and socket programs verify without CAP_PERFMON (tests/least_privilege.rs).
        assert_eq!(needed(&config(true, true, "nftables")), ["CAP_BPF", "CAP_NET_ADMIN"]);
        assert_eq!(needed(&config(true, false, "auto")), ["CAP_BPF", "CAP_NET_ADMIN"]);
        assert_eq!(needed(&config(true, true, "auto")), ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
        assert_eq!(needed(&config(false, true, "bpf")), ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]);
        assert_eq!(needed(&config(false, true, "nftables")), ["CAP_BPF", "CAP_NET_ADMIN"]);
    }

    #[test]
    fn sys_admin_stands_in_for_all() {
        assert!(missing(1 << CAP_SYS_ADMIN, &all_needs()).is_empty());
        assert!(missing((1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN), &all_needs()).is_empty());
    }
}
