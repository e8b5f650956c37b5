//! A whole openai response body (and the same bytes as an error body of the
//! status in the first two bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use provider_gateway_server::fuzzing;

fuzz_target!(|data: &[u8]| {
    let (status, body) = fuzzing::split_status(data);
    fuzzing::openai_response(status, body);
});
