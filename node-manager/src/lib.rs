//! node-manager: a per-node agent that fixes two Kubernetes networking problems in eBPF.
//!
//! Data flows one way, and imports point the same way (`tests/layers.rs` keeps them so):
//! `source` (services file / Kubernetes) → `model` (pure: desired frontends) → `plan` (pure:
//! the agent's decisions) → `features` (external IP rewrite, INVALID drop) → `kernel` (object
//! loading, pins, maps, attach, probes; imports only `model`). `agent` applies the plan;
//! `state` reads the pins alone, for `inspect` and `metrics`; `cleanup` works without an agent.
pub mod agent;
pub mod cleanup;
pub mod config;
pub mod features;
pub mod inspect;
pub mod kernel;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod privileges;
pub mod source;
pub mod state;
