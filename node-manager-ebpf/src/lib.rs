#![no_std]
// The programs live in the binary target (src/main.rs); this library only exists so the
// workspace can depend on the crate for rebuild tracking.
