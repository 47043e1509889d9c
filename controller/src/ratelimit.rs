//! `--kube-client-qps` and `--kube-client-burst`: client-go's token bucket in front of every
//! request to the API server (a watch counts once, when it is opened).
//!
//! The bucket is a layer in the kube client's service stack and waits in `poll_ready`; kube's
//! client buffers requests in front of its stack, so a request waits for a token there without
//! holding anything else up.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    /// Tokens added per second.
    pub qps: f64,
    /// Most tokens held, so a burst after a quiet time goes at once.
    pub burst: u32,
}

impl<S> Layer<S> for RateLimit {
    type Service = Limited<S>;
    fn layer(&self, inner: S) -> Limited<S> {
        Limited {
            inner,
            limit: *self,
            tokens: f64::from(self.burst.max(1)),
            refilled: Instant::now(),
            wait: None,
            granted: false,
        }
    }
}

pub struct Limited<S> {
    inner: S,
    limit: RateLimit,
    tokens: f64,
    refilled: Instant,
    wait: Option<Pin<Box<Sleep>>>,
    /// A token is held for the next call.
    granted: bool,
}

impl<S> Limited<S> {
    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let capacity = f64::from(self.limit.burst.max(1));
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.qps).min(capacity);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.limit.qps,
            ))
        }
    }
}

impl<S, R> Service<R> for Limited<S>
where
    S: Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        while !self.granted {
            if let Some(wait) = self.wait.as_mut() {
                if wait.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.wait = None;
            }
            match self.take(Instant::now()) {
                Ok(()) => self.granted = true,
                Err(wait) => self.wait = Some(Box::pin(tokio::time::sleep(wait))),
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> S::Future {
        self.granted = false;
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let mut limited = RateLimit {
            qps: 10.0,
            burst: 3,
        }
        .layer(());
        let start = limited.refilled;
        for _ in 0..3 {
            assert!(limited.take(start).is_ok());
        }
        let wait = limited.take(start).unwrap_err();
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
        assert!(limited.take(start + Duration::from_millis(100)).is_ok());
        // A long quiet time refills no more than the burst.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limited.take(later).is_ok());
        }
        assert!(limited.take(later).is_err());
    }
}
