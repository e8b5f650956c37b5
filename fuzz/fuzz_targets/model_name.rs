//! A request's model name against each kind's character set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provider_gateway_server::fuzzing;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        for kind in ["anthropic", "openai", "databricks", "mock"] {
            let _ = fuzzing::model_name(kind, text);
        }
    }
});
