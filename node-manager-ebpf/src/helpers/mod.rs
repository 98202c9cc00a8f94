//! What the programs share: header layouts, parsing, checksummed rewrites, the maps of each
//! concern and the counters.
pub mod bytes;
pub mod counters;
pub mod flow;
pub mod frag;
pub mod frontend;
pub mod headers;
pub mod icmp_error;
pub mod parse;
pub mod rewrite;
pub mod sock_rev;
