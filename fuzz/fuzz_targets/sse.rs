//! The SSE decoder: any bytes, in chunks the input's first byte picks, with
//! a small limit so oversized lines and events are reached.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provider_gateway_server::fuzzing;

fuzz_target!(|data: &[u8]| {
    let _ = fuzzing::sse(data, 512);
});
