//! The time the registry reads and waits on. Production uses tokio's clock;
//! tests substitute a scripted clock so that backoffs and Retry-After waits
//! are observed exactly and cost no wall-clock time.

use std::fmt::Debug;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

/// Reads the time and sleeps.
pub trait Clock: Send + Sync + Debug + 'static {
    /// Now.
    fn now(&self) -> Instant;
    /// Waits for `duration` (a backoff between attempts).
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()>;
}

/// tokio's clock (which a test may pause).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(duration))
    }
}
