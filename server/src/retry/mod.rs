//! Retry policy: what the registry may retry, how long it waits, and the
//! ceilings a per-request override may not exceed.
//!
//! Only the registry consults a policy; providers never retry.

mod policy;

pub use policy::{RetryLimits, RetryPolicy};
