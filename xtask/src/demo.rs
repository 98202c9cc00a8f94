//! `cargo xtask demo`: a placeholder until the demo exists.

use anyhow::Result;

pub fn run() -> Result<()> {
    crate::setup::run()?;
    crate::build::run(false)?;
    println!("demo: not yet implemented");
    Ok(())
}
