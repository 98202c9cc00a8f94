//! Stable flows for the chaos tests: long-lived traffic from the lab's pod to the external
//! addresses on port 9090 (a TCP connection and a connected UDP socket per family), echoed by
//! streaming servers in the endpoint namespace, sending a sequence number every 20 ms and
//! checking every echo. A flow is interrupted if its connection fails, an echo is missing or
//! wrong, or no echo arrives for longer than the bound the test checks.
use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lab::{Lab, Ns};
use serde_json::{Value, json};

/// Port of the stable flows (the lab's kube-proxy DNATs only 8080; [`StableFlows::start`] adds
/// the same for this port).
pub const STABLE_PORT: u16 = 9090;
const PERIOD: Duration = Duration::from_millis(20);
const ECHO_TIMEOUT: Duration = Duration::from_secs(3);

/// The lab's Service with the stable port too: LoadBalancer, dual-stack, TCP and UDP on 8080
/// and 9090.
pub fn service_json() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "lab", "name": "web"},
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                 "clusterIP": lab::CLUSTER_V4.to_string(),
                 "clusterIPs": [lab::CLUSTER_V4.to_string(), lab::CLUSTER_V6.to_string()],
                 "ipFamilies": ["IPv4", "IPv6"],
                 "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}, {"name": "udp", "port": 8080, "protocol": "UDP"},
                           {"name": "stcp", "port": STABLE_PORT, "protocol": "TCP"}, {"name": "sudp", "port": STABLE_PORT, "protocol": "UDP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": lab::EXTERNAL_V4.to_string()}, {"ip": lab::EXTERNAL_V6.to_string()}]}},
    })
}

/// What one flow saw.
#[derive(Clone, Debug, Default)]
pub struct FlowReport {
    pub name: String,
    pub round_trips: u64,
    /// Longest time between two consecutive echoes (or from the start to the first).
    pub max_gap: Duration,
    /// Connection errors, missing or wrong echoes; the flow stops at a connection error.
    pub errors: Vec<String>,
}

impl FlowReport {
    /// Counts an echo, `last` being when the previous one (or the flow) started.
    fn echo_after(&mut self, last: &mut Instant) {
        self.round_trips += 1;
        self.gap_since(*last);
        *last = Instant::now();
    }

    fn gap_since(&mut self, last: Instant) {
        self.max_gap = self.max_gap.max(last.elapsed());
    }
}

pub struct StableFlows {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    reports: Vec<Arc<Mutex<FlowReport>>>,
}

impl StableFlows {
    /// Starts the servers in the endpoint namespace, the DNAT of the cluster IPs' port 9090 in
    /// the node, and the four client flows in the pod (which must reach the external
    /// addresses through the agent's rewrite already).
    pub fn start(lab: &Lab) -> StableFlows {
        let rules = format!(
            "table inet nml_stable {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {c4} meta l4proto {{ tcp, udp }} th dport {p} dnat ip to {e4}:{p}
        ip6 daddr {c6} meta l4proto {{ tcp, udp }} th dport {p} dnat ip6 to [{e6}]:{p}
    }}
}}
",
            c4 = lab::CLUSTER_V4,
            c6 = lab::CLUSTER_V6,
            e4 = lab::ENDPOINT_V4,
            e6 = lab::ENDPOINT_V6,
            p = STABLE_PORT
        );
        let mut nft =
            lab.command(Ns::Node, "nft").args(["-f", "-"]).stdin(std::process::Stdio::piped()).spawn().unwrap();
        nft.stdin.take().unwrap().write_all(rules.as_bytes()).unwrap();
        assert!(nft.wait().unwrap().success(), "nft DNAT for the stable port");

        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let ep = lab.netns_path(Ns::Ep);
        let (tcp, udp) = lab::in_netns(&ep, || {
            let mut tcp = Vec::new();
            let mut udp = Vec::new();
            for ip in [IpAddr::from(lab::ENDPOINT_V4), IpAddr::from(lab::ENDPOINT_V6)] {
                tcp.push(TcpListener::bind((ip, STABLE_PORT))?);
                udp.push(UdpSocket::bind((ip, STABLE_PORT))?);
            }
            Ok((tcp, udp))
        })
        .unwrap();
        for listener in tcp {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || lab::echo::tcp_echo_server(listener, &stop)));
        }
        for socket in udp {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || lab::echo::udp_echo_server(socket, &stop)));
        }

        let mut reports = Vec::new();
        let pod = lab.netns_path(Ns::Pod);
        for ip in [IpAddr::from(lab::EXTERNAL_V4), IpAddr::from(lab::EXTERNAL_V6)] {
            let to = SocketAddr::new(ip, STABLE_PORT);
            for tcp in [true, false] {
                let name = format!("{} {to}", if tcp { "TCP" } else { "UDP" });
                let report = Arc::new(Mutex::new(FlowReport { name, ..Default::default() }));
                let (stop, r, pod) = (stop.clone(), report.clone(), pod.clone());
                threads.push(std::thread::spawn(move || {
                    let result = lab::in_netns(&pod, || {
                        if tcp {
                            tcp_client(to, &stop, &r)
                        } else {
                            udp_client(to, &stop, &r)
                        }
                        Ok(())
                    });
                    if let Err(e) = result {
                        r.lock().unwrap().errors.push(format!("{e:#}"));
                    }
                }));
                reports.push(report);
            }
        }
        let flows = StableFlows { stop, threads, reports };
        // Every flow must be running before the chaos starts.
        let started = Instant::now();
        while flows.reports().iter().any(|r| r.round_trips < 5 && r.errors.is_empty()) {
            assert!(started.elapsed() < Duration::from_secs(10), "stable flows did not start: {:#?}", flows.reports());
            std::thread::sleep(PERIOD);
        }
        flows
    }

    pub fn reports(&self) -> Vec<FlowReport> {
        self.reports.iter().map(|r| r.lock().unwrap().clone()).collect()
    }

    /// Stops the flows and returns what they saw.
    pub fn stop(mut self) -> Vec<FlowReport> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.reports()
    }

    /// Stops the flows and panics if any was interrupted: an error, or a gap over `bound`.
    pub fn assert_uninterrupted(self, bound: Duration, what: &str) -> Vec<FlowReport> {
        let reports = self.stop();
        for r in &reports {
            assert!(r.errors.is_empty(), "{what}: stable flow {} was interrupted: {:?}", r.name, r.errors);
            assert!(
                r.max_gap <= bound,
                "{what}: stable flow {} had no echo for {:?} (bound {bound:?})",
                r.name,
                r.max_gap
            );
        }
        let worst = reports.iter().map(|r| r.max_gap).max().unwrap_or_default();
        let trips: u64 = reports.iter().map(|r| r.round_trips).sum();
        eprintln!(
            "{what}: {} stable flows, {trips} round trips, none interrupted, longest gap {worst:.1?}",
            reports.len()
        );
        reports
    }
}

impl Drop for StableFlows {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn tcp_client(to: SocketAddr, stop: &AtomicBool, report: &Mutex<FlowReport>) {
    let mut s = match TcpStream::connect_timeout(&to, ECHO_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return report.lock().unwrap().errors.push(format!("connect: {e}")),
    };
    if s.peer_addr().ok() != Some(to) {
        report.lock().unwrap().errors.push(format!("peer {:?}", s.peer_addr()));
    }
    s.set_read_timeout(Some(ECHO_TIMEOUT)).unwrap();
    let mut last = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        let mut echo = [0u8; 8];
        let result = s.write_all(&seq.to_be_bytes()).and_then(|()| s.read_exact(&mut echo));
        let mut r = report.lock().unwrap();
        match result {
            Ok(()) if echo == seq.to_be_bytes() => {
                r.echo_after(&mut last);
            }
            Ok(()) => r.errors.push(format!("echo {} for {seq}", u64::from_be_bytes(echo))),
            Err(e) => return r.errors.push(format!("round trip {seq}: {e}")),
        }
        drop(r);
        std::thread::sleep(PERIOD);
    }
    report.lock().unwrap().gap_since(last);
}

fn udp_client(to: SocketAddr, stop: &AtomicBool, report: &Mutex<FlowReport>) {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
    let s = UdpSocket::bind(any).unwrap();
    // Connected: the kernel only delivers replies whose source is the external address.
    s.connect(to).unwrap();
    s.set_read_timeout(Some(ECHO_TIMEOUT)).unwrap();
    let mut last = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) {
        seq += 1;
        let mut echo = [0u8; 16];
        let result = s.send(&seq.to_be_bytes()).and_then(|_| s.recv(&mut echo));
        let mut r = report.lock().unwrap();
        match result {
            Ok(8) if echo[..8] == seq.to_be_bytes() => {
                r.echo_after(&mut last);
            }
            Ok(n) => r.errors.push(format!("echo {:?} for {seq}", &echo[..n])),
            // A missing datagram is an interruption; the flow goes on with the next number.
            Err(e) => r.errors.push(format!("datagram {seq}: {e}")),
        }
        drop(r);
        std::thread::sleep(PERIOD);
    }
    report.lock().unwrap().gap_since(last);
}
