//! OSEP-0009 renew intents: a request that reached a sandbox tells whoever extends sandbox
//! lifetimes (our controller, or the reference's server) that the sandbox is in use.
//!
//! The request path does two things only, both without waiting: a per-sandbox throttle check
//! (one read-locked map lookup; at most one intent per sandbox per `--renew-intent-min-interval`)
//! and, when it passes, a `try_send` of the encoded intent into a bounded queue. A background
//! task moves the queue to Redis in batches (`LPUSH` of many values, then `LTRIM` when capped).
//! While Redis is down the task reconnects with backoff and the queue fills; when it is full,
//! intents are dropped and counted, never waited for.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::{IntCounter, IntGauge};
use redis::ConnectionInfo;
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;

use crate::metrics::metrics;

/// Longest wait for Redis to connect or answer one batch.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// Intents sent to Redis in one round trip at most.
const BATCH: usize = 512;
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often an idle publisher checks that Redis answers.
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// The publisher's settings, checked at start.
#[derive(Debug, Clone)]
pub struct RenewConfig {
    pub connection: ConnectionInfo,
    pub queue_key: String,
    /// The list is trimmed to this many entries after each push; 0 = no cap.
    pub max_len: u64,
    /// At most one intent per sandbox in this time; zero = every request.
    pub min_interval: Duration,
    /// Intents waiting for Redis before new ones are dropped.
    pub buffer: usize,
}

/// The request side: throttle, encode, queue.
pub struct Renewer {
    /// When an intent was last queued, per sandbox; entries older than the interval are swept.
    last: DashMap<Box<str>, Instant>,
    min_interval: Duration,
    tx: mpsc::Sender<String>,
    queued: IntCounter,
    dropped: IntCounter,
}

impl Renewer {
    /// The renewer and the background service that publishes what it queues.
    pub fn new(config: RenewConfig) -> Result<(Arc<Self>, Publisher), String> {
        let client = redis::Client::open(config.connection.clone()).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel(config.buffer.max(1));
        let m = metrics();
        let renewer = Arc::new(Self {
            last: DashMap::new(),
            min_interval: config.min_interval,
            tx,
            queued: m.renew_intents.with_label_values(&["queued"]),
            dropped: m.renew_intents.with_label_values(&["dropped"]),
        });
        m.renew_redis_up.set(0);
        let publisher = Publisher {
            rx: Mutex::new(Some(rx)),
            client,
            queue_key: config.queue_key,
            max_len: config.max_len,
            renewer: renewer.clone(),
            published: m.renew_intents.with_label_values(&["published"]),
            up: m.renew_redis_up.clone(),
        };
        Ok((renewer, publisher))
    }

    /// A request reached `sandbox_id`: queue an intent unless one was queued within the
    /// interval. `request_uri` is the path sent on in URI mode, empty in header mode.
    pub fn observe(&self, sandbox_id: &str, port: u16, request_uri: &[u8]) {
        let now = Instant::now();
        let mut previous = None;
        if !self.min_interval.is_zero() {
            if self
                .last
                .get(sandbox_id)
                .is_some_and(|t| now.duration_since(*t) < self.min_interval)
            {
                return;
            }
            match self.last.entry(sandbox_id.into()) {
                dashmap::Entry::Occupied(mut e) => {
                    // Another request may have queued one since the read above.
                    if now.duration_since(*e.get()) < self.min_interval {
                        return;
                    }
                    previous = Some(e.insert(now));
                }
                dashmap::Entry::Vacant(e) => {
                    e.insert(now);
                }
            }
        }
        let payload = sandbox_api::renew::encode(sandbox_id, SystemTime::now(), port, request_uri);
        if self.tx.try_send(payload).is_ok() {
            self.queued.inc();
            return;
        }
        self.dropped.inc();
        // Not queued, so not throttled: the next request tries again.
        if !self.min_interval.is_zero() {
            match previous {
                Some(t) => {
                    self.last.insert(sandbox_id.into(), t);
                }
                None => {
                    self.last.remove(sandbox_id);
                }
            }
        }
    }

    /// Forgets sandboxes whose interval has passed, so the map holds only recent ones.
    fn sweep(&self) {
        let now = Instant::now();
        self.last
            .retain(|_, t| now.duration_since(*t) < self.min_interval);
    }
}

/// Moves queued intents to Redis.
pub struct Publisher {
    rx: Mutex<Option<mpsc::Receiver<String>>>,
    client: redis::Client,
    queue_key: String,
    max_len: u64,
    renewer: Arc<Renewer>,
    published: IntCounter,
    up: IntGauge,
}

impl Publisher {
    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        within(self.client.get_multiplexed_async_connection()).await
    }

    async fn push(&self, conn: &mut MultiplexedConnection, batch: &[String]) -> Result<(), String> {
        let mut pipe = redis::pipe();
        pipe.cmd("LPUSH").arg(&self.queue_key).arg(batch).ignore();
        if self.max_len > 0 {
            pipe.cmd("LTRIM")
                .arg(&self.queue_key)
                .arg(0)
                .arg(self.max_len - 1)
                .ignore();
        }
        within(pipe.query_async::<()>(conn)).await
    }

    /// Records whether Redis answered, logging each change once.
    fn mark(&self, up: bool, error: Option<&str>, was_up: &mut Option<bool>) {
        if *was_up != Some(up) {
            match error {
                None => {
                    tracing::info!(queue_key = %self.queue_key, "renew intents: connected to Redis")
                }
                Some(error) => {
                    tracing::warn!(%error, "renew intents: Redis unavailable; queueing and retrying")
                }
            }
        }
        *was_up = Some(up);
        self.up.set(i64::from(up));
    }

    async fn run(&self, mut rx: mpsc::Receiver<String>, mut shutdown: ShutdownWatch) {
        let mut sweep =
            tokio::time::interval(self.renewer.min_interval.max(Duration::from_secs(1)));
        // An idle publisher still checks Redis, so the gauge tells the truth between intents.
        let mut probe = tokio::time::interval(PROBE_EVERY);
        let mut conn: Option<MultiplexedConnection> = None;
        let mut batch: Vec<String> = Vec::with_capacity(BATCH);
        let mut backoff = BACKOFF_FIRST;
        // None until the first attempt, so the first state is always logged.
        let mut was_up: Option<bool> = None;
        loop {
            if batch.is_empty() {
                tokio::select! {
                    next = rx.recv() => match next {
                        Some(p) => batch.push(p),
                        None => return,
                    },
                    _ = sweep.tick() => {
                        if !self.renewer.min_interval.is_zero() {
                            self.renewer.sweep();
                        }
                        continue;
                    }
                    _ = probe.tick() => {
                        let result = match conn.as_mut() {
                            Some(c) => ping(c).await,
                            None => self.connect().await.map(|c| conn = Some(c)),
                        };
                        if let Err(e) = &result {
                            conn = None;
                            self.mark(false, Some(e), &mut was_up);
                        } else {
                            self.mark(true, None, &mut was_up);
                        }
                        continue;
                    }
                    _ = shutdown.changed() => return,
                }
            }
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let result = match conn.as_mut() {
                Some(c) => self.push(c, &batch).await,
                None => match self.connect().await {
                    Ok(mut c) => {
                        let pushed = self.push(&mut c, &batch).await;
                        conn = Some(c);
                        pushed
                    }
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(()) => {
                    self.published.inc_by(batch.len() as u64);
                    batch.clear();
                    backoff = BACKOFF_FIRST;
                    self.mark(true, None, &mut was_up);
                }
                Err(error) => {
                    conn = None;
                    self.mark(false, Some(&error), &mut was_up);
                    // The batch is kept and sent again once Redis answers.
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

async fn ping(conn: &mut MultiplexedConnection) -> Result<(), String> {
    within(redis::cmd("PING").query_async::<()>(conn)).await
}

/// A Redis call bounded by [`REDIS_TIMEOUT`], its failure as text.
async fn within<T>(call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
    match tokio::time::timeout(REDIS_TIMEOUT, call).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {REDIS_TIMEOUT:?}")),
    }
}

#[async_trait::async_trait]
impl BackgroundService for Publisher {
    async fn start(&self, shutdown: ShutdownWatch) {
        let rx = self.rx.lock().ok().and_then(|mut r| r.take());
        if let Some(rx) = rx {
            self.run(rx, shutdown).await;
        }
    }
}
