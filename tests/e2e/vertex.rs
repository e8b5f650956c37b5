//! The vertex provider: Gemini on Vertex AI, with an access token the
//! gateway mints from a service-account key (an RS256 JWT sent to a
//! scripted token endpoint on loopback), caches and mints again before it
//! expires. The key is a test-only RSA key made once with openssl
//! (`tests/e2e/fixtures/vertex-test-sa-key.pem`): ring cannot generate RSA
//! keys.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use provider_gateway_client::{CallOptions, StopReason, StreamEvent, request};
use serde_json::{Value, json};
use tonic::Code;

use crate::support::{Gateway, Reply, Upstream};

const KEY_PEM: &str = include_str!("fixtures/vertex-test-sa-key.pem");
const EMAIL: &str = "gateway@my-proj.iam.gserviceaccount.com";

fn service_account() -> String {
    json!({
        "type": "service_account",
        "project_id": "my-proj",
        "private_key_id": "kid-123",
        "private_key": KEY_PEM,
        "client_email": EMAIL,
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    })
    .to_string()
}

fn token(access: &str, expires_in: u64) -> Reply {
    Reply::json(
        200,
        json!({"access_token": access, "expires_in": expires_in, "token_type": "Bearer"}),
    )
}

fn answer(text: &str) -> Reply {
    Reply::json(
        200,
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP"}],
            "modelVersion": "gemini-2.5-pro", "responseId": "v1"}),
    )
}

fn config(api: &Upstream, tokens: &Upstream) -> String {
    format!(
        "default_provider = \"v\"\n[providers.v]\nkind = \"vertex\"\nbase_url = \"{}\"\nproject = \"my-proj\"\nregion = \"us-central1\"\nmodel = \"gemini-2.5-pro\"\ncredentials_env = \"SA_JSON\"\ntoken_url = \"{}/token\"\n",
        api.url(),
        tokens.url()
    )
}

fn form(raw: &[u8]) -> Vec<(String, String)> {
    String::from_utf8(raw.to_vec())
        .unwrap()
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap();
            (k.to_string(), v.replace("%3A", ":"))
        })
        .collect()
}

/// Checks the JWT's RS256 signature with the key's public half and returns
/// its header and claims.
fn verify_jwt(jwt: &str) -> (Value, Value) {
    let body: String = KEY_PEM
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let der = STANDARD.decode(body).unwrap();
    let pair = ring::signature::RsaKeyPair::from_pkcs8(&der).unwrap();
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        ring::signature::KeyPair::public_key(&pair)
            .as_ref()
            .to_vec(),
    );
    let (signed, signature) = jwt.rsplit_once('.').unwrap();
    public
        .verify(
            signed.as_bytes(),
            &URL_SAFE_NO_PAD.decode(signature).unwrap(),
        )
        .expect("the JWT is signed with the service account's key");
    let (header, claims) = signed.split_once('.').unwrap();
    let decode =
        |part: &str| serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap();
    (decode(header), decode(claims))
}

#[tokio::test]
async fn vertex_mints_a_token_with_a_signed_jwt_caches_it_and_calls_the_publisher_model() {
    let tokens = Upstream::start(vec![token("ya29.first-token", 3599)]).await;
    let api = Upstream::start(vec![answer("one"), answer("two")]).await;
    let sa = service_account();
    let gw = Gateway::start(&config(&api, &tokens), &[("SA_JSON", sa.as_str())]).await;
    let mut client = gw.client().await;
    for expected in ["one", "two"] {
        let got = client
            .complete(request::user("Hi"), &CallOptions::new())
            .await
            .unwrap();
        assert_eq!(
            (got.text().as_str(), got.stop_reason()),
            (expected, StopReason::EndTurn)
        );
    }
    assert_eq!(tokens.request_count(), 1, "the token is cached");

    let mint = &tokens.requests()[0];
    assert_eq!(
        (mint.method.as_str(), mint.path.as_str()),
        ("POST", "/token")
    );
    assert_eq!(
        mint.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let fields = form(&mint.raw);
    assert_eq!(
        fields[0],
        (
            "grant_type".into(),
            "urn:ietf:params:oauth:grant-type:jwt-bearer".into()
        )
    );
    assert_eq!(fields[1].0, "assertion");
    let (header, claims) = verify_jwt(&fields[1].1);
    assert_eq!(
        header,
        json!({"alg": "RS256", "typ": "JWT", "kid": "kid-123"})
    );
    assert_eq!(claims["iss"], EMAIL);
    assert_eq!(claims["aud"], format!("{}/token", tokens.url()));
    assert_eq!(
        claims["scope"],
        "https://www.googleapis.com/auth/cloud-platform"
    );
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 3600);

    for sent in api.requests() {
        assert_eq!(
            sent.path,
            "/v1/projects/my-proj/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent"
        );
        assert_eq!(
            sent.header("authorization"),
            Some("Bearer ya29.first-token")
        );
        assert_eq!(sent.header("x-goog-api-key"), None);
        assert_eq!(sent.body["contents"][0]["role"], "user");
    }
}

#[tokio::test]
async fn vertex_mints_again_before_expiry_and_streams() {
    // The first token has two minutes left: less than the five-minute
    // margin, so the next call mints a new one; that one is reused.
    let tokens = Upstream::start(vec![
        token("ya29.short-lived", 120),
        token("ya29.fresh", 3600),
    ])
    .await;
    let api = Upstream::start(vec![
        answer("one"),
        Reply::sse(&[
            ("", json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "stre"}]}}], "responseId": "s"}).to_string()),
            ("", json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "amed"}]}, "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": 2}}).to_string()),
        ]),
        answer("three"),
    ])
    .await;
    let sa = service_account();
    let gw = Gateway::start(&config(&api, &tokens), &[("SA_JSON", sa.as_str())]).await;
    let mut client = gw.client().await;
    client
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();
    let (events, status) = gw.stream_all(request::user("Stream")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(crate::support::text_of(&events), "streamed");
    assert_eq!(events.last(), Some(&StreamEvent::Stop(StopReason::EndTurn)));
    client
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();

    assert_eq!(tokens.request_count(), 2);
    let auth: Vec<String> = api
        .requests()
        .iter()
        .map(|r| r.header("authorization").unwrap().to_string())
        .collect();
    assert_eq!(
        auth,
        [
            "Bearer ya29.short-lived",
            "Bearer ya29.fresh",
            "Bearer ya29.fresh"
        ]
    );
    assert_eq!(
        api.requests()[1].path,
        "/v1/projects/my-proj/locations/us-central1/publishers/google/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
    );
}

#[tokio::test]
async fn vertex_rejected_grant_is_failed_precondition_without_secrets() {
    let tokens = Upstream::start(vec![Reply::json(
        400,
        json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
    )])
    .await;
    let api = Upstream::start(vec![]).await;
    let sa = service_account();
    let gw = Gateway::start(&config(&api, &tokens), &[("SA_JSON", sa.as_str())]).await;
    let err = gw
        .client()
        .await
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .contains("cannot mint a Vertex AI access token")
            && status.message().contains("invalid_grant"),
        "{}",
        status.message()
    );
    let assertion = &form(&tokens.requests()[0].raw)[1].1;
    assert!(!status.message().contains(assertion.as_str()));
    assert!(!status.message().contains("PRIVATE KEY"));
    assert_eq!(
        api.request_count(),
        0,
        "nothing reached the model without a token"
    );
    assert_eq!(tokens.request_count(), 1, "a rejected grant is not retried");
}

#[tokio::test]
async fn vertex_configuration_names_what_is_missing() {
    let build = |toml: &str, env: &[(&str, &str)]| {
        let config = provider_gateway_server::Config::from_toml(&format!(
            "default_provider = \"v\"\n[providers.v]\nkind = \"vertex\"\n{toml}"
        ))?;
        let env: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        provider_gateway_server::Registry::from_config(&config, &env).map(|_| ())
    };
    let base = "project = \"p\"\nregion = \"europe-west4\"\n";
    for (toml, env, named) in [
        ("region = \"r\"\n", &[][..], "providers.v.project"),
        ("project = \"p\"\n", &[][..], "providers.v.region"),
        (base, &[][..], "GOOGLE_APPLICATION_CREDENTIALS"),
        (
            &format!("{base}credentials_env = \"SA\"\n") as &str,
            &[][..],
            "SA (its credentials_env)",
        ),
        (
            &format!("{base}credentials_file = \"/nonexistent/sa.json\"\n"),
            &[][..],
            "providers.v.credentials_file",
        ),
        (
            &format!("{base}credentials_env = \"SA\"\n"),
            &[("SA", r#"{"type":"authorized_user"}"#)][..],
            "only `service_account` keys",
        ),
        (
            &format!("{base}credentials_env = \"SA\"\ntoken_url = \"ftp://x\"\n"),
            &[][..],
            "providers.v.token_url",
        ),
        (
            "project = \"p\"\nregion = \"us/../x\"\n",
            &[][..],
            "providers.v.region",
        ),
    ] {
        let e = build(toml, env).unwrap_err();
        assert!(e.0.contains(named), "{named}: {e}");
    }
    // A key file named by GOOGLE_APPLICATION_CREDENTIALS is read.
    let dir = std::env::temp_dir().join(format!("pg-vertex-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("sa.json");
    std::fs::write(&path, service_account()).unwrap();
    build(
        base,
        &[("GOOGLE_APPLICATION_CREDENTIALS", path.to_str().unwrap())],
    )
    .unwrap();
    let e = build(
        &format!("{base}credentials_env = \"SA\"\n"),
        &[(
            "SA",
            &service_account().replace("BEGIN PRIVATE KEY", "BEGIN NOTHING"),
        )],
    )
    .unwrap_err();
    assert!(
        e.0.contains("not a PEM PKCS#8 key") && !e.0.contains("MII"),
        "{e}"
    );
}
