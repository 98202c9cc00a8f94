//! `node-manager-demo`: see the `demo` library. `cargo xtask demo` builds and runs it.
fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(demo::main(std::env::args_os()))
}
