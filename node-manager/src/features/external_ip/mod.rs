//! The external-IP rewrite: pods and host-network clients reach a Service's LoadBalancer / external IP, which
//! the datapath rewrites to its cluster IP (kubernetes#75262). Pods through the TC programs on
//! their interfaces (`tc`), host-network processes through the cgroup socket hooks
//! (`sock_hooks`); both read the frontends map the agent keeps equal to the model. Rewritten
//! flows end with their conntrack entries (`flow_sweep`).
pub mod flow_sweep;
pub mod sock_hooks;
pub mod tc;
