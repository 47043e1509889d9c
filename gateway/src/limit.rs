//! Rate limiting of failed credential checks per client address and sandbox. The reference's
//! 32-bit route signature could otherwise be brute-forced: once a client has used up its failures
//! against a sandbox for the current window, its credentials for that sandbox are not even
//! checked until the window ends (429). Keying by sandbox too keeps one abuser behind a shared
//! address (a load balancer's) from locking everyone out of every sandbox.

use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;

const PRUNE_EVERY: usize = 4096;

pub struct FailureLimit {
    limit: u32,
    window: Duration,
    /// (client, hash of the sandbox id) → (window start, failures in it).
    clients: DashMap<(IpAddr, u64), (Instant, u32)>,
    recorded: AtomicUsize,
    hasher: RandomState,
}

impl FailureLimit {
    /// `limit` failures per `window` per client and sandbox; 0 disables the limit.
    pub fn new(limit: u32, window: Duration) -> Self {
        Self {
            limit,
            window,
            clients: DashMap::new(),
            recorded: AtomicUsize::new(0),
            hasher: RandomState::new(),
        }
    }

    fn key(&self, client: IpAddr, sandbox: &str) -> (IpAddr, u64) {
        (client, self.hasher.hash_one(sandbox))
    }

    /// Whether `client` has used up its failures against `sandbox` for the current window.
    pub fn blocked(&self, client: IpAddr, sandbox: &str) -> bool {
        self.limit > 0
            && self
                .clients
                .get(&self.key(client, sandbox))
                .is_some_and(|e| e.0.elapsed() < self.window && e.1 >= self.limit)
    }

    /// Counts a failed check by `client` against `sandbox`.
    pub fn failed(&self, client: IpAddr, sandbox: &str) {
        if self.limit == 0 {
            return;
        }
        let now = Instant::now();
        let mut entry = self
            .clients
            .entry(self.key(client, sandbox))
            .or_insert((now, 0));
        if entry.0.elapsed() >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        drop(entry);
        if self.recorded.fetch_add(1, Ordering::Relaxed) % PRUNE_EVERY == PRUNE_EVERY - 1 {
            self.clients.retain(|_, e| e.0.elapsed() < self.window);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let l = FailureLimit::new(3, Duration::from_millis(200));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..3 {
            assert!(!l.blocked(a, "s"));
            l.failed(a, "s");
        }
        assert!(l.blocked(a, "s"));
        assert!(!l.blocked(b, "s"), "limits are per client");
        assert!(!l.blocked(a, "other"), "limits are per sandbox");
        std::thread::sleep(Duration::from_millis(250));
        assert!(!l.blocked(a, "s"), "a new window starts clean");
        let off = FailureLimit::new(0, Duration::from_secs(60));
        (0..10).for_each(|_| off.failed(a, "s"));
        assert!(!off.blocked(a, "s"));
    }
}
