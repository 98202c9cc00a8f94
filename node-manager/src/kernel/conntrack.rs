//! This network namespace's conntrack table, read by a ctnetlink dump (what `conntrack -L`
//! does): the original-direction tuple of every entry, in the flow maps' key form, for the
//! flow sweep ([`crate::features::external_ip::flow_sweep`]).
use std::io;

use node_manager_common::{FlowKey, PROTO_ICMP, PROTO_ICMPV6, v4_mapped};

use super::netlink;

const NETLINK_NETFILTER: i32 = 12;
/// `(NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET`.
const CT_GET: u16 = (1 << 8) | 1;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMPV6_ID: u16 = 7;

/// Hands the original tuple of every conntrack entry of one family to `each`, as a flow key
/// from the pod's side: (source, destination, source port, destination port, protocol); ICMP
/// echo: the identifier as the source port and 0. Entries of other shapes are left out.
/// Returns the number of entries dumped. Nothing is collected: a node's table can hold
/// millions of entries, and the caller keeps only the ones it looks for.
pub fn for_each_original_tuple(v6: bool, mut each: impl FnMut(FlowKey)) -> io::Result<usize> {
    // struct nfgenmsg: family, version (NFNETLINK_V0), resource id.
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET } as u8;
    let msg = netlink::request(CT_GET, netlink::NLM_F_DUMP, &[family, 0, 0, 0]);
    let mut entries = 0;
    netlink::exchange(NETLINK_NETFILTER, &msg, |_, payload| {
        entries += 1;
        if let Some(key) = parse_entry(payload) {
            each(key);
        }
    })?;
    Ok(entries)
}

/// One dumped entry (`struct nfgenmsg` and attributes): its original tuple.
fn parse_entry(payload: &[u8]) -> Option<FlowKey> {
    let orig = netlink::attrs(payload.get(4..)?).into_iter().find(|(kind, _)| *kind == CTA_TUPLE_ORIG)?.1;
    let mut key =
        FlowKey { pod_addr: [0; 16], remote_addr: [0; 16], pod_port: 0, remote_port: 0, proto: 0, pad: [0; 3] };
    let port = |v: &[u8]| v.get(..2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let (mut src, mut dst) = (false, false);
    for (kind, data) in netlink::attrs(orig) {
        match kind {
            CTA_TUPLE_IP => {
                for (kind, v) in netlink::attrs(data) {
                    match (kind, v.len()) {
                        (CTA_IP_V4_SRC, 4) => (key.pod_addr, src) = (v4_mapped([v[0], v[1], v[2], v[3]]), true),
                        (CTA_IP_V4_DST, 4) => (key.remote_addr, dst) = (v4_mapped([v[0], v[1], v[2], v[3]]), true),
                        (CTA_IP_V6_SRC, 16) => (key.pod_addr, src) = (v.try_into().ok()?, true),
                        (CTA_IP_V6_DST, 16) => (key.remote_addr, dst) = (v.try_into().ok()?, true),
                        _ => {}
                    }
                }
            }
            CTA_TUPLE_PROTO => {
                for (kind, v) in netlink::attrs(data) {
                    match kind {
                        CTA_PROTO_NUM => key.proto = *v.first()?,
                        CTA_PROTO_SRC_PORT => key.pod_port = port(v)?,
                        CTA_PROTO_DST_PORT => key.remote_port = port(v)?,
                        CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => key.pod_port = port(v)?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if key.proto == PROTO_ICMP || key.proto == PROTO_ICMPV6 {
        key.remote_port = 0;
    }
    (src && dst && key.proto != 0).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, nested: bool, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&(kind | if nested { 0x8000 } else { 0 }).to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize((a.len() + 3) & !3, 0);
        a
    }

    /// An entry as the kernel dumps it: nfgenmsg, then the original tuple (IP and protocol
    /// nests), the reply tuple and a status the parse must skip.
    fn entry(ip: &[u8], proto: &[u8]) -> Vec<u8> {
        let tuple = [attr(CTA_TUPLE_IP, true, ip), attr(CTA_TUPLE_PROTO, true, proto)].concat();
        let reply = attr(2, true, &attr(CTA_TUPLE_IP, true, &attr(CTA_IP_V4_SRC, false, &[9, 9, 9, 9])));
        [vec![2, 0, 0, 0], attr(CTA_TUPLE_ORIG, true, &tuple), reply, attr(3, false, &8u32.to_be_bytes())].concat()
    }

    #[test]
    fn reads_the_original_tuple_of_tcp_udp_and_icmp_entries() {
        let ip4 =
            [attr(CTA_IP_V4_SRC, false, &[192, 0, 2, 10]), attr(CTA_IP_V4_DST, false, &[198, 51, 100, 10])].concat();
        let tcp = [
            attr(CTA_PROTO_NUM, false, &[6]),
            attr(CTA_PROTO_SRC_PORT, false, &40000u16.to_be_bytes()),
            attr(CTA_PROTO_DST_PORT, false, &8080u16.to_be_bytes()),
        ]
        .concat();
        let key = parse_entry(&entry(&ip4, &tcp)).unwrap();
        assert_eq!(key.pod_addr, v4_mapped([192, 0, 2, 10]));
        assert_eq!(key.remote_addr, v4_mapped([198, 51, 100, 10]));
        assert_eq!((key.pod_port, key.remote_port, key.proto), (40000u16.to_be(), 8080u16.to_be(), 6));

        let v6: [u8; 16] = "2001:db8:1::10".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let c6: [u8; 16] = "2001:db8:5::10".parse::<std::net::Ipv6Addr>().unwrap().octets();
        let ip6 = [attr(CTA_IP_V6_SRC, false, &v6), attr(CTA_IP_V6_DST, false, &c6)].concat();
        let echo = [
            attr(CTA_PROTO_NUM, false, &[58]),
            attr(CTA_PROTO_ICMPV6_ID, false, &0x1234u16.to_be_bytes()),
            attr(5, false, &[128]),
        ]
        .concat();
        let key = parse_entry(&entry(&ip6, &echo)).unwrap();
        assert_eq!((key.pod_addr, key.remote_addr), (v6, c6));
        assert_eq!((key.pod_port, key.remote_port, key.proto), (0x1234u16.to_be(), 0, 58));

        // Without addresses or protocol: not a tuple.
        assert_eq!(parse_entry(&entry(&[], &tcp)), None);
        assert_eq!(parse_entry(&[2, 0, 0, 0]), None);
        assert_eq!(parse_entry(&[]), None);
    }
}
