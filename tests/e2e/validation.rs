//! Requests the gateway rejects before anything goes upstream.

use provider_gateway_client::v1::content_block::Block;
use provider_gateway_client::{CallOptions, request, v1};
use tonic::Code;

use crate::support::{ENV, Gateway, Upstream, provider_config};

#[tokio::test]
async fn malformed_requests_are_invalid_argument_naming_the_field() {
    // An upstream that would answer; it must never be called.
    let upstream = Upstream::start(vec![]).await;
    let gw = Gateway::start(&provider_config("anthropic", &upstream.url(), ""), ENV).await;
    let mut client = gw.client().await;

    let user = request::user_message;
    let assistant = request::assistant_message;
    let with = |f: &dyn Fn(&mut v1::CompleteRequest)| {
        let mut r = request::user("hi");
        f(&mut r);
        r
    };
    let cases: Vec<(v1::CompleteRequest, &str)> = vec![
        (
            with(&|r| r.messages.clear()),
            "messages: at least one message",
        ),
        (
            with(&|r| r.messages[0].content.clear()),
            "messages[0].content",
        ),
        (
            with(&|r| r.messages[0].content = vec![v1::ContentBlock { block: None }]),
            "messages[0].content[0]",
        ),
        (with(&|r| r.messages[0].role = 0), "messages[0].role"),
        (
            with(&|r| r.messages = vec![assistant("x")]),
            "start with a ROLE_USER",
        ),
        (
            with(&|r| r.messages = vec![user("a"), user("b")]),
            "messages[1].role: roles must alternate",
        ),
        (with(&|r| r.max_tokens = Some(0)), "max_tokens"),
        (with(&|r| r.temperature = Some(3.0)), "temperature"),
        (
            with(&|r| r.tools = vec![request::tool("t", "", "{not json")]),
            "tools[0].input_schema_json: not valid JSON",
        ),
        (
            with(&|r| r.tools = vec![request::tool("t", "", "[1,2]")]),
            "tools[0].input_schema_json: must be a JSON Schema object",
        ),
        (
            with(&|r| r.tools = vec![request::tool("bad name", "", "{}")]),
            "tools[0].name",
        ),
        (
            with(&|r| {
                r.tool_choice = Some(v1::ToolChoice {
                    mode: v1::tool_choice::Mode::Tool as i32,
                    name: "ghost".into(),
                })
            }),
            "tool_choice.name",
        ),
        (
            with(&|r| {
                r.messages = vec![
                    user("a"),
                    v1::Message {
                        role: v1::Role::Assistant as i32,
                        content: vec![v1::ContentBlock {
                            block: Some(Block::ToolUse(v1::ToolUse {
                                id: "1".into(),
                                name: "t".into(),
                                input_json: "nope".into(),
                            })),
                        }],
                    },
                ]
            }),
            "messages[1].content[0].tool_use.input_json",
        ),
    ];
    for (req, expected) in cases {
        let err = client
            .complete(req.clone(), &CallOptions::new())
            .await
            .unwrap_err();
        let status = err.status().unwrap();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{expected}: {status:?}"
        );
        assert!(
            status.message().contains(expected),
            "expected `{expected}` in `{}`",
            status.message()
        );
        // Stream validates the same way.
        let err = client.stream(req, &CallOptions::new()).await.err().unwrap();
        assert_eq!(err.status().unwrap().code(), Code::InvalidArgument);
    }
    assert_eq!(upstream.request_count(), 0, "nothing went upstream");
}
