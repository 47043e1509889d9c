//! Graceful drain on SIGTERM: stop accepting (Pingora closes its listeners), let in-flight
//! requests finish, and exit as soon as none are left or the grace period ends.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{SignalKind, signal};

use crate::metrics::metrics;

#[derive(Debug, Default)]
pub struct Drain {
    in_flight: AtomicUsize,
    draining: AtomicBool,
}

/// Held by each request while it is in flight.
pub struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        metrics().in_flight.dec();
    }
}

impl Drain {
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        metrics().in_flight.inc();
        InFlight(self.clone())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }
}

/// Waits for SIGTERM (graceful) or SIGINT (immediate) and runs the drain.
pub struct Signals {
    pub drain: Arc<Drain>,
    pub grace: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers; shutting down");
            return ShutdownSignal::FastShutdown;
        };
        tokio::select! {
            _ = term.recv() => {
                tracing::info!(grace_seconds = self.grace.as_secs(), in_flight = self.drain.in_flight(), "SIGTERM: draining");
                self.drain.draining.store(true, Ordering::Release);
                let drain = self.drain.clone();
                let grace = self.grace;
                // Pingora would sleep out the whole grace period; exit as soon as the work is done.
                std::thread::spawn(move || wait_then_exit(&drain, grace));
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: exiting now");
                ShutdownSignal::FastShutdown
            }
        }
    }
}

type ExitHook = Box<dyn FnOnce() + Send>;
static EXIT_HOOK: OnceLock<Mutex<Option<ExitHook>>> = OnceLock::new();

/// Registers work to run right before the process exits after a drain (flushing logs).
pub fn on_exit(hook: impl FnOnce() + Send + 'static) {
    let _ = EXIT_HOOK.set(Mutex::new(Some(Box::new(hook))));
}

/// Runs the exit hook and exits.
pub fn exit(code: i32) -> ! {
    if let Some(hook) = EXIT_HOOK.get().and_then(|m| m.lock().ok()?.take()) {
        hook();
    }
    std::process::exit(code)
}

fn wait_then_exit(drain: &Drain, grace: Duration) {
    let start = Instant::now();
    // Let the listeners close before counting, so no request slips in after the check.
    std::thread::sleep(Duration::from_millis(100));
    while drain.in_flight() > 0 && start.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(
        in_flight = drain.in_flight(),
        elapsed_ms = start.elapsed().as_millis() as u64,
        "drain finished; exiting"
    );
    exit(0);
}
