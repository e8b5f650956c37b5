//! The registry simulation's soak: `SIM_SCENARIOS` (default 100,000)
//! scenarios from a base seed of its own (`SIM_BASE`, default from the
//! clock), on every core. Its last line is exactly
//! `simulation: scenarios=N calls=M violations=0` when every invariant
//! held; a failing scenario's seed is printed above it, for `SIM_SEED`.
//!
//! cargo bench -p provider-gateway-server --bench simulation

#![allow(missing_docs, clippy::print_stdout)]

#[path = "../../tests/simulation/sim.rs"]
#[allow(dead_code)]
mod sim;

use std::sync::atomic::{AtomicU64, Ordering};

fn main() {
    let n: u64 = std::env::var("SIM_SCENARIOS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let base: u64 = std::env::var("SIM_BASE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let next = AtomicU64::new(0);
    let calls = AtomicU64::new(0);
    let upstream = AtomicU64::new(0);
    let violations = AtomicU64::new(0);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let seed = base ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                    let report = sim::run_scenario(seed);
                    calls.fetch_add(report.calls, Ordering::Relaxed);
                    upstream.fetch_add(report.upstream_calls, Ordering::Relaxed);
                    if !report.violations.is_empty() {
                        violations.fetch_add(1, Ordering::Relaxed);
                        let lines = report.violations.join("\n  ");
                        println!("scenario SIM_SEED={seed} broke an invariant:\n  {lines}");
                    }
                }
            });
        }
    });
    println!(
        "soak: base={base} upstream_calls={} in {:.1} s",
        upstream.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    println!(
        "simulation: scenarios={n} calls={} violations={}",
        calls.load(Ordering::Relaxed),
        violations.load(Ordering::Relaxed)
    );
}
