//! The flow map's documented capacity: the number of flows it holds without evicting any.
use node_manager_common::FLOWS_MAX;

pub fn documented_capacity() -> u32 {
    FLOWS_MAX - LRU_LOCAL_FREE_PER_CPU * possible_cpus()
}

/// The kernel's LRU hash keeps up to this many free entries in each CPU's local free list
/// (`LOCAL_FREE_TARGET`; less for small maps): eviction may begin while that many entries per
/// CPU other than the inserting one are still free.
pub const LRU_LOCAL_FREE_PER_CPU: u32 = 128;

/// Possible CPUs, from `/sys/devices/system/cpu/possible` ("0-63", "0,2-3").
pub fn possible_cpus() -> u32 {
    cpu_list("/sys/devices/system/cpu/possible").len() as u32
}

pub fn online_cpus() -> Vec<usize> {
    cpu_list("/sys/devices/system/cpu/online")
}

fn cpu_list(path: &str) -> Vec<usize> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut cpus = Vec::new();
    for part in text.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

/// Moves the calling thread to `cpu` (BPF_PROG_TEST_RUN and map updates run on the caller's
/// CPU, and the LRU's free lists are per CPU).
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set), 0);
    }
}
