//! How the demo talks: `==>` step lines, indented plain words, the commands it runs (`$ ...`)
//! with their output, and pauses that wait for Enter (unless non-interactive).
use std::io::{IsTerminal as _, Write as _};
use std::os::fd::AsRawFd as _;

use crate::interrupt::{self, Interrupted};

/// Narration is wrapped to this many columns.
const WIDTH: usize = 100;

pub struct Say {
    interactive: bool,
}

impl Say {
    /// Interactive unless `yes`, `CI` is set to anything but `false`/`0`/empty, or stdin is not a
    /// terminal.
    pub fn new(yes: bool) -> Say {
        let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "" | "0" | "false"));
        Say { interactive: !yes && !ci && std::io::stdin().is_terminal() }
    }

    pub fn interactive(&self) -> bool {
        self.interactive
    }

    pub fn step(&self, text: &str) {
        println!();
        println!("==> {text}");
    }

    /// One or more lines of explanation, indented.
    pub fn text(&self, text: &str) {
        for line in text.lines() {
            if line.is_empty() { println!() } else { println!("    {line}") }
        }
    }

    /// A command as a user would type it, then its output indented below it.
    pub fn command(&self, shown: &str, output: &str) {
        println!("    $ {shown}");
        self.output(output);
    }

    /// A command's output, indented below the command.
    pub fn output(&self, output: &str) {
        for line in output.trim_end().lines() {
            println!("      {line}");
        }
    }

    /// A result: `what: OK` or `what: FAILED`, then the details word-wrapped below it.
    pub fn result(&self, what: &str, ok: bool, detail: &str) {
        println!("    {what}: {}", if ok { "OK" } else { "FAILED" });
        for line in wrap(detail, WIDTH - 8) {
            println!("        {line}");
        }
    }

    /// Waits for Enter when interactive; returns early with `Err` on Ctrl-C.
    pub fn pause(&self) -> Result<(), Interrupted> {
        interrupt::check()?;
        if !self.interactive {
            return Ok(());
        }
        print!("    [Enter: continue · Ctrl-C: stop and clean up] ");
        let _ = std::io::stdout().flush();
        let stdin = std::io::stdin();
        let fd = stdin.as_raw_fd();
        loop {
            interrupt::check()?;
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd for stdin.
            let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
            if ready > 0 {
                let mut line = String::new();
                // A closed stdin (0 bytes) also continues.
                let _ = stdin.read_line(&mut line);
                return interrupt::check();
            }
        }
    }
}

/// Greedy word wrap; a word longer than `width` gets a line of its own.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    #[test]
    fn wraps_at_word_boundaries() {
        assert_eq!(super::wrap("aa bb cc dd", 5), ["aa bb", "cc dd"]);
        assert_eq!(super::wrap("a verylongword b", 4), ["a", "verylongword", "b"]);
        assert!(super::wrap("  ", 10).is_empty());
    }
}
