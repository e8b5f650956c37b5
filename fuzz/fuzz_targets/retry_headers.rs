//! Upstream response headers (`name: value` lines) as the retry hints read
//! them: Retry-After in all forms, x-should-retry, x-ratelimit-reset-*.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provider_gateway_server::fuzzing;

fuzz_target!(|data: &[u8]| {
    let (status, rest) = fuzzing::split_status(data);
    let headers = fuzzing::header_lines(rest, ':');
    fuzzing::retry_hints(status, &headers);
    for (_, value) in &headers {
        fuzzing::go_duration(value);
    }
});
