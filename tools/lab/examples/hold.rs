//! Builds a lab, prints its namespaces and keeps it until Enter is pressed (or stdin closes).
//! `cargo run -p lab --example hold` (as root).

use lab::{Lab, Ns};

fn main() -> anyhow::Result<()> {
    let lab = Lab::new()?;
    for ns in [Ns::Pod, Ns::Node, Ns::Ep] {
        println!("{ns:?}: {}", lab.netns_path(ns).display());
    }
    println!("pod host interface: {}", lab.pod_host_if());
    println!("press Enter to tear down");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(())
}
