//! End-to-end tests: the real gateway (`serve()` or the binary) on
//! 127.0.0.1:0, real gRPC clients, and a scripted upstream on 127.0.0.1:0
//! that speaks each provider's wire format.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod anthropic;
mod azure;
mod bedrock;
mod binary;
mod caller_bounds;
mod cancel;
mod cli;
mod config;
mod deploy;
#[cfg(feature = "embedded")]
mod embedded;
#[cfg(feature = "embedded")]
mod embedded_real;
mod fuzz_props;
mod gate;
mod gemini;
mod grpc_ecosystem;
mod hostile;
mod http_ingress;
mod mock;
mod openai;
mod operations;
mod pools;
mod rescue;
mod resilience;
mod retry;
mod secrets;
mod status;
mod support;
mod telemetry;
mod upstream_pool;
mod upstream_tls;
mod validation;
mod vertex;
