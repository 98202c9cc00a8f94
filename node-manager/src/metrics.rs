//! Metrics and health over HTTP (`--metrics-addr`): Prometheus text on `/metrics`, `/healthz`
//! (the process answers) and `/readyz` (initial sync done and programs attached).
//!
//! The datapath's figures are read from the pins at scrape time, through the same decoder as
//! `inspect`, so metrics and `inspect` can never disagree and nothing is cached in between.
//! The agent's own figures (reconcile durations and errors, watch restarts, readiness) live in
//! `Telemetry`, shared with the agent loop.
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header::CONTENT_TYPE, service::service_fn};
use hyper_util::rt::TokioIo;
use node_manager_common::{FLOWS_DGRAM_MAX, FLOWS_MAX, FRONTENDS_MAX, POD_CIDRS_MAX, SOCK_REV_MAX};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::Histogram,
    },
    registry::Registry,
};
use tokio::net::TcpListener;

use crate::state;

/// Which reconcile step a duration or error belongs to.
pub type StepLabels = Vec<(&'static str, &'static str)>;

/// The agent's own figures, updated by the agent loop and the Service source.
#[derive(Debug)]
pub struct Telemetry {
    bpffs: PathBuf,
    /// The first snapshot of Services was written to the maps.
    synced: AtomicBool,
    /// Every wanted hook is attached (pod interfaces, socket hooks, INVALID drop).
    attached: AtomicBool,
    reconcile_seconds: Family<StepLabels, Histogram>,
    reconcile_errors: Family<StepLabels, Counter>,
    watch_restarts: Family<StepLabels, Counter>,
    /// Frontends the last sync had no room for in NM_FRONTENDS.
    frontends_not_applied: std::sync::atomic::AtomicU64,
    /// Flows the flow sweep removed (their conntrack entries were gone).
    flows_swept: Counter,
}

impl Telemetry {
    pub fn new(bpffs: PathBuf) -> Arc<Telemetry> {
        Arc::new(Telemetry {
            bpffs,
            synced: AtomicBool::new(false),
            attached: AtomicBool::new(false),
            // 100 µs … ~26 s: a map diff of one Service is sub-millisecond, a cold sync of
            // 100,000 frontends a few seconds.
            reconcile_seconds: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0001, 4.0, 10))
            }),
            reconcile_errors: Family::default(),
            watch_restarts: Family::default(),
            frontends_not_applied: std::sync::atomic::AtomicU64::new(0),
            flows_swept: Counter::default(),
        })
    }

    /// Records one reconcile step (`maps`, `pod_cidrs`, `interfaces`, `socket_hooks`,
    /// `drop_invalid`, `flow_sweep`).
    pub fn reconciled(&self, step: &'static str, took: Duration, ok: bool) {
        let labels = vec![("step", step)];
        self.reconcile_seconds.get_or_create(&labels).observe(took.as_secs_f64());
        if !ok {
            self.reconcile_errors.get_or_create(&labels).inc();
        }
    }

    /// A watch of `resource` failed and is restarted (with backoff) by the watcher.
    pub fn watch_restarted(&self, resource: &'static str) {
        self.watch_restarts.get_or_create(&vec![("resource", resource)]).inc();
    }

    pub fn flows_swept(&self, n: usize) {
        self.flows_swept.inc_by(n as u64);
    }

    pub fn set_frontends_not_applied(&self, n: usize) {
        self.frontends_not_applied.store(n as u64, Ordering::Relaxed);
    }

    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    pub fn set_attached(&self, attached: bool) {
        self.attached.store(attached, Ordering::Relaxed);
    }

    /// `None` when ready, else what is still missing.
    pub fn not_ready(&self) -> Option<String> {
        let mut missing = Vec::new();
        if !self.synced.load(Ordering::Relaxed) {
            missing.push("initial sync of Services not done");
        }
        if !self.attached.load(Ordering::Relaxed) {
            missing.push("programs not attached");
        }
        (!missing.is_empty()).then(|| missing.join("; "))
    }

    /// The registry served on /metrics: the agent's figures plus the datapath read at scrape.
    fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::with_prefix("node_manager");
        registry.register(
            "reconcile_duration_seconds",
            "Time taken by each reconcile step",
            self.reconcile_seconds.clone(),
        );
        registry.register("reconcile_errors", "Reconcile steps that failed (retried)", self.reconcile_errors.clone());
        registry.register(
            "watch_restarts",
            "Kubernetes watches restarted after an error (the watcher retries with backoff)",
            self.watch_restarts.clone(),
        );
        registry.register(
            "flows_swept",
            "Rewritten flows removed from the flow maps because conntrack no longer tracked their connections",
            self.flows_swept.clone(),
        );
        registry.register_collector(Box::new(DatapathCollector { telemetry: self.clone() }));
        registry
    }
}

/// Reads the pinned datapath at every scrape.
#[derive(Debug)]
struct DatapathCollector {
    telemetry: Arc<Telemetry>,
}

type Labels = Vec<(&'static str, String)>;

/// Encodes one metric family with its samples.
fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    match samples {
        [(labels, value)] if labels.is_empty() => ConstCounter::new(*value).encode(family),
        _ => samples
            .iter()
            .try_for_each(|(labels, value)| ConstCounter::new(*value).encode(family.encode_family(labels)?)),
    }
}

fn gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    match samples {
        [(labels, value)] if labels.is_empty() => ConstGauge::new(*value).encode(family),
        _ => {
            samples.iter().try_for_each(|(labels, value)| ConstGauge::new(*value).encode(family.encode_family(labels)?))
        }
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let build = vec![
            ("version", env!("CARGO_PKG_VERSION").to_owned()),
            ("layout", node_manager_common::LAYOUT_VERSION.to_string()),
        ];
        gauges(&mut encoder, "build_info", "Build of the running agent", &[(build, 1.0)])?;
        gauges(
            &mut encoder,
            "ready",
            "1 when the initial sync is done and the programs are attached",
            &[(Vec::new(), if self.telemetry.not_ready().is_none() { 1.0 } else { 0.0 })],
        )?;
        let state = match state::read(&self.telemetry.bpffs) {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "metrics: reading the pinned datapath failed");
                return gauges(
                    &mut encoder,
                    "datapath_readable",
                    "1 when the pinned maps could be read",
                    &[(Vec::new(), 0.0)],
                );
            }
        };
        gauges(&mut encoder, "datapath_readable", "1 when the pinned maps could be read", &[(Vec::new(), 1.0)])?;

        let counter =
            |name: &str| state.counters.iter().find(|c| c.name == name).map_or((0, 0), |c| (c.packets, c.bytes));
        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        for (direction, prefix) in [("request", "rewrite_ingress"), ("reply", "rewrite_egress")] {
            for (suffix, family) in [("v4", "ipv4"), ("v6", "ipv6")] {
                let (p, b) = counter(&format!("{prefix}_{suffix}"));
                let labels: Labels = vec![("direction", direction.to_owned()), ("family", family.to_owned())];
                packets.push((labels.clone(), p));
                bytes.push((labels, b));
            }
        }
        counters(
            &mut encoder,
            "rewritten_packets",
            "Pod packets rewritten by the TC programs: request = external address to cluster IP, reply = back",
            &packets,
        )?;
        counters(&mut encoder, "rewritten_bytes", "Bytes of the rewritten pod packets", &bytes)?;
        let events: Vec<(Labels, u64)> =
            state.counters.iter().map(|c| (vec![("event", c.name.to_owned())], c.packets)).collect();
        counters(
            &mut encoder,
            "datapath_events",
            "Every datapath counter by name: rewrites, passes by reason, socket-hook calls, failures",
            &events,
        )?;

        let d = &state.drop_invalid;
        let mode = d.mode.map_or_else(|| "off".to_owned(), |m| m.to_string());
        let mut dropped = Vec::new();
        let mut dropped_bytes = Vec::new();
        for (family, value) in [("ipv4", d.counters.dropped_v4), ("ipv6", d.counters.dropped_v6)] {
            if let Some((p, b)) = value {
                let labels: Labels = vec![("family", family.to_owned()), ("mode", mode.clone())];
                dropped.push((labels.clone(), p));
                dropped_bytes.push((labels, b));
            }
        }
        counters(&mut encoder, "invalid_dropped_packets", "Packets dropped as conntrack INVALID", &dropped)?;
        counters(&mut encoder, "invalid_dropped_bytes", "Bytes dropped as conntrack INVALID", &dropped_bytes)?;
        let unverified: Vec<(Labels, u64)> = [("ipv4", d.counters.unverified_v4), ("ipv6", d.counters.unverified_v6)]
            .into_iter()
            .filter_map(|(family, v)| Some((vec![("family", family.to_owned())], v?)))
            .collect();
        counters(
            &mut encoder,
            "invalid_unverified_packets",
            "bpf mode: packets without a conntrack entry accepted because conntrack was not seen active",
            &unverified,
        )?;
        if let Some(n) = d.counters.conntrack_invalid {
            counters(
                &mut encoder,
                "conntrack_invalid",
                "Conntrack's own count of INVALID packets in this network namespace",
                &[(Vec::new(), n)],
            )?;
        }
        let modes: Vec<(Labels, f64)> = crate::features::drop_invalid::Mode::ALL
            .iter()
            .map(|m| (vec![("mode", m.to_string())], if d.mode == Some(*m) { 1.0 } else { 0.0 }))
            .collect();
        gauges(&mut encoder, "drop_invalid_mode", "1 for the mode the INVALID drop uses", &modes)?;

        let fill = [
            ("NM_FRONTENDS", state.frontends.len(), FRONTENDS_MAX),
            ("NM_POD_CIDRS", state.pod_cidrs.len(), POD_CIDRS_MAX),
            ("NM_FLOWS", state.flows, FLOWS_MAX),
            ("NM_FLOWS_DGRAM", state.datagram_flows, FLOWS_DGRAM_MAX),
            ("NM_SOCK_REV", state.sockets, SOCK_REV_MAX),
        ];
        let entries: Vec<(Labels, f64)> =
            fill.iter().map(|(m, n, _)| (vec![("map", (*m).to_owned())], *n as f64)).collect();
        let ratio: Vec<(Labels, f64)> =
            fill.iter().map(|(m, n, max)| (vec![("map", (*m).to_owned())], *n as f64 / f64::from(*max))).collect();
        gauges(&mut encoder, "map_entries", "Entries in each datapath map", &entries)?;
        gauges(&mut encoder, "map_fill_ratio", "Entries / capacity of each datapath map", &ratio)?;
        gauges(
            &mut encoder,
            "frontends",
            "Frontends (external address, port, protocol) served",
            &[(Vec::new(), state.frontends.len() as f64)],
        )?;
        gauges(
            &mut encoder,
            "frontends_not_applied",
            "Frontends wanted that NM_FRONTENDS had no room for at the last sync (named in the log)",
            &[(Vec::new(), self.telemetry.frontends_not_applied.load(Ordering::Relaxed) as f64)],
        )?;
        let present = state.interfaces.iter().filter(|i| i.present).count();
        gauges(
            &mut encoder,
            "attached_interfaces",
            "Pod interfaces with the TC programs attached",
            &[(Vec::new(), present as f64)],
        )?;
        gauges(
            &mut encoder,
            "socket_hooks",
            "cgroup socket hooks attached for host-network clients",
            &[(Vec::new(), state.cgroup_hooks.len() as f64)],
        )?;
        Ok(())
    }
}

/// Binds now (so a bad or busy address fails the start with a clear message) and serves in
/// the background.
pub async fn serve(addr: SocketAddr, telemetry: Arc<Telemetry>) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("--metrics-addr / METRICS_ADDR: cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    let registry = Arc::new(telemetry.registry());
    tracing::info!(addr = %bound, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (telemetry, registry) = (telemetry.clone(), registry.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| respond(req, telemetry.clone(), registry.clone()));
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Ok(bound)
}

async fn respond(
    req: Request<Incoming>,
    telemetry: Arc<Telemetry>,
    registry: Arc<Registry>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    Ok(match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
        "/readyz" => match telemetry.not_ready() {
            None => text(StatusCode::OK, "ready\n".to_owned()),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        "/metrics" => {
            // Reading the pins is a few thousand syscalls at most: off the async workers.
            let encoded = tokio::task::spawn_blocking(move || {
                let mut out = String::new();
                prometheus_client::encoding::text::encode(&mut out, &registry).map(|()| out)
            })
            .await;
            match encoded {
                Ok(Ok(body)) => {
                    let mut response = text(StatusCode::OK, body);
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    response
                }
                _ => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed\n".to_owned()),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n".to_owned()),
    })
}
