//! The one task that programs nftables: every change is one atomic transaction, DNS answers
//! arriving together share one batch, and an address already learned with enough time left
//! costs nothing.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandbox_api::policy::Action;
use tokio::sync::{mpsc, oneshot};

use super::ruleset::{Fence, dyn_set, static_script};
use super::{NftError, StaticSpec, TABLE, element_timeout, run};
use crate::config::Mode;
use crate::engine::Engine;
use crate::metrics;
use crate::netlink::Netlink;

/// Names remembered per learned address, to withdraw it when none of them is allowed any more.
const NAMES_PER_ADDRESS: usize = 32;

struct Learned {
    expires: Instant,
    names: Vec<String>,
}

enum Job {
    Static {
        spec: StaticSpec,
        engine: Arc<Engine>,
        reply: oneshot::Sender<Result<(), NftError>>,
    },
    Learn {
        name: String,
        addrs: Vec<(IpAddr, u32)>,
        reply: oneshot::Sender<Result<(), NftError>>,
    },
}

/// Learned addresses: when each leaves the kernel set (as last written there) and the names
/// that led to it. Shared between the writer and the DNS path, which skips the writer when an
/// answer's addresses are all in place with enough time left.
type LearnedMap = Arc<std::sync::Mutex<HashMap<IpAddr, Learned>>>;

fn remember(entry: &mut Learned, name: &str) {
    if !entry.names.iter().any(|n| n == name) {
        // Bounded: many names on one address (a CDN) keep the newest few. Losing one only
        // means the address may be withdrawn early (fail closed).
        if entry.names.len() >= NAMES_PER_ADDRESS {
            entry.names.remove(0);
        }
        entry.names.push(name.to_owned());
    }
}

/// Whether the kernel entry must be (re)written: less than half its timeout left.
fn stale(entry: Option<&Learned>, ttl: u32, now: Instant) -> bool {
    let half = Duration::from_secs(u64::from(element_timeout(ttl) / 2));
    entry.is_none_or(|l| l.expires.saturating_duration_since(now) < half)
}

/// The next conntrack-mark generation; never 0, the mark of flows nothing admitted.
fn next_generation(current: u32) -> u32 {
    match current.wrapping_add(1) {
        0 => 1,
        n => n,
    }
}

/// Handle to the writer task.
#[derive(Clone)]
pub struct Nft {
    tx: mpsc::Sender<Job>,
    learned: LearnedMap,
}

impl Nft {
    /// Starts the writer. The first static apply takes the table over. `cgroup` is the
    /// sidecar's own cgroup as nft names it (see `identity`).
    pub fn start(cgroup: String) -> Nft {
        let (tx, rx) = mpsc::channel(4096);
        let learned = LearnedMap::default();
        // A fresh random generation: flows admitted by a previous sidecar's rules are judged
        // again by this one's.
        let fence = Fence {
            cgroup,
            generation: rand::random::<u32>() | 1,
        };
        tokio::spawn(writer(rx, learned.clone(), fence));
        Nft { tx, learned }
    }

    /// Replaces the static part; learned addresses of names the new engine denies are dropped,
    /// the others stay.
    pub async fn apply(&self, spec: StaticSpec, engine: Arc<Engine>) -> Result<(), NftError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Static {
                spec,
                engine,
                reply,
            })
            .await
            .map_err(|_| NftError::Stopped)?;
        rx.await.map_err(|_| NftError::Stopped)?
    }

    /// Admits the addresses of an allowed answer for `name`; returns once they are in the set.
    pub async fn learn(&self, name: String, addrs: Vec<(IpAddr, u32)>) -> Result<(), NftError> {
        if let Ok(mut learned) = self.learned.lock() {
            let now = Instant::now();
            if addrs
                .iter()
                .all(|(ip, ttl)| !stale(learned.get(ip), *ttl, now))
            {
                for (ip, _) in &addrs {
                    if let Some(entry) = learned.get_mut(ip) {
                        remember(entry, &name);
                    }
                }
                return Ok(());
            }
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Learn { name, addrs, reply })
            .await
            .map_err(|_| NftError::Stopped)?;
        rx.await.map_err(|_| NftError::Stopped)?
    }
}

fn lock(map: &LearnedMap) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Learned>> {
    map.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Adds learned addresses over netlink (on a blocking thread: it waits for the kernel's
/// acknowledgement), falling back to `nft -f` with the same elements if netlink fails.
async fn add_elements(
    netlink: &mut Option<Netlink>,
    elements: Vec<(IpAddr, Duration)>,
    script: &str,
) -> Result<(), NftError> {
    if let Some(mut nl) = netlink.take() {
        let joined = tokio::task::spawn_blocking(move || {
            let r = nl.add(TABLE, "dyn_allow_v4", "dyn_allow_v6", &elements);
            (nl, r)
        })
        .await;
        match joined {
            Ok((nl, Ok(()))) => {
                *netlink = Some(nl);
                return Ok(());
            }
            Ok((nl, Err(e))) => {
                tracing::warn!(error = %e, "netlink element add failed; retrying through nft");
                *netlink = Some(nl);
            }
            Err(e) => tracing::warn!(error = %e, "netlink worker failed; using nft from now on"),
        }
    }
    run(script).await
}

async fn writer(mut rx: mpsc::Receiver<Job>, learned: LearnedMap, mut fence: Fence) {
    let mut taken_over = false;
    let mut dynamic_ready = false;
    // The engine of the static state in the kernel: learns for names it denies are refused,
    // so an answer in flight during a policy change cannot re-admit a withdrawn name.
    let mut current: Option<Arc<Engine>> = None;
    let mut last_prune = Instant::now();
    let mut netlink = match Netlink::open() {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = %e, "no nf_tables netlink socket; learned addresses go through nft");
            None
        }
    };
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < 512 {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let now = Instant::now();
        if now.duration_since(last_prune) > Duration::from_secs(10) {
            lock(&learned).retain(|_, l| l.expires > now);
            last_prune = now;
        }
        let mut statics = Vec::new();
        let mut learns = Vec::new();
        for job in jobs {
            match job {
                Job::Static {
                    spec,
                    engine,
                    reply,
                } => statics.push((spec, engine, reply)),
                Job::Learn { name, addrs, reply } => learns.push((name, addrs, reply)),
            }
        }
        // Static changes: only the newest matters, every caller gets its outcome.
        if let Some((spec, engine, _)) = statics.last() {
            // The first apply replaces any existing table, learned addresses included: they may
            // come from a policy no longer in force (a restart reverts API changes that were not
            // persisted), so a restarted sidecar starts closed and relearns from answers.
            // A new generation on every change: established flows are judged again.
            fence.generation = next_generation(fence.generation);
            let mut script = static_script(spec, !taken_over, &fence);
            // Before the first apply nothing is learned (answers are refused until then).
            if taken_over {
                let mut map = lock(&learned);
                // Forget the addresses of names this policy denies; rebuild the dynamic
                // sets from what stays, in the same transaction.
                let mut dropped = false;
                map.retain(|_, l| {
                    l.names.retain(|n| engine.name(n).0 == Action::Allow);
                    let keep = !l.names.is_empty();
                    dropped |= !keep;
                    keep
                });
                if dropped && spec.mode == Mode::DnsNft {
                    for set in ["dyn_allow_v4", "dyn_allow_v6"] {
                        let _ = writeln!(script, "flush set inet {TABLE} {set}");
                    }
                    for (ip, l) in map.iter() {
                        let left = l.expires.saturating_duration_since(now).as_secs().max(1);
                        let _ = writeln!(
                            script,
                            "add element inet {TABLE} {} {{ {ip} timeout {left}s }}",
                            dyn_set(ip)
                        );
                    }
                }
            }
            let result = run(&script).await;
            metrics::nft_update("static", result.is_ok());
            if result.is_ok() {
                taken_over = true;
                dynamic_ready = spec.mode == Mode::DnsNft;
                current = Some(engine.clone());
            }
            for (_, _, reply) in statics {
                let _ = reply.send(result.clone());
            }
        }
        if learns.is_empty() {
            metrics::LEARNED.set(lock(&learned).len() as i64);
            continue;
        }
        if !dynamic_ready {
            for (_, _, reply) in learns {
                let _ = reply.send(Err(NftError::Refused(
                    "the nftables table is not in place".into(),
                )));
            }
            continue;
        }
        let mut script = String::new();
        let mut written: Vec<(IpAddr, Instant)> = Vec::new();
        let mut refused = Vec::new();
        {
            let map = lock(&learned);
            for (index, (name, addrs, _)) in learns.iter().enumerate() {
                if current
                    .as_ref()
                    .is_some_and(|e| e.name(name).0 != Action::Allow)
                {
                    refused.push(index);
                    continue;
                }
                for &(ip, ttl) in addrs {
                    if stale(map.get(&ip), ttl, now) && !written.iter().any(|(w, _)| *w == ip) {
                        let timeout = element_timeout(ttl);
                        let _ = writeln!(
                            script,
                            "add element inet {TABLE} {} {{ {ip} timeout {timeout}s }}",
                            dyn_set(&ip)
                        );
                        written.push((ip, now + Duration::from_secs(u64::from(timeout))));
                    }
                }
            }
        }
        let result = if script.is_empty() {
            Ok(())
        } else {
            let elements: Vec<(IpAddr, Duration)> = written
                .iter()
                .map(|(ip, until)| (*ip, until.saturating_duration_since(now)))
                .collect();
            let r = add_elements(&mut netlink, elements, &script).await;
            metrics::nft_update("dynamic", r.is_ok());
            r
        };
        {
            // Only what the kernel now holds is recorded.
            let mut map = lock(&learned);
            if result.is_ok() {
                for (ip, until) in &written {
                    let entry = map.entry(*ip).or_insert(Learned {
                        expires: *until,
                        names: Vec::new(),
                    });
                    entry.expires = entry.expires.max(*until);
                }
                for (index, (name, addrs, _)) in learns.iter().enumerate() {
                    if refused.contains(&index) {
                        continue;
                    }
                    for (ip, _) in addrs {
                        if let Some(entry) = map.get_mut(ip) {
                            remember(entry, name);
                        }
                    }
                }
            }
            metrics::LEARNED.set(map.len() as i64);
        }
        for (index, (_, _, reply)) in learns.into_iter().enumerate() {
            let outcome = if refused.contains(&index) {
                Err(NftError::Refused(
                    "the name is no longer allowed by the policy in force".into(),
                ))
            } else {
                result.clone()
            };
            let _ = reply.send(outcome);
        }
    }
}
