//! Request metadata (`key: value` lines) as the service reads it, and the
//! x-retry-* pairs through RetryOverride::parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provider_gateway_server::fuzzing;

fuzz_target!(|data: &[u8]| {
    let pairs = fuzzing::header_lines(data, ':');
    let _ = fuzzing::metadata(&pairs);
    let _ = fuzzing::retry_overrides(&pairs);
});
