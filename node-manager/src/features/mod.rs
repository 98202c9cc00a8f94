//! The two features, each in its own folder: what they decide and how they drive the kernel
//! layer (`crate::kernel`), which knows nothing of them.
pub mod drop_invalid;
pub mod external_ip;
