#![allow(dead_code)]
pub mod agent;
pub mod bpffs;
pub mod capacity;
pub mod deploy;
pub mod frames;
pub mod kernel;
pub mod kube;
pub mod model;
pub mod pod;
pub mod scale;
pub mod stable;
