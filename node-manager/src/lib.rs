//! node-manager: a per-node agent that fixes two Kubernetes networking problems in eBPF.
//!
//! Data flows one way: `source` (services file / Kubernetes) → `model` (pure: desired
//! frontends) → `datapath` (maps written by diff, programs attached) → kernel programs.
//! `inspect` and `cleanup` work from the pins alone.
pub mod agent;
pub mod cleanup;
pub mod config;
pub mod datapath;
pub mod inspect;
pub mod interfaces;
pub mod invalid;
pub mod metrics;
pub mod model;
pub mod privileges;
pub mod source;
