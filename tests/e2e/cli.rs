//! `provider-gateway-cli` (the client crate's binary) against the real
//! gateway on 127.0.0.1:0: answers on stdout, one-line errors on stderr,
//! and an exit code per gRPC status class.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use provider_gateway_server::auth::key_hash_hex;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::support::Gateway;

/// The CLI is a binary of another package, so Cargo gives this test no
/// `CARGO_BIN_EXE_` path for it: it sits beside the test's own `deps/`
/// folder (`target/<profile>/`). CI builds the workspace before testing.
fn cli_path() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps/");
    let cli = profile_dir.join(format!(
        "provider-gateway-cli{}",
        std::env::consts::EXE_SUFFIX
    ));
    assert!(
        cli.is_file(),
        "{} is missing: build it first with `cargo build --workspace` \
         (or `cargo build -p provider-gateway-client --bin provider-gateway-cli`)",
        cli.display()
    );
    cli
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the CLI with `args`, `stdin` as its standard input, and none of the
/// caller's `GATEWAY_*` variables.
async fn run(args: &[&str], stdin: Option<&str>) -> Output {
    run_env(args, stdin, &[]).await
}

/// `run` with `env` added to the CLI's environment.
async fn run_env(args: &[&str], stdin: Option<&str>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(cli_path());
    cmd.args(args)
        .env_remove("GATEWAY_ADDRESS")
        .env_remove("GATEWAY_AUTH_KEY")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("the CLI starts");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).await.unwrap();
        // Closing the pipe is the end of the prompt.
        drop(pipe);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the CLI finishes within 30 s")
        .unwrap();
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn cli_complete_prints_the_answer_and_a_summary() {
    let gateway = Gateway::start("", &[]).await;
    let out = run(
        &["--address", &gateway.url(), "complete", "hello", "world"],
        None,
    )
    .await;
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "hello world\n");
    // The summary goes to stderr, so stdout holds only the answer.
    for part in ["stop=end_turn", "attempts=1", "provider=mock"] {
        assert!(out.stderr.contains(part), "{part} in {:?}", out.stderr);
    }
    // stderr is not a terminal here: no spinner.
    assert!(!out.stderr.contains("waiting"), "{:?}", out.stderr);
}

#[tokio::test]
async fn cli_stream_prints_the_text() {
    let gateway = Gateway::start("", &[]).await;
    let out = run(
        &["--address", &gateway.url(), "stream", "a", "b", "c"],
        None,
    )
    .await;
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "a b c\n");
    assert!(out.stderr.contains("stop=end_turn"), "{:?}", out.stderr);
}

#[tokio::test]
async fn cli_providers_lists_the_mock() {
    let gateway = Gateway::start("", &[]).await;
    let out = run(&["providers", "--address", &gateway.url()], None).await;
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    let line = out
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some("mock"))
        .unwrap_or_else(|| panic!("no mock in {:?}", out.stdout));
    assert!(line.contains("(default)"), "{line}");
}

#[tokio::test]
async fn cli_reads_the_prompt_from_stdin() {
    let gateway = Gateway::start("", &[]).await;
    let url = gateway.url();
    let out = run(
        &["--address", &url, "complete"],
        Some("from standard input\n"),
    )
    .await;
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "from standard input\n");

    let out = run(
        &["--address", &url, "-q", "stream", "-"],
        Some("piped words"),
    )
    .await;
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "piped words\n");
    assert_eq!(out.stderr, "", "--quiet prints no summary");

    let out = run(&["--address", &url, "complete"], Some("\n")).await;
    assert_eq!(out.code, 2, "an empty prompt is a usage error: {out:?}");
    assert!(out.stderr.contains("no prompt"), "{}", out.stderr);
}

#[tokio::test]
async fn cli_refuses_a_bad_flag_value_naming_it() {
    // Refused by the CLI itself: no gateway needed.
    let out = run(&["complete", "--max-attempts", "zero", "hi"], None).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--max-attempts"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);

    let out = run(&["stream", "--retry-on", ",", "hi"], None).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--retry-on"), "{}", out.stderr);
}

#[tokio::test]
async fn cli_maps_invalid_argument_to_exit_3_naming_the_key() {
    let gateway = Gateway::start("", &[]).await;
    let out = run(
        &[
            "--address",
            &gateway.url(),
            "complete",
            "--max-attempts",
            "0",
            "hi",
        ],
        None,
    )
    .await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(
        out.stderr.starts_with("error: INVALID_ARGUMENT: "),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("x-retry-max-attempts"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}

#[tokio::test]
async fn cli_maps_not_found_to_exit_3() {
    let gateway = Gateway::start("", &[]).await;
    for command in ["complete", "stream"] {
        let out = run(
            &[
                "--address",
                &gateway.url(),
                command,
                "--provider",
                "nope",
                "hi",
            ],
            None,
        )
        .await;
        assert_eq!(out.code, 3, "{command}: {out:?}");
        assert!(
            out.stderr.starts_with("error: NOT_FOUND: "),
            "{command}: {}",
            out.stderr
        );
        assert!(out.stderr.contains("nope"), "{command}: {}", out.stderr);
    }
}

#[tokio::test]
async fn cli_maps_no_gateway_to_unavailable_exit_4() {
    // A port that was free a moment ago: nothing listens there.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let out = run(
        &["--address", &format!("127.0.0.1:{port}"), "complete", "hi"],
        None,
    )
    .await;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(
        out.stderr.starts_with("error: UNAVAILABLE: "),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn cli_refuses_tls_flags_on_a_plaintext_address() {
    let out = run(
        &[
            "--address",
            "http://127.0.0.1:1",
            "--tls-domain",
            "gw",
            "providers",
        ],
        None,
    )
    .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("https://"), "{}", out.stderr);
}

#[tokio::test]
async fn cli_sends_the_auth_key_and_maps_auth_failures_to_exit_5() {
    let toml = format!(
        "default_provider = \"mock\"\n\
         [providers.mock]\nkind = \"mock\"\n[providers.other]\nkind = \"mock\"\n\
         [auth]\nkeys = [\"{}\"]\n\
         [[auth.clients]]\nname = \"limited\"\nkey_sha256 = \"{}\"\nproviders = [\"mock\"]\n",
        key_hash_hex("cli-right-key"),
        key_hash_hex("cli-limited-key"),
    );
    let gateway = Gateway::start(&toml, &[]).await;
    let url = gateway.url();

    let out = run(&["--address", &url, "complete", "hi"], None).await;
    assert_eq!(out.code, 5, "{out:?}");
    assert!(
        out.stderr.starts_with("error: UNAUTHENTICATED: "),
        "{}",
        out.stderr
    );

    // The flag, and the environment variable.
    let out = run(
        &[
            "--address",
            &url,
            "--auth-key",
            "cli-right-key",
            "complete",
            "let me in",
        ],
        None,
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "let me in\n");
    let with_env = [("GATEWAY_AUTH_KEY", "cli-right-key")];
    let out = run_env(&["--address", &url, "providers"], None, &with_env).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("other"), "{}", out.stdout);
    let out = run_env(
        &["--address", &url, "stream", "streamed in"],
        None,
        &with_env,
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "streamed in\n");

    let limited = [("GATEWAY_AUTH_KEY", "cli-limited-key")];
    let out = run_env(
        &["--address", &url, "complete", "--provider", "other", "hi"],
        None,
        &limited,
    )
    .await;
    assert_eq!(out.code, 5, "{out:?}");
    assert!(
        out.stderr.starts_with("error: PERMISSION_DENIED: "),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("cli-limited-key"), "{}", out.stderr);
}

/// A CA, a server certificate for `localhost` and a client certificate,
/// written as PEM files into a fresh folder.
fn pki(name: &str) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = std::env::temp_dir().join(format!("pg-cli-tls-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    for (who, names) in [
        ("server", vec!["localhost".to_string()]),
        ("client", vec!["client".to_string()]),
    ] {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.join(format!("{who}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{who}.key")), key.serialize_pem()).unwrap();
    }
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    dir
}

#[tokio::test]
async fn cli_speaks_mutual_tls() {
    let dir = pki("mtls");
    let toml = format!(
        "[tls]\ncert_path = \"{0}/server.pem\"\nkey_path = \"{0}/server.key\"\nclient_ca_path = \"{0}/ca.pem\"\n",
        dir.display()
    );
    let gateway = Gateway::start(&toml, &[]).await;
    // The certificate names `localhost`; the address is an IP.
    let address = format!("https://{}", gateway.addr);
    let file = |name: &str| dir.join(name).display().to_string();
    let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client.key"));
    let tls = [
        "--address",
        &address,
        "--tls-domain",
        "localhost",
        "--ca-cert",
        &ca,
    ];

    let mut args = tls.to_vec();
    args.extend([
        "--client-cert",
        &cert,
        "--client-key",
        &key,
        "complete",
        "mutual",
        "tls",
    ]);
    let out = run(&args, None).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stdout, "mutual tls\n");

    // Without the client certificate the gateway refuses the handshake.
    let mut args = tls.to_vec();
    args.extend(["complete", "anonymous"]);
    let out = run(&args, None).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.starts_with("error: "), "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 1, "one line: {}", out.stderr);

    // A certificate without its key is a usage error.
    let mut args = tls.to_vec();
    args.extend(["--client-cert", &cert, "complete", "x"]);
    let out = run(&args, None).await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--client-key"), "{}", out.stderr);

    // An unreadable CA file is a usage error naming the flag.
    let out = run(
        &[
            "--address",
            &address,
            "--ca-cert",
            "/nonexistent/ca.pem",
            "providers",
        ],
        None,
    )
    .await;
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("--ca-cert"), "{}", out.stderr);
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {} / stdout {:?} / stderr {:?}",
            self.code, self.stdout, self.stderr
        )
    }
}
