//! Ctrl-C (SIGINT), SIGTERM and SIGHUP set a flag; the demo checks it between steps and in
//! every wait, unwinds with [`Interrupted`], and its guards remove everything on the way out.
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The error a step returns when the user interrupted the demo.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

extern "C" fn on_signal(_: libc::c_int) {
    const MSG: &[u8] = b"\n==> interrupted: stopping and cleaning up (this takes a few seconds)\n";
    // Only async-signal-safe calls here: an atomic store and write(2).
    if !INTERRUPTED.swap(true, Ordering::SeqCst) {
        // SAFETY: write(2) of a static buffer to stdout.
        unsafe { libc::write(libc::STDOUT_FILENO, MSG.as_ptr().cast(), MSG.len()) };
    }
}

/// Installs the handler for SIGINT, SIGTERM and SIGHUP. Without SA_RESTART, so that a blocking
/// wait returns early.
pub fn install() -> anyhow::Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a handler that only does async-signal-safe work.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            anyhow::bail!("installing the handler for signal {signal}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// `Err(Interrupted)` once a signal came.
pub fn check() -> Result<(), Interrupted> {
    if requested() { Err(Interrupted) } else { Ok(()) }
}

/// Sleeps `d`, waking early (with `Err`) when interrupted.
pub fn sleep(d: Duration) -> Result<(), Interrupted> {
    let end = Instant::now() + d;
    loop {
        check()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}
