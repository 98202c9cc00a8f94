//! The counters, each declared once in a table: the macro generates the enum (the index into
//! the per-CPU array), the length, the list of all of them, their stable names (used by
//! `inspect` and metrics) and their kind (which hook counts them).

/// Which part of the datapath counts a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterKind {
    /// An outcome of the TC pod programs.
    Tc,
    /// A failure of the TC pod programs (never expected).
    TcFailure,
    /// A cgroup socket-address hook (counts calls; bytes stay 0).
    Sock,
    /// The netfilter conntrack-INVALID programs.
    Netfilter,
}

macro_rules! counters {
    ($(#[$meta:meta])* $enum:ident, $len:ident { $($(#[$doc:meta])* $variant:ident = $index:literal, $name:literal, $kind:ident;)* }) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $enum {
            $($(#[$doc])* $variant = $index,)*
        }

        pub const $len: u32 = [$($enum::$variant),*].len() as u32;

        impl $enum {
            pub const ALL: [$enum; $len as usize] = [$($enum::$variant),*];

            /// Stable snake_case name, used by `inspect` and metrics.
            pub const fn name(self) -> &'static str {
                match self {
                    $($enum::$variant => $name,)*
                }
            }

            /// Which part of the datapath counts it.
            pub const fn kind(self) -> CounterKind {
                match self {
                    $($enum::$variant => CounterKind::$kind,)*
                }
            }
        }

        // The indices are the positions in the table.
        const _: () = {
            let mut i = 0;
            while i < $enum::ALL.len() {
                assert!($enum::ALL[i] as usize == i);
                i += 1;
            }
        };
    };
}

counters! {
    /// Index of each counter in the per-CPU counters array (`NM_COUNTERS`).
    CounterIndex, COUNTERS_LEN {
        /// Pod → external frontend, destination rewritten to the cluster IP.
        RewriteIngressV4 = 0, "rewrite_ingress_v4", Tc;
        RewriteIngressV6 = 1, "rewrite_ingress_v6", Tc;
        /// Reply from the cluster IP, source rewritten back to the external address.
        RewriteEgressV4 = 2, "rewrite_egress_v4", Tc;
        RewriteEgressV6 = 3, "rewrite_egress_v6", Tc;
        /// Not IPv4/IPv6 (ARP, VLAN-tagged, ...): passed.
        PassNotIp = 4, "pass_not_ip", Tc;
        /// IP but not rewritable: IPv4 options, IPv6 extension header, other protocol, ICMP
        /// errors from a pod or quoting what cannot be parsed, truncated. Passed untouched.
        PassUnparsed = 5, "pass_unparsed", Tc;
        /// Addressed to a frontend, but from a source outside the local pod CIDRs: passed.
        PassNotPod = 6, "pass_not_pod", Tc;
        /// No frontend for (destination, port, protocol): passed.
        PassNoFrontend = 7, "pass_no_frontend", Tc;
        /// Egress packet that belongs to no rewritten flow: passed.
        PassNoFlow = 8, "pass_no_flow", Tc;
        /// Flow could not be remembered (map update failed); the packet was still rewritten.
        FlowInsertFailed = 9, "flow_insert_failed", TcFailure;
        /// Rewrite helper failed; the packet was passed (possibly partly rewritten: counted so it
        /// shows).
        RewriteFailed = 10, "rewrite_failed", TcFailure;
        // Host-network sockets (cgroup socket-address hooks). These count calls, not packets
        // (their byte count stays 0).
        /// `connect` to a frontend redirected to the cluster IP.
        SockConnectV4 = 11, "sock_connect_v4", Sock;
        SockConnectV6 = 12, "sock_connect_v6", Sock;
        /// Unconnected UDP `sendmsg` to a frontend redirected to the cluster IP.
        SockSendmsgV4 = 13, "sock_sendmsg_v4", Sock;
        SockSendmsgV6 = 14, "sock_sendmsg_v6", Sock;
        /// UDP `recvmsg` from the cluster IP shown as coming from the external address.
        SockRecvmsgV4 = 15, "sock_recvmsg_v4", Sock;
        SockRecvmsgV6 = 16, "sock_recvmsg_v6", Sock;
        /// `getpeername` shown as the external address.
        SockGetpeernameV4 = 17, "sock_getpeername_v4", Sock;
        SockGetpeernameV6 = 18, "sock_getpeername_v6", Sock;
        /// `connect`/`sendmsg` to no frontend (or a protocol the hook does not rewrite): untouched.
        SockPassNoFrontend = 19, "sock_pass_no_frontend", Sock;
        /// The socket could not be remembered (map update failed): the call was still redirected,
        /// but `getpeername`/`recvmsg` will show the cluster IP.
        SockRevInsertFailed = 20, "sock_rev_insert_failed", Sock;
        /// A rewritten pod packet whose flow was not remembered yet: a new entry in the flow map
        /// (the rate of new rewritten flows; a full map evicts its least recently used entry).
        FlowCreated = 21, "flow_created", Tc;
        /// A rewritten TCP segment without SYN whose flow was not remembered: the entry of an open
        /// connection was evicted (flow map full) or removed, so replies sent meanwhile reached the
        /// pod untranslated (from the cluster IP) and the connection most likely broke. The entry
        /// is created again.
        FlowLost = 22, "flow_lost", Tc;
        /// A pod packet to no frontend on the tuple of a remembered flow: the pod now talks to the
        /// cluster address directly, from a port an earlier, rewritten flow used (a TCP SYN, or any
        /// UDP or ICMP echo packet). The entry was removed, so that the replies keep the cluster
        /// address the pod dialled.
        FlowDirectReuse = 23, "flow_direct_reuse", Tc;
        /// A fragment of a rewritten datagram translated: a first fragment (by its ports, as any
        /// packet; also counted as a rewrite) or a later one (by the datagram's identification,
        /// remembered from its first in `NM_FRAGS`).
        FragTranslated = 24, "frag_translated", Tc;
        /// A later fragment from a pod to an external address whose first fragment was not seen
        /// (reordered, or evicted from `NM_FRAGS`): passed untouched, so the datagram is lost.
        /// (Later fragments to a pod cannot be told from any other fragmented traffic to it:
        /// those count as `pass_no_flow`.)
        FragUnmatched = 25, "frag_unmatched", Tc;
        /// An ICMP error to a pod about a packet of a rewritten flow (fragmentation needed or
        /// packet too big from a hop with a smaller MTU, an unreachable port, a time exceeded):
        /// the quoted packet given its external destination back, so the pod's socket gets the
        /// error (path MTU discovery works). Errors about other packets count as
        /// `pass_no_flow`.
        IcmpErrorTranslated = 26, "icmp_error_translated", Tc;
        /// A connected host socket closed: its reverse entry in `NM_SOCK_REV` removed (the
        /// `sock_release` hook).
        SockRevReleased = 27, "sock_rev_released", Sock;
    }
}

counters! {
    /// Counters of the conntrack-INVALID drop, per CPU (`NM_CT_COUNTERS`).
    CtCounterIndex, CT_COUNTERS_LEN {
        /// INVALID by conntrack's verdict, addressed to the host: dropped.
        DroppedV4 = 0, "invalid_dropped_v4", Netfilter;
        DroppedV6 = 1, "invalid_dropped_v6", Netfilter;
        /// No conntrack entry, but conntrack was not seen active recently (it may never have
        /// looked at the packet): accepted, counted so it shows.
        UnverifiedV4 = 2, "invalid_unverified_v4", Netfilter;
        UnverifiedV6 = 3, "invalid_unverified_v6", Netfilter;
    }
}
