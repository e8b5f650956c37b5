//! The bedrock provider: Converse and ConverseStream against a scripted
//! upstream that answers in real AWS event-stream frames (built here with
//! the same crate's encoder), SigV4 signatures checked by recomputing them,
//! Bedrock's error types, and the credential sources (environment, STS web
//! identity, the container endpoint, a profile file) on loopback.

use std::time::{Duration, SystemTime};

use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use provider_gateway_client::v1::content_block::Block;
use provider_gateway_client::{CallOptions, StopReason, StreamEvent, request, v1};
use serde_json::{Value, json};
use tonic::Code;

use crate::support::upstream::Recorded;
use crate::support::{Gateway, Reply, ScriptedClock, Step, Upstream};

const MODEL: &str = "anthropic.claude-3-5-sonnet-20240620-v1:0";
const KEY_ID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const SESSION: &str = "session-token-FwoGZXIvYXdzEXAMPLE";

fn env_credentials() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_SESSION_TOKEN", SESSION),
    ]
}

fn config(upstream: &Upstream, extra: &str) -> String {
    format!(
        "default_provider = \"b\"\n[providers.b]\nkind = \"bedrock\"\nbase_url = \"{}\"\nregion = \"us-east-1\"\nmodel = \"{MODEL}\"\n{extra}\n",
        upstream.url()
    )
}

fn string(v: &str) -> HeaderValue {
    HeaderValue::String(v.to_string().into())
}

/// One event-stream frame, as Bedrock sends it.
pub fn event(kind: &str, payload: Value) -> Vec<u8> {
    let message = Message::new(payload.to_string().into_bytes())
        .add_header(Header::new(":event-type", string(kind)))
        .add_header(Header::new(":content-type", string("application/json")))
        .add_header(Header::new(":message-type", string("event")));
    let mut out = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&message, &mut out).unwrap();
    out
}

fn exception(kind: &str, text: &str) -> Vec<u8> {
    let message = Message::new(json!({"message": text}).to_string().into_bytes())
        .add_header(Header::new(":exception-type", string(kind)))
        .add_header(Header::new(":content-type", string("application/json")))
        .add_header(Header::new(":message-type", string("exception")));
    let mut out = Vec::new();
    aws_smithy_eventstream::frame::write_message_to(&message, &mut out).unwrap();
    out
}

pub fn event_stream(frames: Vec<Vec<u8>>) -> Reply {
    let mut reply = Reply::sse_steps(frames.into_iter().map(Step::Chunk).collect());
    reply.headers = vec![
        (
            "content-type".into(),
            "application/vnd.amazon.eventstream".into(),
        ),
        ("x-amzn-requestid".into(), "req-stream-1".into()),
    ];
    reply
}

pub fn converse(text: &str) -> Reply {
    Reply::json(
        200,
        json!({"output": {"message": {"role": "assistant", "content": [{"text": text}]}},
            "stopReason": "end_turn", "usage": {"inputTokens": 5, "outputTokens": 2, "totalTokens": 7},
            "metrics": {"latencyMs": 100}}),
    )
    .header("x-amzn-requestid", "req-1")
}

fn bedrock_error(status: u16, kind: &str, message: &str) -> Reply {
    Reply::json(status, json!({"message": message})).header(
        "x-amzn-errortype",
        &format!("{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"),
    )
}

/// Recomputes the request's SigV4 signature from what the upstream received
/// (method, path, content-type, host, body, x-amz-date) and checks the
/// Authorization header carries it.
fn assert_signed(
    sent: &Recorded,
    upstream: &Upstream,
    key_id: &str,
    secret: &str,
    session: Option<&str>,
) {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let auth = sent.header("authorization").expect("signed");
    let date = sent.header("x-amz-date").expect("x-amz-date");
    let day = &date[..8];
    let signed_headers = if session.is_some() {
        "content-type;host;x-amz-date;x-amz-security-token"
    } else {
        "content-type;host;x-amz-date"
    };
    let prefix = format!(
        "AWS4-HMAC-SHA256 Credential={key_id}/{day}/us-east-1/bedrock/aws4_request, SignedHeaders={signed_headers}, Signature="
    );
    assert!(auth.starts_with(&prefix), "{auth}");
    let signature = &auth[prefix.len()..];
    assert!(
        signature.len() == 64 && signature.chars().all(|c| c.is_ascii_hexdigit()),
        "{auth}"
    );
    assert_eq!(sent.header("x-amz-security-token"), session);

    let time = aws_smithy_types::DateTime::from_str(
        &format!(
            "{}-{}-{}T{}:{}:{}Z",
            &date[0..4],
            &date[4..6],
            &date[6..8],
            &date[9..11],
            &date[11..13],
            &date[13..15]
        ),
        aws_smithy_types::date_time::Format::DateTime,
    )
    .unwrap();
    let identity: aws_smithy_runtime_api::client::identity::Identity =
        aws_credential_types::Credentials::new(
            key_id,
            secret,
            session.map(str::to_string),
            None,
            "test",
        )
        .into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region("us-east-1")
        .name("bedrock")
        .time(SystemTime::try_from(time).unwrap())
        .settings(SigningSettings::default())
        .build()
        .unwrap()
        .into();
    let url = format!("http://{}{}", upstream.addr, sent.path);
    let request = SignableRequest::new(
        "POST",
        url.as_str(),
        [("content-type", sent.header("content-type").unwrap())].into_iter(),
        SignableBody::Bytes(&sent.raw),
    )
    .unwrap();
    let (_, expected) = sign(request, &params).unwrap().into_parts();
    assert_eq!(signature, expected, "the signature verifies");
}

#[tokio::test]
async fn bedrock_converse_maps_messages_tools_and_inference_config_and_signs_with_sigv4() {
    let upstream = Upstream::start(vec![Reply::json(
        200,
        json!({"output": {"message": {"role": "assistant", "content": [
                {"text": "Checking."},
                {"toolUse": {"toolUseId": "tooluse_1", "name": "weather", "input": {"city": "Oslo"}}}
            ]}},
            "stopReason": "tool_use", "usage": {"inputTokens": 40, "outputTokens": 12, "totalTokens": 52}}),
    )
    .header("x-amzn-requestid", "req-abc")])
    .await;
    let gw = Gateway::start(&config(&upstream, ""), &env_credentials()).await;
    let mut req = request::user("Weather?");
    req.system = "sys".into();
    req.max_tokens = Some(256);
    req.temperature = Some(0.25);
    req.stop_sequences = vec!["STOP".into()];
    req.tools = vec![request::tool("weather", "w", r#"{"type":"object"}"#)];
    req.tool_choice = Some(v1::ToolChoice {
        mode: v1::tool_choice::Mode::Any as i32,
        name: String::new(),
    });
    req.messages.push(v1::Message {
        role: v1::Role::Assistant as i32,
        content: vec![v1::ContentBlock {
            block: Some(Block::ToolUse(v1::ToolUse {
                id: "tooluse_0".into(),
                name: "weather".into(),
                input_json: r#"{"city":"Bergen"}"#.into(),
            })),
        }],
    });
    req.messages.push(v1::Message {
        role: v1::Role::User as i32,
        content: vec![v1::ContentBlock {
            block: Some(Block::ToolResult(v1::ToolResult {
                tool_use_id: "tooluse_0".into(),
                content: "rain".into(),
                is_error: true,
            })),
        }],
    });
    let answer = gw
        .client()
        .await
        .complete(req, &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.stop_reason(), StopReason::ToolUse);
    assert_eq!(answer.response.id, "req-abc");
    assert_eq!(answer.response.model, MODEL);
    assert_eq!(
        answer.response.usage,
        Some(v1::Usage {
            input_tokens: 40,
            output_tokens: 12
        })
    );
    let Some(Block::ToolUse(call)) = &answer.response.content[1].block else {
        panic!("{:?}", answer.response.content)
    };
    assert_eq!(
        (
            call.id.as_str(),
            call.name.as_str(),
            call.input_json.as_str()
        ),
        ("tooluse_1", "weather", r#"{"city":"Oslo"}"#)
    );

    let sent = &upstream.requests()[0];
    assert_eq!(sent.path, format!("/model/{MODEL}/converse"));
    assert_eq!(sent.header("content-type"), Some("application/json"));
    assert_signed(sent, &upstream, KEY_ID, SECRET, Some(SESSION));
    assert_eq!(sent.body["system"], json!([{"text": "sys"}]));
    assert_eq!(
        sent.body["inferenceConfig"],
        json!({"maxTokens": 256, "temperature": 0.25, "stopSequences": ["STOP"]})
    );
    assert_eq!(
        sent.body["toolConfig"],
        json!({"tools": [{"toolSpec": {"name": "weather", "description": "w", "inputSchema": {"json": {"type": "object"}}}}],
            "toolChoice": {"any": {}}})
    );
    assert_eq!(
        sent.body["messages"],
        json!([
            {"role": "user", "content": [{"text": "Weather?"}]},
            {"role": "assistant", "content": [{"toolUse": {"toolUseId": "tooluse_0", "name": "weather", "input": {"city": "Bergen"}}}]},
            {"role": "user", "content": [{"toolResult": {"toolUseId": "tooluse_0", "content": [{"text": "rain"}], "status": "error"}}]},
        ])
    );
}

#[tokio::test]
async fn bedrock_converse_stream_decodes_event_stream_frames() {
    let upstream = Upstream::start(vec![event_stream(vec![
        event("messageStart", json!({"role": "assistant", "p": "abcd"})),
        event("contentBlockDelta", json!({"contentBlockIndex": 0, "delta": {"text": "Let me "}})),
        event("contentBlockDelta", json!({"contentBlockIndex": 0, "delta": {"text": "check."}})),
        event("contentBlockStop", json!({"contentBlockIndex": 0})),
        event("contentBlockStart", json!({"contentBlockIndex": 1, "start": {"toolUse": {"toolUseId": "tu_9", "name": "weather"}}})),
        event("contentBlockDelta", json!({"contentBlockIndex": 1, "delta": {"toolUse": {"input": "{\"city\":"}}})),
        event("contentBlockDelta", json!({"contentBlockIndex": 1, "delta": {"toolUse": {"input": "\"Oslo\"}"}}})),
        event("contentBlockStop", json!({"contentBlockIndex": 1})),
        event("messageStop", json!({"stopReason": "tool_use"})),
        event("metadata", json!({"usage": {"inputTokens": 11, "outputTokens": 9, "totalTokens": 20}, "metrics": {"latencyMs": 300}})),
    ])])
    .await;
    let gw = Gateway::start(&config(&upstream, ""), &env_credentials()).await;
    let (events, status) = gw.stream_all(request::user("Weather?")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(
        events,
        [
            StreamEvent::Start {
                id: "req-stream-1".into(),
                provider: "b".into(),
                model: MODEL.into(),
                attempt: 1
            },
            StreamEvent::Text {
                index: 0,
                text: "Let me ".into()
            },
            StreamEvent::Text {
                index: 0,
                text: "check.".into()
            },
            StreamEvent::ToolUseStart {
                index: 1,
                id: "tu_9".into(),
                name: "weather".into()
            },
            StreamEvent::ToolInputJson {
                index: 1,
                json: "{\"city\":".into()
            },
            StreamEvent::ToolInputJson {
                index: 1,
                json: "\"Oslo\"}".into()
            },
            StreamEvent::Usage(v1::Usage {
                input_tokens: 11,
                output_tokens: 9
            }),
            StreamEvent::Stop(StopReason::ToolUse),
        ]
    );
    let sent = &upstream.requests()[0];
    assert_eq!(sent.path, format!("/model/{MODEL}/converse-stream"));
    assert_signed(sent, &upstream, KEY_ID, SECRET, Some(SESSION));
}

#[tokio::test]
async fn bedrock_exception_frame_after_content_is_unavailable_and_a_corrupt_frame_is_retried() {
    let mut corrupt = event(
        "contentBlockDelta",
        json!({"contentBlockIndex": 0, "delta": {"text": "never"}}),
    );
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0x55;
    let upstream = Upstream::start(vec![
        event_stream(vec![
            event("messageStart", json!({"role": "assistant"})),
            event(
                "contentBlockDelta",
                json!({"contentBlockIndex": 0, "delta": {"text": "Half"}}),
            ),
            exception("modelStreamErrorException", "The model stream failed."),
        ]),
        event_stream(vec![
            event("messageStart", json!({"role": "assistant"})),
            corrupt,
        ]),
        event_stream(vec![
            event("messageStart", json!({"role": "assistant"})),
            event(
                "contentBlockDelta",
                json!({"contentBlockIndex": 0, "delta": {"text": "whole"}}),
            ),
            event("messageStop", json!({"stopReason": "end_turn"})),
            event(
                "metadata",
                json!({"usage": {"inputTokens": 1, "outputTokens": 1}}),
            ),
        ]),
    ])
    .await;
    let gw = Gateway::start(&config(&upstream, ""), &env_credentials()).await;
    let (events, status) = gw.stream_all(request::user("Hi")).await;
    let status = status.expect("never OK after a break");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("modelStreamErrorException")
            && status.message().contains("stream-interrupted"),
        "{}",
        status.message()
    );
    assert_eq!(crate::support::text_of(&events), "Half");

    // A frame whose CRC does not match fails before content: retried
    // invisibly, the next attempt serves.
    let (events, status) = gw.stream_all(request::user("Hi")).await;
    assert!(status.is_none(), "{status:?}");
    assert_eq!(crate::support::text_of(&events), "whole");
    assert!(
        matches!(events[0], StreamEvent::Start { attempt: 2, .. }),
        "{events:?}"
    );
}

#[tokio::test]
async fn bedrock_errors_map_by_exception_type_without_secrets() {
    let upstream = Upstream::start(vec![
        bedrock_error(
            429,
            "ThrottlingException",
            "Too many requests, please wait before trying again.",
        ),
        converse("after throttling"),
        bedrock_error(
            400,
            "ValidationException",
            &format!("Input is too long for requested model. {SECRET}"),
        ),
        bedrock_error(
            400,
            "ValidationException",
            "Malformed input request: extraneous key [foo]",
        ),
        bedrock_error(
            403,
            "AccessDeniedException",
            "You don't have access to the model with the specified model ID.",
        ),
        bedrock_error(503, "ServiceUnavailableException", "Service unavailable."),
        bedrock_error(
            408,
            "ModelTimeoutException",
            "Model has timed out in processing the request.",
        ),
    ])
    .await;
    let clock = ScriptedClock::new();
    let gw = Gateway::start_scripted(
        &config(&upstream, "[providers.b.retry]\nmax_attempts = 2"),
        &env_credentials(),
        clock.clone(),
    )
    .await;
    let mut client = gw.client().await;
    let answer = client
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(
        (answer.text().as_str(), answer.attempts),
        ("after throttling", 2)
    );

    for (code, class) in [
        (Code::InvalidArgument, "context-length"),
        (Code::InvalidArgument, "invalid-request"),
        (Code::FailedPrecondition, "auth"),
    ] {
        let err = client
            .complete(request::user("Hi"), &CallOptions::new())
            .await
            .unwrap_err();
        let status = err.status().unwrap();
        assert_eq!(status.code(), code, "{status:?}");
        assert!(status.message().contains(class), "{}", status.message());
        assert!(!status.message().contains(SECRET), "{}", status.message());
        assert!(!status.message().contains(SESSION));
    }
    // Overloaded, then a timeout: both transient, retried once, then the
    // last class is reported.
    let err = client
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap_err();
    let status = err.status().unwrap();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("timeout") && status.message().contains("ModelTimeoutException"),
        "{}",
        status.message()
    );
    assert_eq!(upstream.request_count(), 7);
}

#[tokio::test]
async fn bedrock_web_identity_credentials_come_from_sts_and_are_refreshed_before_expiry() {
    let dir = std::env::temp_dir().join(format!("pg-bedrock-wi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "eyJhbGciOiJSUzI1NiJ9.projected-sa-token.sig\n").unwrap();
    let sts_answer = |id: &str, expires: SystemTime| {
        let expiration = aws_smithy_types::DateTime::from(expires)
            .fmt(aws_smithy_types::date_time::Format::DateTime)
            .unwrap();
        let mut reply = Reply::json(200, json!({}));
        reply.headers = vec![("content-type".into(), "text/xml".into())];
        reply.body = format!(
            "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleWithWebIdentityResult>\
             <Credentials><AccessKeyId>{id}</AccessKeyId><SecretAccessKey>sts-secret-{id}</SecretAccessKey>\
             <SessionToken>sts-session-{id}</SessionToken><Expiration>{expiration}</Expiration></Credentials>\
             </AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
        )
        .into_bytes();
        reply
    };
    let now = SystemTime::now();
    // The first credentials expire in two minutes: inside the five-minute
    // margin, so the next call fetches new ones, which are then reused.
    let sts = Upstream::start(vec![
        sts_answer("ASIAFIRST", now + Duration::from_secs(120)),
        sts_answer("ASIASECOND", now + Duration::from_secs(3600)),
    ])
    .await;
    let upstream = Upstream::start(vec![converse("one"), converse("two"), converse("three")]).await;
    let gw = Gateway::start(
        &config(&upstream, &format!("sts_url = \"{}/\"", sts.url())),
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", token_file.to_str().unwrap()),
            ("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/gateway"),
            ("AWS_ROLE_SESSION_NAME", "gw-test"),
        ],
    )
    .await;
    let mut client = gw.client().await;
    for _ in 0..3 {
        client
            .complete(request::user("Hi"), &CallOptions::new())
            .await
            .unwrap();
    }
    assert_eq!(sts.request_count(), 2);
    let form: Vec<(String, String)> = form_urlencoded::parse(&sts.requests()[0].raw)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    assert_eq!(
        form,
        [
            ("Action".into(), "AssumeRoleWithWebIdentity".into()),
            ("Version".into(), "2011-06-15".into()),
            (
                "RoleArn".into(),
                "arn:aws:iam::123456789012:role/gateway".into()
            ),
            ("RoleSessionName".into(), "gw-test".into()),
            (
                "WebIdentityToken".into(),
                "eyJhbGciOiJSUzI1NiJ9.projected-sa-token.sig".into()
            ),
        ]
    );
    let sent = upstream.requests();
    assert_signed(
        &sent[0],
        &upstream,
        "ASIAFIRST",
        "sts-secret-ASIAFIRST",
        Some("sts-session-ASIAFIRST"),
    );
    assert_signed(
        &sent[1],
        &upstream,
        "ASIASECOND",
        "sts-secret-ASIASECOND",
        Some("sts-session-ASIASECOND"),
    );
    assert_signed(
        &sent[2],
        &upstream,
        "ASIASECOND",
        "sts-secret-ASIASECOND",
        Some("sts-session-ASIASECOND"),
    );
}

#[tokio::test]
async fn bedrock_container_credentials_send_the_token_file_and_profiles_are_read() {
    let dir = std::env::temp_dir().join(format!("pg-bedrock-c-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("eks-pod-identity-token");
    std::fs::write(&token_file, "pod-identity-token-value").unwrap();
    let expiration =
        aws_smithy_types::DateTime::from(SystemTime::now() + Duration::from_secs(3600))
            .fmt(aws_smithy_types::date_time::Format::DateTime)
            .unwrap();
    let creds = Upstream::start(vec![Reply::json(
        200,
        json!({"AccessKeyId": "ASIACONTAINER", "SecretAccessKey": "container-secret",
            "Token": "container-session", "Expiration": expiration}),
    )])
    .await;
    let upstream = Upstream::start(vec![converse("one"), converse("two")]).await;
    let full_uri = format!("{}/v1/credentials", creds.url());
    let gw = Gateway::start(
        &config(&upstream, ""),
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", full_uri.as_str()),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                token_file.to_str().unwrap(),
            ),
        ],
    )
    .await;
    let mut client = gw.client().await;
    client
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();
    client
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(creds.request_count(), 1, "cached until near expiry");
    let fetch = &creds.requests()[0];
    assert_eq!(
        (fetch.method.as_str(), fetch.path.as_str()),
        ("GET", "/v1/credentials")
    );
    assert_eq!(
        fetch.header("authorization"),
        Some("pod-identity-token-value")
    );
    assert_signed(
        &upstream.requests()[0],
        &upstream,
        "ASIACONTAINER",
        "container-secret",
        Some("container-session"),
    );

    // A named profile of the shared credentials file.
    let file = dir.join("credentials");
    std::fs::write(
        &file,
        "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = default-secret\n\n[gateway]\naws_access_key_id = AKIAPROFILE\naws_secret_access_key = profile-secret\n",
    )
    .unwrap();
    let upstream = Upstream::start(vec![converse("p")]).await;
    let gw = Gateway::start(
        &config(&upstream, "profile = \"gateway\""),
        &[("AWS_SHARED_CREDENTIALS_FILE", file.to_str().unwrap())],
    )
    .await;
    gw.client()
        .await
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();
    assert_signed(
        &upstream.requests()[0],
        &upstream,
        "AKIAPROFILE",
        "profile-secret",
        None,
    );
}

#[tokio::test]
async fn bedrock_configuration_names_the_missing_credential_source_and_region() {
    let build = |toml: &str, env: &[(&str, &str)]| {
        let config = provider_gateway_server::Config::from_toml(&format!(
            "default_provider = \"b\"\n[providers.b]\nkind = \"bedrock\"\n{toml}"
        ))?;
        let env: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        provider_gateway_server::Registry::from_config(&config, &env).map(|_| ())
    };
    let e = build("region = \"us-east-1\"\n", &[("HOME", "/nonexistent")]).unwrap_err();
    for source in [
        "AWS_ACCESS_KEY_ID",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "profile `default`",
    ] {
        assert!(e.0.contains(source), "{source}: {e}");
    }
    let e = build("", &env_credentials()).unwrap_err();
    assert!(e.0.contains("providers.b.region"), "{e}");
    build(
        "",
        &[
            ("AWS_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "A"),
            ("AWS_SECRET_ACCESS_KEY", "S"),
        ],
    )
    .unwrap();
    let e = build("region = \"us-east-1\"\n", &[("AWS_ACCESS_KEY_ID", "A")]).unwrap_err();
    assert!(e.0.contains("AWS_SECRET_ACCESS_KEY"), "{e}");
    let e = build(
        "region = \"us-east-1\"\n",
        &[(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://10.1.2.3/creds",
        )],
    )
    .unwrap_err();
    assert!(e.0.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI"), "{e}");
    let e = build(
        "region = \"us-east-1\"\nprofile = \"nope\"\n",
        &[("HOME", "/nonexistent")],
    )
    .unwrap_err();
    assert!(e.0.contains("providers.b.profile"), "{e}");
    let e = build(
        "region = \"us-east-1\"\nproject = \"x\"\n",
        &env_credentials(),
    )
    .unwrap_err();
    assert!(e.0.contains("providers.b.project"), "{e}");
}

#[tokio::test]
async fn an_anthropic_primary_falls_back_to_bedrock_claude_with_the_hops_model() {
    let anthropic = Upstream::start(vec![Reply::json(
        529,
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )])
    .await;
    let bedrock = Upstream::start(vec![converse("from bedrock")]).await;
    let hop_model = "us.anthropic.claude-sonnet-4-5-20250929-v1:0";
    let toml = format!(
        "default_provider = \"a\"\n\
         [providers.a]\nkind = \"anthropic\"\nbase_url = \"{}\"\napi_key_env = \"A_KEY\"\n\
         fallback = [{{ provider = \"b\", model = \"{hop_model}\" }}]\n\
         [providers.a.retry]\nmax_attempts = 1\n\
         [providers.b]\nkind = \"bedrock\"\nbase_url = \"{}\"\nregion = \"us-east-1\"\n",
        anthropic.url(),
        bedrock.url()
    );
    let mut env = env_credentials();
    env.push(("A_KEY", "sk-ant-test-key-123"));
    let gw = Gateway::start(&toml, &env).await;
    let answer = gw
        .client()
        .await
        .complete(request::user("Hi"), &CallOptions::new())
        .await
        .unwrap();
    assert_eq!(answer.text(), "from bedrock");
    assert_eq!((answer.provider.as_str(), answer.attempts), ("b", 2));
    assert_eq!(anthropic.request_count(), 1);
    let sent = &bedrock.requests()[0];
    assert_eq!(sent.path, format!("/model/{hop_model}/converse"));
    assert_signed(sent, &bedrock, KEY_ID, SECRET, Some(SESSION));
}

#[tokio::test]
async fn check_config_names_a_missing_cloud_credential_and_never_prints_one() {
    let dir = std::env::temp_dir().join(format!("pg-cloud-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gateway.toml");
    std::fs::write(
        &file,
        "default_provider = \"b\"\n\
         [providers.b]\nkind = \"bedrock\"\nregion = \"us-east-1\"\n\
         [providers.az]\nkind = \"azure-openai\"\nbase_url = \"https://r.openai.azure.com\"\nmodel = \"d\"\napi_key_env = \"AZ_KEY\"\n\
         [providers.g]\nkind = \"gemini\"\n",
    )
    .unwrap();
    let run = |env: &[(&str, &str)]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_provider-gateway"));
        cmd.arg("--check-config")
            .arg("--config")
            .arg(&file)
            .env_clear()
            .env("HOME", &dir)
            .env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output()
    };
    let out = run(&[
        ("AZ_KEY", "azure-key-0123456789"),
        ("GEMINI_API_KEY", "gemini-key-0123456789"),
    ])
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no AWS credentials") && stderr.contains("AWS_WEB_IDENTITY_TOKEN_FILE"),
        "{stderr}"
    );
    let secrets = [
        ("AZ_KEY", "azure-key-0123456789"),
        ("GEMINI_API_KEY", "gemini-key-0123456789"),
        ("AWS_ACCESS_KEY_ID", KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", SECRET),
        ("AWS_SESSION_TOKEN", SESSION),
    ];
    let out = run(&secrets).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for (_, secret) in secrets.iter().skip(2).chain(&secrets[..2]) {
        assert!(!stderr.contains(secret), "{stderr}");
    }
    let out = run(&secrets[2..]).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("AZ_KEY"), "{stderr}");
}

#[test]
fn keys_of_other_kinds_are_named() {
    for (kind, extra, key) in [
        ("bedrock", "", "api_key_env"),
        ("bedrock", "", "token_url"),
        ("vertex", "project = \"p\"\n", "api_key_env"),
        ("vertex", "project = \"p\"\n", "profile"),
    ] {
        let e = provider_gateway_server::Config::from_toml(&format!(
            "default_provider = \"x\"\n[providers.x]\nkind = \"{kind}\"\nregion = \"r\"\n{extra}{key} = \"V\"\n"
        ))
        .unwrap_err();
        assert!(
            e.0.contains(&format!("providers.x.{key}")),
            "{kind} {key}: {e}"
        );
    }
}
