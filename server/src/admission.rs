//! Admission: load shedding and draining. A call is admitted only while the
//! gateway is not shutting down and a slot of its kind (request or stream)
//! is free; otherwise it is answered at once, never queued. Admitted calls
//! are counted so shutdown can wait for them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tonic::Status;

/// The gate every Complete and Stream passes.
#[derive(Debug)]
pub struct Gate {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    idle: Notify,
    requests: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    max_requests: usize,
    max_streams: usize,
}

/// An admitted call; dropping it frees its slot.
#[derive(Debug)]
pub struct Admission {
    _slot: OwnedSemaphorePermit,
    gate: Arc<Gate>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if self.gate.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.gate.idle.notify_waiters();
        }
    }
}

/// The kind of call.
#[derive(Debug, Clone, Copy)]
pub enum CallKind {
    /// A unary Complete.
    Request,
    /// A Stream.
    Stream,
}

impl Gate {
    /// A gate with these limits.
    pub fn new(max_requests: usize, max_streams: usize) -> Self {
        Self {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            requests: Arc::new(Semaphore::new(max_requests)),
            streams: Arc::new(Semaphore::new(max_streams)),
            max_requests,
            max_streams,
        }
    }

    /// Admits a call, or answers UNAVAILABLE (shutting down) or
    /// RESOURCE_EXHAUSTED (at the limit) at once.
    pub fn admit(self: &Arc<Self>, kind: CallKind) -> Result<Admission, Status> {
        if self.draining.load(Ordering::Acquire) {
            return Err(Status::unavailable("the gateway is shutting down"));
        }
        let (slots, max, what) = match kind {
            CallKind::Request => (&self.requests, self.max_requests, "requests"),
            CallKind::Stream => (&self.streams, self.max_streams, "streams"),
        };
        let slot = slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "the gateway is at its limit of {max} concurrent {what}; retry later"
            ))
        })?;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(Admission {
            _slot: slot,
            gate: self.clone(),
        })
    }

    /// Stops admitting calls.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether the gateway is shutting down.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Calls admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Resolves when no admitted call is left.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheds_over_the_limit_and_refuses_while_draining() {
        let gate = Arc::new(Gate::new(1, 1));
        let first = gate.admit(CallKind::Request).unwrap();
        let over = gate.admit(CallKind::Request).unwrap_err();
        assert_eq!(over.code(), tonic::Code::ResourceExhausted);
        let stream = gate.admit(CallKind::Stream).unwrap();
        assert_eq!(gate.in_flight(), 2);
        drop(first);
        gate.start_draining();
        assert_eq!(
            gate.admit(CallKind::Request).unwrap_err().code(),
            tonic::Code::Unavailable
        );
        drop(stream);
        assert_eq!(gate.in_flight(), 0);
    }
}
