//! `provider-gateway-cli`: ask a provider-gateway from the shell.
//!
//! ```sh
//! provider-gateway-cli complete "Say hello"            # a whole answer
//! echo "Tell me a story" | provider-gateway-cli stream  # printed as it arrives
//! provider-gateway-cli providers
//! ```
//!
//! The answer goes to stdout; everything else (a spinner while waiting for
//! the first token when stderr is a terminal, a summary line, errors) goes
//! to stderr, so `> answer.txt` keeps only the answer.
//!
//! Exit codes, one per class of gRPC status, so scripts can tell "fix the
//! request" from "try again later":
//!
//! | code | meaning |
//! |---|---|
//! | 0 | the answer was printed |
//! | 1 | any other failure (`INTERNAL`, `UNKNOWN`, `CANCELLED`, a broken stream, ...) |
//! | 2 | usage: a bad flag or flag value, an unreadable file, no prompt |
//! | 3 | the request was refused: `INVALID_ARGUMENT`, `NOT_FOUND`, `FAILED_PRECONDITION` |
//! | 4 | try again later: `UNAVAILABLE` (also: cannot connect), `RESOURCE_EXHAUSTED`, `DEADLINE_EXCEEDED` |
//! | 5 | credentials: `UNAUTHENTICATED`, `PERMISSION_DENIED` |
//! | 130 | interrupted (Ctrl-C) |

use std::io::{IsTerminal, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use provider_gateway_client::tonic::Code;
use provider_gateway_client::{
    Answer, CallOptions, ClientError, GatewayClient, RetryOverrides, StopReason, StreamEvent,
    TlsOptions, Usage, request,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const EXIT_CODES: &str = "\
Exit codes:
    0  the answer was printed
    1  any other failure (INTERNAL, UNKNOWN, CANCELLED, a broken stream, ...)
    2  usage: a bad flag or flag value, an unreadable file, no prompt
    3  the request was refused: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION
    4  try again later: UNAVAILABLE (also: cannot connect), RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED
    5  credentials: UNAUTHENTICATED, PERMISSION_DENIED
  130  interrupted";

/// Ask a provider-gateway for answers, or for the providers it serves.
#[derive(Debug, Parser)]
#[command(name = "provider-gateway-cli", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask for a whole answer and print it.
    #[command(after_help = EXIT_CODES)]
    Complete(PromptArgs),
    /// Stream an answer, printing its text as it arrives.
    #[command(after_help = EXIT_CODES)]
    Stream(PromptArgs),
    /// List the providers the gateway serves.
    #[command(after_help = EXIT_CODES)]
    Providers,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Connection")]
struct ConnectionArgs {
    /// The gateway's address; `https://` connects over TLS (verified against
    /// the system's trust store unless --ca-cert is given).
    #[arg(
        long,
        global = true,
        env = "GATEWAY_ADDRESS",
        default_value = "http://127.0.0.1:50051"
    )]
    address: String,
    /// Sent as `authorization: Bearer <KEY>`. Prefer the environment
    /// variable: a flag's value is visible to other users in `ps`.
    #[arg(
        long,
        global = true,
        env = "GATEWAY_AUTH_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    auth_key: Option<String>,
    /// The CA certificate(s) that signed the gateway's certificate (PEM).
    #[arg(long, global = true, value_name = "PEM")]
    ca_cert: Option<PathBuf>,
    /// This client's certificate chain, for mutual TLS (PEM; needs
    /// --client-key).
    #[arg(long, global = true, value_name = "PEM")]
    client_cert: Option<PathBuf>,
    /// This client's private key, for mutual TLS (PEM; needs --client-cert).
    #[arg(long, global = true, value_name = "PEM")]
    client_key: Option<PathBuf>,
    /// The name the gateway's certificate must carry, when it differs from
    /// the address's host.
    #[arg(long, global = true, value_name = "NAME")]
    tls_domain: Option<String>,
    /// The call's deadline in milliseconds (all attempts and backoffs);
    /// none by default.
    #[arg(long, global = true, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..))]
    deadline_ms: Option<u64>,
    /// Print only the answer: no spinner, no summary line.
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct PromptArgs {
    /// The provider, by its configured name (default: the gateway's).
    #[arg(long, value_name = "NAME")]
    provider: Option<String>,
    /// The model (default: the provider's).
    #[arg(long)]
    model: Option<String>,
    /// A system prompt.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// The most tokens to generate (default: the provider's).
    #[arg(long, value_name = "N")]
    max_tokens: Option<u32>,
    /// The prompt, its words joined by spaces; read from stdin when absent
    /// or `-`.
    #[arg(value_name = "PROMPT")]
    prompt: Vec<String>,
    // Last: its heading would carry over to the fields after it.
    #[command(flatten)]
    retry: RetryArgs,
}

/// Per-request retry overrides, sent as `x-retry-*` metadata. The gateway
/// validates them and clamps them to its operator's limits.
#[derive(Debug, Args)]
#[command(next_help_heading = "Retry overrides (the gateway clamps them to its limits)")]
struct RetryArgs {
    /// Attempts in all, the first included (1 = no retry).
    #[arg(long, value_name = "N")]
    max_attempts: Option<u32>,
    /// The first backoff's ceiling.
    #[arg(long, value_name = "MS")]
    initial_backoff_ms: Option<u64>,
    /// The backoff cap.
    #[arg(long, value_name = "MS")]
    max_backoff_ms: Option<u64>,
    /// Growth of the backoff ceiling per retry.
    #[arg(long, value_name = "X")]
    backoff_multiplier: Option<f64>,
    /// The limit of one attempt (for a stream: until its first content).
    #[arg(long, value_name = "MS")]
    per_try_timeout_ms: Option<u64>,
    /// The failure classes to retry, comma separated (rate-limited,
    /// overloaded, server-error, timeout, connection, stream-interrupted,
    /// busy), or `none`.
    #[arg(long, value_name = "CLASSES", value_parser = parse_retry_on)]
    retry_on: Option<RetryOn>,
}

/// The value of --retry-on; a newtype so that clap takes it as one value.
#[derive(Debug, Clone)]
struct RetryOn(Vec<String>);

fn parse_retry_on(value: &str) -> Result<RetryOn, String> {
    if value.trim().eq_ignore_ascii_case("none") {
        return Ok(RetryOn(Vec::new()));
    }
    let classes: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect();
    if classes.is_empty() {
        return Err("expected a comma-separated list of classes, or `none`".into());
    }
    Ok(RetryOn(classes))
}

impl RetryArgs {
    fn overrides(&self) -> RetryOverrides {
        RetryOverrides {
            max_attempts: self.max_attempts,
            initial_backoff: self.initial_backoff_ms.map(Duration::from_millis),
            max_backoff: self.max_backoff_ms.map(Duration::from_millis),
            backoff_multiplier: self.backoff_multiplier,
            per_try_timeout: self.per_try_timeout_ms.map(Duration::from_millis),
            retry_on: self.retry_on.as_ref().map(|r| r.0.clone()),
        }
    }
}

/// Why the command failed; each maps to an exit code.
#[derive(Debug)]
enum Failure {
    /// A bad flag value, an unreadable file, no prompt: exit 2.
    Usage(String),
    /// The client or the call failed.
    Client(ClientError),
    /// Anything else, said in one line: exit 1.
    Other(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Self::Client(e)
    }
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Other(_) => 1,
            Self::Client(e) => match e {
                ClientError::Status(status) => exit_code(status.code()),
                // No connection is what gRPC reports as UNAVAILABLE.
                ClientError::Connect(_) => exit_code(Code::Unavailable),
                ClientError::InvalidEndpoint(_)
                | ClientError::InvalidOverride(_)
                | ClientError::InvalidTls(_)
                | ClientError::InvalidAuthKey => 2,
            },
        }
    }

    /// The one line printed on stderr.
    fn message(&self) -> String {
        let text = match self {
            Self::Usage(m) | Self::Other(m) => m.clone(),
            Self::Client(ClientError::Status(status)) => {
                // A status made by tonic itself (a failed handshake, a reset)
                // says only "transport error"; its cause is in its sources.
                let mut message = status.message().to_string();
                let mut source = std::error::Error::source(status.as_ref());
                while let Some(cause) = source {
                    let cause_text = cause.to_string();
                    if !message.contains(&cause_text) {
                        message = format!("{message}: {cause_text}");
                    }
                    source = cause.source();
                }
                format!("{}: {message}", code_name(status.code()))
            }
            Self::Client(e @ ClientError::Connect(_)) => {
                format!("{}: {e}", code_name(Code::Unavailable))
            }
            Self::Client(e) => e.to_string(),
        };
        format!("error: {}", one_line(&text))
    }
}

/// The exit code of a gRPC status class.
fn exit_code(code: Code) -> u8 {
    match code {
        Code::Ok => 0,
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition => 3,
        Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded => 4,
        Code::Unauthenticated | Code::PermissionDenied => 5,
        Code::Cancelled
        | Code::Unknown
        | Code::AlreadyExists
        | Code::Aborted
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::DataLoss => 1,
    }
}

/// The status's name as the gRPC specification spells it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // Usage errors exit 2 here, naming the flag.
    let cli = Cli::parse();
    let result = tokio::select! {
        result = run(cli) => result,
        _ = tokio::signal::ctrl_c() => {
            // Clears a spinner line; the answer so far stays printed.
            eprintln!();
            return ExitCode::from(130);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("{}", failure.message());
            ExitCode::from(failure.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let connection = &cli.connection;
    let mut options = CallOptions::new();
    options.deadline = connection.deadline_ms.map(Duration::from_millis);
    options.auth_key = connection.auth_key.clone();
    match &cli.command {
        Command::Complete(args) => {
            let request = build_request(args).await?;
            options.retry = args.retry.overrides();
            let mut client = connect(connection).await?;
            complete(&mut client, request, &options, connection.quiet).await
        }
        Command::Stream(args) => {
            let request = build_request(args).await?;
            options.retry = args.retry.overrides();
            let mut client = connect(connection).await?;
            stream(&mut client, request, &options, connection.quiet).await
        }
        Command::Providers => {
            let mut client = connect(connection).await?;
            providers(&mut client, &options).await
        }
    }
}

async fn connect(args: &ConnectionArgs) -> Result<GatewayClient, Failure> {
    let address = if args.address.contains("://") {
        args.address.clone()
    } else {
        format!("http://{}", args.address)
    };
    let wants_tls = args.ca_cert.is_some()
        || args.client_cert.is_some()
        || args.client_key.is_some()
        || args.tls_domain.is_some();
    let endpoint = if address.starts_with("https://") {
        let mut tls = TlsOptions::new();
        if let Some(path) = &args.ca_cert {
            tls = tls.ca_certificate(read_file("--ca-cert", path)?);
        }
        match (&args.client_cert, &args.client_key) {
            (Some(cert), Some(key)) => {
                tls = tls.client_identity(
                    read_file("--client-cert", cert)?,
                    read_file("--client-key", key)?,
                );
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(Failure::Usage("--client-cert needs --client-key".into()));
            }
            (None, Some(_)) => {
                return Err(Failure::Usage("--client-key needs --client-cert".into()));
            }
        }
        if let Some(domain) = &args.tls_domain {
            tls = tls.domain(domain.clone());
        }
        GatewayClient::tls_endpoint(address, &tls)?
    } else if wants_tls {
        return Err(Failure::Usage(format!(
            "--ca-cert, --client-cert, --client-key and --tls-domain need an https:// --address, not `{address}`"
        )));
    } else {
        GatewayClient::endpoint(address)?
    };
    Ok(GatewayClient::connect_with(endpoint).await?)
}

fn read_file(flag: &str, path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::Usage(format!("{flag} {}: {e}", path.display())))
}

async fn build_request(
    args: &PromptArgs,
) -> Result<provider_gateway_client::CompleteRequest, Failure> {
    let prompt = read_prompt(&args.prompt).await?;
    let mut request = request::user(prompt);
    request.provider = args.provider.clone().unwrap_or_default();
    request.model = args.model.clone().unwrap_or_default();
    request.system = args.system.clone().unwrap_or_default();
    request.max_tokens = args.max_tokens;
    Ok(request)
}

/// The prompt from the arguments, or from stdin when there are none or the
/// only one is `-`.
async fn read_prompt(words: &[String]) -> Result<String, Failure> {
    let from_stdin = words.is_empty() || (words.len() == 1 && words[0] == "-");
    let prompt = if from_stdin {
        if std::io::stdin().is_terminal() {
            eprintln!("reading the prompt from stdin (end it with Ctrl-D)");
        }
        let mut text = String::new();
        tokio::io::stdin()
            .read_to_string(&mut text)
            .await
            .map_err(|e| Failure::Usage(format!("cannot read the prompt from stdin: {e}")))?;
        text.trim_end_matches(['\n', '\r']).to_string()
    } else {
        words.join(" ")
    };
    if prompt.trim().is_empty() {
        return Err(Failure::Usage(
            "no prompt: give it as arguments or on stdin".into(),
        ));
    }
    Ok(prompt)
}

async fn complete(
    client: &mut GatewayClient,
    request: provider_gateway_client::CompleteRequest,
    options: &CallOptions,
    quiet: bool,
) -> Result<(), Failure> {
    let started = Instant::now();
    let mut spinner = Spinner::start(!quiet);
    let answer = client.complete(request, options).await;
    spinner.stop().await;
    let answer: Answer = answer?;
    let mut stdout = tokio::io::stdout();
    let mut text = answer.text();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    write_out(&mut stdout, &text).await?;
    if !quiet {
        let model = &answer.response.model;
        eprintln!(
            "{}",
            summary(
                answer.stop_reason(),
                answer.response.usage.as_ref(),
                answer.attempts,
                &answer.provider,
                model,
                started.elapsed(),
            )
        );
    }
    Ok(())
}

async fn stream(
    client: &mut GatewayClient,
    request: provider_gateway_client::CompleteRequest,
    options: &CallOptions,
    quiet: bool,
) -> Result<(), Failure> {
    let started = Instant::now();
    let mut spinner = Spinner::start(!quiet);
    let mut stdout = tokio::io::stdout();
    let mut events = match client.stream(request, options).await {
        Ok(events) => events,
        Err(e) => {
            spinner.stop().await;
            return Err(e.into());
        }
    };
    let (mut provider, mut model, mut attempts) = (String::new(), String::new(), 0);
    let mut usage = None;
    let mut stop = None;
    let mut wrote = String::new();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) => {
                spinner.stop().await;
                // What was printed stays; the error starts on a line of its own.
                if !wrote.is_empty() && !wrote.ends_with('\n') {
                    write_out(&mut stdout, "\n").await?;
                }
                return Err(e.into());
            }
        };
        match event {
            StreamEvent::Start {
                provider: p,
                model: m,
                attempt,
                ..
            } => {
                provider = p;
                model = m;
                attempts = attempt;
            }
            StreamEvent::Text { text, .. } => {
                spinner.stop().await;
                write_out(&mut stdout, &text).await?;
                wrote = text;
            }
            StreamEvent::Usage(u) => usage = Some(u),
            StreamEvent::Stop(reason) => stop = Some(reason),
            // The text continues where it broke; the summary names who served.
            StreamEvent::Resumed {
                provider: p,
                attempt,
                ..
            } => {
                provider = p;
                attempts = attempt;
            }
            // What was printed cannot be taken back: say the answer starts
            // over, on a line of its own.
            StreamEvent::Restarted {
                provider: p,
                attempt,
            } => {
                provider = p;
                attempts = attempt;
                let line = if wrote.is_empty() || wrote.ends_with('\n') {
                    "[the stream broke; the answer starts over]\n"
                } else {
                    "\n[the stream broke; the answer starts over]\n"
                };
                write_out(&mut stdout, line).await?;
                wrote = line.to_string();
            }
            // This command offers no tools, so no tool calls are expected.
            StreamEvent::ToolUseStart { .. } | StreamEvent::ToolInputJson { .. } => {}
        }
    }
    spinner.stop().await;
    if !wrote.ends_with('\n') {
        write_out(&mut stdout, "\n").await?;
    }
    let Some(stop) = stop else {
        return Err(Failure::Other(
            "the stream ended without a stop event".into(),
        ));
    };
    if !quiet {
        eprintln!(
            "{}",
            summary(
                stop,
                usage.as_ref(),
                attempts,
                &provider,
                &model,
                started.elapsed()
            )
        );
    }
    Ok(())
}

async fn providers(client: &mut GatewayClient, options: &CallOptions) -> Result<(), Failure> {
    let list = client.providers_with(options).await?;
    let name_width = list
        .providers
        .iter()
        .map(|p| p.name.len())
        .max()
        .unwrap_or(0);
    let kind_width = list
        .providers
        .iter()
        .map(|p| p.kind.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for p in &list.providers {
        let model = if p.default_model.is_empty() {
            "-"
        } else {
            &p.default_model
        };
        let default = if p.name == list.default_provider {
            "  (default)"
        } else {
            ""
        };
        let line = format!(
            "{:<name_width$}  {:<kind_width$}  {model}{default}",
            p.name, p.kind
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    write_out(&mut tokio::io::stdout(), &out).await
}

async fn write_out(stdout: &mut tokio::io::Stdout, text: &str) -> Result<(), Failure> {
    let write = async {
        stdout.write_all(text.as_bytes()).await?;
        stdout.flush().await
    };
    write
        .await
        .map_err(|e| Failure::Other(format!("cannot write to stdout: {e}")))
}

/// The line printed on stderr after an answer.
fn summary(
    stop: StopReason,
    usage: Option<&Usage>,
    attempts: u32,
    provider: &str,
    model: &str,
    elapsed: Duration,
) -> String {
    let stop = stop
        .as_str_name()
        .trim_start_matches("STOP_REASON_")
        .to_ascii_lowercase();
    let usage = usage.copied().unwrap_or_default();
    format!(
        "[stop={stop} input_tokens={} output_tokens={} attempts={attempts} provider={} model={} elapsed={:.2}s]",
        usage.input_tokens,
        usage.output_tokens,
        if provider.is_empty() { "-" } else { provider },
        if model.is_empty() { "-" } else { model },
        elapsed.as_secs_f64(),
    )
}

/// A spinner with the elapsed seconds on stderr while the first token is
/// awaited; only on a terminal, so logs and pipes never see it.
struct Spinner {
    running: Option<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl Spinner {
    fn start(enabled: bool) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return Self { running: None };
        }
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for frame in FRAMES.iter().cycle() {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {
                        let mut err = std::io::stderr().lock();
                        let _ = write!(
                            err,
                            "\r{frame} waiting for the first token... {:.1}s",
                            started.elapsed().as_secs_f64()
                        );
                        let _ = err.flush();
                    }
                }
            }
            // Back to the start of the line, erased.
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        });
        Self {
            running: Some((stop, task)),
        }
    }

    /// Stops the spinner and erases its line; later calls do nothing.
    async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_class_has_its_exit_code() {
        assert_eq!(exit_code(Code::InvalidArgument), 3);
        assert_eq!(exit_code(Code::NotFound), 3);
        assert_eq!(exit_code(Code::FailedPrecondition), 3);
        assert_eq!(exit_code(Code::Unavailable), 4);
        assert_eq!(exit_code(Code::ResourceExhausted), 4);
        assert_eq!(exit_code(Code::DeadlineExceeded), 4);
        assert_eq!(exit_code(Code::Unauthenticated), 5);
        assert_eq!(exit_code(Code::PermissionDenied), 5);
        assert_eq!(exit_code(Code::Internal), 1);
    }

    #[test]
    fn retry_on_takes_a_list_or_none() {
        assert_eq!(parse_retry_on("none").unwrap().0, Vec::<String>::new());
        assert_eq!(
            parse_retry_on("rate-limited, timeout").unwrap().0,
            vec!["rate-limited".to_string(), "timeout".to_string()]
        );
        assert!(parse_retry_on(" , ").is_err());
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
