//! node-manager's datapath, one module per attach point in [`programs`], the helpers they
//! share in [`helpers`]:
//!
//! * [`programs::tc_pod`]: TC programs on the host side of pod interfaces;
//! * [`programs::sock_addr`]: cgroup socket-address hooks for host-network clients;
//! * [`programs::nf_invalid`]: netfilter programs dropping conntrack-INVALID packets.
#![no_std]
#![no_main]

mod helpers;
mod programs;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
