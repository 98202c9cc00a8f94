//! Fault injection for tests, kept apart from the loading code it hooks: the programs named in
//! `NODE_MANAGER_FAULT_REJECT` (comma-separated) are not loaded; in their place a program of the
//! same type that the verifier rejects is, and its verdict stands for theirs. Shows, with the real
//! verifier and the real agent binary, that a rejected program costs only its feature. Unset in
//! production, where it changes nothing.
pub const FAULT_ENV: &str = "NODE_MANAGER_FAULT_REJECT";

/// The real verifier's rejection standing in for program `name`'s, when the variable names it.
pub fn injected(name: &str) -> Option<String> {
    let named = std::env::var(FAULT_ENV).is_ok_and(|v| v.split(',').any(|n| n.trim() == name));
    named.then(|| super::probe::verifier_rejection(name))
}
