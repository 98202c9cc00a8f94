//! Netlink requests and their answers, shared by the rtnetlink tc requests ([`super::tc_netlink`])
//! and the conntrack dump ([`super::conntrack`]): one request on a fresh socket, every reply
//! message handed on until the dump or the ack ends.
use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 1;
pub const NLM_F_ACK: u16 = 4;
pub const NLM_F_DUMP: u16 = 0x300;
/// `struct nlmsghdr`.
pub const HDR: usize = 16;

fn socket(protocol: i32) -> io::Result<OwnedFd> {
    // SAFETY: socket(2); the fd is owned by the returned OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A request: the message header (length, type, `NLM_F_REQUEST | flags`, sequence 1) followed by
/// `body`.
pub fn request(msg_type: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let mut msg = vec![0u8; HDR];
    msg[0..4].copy_from_slice(&((HDR + body.len()) as u32).to_ne_bytes());
    msg[4..6].copy_from_slice(&msg_type.to_ne_bytes());
    msg[6..8].copy_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    msg[8..12].copy_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(body);
    msg
}

/// Sends `msg` on a `protocol` socket and hands every reply message (type, payload) to `each`
/// until the dump or the ack ends; a netlink error becomes the error.
pub fn exchange(protocol: i32, msg: &[u8], mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
    let sock = socket(protocol)?;
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
pub fn attrs(mut data: &[u8]) -> Vec<(u16, &[u8])> {
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
