//! A Databricks Model Serving SSE body (OpenAI chunk shapes, Databricks'
//! own corpus) through the provider's translator.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provider_gateway_server::fuzzing;

fuzz_target!(|data: &[u8]| {
    fuzzing::openai_stream(data);
});
