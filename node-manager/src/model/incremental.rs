//! The desired frontends kept up to date one changed Service at a time.
//!
//! Every agent holds every Service of the cluster and sees every change: rebuilding all of
//! them per change (`desired`) costs each agent O(N) CPU per Service change, cluster-wide
//! O(nodes × N). Here a change costs its own Service's frontends: the snapshot's Services are
//! compared with the last ones by pointer (the sources share one `Arc` per Service version),
//! and only those that differ are recomputed. The answer is the same as `desired` on the same
//! Services (tested against it on random sequences of changes); the periodic resync still
//! rebuilds from scratch.
use std::{cmp::Ordering, collections::BTreeMap, net::IpAddr, sync::Arc};

use compact_str::CompactString;

use super::{FrontendAddr, Options, Protocol, ServiceInfo, Target, service_frontends};

/// What one update changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Update {
    /// Frontends whose target changed: the new target, or `None` when no Service claims them
    /// any more. Frontends not listed are as before.
    pub changed: BTreeMap<FrontendAddr, Option<Target>>,
    /// Problems found in the Services recomputed (each names its Service), and conflicts.
    pub warnings: Vec<String>,
}

/// A Service that changed: its last version (none if new), its version now (none if gone).
type Change<'a> = (Option<Arc<ServiceInfo>>, Option<&'a Arc<ServiceInfo>>);

/// The model: every Service as last seen, and the winner of every frontend.
#[derive(Debug)]
pub struct Model {
    opts: Options,
    /// Sorted by name (unique): an update walks it beside the snapshot's Services, equally
    /// sorted, so an unchanged Service costs one pointer comparison (no hashing of its name).
    services: Vec<Arc<ServiceInfo>>,
    /// The frontends and who won each: equal to `desired(services).frontends`.
    frontends: BTreeMap<FrontendAddr, Target>,
    /// For a frontend claimed by more than one Service, the others (name → their cluster IP).
    losers: BTreeMap<FrontendAddr, BTreeMap<CompactString, IpAddr>>,
}

impl Model {
    pub fn new(opts: Options) -> Model {
        Model { opts, services: Vec::new(), frontends: BTreeMap::new(), losers: BTreeMap::new() }
    }

    /// The desired frontends.
    pub fn frontends(&self) -> &BTreeMap<FrontendAddr, Target> {
        &self.frontends
    }

    /// Forgets everything and takes `services` from scratch (every warning is reported again).
    pub fn rebuild(&mut self, services: &[Arc<ServiceInfo>]) -> Update {
        let before = std::mem::take(&mut self.frontends);
        self.losers.clear();
        let sorted: Vec<Arc<ServiceInfo>> = by_name(services).into_iter().cloned().collect();
        let mut warnings = Vec::new();
        for svc in &sorted {
            self.claim_all(svc, &mut warnings);
        }
        self.services = sorted;
        Update { changed: diff(&before, &self.frontends), warnings }
    }

    /// Brings the model to `services` (names unique, as a source publishes them), recomputing
    /// only the Services that are new, gone, or not the same `Arc` as before.
    pub fn update(&mut self, services: &[Arc<ServiceInfo>]) -> Update {
        let mut touched: BTreeMap<FrontendAddr, Option<Target>> = BTreeMap::new();
        let mut warnings = Vec::new();
        let now = by_name(services);
        // Both lists sorted by name: one merge finds what is new, gone or changed.
        let mut changes: Vec<Change> = Vec::new();
        let (mut old, mut new) = (self.services.iter().peekable(), now.iter().peekable());
        loop {
            match (old.peek(), new.peek()) {
                (Some(o), Some(n)) if Arc::ptr_eq(o, n) => {
                    old.next();
                    new.next();
                }
                (Some(o), Some(n)) => match o.name.cmp(&n.name) {
                    Ordering::Equal => changes.push((old.next().cloned(), new.next().copied())),
                    Ordering::Less => changes.push((old.next().cloned(), None)),
                    Ordering::Greater => changes.push((None, new.next().copied())),
                },
                (Some(_), None) => changes.push((old.next().cloned(), None)),
                (None, Some(_)) => changes.push((None, new.next().copied())),
                (None, None) => break,
            }
        }
        // Withdraw every old claim first, then make the new ones: a Service that moves a
        // frontend to another never sees its own old claim.
        for (old, _) in &changes {
            if let Some(old) = old {
                for (f, _) in service_frontends(old, &self.opts, &mut Vec::new()) {
                    touched.entry(f).or_insert_with(|| self.frontends.get(&f).cloned());
                    self.withdraw(&f, &old.name);
                }
            }
        }
        for (_, new) in &changes {
            if let Some(new) = new {
                for (f, cluster_ip) in service_frontends(new, &self.opts, &mut warnings) {
                    touched.entry(f).or_insert_with(|| self.frontends.get(&f).cloned());
                    self.claim(f, &new.name, cluster_ip, &mut warnings);
                }
            }
        }
        if !changes.is_empty() {
            self.services = now.into_iter().cloned().collect();
        }
        touched.retain(|f, before| {
            let now = self.frontends.get(f);
            if now == before.as_ref() {
                return false;
            }
            *before = now.cloned();
            true
        });
        Update { changed: touched, warnings }
    }

    fn claim_all(&mut self, svc: &ServiceInfo, warnings: &mut Vec<String>) {
        for (f, cluster_ip) in service_frontends(svc, &self.opts, warnings) {
            self.claim(f, &svc.name, cluster_ip, warnings);
        }
    }

    /// `owner` claims `f`: the Service whose name sorts first holds it.
    fn claim(&mut self, f: FrontendAddr, owner: &str, cluster_ip: IpAddr, warnings: &mut Vec<String>) {
        let Some(current) = self.frontends.get_mut(&f) else {
            self.frontends.insert(f, Target { cluster_ip, owner: owner.into() });
            return;
        };
        if current.owner == owner {
            return; // the same Service twice (one address as external IP and ingress IP)
        }
        let (winner, loser, loser_ip) = if owner < current.owner.as_str() {
            let demoted = std::mem::replace(current, Target { cluster_ip, owner: owner.into() });
            (owner.into(), demoted.owner, demoted.cluster_ip)
        } else {
            (current.owner.clone(), owner.into(), cluster_ip)
        };
        // Several Services sharing one LB IP on different ports is normal (MetalLB's
        // allow-shared-ip); only the echo entry overlaps then, so it is not a conflict.
        if f.protocol != Protocol::IcmpEcho {
            warnings.push(format!("{loser}: frontend {f} is also claimed by {winner}; {winner} wins (sorts first)"));
        }
        self.losers.entry(f).or_default().insert(loser, loser_ip);
    }

    /// `owner` no longer claims `f`: the next Service in name order takes it, if any.
    fn withdraw(&mut self, f: &FrontendAddr, owner: &str) {
        match self.frontends.get(f) {
            Some(current) if current.owner == owner => {
                let next = self.losers.get_mut(f).and_then(|l| l.pop_first());
                if self.losers.get(f).is_some_and(BTreeMap::is_empty) {
                    self.losers.remove(f);
                }
                match next {
                    Some((owner, cluster_ip)) => self.frontends.insert(*f, Target { cluster_ip, owner }),
                    None => self.frontends.remove(f),
                };
            }
            _ => {
                if let Some(losers) = self.losers.get_mut(f) {
                    losers.remove(owner);
                    if losers.is_empty() {
                        self.losers.remove(f);
                    }
                }
            }
        }
    }
}

/// The frontends whose target differs between `before` and `after`, with the one in `after`.
fn diff(
    before: &BTreeMap<FrontendAddr, Target>,
    after: &BTreeMap<FrontendAddr, Target>,
) -> BTreeMap<FrontendAddr, Option<Target>> {
    before
        .keys()
        .chain(after.keys())
        .filter(|f| before.get(f) != after.get(f))
        .map(|f| (*f, after.get(f).cloned()))
        .collect()
}

/// `services` in name order: as they are when a source lists them from a store kept sorted
/// (then only checked), else sorted here.
fn by_name(services: &[Arc<ServiceInfo>]) -> Vec<&Arc<ServiceInfo>> {
    let mut sorted: Vec<&Arc<ServiceInfo>> = services.iter().collect();
    if !sorted.is_sorted_by(|a, b| a.name <= b.name) {
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
    }
    sorted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::desired;

    /// A small deterministic generator (the tests must not depend on a seed crate's changes).
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// A random Service from a small space, so that Services collide on addresses and ports.
    fn random_service(rng: &mut Rng, name: &str) -> ServiceInfo {
        let ext = |rng: &mut Rng| match rng.below(3) {
            0 => format!("203.0.113.{}", rng.below(3)).into(),
            1 => format!("2001:db8::{}", rng.below(3)).into(),
            _ => CompactString::from(["bad", "", "203.0.113.300"][rng.below(3) as usize]),
        };
        let cluster = match rng.below(5) {
            0 => vec![],
            1 => vec!["None".into()],
            2 => vec![format!("198.51.100.{}", rng.below(5)).into()],
            3 => vec![format!("2001:db8:5::{}", rng.below(5)).into()],
            _ => vec![format!("198.51.100.{}", rng.below(5)).into(), format!("2001:db8:5::{}", rng.below(5)).into()],
        };
        let protocols = [None, Some("TCP"), Some("UDP"), Some("SCTP")];
        ServiceInfo {
            name: name.into(),
            no_frontends: rng.below(10) == 0,
            cluster_ips: cluster,
            external_ips: (0..rng.below(3)).map(|_| ext(rng)).collect(),
            ingress_ips: (0..rng.below(3)).map(|_| ext(rng)).collect(),
            ports: (0..rng.below(3))
                .map(|_| {
                    let port = [80, 443, 0, 70_000][rng.below(4) as usize];
                    (port, protocols[rng.below(4) as usize].map(CompactString::from))
                })
                .collect(),
        }
    }

    #[test]
    fn every_update_equals_the_rebuild_from_scratch_and_reports_exactly_what_changed() {
        for (seed, opts) in [
            (1, Options::all()),
            (2, Options { ipv6: false, ..Options::all() }),
            (3, Options { external_ip_allow: Some(vec!["203.0.113.0/31".parse().unwrap()]), ..Options::all() }),
        ] {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
            let mut model = Model::new(opts.clone());
            let mut services: Vec<Arc<ServiceInfo>> = Vec::new();
            let mut before = BTreeMap::new();
            for step in 0..3_000 {
                // Add, change or remove one to three Services of twelve names.
                for _ in 0..=rng.below(3) {
                    let name = format!("ns/svc-{}", rng.below(12));
                    services.retain(|s| s.name != name);
                    if rng.below(4) != 0 {
                        services.push(Arc::new(random_service(&mut rng, &name)));
                    }
                }
                // Sometimes the same Services in another order, sometimes an unchanged copy.
                if rng.below(5) == 0 {
                    services.reverse();
                }
                if rng.below(7) == 0
                    && let Some(s) = services.first_mut()
                {
                    *s = Arc::new((**s).clone());
                }
                let update = model.update(&services);
                let want = desired(&services, &opts);
                assert_eq!(model.frontends(), &want.frontends, "seed {seed} step {step}: {services:#?}");
                assert_eq!(update.changed, diff(&before, &want.frontends), "seed {seed} step {step}");
                before = want.frontends;
            }
        }
    }

    #[test]
    fn a_rebuild_reports_every_warning_as_desired_does() {
        let mut rng = Rng(7);
        let services: Vec<Arc<ServiceInfo>> =
            (0..40).map(|k| Arc::new(random_service(&mut rng, &format!("ns/svc-{k:02}")))).collect();
        let mut model = Model::new(Options::all());
        let update = model.rebuild(&services);
        let want = desired(&services, &Options::all());
        assert_eq!(model.frontends(), &want.frontends);
        assert_eq!(update.warnings, want.warnings);
        assert_eq!(update.changed.len(), want.frontends.len());
        // A second rebuild of the same Services changes nothing.
        assert!(model.rebuild(&services).changed.is_empty());
    }

    #[test]
    fn a_change_recomputes_only_its_service_and_a_conflict_is_reported_when_it_arises() {
        let lb = |name: &str, ext: &str, cluster: &str| {
            Arc::new(ServiceInfo {
                name: name.into(),
                cluster_ips: vec![cluster.into()],
                ingress_ips: vec![ext.into()],
                ports: vec![(80, None)],
                ..ServiceInfo::default()
            })
        };
        let mut model = Model::new(Options::all());
        let (a, b) = (lb("ns/a", "203.0.113.1", "198.51.100.1"), lb("ns/b", "203.0.113.2", "198.51.100.2"));
        model.update(&[a.clone(), b.clone()]);
        // b takes a's address: b loses (a sorts first), and says so.
        let b2 = lb("ns/b", "203.0.113.1", "198.51.100.2");
        let update = model.update(&[a.clone(), b2.clone()]);
        assert_eq!(
            update.warnings,
            ["ns/b: frontend 203.0.113.1:80/TCP is also claimed by ns/a; ns/a wins (sorts first)"]
        );
        assert_eq!(update.changed.len(), 2, "b's old port and echo entries go: {update:?}");
        assert!(update.changed.values().all(Option::is_none));
        // a goes: b takes over a's frontends.
        let update = model.update(&[b2]);
        assert_eq!(update.changed.len(), 2);
        assert!(update.changed.values().all(|t| t.as_ref().is_some_and(|t| t.owner == "ns/b")));
        assert!(update.warnings.is_empty());
    }
}
