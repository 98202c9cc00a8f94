//! The entry points, one module per attach point.
pub mod nf_invalid;
pub mod sock_addr;
pub mod tc_pod;
