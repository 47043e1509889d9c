//! Rate limiting of failed credential checks. The reference's 32-bit route signature could
//! otherwise be brute-forced, so two budgets are kept per window:
//!
//! - per client and sandbox: once a client has used up its failures against a sandbox, its
//!   credentials for that sandbox are not even checked until the window ends (429). IPv6 clients
//!   are keyed by their /64 (one subscriber's allocation: 2^64 addresses would otherwise be 2^64
//!   fresh clients), IPv4 clients by address. Keying by sandbox too keeps one abuser behind a
//!   shared address (a load balancer's) from locking everyone out of every sandbox.
//! - per sandbox, across all clients, for signed routes only: however many addresses an attacker
//!   holds, a sandbox's signatures can be guessed only so fast. Past it, that sandbox's signed
//!   routes get 429 while the secure-access header (a 192-bit token nobody guesses) keeps working,
//!   so an attack cannot lock out holders of the token.
//!
//! Memory is bounded: past `capacity` clients the expired entries are dropped (at most once a
//! second) and then an arbitrary entry is evicted, counted. An attacker who cycles addresses to
//! push its own entry out is still held by the per-sandbox budget.

use std::hash::{BuildHasher, Hash, RandomState};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Why a client's credentials were not checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// This client used up its failures against this sandbox.
    Client { retry_after: u64 },
    /// The sandbox's signed routes used up their failures across all clients.
    Sandbox { retry_after: u64 },
}

impl Blocked {
    pub fn retry_after(self) -> u64 {
        match self {
            Blocked::Client { retry_after } | Blocked::Sandbox { retry_after } => retry_after,
        }
    }

    /// The `auth_failures_total` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Blocked::Client { .. } => "rate_limited",
            Blocked::Sandbox { .. } => "sandbox_rate_limited",
        }
    }
}

/// The limiter's settings; a limit of 0 disables that budget.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    pub per_client: u32,
    pub per_sandbox: u32,
    pub window: Duration,
    /// Most client entries kept.
    pub capacity: usize,
}

/// The key a client is limited by: IPv4 (and IPv4-mapped IPv6) by address, IPv6 by /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match sandbox_api::net::canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Failure counts per key in fixed windows, at most `capacity` keys.
struct Windows<K> {
    map: DashMap<K, (Instant, u32)>,
    capacity: usize,
    last_prune: Mutex<Option<Instant>>,
}

impl<K: Eq + Hash + Copy> Windows<K> {
    fn new(capacity: usize) -> Self {
        Self {
            map: DashMap::new(),
            capacity,
            last_prune: Mutex::new(None),
        }
    }

    /// Seconds until `key`'s window ends when it has reached `limit`.
    fn blocked(&self, key: &K, limit: u32, window: Duration) -> Option<u64> {
        if limit == 0 {
            return None;
        }
        let entry = self.map.get(key)?;
        let age = entry.0.elapsed();
        (age < window && entry.1 >= limit).then(|| {
            let left = window.saturating_sub(age);
            left.as_secs() + u64::from(left.subsec_nanos() > 0)
        })
    }

    /// Counts a failure for `key`; returns how many entries were evicted to make room.
    fn failed(&self, key: K, window: Duration) -> u64 {
        let mut evicted = 0;
        if self.map.len() >= self.capacity && !self.map.contains_key(&key) {
            evicted = self.make_room(window);
        }
        let now = Instant::now();
        let mut entry = self.map.entry(key).or_insert((now, 0));
        if entry.0.elapsed() >= window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        evicted
    }

    fn make_room(&self, window: Duration) -> u64 {
        let prune = self.last_prune.lock().is_ok_and(|mut last| {
            let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            if due {
                *last = Some(Instant::now());
            }
            due
        });
        if prune {
            self.map.retain(|_, e| e.0.elapsed() < window);
        }
        let mut evicted = 0;
        while self.map.len() >= self.capacity {
            let Some(victim) = self.map.iter().next().map(|e| *e.key()) else {
                break;
            };
            self.map.remove(&victim);
            evicted += 1;
        }
        evicted
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

pub struct FailureLimit {
    budgets: Budgets,
    /// (client key, hash of the sandbox id) → failures in the current window.
    clients: Windows<(IpAddr, u64)>,
    /// Hash of the sandbox id → failed signatures in the current window.
    sandboxes: Windows<u64>,
    hasher: RandomState,
}

impl FailureLimit {
    pub fn new(budgets: Budgets) -> Self {
        Self {
            budgets,
            clients: Windows::new(budgets.capacity.max(1)),
            // One entry per secure sandbox under attack; bounded like the clients.
            sandboxes: Windows::new(budgets.capacity.max(1)),
            hasher: RandomState::new(),
        }
    }

    /// Whether `client`'s credentials for `sandbox` must not be checked now; `signed` when the
    /// request carries a signed route rather than (only) the secure-access header.
    pub fn blocked(&self, client: Option<IpAddr>, sandbox: &str, signed: bool) -> Option<Blocked> {
        let window = self.budgets.window;
        let id = self.hasher.hash_one(sandbox);
        if let Some(ip) = client
            && let Some(retry_after) =
                self.clients
                    .blocked(&(client_key(ip), id), self.budgets.per_client, window)
        {
            return Some(Blocked::Client { retry_after });
        }
        if signed
            && let Some(retry_after) = self
                .sandboxes
                .blocked(&id, self.budgets.per_sandbox, window)
        {
            return Some(Blocked::Sandbox { retry_after });
        }
        None
    }

    /// Counts a failed check; returns the entries evicted to make room (for the metric).
    pub fn failed(&self, client: Option<IpAddr>, sandbox: &str, signed: bool) -> u64 {
        let window = self.budgets.window;
        let id = self.hasher.hash_one(sandbox);
        let mut evicted = 0;
        if let Some(ip) = client
            && self.budgets.per_client > 0
        {
            evicted += self.clients.failed((client_key(ip), id), window);
        }
        if signed && self.budgets.per_sandbox > 0 {
            evicted += self.sandboxes.failed(id, window);
        }
        evicted
    }

    /// Client entries held now.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn budgets(per_client: u32, per_sandbox: u32, window_ms: u64, capacity: usize) -> Budgets {
        Budgets {
            per_client,
            per_sandbox,
            window: Duration::from_millis(window_ms),
            capacity,
        }
    }

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let l = FailureLimit::new(budgets(3, 0, 200, 100));
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        for _ in 0..3 {
            assert_eq!(l.blocked(a, "s", true), None);
            l.failed(a, "s", true);
        }
        assert_eq!(
            l.blocked(a, "s", false),
            Some(Blocked::Client { retry_after: 1 })
        );
        assert_eq!(l.blocked(b, "s", true), None, "limits are per client");
        assert_eq!(l.blocked(a, "other", true), None, "limits are per sandbox");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(l.blocked(a, "s", true), None, "a new window starts clean");
        let off = FailureLimit::new(budgets(0, 0, 60_000, 100));
        (0..10).for_each(|_| {
            off.failed(a, "s", true);
        });
        assert_eq!(off.blocked(a, "s", true), None);
        assert_eq!(off.clients(), 0, "a disabled limit keeps nothing");
    }

    #[test]
    fn ipv6_clients_share_their_64_and_ipv4_mapped_is_ipv4() {
        let l = FailureLimit::new(budgets(2, 0, 60_000, 100));
        l.failed(ip("2001:db8:1:2::1"), "s", true);
        l.failed(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), "s", true);
        assert!(l.blocked(ip("2001:db8:1:2:abcd::9"), "s", true).is_some());
        assert_eq!(
            l.blocked(ip("2001:db8:1:3::1"), "s", true),
            None,
            "another /64"
        );
        l.failed(ip("192.0.2.7"), "s", true);
        l.failed(ip("::ffff:192.0.2.7"), "s", true);
        assert!(l.blocked(ip("192.0.2.7"), "s", true).is_some());
        assert_eq!(l.blocked(ip("192.0.2.8"), "s", true), None);
        assert_eq!(
            client_key("2001:db8::1:2:3:4".parse().unwrap()),
            "2001:db8::".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn the_sandbox_budget_stops_signed_routes_from_any_client_but_not_the_header() {
        let l = FailureLimit::new(budgets(1000, 5, 60_000, 100));
        for i in 0..5 {
            l.failed(ip(&format!("198.51.100.{i}")), "s", true);
        }
        let fresh = ip("203.0.113.1");
        let blocked = l.blocked(fresh, "s", true).unwrap();
        assert!(
            matches!(blocked, Blocked::Sandbox { retry_after } if (59..=60).contains(&retry_after))
        );
        assert_eq!(blocked.reason(), "sandbox_rate_limited");
        assert_eq!(
            l.blocked(fresh, "s", false),
            None,
            "the header still checks"
        );
        assert_eq!(
            l.blocked(fresh, "t", true),
            None,
            "other sandboxes unaffected"
        );
        // Header failures never spend the sandbox budget.
        for _ in 0..50 {
            l.failed(fresh, "u", false);
        }
        assert_eq!(l.blocked(ip("203.0.113.2"), "u", true), None);
    }

    #[test]
    fn memory_is_bounded_and_evictions_are_counted() {
        let l = FailureLimit::new(budgets(3, 0, 60_000, 50));
        let mut evicted = 0;
        for i in 0..500u32 {
            let addr = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            evicted += l.failed(Some(addr), "s", false);
        }
        assert!(l.clients() <= 50, "{} entries", l.clients());
        assert_eq!(evicted, 450);
    }

    #[test]
    fn expired_entries_are_dropped_before_any_live_one_is_evicted() {
        let l = FailureLimit::new(budgets(3, 0, 50, 10));
        for i in 0..10u32 {
            l.failed(Some(IpAddr::V4(i.into())), "s", false);
        }
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(l.failed(ip("192.0.2.1"), "s", false), 0);
        assert_eq!(l.clients(), 1);
    }
}
