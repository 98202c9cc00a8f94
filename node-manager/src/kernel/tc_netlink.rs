//! The two rtnetlink tc requests aya 0.14 does not expose, for kernels without TCX: listing the
//! filters on a clsact hook (to show them, and to know whether a clsact qdisc we created is still
//! used by anyone else) and deleting the clsact qdisc.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_ID: u16 = 11;
/// `TC_H_CLSACT` (= `TC_H_INGRESS`), and the clsact qdisc's handle `ffff:`.
const TC_H_CLSACT: u32 = 0xffff_fff1;
const CLSACT_HANDLE: u32 = 0xffff_0000;
const HDR: usize = 16;
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

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2); the fd is owned by the returned OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn request(msg_type: u16, flags: u16, ifindex: u32, handle: u32, parent: u32) -> Vec<u8> {
    let mut msg = vec![0u8; HDR + TCMSG];
    msg[0..4].copy_from_slice(&((HDR + TCMSG) as u32).to_ne_bytes());
    msg[4..6].copy_from_slice(&msg_type.to_ne_bytes());
    msg[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes()); // seq
    // tcmsg: family (AF_UNSPEC), pads, ifindex, handle, parent, info.
    msg[HDR + 4..HDR + 8].copy_from_slice(&ifindex.to_ne_bytes());
    msg[HDR + 8..HDR + 12].copy_from_slice(&handle.to_ne_bytes());
    msg[HDR + 12..HDR + 16].copy_from_slice(&parent.to_ne_bytes());
    msg
}

/// Sends `msg` and hands every reply message (type, payload) to `each` until the dump or the ack
/// ends; a netlink error becomes the error.
fn exchange(msg: &[u8], mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let sock = socket()?;
    // SAFETY: send(2) of a buffer we own.
    if unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: recv(2) into a buffer we own.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut at = 0;
        let n = n as usize;
        while at + HDR <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let msg_type = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().expect("2 bytes"));
            if len < HDR || at + len > n {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
            }
            let payload = &buf[at + HDR..at + len];
            match msg_type {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(payload.get(..4).and_then(|b| b.try_into().ok()).unwrap_or([0; 4]));
                    return if errno == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-errno)) };
                }
                _ => each(msg_type, payload),
            }
            at += (len + 3) & !3;
        }
    }
}

/// Netlink attributes in `data`: (type without flags, payload).
fn attrs(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & 0x3fff;
        if len < 4 || len > data.len() {
            break;
        }
        out.push((kind, &data[4..len]));
        data = &data[((len + 3) & !3).min(data.len())..];
    }
    out
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
