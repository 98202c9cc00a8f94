#!/bin/sh
# Removes the iptables chains that kakao's network-node-manager (and its predecessor
# ipvs-node-controller) leave on a node: they never delete them. Run as root on each node after
# deleting their DaemonSet. Works on every iptables variant installed (legacy and nf_tables,
# IPv4 and IPv6), touches only these chains and the jumps to them, and can be run again.
set -u

# table:chain of every chain they created, jumped to from a built-in chain or not.
CHAINS="filter:NMANAGER_INPUT filter:NMANAGER_DROP_INVALID_INPUT
nat:NMANAGER_PREROUTING nat:NMANAGER_OUTPUT nat:NMANAGER_EX_CLUS_PREROUTING nat:NMANAGER_EX_CLUS_OUTPUT
raw:NMANAGER_PREROUTING raw:NMANAGER_OUTPUT raw:NMANAGER_NOT_DNS_PREROUTING raw:NMANAGER_NOT_DNS_OUTPUT
nat:IPVS_PREROUTING nat:IPVS_OUTPUT"
# table:built-in chain:chain of the jumps they inserted.
JUMPS="filter:INPUT:NMANAGER_INPUT nat:PREROUTING:NMANAGER_PREROUTING nat:OUTPUT:NMANAGER_OUTPUT
raw:PREROUTING:NMANAGER_PREROUTING raw:OUTPUT:NMANAGER_OUTPUT
nat:PREROUTING:IPVS_PREROUTING nat:OUTPUT:IPVS_OUTPUT"

# Whether the saved ruleset ($save) has chain $2 in table $1. Reading the saved ruleset (not
# `iptables -L`) never creates a table that is not there.
has_chain() {
    printf '%s\n' "$save" | awk -v t="*$1" -v c=":$2" '/^\*/ { in_t = ($0 == t) } in_t && $1 == c { f = 1 } END { exit !f }'
}

removed=0
failed=0
for ipt in iptables-legacy iptables-nft ip6tables-legacy ip6tables-nft iptables ip6tables; do
    command -v "$ipt" >/dev/null 2>&1 || continue
    save=$("$ipt-save" 2>/dev/null) || continue
    for jump in $JUMPS; do
        table=${jump%%:*} rest=${jump#*:}
        builtin=${rest%%:*} chain=${rest#*:}
        has_chain "$table" "$chain" || continue
        while "$ipt" -w 5 -t "$table" -D "$builtin" -j "$chain" 2>/dev/null; do
            echo "$ipt -t $table -D $builtin -j $chain"
            removed=$((removed + 1))
        done
    done
    # Flush every chain before deleting any: they jump to each other.
    for op in -F -X; do
        for entry in $CHAINS; do
            table=${entry%%:*} chain=${entry#*:}
            has_chain "$table" "$chain" || continue
            if "$ipt" -w 5 -t "$table" "$op" "$chain"; then
                echo "$ipt -t $table $op $chain"
                [ "$op" = -X ] && removed=$((removed + 1))
            else
                failed=$((failed + 1))
            fi
        done
    done
done
echo "removed $removed chain(s) and jump(s) of network-node-manager"
[ "$failed" -eq 0 ] || { echo "$failed operation(s) failed (see above)" >&2; exit 1; }
