//! Host-network clients: cgroup v2 socket-address hooks.
//!
//! A TC program cannot serve node processes and `hostNetwork: true` pods: their packets pass
//! netfilter (kube-proxy) before any TC egress hook, and under IPVS the external IP is local
//! and never reaches a device. So the address is rewritten in the socket calls themselves,
//! before the kernel routes anything (what network-node-manager's nat OUTPUT rule does):
//!
//! * `connect4/6`: TCP or UDP connect to a frontend (external address, port, protocol) goes to
//!   the Service's cluster IP instead;
//! * `sendmsg4/6`: the same for unconnected UDP datagrams;
//! * `recvmsg4/6`: a datagram from that cluster IP reads as coming from the external address;
//! * `getpeername4/6`: the peer reads as the external address the application dialled;
//! * `sock_release` (a `cgroup_sock` program): a connected socket's entry goes when it closes,
//!   so closed sockets never crowd live ones out of the LRU.
//!
//! The reverse direction is per socket (cookie), since several external addresses may lead to
//! one cluster IP. The frontends are the TC path's map (one source of truth). Every hook
//! returns 1 (allow): a lookup miss or a failed map write never fails the system call.
//! IPv4-mapped IPv6 destinations (`::ffff:a.b.c.d` on a dual-stack socket) need nothing
//! special: the frontend map stores IPv4 in that form already.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    helpers::bpf_get_socket_cookie,
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use node_manager_common::{CounterIndex, PROTO_TCP, PROTO_UDP, is_v4_mapped};

use crate::helpers::{counters::count_event, frontend, sock_rev};

/// What the kernel expects of a socket-address hook that lets the call proceed.
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// Hooks that redirect towards the cluster IP.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Forward {
    Connect,
    Sendmsg,
}

/// Hooks that show the external address again.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reverse {
    Recvmsg,
    Getpeername,
}

// The context's fields may only be read and written as whole 32-bit words (the verifier
// rewrites each access); volatile accesses keep the compiler from merging or splitting them.

#[inline(always)]
fn field(ctx: &SockAddrContext, f: impl FnOnce(*const aya_ebpf::bindings::bpf_sock_addr) -> *const u32) -> u32 {
    // SAFETY: `f` returns the address of a u32 field of the context the program runs on.
    unsafe { read_volatile(f(ctx.sock_addr)) }
}

#[inline(always)]
fn user_addr(ctx: &SockAddrContext, family: Family) -> [u8; 16] {
    match family {
        // SAFETY (both arms): projections to fields of the valid context pointer.
        Family::V4 => mapped(field(ctx, |c| unsafe { addr_of!((*c).user_ip4) })),
        Family::V6 => {
            let w0 = field(ctx, |c| unsafe { addr_of!((*c).user_ip6[0]) }).to_ne_bytes();
            let w1 = field(ctx, |c| unsafe { addr_of!((*c).user_ip6[1]) }).to_ne_bytes();
            let w2 = field(ctx, |c| unsafe { addr_of!((*c).user_ip6[2]) }).to_ne_bytes();
            let w3 = field(ctx, |c| unsafe { addr_of!((*c).user_ip6[3]) }).to_ne_bytes();
            [
                w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0], w3[1],
                w3[2], w3[3],
            ]
        }
    }
}

/// `v4_mapped` of an address read as a 32-bit word, built from words: the byte-array literal's
/// ten zeros compile to a `memset` call here, a BPF-to-BPF call the verifier refuses a loader
/// without CAP_PERFMON.
#[inline(always)]
fn mapped(ip4: u32) -> [u8; 16] {
    let words = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4];
    // SAFETY: [u32; 4] and [u8; 16] have the same size; every bit pattern is valid for both.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

/// The port as the frontend map keys it: network byte order (the context holds `sin_port`).
#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: projection to a field of the valid context pointer.
    field(ctx, |c| unsafe { addr_of!((*c).user_port) }) as u16
}

#[inline(always)]
fn word(addr: &[u8; 16], i: usize) -> u32 {
    u32::from_ne_bytes([addr[i * 4], addr[i * 4 + 1], addr[i * 4 + 2], addr[i * 4 + 3]])
}

/// Writes `addr` as the call's address. False if it does not fit the hook's family (an IPv6
/// address cannot be given to an IPv4 hook), in which case nothing was written.
#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, family: Family, addr: &[u8; 16]) -> bool {
    let c = ctx.sock_addr;
    // SAFETY: writes of whole u32 fields of the context the program runs on, which the kernel
    // allows for these hooks (user_ip4 in the IPv4 ones, user_ip6 in the IPv6 ones).
    unsafe {
        match family {
            Family::V4 => {
                if !is_v4_mapped(addr) {
                    return false;
                }
                write_volatile(addr_of_mut!((*c).user_ip4), word(addr, 3));
            }
            Family::V6 => {
                write_volatile(addr_of_mut!((*c).user_ip6[0]), word(addr, 0));
                write_volatile(addr_of_mut!((*c).user_ip6[1]), word(addr, 1));
                write_volatile(addr_of_mut!((*c).user_ip6[2]), word(addr, 2));
                write_volatile(addr_of_mut!((*c).user_ip6[3]), word(addr, 3));
            }
        }
    }
    true
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper is available to socket-address programs and reads ctx->sk.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The frontend protocol this socket's calls are looked up with, if the hook rewrites it:
/// TCP stream sockets on connect, UDP datagram sockets on every hook.
#[inline(always)]
fn protocol(ctx: &SockAddrContext, hook: Forward) -> Option<u8> {
    // SAFETY (both): projections to fields of the valid context pointer.
    let proto = field(ctx, |c| unsafe { addr_of!((*c).protocol) });
    let kind = field(ctx, |c| unsafe { addr_of!((*c).type_) });
    if proto == PROTO_UDP as u32 && kind == SOCK_DGRAM {
        Some(PROTO_UDP)
    } else if proto == PROTO_TCP as u32 && kind == SOCK_STREAM && hook == Forward::Connect {
        Some(PROTO_TCP)
    } else {
        None
    }
}

#[inline(always)]
fn forward(ctx: &SockAddrContext, family: Family, hook: Forward) -> i32 {
    let Some(proto) = protocol(ctx, hook) else {
        count_event(CounterIndex::SockPassNoFrontend);
        return ALLOW;
    };
    let external_addr = user_addr(ctx, family);
    let port = user_port(ctx);
    let Some(cluster_addr) = frontend::frontend_of(external_addr, port, proto) else {
        count_event(CounterIndex::SockPassNoFrontend);
        return ALLOW;
    };
    if !set_user_addr(ctx, family, &cluster_addr) {
        count_event(CounterIndex::SockPassNoFrontend);
        return ALLOW;
    }
    let key = sock_rev::key(cookie(ctx), cluster_addr, port);
    if sock_rev::remember(key, external_addr).is_err() {
        count_event(CounterIndex::SockRevInsertFailed);
    }
    count_event(match (hook, family) {
        (Forward::Connect, Family::V4) => CounterIndex::SockConnectV4,
        (Forward::Connect, Family::V6) => CounterIndex::SockConnectV6,
        (Forward::Sendmsg, Family::V4) => CounterIndex::SockSendmsgV4,
        (Forward::Sendmsg, Family::V6) => CounterIndex::SockSendmsgV6,
    });
    ALLOW
}

#[inline(always)]
fn reverse(ctx: &SockAddrContext, family: Family, hook: Reverse) -> i32 {
    let key = sock_rev::key(cookie(ctx), user_addr(ctx, family), user_port(ctx));
    let Some(external_addr) = sock_rev::external_addr(key) else {
        // Not a redirected peer (the common case, not counted: every UDP receive passes here).
        return ALLOW;
    };
    if set_user_addr(ctx, family, &external_addr) {
        count_event(match (hook, family) {
            (Reverse::Recvmsg, Family::V4) => CounterIndex::SockRecvmsgV4,
            (Reverse::Recvmsg, Family::V6) => CounterIndex::SockRecvmsgV6,
            (Reverse::Getpeername, Family::V4) => CounterIndex::SockGetpeernameV4,
            (Reverse::Getpeername, Family::V6) => CounterIndex::SockGetpeernameV6,
        });
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn nm_sock_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V4, Forward::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn nm_sock_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V6, Forward::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn nm_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V4, Forward::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn nm_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, Family::V6, Forward::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn nm_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4, Reverse::Recvmsg)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn nm_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V6, Reverse::Recvmsg)
}

#[cgroup_sock_addr(getpeername4)]
pub fn nm_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V4, Reverse::Getpeername)
}

#[cgroup_sock_addr(getpeername6)]
pub fn nm_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, Family::V6, Reverse::Getpeername)
}

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// A socket closes: the entry its connect left (keyed by the cluster address and port it is
/// connected to) is removed. Sockets never connected (port 0) had none the release could find.
#[cgroup_sock(sock_release)]
pub fn nm_sock_release(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // Every field is read before anything branches on the family: the compiler would otherwise
    // merge the two families' loads into one at a chosen offset, a context access the verifier
    // refuses ("dereference of modified ctx ptr").
    // SAFETY (all reads): whole 32-bit fields of the context the program runs on. `dst_port`
    // is read as the 32-bit word it was before Linux 5.18 (allowed since for compatibility):
    // the port in network byte order in its first two bytes, zeros after.
    let (family, port, ip4, ip6) = unsafe {
        (
            read_volatile(addr_of!((*sk).family)),
            read_volatile(addr_of!((*sk).dst_port).cast::<u32>()) as u16,
            read_volatile(addr_of!((*sk).dst_ip4)),
            [
                read_volatile(addr_of!((*sk).dst_ip6[0])),
                read_volatile(addr_of!((*sk).dst_ip6[1])),
                read_volatile(addr_of!((*sk).dst_ip6[2])),
                read_volatile(addr_of!((*sk).dst_ip6[3])),
            ],
        )
    };
    if port == 0 {
        return ALLOW;
    }
    let cluster_addr = match family {
        AF_INET => mapped(ip4),
        // SAFETY: [u32; 4] and [u8; 16] have the same size; every bit pattern is valid.
        AF_INET6 => unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(ip6) },
        _ => return ALLOW,
    };
    // SAFETY: the helper is available to cgroup socket programs (Linux ≥ 5.8) and reads ctx.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if sock_rev::forget(sock_rev::key(cookie, cluster_addr, port)) {
        count_event(CounterIndex::SockRevReleased);
    }
    ALLOW
}
