//! An OpenAI chat-completions SSE body through the provider's translator.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provider_gateway_server::fuzzing;

fuzz_target!(|data: &[u8]| {
    fuzzing::openai_stream(data);
});
