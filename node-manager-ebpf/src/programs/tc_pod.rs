//! TC programs on the host side of pod interfaces.
//!
//! ingress (packets from the pod): destination external/LB IP:port → the Service's cluster IP,
//! mark for masquerade, remember the flow. egress (packets to the pod): the reply's source
//! cluster IP → the external IP the pod dialled, and ICMP errors about a rewritten flow quote it
//! again. A TCP RST either way ends the flow. Everything else continues untouched
//! (TC_ACT_UNSPEC, which is also TCX_NEXT), so CNI programs on the same device still run.
//!
//! Host-network clients are served by the cgroup socket-address hooks in [`super::sock_addr`], from the
//! same frontend map.
use aya_ebpf::{bindings::TC_ACT_UNSPEC, macros::classifier, programs::TcContext};
use node_manager_common::{CounterIndex, PROTO_TCP};

use crate::helpers::{
    counters::count,
    flow, frag, frontend as lb,
    headers::{TCP_ACK, TCP_RST, TCP_SYN},
    icmp_error,
    parse::{self, Direction, Frag, Parsed, parse},
    rewrite::{Which, set_addr},
};

const CONTINUE: i32 = TC_ACT_UNSPEC;

#[classifier]
pub fn nm_pod_ingress(mut ctx: TcContext) -> i32 {
    let pkt = match parse(&ctx, Direction::FromPod) {
        Parsed::Ip(pkt) => pkt,
        Parsed::NotIp => return pass(&ctx, CounterIndex::PassNotIp),
        // ICMP errors are parsed as such only on their way to the pod.
        Parsed::Unparsed | Parsed::IcmpError { .. } => return pass(&ctx, CounterIndex::PassUnparsed),
    };
    if pkt.frag == Frag::Later {
        return later_fragment(&mut ctx, &pkt, Which::Destination);
    }
    // The hash lookup first: most of a pod's packets go to no frontend, and the pod-CIDR
    // check (an LPM trie walk) is then never paid.
    let Some(cluster_addr) = lb::frontend(&pkt) else {
        // A pod reusing, towards the cluster address itself, the tuple of a flow rewritten
        // earlier: the replies must not be given that flow's external address. Unless another
        // program of ours chained before this one has just rewritten this very packet (two
        // generations are attached for a moment while an agent of another layout version is
        // retired): its masquerade mark says so, since a pod's packet enters the host side of
        // its veth with mark 0 (crossing network namespaces clears it).
        let mark = lb::masquerade_mark();
        let rewritten_before = mark != 0 && skb_mark(&ctx) & mark == mark;
        if !rewritten_before && opens_flow(&pkt) && flow::forget(&flow::key_from_pod(&pkt, pkt.daddr)) {
            count(&ctx, CounterIndex::FlowDirectReuse);
        }
        return pass(&ctx, CounterIndex::PassNoFrontend);
    };
    if !lb::from_local_pod(&pkt) {
        return pass(&ctx, CounterIndex::PassNotPod);
    }
    let external_addr = pkt.daddr;
    if set_addr(&mut ctx, &pkt, Which::Destination, &external_addr, &cluster_addr).is_err() {
        return pass(&ctx, CounterIndex::RewriteFailed);
    }
    mark_for_masquerade(&mut ctx);
    if pkt.frag == Frag::First {
        frag::remember(&pkt, cluster_addr);
        count(&ctx, CounterIndex::FragTranslated);
    }
    let key = flow::key_from_pod(&pkt, cluster_addr);
    // A RST ends the connection: the flow is forgotten rather than remembered (its replies,
    // if any are still in flight, are of no use to the pod).
    if tcp_rst(&pkt) {
        flow::forget(&key);
        count(&ctx, if pkt.v6 { CounterIndex::RewriteIngressV6 } else { CounterIndex::RewriteIngressV4 });
        return CONTINUE;
    }
    match flow::remember(&key, external_addr) {
        Ok(flow::Remembered::Known | flow::Remembered::Replaced) => {}
        Ok(flow::Remembered::Created) => {
            count(&ctx, CounterIndex::FlowCreated);
            if pkt.proto == PROTO_TCP && !tcp_syn(&pkt) {
                count(&ctx, CounterIndex::FlowLost);
            }
        }
        Err(_) => count(&ctx, CounterIndex::FlowInsertFailed),
    }
    count(&ctx, if pkt.v6 { CounterIndex::RewriteIngressV6 } else { CounterIndex::RewriteIngressV4 });
    CONTINUE
}

#[classifier]
pub fn nm_pod_egress(mut ctx: TcContext) -> i32 {
    let pkt = match parse(&ctx, Direction::ToPod) {
        Parsed::Ip(pkt) => pkt,
        // In a program of its own (a tail call): the error path's stack does not fit beside
        // this one's. Not there (an agent of another build replacing it): passed.
        Parsed::IcmpError { error, end } => {
            icmp_error::tail_call(&mut ctx, &error, end);
            return pass(&ctx, CounterIndex::PassUnparsed);
        }
        Parsed::NotIp => return pass(&ctx, CounterIndex::PassNotIp),
        Parsed::Unparsed => return pass(&ctx, CounterIndex::PassUnparsed),
    };
    if pkt.frag == Frag::Later {
        return later_fragment(&mut ctx, &pkt, Which::Source);
    }
    let key = flow::key_to_pod(&pkt);
    let Some(external_addr) = flow::external_addr(&key) else {
        return pass(&ctx, CounterIndex::PassNoFlow);
    };
    let cluster_addr = pkt.saddr;
    if set_addr(&mut ctx, &pkt, Which::Source, &cluster_addr, &external_addr).is_err() {
        return pass(&ctx, CounterIndex::RewriteFailed);
    }
    if pkt.frag == Frag::First {
        frag::remember(&pkt, external_addr);
        count(&ctx, CounterIndex::FragTranslated);
    }
    // The server's RST ends the connection (this one is still translated, so the pod's socket
    // sees it).
    if tcp_rst(&pkt) {
        flow::forget(&key);
    }
    count(&ctx, if pkt.v6 { CounterIndex::RewriteEgressV6 } else { CounterIndex::RewriteEgressV4 });
    CONTINUE
}

/// An ICMP error to the pod (tail-called by `nm_pod_egress`) about a packet of a rewritten
/// flow (the quoted packet as conntrack gave it back: from the pod to the cluster address):
/// translated to quote the external address the pod's socket is connected to, or the kernel
/// would match it to no socket.
#[classifier]
pub fn nm_pod_icmp_error(mut ctx: TcContext) -> i32 {
    let why = match icmp_error::translate(&mut ctx) {
        icmp_error::Outcome::Translated => CounterIndex::IcmpErrorTranslated,
        icmp_error::Outcome::NoFlow => CounterIndex::PassNoFlow,
        icmp_error::Outcome::Unparsed => CounterIndex::PassUnparsed,
        icmp_error::Outcome::Failed => CounterIndex::RewriteFailed,
    };
    pass(&ctx, why)
}

/// A later fragment: given the address its datagram's first fragment got (the destination
/// from the pod, the source to it), with the masquerade mark from the pod as the first had.
#[inline(always)]
fn later_fragment(ctx: &mut TcContext, pkt: &parse::Packet, which: Which) -> i32 {
    let Some(new) = frag::target(pkt) else {
        return match which {
            // To an external address: a datagram the rewrite has lost.
            Which::Destination if lb::is_external_addr(pkt) => pass(ctx, CounterIndex::FragUnmatched),
            Which::Destination => pass(ctx, CounterIndex::PassUnparsed),
            Which::Source => pass(ctx, CounterIndex::PassNoFlow),
        };
    };
    let old = match which {
        Which::Destination => pkt.daddr,
        Which::Source => pkt.saddr,
    };
    if set_addr(ctx, pkt, which, &old, &new).is_err() {
        return pass(ctx, CounterIndex::RewriteFailed);
    }
    if matches!(which, Which::Destination) {
        mark_for_masquerade(ctx);
    }
    pass(ctx, CounterIndex::FragTranslated)
}

#[inline(always)]
fn mark_for_masquerade(ctx: &mut TcContext) {
    let mark = lb::masquerade_mark();
    if mark != 0 {
        ctx.set_mark(skb_mark(ctx) | mark);
    }
}

#[inline(always)]
fn skb_mark(ctx: &TcContext) -> u32 {
    // SAFETY: reading the mark field of the skb this program runs on.
    unsafe { (*ctx.skb.skb).mark }
}

/// Whether a TCP segment has SYN set.
#[inline(always)]
fn tcp_syn(pkt: &parse::Packet) -> bool {
    pkt.tcp_flags & TCP_SYN != 0
}

/// Whether a packet is a TCP segment with RST set (the flags are 0 for other protocols).
#[inline(always)]
fn tcp_rst(pkt: &parse::Packet) -> bool {
    pkt.tcp_flags & TCP_RST != 0
}

/// Whether a pod packet may start a new use of its tuple: a TCP SYN without ACK, or any UDP
/// or ICMP echo packet (they have no handshake to tell).
#[inline(always)]
fn opens_flow(pkt: &parse::Packet) -> bool {
    pkt.proto != PROTO_TCP || pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[inline(always)]
fn pass(ctx: &TcContext, why: CounterIndex) -> i32 {
    count(ctx, why);
    CONTINUE
}
