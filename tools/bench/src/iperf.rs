//! Throughput of one established TCP stream: Debian's iperf3, server in the endpoint's
//! namespace, client in the pod's.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

/// How long a new server may take to listen.
const READY_WITHIN: Duration = Duration::from_secs(5);

/// `iperf3 -s -p <port>` in a namespace; killed on drop.
pub struct IperfServer(Child);

impl IperfServer {
    pub fn start(netns: &Path, port: u16) -> Result<IperfServer> {
        let child = nsenter(netns, "iperf3")
            .args(["-s", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s (is iperf3 installed? `cargo xtask setup` installs it)")?;
        Ok(IperfServer(child))
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nsenter(netns: &Path, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns.display())).arg("--").arg(program);
    cmd
}

/// One iperf3 run from the namespace at `netns` to `to`: `secs` seconds after omitting the
/// first `omit` (TCP slow start); the receiver's rate in bit/s. A server that is not
/// listening yet is retried for a few seconds.
pub fn run(netns: &Path, to: SocketAddr, secs: u32, omit: u32) -> Result<f64> {
    let started = Instant::now();
    loop {
        let out = nsenter(netns, "iperf3")
            .args(["-c", &to.ip().to_string(), "-p", &to.port().to_string(), "-J"])
            .args(["-t", &secs.to_string(), "-O", &omit.to_string()])
            .stdin(Stdio::null())
            .output()
            .context("running iperf3 -c")?;
        let json: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3 -c {to}: no JSON report: {}", String::from_utf8_lossy(&out.stderr)))?;
        if let Some(err) = json.get("error").and_then(Value::as_str) {
            if err.contains("refused") && started.elapsed() < READY_WITHIN {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            bail!("iperf3 -c {to}: {err}");
        }
        return json
            .pointer("/end/sum_received/bits_per_second")
            .and_then(Value::as_f64)
            .with_context(|| format!("iperf3 -c {to}: no end.sum_received.bits_per_second in its report"));
    }
}
