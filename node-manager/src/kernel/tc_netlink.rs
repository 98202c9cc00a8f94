//! The two rtnetlink tc requests aya 0.14 does not expose, for kernels without TCX: listing the
//! filters on a clsact hook (to show them, and to know whether a clsact qdisc we created is still
//! used by anyone else) and deleting the clsact qdisc.
use std::io;

use super::netlink::{NLM_F_ACK, NLM_F_DUMP, attrs};

const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
/// `TC_H_CLSACT` (= `TC_H_INGRESS`), and the clsact qdisc's handle `ffff:`.
const TC_H_CLSACT: u32 = 0xffff_fff1;
const CLSACT_HANDLE: u32 = 0xffff_0000;
const TCMSG: usize = 20;

/// A filter on a clsact hook, as `tc filter show` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// "bpf" for cls_bpf.
    pub kind: String,
    /// cls_bpf: the program's name as attached, and its id.
    pub name: Option<String>,
    pub prog_id: Option<u32>,
}

/// The parent of a clsact hook: ingress `ffff:fff2`, egress `ffff:fff3`.
pub fn parent(ingress: bool) -> u32 {
    if ingress { 0xffff_fff2 } else { 0xffff_fff3 }
}

fn request(msg_type: u16, flags: u16, ifindex: u32, handle: u32, parent: u32) -> Vec<u8> {
    // tcmsg: family (AF_UNSPEC), pads, ifindex, handle, parent, info.
    let mut tcmsg = [0u8; TCMSG];
    tcmsg[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    tcmsg[8..12].copy_from_slice(&handle.to_ne_bytes());
    tcmsg[12..16].copy_from_slice(&parent.to_ne_bytes());
    super::netlink::request(msg_type, flags, &tcmsg)
}

fn exchange(msg: &[u8], each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    super::netlink::exchange(libc::NETLINK_ROUTE, msg, each)
}

fn c_string(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
}

/// The filters on one clsact hook of an interface, in the order the kernel runs them. An
/// interface without a clsact qdisc has none.
pub fn filters(ifindex: u32, ingress: bool) -> io::Result<Vec<Filter>> {
    let msg = request(RTM_GETTFILTER, NLM_F_DUMP, ifindex, 0, parent(ingress));
    let mut out = Vec::new();
    let result = exchange(&msg, |msg_type, payload| {
        if msg_type == RTM_NEWTFILTER
            && let Some(filter) = parse_filter(payload)
        {
            out.push(filter);
        }
    });
    match result {
        Ok(()) => Ok(out),
        // No clsact qdisc on the interface.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::ENOENT) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

fn parse_filter(payload: &[u8]) -> Option<Filter> {
    let tcmsg = payload.get(..TCMSG)?;
    let handle = u32::from_ne_bytes(tcmsg[8..12].try_into().ok()?);
    let info = u32::from_ne_bytes(tcmsg[16..20].try_into().ok()?);
    // The first message of each priority is the classifier itself (handle 0), not a filter.
    if handle == 0 {
        return None;
    }
    let mut filter = Filter { priority: (info >> 16) as u16, handle, kind: String::new(), name: None, prog_id: None };
    for (kind, data) in attrs(&payload[TCMSG..]) {
        match kind {
            TCA_KIND => filter.kind = c_string(data),
            TCA_OPTIONS => {
                for (opt, value) in attrs(data) {
                    match opt {
                        TCA_BPF_NAME => filter.name = Some(c_string(value)),
                        TCA_BPF_ID if value.len() >= 4 => {
                            filter.prog_id = Some(u32::from_ne_bytes(value[..4].try_into().ok()?))
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(filter)
}

/// Deletes the clsact qdisc of an interface (and with it every filter on it).
pub fn delete_clsact(ifindex: u32) -> io::Result<()> {
    exchange(&request(RTM_DELQDISC, NLM_F_ACK, ifindex, CLSACT_HANDLE, TC_H_CLSACT), |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out
    }

    #[test]
    fn parses_a_cls_bpf_filter_message() {
        let mut payload = vec![0u8; TCMSG];
        payload[8..12].copy_from_slice(&0x4e4du32.to_ne_bytes());
        payload[16..20].copy_from_slice(&((0xc001u32 << 16) | 0x0300).to_ne_bytes());
        payload.extend(attr(TCA_KIND, b"bpf\0"));
        let options = [attr(TCA_BPF_NAME, b"nm_pod_ingress\0"), attr(TCA_BPF_ID, &42u32.to_ne_bytes())].concat();
        payload.extend(attr(TCA_OPTIONS | 0x8000, &options)); // NLA_F_NESTED
        let f = parse_filter(&payload).unwrap();
        assert_eq!(
            f,
            Filter {
                priority: 0xc001,
                handle: 0x4e4d,
                kind: "bpf".into(),
                name: Some("nm_pod_ingress".into()),
                prog_id: Some(42)
            }
        );
        // The classifier's own entry (handle 0) is no filter.
        let mut head = vec![0u8; TCMSG];
        head.extend(attr(TCA_KIND, b"bpf\0"));
        assert_eq!(parse_filter(&head), None);
    }
}
