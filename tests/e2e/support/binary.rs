//! The real `provider-gateway` binary: a command with a clean environment,
//! and a start that reads the address it logs.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The binary this test run built.
pub const BIN: &str = env!("CARGO_BIN_EXE_provider-gateway");

/// The binary with none of the caller's provider credentials or config,
/// every listener on an ephemeral loopback port but the gRPC one (the
/// caller sets `GATEWAY_LISTEN` or expects a failure), logs on a pipe.
pub fn command() -> Command {
    let mut cmd = Command::new(BIN);
    for var in [
        "ANTHROPIC_API_KEY",
        "OPENAI_API_KEY",
        "DATABRICKS_HOST",
        "DATABRICKS_TOKEN",
        "GATEWAY_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NO_COLOR", "1")
        .env("GATEWAY_TELEMETRY__ADMIN_LISTEN", "127.0.0.1:0")
        .env("GATEWAY_HTTP_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Starts `cmd` with the gRPC listener on an ephemeral port and waits (up
/// to `within`) for its start-up line; returns the process and its
/// address. Its log keeps being drained so it never blocks on the pipe.
pub async fn start(mut cmd: Command, within: Duration) -> (Child, String) {
    let mut child = cmd.env("GATEWAY_LISTEN", "127.0.0.1:0").spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(within, async {
        let mut seen = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.split("listen=").nth(1) {
                return rest.split_whitespace().next().unwrap().to_string();
            }
            seen.push(line);
        }
        panic!(
            "the gateway exited before logging its address:\n{}",
            seen.join("\n")
        );
    })
    .await
    .expect("start-up log line");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, addr)
}
