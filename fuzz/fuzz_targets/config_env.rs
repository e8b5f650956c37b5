//! A process environment (`NAME=value` lines) as the config loader reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provider_gateway_server::fuzzing;

fuzz_target!(|data: &[u8]| {
    let vars = fuzzing::header_lines(data, '=');
    let _ = fuzzing::config_env(&vars);
});
