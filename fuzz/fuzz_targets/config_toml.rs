//! A TOML configuration file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provider_gateway_server::fuzzing;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = fuzzing::config_toml(text);
    }
});
