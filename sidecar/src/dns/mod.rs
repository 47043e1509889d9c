//! The DNS proxy: answers denied names with NXDOMAIN, forwards allowed queries to the upstreams,
//! checks the CNAME chain of the answer, strips addresses that point into metadata or private
//! space unless a rule names them (no DNS rebinding into the pod's host or cluster), admits the
//! answer's addresses to the nftables sets before the client sees the answer, and caches
//! answers for their TTL.
//!
//! `wire` builds and matches messages, `upstream` talks to the resolvers, `cache` keeps
//! answers, `server` runs the listeners; this module decides.

mod cache;
mod server;
mod upstream;
mod wire;

use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use arc_swap::ArcSwap;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{RData, Record, RecordType};
use sandbox_api::net::{self, Cidr};
use sandbox_api::policy::Action;
use tokio_util::sync::CancellationToken;

pub use server::{bind, serve};
pub use upstream::Probe;

use crate::engine::{Source, canonical};
use crate::logskip::LogSkip;
use crate::metrics::{self, Verdict};
use crate::state::State;
use crate::webhook::Webhook;
use cache::Cache;
use upstream::Upstreams;
use wire::{HEADER_LEN, Refusal, encode, header_reply, min_ttl, refuse};

/// Which answer addresses are stripped unless a rule names them.
#[derive(Debug, Clone, Default)]
pub struct AnswerFilter {
    /// Let loopback, RFC 1918, 100.64.0.0/10 and fc00::/7 answers through (the reference's
    /// behaviour). Metadata and link-local addresses are stripped regardless.
    pub allow_private: bool,
    /// More ranges treated as private.
    pub private_cidrs: Vec<Cidr>,
}

impl AnswerFilter {
    /// The class of address `ip` is, if answers may not point there by default.
    fn class(&self, ip: IpAddr) -> Option<&'static str> {
        if net::is_metadata(ip) {
            Some("metadata")
        } else if !self.allow_private
            && (net::is_private(ip) || self.private_cidrs.iter().any(|c| c.contains(ip)))
        {
            Some("private")
        } else {
            None
        }
    }
}

pub struct Proxy {
    state: Arc<State>,
    upstreams: Arc<Upstreams>,
    cache: Cache,
    filter: AnswerFilter,
    probe: Probe,
    /// Names whose allowed lookups are not logged.
    log_skip: ArcSwap<LogSkip>,
    /// Told of every denied query, when configured.
    webhook: OnceLock<Webhook>,
}

/// Resolves host names of the sidecar's own (the deny webhook's) through the upstreams,
/// outside the sandbox's DNS path and its policy.
#[derive(Clone)]
pub struct Resolver(Arc<Upstreams>);

impl Resolver {
    pub async fn resolve(&self, host: &str) -> Option<IpAddr> {
        self.0.resolve(host).await
    }
}

/// What the answer's content says.
enum Inspected {
    /// Forward as is (possibly re-encoded without refused records), admitting these addresses.
    Pass {
        message: Message,
        changed: bool,
        addrs: Vec<(IpAddr, u32)>,
    },
    /// A name in the CNAME chain is denied by a rule (which layer).
    Denied(String, Source),
}

impl Proxy {
    pub fn new(
        state: Arc<State>,
        upstreams: Vec<std::net::SocketAddr>,
        timeout: std::time::Duration,
        filter: AnswerFilter,
    ) -> Proxy {
        Proxy {
            state,
            upstreams: Arc::new(Upstreams::new(upstreams, timeout)),
            cache: Cache::default(),
            filter,
            probe: Probe::default(),
            log_skip: ArcSwap::default(),
            webhook: OnceLock::new(),
        }
    }

    /// The upstream probe's question and interval.
    pub fn with_probe(mut self, probe: Probe) -> Proxy {
        self.probe = probe;
        self
    }

    /// Probes the upstreams until `cancel` fires.
    pub async fn probe(&self, cancel: CancellationToken) {
        self.upstreams
            .clone()
            .probe(self.probe.clone(), cancel)
            .await;
    }

    pub fn resolver(&self) -> Resolver {
        Resolver(self.upstreams.clone())
    }

    /// Posts every denied query to `webhook` from now on.
    pub fn set_webhook(&self, webhook: Webhook) {
        let _ = self.webhook.set(webhook);
    }

    pub fn set_log_skip(&self, skip: LogSkip) {
        self.log_skip.store(Arc::new(skip));
    }

    /// The reply to one query, or `None` when nothing should be sent (not a query at all).
    pub async fn answer(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let started = Instant::now();
        let reply = self.answer_inner(query, tcp).await;
        if reply.is_some() {
            metrics::QUERY_LATENCY.observe(started.elapsed().as_secs_f64());
        }
        reply
    }

    async fn answer_inner(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        if query.len() < HEADER_LEN || query[2] & 0x80 != 0 {
            return None;
        }
        let message = match Message::from_vec(query) {
            Ok(m) => m,
            Err(_) => {
                metrics::query(Verdict::Formerr);
                return Some(header_reply(query, ResponseCode::FormErr));
            }
        };
        if message.metadata.message_type != MessageType::Query {
            return None;
        }
        if message.metadata.op_code != OpCode::Query {
            metrics::query(Verdict::Notimp);
            return Some(header_reply(query, ResponseCode::NotImp));
        }
        if message.queries.len() != 1 {
            return Some(refuse(&message, query, Refusal::Malformed));
        }
        let question = &message.queries[0];
        let name = canonical(&question.name().to_ascii());
        let engine = self.state.engine();
        let (verdict, source) = engine.name(&name);
        drop(engine);
        if verdict == Action::Deny {
            return Some(self.deny(&message, query, &name, &name, source));
        }

        let max_udp = usize::from(message.max_payload().max(512));
        let key = (
            name.clone(),
            u16::from(question.query_type()),
            u16::from(question.query_class()),
            message.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
            message.metadata.checking_disabled,
        );
        let generation = self.state.generation();
        if let Some(mut hit) = self.cache.get(&key, generation) {
            metrics::CACHE_HITS.inc();
            metrics::query(Verdict::Allowed);
            hit.metadata.id = message.metadata.id;
            // The client's own spelling of the question (case may differ from the first asker).
            hit.queries = message.queries.clone();
            self.log_allowed(&name, &hit);
            return Some(fit(hit, tcp, max_udp, query));
        }

        let Some(raw) = self.upstreams.forward(query, tcp, max_udp).await else {
            return Some(refuse(&message, query, Refusal::Failed));
        };
        let reply = match Message::from_vec(&raw) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, name, "upstream answer does not parse; SERVFAIL");
                return Some(refuse(&message, query, Refusal::Failed));
            }
        };
        let (message_out, changed, addrs) = match self.inspect(&name, reply) {
            Inspected::Denied(denied, source) => {
                return Some(self.deny(&message, query, &name, &denied, source));
            }
            Inspected::Pass {
                message,
                changed,
                addrs,
            } => (message, changed, addrs),
        };
        if let Some(nft) = self.state.nft().filter(|_| !addrs.is_empty())
            && let Err(e) = nft.learn(name.clone(), addrs).await
        {
            tracing::error!(error = %e, name, "could not admit the answer's addresses; SERVFAIL");
            return Some(refuse(&message, query, Refusal::Failed));
        }
        metrics::query(Verdict::Allowed);
        self.log_allowed(&name, &message_out);
        let rcode = message_out.metadata.response_code;
        if matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain)
            && !message_out.metadata.truncation
            && let Some(ttl) = min_ttl(&message_out)
            && ttl > 0
        {
            self.cache.store(key, message_out.clone(), ttl, generation);
        }
        if !changed && (tcp || raw.len() <= max_udp) {
            return Some(raw);
        }
        Some(fit(message_out, tcp, max_udp, query))
    }

    /// The audit line of an allowed lookup (from the cache or an upstream), unless
    /// `log_skip.always` names it.
    fn log_allowed(&self, name: &str, answer: &Message) {
        if self.log_skip.load().skips(name) {
            metrics::LOG_SKIPPED.inc();
            return;
        }
        let ips: Vec<IpAddr> = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        tracing::info!(
            target: "audit",
            event = "dns.allowed",
            name,
            addresses = ?ips,
            "egress name allowed"
        );
    }

    fn deny(
        &self,
        message: &Message,
        query: &[u8],
        name: &str,
        matched: &str,
        source: Source,
    ) -> Vec<u8> {
        tracing::info!(
            target: "audit",
            event = "dns.denied",
            name,
            matched,
            by = source.as_str(),
            "egress name denied"
        );
        if let Some(webhook) = self.webhook.get() {
            webhook.denied(name);
        }
        refuse(message, query, Refusal::Denied)
    }

    /// Follows the CNAME chain from `name`, refuses the answer if a rule denies a name on it,
    /// strips addresses in metadata or private space that no rule names, and lists the
    /// addresses to admit.
    fn inspect(&self, name: &str, mut reply: Message) -> Inspected {
        let engine = self.state.engine();
        let mut chain = vec![name.to_owned()];
        // CNAMEs may come in any order; follow them until no new name appears.
        loop {
            let last = chain.last().cloned().unwrap_or_default();
            let next = reply.answers.iter().find_map(|r| match &r.data {
                RData::CNAME(target)
                    if canonical(&r.name.to_ascii()) == last
                        && r.record_type() == RecordType::CNAME =>
                {
                    Some(canonical(&target.0.to_ascii()))
                }
                _ => None,
            });
            match next {
                Some(n) if !chain.contains(&n) && chain.len() < 16 => chain.push(n),
                _ => break,
            }
        }
        for link in chain.iter().skip(1) {
            // Names reached through an allowed name are not subject to the default action,
            // only to rules that deny them by name.
            let (action, source) = engine.name(link);
            if action == Action::Deny && source != Source::Default {
                return Inspected::Denied(link.clone(), source);
            }
        }
        let mut addrs = Vec::new();
        let before = reply.answers.len();
        reply.answers.retain(|r: &Record| {
            let ip = match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => return true,
            };
            if !chain.contains(&canonical(&r.name.to_ascii())) {
                // An address for a name off the chain is not the answer to this question.
                return false;
            }
            if let Some(class) = self.filter.class(ip) {
                // Only a rule naming the address (or its range) lets such an answer through.
                let (action, source) = engine.ip(ip);
                if action != Action::Allow || source == Source::Default {
                    tracing::warn!(
                        target: "audit",
                        event = "dns.stripped_address",
                        name,
                        address = %ip,
                        class,
                        "answer points into {class} address space; record dropped"
                    );
                    metrics::ANSWERS_STRIPPED.with_label_values(&[class]).inc();
                    return false;
                }
            }
            addrs.push((ip, r.ttl));
            true
        });
        let changed = reply.answers.len() != before;
        Inspected::Pass {
            message: reply,
            changed,
            addrs,
        }
    }
}

/// Encodes, truncating for a UDP client whose buffer is too small (it retries over TCP).
fn fit(message: Message, tcp: bool, max_udp: usize, query: &[u8]) -> Vec<u8> {
    let bytes = encode(&message, query, ResponseCode::ServFail);
    if tcp || bytes.len() <= max_udp {
        return bytes;
    }
    encode(&message.truncate(), query, ResponseCode::ServFail)
}
