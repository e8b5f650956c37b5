//! `provider-gateway`: parse arguments, load the configuration, set up
//! telemetry, serve until SIGINT or SIGTERM, drain, flush telemetry.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use provider_gateway_server::{
    Config, ProcessEnv, Registry, ServerOptions, admin, serve_listeners, telemetry,
};

/// One gRPC API in front of every LLM provider a team uses.
#[derive(Debug, Parser)]
#[command(name = "provider-gateway", version)]
struct Args {
    /// A TOML configuration file (without one, the built-in `mock` provider
    /// is served, plus any provider whose API key variable is set).
    #[arg(long, env = "GATEWAY_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration (providers, keys, certificates) and exit:
    /// 0 when valid, 2 with the errors otherwise.
    #[arg(long)]
    check_config: bool,
    /// Log format: `text` (default) or `json` (overrides
    /// `telemetry.log_format`).
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
}

/// Logs an error before the real subscriber exists.
fn fatal(message: &str) -> ExitCode {
    let subscriber = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish();
    tracing::subscriber::with_default(subscriber, || tracing::error!("{message}"));
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut config = match Config::load(args.config.as_deref(), &ProcessEnv) {
        Ok(c) => c,
        Err(e) => return fatal(&e.to_string()),
    };
    if let Some(format) = args.log_format {
        config.telemetry.log_format = format;
    }
    let built = Registry::from_config(&config, &ProcessEnv)
        .and_then(|r| Ok((r, ServerOptions::from_config(&config, &ProcessEnv)?)))
        .and_then(|(r, o)| Ok((r, o, config.listen_addr()?)));
    let (registry, options, addr) = match built {
        Ok(b) => b,
        Err(e) => return fatal(&e.to_string()),
    };
    if args.check_config {
        return match telemetry::Settings::resolve(&config.telemetry, &ProcessEnv) {
            Ok(_) => {
                let subscriber = tracing_subscriber::fmt()
                    .with_writer(std::io::stderr)
                    .finish();
                tracing::subscriber::with_default(subscriber, || {
                    tracing::info!("configuration is valid")
                });
                ExitCode::SUCCESS
            }
            Err(e) => fatal(&e.to_string()),
        };
    }
    let telemetry = match telemetry::init(&config.telemetry, &ProcessEnv) {
        Ok(t) => Arc::new(t),
        Err(e) => return fatal(&e.to_string()),
    };
    let registry = Arc::new(registry.with_metrics(telemetry.metrics()));
    if !config.skipped_env_vars.is_empty() {
        tracing::debug!(
            variables = %config.skipped_env_vars.join(", "),
            "skipped Kubernetes service-link variables (not configuration)"
        );
    }

    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen on {addr}: {e}");
            return ExitCode::from(1);
        }
    };
    if !config.telemetry.admin_listen.is_empty() {
        match tokio::net::TcpListener::bind(&config.telemetry.admin_listen).await {
            Ok(admin_listener) => {
                let local = admin_listener
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                tracing::info!(admin = %local, "serving /metrics");
                tokio::spawn(admin::serve_admin(admin_listener, telemetry.clone()));
            }
            Err(e) => {
                tracing::error!(
                    "cannot listen on {} (telemetry.admin_listen): {e}",
                    config.telemetry.admin_listen
                );
                return ExitCode::from(1);
            }
        }
    }
    let http = match config.http_listen_addr() {
        Ok(None) => None,
        Ok(Some(http_addr)) => match tokio::net::TcpListener::bind(http_addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!("cannot listen on {http_addr} (http_listen): {e}");
                return ExitCode::from(1);
            }
        },
        Err(e) => return fatal(&e.to_string()),
    };
    let result = serve_listeners(listener, http, registry, options, shutdown_signal()).await;
    telemetry.shutdown();
    match result {
        Ok(()) => {
            tracing::info!("provider-gateway stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
    }
}

/// Resolves on SIGINT or SIGTERM; a second signal exits at once.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!(
        "shutdown signal received; finishing in-flight calls (a second signal exits at once)"
    );
    tokio::spawn(async {
        second_signal().await;
        tracing::warn!("second shutdown signal: exiting now");
        std::process::exit(130);
    });
}

/// Resolves on the next SIGINT or SIGTERM.
async fn second_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
